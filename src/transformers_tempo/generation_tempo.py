"""Generation glue for Tempo: per-call ATA options, the static cache's length, the decoder's
attention while generating, and what `generate` refuses.

`TempoForConditionalGeneration.generate` splices the video into the prompt once and then lets
transformers' `GenerationMixin` decode with a stock Qwen3 decoder; these helpers are the pieces of
that glue that are not the model itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig, StaticCache

from .fast_paths import DECODE_ATTENTION

__all__ = [
    "STATIC_CACHE_BUCKET",
    "decode_attention_while_generating",
    "is_callers_cache",
    "reject_prompt_positions",
    "resolve_ata_options",
    "size_static_cache",
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
_LAST_CACHE_SLOTS = "_tempo_static_cache_slots"  # kept in the decoder's __dict__


def size_static_cache(decoder, generate_kwargs: dict, default_config: GenerationConfig, prompt_length: int) -> None:
    """With a static cache asked for and no cache given, hand `generate` one sized to the spliced
    prompt (`prompt_length`) plus the new tokens, rounded up to a multiple of `STATIC_CACHE_BUCKET`,
    never shorter than `max_cache_len` when given, nor than this decoder's last such cache.

    Why not let transformers size it: given `input_ids` along with the spliced `inputs_embeds` (as
    `generate(**inputs)` does, so that the text prompt leads the output), transformers sizes the
    cache for the two lengths together plus the new tokens, although only the embeddings go into
    it. For Tempo-6B at 4096 frames that was 18,432 slots for a 12,615-token sequence, 0.75 GB of
    bf16 cache that is never written.

    Why buckets: the compiled decoding step (and a kept CUDA graph) is specialised to the cache
    length, so videos whose prompts differ by a few timestamps or question tokens share one step
    instead of each recompiling. As in transformers, the length never shrinks from one call to
    the next, for the same reason; unused slots are masked.
    """
    config = generate_kwargs.get("generation_config") or default_config
    implementation = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    given = generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))
    new_tokens = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if implementation != "static" or given is not None or new_tokens is None:
        return
    slots = -(-(prompt_length + new_tokens) // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    asked = generate_kwargs.get("max_cache_len", getattr(config, "max_cache_len", None))
    slots = max(slots, asked or 0, decoder.__dict__.get(_LAST_CACHE_SLOTS, 0))
    decoder.__dict__[_LAST_CACHE_SLOTS] = slots
    cache = StaticCache(config=decoder.config, max_cache_len=slots)
    cache._sized_for_tempo = True  # transformers marks it the caller's; `is_callers_cache` knows better
    generate_kwargs["cache"] = cache
    generate_kwargs["cache_implementation"] = None  # transformers refuses a cache and an implementation


def is_callers_cache(cache) -> bool:
    """Whether `cache` was handed to `generate` by its caller (who may read it afterwards), rather
    than made for the call by transformers or by `size_static_cache`."""
    return getattr(cache, "_is_user_defined", False) and not getattr(cache, "_sized_for_tempo", False)


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
