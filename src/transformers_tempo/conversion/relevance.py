"""`relevance_vector`: r = W[Yes] - W[No] from the base Qwen3-VL LM head, rounded as the released code does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointReader, dtype_name, read_json, token_id
from .errors import ConversionError

# Where the base Qwen3-VL checkpoint keeps its LM head / input embeddings (transformers >= 4.57 layout
# first, then the older Qwen2-VL-style layout).
BASE_LM_HEAD_KEYS = ("lm_head.weight",)
BASE_EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")


def relevance_vector(qwen3vl_path: str | os.PathLike, tokenizer=None, subtract_dtype: torch.dtype = torch.bfloat16):
    """r = W[Yes] - W[No] from the base Qwen3-VL LM head, as a (1, D) float32 tensor, and how it was made.

    The LM head of Qwen3-VL-2B-Instruct is tied to its input embeddings (``tie_word_embeddings``), so the
    rows come from ``model.language_model.embed_tokens.weight`` unless the base config unties them (then
    ``lm_head.weight``). Only the two rows are read.

    Rounding, as released: the released code builds the vector from the base model loaded in the dtype the
    Tempo model runs in, takes ``weight_yes - weight_no`` on those rows (so the difference is rounded to that
    dtype) and copies it into a float32 ``nn.Linear``. We do the same with ``subtract_dtype`` = the dtype
    the converted weights are stored in: rows -> ``subtract_dtype``, subtract there, upcast to float32.
    A bfloat16 model gets a bf16-rounded difference, a float32 model the exact float32 one.
    """
    from transformers import AutoTokenizer

    path = Path(qwen3vl_path)
    base_config = read_json(path / "config.json", "base Qwen3-VL")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    yes_id = token_id(tokenizer, "Yes", f"base Qwen3-VL tokenizer ({path})")
    no_id = token_id(tokenizer, "No", f"base Qwen3-VL tokenizer ({path})")
    checkpoint = CheckpointReader(path, allow_pickle=False, what="base Qwen3-VL checkpoint")
    try:
        source, notes = _lm_head_key(checkpoint, _ties_lm_head(base_config), rows=[yes_id, no_id])
        vocab = checkpoint.shape(source)[0]
        for name, idx in (("Yes", yes_id), ("No", no_id)):
            if idx >= vocab:
                raise ConversionError(f"base Qwen3-VL: token {name!r} has id {idx}, outside {source} ({vocab} rows)")
        rows = checkpoint.rows(source, [yes_id, no_id]).to(subtract_dtype)
        vector = (rows[0] - rows[1]).to(torch.float32).unsqueeze(0)
    finally:
        checkpoint.close()
    info = {
        "base": str(path),
        "source_key": source,
        "yes_id": yes_id,
        "no_id": no_id,
        "subtract_dtype": dtype_name(subtract_dtype),
        "notes": notes,
    }
    return vector, info


def _ties_lm_head(base_config: dict) -> bool:
    tied = base_config.get("tie_word_embeddings")
    if tied is None:
        tied = (base_config.get("text_config") or {}).get("tie_word_embeddings", False)
    return bool(tied)


def _lm_head_key(checkpoint: CheckpointReader, tied: bool, *, rows: list[int]) -> tuple[str, list[str]]:
    """The tensor that holds the base LM head (the embeddings when tied) and notes for the report."""
    keys = set(checkpoint.keys())
    head = next((k for k in BASE_LM_HEAD_KEYS if k in keys), None)
    embed = next((k for k in BASE_EMBEDDING_KEYS if k in keys), None)
    path = checkpoint.folder
    if not tied:
        if head is None:
            raise ConversionError(f"base Qwen3-VL checkpoint {path}: untied LM head but no lm_head.weight")
        return head, []
    if embed is None:
        raise ConversionError(
            f"base Qwen3-VL checkpoint {path}: tied LM head but no input embeddings ({', '.join(BASE_EMBEDDING_KEYS)})"
        )
    notes = []
    if head is not None and not torch.equal(checkpoint.rows(head, rows), checkpoint.rows(embed, rows)):
        notes.append(
            f"base has a separate {head} that differs from {embed} at the Yes/No rows; its config ties them, "
            f"so (like transformers when loading it) the embeddings were used"
        )
    return embed, notes
