"""Generation glue for Tempo: per-call ATA options, the static cache's length, the decoder's
attention while generating, and what `generate` refuses.

`TempoForConditionalGeneration.generate` splices the video into the prompt once and then lets
transformers' `GenerationMixin` decode with a stock Qwen3 decoder; these helpers are the pieces of
that glue that are not the model itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from .fast_paths import DECODE_ATTENTION

__all__ = [
    "STATIC_CACHE_BUCKET",
    "bucketed_static_cache_length",
    "decode_attention_while_generating",
    "reject_prompt_positions",
    "resolve_ata_options",
]


def reject_prompt_positions(position_ids) -> None:
    """Positions given for a prompt with visual placeholders cannot be honoured: each placeholder
    widens to its kept features, so the decoder sequence is longer than the prompt and its positions
    are only known after the splice (Tempo numbers them 0.. over the real tokens, as Qwen3 does)."""
    if position_ids is not None:
        raise ValueError(
            "position_ids cannot be given with visual inputs: the decoder sequence is longer than input_ids "
            "(each placeholder becomes its kept visual features), and Tempo computes its positions after the "
            "splice; leave position_ids out"
        )


@contextmanager
def decode_attention_while_generating(text_config):
    """While generating, a decoder configured for sdpa uses `fast_paths.decode_attention`: the same
    sdpa calls, except that compiled single-token steps read the grouped-query KV cache directly
    instead of through `repeat_kv` copies. The configuration is restored afterwards."""
    previous = text_config._attn_implementation
    if previous == "sdpa":
        text_config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        text_config._attn_implementation = previous


STATIC_CACHE_BUCKET = 1024


def bucketed_static_cache_length(
    generate_kwargs: dict, default_config: GenerationConfig, prompt_length: int, text_length: int = 0
) -> None:
    """With a static cache and no `max_cache_len` given, size the cache to what `generate` asks for
    (prompt + new tokens) rounded up to a multiple of `STATIC_CACHE_BUCKET`.

    `prompt_length` is the spliced sequence's, `text_length` that of the `input_ids` handed along
    with it: when the two differ, transformers asks for both together (it sizes the cache from the
    ids and adds the embeddings' length), so the bucket must cover that sum or it is ignored.

    Why: the compiled decoding step is specialised to the cache length. transformers reuses a cache
    that is long enough (it never shrinks it), so with buckets videos whose prompts differ by a few
    timestamps or question tokens share one compiled step instead of each growing the cache by a few
    slots and recompiling. At most budget / bucket recompilations in all; unused slots are masked.
    """
    config = generate_kwargs.get("generation_config") or default_config
    implementation = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation != "static" or generate_kwargs.get("max_cache_len") is not None:
        return
    if getattr(config, "max_cache_len", None) is not None:
        return
    new_tokens = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new_tokens is None:
        return
    needed = prompt_length + new_tokens + (text_length if text_length != prompt_length else 0)
    generate_kwargs["max_cache_len"] = -(-needed // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET


def resolve_ata_options(model, visual_token_budget, min_tokens_per_segment, use_ata, token_selection) -> dict:
    """Per-call ATA options, falling back to the generation config, then the model config.

    ATA is an inference-time choice: in training mode it is off unless `use_ata=True` is passed.
    """
    gen = getattr(model, "generation_config", None)
    cfg = model.config

    def pick(value, name):
        if value is not None:
            return value.item() if isinstance(value, torch.Tensor) else value
        if gen is not None and getattr(gen, name, None) is not None:
            return getattr(gen, name)
        return getattr(cfg, name)

    resolved = {
        "visual_token_budget": int(pick(visual_token_budget, "visual_token_budget")),
        "min_tokens_per_segment": int(pick(min_tokens_per_segment, "min_tokens_per_segment")),
        "token_selection": pick(token_selection, "token_selection"),
    }
    if use_ata is None:
        resolved["use_ata"] = False if model.training else bool(pick(None, "use_ata"))
    else:
        resolved["use_ata"] = bool(use_ata.item() if isinstance(use_ata, torch.Tensor) else use_ata)
    if resolved["visual_token_budget"] < 1:
        raise ValueError(f"visual_token_budget must be >= 1, got {resolved['visual_token_budget']}")
    if not 1 <= resolved["min_tokens_per_segment"] <= cfg.num_memory_tokens:
        raise ValueError(
            f"min_tokens_per_segment must be in [1, {cfg.num_memory_tokens}], got {resolved['min_tokens_per_segment']}"
        )
    return resolved
