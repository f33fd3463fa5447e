"""Everything that must be set to reproduce the released Tempo-6B outputs (the published benchmark numbers).

The package's defaults already follow the released model wherever that costs nothing; the settings
below are the ones where the default is a faster or more standard choice that computes a slightly
different function, plus the released values of the per-call options, gathered in one place:

- precision: bfloat16 weights rounded through float16 (the released scripts load the checkpoint in
  float16, then cast the whole model to bfloat16), rotary inverse frequencies rounded the same way,
  eager kernels (no `enable_compiled_inference`);
- preprocessing: PIL bicubic for the two per-frame resizes (`resize_backend="pil"`), 2 fps, 8 to
  1024 frames;
- allocation: ATA on, budget 8192 (or 4096, the other released budget), at least 4 tokens per segment,
  head truncation;
- decoding: greedy, decoder context of 32768 tokens (the released evaluation's; its interactive script
  used 16384).

`reference_settings()` returns them as a dict; `apply_reference_precision(model)` applies the model part.
"""

from __future__ import annotations

import copy
from types import MappingProxyType

import torch


__all__ = ["REFERENCE_SETTINGS", "RELEASED_BUDGETS", "apply_reference_precision", "reference_settings"]

# The two budgets the released model was evaluated at (same weights; an inference-time setting).
RELEASED_BUDGETS = (4096, 8192)

_SETTINGS = {
    # `convert_tempo_checkpoint` / `tempo convert` options that store the released weights exactly.
    "conversion": {"dtype": "bfloat16", "released_float16_rounding": True},
    # How to load and prepare the model: `from_pretrained(..., dtype=torch.bfloat16)`, then
    # `apply_reference_precision(model)` (float16 weight rounding + rotary rounding); no compilation.
    "model": {
        "dtype": "bfloat16",
        "float16_weight_rounding": True,
        "released_rotary_rounding": True,
        "compiled_inference": False,
    },
    # TempoVideoProcessor / processor-call options.
    "processor": {"resize_backend": "pil", "fps": 2.0, "min_frames": 8, "max_frames": 1024},
    # Adaptive Token Allocation (generate / pipeline call options).
    "allocation": {"visual_token_budget": 8192, "min_tokens_per_segment": 4, "use_ata": True, "token_selection": "head"},
    # Decoding (generate options); the answer stops at <|im_end|>, the converted generation config's eos.
    "generation": {"do_sample": False, "num_beams": 1},
    # TempoConfig.max_context_length used by the released evaluation.
    "max_context_length": 32768,
}


def _read_only(value):
    if isinstance(value, dict):
        return MappingProxyType({key: _read_only(item) for key, item in value.items()})
    return value


REFERENCE_SETTINGS = _read_only(_SETTINGS)
"""The reference settings at the 8192-token budget, read-only (`reference_settings()` gives a copy)."""


def reference_settings(budget: int = 8192) -> dict:
    """A fresh copy of the settings that reproduce the released outputs, at `budget` visual tokens.

    Args:
        budget: the ATA budget; the published numbers are at 4096 and 8192 (`RELEASED_BUDGETS`), any
            other positive budget gives the released function at that budget.

    Returns:
        dict with the groups "conversion", "model", "processor", "allocation", "generation" and the
        key "max_context_length" (see the module docstring for what each entry means).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"`budget` must be a positive number of visual tokens, got {budget!r}")
    settings = copy.deepcopy(_SETTINGS)
    settings["allocation"]["visual_token_budget"] = budget
    return settings


def apply_reference_precision(model):
    """Give a bfloat16 Tempo model the released scripts' rounding, in place, and return it.

    The released scripts load the (bfloat16) checkpoint in float16 and then cast the model to bfloat16,
    so every weight passes through float16 (tiny values flush to zero or lose bits, values beyond
    65504 become inf) and so do the rotary inverse frequencies. This rounds every floating parameter
    the same way (a no-op on weights converted with ``released_float16_rounding=True``: the rounding
    is idempotent) except the float32 relevance vector, and calls
    `TempoForConditionalGeneration.apply_released_rotary_rounding`.
    """
    dtype = getattr(model, "dtype", None)
    if dtype != torch.bfloat16:
        raise ValueError(f"the reference precision is bfloat16: load the model with dtype=torch.bfloat16 (got {dtype})")
    relevance = getattr(getattr(model, "model", None), "relevance_head", None)
    skip = {id(p) for p in relevance.parameters()} if relevance is not None else set()
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in skip or not param.is_floating_point() or param.device.type == "meta":
                continue
            param.copy_(param.to(torch.float16).to(param.dtype))
    return model.apply_released_rotary_rounding()
