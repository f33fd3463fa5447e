"""Adaptive Token Allocation (ATA) for Tempo.

Tempo compresses every video segment into `max_tokens` memory-token features and one
relevance score in (0, 1). ATA decides how many of those features each segment keeps,
so that relevant segments keep more and the whole video stays within a token budget.

The arithmetic below reproduces the reference implementation exactly (float32
normalisation, floor rounding, remainder to the largest weights), including its edge
cases; see `allocate_tokens`.
"""

from __future__ import annotations

import operator

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["ATA_DEFAULTS", "ATA_OPTION_NAMES", "allocate_tokens", "ata_for_samples", "select_tokens"]

# Settings of the released Tempo model.
ATA_DEFAULTS = {"visual_token_budget": 8192, "min_tokens_per_segment": 4, "token_selection": "head"}

# The per-call ATA options, one list for every entry point (model, processor, pipeline, streaming,
# conversion): a copy that lacks one silently drops it.
ATA_OPTION_NAMES = ("visual_token_budget", "min_tokens_per_segment", "use_ata", "token_selection")

_STRATEGIES = ("head", "tail")


def _as_int(value, name: str) -> int:
    """Return `value` as a Python int, or raise a ValueError naming the argument."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}") from None


def _check_limits(budget, min_tokens, max_tokens) -> tuple[int, int, int]:
    budget = _as_int(budget, "budget")
    min_tokens = _as_int(min_tokens, "min_tokens")
    max_tokens = _as_int(max_tokens, "max_tokens")
    if budget < 1:
        raise ValueError(f"`budget` must be >= 1, got {budget}")
    if max_tokens < 1:
        raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"`min_tokens` must be in [1, max_tokens={max_tokens}], got {min_tokens}")
    return budget, min_tokens, max_tokens


def allocate_tokens(
    scores: torch.Tensor, budget: int = 8192, min_tokens: int = 4, max_tokens: int = 128
) -> torch.LongTensor:
    """Number of memory tokens each segment keeps, from its relevance score.

    Args:
        scores: 1-D tensor of N relevance scores, one per segment (cast to float32).
        budget: total number of tokens B for all N segments.
        min_tokens: tokens every segment keeps at least (m).
        max_tokens: tokens a segment has (M); no segment keeps more.

    Returns:
        int64 tensor of shape (N,) on the device of `scores`.

    Steps (the released arithmetic, operation for operation):
        1. If N * m > B, m is lowered to max(1, B // N) (with a warning).
        2. Flat scores (max - min < 1e-8, compared in float32): every segment keeps min(M, B // N),
           returned as is.
        3. n = (s - min s) / (max s - min s); ideal a = m + floor(n * (M - m)).
        4. If sum(a) > B: with extra = B - N * m and w = n / sum(n),
           a = m + floor(w * extra), and the `extra - sum(floor(w * extra))` leftover
           tokens go one each to the segments of largest w, in the order of
           `torch.argsort(w, descending=True)` on the CPU. That sort is not stable: among
           tied weights (static or black segments score bitwise-equal) the chosen segments
           are the ones that kernel lists first, which is what the released model keeps.
        5. a is clamped to [m, M].

    The arithmetic runs on the CPU in float32 whatever the device of `scores` (N numbers; a
    GPU division or sort could round or order them differently), and the result is moved back.

    The sum is at most B whenever B >= N. When B < N the reference behaviour is kept:
    non-flat scores give every segment 1 token (sum N > B) and flat scores give 0.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"`scores` must be 1-D (one score per segment), got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError("`scores` must be non-empty")
    budget, min_tokens, max_tokens = _check_limits(budget, min_tokens, max_tokens)
    s = scores.detach().to("cpu", torch.float32)
    if not torch.isfinite(s).all():
        raise ValueError("`scores` must be finite (found NaN or inf)")
    return _allocate_cpu(s, budget, min_tokens, max_tokens).to(scores.device)


def _allocate_cpu(s: torch.Tensor, budget: int, min_tokens: int, max_tokens: int) -> torch.LongTensor:
    """`allocate_tokens` on checked float32 CPU scores; every tensor operation is the released one."""
    n_seg = s.numel()
    if n_seg * min_tokens > budget:
        lowered = max(1, budget // n_seg)
        logger.warning_once(
            f"Token budget {budget} is below {n_seg} segments x min_tokens {min_tokens}; "
            f"lowering the minimum to {lowered} tokens per segment."
        )
        min_tokens = lowered

    s_min, s_max = s.min(), s.max()
    score_range = s_max - s_min
    # A tensor-scalar comparison, so 1e-8 is rounded to float32 (a range of exactly float32(1e-8) is flat).
    if bool(score_range < 1e-8):
        keep = min(max_tokens, budget // n_seg)
        return torch.full((n_seg,), keep, dtype=torch.long)

    norm = (s - s_min) / score_range
    counts = min_tokens + (norm * (max_tokens - min_tokens)).floor().long()

    if counts.sum().item() > budget:
        extra = budget - n_seg * min_tokens
        norm_sum = norm.sum().item()  # a Python float, compared and divided by as such
        if norm_sum < 1e-8:  # unreachable (max(norm) is 1), kept as released
            weights = torch.ones_like(norm) / n_seg
        else:
            weights = norm / norm_sum
        share = (weights * extra).floor().long()
        leftover = int(extra - share.sum().item())
        if leftover > 0:
            # Not stable on purpose: ties are broken exactly as the released CPU sort breaks them.
            order = torch.argsort(weights, descending=True)
            share[order[:leftover]] += 1
        counts = min_tokens + share

    return counts.clamp(min_tokens, max_tokens)


def select_tokens(features: torch.Tensor, counts: torch.Tensor, strategy: str = "head") -> list[torch.Tensor]:
    """Keep `counts[i]` of the M memory-token features of each segment.

    Args:
        features: (N, M, D) memory-token features of N segments.
        counts: (N,) integer tokens to keep per segment, each in [0, M].
        strategy: "head" keeps the first counts[i] features (what Tempo uses);
            "tail" keeps the last counts[i].

    Returns:
        List of N tensors of shape (counts[i], D) (views of `features`).
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}, got {strategy!r}")
    if features.ndim != 3:
        raise ValueError(f"`features` must have shape (N, M, D), got {tuple(features.shape)}")
    counts = torch.as_tensor(counts)
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"`counts` must be an integer tensor, got dtype {counts.dtype}")
    n_seg, n_tok = features.shape[:2]
    if counts.shape != (n_seg,):
        raise ValueError(f"`counts` must have shape ({n_seg},) to match `features`, got {tuple(counts.shape)}")
    ks = counts.tolist()
    if any(k < 0 or k > n_tok for k in ks):
        raise ValueError(f"`counts` must be in [0, {n_tok}], got {ks}")
    if strategy == "head":
        return [features[i, :k] for i, k in enumerate(ks)]
    return [features[i, n_tok - k :] for i, k in enumerate(ks)]


def ata_for_samples(
    scores: torch.Tensor,
    sample_index: torch.Tensor,
    budget: int = 8192,
    min_tokens: int = 4,
    max_tokens: int = 128,
) -> torch.LongTensor:
    """`allocate_tokens` run separately for each sample of a batch (the same arithmetic, on the CPU).

    Args:
        scores: (S,) scores of the segments of all samples, concatenated.
        sample_index: (S,) integer id of the sample each segment belongs to.
        budget, min_tokens, max_tokens: as in `allocate_tokens`; each sample gets its own budget.

    Returns:
        int64 tensor of shape (S,): counts in the same order as `scores`.
    """
    scores = torch.as_tensor(scores)
    sample_index = torch.as_tensor(sample_index, device=scores.device)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"`scores` must be 1-D and non-empty, got shape {tuple(scores.shape)}")
    if sample_index.shape != scores.shape:
        raise ValueError(
            f"`sample_index` must have the shape of `scores` {tuple(scores.shape)}, got {tuple(sample_index.shape)}"
        )
    if sample_index.is_floating_point() or sample_index.is_complex() or sample_index.dtype == torch.bool:
        raise ValueError(f"`sample_index` must be an integer tensor, got dtype {sample_index.dtype}")

    budget, min_tokens, max_tokens = _check_limits(budget, min_tokens, max_tokens)
    # One copy to the CPU for the whole batch; each sample then runs exactly `allocate_tokens`' arithmetic.
    cpu_scores, cpu_index = scores.detach().to("cpu", torch.float32), sample_index.cpu()
    if not torch.isfinite(cpu_scores).all():
        raise ValueError("`scores` must be finite (found NaN or inf)")
    counts = torch.empty(cpu_scores.shape, dtype=torch.long)
    for sample in torch.unique(cpu_index):
        positions = (cpu_index == sample).nonzero(as_tuple=True)[0]
        counts[positions] = _allocate_cpu(cpu_scores[positions], budget, min_tokens, max_tokens)
    return counts.to(scores.device)
