"""Fine-tuning Tempo with transformers' `Trainer` (and PEFT).

A few small helpers; everything else is the stock Trainer / PEFT machinery::

    from transformers import Trainer
    from transformers_tempo.training import TempoDataCollator, set_trainable, tempo_training_arguments

    set_trainable(model, "projector+memory+decoder")           # vision tower + compressor stay frozen
    args = tempo_training_arguments("out", num_train_epochs=1, learning_rate=1e-5, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=TempoDataCollator(processor))
    trainer.train()

* `TempoDataCollator` turns examples ``{"video": ..., "question": ..., "answer": ...}`` (or
  ``{"video": ..., "messages": [...]}``) into model batches; videos are decoded in the collator, so
  `dataloader_num_workers` decodes them in parallel.
* `set_trainable` chooses which parts train (named presets or part names).
* `tempo_training_arguments` is `TrainingArguments` with ``remove_unused_columns=False``. With
  the default ``True`` the Trainer strips every example key that is not an argument of
  `forward` (``video``, ``question``, ``answer``, ``messages``) before the collator sees it; pass
  ``remove_unused_columns=False`` yourself if you build `TrainingArguments` directly.

For LoRA, wrap the model with `peft.get_peft_model` (it freezes the base model itself) and pick the
layers with `lora_target_modules`, a regular expression that names only the language models'
projections, not the vision tower's ``qkv``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from .token_allocation import ATA_OPTION_NAMES
from .video_loading import load_video

__all__ = [
    "PARTS",
    "TRAINING_PRESETS",
    "TempoDataCollator",
    "lora_target_modules",
    "set_trainable",
    "tempo_training_arguments",
]

# Parameter-name prefixes of each part of `TempoForConditionalGeneration`.
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("model.compressor.visual.",),  # Qwen3-VL vision tower (with its merger)
    "compressor": ("model.compressor.language_model.",),  # the compressor's text model (with its embeddings)
    "memory_tokens": ("model.memory_tokens",),
    "relevance_head": ("model.relevance_head.",),  # gets no gradient from the LM loss (scores only drive ATA)
    "projector": ("model.projector.",),
    "decoder": ("model.language_model.", "lm_head."),  # Qwen3 decoder; lm_head is tied to its embeddings
}

TRAINING_PRESETS: dict[str, tuple[str, ...]] = {
    "projector": ("projector",),
    "projector+memory": ("projector", "memory_tokens"),
    "projector+memory+decoder": ("projector", "memory_tokens", "decoder"),
    "decoder": ("decoder",),
    "compressor+decoder": ("compressor", "memory_tokens", "projector", "decoder"),
    "all": ("vision", "compressor", "memory_tokens", "projector", "decoder"),
    "lora": (),  # base model frozen: the LoRA adapters added by peft.get_peft_model are what trains
}


def set_trainable(model, train: str | Iterable[str] = "projector+memory+decoder", freeze: Iterable[str] = ()) -> int:
    """Set `requires_grad` on the parts of a `TempoForConditionalGeneration`; return the trainable count.

    Args:
        model: the Tempo model, not a PEFT wrapper (PEFT freezes the base model itself; train more
            with ``LoraConfig(modules_to_save=["projector"])``, which also saves it with the adapter).
        train: a preset name from `TRAINING_PRESETS` ("projector", "projector+memory",
            "projector+memory+decoder", "decoder", "compressor+decoder", "all", "lora") or an
            iterable of part names from `PARTS` ("vision", "compressor", "memory_tokens",
            "relevance_head", "projector", "decoder"). These parts train; every other parameter is frozen.
        freeze: part names frozen even if `train` names them (e.g. ``train="all", freeze=["vision"]``).

    Returns:
        The number of trainable parameters (tied weights counted once).
    """
    if hasattr(model, "peft_config"):
        raise TypeError(
            "set_trainable takes the Tempo model itself; with PEFT, train extra parts through "
            "LoraConfig(modules_to_save=[...]) (e.g. ['projector']) so that they are saved with the adapter"
        )
    parts = TRAINING_PRESETS[train] if isinstance(train, str) and train in TRAINING_PRESETS else train
    if isinstance(parts, str):
        raise ValueError(f"unknown training preset {parts!r}; presets: {', '.join(TRAINING_PRESETS)}")
    parts, freeze = set(parts), set(freeze)
    unknown = (parts | freeze) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    prefixes = tuple(prefix for part in parts - freeze for prefix in PARTS[part])
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_target_modules(
    parts: Sequence[str] = ("decoder",), projections: Sequence[str] = ("q_proj", "v_proj")
) -> str:
    """A PEFT `target_modules` regex for LoRA on the language models' linear layers.

    `parts`: "decoder" (the Qwen3 decoder) and/or "compressor" (the compressor's text model).
    `projections`: any of q_proj, k_proj, v_proj, o_proj (attention), gate_proj, up_proj, down_proj (MLP).
    The vision tower (``attn.qkv``, ``attn.proj``, ``mlp.linear_fc*``) and the projector never match.
    """
    paths = {"decoder": r"model\.language_model", "compressor": r"model\.compressor\.language_model"}
    unknown = set(parts) - set(paths)
    if unknown:
        raise ValueError(f"unknown LoRA part(s) {sorted(unknown)}; choose from {sorted(paths)}")
    bad = [p for p in projections if not re.fullmatch(r"(q|k|v|o|gate|up|down)_proj", p)]
    if bad:
        raise ValueError(f"unknown projection(s) {bad}")
    where = "|".join(paths[p] for p in parts)
    return rf"({where})\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(projections)})"


def tempo_training_arguments(output_dir: str, **kwargs):
    """`TrainingArguments` for Tempo: ``remove_unused_columns=False`` and ``label_names=["labels"]``.

    The Trainer's column filter would strip the raw example keys (``video``, ``question``, ...)
    before `TempoDataCollator` sees them; the explicit label name keeps evaluation losses working
    through a PEFT wrapper, whose ``forward(*args, **kwargs)`` hides the `labels` argument. Any
    keyword argument of `TrainingArguments` may be given and wins. (Mixed precision on a machine
    without an accelerator also needs ``use_cpu=True``: the Trainer refuses ``bf16=True`` otherwise.)
    """
    from transformers import TrainingArguments

    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("label_names", ["labels"])
    return TrainingArguments(output_dir=output_dir, **kwargs)


class TempoDataCollator:
    """Examples -> a Tempo training batch (decoder prompt, compressor rows, pixels, `labels`).

    Each example is a dict, in one of two forms:

    * ``{"video": v, "question": "...", "answer": "..."}``;
    * ``{"video": v, "messages": [...]}`` with transformers-style chat messages, e.g.
      ``[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "..."}]},
      {"role": "assistant", "content": "..."}]``. The example's video fills the (first) video
      item of the messages, or is put first in the first user turn if there is none; a video
      item may also carry the video itself (``{"type": "video", "video": "clip.mp4"}``).

    `v` is a path, bytes, a file object or frames (a (T, H, W, 3) uint8 array or a list of
    frames); for frames, ``"video_metadata": {"fps": ...}`` gives their frame rate (default
    2 fps). ``"image"`` instead of ``"video"`` and examples without either work too.

    Videos are decoded here, in `__call__`, so that with ``dataloader_num_workers > 0`` the
    DataLoader workers decode them in parallel; the collator is picklable. Labels are the
    processor's: only assistant turns are supervised (each answer, its ``<|im_end|>`` and the
    newline after it by default).

    Args:
        processor: a `TempoProcessor`.
        padding_side: decoder padding, "right" for training (the usual choice).
        video_kwargs: options for `load_video` (``fps``, ``min_frames``, ``max_frames``,
            ``max_longer_edge``, ``num_threads``). Defaults: the video processor's sampling and
            ``max_longer_edge`` = its ``longest_edge`` (same pixels, less memory).
        **processor_kwargs: passed to `processor.apply_chat_template`, e.g. ``label_scope="reference"``
            (the released training code's labels). Allocation options (``use_ata=False``, so that
            `Trainer.evaluate`, in eval mode where ATA is on by default, sees every memory feature as
            training does) are model options: they go into each batch, for `forward()`.
    """

    def __init__(self, processor, padding_side: str = "right", video_kwargs: dict | None = None, **processor_kwargs):
        self.processor = processor
        self.padding_side = padding_side
        self.model_options = {k: processor_kwargs.pop(k) for k in ATA_OPTION_NAMES if k in processor_kwargs}
        self.processor_kwargs = processor_kwargs
        vp = processor.video_processor
        self.video_kwargs = {
            "fps": vp.fps,
            "min_frames": vp.min_frames,
            "max_frames": vp.max_frames,
            "max_longer_edge": vp.longest_edge,
            "resize_backend": vp.resize_backend,  # the processor's kernel: the exact mode stays exact
            **(video_kwargs or {}),
        }

    def __call__(self, examples: list[dict[str, Any]]):
        conversations = [self._conversation(example, i) for i, example in enumerate(examples)]
        batch = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=False,
            return_labels=True,
            padding_side=self.padding_side,
            return_tensors="pt",
            **self.processor_kwargs,
        )
        batch.update(self.model_options)
        return batch

    def _conversation(self, example: dict[str, Any], index: int) -> list[dict]:
        if "messages" in example:
            messages = [_copy_message(m) for m in example["messages"]]
        elif "question" in example and "answer" in example:
            messages = [
                {"role": "user", "content": [{"type": "text", "text": example["question"]}]},
                {"role": "assistant", "content": example["answer"]},
            ]
        else:
            raise ValueError(
                f"example {index}: needs 'question' and 'answer', or 'messages'; got keys {sorted(example)} "
                "(with the Trainer, set remove_unused_columns=False or use tempo_training_arguments: "
                "otherwise it strips these keys before the collator sees them)"
            )
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"example {index}: the conversation must end with an assistant turn (the target)")

        items = [i for m in messages if isinstance(m.get("content"), list) for i in m["content"] if _visual_kind(i)]
        kind = next((k for k in ("video", "image") if example.get(k) is not None), None)
        if not items and kind is not None:  # the example's video goes first in the first user turn
            user = next((m for m in messages if m.get("role") == "user"), None)
            if user is None:
                raise ValueError(f"example {index}: has a {kind} but no user turn")
            if not isinstance(user.get("content"), list):
                user["content"] = [{"type": "text", "text": user.get("content") or ""}]
            items = [{"type": kind}]
            user["content"].insert(0, items[0])
        for item in items:  # (the processor refuses more than one)
            kind = _visual_kind(item)
            payload = item.get(kind) if item.get(kind) is not None else item.get("path", example.get(kind))
            if payload is None:
                raise ValueError(f"example {index}: its messages hold a {kind} item but no {kind} was given")
            if kind == "video":
                metadata = item.get("video_metadata", example.get("video_metadata"))
                try:
                    payload = load_video(payload, video_metadata=metadata, **self.video_kwargs)
                except ValueError as error:
                    raise ValueError(f"example {index}: {error}") from error
            item.update({"type": kind, kind: payload})
        return messages


def _copy_message(message: dict) -> dict:
    """A copy that can be edited without touching the dataset (content items copied, payloads not)."""
    content = message.get("content")
    if isinstance(content, list):
        content = [dict(item) for item in content]
    return {**message, "content": content}


def _visual_kind(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    if item.get("type") in ("video", "image"):
        return item["type"]
    return next((k for k in ("video", "image") if k in item), None)
