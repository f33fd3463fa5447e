"""Convert the released Tempo-6B checkpoint into this package's format (and optionally upload it).

The released checkpoint (``Vision-CAIR/Tempo-6B``) is a LLaVA-style ``tempo_qwen`` model: the Qwen3-4B
decoder at the top level of its ``config.json`` and state dict, plus the compressor (a whole
Qwen3-VL-2B-Instruct body), the memory ("compression") tokens and the projector under
``model.vision_tower_aux_list.0.*`` / ``model.mm_projector.*``. The relevance vector is not stored
there: the released code builds it at run time from the LM head of the *base* Qwen3-VL-2B-Instruct, so
the conversion needs that base model too.

    from transformers_tempo.conversion import convert_tempo_checkpoint

    report = convert_tempo_checkpoint("checkpoints/Tempo-6B", "checkpoints/Qwen3-VL-2B-Instruct", "tempo-6b-hf")
    print(report.summary())

The output folder loads with ``AutoModel.from_pretrained(out)`` after ``import transformers_tempo``, or
with ``trust_remote_code=True`` alone (the package's modules are copied next to the weights).

Nothing is written at the target until everything has succeeded: the output is assembled in a hidden
temporary folder beside it and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi

__all__ = [
    "ConversionError",
    "ConversionReport",
    "KEY_RULES",
    "REMOTE_CODE_AUTO_MAP",
    "add_convert_arguments",
    "build_tempo_config",
    "convert_tempo_checkpoint",
    "map_released_key",
    "push_folder_to_hub",
    "relevance_vector",
    "run_convert",
]

# Released key prefix -> converted key prefix, checked in this order (first match wins).
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower_aux_list.0.vlm.model.visual.", "model.compressor.visual."),
    ("model.vision_tower_aux_list.0.vlm.model.language_model.", "model.compressor.language_model."),
    ("model.vision_tower_aux_list.0.compression_tokens", "model.memory_tokens"),  # (1, M, D) -> (M, D)
    ("model.mm_projector.0.", "model.projector.linear_1."),  # mlp2x_gelu: Linear, GELU, Linear
    ("model.mm_projector.2.", "model.projector.linear_2."),
    ("model.mm_projector.", "model.projector.linear_1."),  # projector_type "linear": a bare nn.Linear
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),  # tied to the embeddings in Tempo-6B; optional
)
MEMORY_TOKENS_SOURCE = "model.vision_tower_aux_list.0.compression_tokens"
RELEVANCE_TARGET = "model.relevance_head.weight"
EMBEDDINGS_TARGET = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

# Where the base Qwen3-VL checkpoint keeps its LM head / input embeddings (transformers >= 4.57 layout
# first, then the older Qwen2-VL-style layout).
BASE_LM_HEAD_KEYS = ("lm_head.weight",)
BASE_EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")

# config.json "auto_map" of the converted folder: Auto class -> module.Class of the copied code.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_tempo.TempoConfig",
    "AutoModel": "modeling_tempo.TempoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_tempo.TempoForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_tempo.TempoForConditionalGeneration",
    "AutoProcessor": "processing_tempo.TempoProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_tempo.TempoProcessor"}
REMOTE_CODE_ENTRY_MODULES = ("configuration_tempo", "modeling_tempo", "processing_tempo")

# transformers 4.x Qwen3 config keys (the released config.json) that Qwen3Config still understands.
_QWEN3_LEGACY_KEYS = ("rope_theta",)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_MODEL_CARD = Path(__file__).resolve().parents[2] / "model_cards" / "tempo-6b.md"
MODEL_CARD_REPO_PLACEHOLDER = "<org>/tempo-6b"

Progress = Callable[[str], Any] | None


class ConversionError(ValueError):
    """The inputs cannot be converted; the message says which input and what is wrong."""


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did.

    key_mapping: released tensor name -> converted parameter name, for every released tensor (in the
        order of the checkpoint); tied tensors (an ``lm_head.weight`` that duplicates the embeddings)
        map to ``None`` with the reason in ``tied_weights``.
    tied_weights: converted parameter -> the parameter it is tied to (not stored separately).
    relevance: how the relevance vector was built (base checkpoint, token ids, rows, rounding).
    """

    output_dir: str
    dtype: str
    key_mapping: dict[str, str | None]
    tied_weights: dict[str, str]
    relevance: dict[str, Any]
    config_notes: list[str]
    warnings: list[str]
    num_tensors: int
    num_parameters: int
    files: list[str]
    step_seconds: dict[str, float]
    seconds: float
    pushed_to: str | None = None

    def rule_counts(self) -> list[tuple[str, str, int]]:
        """(released prefix, converted prefix, number of tensors) for every rule that was used."""
        counts: Counter = Counter()
        for source, target in self.key_mapping.items():
            rule = _match_rule(source) if target is not None else None
            if rule is not None:
                counts[rule] += 1
        return [(src, dst, counts[(src, dst)]) for src, dst in KEY_RULES if counts[(src, dst)]]

    def summary(self) -> str:
        lines = [f"Converted Tempo checkpoint -> {self.output_dir} ({self.dtype})", "Key mapping (released -> converted):"]
        width = max((len(src) for src, _, _ in self.rule_counts()), default=0)
        for src, dst, n in self.rule_counts():
            note = "  [(1, M, D) -> (M, D)]" if src == MEMORY_TOKENS_SOURCE else ""
            lines.append(f"  {src + '*' if src.endswith('.') else src:<{width + 1}} -> {dst}{'*' if dst.endswith('.') else ''}"
                         f"  ({n} tensor{'s' if n != 1 else ''}){note}")
        rel = self.relevance
        lines.append(
            f"  (base) {rel['source_key']}[Yes={rel['yes_id']}] - [No={rel['no_id']}] -> {RELEVANCE_TARGET}"
            f"  (subtracted in {rel['subtract_dtype']}, stored float32)"
        )
        for target, source in self.tied_weights.items():
            dropped = " (the checkpoint's copy was compared and dropped)" if target in self.key_mapping else ""
            lines.append(f"  tied: {target} = {source} (not stored){dropped}")
        for note in self.config_notes:
            lines.append(f"config: {note}")
        for warning in self.warnings:
            lines.append(f"WARNING: {warning}")
        lines.append(
            f"{self.num_tensors} tensors, {self.num_parameters:,} parameters, {len(self.files)} files, "
            f"{self.seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.step_seconds.items()) + ")"
        )
        if self.pushed_to:
            lines.append(f"uploaded to https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- keys
def _match_rule(key: str) -> tuple[str, str] | None:
    for src, dst in KEY_RULES:
        if src.endswith("."):
            if key.startswith(src):
                return src, dst
        elif key == src or key.startswith(src + "."):
            return src, dst
    return None


def map_released_key(key: str) -> str | None:
    """The converted name of a released tensor, or None when no rule covers it."""
    rule = _match_rule(key)
    if rule is None:
        return None
    src, dst = rule
    return dst + key[len(src) :]


# ----------------------------------------------------------------------------------------------- reading
class _Checkpoint:
    """The tensors of a checkpoint folder: safetensors (one file or sharded with an index), or, only when
    allowed, pickle files read with ``torch.load(weights_only=True)``."""

    def __init__(self, folder: Path, allow_pickle: bool = False, what: str = "checkpoint"):
        self.folder = folder
        self.what = what
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self.key_file: dict[str, Path] = {}
        self.format = "safetensors"
        safetensors_files = self._files(folder, "model.safetensors.index.json", (".safetensors",))
        if safetensors_files is not None:
            self._open_safetensors(safetensors_files)
            return
        pickle_files = self._files(folder, "pytorch_model.bin.index.json", PICKLE_SUFFIXES)
        if pickle_files is None:
            raise ConversionError(f"{what} {folder}: no weights found (expected *.safetensors, optionally with an index)")
        names = ", ".join(sorted(p.name for p in pickle_files))
        if not allow_pickle:
            raise ConversionError(
                f"{what} {folder} holds only pickle weights ({names}). Unpickling can execute arbitrary code "
                "hidden in the file, so it is refused by default. Convert them to safetensors, or pass "
                "allow_pickle=True (--allow-pickle) if you trust the file; it is then read with "
                "torch.load(weights_only=True)."
            )
        self.format = "pickle"
        for path in pickle_files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - name the file
                raise ConversionError(f"{what} {path}: cannot be read with torch.load(weights_only=True): {err}") from err
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ConversionError(f"{what} {path}: expected a flat dict of tensors")
            for key, tensor in state.items():
                if key in self._pickled:
                    raise ConversionError(f"{what}: tensor {key!r} appears in more than one file")
                self._pickled[key] = tensor
                self.key_file[key] = path

    def _files(self, folder: Path, index_name: str, suffixes: tuple[str, ...]) -> list[Path] | None:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{self.what} index {index}: not a valid index file ({err})") from err
            files = sorted({folder / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise ConversionError(f"{self.what} index {index} names shards that do not exist: {', '.join(missing)}")
            self._index = weight_map
            return files
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
        self._index = None
        return files or None

    def _open_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # noqa: BLE001
                raise ConversionError(f"{self.what} {path}: not a readable safetensors file ({err})") from err
            self._handles[path] = handle
            for key in handle.keys():
                if key in self.key_file:
                    raise ConversionError(
                        f"{self.what}: tensor {key!r} is in both {self.key_file[key].name} and {path.name}"
                    )
                self.key_file[key] = path
        if self._index is not None:
            wrong = [k for k, name in self._index.items() if self.key_file.get(k, Path()).name != name]
            if wrong:
                raise ConversionError(
                    f"{self.what}: the index and the shards disagree on {len(wrong)} tensors: {', '.join(wrong)}"
                )

    def keys(self) -> list[str]:
        return list(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.format == "pickle":
            return tuple(self._pickled[key].shape)
        return tuple(self._handles[self.key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self.format == "pickle":
            return self._pickled[key].dtype
        name = self._handles[self.key_file[key]].get_slice(key).get_dtype()
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
        if name not in names:
            raise ConversionError(f"{self.what}: tensor {key!r} has dtype {name}, not a float type")
        return names[name]

    def get(self, key: str) -> torch.Tensor:
        """The tensor (for pickle input, handed over: the reader forgets it so that only one copy lives)."""
        if self.format == "pickle":
            return self._pickled.pop(key)
        return self._handles[self.key_file[key]].get_tensor(key)

    def rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Selected rows of a 2-D tensor, without reading the rest (safetensors)."""
        if self.format == "pickle":
            return self._pickled[key][rows]
        piece = self._handles[self.key_file[key]].get_slice(key)
        return torch.stack([piece[r : r + 1][0] for r in rows])

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()


# ----------------------------------------------------------------------------------------------- config
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{what}: {path} is not valid JSON ({err})") from err


def _token_id(tokenizer, token: str, what: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ConversionError(f"{what}: the tokenizer has no token {token!r}")
    return int(vocab[token])


def build_tempo_config(released: dict, base_config: dict, tokenizer, base_tokenizer=None):
    """TempoConfig from the released ``config.json`` (decoder fields at top level + Tempo fields), the base
    Qwen3-VL ``config.json`` (the compressor) and the decoder tokenizer. Returns (config, notes)."""
    from transformers import Qwen3Config, Qwen3VLConfig

    from .configuration_tempo import TempoConfig

    notes: list[str] = []
    model_type = released.get("model_type")
    if model_type != "tempo_qwen":
        raise ConversionError(f"released config.json: model_type is {model_type!r}, expected 'tempo_qwen'")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if released.get(flag):
            raise ConversionError(
                f"released config.json: {flag}=true adds extra tokens to the decoder vocabulary; Tempo-6B does not "
                "use them and this converter does not support them"
            )
    towers = released.get("mm_vision_tower_aux_list") or []
    if isinstance(towers, str):
        towers = [towers]
    if len(towers) != 1:
        raise ConversionError(
            f"released config.json: mm_vision_tower_aux_list must name exactly one Qwen3-VL compressor, got {towers!r}"
        )
    notes.append(f"compressor base named by the checkpoint: {towers[0]}")

    # Decoder: the Qwen3 fields of the top level.
    qwen3_fields = {f.name for f in dataclasses.fields(Qwen3Config)} - {
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
    }
    text = {k: copy.deepcopy(v) for k, v in released.items() if k in qwen3_fields or k in _QWEN3_LEGACY_KEYS}
    if "torch_dtype" in released and "dtype" not in text:
        text["dtype"] = released["torch_dtype"]
    if released.get("rope_scaling"):
        notes.append(
            f"rope_scaling {released['rope_scaling']!r} ignored: the released model sets rope_scaling=None when built"
        )
    text["model_type"] = "qwen3"
    for required in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if required not in text:
            raise ConversionError(f"released config.json: the decoder field {required!r} is missing")
    text_config = Qwen3Config(**{k: v for k, v in text.items() if k != "model_type"})

    # Compressor: the base Qwen3-VL config as it is.
    if base_config.get("model_type") != "qwen3_vl":
        raise ConversionError(
            f"base config.json: model_type is {base_config.get('model_type')!r}, expected 'qwen3_vl' (Qwen3-VL-2B-Instruct)"
        )
    compressor = Qwen3VLConfig(**{k: v for k, v in base_config.items() if k not in ("model_type", "transformers_version")})
    if compressor.text_config.pad_token_id is None and base_tokenizer is not None and base_tokenizer.pad_token_id is not None:
        # The released compressor pads (and fills the memory positions' ids) with the base tokenizer's pad id.
        compressor.text_config.pad_token_id = int(base_tokenizer.pad_token_id)
    compressor_hidden = compressor.text_config.hidden_size
    mm_hidden = released.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != compressor_hidden:
        raise ConversionError(
            f"released config.json: mm_hidden_size={mm_hidden} but the base Qwen3-VL hidden size is {compressor_hidden}: "
            "qwen3vl_path is not the compressor this checkpoint was trained with"
        )

    settings: dict[str, Any] = {}
    if "num_compression_tokens" not in released:
        raise ConversionError("released config.json: num_compression_tokens is missing")
    settings["num_memory_tokens"] = int(released["num_compression_tokens"])
    projector_type = released.get("mm_projector_type", "linear")
    if projector_type not in ("mlp2x_gelu", "linear"):
        raise ConversionError(
            f"released config.json: mm_projector_type {projector_type!r} is not supported (mlp2x_gelu or linear)"
        )
    settings["projector_type"] = projector_type
    if released.get("tokenizer_model_max_length"):
        settings["max_context_length"] = int(released["tokenizer_model_max_length"])
        notes.append(f"max_context_length={settings['max_context_length']} (tokenizer_model_max_length of the checkpoint)")
    else:
        notes.append("max_context_length=32768 (TempoConfig default; the checkpoint does not set tokenizer_model_max_length)")
    settings["video_token_id"] = _token_id(tokenizer, "<|video_pad|>", "decoder tokenizer")
    settings["image_token_id"] = _token_id(tokenizer, "<|image_pad|>", "decoder tokenizer")
    for name in ("video_token_id", "image_token_id"):
        if settings[name] >= text_config.vocab_size:
            raise ConversionError(
                f"decoder tokenizer: {name}={settings[name]} is outside the decoder vocabulary ({text_config.vocab_size})"
            )
    for field in ("visual_token_budget", "dynamic_compress"):
        if field in released:
            notes.append(
                f"{field}={released[field]!r} in the checkpoint is a run-time setting of the released scripts; "
                "the ATA defaults of TempoConfig (budget 8192, min 4, on) were kept"
            )
    # TempoProcessor tokenises the compressor prompts with the decoder tokenizer: the compressor's special
    # token ids (from the base config) must be that tokenizer's ids.
    vocab = tokenizer.get_vocab()
    for name, token in (
        ("video_token_id", "<|video_pad|>"),
        ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        want = getattr(compressor, name, None)
        if want is not None and vocab.get(token) != want:
            raise ConversionError(
                f"base config {name}={want} but the decoder tokenizer gives {token!r} id {vocab.get(token)}; the "
                "processor tokenises the compressor prompts with the decoder tokenizer, so they must agree"
            )
    if base_tokenizer is not None:
        base_vocab = base_tokenizer.get_vocab()
        differ = sorted(t for t in base_vocab.keys() & vocab.keys() if base_vocab[t] != vocab[t])
        prompt_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                         "<|video_pad|>", "<|image_pad|>", "Yes", "No")
        bad = [t for t in prompt_tokens if t in differ]
        if bad:
            raise ConversionError(
                f"the decoder tokenizer and the base Qwen3-VL tokenizer give {bad} different ids; the processor "
                "tokenises the compressor prompts with the decoder tokenizer, so they must agree"
            )
        if differ:
            notes.append(
                f"warning: the decoder and base tokenizers give {len(differ)} tokens different ids (e.g. {differ[:5]}); "
                "the compressor prompts are tokenised with the decoder tokenizer"
            )
        only_base = sorted(base_vocab.keys() - vocab.keys(), key=base_vocab.get)
        if only_base:
            notes.append(f"{len(only_base)} base-tokenizer tokens are not in the decoder tokenizer: {only_base[:5]}")
    config = TempoConfig(compressor_config=compressor.to_dict(), text_config=text_config.to_dict(), **settings)
    return config, notes


# ----------------------------------------------------------------------------------------------- relevance
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
    base_config = _read_json(path / "config.json", "base Qwen3-VL")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    yes_id = _token_id(tokenizer, "Yes", f"base Qwen3-VL tokenizer ({path})")
    no_id = _token_id(tokenizer, "No", f"base Qwen3-VL tokenizer ({path})")
    tied = base_config.get("tie_word_embeddings")
    if tied is None:
        tied = (base_config.get("text_config") or {}).get("tie_word_embeddings", False)
    checkpoint = _Checkpoint(path, allow_pickle=False, what="base Qwen3-VL checkpoint")
    try:
        keys = set(checkpoint.keys())
        head = next((k for k in BASE_LM_HEAD_KEYS if k in keys), None)
        embed = next((k for k in BASE_EMBEDDING_KEYS if k in keys), None)
        notes = []
        if tied:
            if embed is None:
                raise ConversionError(
                    f"base Qwen3-VL checkpoint {path}: tied LM head but no input embeddings ({', '.join(BASE_EMBEDDING_KEYS)})"
                )
            source = embed
            if head is not None:
                same = torch.equal(checkpoint.rows(head, [yes_id, no_id]), checkpoint.rows(embed, [yes_id, no_id]))
                if not same:
                    notes.append(
                        f"base has a separate {head} that differs from {embed} at the Yes/No rows; its config ties them, "
                        f"so (like transformers when loading it) the embeddings were used"
                    )
        else:
            if head is None:
                raise ConversionError(f"base Qwen3-VL checkpoint {path}: untied LM head but no lm_head.weight")
            source = head
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
        "subtract_dtype": _dtype_name(subtract_dtype),
        "notes": notes,
    }
    return vector, info


# ----------------------------------------------------------------------------------------------- processor, code, card
def write_processor_files(output_dir: Path, tokenizer, base_path: Path) -> list[str]:
    """Save the TempoProcessor (video processor + decoder tokenizer + both chat templates) into output_dir.

    The decoder prompt template is the processor's own (the released ChatML prompt); the compressor's is
    the base Qwen3-VL processor's chat template (``chat_template.jinja``/``.json`` or its tokenizer's), or
    the processor's restatement of it when the base folder has none. Returns notes for the report.
    """
    from .processing_tempo import COMPRESSOR_CHAT_TEMPLATE, TempoProcessor
    from .video_processing_tempo import TempoVideoProcessor

    notes = []
    compressor_template = _base_chat_template(base_path)
    kwargs = {}
    if compressor_template is None:
        notes.append("the base Qwen3-VL folder has no chat template; the processor's built-in compressor template is used")
    else:
        # The released compressor prompt is rendered by the base Qwen3-VL processor's own template: keep it.
        kwargs["compressor_chat_template"] = compressor_template
        differs = [
            kind
            for kind in ("video", "image")
            if _render(tokenizer, compressor_template, kind) != _render(tokenizer, COMPRESSOR_CHAT_TEMPLATE, kind)
        ]
        if differs:
            notes.append(
                f"the base Qwen3-VL chat template renders the {'/'.join(differs)} compressor prompt differently from the "
                "processor's built-in template; the base template (the released behaviour) was saved"
            )
        else:
            notes.append("compressor chat template: the base Qwen3-VL one (renders Tempo's prompts as the built-in one)")
    processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer, **kwargs)
    processor.save_pretrained(output_dir)
    _add_auto_map(output_dir / "processor_config.json", PROCESSOR_AUTO_MAP)
    return notes


def _render(tokenizer, template: str, kind: str) -> str | None:
    from .processing_tempo import TempoProcessor

    try:
        messages = TempoProcessor._compressor_view(kind, "What happens?")
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template that cannot render is reported as different
        return f"<error: {err}>"


def _base_chat_template(base_path: Path) -> str | None:
    for name in ("chat_template.jinja",):
        if (base_path / name).is_file():
            return (base_path / name).read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (base_path / name).is_file():
            template = _read_json(base_path / name, "base Qwen3-VL").get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _add_auto_map(path: Path, auto_map: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("auto_map", {}).update(auto_map)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remote_code_modules(entry_modules=REMOTE_CODE_ENTRY_MODULES) -> list[Path]:
    """The package modules that `trust_remote_code` loading needs: the entry modules and every module they
    import relatively, transitively. Refuses a module that imports the package by its absolute name (it
    would not import where the package is not installed)."""
    package_dir = Path(__file__).resolve().parent
    package = __name__.rpartition(".")[0] or "transformers_tempo"
    todo = [m for m in entry_modules if (package_dir / f"{m}.py").is_file()]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = package_dir / f"{name}.py"
        if not path.is_file():
            raise ConversionError(f"remote code: module {name!r} is imported relatively but {path} does not exist")
        seen[name] = path
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == package:
                raise ConversionError(
                    f"remote code: {path.name}:{node.lineno} imports {node.module!r} absolutely; use a relative import"
                )
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
                raise ConversionError(f"remote code: {path.name}:{node.lineno} imports the package absolutely")
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                if node.level > 1:
                    raise ConversionError(f"remote code: {path.name}:{node.lineno} imports from outside the package")
                if node.module:
                    todo.append(node.module.split(".")[0])
                else:
                    todo.extend(a.name for a in node.names if (package_dir / f"{a.name}.py").is_file())
    return [seen[name] for name in sorted(seen)]


def write_remote_code(output_dir: Path) -> list[str]:
    copied = []
    for path in remote_code_modules():
        shutil.copyfile(path, output_dir / path.name)
        copied.append(path.name)
    return copied


def write_model_card(output_dir: Path, model_card: str | os.PathLike | None, repo_id: str | None) -> str | None:
    path = Path(model_card) if model_card is not None else DEFAULT_MODEL_CARD
    if not path.is_file():
        if model_card is not None:
            raise ConversionError(f"model card {path} does not exist")
        return f"no model card written ({path} not found)"
    text = path.read_text()
    if repo_id:
        text = text.replace(MODEL_CARD_REPO_PLACEHOLDER, repo_id)
    (output_dir / "README.md").write_text(text)
    return None


# ----------------------------------------------------------------------------------------------- hub
def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload Tempo (converted with transformers-tempo)") -> str:
    """Create the model repository if needed and upload the folder; the token comes from `token`, else the
    usual HF_TOKEN / `hf auth login`. Returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


# ----------------------------------------------------------------------------------------------- conversion
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve_dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConversionError(f"dtype {dtype} is not supported (bfloat16, float16, float32)")
        return dtype
    if dtype in (None, "auto"):
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported (bfloat16, float16, float32 or auto)")
    return _DTYPES[name]


def _plan(checkpoint: _Checkpoint, target_shapes: dict[str, tuple], tied: dict[str, str]):
    """Map every released tensor, check shapes, and fail once listing every problem."""
    mapping: dict[str, str | None] = {}
    unknown, mismatched, duplicates = [], [], []
    filled: dict[str, str] = {}
    for key in checkpoint.keys():
        target = map_released_key(key)
        if target is None or target not in target_shapes:
            unknown.append(f"{key} {list(checkpoint.shape(key))}" + (f" (would be {target})" if target else ""))
            continue
        shape = checkpoint.shape(key)
        want = target_shapes[target]
        if key == MEMORY_TOKENS_SOURCE:
            ok = len(shape) == 3 and shape[0] == 1 and tuple(shape[1:]) == tuple(want)
            expect = [1, *want]
        else:
            ok = tuple(shape) == tuple(want)
            expect = list(want)
        if not ok:
            mismatched.append(f"{key} {list(shape)} -> {target} expects {expect}")
        if target in filled:
            duplicates.append(f"{key} and {filled[target]} both map to {target}")
        filled[target] = key
        mapping[key] = target
    missing = [t for t in target_shapes if t not in filled and t not in tied and t != RELEVANCE_TARGET]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) of the released checkpoint have no place in the converted model:\n    "
            + "\n    ".join(unknown)
        )
    if missing:
        problems.append(
            f"{len(missing)} parameter(s) of the converted model are not in the released checkpoint:\n    "
            + "\n    ".join(f"{t} {list(target_shapes[t])}" for t in missing)
            + f"\n  ({', '.join(tied) or 'no'} tied weight(s) excepted; {RELEVANCE_TARGET} comes from the base model)"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n    " + "\n    ".join(mismatched))
    if duplicates:
        problems.append("duplicate targets:\n    " + "\n    ".join(duplicates))
    if problems:
        raise ConversionError(f"released checkpoint {checkpoint.folder}: " + "\n".join(problems))
    return mapping


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {output_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


def _normal_permissions(folder: Path) -> None:
    """`mkdtemp` makes a private (0700) folder and some writers make 0600 files: give the output the
    permissions of a folder created normally (umask applied)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    """Rename the finished temporary folder to the output; an existing output is replaced only after the
    rename of the new one is possible, and restored if it fails."""
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        os.replace(tmp, output_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.rmdir(old)
    os.replace(output_dir, old)
    try:
        os.replace(tmp, output_dir)
    except BaseException:
        os.replace(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers(progress_bars: bool = True):
    """Silence transformers' log lines and FutureWarnings (e.g. about the released 4.x config reaching
    AutoTokenizer) and, unless `progress_bars`, its progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def convert_tempo_checkpoint(
    tempo_path: str | os.PathLike,
    qwen3vl_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    push_to_hub: str | None = None,
    private: bool | None = None,
    released_float16_rounding: bool = False,
    model_card: str | os.PathLike | None = None,
    progress: Progress = print,
) -> ConversionReport:
    """Convert a released Tempo checkpoint folder into a transformers folder.

    Args:
        tempo_path: the released checkpoint (``config.json``, safetensors weights, decoder tokenizer).
        qwen3vl_path: the base Qwen3-VL-2B-Instruct folder (config, tokenizer, safetensors); its config becomes
            the compressor config and its LM head gives the relevance vector.
        output_dir: where the converted folder goes (created; must be empty unless ``overwrite``).
        dtype: dtype of the stored weights ("bfloat16" as the released scripts run, "float16", "float32", or
            "auto" = the checkpoint's own). The relevance vector is stored in float32 but its two rows are
            subtracted in this dtype, as the released code does for a model run in it (recorded as
            ``config.relevance_vector_dtype`` and in the report).
        max_shard_size: shard size for ``save_pretrained``.
        allow_pickle: accept ``.bin``/``.pt`` weights (read with ``torch.load(weights_only=True)``); refused by
            default because unpickling can run arbitrary code.
        push_to_hub: a repository id to upload the finished folder to.
        released_float16_rounding: round every weight through float16 before casting to ``dtype``, as the
            released scripts do (they load in float16, then cast to bfloat16).
        private: with ``push_to_hub``, create the repository as private.
        model_card: the README.md to write (default ``model_cards/tempo-6b.md`` of this repository).
        progress: called with one line per step (``None``: quiet).

    Returns a `ConversionReport` (key mapping, tied weights, relevance provenance, notes, time per step).
    Raises `ConversionError` naming the input and the problem; every unknown, missing or misshapen tensor
    is listed at once, before anything is written.

    Memory: the model is built on the meta device and receives the checkpoint's tensors themselves
    (safetensors are memory-mapped; a cast happens only when ``dtype`` differs from the stored one), so
    about one copy of the weights is resident: ~12 GB for Tempo-6B in bfloat16.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from .modeling_tempo import TempoForConditionalGeneration
    from .token_allocation import ATA_OPTION_NAMES

    started = time.perf_counter()
    steps: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps[name] = steps.get(name, 0.0) + now - mark
        mark = now

    tempo_path, qwen3vl_path = Path(tempo_path), Path(qwen3vl_path)
    output_dir = Path(output_dir).absolute()
    for path, what in ((tempo_path, "tempo_path"), (qwen3vl_path, "qwen3vl_path")):
        if not path.is_dir():
            raise ConversionError(f"{what} {path} is not a folder")
    _prepare_output(output_dir, overwrite)
    target_dtype = _resolve_dtype(dtype)
    notices: list[str] = []

    # 1. configs and tokenizers
    _say(progress, f"[1/6] reading configs and tokenizers ({tempo_path}, {qwen3vl_path})")
    released = _read_json(tempo_path / "config.json", "released config")
    base_config = _read_json(qwen3vl_path / "config.json", "base Qwen3-VL config")
    tokenizers = []
    for path, what in ((tempo_path, "decoder tokenizer"), (qwen3vl_path, "base Qwen3-VL tokenizer")):
        try:
            with _quiet_transformers():
                tokenizers.append(AutoTokenizer.from_pretrained(path))
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"{what} in {path} cannot be loaded: {err}") from err
    tokenizer, base_tokenizer = tokenizers
    with _quiet_transformers():
        config, config_notes = build_tempo_config(released, base_config, tokenizer, base_tokenizer)
    lap("config")

    # 2. plan: every released tensor has a place, every parameter a source, shapes agree
    _say(progress, "[2/6] mapping tensor names and checking shapes")
    checkpoint = _Checkpoint(tempo_path, allow_pickle=allow_pickle, what="released checkpoint")
    try:
        if checkpoint.format == "pickle":
            notices.append("weights were read from pickle files (allow_pickle=True)")
        with torch.device("meta"):
            model = TempoForConditionalGeneration(config)
        target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = {t: s for t, s in model.all_tied_weights_keys.items()} if config.tie_word_embeddings else {}
        mapping = _plan(checkpoint, target_shapes, tied)
        if target_dtype is None:
            target_dtype = checkpoint.dtype(map_key_back(mapping, EMBEDDINGS_TARGET))
            if target_dtype not in _DTYPES.values():
                target_dtype = torch.float32
        dtype_name = _dtype_name(target_dtype)
        lap("plan")

        # 3. tensors, one at a time (one copy in memory)
        _say(progress, f"[3/6] reading {len(mapping)} tensors ({checkpoint.format}) and casting to {dtype_name}")
        state: dict[str, torch.Tensor] = {}
        released_lm_head = None
        for source, target in mapping.items():
            tensor = checkpoint.get(source)
            if source == MEMORY_TOKENS_SOURCE:
                tensor = tensor[0]
            if released_float16_rounding and tensor.is_floating_point():
                tensor = tensor.to(torch.float16)
            tensor = tensor.to(target_dtype).contiguous()
            if target in tied:
                released_lm_head = tensor
                continue
            state[target] = tensor
        tied_notes = {}
        for target, source in tied.items():
            source_key = map_key_back(mapping, source)
            tied_notes[target] = source
            if released_lm_head is not None:
                mapping[map_key_back(mapping, target)] = None
                if not torch.equal(released_lm_head, state[source]):
                    notices.append(
                        f"the checkpoint's {LM_HEAD} differs from {source_key}; the decoder ties them (tie_word_embeddings), "
                        f"so the converted model uses the embeddings, as the released model does when loaded"
                    )
        released_lm_head = None
        lap("map and cast")

        # 4. relevance vector from the base model
        _say(progress, f"[4/6] relevance vector from the base Qwen3-VL LM head ({qwen3vl_path})")
        vector, relevance = relevance_vector(qwen3vl_path, tokenizer=base_tokenizer, subtract_dtype=target_dtype)
        if tuple(vector.shape) != target_shapes[RELEVANCE_TARGET]:
            raise ConversionError(
                f"base Qwen3-VL: the relevance vector has shape {list(vector.shape)}, the model expects "
                f"{list(target_shapes[RELEVANCE_TARGET])}"
            )
        state[RELEVANCE_TARGET] = vector
        notices.extend(relevance.pop("notes"))
        lap("relevance")
    finally:
        checkpoint.close()

    result = model.load_state_dict(state, strict=False, assign=True)
    left = sorted(set(result.missing_keys) - set(tied))
    if left or result.unexpected_keys:  # _plan makes this unreachable; keep the guard
        raise ConversionError(f"internal: missing {left}, unexpected {result.unexpected_keys}")
    num_parameters = sum(t.numel() for t in state.values())
    del state
    model.tie_weights()
    config.dtype = dtype_name
    config.relevance_vector_dtype = relevance["subtract_dtype"]
    model.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
    im_end = _token_id(tokenizer, "<|im_end|>", "decoder tokenizer")
    generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=1024,
        eos_token_id=im_end,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else im_end,
        bos_token_id=config.text_config.bos_token_id,
    )
    for name in ATA_OPTION_NAMES:
        setattr(generation_config, name, getattr(config, name))
    generation_config._from_model_config = False
    model.generation_config = generation_config

    # 5. write everything into a temporary folder beside the output, then rename it into place
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        _say(progress, f"[5/6] writing weights (shards of at most {max_shard_size}), config, processor, code, card")
        with _quiet_transformers(progress_bars=progress is not None):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        del model
        lap("write weights")
        config_notes.extend(write_processor_files(tmp, tokenizer, qwen3vl_path))
        code = write_remote_code(tmp)
        config_notes.append(f"remote code copied: {', '.join(code)}")
        note = write_model_card(tmp, model_card, push_to_hub)
        if note:
            notices.append(note)
        lap("write processor/code/card")
        _normal_permissions(tmp)
        _prepare_output(output_dir, overwrite)  # re-check: something may have appeared meanwhile
        _move_into_place(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in output_dir.iterdir())

    pushed = None
    if push_to_hub:
        _say(progress, f"[6/6] uploading {output_dir} to {push_to_hub}")
        push_folder_to_hub(output_dir, push_to_hub, private=private)
        pushed = push_to_hub
        lap("upload")
    else:
        _say(progress, "[6/6] done (no upload requested)")

    return ConversionReport(
        output_dir=str(output_dir),
        dtype=dtype_name,
        key_mapping=mapping,
        tied_weights=tied_notes,
        relevance=relevance,
        config_notes=config_notes,
        warnings=notices,
        num_tensors=len(mapping),
        num_parameters=num_parameters,
        files=files,
        step_seconds=steps,
        seconds=time.perf_counter() - started,
        pushed_to=pushed,
    )


def map_key_back(mapping: dict[str, str | None], target: str) -> str:
    """The released name that maps to `target` (for messages); the target itself if none does."""
    for source, dst in mapping.items():
        if dst == target:
            return source
    return target


# ----------------------------------------------------------------------------------------------- CLI
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The conversion options, shared by `conversion/convert_tempo_to_hf.py` and `tempo convert`."""
    parser.add_argument("--tempo_path", "--tempo-path", required=True, help="released Tempo-6B folder (config, weights, tokenizer)")
    parser.add_argument("--qwen3vl_path", "--qwen3vl-path", required=True, help="base Qwen3-VL-2B-Instruct folder")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB")
    parser.add_argument("--push_to_hub", "--push-to-hub", default=None, metavar="REPO_ID", help="upload the result to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                        help="accept .bin/.pt weights (pickle can execute code: only for files you trust)")
    parser.add_argument("--released-float16-rounding", dest="released_float16_rounding", action="store_true",
                        help="round weights through float16 first, as the released scripts load them")
    parser.add_argument("--model_card", "--model-card", default=None, help="README.md to write (default: model_cards/tempo-6b.md)")
    parser.add_argument("--mapping", action="store_true", help="also print every tensor's released -> converted name")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; prints the mapping summary. Returns a process exit code."""
    try:
        report = convert_tempo_checkpoint(
            args.tempo_path,
            args.qwen3vl_path,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            push_to_hub=args.push_to_hub,
            private=True if getattr(args, "private", False) else None,
            released_float16_rounding=getattr(args, "released_float16_rounding", False),
            model_card=getattr(args, "model_card", None),
            progress=lambda line: print(line, flush=True),
        )
    except ConversionError as err:
        print(f"conversion failed: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    if getattr(args, "mapping", False):
        for source, target in report.key_mapping.items():
            print(f"{source} -> {target if target is not None else '(tied, not stored)'}")
    return 0
