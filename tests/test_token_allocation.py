"""Tests for Adaptive Token Allocation (transformers_tempo.token_allocation).

Expected values are worked out by hand in the comments. Scores are chosen so that the
float32 normalisation is exact: s = [0.25, 0.75, 0.5, 0.375] has min 0.25, range 0.5,
so n = [0, 1, 0.5, 0.25] and sum(n) = 1.75, w = n / 1.75 = [0, 4/7, 2/7, 1/7].
"""

import logging

import pytest
import torch

from transformers_tempo.token_allocation import ATA_DEFAULTS, allocate_tokens, ata_for_samples, select_tokens


S4 = [0.25, 0.75, 0.5, 0.375]


def alloc(scores, **kwargs):
    return allocate_tokens(torch.tensor(scores), **kwargs).tolist()


def test_defaults():
    assert ATA_DEFAULTS == {"visual_token_budget": 8192, "min_tokens_per_segment": 4, "token_selection": "head"}


# ---------------------------------------------------------------- allocate_tokens


def test_ideal_allocation_fits_budget():
    # m=4, M=128: a = 4 + floor(n * 124) = [4 + 0, 4 + 124, 4 + 62, 4 + 31] = [4, 128, 66, 35]
    # sum = 233 <= 8192: no scale-down.
    assert alloc(S4) == [4, 128, 66, 35]
    assert alloc(S4, budget=233) == [4, 128, 66, 35]  # exactly at the budget still fits


def test_ideal_allocation_small_max():
    # m=2, M=8: a = 2 + floor(n * 6) = [2 + 0, 2 + 6, 2 + 3, 2 + floor(1.5)] = [2, 8, 5, 3]
    assert alloc(S4, budget=1000, min_tokens=2, max_tokens=8) == [2, 8, 5, 3]


def test_scale_down_with_remainder_to_largest_weights():
    # B=50, m=4: ideal sum 233 > 50 -> extra = 50 - 4*4 = 34.
    # w * 34 = [0, 136/7 = 19.43, 68/7 = 9.71, 34/7 = 4.86] -> floors [0, 19, 9, 4] (sum 32)
    # leftover = 2 -> the two largest weights (segments 1 and 2) get +1,
    # not segment 3 even though its fractional part (0.86) is the largest.
    # a = [4 + 0, 4 + 20, 4 + 10, 4 + 4] = [4, 24, 14, 8], sum 50.
    out = alloc(S4, budget=50)
    assert out == [4, 24, 14, 8]
    assert sum(out) == 50


def test_scale_down_remainder_ties_follow_the_released_sort():
    # s = [0.25, 0.75, 0.75, 0.25, 0.5]: n = [0, 1, 1, 0, 0.5], sum 2.5, w = [0, .4, .4, 0, .2]
    # B=31, m=4: ideal [4, 128, 128, 4, 66] sum 330 > 31 -> extra = 31 - 20 = 11.
    # w * 11 = [0, 4.4, 4.4, 0, 2.2] -> floors [0, 4, 4, 0, 2] (sum 10), leftover 1.
    # The released descending CPU argsort of w lists segment 1 before 2 (N=5: no reordering of ties): 1 gets it.
    # a = [4, 9, 8, 4, 6], sum 31.
    out = alloc([0.25, 0.75, 0.75, 0.25, 0.5], budget=31)
    assert out == [4, 9, 8, 4, 6]
    assert sum(out) == 31


def test_budget_equal_to_n_times_min():
    # B = N*m = 16: not below, m stays 4. ideal sum 233 > 16 -> extra = 0,
    # floors all 0, leftover 0 -> [4, 4, 4, 4].
    assert alloc(S4, budget=16) == [4, 4, 4, 4]


