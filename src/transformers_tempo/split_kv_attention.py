"""One decoding step's attention split over the key/value slots, as two Triton kernels.

A decoding step has one query token per row. sdpa's fused kernels give each (row, head) pair one
block of threads, so at batch 1 the 32 query heads of the 4B decoder keep a few dozen of an
H200's 132 multiprocessors busy while they read the whole cache (about 34 MB per layer at 8.3k
slots). Here each program reads one chunk of slots of one key/value head, for all the query heads
that share it (grouped-query attention: the cache is read once), and keeps a running softmax over
the chunk; a second kernel combines the chunks' partial results. Masked slots (the static cache's
empty tail, left padding) are not loaded.

Measured on one H200 (`bench_decode_attention.py`, 9,216 slots of which 8,313 valid, the Tempo-6B
decoder's heads, 36 layers replayed from a CUDA graph): 11.9 us per layer against 15.5 for sdpa
with `enable_gqa` and the mask, and 12.9 for sdpa over the valid slots without a mask. The settings
below are the fastest of the 20 tried there; skipping all-masked tiles with a branch in the loop
was slower (14.0 us), since it stops Triton from pipelining the loads.

The same function as sdpa with a boolean mask: scores in float32, probabilities rounded to the
value dtype before the product with the values, as flash-attention kernels do. Only used on CUDA
when Triton is installed (`split_kv_applies`); `fast_paths.decode_attention` chooses.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_attention keeps sdpa
    triton = None

BLOCK_SLOTS = 64  # slots per inner iteration (one tile of keys and values)
TARGET_PROGRAMS = 528  # about four programs per multiprocessor of an H100/H200 (132)
MAX_CHUNKS = 128  # the merge kernel holds one row's chunks at once
NUM_WARPS = 4
NUM_STAGES = 3  # loads of the next tiles in flight while this one is computed


def split_kv_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> bool:
    """Whether `split_kv_decode_attention` can compute this step: one query token, inference, CUDA,
    half precision, a power-of-two head size of 16-256 (larger tiles would not fit in shared memory),
    whole query groups per key/value head, and a boolean (batch or 1, 1, 1, slots) mask."""
    if triton is None or not query.is_cuda or query.shape[2] != 1:
        return False
    if any(t.requires_grad for t in (query, key, value)):  # the op has no backward
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    dim = query.shape[-1]
    if not 16 <= dim <= 256 or dim & (dim - 1) or key.shape[-1] != dim or value.shape[-1] != dim:
        return False
    if query.shape[1] % key.shape[1] or key.shape != value.shape or key.shape[0] != query.shape[0]:
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        return False
    return (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1:3] == (1, 1)
        and mask.shape[-1] == key.shape[2]
        and mask.shape[0] in (1, query.shape[0])
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _has_bf16_tensor_cores(device: torch.device) -> bool:
    """Compute capability 8.0 or later; True off CUDA (Triton's CPU interpreter)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def split_sizes(batch: int, kv_heads: int, slots: int) -> tuple[int, int]:
    """(slots per chunk, number of chunks): about TARGET_PROGRAMS programs, whole tiles each."""
    tiles = _ceil_div(slots, BLOCK_SLOTS)
    wanted_chunks = max(1, min(_ceil_div(TARGET_PROGRAMS, batch * kv_heads), tiles, MAX_CHUNKS))
    chunk = _ceil_div(tiles, wanted_chunks) * BLOCK_SLOTS
    return chunk, _ceil_div(slots, chunk)


if triton is not None:

    @triton.jit
    def _attend_tile(query, keys, values, cols, dims, valid, stride_ks, stride_vs, scale, best, total, acc):
        """One tile of slots folded into the running softmax (best score, sum, weighted values)."""
        key = tl.load(keys + cols[:, None] * stride_ks + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(query, tl.trans(key)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # no inf - inf
        probs = tl.exp(scores - shift[:, None])
        decay = tl.exp(best - shift)
        total = total * decay + tl.sum(probs, axis=1)
        value = tl.load(values + cols[:, None] * stride_vs + dims[None, :], mask=valid[:, None], other=0.0)
        acc = acc * decay[:, None] + tl.dot(probs.to(value.dtype), value)
        return new_best, total, acc

    @triton.jit
    def _partial_kernel(
        Q, K, V, MASK, ACC, MAX, SUM,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_mb, stride_ms,
        slots, chunks, scale,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ):
        row_head = tl.program_id(0)  # batch row * KV_HEADS + key/value head
        part = tl.program_id(1)
        row = row_head // KV_HEADS
        head = row_head % KV_HEADS
        group = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM)
        real = group < GROUP  # tl.dot wants at least 16 rows: the padding rows are computed, not stored
        heads = head * GROUP + group
        query = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=real[:, None], other=0.0)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        keys = K + row * stride_kb + head * stride_kh
        values = V + row * stride_vb + head * stride_vh
        first = part * CHUNK
        for offset in range(0, CHUNK, BLOCK):
            cols = first + offset + tl.arange(0, BLOCK)
            valid = tl.load(MASK + row * stride_mb + cols * stride_ms, mask=cols < slots, other=0) != 0
            best, total, acc = _attend_tile(query, keys, values, cols, dims, valid, stride_ks, stride_vs,
                                            scale, best, total, acc)
        slot = (row * KV_HEADS * GROUP + heads) * chunks + part  # (batch * heads, chunks) layout
        tl.store(ACC + slot[:, None] * DIM + dims[None, :], acc, mask=real[:, None])
        tl.store(MAX + slot, best, mask=real)
        tl.store(SUM + slot, total, mask=real)

    @triton.jit
    def _combine_kernel(ACC, MAX, SUM, OUT, chunks, DIM: tl.constexpr, CHUNKS_PAD: tl.constexpr):
        row_head = tl.program_id(0)  # batch row * heads + query head; OUT is (batch, 1, heads, DIM)
        parts = tl.arange(0, CHUNKS_PAD)
        dims = tl.arange(0, DIM)
        used = parts < chunks
        best = tl.load(MAX + row_head * chunks + parts, mask=used, other=float("-inf"))
        total = tl.load(SUM + row_head * chunks + parts, mask=used, other=0.0)
        acc = tl.load(ACC + (row_head * chunks + parts)[:, None] * DIM + dims[None, :], mask=used[:, None], other=0.0)
        top = tl.max(best, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # a wholly masked row gives zeros, not NaN
        weight = tl.exp(best - top)  # an all-masked chunk weighs 0
        out = tl.sum(acc * weight[:, None], axis=0) / tl.maximum(tl.sum(total * weight, axis=0), 1e-30)
        tl.store(OUT + row_head * DIM + dims, out.to(OUT.dtype.element_ty))


@torch.library.custom_op("tempo::split_kv_decode_attention", mutates_args=())
def split_kv_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query token: query (batch, heads, 1, dim), key and
    value (batch, kv_heads, slots, dim), boolean mask (batch or 1, 1, 1, slots) -> (batch, 1, heads, dim).
    Check `split_kv_applies` first. A custom op, so torch.compile calls it as it is."""
    if not _has_bf16_tensor_cores(query.device):  # Triton's bf16 products need compute capability 8.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    # the kernels step through the head dimension with unit stride (checked here too: under
    # torch.compile `split_kv_applies` saw only the traced tensors' strides)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    chunk, chunks = split_sizes(batch, kv_heads, slots)
    acc = torch.empty((batch * heads, chunks, dim), dtype=torch.float32, device=query.device)
    best = torch.empty((batch * heads, chunks), dtype=torch.float32, device=query.device)
    total = torch.empty_like(best)
    _partial_kernel[(batch * kv_heads, chunks)](
        query, key, value, mask, acc, best, total,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3),
        slots, chunks, scale,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim,
        BLOCK=BLOCK_SLOTS, CHUNK=chunk, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    out = torch.empty((batch, 1, heads, dim), dtype=query.dtype, device=query.device)
    _combine_kernel[(batch * heads,)](acc, best, total, out, chunks, DIM=dim, CHUNKS_PAD=triton.next_power_of_2(chunks))
    return out


@split_kv_decode_attention.register_fake
def _(query, key, value, mask, scale):
    batch, heads, _, dim = query.shape
    return query.new_empty((batch, 1, heads, dim))
