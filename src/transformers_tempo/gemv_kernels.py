"""A matrix-vector product for one decoding step at batch 1, as a Triton kernel.

At batch 1 every decoder product `x @ weight.T` reads its weight once and does two FLOPs per weight
element, so only the memory read matters. Each program here reads a block of whole weight rows,
streaming along the input dimension, and keeps one float32 partial sum per row and lane; a single
reduction at the end gives each output.

Measured on one H200 (`bench_gemv.py`, the Tempo-6B decoder's shapes, 36 distinct weights replayed
from a CUDA graph, microseconds per product): fused gate/up 24.4-24.8 against 29.4 for cuBLAS and
27.0 for inductor's autotuned kernel; down 13.9 against 17.4 and 16.3; fused q/k/v 9.2 against 10.7
and 9.8; o 7.3 against 10.2 and 6.5. Per layer 54.8 us against 67.7 for cuBLAS: about 0.47 ms
less per decoding step over 36 layers. `kernel_settings` holds the fastest settings of a later,
finer sweep (`bench_gemv.py --narrow`) per shape: o 6.6 us, down 13.7, gate/up 24.3.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `gemv` falls back to F.linear
    triton = None


USE_KERNEL = True  # off: `gemv` is F.linear (`bench_e2e.py`'s "graphed-cublas" mode compares)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can compute `F.linear(x, weight)`: one input row, CUDA, both on one
    device, half precision, contiguous rows, fewer than 2**31 weight elements, no gradients."""
    return (
        USE_KERNEL
        and triton is not None
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.device == x.device
        and weight.shape[1] == x.shape[-1]
        and weight.shape[0] * weight.stride(0) < 2**31  # the kernel's offsets are 32-bit
        and weight.stride(1) == 1
        and x.stride(-1) == 1
        and not (x.requires_grad or weight.requires_grad)
    )


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)`; through the kernel when `gemv_applies` (one input row), summed in
    float32 in another order than cuBLAS (the same within rounding)."""
    if not gemv_applies(x, weight):
        return F.linear(x, weight)
    return _gemv_op(x, weight)


@torch.library.custom_op("tempo::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel as a custom op, so that torch.compile calls it as it is (and a CUDA graph
    captures its launch). Check `gemv_applies` first."""
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        return launch_gemv(x.contiguous(), weight)


@_gemv_op.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def kernel_settings(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(rows per program, tile length, warps, pipeline stages) for a (rows, cols) weight.

    The fastest of `bench_gemv.py --narrow`'s settings on one H200 for the Tempo-6B decoder's
    shapes: few output rows (o, down) want one or two rows per program and long tiles, so that
    enough programs stream at once; the fused gate/up 16 rows of short tiles (24.3 us against 24.8
    at 8 rows). Over the three shapes changed, 58 us less per decoding step; q/k/v keeps 8 rows."""
    if rows <= 4096:
        return (1, 1024, 8, 3) if cols <= 4096 else (2, 1024, 4, 3)  # o: 6.6 us (7.4 at 4 rows), down: 13.7 (13.9)
    return (8, 256, 4, 3) if rows <= 8192 else (16, 256, 8, 1)  # q/k/v, gate/up


def launch_gemv(x, weight, out=None, block_n=None, block_k=None, num_warps=None, num_stages=None) -> torch.Tensor:
    """The kernel itself on the current device, without `gemv_applies`' checks (Triton's CPU
    interpreter runs it on CPU tensors in the tests); `out` may be given, of shape
    (..., out_features). Settings not given are `kernel_settings`'."""
    n, k = weight.shape
    defaults = kernel_settings(n, k)
    block_n, block_k, num_warps, num_stages = (
        given if given is not None else default
        for given, default in zip((block_n, block_k, num_warps, num_stages), defaults)
    )
    if out is None:
        out = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](
        x, weight, out, n, weight.stride(0),
        K=k, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, n, w_row_stride, K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n
        rows = tl.where(in_range, rows, 0)  # a last partial block re-reads row 0 rather than mask loads
        partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):  # K a constant: one compilation per decoder shape
            cols = start + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + rows[:, None] * w_row_stride + cols[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols, eviction_policy="evict_last")
            else:
                w = tl.load(w_ptrs, mask=cols[None, :] < K, other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
            partial += w.to(tl.float32) * x.to(tl.float32)[None, :]
        total = tl.sum(partial, axis=1)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=in_range)