def test_budget_below_n_times_min_lowers_min(caplog):
    # N=4, m=4, B=10: 16 > 10 -> m = 10 // 4 = 2.
    # ideal = 2 + floor(n * 126) = [2, 128, 65, 33], sum 228 > 10 -> extra = 10 - 8 = 2.
    # w * 2 = [0, 8/7 = 1.14, 4/7 = 0.57, 2/7 = 0.29] -> floors [0, 1, 0, 0], leftover 1 -> segment 1.
    # a = [2, 2 + 2, 2, 2] = [2, 4, 2, 2], sum 10.
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is an lru_cache
    with caplog.at_level(logging.WARNING):
        out = alloc(S4, budget=10)
    assert out == [2, 4, 2, 2]
    assert "lowering the minimum to 2" in caplog.text


def test_budget_below_n_falls_back_to_one():
    # N=4, B=3: m = max(1, 3 // 4 = 0) = 1. ideal = 1 + floor(n * 127) = [1, 128, 64, 32] > 3.
    # extra = 3 - 4 = -1; w * -1 = [0, -0.57, -0.29, -0.14] -> floors [0, -1, -1, -1] (sum -3)
    # leftover = -1 - (-3) = 2 -> segments 1 and 2 get +1: [1, 1, 1, 0] -> clamp to [1, 128] -> [1, 1, 1, 1].
    # The sum (4) exceeds B (3): reference behaviour when B < N.
    out = alloc(S4, budget=3)
    assert out == [1, 1, 1, 1]
    assert sum(out) == 4


def test_flat_scores_budget_share_below_max():
    # N=3, B=100: k = min(128, 100 // 3 = 33) = 33.
    assert alloc([0.6, 0.6, 0.6], budget=100) == [33, 33, 33]


def test_flat_scores_budget_share_above_max():
    # N=3, B=8192: k = min(128, 2730) = 128.
    assert alloc([0.6, 0.6, 0.6]) == [128, 128, 128]


def test_flat_scores_below_min_budget():
    # N=4, m=4, B=10: m lowered to 2; flat -> k = min(128, 10 // 4) = 2.
    assert alloc([0.3] * 4, budget=10) == [2, 2, 2, 2]
    # N=5, B=3: flat -> k = min(128, 3 // 5) = 0, returned without clamping (reference behaviour).
    assert alloc([0.3] * 5, budget=3) == [0, 0, 0, 0, 0]


def test_nearly_flat_scores_count_as_flat():
    # max - min = 5e-9 < 1e-8 -> flat: k = min(128, 100 // 2) = 50.
    assert allocate_tokens(torch.tensor([0.5, 0.5 + 5e-9], dtype=torch.float64), budget=100).tolist() == [50, 50]


def test_single_segment():
    # N=1 is always flat: k = min(M, B).
    assert alloc([0.3]) == [128]
    assert alloc([0.3], budget=50) == [50]
    # B=2 < m=4: m -> 2, k = min(128, 2) = 2.
    assert alloc([0.3], budget=2) == [2]


def test_budget_above_n_times_max():
    # B=10000 >= 4*128: never scaled down; only the top segment reaches M, nothing above it.
    assert alloc(S4, budget=10_000) == [4, 128, 66, 35]
    # Flat: k = min(128, 2500) = 128 for all.
    assert alloc([0.9] * 4, budget=10_000) == [128, 128, 128, 128]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_dtype_and_device(dtype):
    scores = torch.tensor(S4, dtype=dtype)  # all four values are exact in every dtype
    out = allocate_tokens(scores)
    assert out.dtype == torch.long
    assert out.shape == (4,)
    assert out.device == scores.device
    assert out.tolist() == [4, 128, 66, 35]


def test_flat_result_dtype():
    out = allocate_tokens(torch.tensor([0.5, 0.5]))
    assert out.dtype == torch.long and out.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_result_on_cuda():
    out = allocate_tokens(torch.tensor(S4, device="cuda"), budget=50)
    assert out.device.type == "cuda"
    assert out.tolist() == [4, 24, 14, 8]


def test_scores_with_grad_and_list_input():
    assert allocate_tokens(torch.tensor(S4, requires_grad=True)).tolist() == [4, 128, 66, 35]
    assert allocate_tokens(S4).tolist() == [4, 128, 66, 35]


