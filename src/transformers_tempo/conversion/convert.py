"""`convert_tempo_checkpoint`: the conversion, step by step (configs, tensor plan, tensors, relevance
vector, model, folder, upload)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import atomic_directory
from .checkpoint import DTYPES, CheckpointReader, dtype_name, read_json, resolve_dtype, token_id
from .config import build_tempo_config
from .errors import ConversionError
from .export import REMOTE_CODE_AUTO_MAP, push_folder_to_hub, write_folder_extras
from .key_mapping import (
    EMBEDDINGS_TARGET,
    LM_HEAD,
    MEMORY_TOKENS_SOURCE,
    RELEVANCE_TARGET,
    map_key_back,
    plan_tensor_mapping,
)
from .relevance import relevance_vector
from .report import ConversionReport

Progress = Callable[[str], Any] | None


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
    clock = _StepClock()
    tempo_path, qwen3vl_path = Path(tempo_path), Path(qwen3vl_path)
    output_dir = Path(output_dir).absolute()
    for path, what in ((tempo_path, "tempo_path"), (qwen3vl_path, "qwen3vl_path")):
        if not path.is_dir():
            raise ConversionError(f"{what} {path} is not a folder")
    _check_output(output_dir, overwrite)
    target_dtype = resolve_dtype(dtype)

    _say(progress, f"[1/6] reading configs and tokenizers ({tempo_path}, {qwen3vl_path})")
    inputs = _read_inputs(tempo_path, qwen3vl_path)
    clock.lap("config")
    weights = _convert_weights(
        inputs, tempo_path=tempo_path, qwen3vl_path=qwen3vl_path, target_dtype=target_dtype,
        allow_pickle=allow_pickle, released_float16_rounding=released_float16_rounding, progress=progress, clock=clock,
    )
    model, num_parameters = _build_model(inputs, weights)
    notices = list(weights.notices)

    _say(progress, f"[5/6] writing weights (shards of at most {max_shard_size}), config, processor, code, card")
    _write_output_folder(
        model, inputs, output_dir=output_dir, overwrite=overwrite, max_shard_size=max_shard_size, qwen3vl_path=qwen3vl_path,
        model_card=model_card, repo_id=push_to_hub, notices=notices, progress=progress, clock=clock,
    )
    del model  # ~12 GB for Tempo-6B: not kept during the upload
    files = sorted(p.name for p in output_dir.iterdir())

    if push_to_hub:
        _say(progress, f"[6/6] uploading {output_dir} to {push_to_hub}")
        push_folder_to_hub(output_dir, push_to_hub, private=private)
        clock.lap("upload")
    else:
        _say(progress, "[6/6] done (no upload requested)")

    return ConversionReport(
        output_dir=str(output_dir),
        dtype=weights.dtype_name,
        key_mapping=weights.mapping,
        tied_weights=weights.tied_notes,
        relevance=weights.relevance,
        config_notes=inputs.config_notes,
        warnings=notices,
        num_tensors=len(weights.mapping),
        num_parameters=num_parameters,
        files=files,
        step_seconds=clock.steps,
        seconds=clock.total(),
        pushed_to=push_to_hub or None,
    )


# ----------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class _Inputs:
    """What the configs and tokenizers give: the TempoConfig and the notes about it."""

    tokenizer: Any
    base_tokenizer: Any
    config: Any
    config_notes: list[str]


@dataclasses.dataclass
class _Weights:
    """The converted state dict (on a meta-device model) and what the report says about it."""

    model: Any
    state: dict[str, torch.Tensor]
    mapping: dict[str, str | None]
    tied: dict[str, str]
    tied_notes: dict[str, str]
    relevance: dict[str, Any]
    notices: list[str]
    dtype_name: str


class _StepClock:
    """Seconds per named step (a step may be timed in several laps) and in all."""

    def __init__(self):
        self.started = self.mark = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + now - self.mark
        self.mark = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def _read_inputs(tempo_path: Path, qwen3vl_path: Path) -> _Inputs:
    """Both configs and both tokenizers, and the TempoConfig built from them."""
    from transformers import AutoTokenizer

    released = read_json(tempo_path / "config.json", "released config")
    base_config = read_json(qwen3vl_path / "config.json", "base Qwen3-VL config")
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
    return _Inputs(tokenizer, base_tokenizer, config, config_notes)


def _convert_weights(inputs: _Inputs, *, tempo_path, qwen3vl_path, target_dtype, allow_pickle,
                     released_float16_rounding, progress, clock) -> _Weights:
    """Steps 2-4: plan the mapping on a meta-device model, read and cast the tensors, add the relevance
    vector. The checkpoint is open only during these steps."""
    from ..modeling_tempo import TempoForConditionalGeneration

    _say(progress, "[2/6] mapping tensor names and checking shapes")
    checkpoint = CheckpointReader(tempo_path, allow_pickle=allow_pickle, what="released checkpoint")
    try:
        notices = ["weights were read from pickle files (allow_pickle=True)"] if checkpoint.format == "pickle" else []
        with torch.device("meta"):
            model = TempoForConditionalGeneration(inputs.config)
        target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = dict(model.all_tied_weights_keys) if inputs.config.tie_word_embeddings else {}
        mapping = plan_tensor_mapping(checkpoint, target_shapes, tied)
        if target_dtype is None:  # "auto": the checkpoint's own, if it is one we store
            target_dtype = checkpoint.dtype(map_key_back(mapping, EMBEDDINGS_TARGET))
            if target_dtype not in DTYPES.values():
                target_dtype = torch.float32
        clock.lap("plan")

        _say(progress, f"[3/6] reading {len(mapping)} tensors ({checkpoint.format}) and casting to {dtype_name(target_dtype)}")
        state, released_lm_head = _read_tensors(
            checkpoint, mapping, tied=tied, target_dtype=target_dtype, released_float16_rounding=released_float16_rounding
        )
        tied_notes = _compare_tied_weights(mapping, state, tied=tied, released_lm_head=released_lm_head, notices=notices)
        del released_lm_head
        clock.lap("map and cast")

        _say(progress, f"[4/6] relevance vector from the base Qwen3-VL LM head ({qwen3vl_path})")
        relevance = _add_relevance_vector(state, qwen3vl_path, inputs.base_tokenizer, target_dtype=target_dtype,
                                          expected_shape=target_shapes[RELEVANCE_TARGET])
        notices.extend(relevance.pop("notes"))
        clock.lap("relevance")
    finally:
        checkpoint.close()
    return _Weights(model, state, mapping, tied, tied_notes, relevance, notices, dtype_name(target_dtype))


def _read_tensors(checkpoint: CheckpointReader, mapping: dict[str, str | None], *, tied: dict[str, str],
                  target_dtype: torch.dtype, released_float16_rounding: bool):
    """The converted state dict, one tensor at a time (one copy in memory), and the checkpoint's own copy
    of a tied LM head (not stored; None when the checkpoint has none)."""
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
    return state, released_lm_head


def _compare_tied_weights(mapping: dict[str, str | None], state: dict[str, torch.Tensor], *, tied: dict[str, str],
                          released_lm_head: torch.Tensor | None, notices: list[str]) -> dict[str, str]:
    """Drop the checkpoint's copy of a tied weight from the mapping (a notice if it differs from what it
    is tied to); returns tied parameter -> the parameter it is tied to."""
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
    return tied_notes


def _add_relevance_vector(state: dict[str, torch.Tensor], qwen3vl_path: Path, base_tokenizer, *,
                          target_dtype: torch.dtype, expected_shape: tuple) -> dict[str, Any]:
    """Put the base model's relevance vector into `state`; returns how it was made."""
    vector, relevance = relevance_vector(qwen3vl_path, tokenizer=base_tokenizer, subtract_dtype=target_dtype)
    if tuple(vector.shape) != expected_shape:
        raise ConversionError(
            f"base Qwen3-VL: the relevance vector has shape {list(vector.shape)}, the model expects "
            f"{list(expected_shape)}"
        )
    state[RELEVANCE_TARGET] = vector
    return relevance


