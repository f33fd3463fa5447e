"""`build_tempo_config`: the TempoConfig of a converted checkpoint, from the released and base configs."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .checkpoint import token_id
from .errors import ConversionError

# transformers 4.x Qwen3 config keys (the released config.json) that Qwen3Config still understands.
_QWEN3_LEGACY_KEYS = ("rope_theta",)
# Qwen3Config fields that describe a saved model rather than the decoder: not copied from the released config.
_NOT_DECODER_FIELDS = {
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
# Tokens the prompts use: the decoder and base tokenizers must give them the same ids.
_PROMPT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|video_pad|>", "<|image_pad|>", "Yes", "No")


def build_tempo_config(released: dict, base_config: dict, tokenizer, base_tokenizer=None):
    """TempoConfig from the released ``config.json`` (decoder fields at top level + Tempo fields), the base
    Qwen3-VL ``config.json`` (the compressor) and the decoder tokenizer. Returns (config, notes)."""
    from ..configuration_tempo import TempoConfig

    notes: list[str] = []
    _check_released_layout(released, notes)
    text_config = _decoder_config(released, notes)
    compressor = _compressor_config(base_config, released, base_tokenizer)
    settings = _tempo_settings(released, tokenizer, text_config, notes)
    _check_compressor_token_ids(compressor, tokenizer)
    if base_tokenizer is not None:
        _compare_tokenizers(tokenizer, base_tokenizer, notes)
    config = TempoConfig(compressor_config=compressor.to_dict(), text_config=text_config.to_dict(), **settings)
    return config, notes


def _check_released_layout(released: dict, notes: list[str]) -> None:
    """A `tempo_qwen` config with one Qwen3-VL compressor and no extra image tokens."""
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


def _decoder_config(released: dict, notes: list[str]):
    """Qwen3Config from the Qwen3 fields at the top level of the released config."""
    from transformers import Qwen3Config

    qwen3_fields = {f.name for f in dataclasses.fields(Qwen3Config)} - _NOT_DECODER_FIELDS
    text = {k: copy.deepcopy(v) for k, v in released.items() if k in qwen3_fields or k in _QWEN3_LEGACY_KEYS}
    if "torch_dtype" in released and "dtype" not in text:
        text["dtype"] = released["torch_dtype"]
    if released.get("rope_scaling"):
        notes.append(
            f"rope_scaling {released['rope_scaling']!r} ignored: the released model sets rope_scaling=None when built"
        )
    for required in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if required not in text:
            raise ConversionError(f"released config.json: the decoder field {required!r} is missing")
    return Qwen3Config(**{k: v for k, v in text.items() if k != "model_type"})


def _compressor_config(base_config: dict, released: dict, base_tokenizer):
    """The base Qwen3-VL config as it is (plus its tokenizer's pad id), checked against `mm_hidden_size`."""
    from transformers import Qwen3VLConfig

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
    return compressor


def _tempo_settings(released: dict, tokenizer, text_config, notes: list[str]) -> dict[str, Any]:
    """TempoConfig's own fields: memory tokens, projector, context length, placeholder token ids."""
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
    settings["video_token_id"] = token_id(tokenizer, "<|video_pad|>", "decoder tokenizer")
    settings["image_token_id"] = token_id(tokenizer, "<|image_pad|>", "decoder tokenizer")
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
    return settings


def _check_compressor_token_ids(compressor, tokenizer) -> None:
    """TempoProcessor tokenises the compressor prompts with the decoder tokenizer: the compressor's special
    token ids (from the base config) must be that tokenizer's ids."""
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


def _compare_tokenizers(tokenizer, base_tokenizer, notes: list[str]) -> None:
    """The prompt tokens must have the same ids in both tokenizers; other differences become notes."""
    vocab, base_vocab = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    differ = sorted(t for t in base_vocab.keys() & vocab.keys() if base_vocab[t] != vocab[t])
    bad = [t for t in _PROMPT_TOKENS if t in differ]
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