@pytest.mark.parametrize(
    "scores, kwargs, match",
    [
        (torch.zeros(2, 3), {}, "scores"),
        (torch.tensor(0.5), {}, "scores"),
        (torch.tensor([]), {}, "scores"),
        (torch.tensor([0.1, float("nan")]), {}, "scores"),
        (torch.tensor([0.1, float("inf")]), {}, "scores"),
        (torch.tensor(S4), {"budget": 0}, "budget"),
        (torch.tensor(S4), {"budget": -5}, "budget"),
        (torch.tensor(S4), {"budget": 100.0}, "budget"),
        (torch.tensor(S4), {"min_tokens": 0}, "min_tokens"),
        (torch.tensor(S4), {"min_tokens": 200}, "min_tokens"),
        (torch.tensor(S4), {"min_tokens": 2.5}, "min_tokens"),
        (torch.tensor(S4), {"max_tokens": 0, "min_tokens": 1}, "max_tokens"),
        (torch.tensor(S4), {"max_tokens": True}, "max_tokens"),
    ],
)
def test_allocate_tokens_errors(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_tokens(scores, **kwargs)


def test_random_properties():
    gen = torch.Generator().manual_seed(0)

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for case in range(200):
        n = randint(1, 300)
        min_tokens = randint(1, 16)
        max_tokens = randint(min_tokens, 256)
        budget = randint(1, 20_000)
        kind = case % 4
        if kind == 0:  # continuous scores
            scores = torch.rand(n, generator=gen)
        elif kind == 1:  # few distinct values -> many ties
            scores = torch.randint(0, 4, (n,), generator=gen).float() / 4
        elif kind == 2:  # flat
            scores = torch.full((n,), float(torch.rand(1, generator=gen)))
        else:  # tight budget around N * min
            scores = torch.rand(n, generator=gen)
            budget = max(1, n * min_tokens + randint(-n, n))

        out = allocate_tokens(scores, budget, min_tokens, max_tokens)
        assert out.shape == (n,) and out.dtype == torch.long

        low = min_tokens if n * min_tokens <= budget else max(1, budget // n)
        flat = (scores.max() - scores.min()).item() < 1e-8
        if flat and budget < n:
            assert (out == 0).all()  # documented reference behaviour
        else:
            assert out.min().item() >= low and out.max().item() <= max_tokens, (case, n, budget)
        if budget >= n:  # includes every case with N * min <= B
            assert out.sum().item() <= budget, (case, n, budget)
        # Monotone: a higher score never keeps fewer tokens.
        order = torch.argsort(scores, stable=True)
        sorted_scores, sorted_out = scores[order], out[order]
        strictly_higher = sorted_scores[1:] > sorted_scores[:-1]
        assert (sorted_out[1:][strictly_higher] >= sorted_out[:-1][strictly_higher]).all()


# ---------------------------------------------------------------- select_tokens


def _features(n=3, m=5, d=2):
    return torch.arange(n * m * d, dtype=torch.float32).reshape(n, m, d)


def test_select_tokens_head():
    feats = _features()
    out = select_tokens(feats, torch.tensor([0, 2, 5]))
    assert [t.shape for t in out] == [(0, 2), (2, 2), (5, 2)]
    # Segment 1 holds values 10..19; its first two tokens are [10, 11] and [12, 13].
    assert torch.equal(out[1], torch.tensor([[10.0, 11.0], [12.0, 13.0]]))
    assert torch.equal(out[2], feats[2])
    assert select_tokens(feats, torch.tensor([1, 1, 1]), strategy="head")[0].tolist() == [[0.0, 1.0]]


def test_select_tokens_tail():
    feats = _features()
    out = select_tokens(feats, torch.tensor([0, 2, 5]), strategy="tail")
    assert [t.shape for t in out] == [(0, 2), (2, 2), (5, 2)]
    # Segment 1's last two tokens are [16, 17] and [18, 19].
    assert torch.equal(out[1], torch.tensor([[16.0, 17.0], [18.0, 19.0]]))
    assert torch.equal(out[2], feats[2])


def test_select_tokens_with_allocation():
    feats = torch.randn(4, 128, 8)
    counts = allocate_tokens(torch.tensor(S4), budget=50)
    out = select_tokens(feats, counts)
    assert [t.shape[0] for t in out] == [4, 24, 14, 8]
    assert torch.equal(torch.cat(out), torch.cat([feats[i, :k] for i, k in enumerate([4, 24, 14, 8])]))


@pytest.mark.parametrize(
    "features, counts, strategy, match",
    [
        (_features(), torch.tensor([1, 1, 1]), "random", "strategy"),
        (torch.zeros(3, 5), torch.tensor([1, 1, 1]), "head", "features"),
        (_features(), torch.tensor([1, 1]), "head", "counts"),
        (_features(), torch.tensor([[1, 1, 1]]), "head", "counts"),
        (_features(), torch.tensor([1, -1, 1]), "head", "counts"),
        (_features(), torch.tensor([1, 6, 1]), "tail", "counts"),
        (_features(), torch.tensor([1.0, 1.0, 1.0]), "head", "counts"),
    ],
)
def test_select_tokens_errors(features, counts, strategy, match):
    with pytest.raises(ValueError, match=match):
        select_tokens(features, counts, strategy=strategy)


# ---------------------------------------------------------------- ata_for_samples


def test_ata_for_samples_hand_worked():
    # Sample 0 = S4 with B=50 -> [4, 24, 14, 8] (see the scale-down test);
    # sample 1 = three flat scores with its own B=50 -> min(128, 50 // 3) = 16 each.
    scores = torch.tensor([0.25, 0.5, 0.75, 0.5, 0.5, 0.375, 0.5])
    index = torch.tensor([0, 1, 0, 1, 0, 0, 1])
    out = ata_for_samples(scores, index, budget=50)
    assert out.tolist() == [4, 16, 24, 16, 14, 8, 16]
    assert out.dtype == torch.long


def test_ata_for_samples_matches_separate_runs():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(40, generator=gen)
    index = torch.randint(0, 3, (40,), generator=gen)
    index[:3] = torch.tensor([0, 1, 2])  # every sample present
    index[10:14] = 7  # ids need not be contiguous
    out = ata_for_samples(scores, index, budget=100, min_tokens=4, max_tokens=64)
    for sample in index.unique():
        mask = index == sample
        assert torch.equal(out[mask], allocate_tokens(scores[mask], 100, 4, 64))


def test_ata_for_samples_single_sample_equals_allocate_tokens():
    scores = torch.tensor(S4)
    assert torch.equal(ata_for_samples(scores, torch.zeros(4, dtype=torch.long), 50), allocate_tokens(scores, 50))


@pytest.mark.parametrize(
    "scores, index, match",
    [
        (torch.tensor(S4), torch.tensor([0, 0, 1]), "sample_index"),
        (torch.tensor(S4), torch.tensor([0.0, 0.0, 1.0, 1.0]), "sample_index"),
        (torch.tensor([]), torch.tensor([], dtype=torch.long), "scores"),
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), "scores"),
    ],
)
def test_ata_for_samples_errors(scores, index, match):
    with pytest.raises(ValueError, match=match):
        ata_for_samples(scores, index)