def _build_model(inputs: _Inputs, weights: _Weights):
    """The converted model: the state dict assigned to the meta-device model, tied weights tied, and the
    config and generation config it is saved with. Returns (model, number of stored parameters)."""
    model, config = weights.model, inputs.config
    result = model.load_state_dict(weights.state, strict=False, assign=True)
    left = sorted(set(result.missing_keys) - set(weights.tied))
    if left or result.unexpected_keys:  # plan_tensor_mapping makes this unreachable; keep the guard
        raise ConversionError(f"internal: missing {left}, unexpected {result.unexpected_keys}")
    num_parameters = sum(t.numel() for t in weights.state.values())
    weights.state = {}  # the model holds the tensors now
    weights.model = None
    model.tie_weights()
    config.dtype = weights.dtype_name
    config.relevance_vector_dtype = weights.relevance["subtract_dtype"]
    model.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
    model.generation_config = _generation_config(config, inputs.tokenizer)
    return model, num_parameters


def _generation_config(config, tokenizer):
    """Greedy decoding that stops at <|im_end|>, with the config's ATA options as defaults."""
    from transformers import GenerationConfig

    from ..token_allocation import ATA_OPTION_NAMES

    im_end = token_id(tokenizer, "<|im_end|>", "decoder tokenizer")
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
    return generation_config


def _write_output_folder(model, inputs: _Inputs, *, output_dir: Path, overwrite: bool, max_shard_size, qwen3vl_path: Path,
                         model_card, repo_id: str | None, notices: list[str], progress: Progress, clock: _StepClock) -> None:
    """Weights, config, processor, code and card into a temporary folder beside `output_dir`, renamed
    into place only when all of it is written (see `atomic_directory`)."""
    with atomic_directory(output_dir, replace=overwrite) as tmp:
        with _quiet_transformers(progress_bars=progress is not None):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        clock.lap("write weights")
        notes, card_warnings = write_folder_extras(
            tmp, tokenizer=inputs.tokenizer, base_path=qwen3vl_path, model_card=model_card, repo_id=repo_id
        )
        inputs.config_notes.extend(notes)
        notices.extend(card_warnings)
        clock.lap("write processor/code/card")
        _check_output(output_dir, overwrite)  # re-check: something may have appeared meanwhile


# ----------------------------------------------------------------------------------------------- helpers
def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {output_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


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