# ---------------------------------------------------------------- fidelity to the released function, ties included


def released_ata(scores: list[float], budget: int, min_tokens: int, max_tokens: int) -> list[int]:
    """The released allocation step by step, written out here without the package: float32 CPU tensors for
    the arithmetic, Python ints for the bookkeeping, and the released (unstable) CPU argsort for the leftover
    order. Used as the reference the package must match on every input."""
    n = len(scores)
    if n * min_tokens > budget:
        min_tokens = max(1, budget // n)
    s = torch.tensor(scores, dtype=torch.float32)
    lowest, highest = s.min(), s.max()
    if bool(highest - lowest < 1e-8):  # a float32 comparison: 1e-8 is rounded to float32 first
        return [min(max_tokens, budget // n)] * n
    x = (s - lowest) / (highest - lowest)
    wanted = [min_tokens + int(v) for v in torch.floor(x * (max_tokens - min_tokens)).tolist()]
    if sum(wanted) <= budget:
        return [min(max(a, min_tokens), max_tokens) for a in wanted]
    extra = budget - n * min_tokens
    total = x.sum().item()
    w = torch.ones(n) / n if total < 1e-8 else x / total
    shares = [int(v) for v in torch.floor(w * extra).tolist()]
    leftover = extra - sum(shares)
    if leftover > 0:
        for i in torch.argsort(w, descending=True).tolist()[:leftover]:
            shares[i] += 1
    return [min(max(min_tokens + a, min_tokens), max_tokens) for a in shares]


TIE_SEGMENT_COUNTS = (1, 2, 7, 128, 257, 512)


def tie_cases(count: int = 400, seed: int = 15):
    """Random (scores, budget, min_tokens, max_tokens) with many exact ties: two-valued scores, a few levels,
    flat runs inside continuous scores, all-equal; budgets below N*min, equal to it, between, and above N*max."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for case in range(count):
        n = TIE_SEGMENT_COUNTS[case % len(TIE_SEGMENT_COUNTS)]
        max_tokens = pick([16, 64, 128])
        min_tokens = pick([1, 4, 8, randint(1, max_tokens)])
        kind = (case // len(TIE_SEGMENT_COUNTS)) % 5
        if kind == 0:  # two values (a black/static segment vs the rest)
            a, b = torch.sigmoid(torch.randn(2, generator=gen)).tolist()
            scores = torch.where(torch.rand(n, generator=gen) < 0.5, torch.tensor(a), torch.tensor(b))
        elif kind == 1:  # a few levels
            levels = torch.sigmoid(torch.randn(randint(2, 5), generator=gen))
            scores = levels[torch.randint(len(levels), (n,), generator=gen)]
        elif kind == 2:  # continuous with runs of equal scores copied in
            scores = torch.sigmoid(torch.randn(n, generator=gen))
            for _ in range(randint(0, max(1, n // 8))):
                i, j = randint(0, n - 1), randint(0, n - 1)
                scores[i] = scores[j]
        elif kind == 3:  # all equal but one
            scores = torch.full((n,), float(torch.rand(1, generator=gen)))
            scores[randint(0, n - 1)] = float(torch.rand(1, generator=gen))
        else:  # flat
            scores = torch.full((n,), float(torch.rand(1, generator=gen)))
        floor_budget, cap = n * min_tokens, n * max_tokens
        budget = pick([
            randint(1, max(1, floor_budget - 1)),  # below N*min
            floor_budget,  # equal to it
            randint(floor_budget, cap),  # between
            cap + randint(0, 1000),  # at or above N*max
            randint(1, 20_000),
        ])
        yield scores.tolist(), budget, min_tokens, max_tokens


def test_released_transcription_reproduces_the_hand_worked_cases():
    # The transcription itself against values worked out by hand above.
    assert released_ata(S4, 50, 4, 128) == [4, 24, 14, 8]
    assert released_ata(S4, 10, 4, 128) == [2, 4, 2, 2]
    assert released_ata(S4, 3, 4, 128) == [1, 1, 1, 1]
    assert released_ata([0.3] * 5, 3, 4, 128) == [0] * 5


def test_allocation_equals_the_released_arithmetic_on_ties():
    cases = list(tie_cases())
    assert {len(c[0]) for c in cases} == set(TIE_SEGMENT_COUNTS)
    assert any(b < len(s) * m for s, b, m, _ in cases) and any(b == len(s) * m for s, b, m, _ in cases)
    assert any(b >= len(s) * big for s, b, _, big in cases)
    differing = [
        (len(scores), budget, low, high)
        for scores, budget, low, high in cases
        if allocate_tokens(torch.tensor(scores), budget, low, high).tolist() != released_ata(scores, budget, low, high)
    ]
    assert differing == []


def test_leftover_ties_follow_the_released_unstable_order():
    # 128 segments with two score values, the case the stable order got wrong: 64 high (w = 1/64) and 64 low
    # (w = 0). B = 1023, m = 8: extra = 1023 - 1024 < 0 lowers m to 1023 // 128 = 7, extra = 1023 - 896 = 127;
    # each high segment's share is floor(127 / 64) = 1 (sum 64), so 63 leftover tokens go to 63 of the 64 tied
    # high segments, in the order the released CPU argsort lists them.
    high = [0.75 if i % 2 else 0.25 for i in range(128)]
    got = allocate_tokens(torch.tensor(high), 1023, 8, 128)
    order = torch.argsort(torch.tensor([1 / 64 if v == 0.75 else 0.0 for v in high]), descending=True)[:63]
    expected = torch.full((128,), 7)
    expected[1::2] = 8
    expected[order] += 1
    assert torch.equal(got, expected)
    assert got.sum().item() == 1023 and sorted(set(got[1::2].tolist())) == [8, 9]


def test_score_range_of_float32_1e8_is_not_flat():
    # The released check compares the float32 range with 1e-8 in float32, where 1e-8 rounds to 9.99999994e-09:
    # a range of exactly that value is not below it, so the scores are not flat (a Python-float comparison,
    # 9.99999994e-09 < 1e-8, would call them flat and give [50, 50]).
    # n = [0, 1]: ideal [4, 4 + 124] = [4, 128], sum 132 > B = 100 -> extra = 92, w = [0, 1] -> [4, 4 + 92].
    tiny = torch.tensor(1e-8, dtype=torch.float32).item()
    assert tiny < 1e-8
    scores = torch.tensor([0.0, tiny], dtype=torch.float32)
    assert allocate_tokens(scores, budget=100).tolist() == [4, 96]
    assert released_ata(scores.tolist(), 100, 4, 128) == [4, 96]


def test_per_sample_budgets_use_the_same_function_on_ties():
    cases = [c for c in tie_cases(60, seed=16) if len(c[0]) <= 257][:12]
    scores = torch.tensor([v for s, *_ in cases for v in s])
    index = torch.tensor([k for k, (s, *_) in enumerate(cases) for _ in s])
    budget, low, high = 1023, 4, 128
    out = ata_for_samples(scores, index, budget, low, high)
    for k, (s, *_) in enumerate(cases):
        assert out[index == k].tolist() == released_ata(s, budget, low, high)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_allocation_on_cuda_equals_the_released_arithmetic_on_ties():
    for scores, budget, low, high in tie_cases(120, seed=17):
        out = allocate_tokens(torch.tensor(scores, device="cuda"), budget, low, high)
        assert out.device.type == "cuda"
        assert out.tolist() == released_ata(scores, budget, low, high), (len(scores), budget, low, high)
    cases = [c for c in tie_cases(30, seed=18) if len(c[0]) <= 257][:6]
    flat_scores = torch.tensor([v for s, *_ in cases for v in s], device="cuda")
    index = torch.tensor([k for k, (s, *_) in enumerate(cases) for _ in s], device="cuda")
    out = ata_for_samples(flat_scores, index, 1023, 4, 128)
    assert out.device.type == "cuda"
    for k, (s, *_) in enumerate(cases):
        assert out[index == k].tolist() == released_ata(s, 1023, 4, 128)


# ---------------------------------------------------------------- one budget per video


def test_a_long_and_a_short_video_keep_their_own_budgets():
    """One shared budget would squeeze the short video to fit the long one: per-sample runs must not."""
    gen = torch.Generator().manual_seed(3)
    long_scores, short_scores = torch.rand(30, generator=gen), torch.rand(3, generator=gen)
    scores = torch.cat([long_scores, short_scores])
    index = torch.tensor([0] * 30 + [1] * 3)
    out = ata_for_samples(scores, index, budget=200, min_tokens=4, max_tokens=64)
    assert torch.equal(out[:30], allocate_tokens(long_scores, 200, 4, 64))
    assert torch.equal(out[30:], allocate_tokens(short_scores, 200, 4, 64))
    assert not torch.equal(out, allocate_tokens(scores, 200, 4, 64))  # a shared budget would differ
    assert out[:30].sum() <= 200 and out.sum() > 200
