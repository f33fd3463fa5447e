"""The vision attention's rotary embedding and head layout in one Triton pass.

Each vision attention layer of the compressor splits its fused q/k/v product into heads, rotates
q and k in float32 (the vision tower's 2D rotary embedding) and hands sdpa tensors of shape
(frame groups, heads, patches per group, head dim). Under torch.compile inductor makes one kernel
of those steps; in a profile of the compressed 1024 frames on an H200 it took 61 ms (636 us per
layer and chunk of 65,536 patches), about 1.2 TB/s for the 0.8 GB it reads and writes. The kernel
here reads each q/k/v row segment once, rotates q and k with float32 arithmetic and writes the three
tensors in the layout sdpa reads; `bench_vision_attention.py` times the two.

The arithmetic per element is the stock one (`x * cos + rotate_half(x) * sin` in float32, rounded
once to the input dtype); the GPU may fuse a product and a sum into one rounding, as inductor's
kernel does, so the two agree within one rounding of the input dtype.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the vision attention keeps its torch formulation
    triton = None


USE_KERNEL = True  # off: the vision attention rotates and lays out its heads with torch operations
ROWS_PER_PROGRAM = 64


def qkv_rotary_applies(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, group: int) -> bool:
    """Whether `split_qkv_with_rotary` can run the kernel: a CUDA half-precision (N, 3 * heads * d)
    product with unit column stride, float32 (N, d) cos and sin on the same device, d a power of two,
    N a multiple of `group`, 32-bit offsets, no gradients."""
    if not (USE_KERNEL and triton is not None and qkv.is_cuda and qkv.dim() == 2):
        return False
    rows, width = qkv.shape
    head_dim = width // (3 * heads) if heads > 0 else 0
    return (
        qkv.dtype in (torch.bfloat16, torch.float16)
        and width == 3 * heads * head_dim
        and head_dim >= 2
        and head_dim & (head_dim - 1) == 0
        and group > 0
        and rows % group == 0
        and qkv.stride(1) == 1
        and rows * max(qkv.stride(0), width) < 2**31
        and all(
            t.dtype == torch.float32 and t.device == qkv.device and t.shape == (rows, head_dim) and t.stride(1) == 1
            for t in (cos, sin)
        )
        and not qkv.requires_grad
    )


def split_qkv_with_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, group: int):
    """q, k and v of a fused (N, 3 * heads * d) product, each (N // group, heads, group, d), q and k
    rotated by (N, d) `cos` and `sin`. Check `qkv_rotary_applies` first."""
    return _qkv_rotary_op(qkv, cos, sin, heads, group).unbind(0)


@torch.library.custom_op("tempo::vision_qkv_rotary", mutates_args=())
def _qkv_rotary_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, group: int) -> torch.Tensor:
    """The kernel as a custom op (torch.compile calls it as it is): one (3, N // group, heads,
    group, d) tensor holding q, k and v."""
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        return launch_qkv_rotary(qkv, cos.contiguous(), sin.contiguous(), heads, group)


@_qkv_rotary_op.register_fake
def _(qkv, cos, sin, heads, group):
    rows, width = qkv.shape
    return qkv.new_empty((3, rows // group, heads, group, width // (3 * heads)))


def launch_qkv_rotary(qkv, cos, sin, heads: int, group: int, rows_per_program: int | None = None, num_warps: int = 4):
    """The kernel on the current device without `qkv_rotary_applies`' checks (Triton's CPU
    interpreter runs it on CPU tensors in the tests)."""
    rows, width = qkv.shape
    head_dim = width // (3 * heads)
    block = rows_per_program or ROWS_PER_PROGRAM
    out = qkv.new_empty((3, rows // group, heads, group, head_dim))
    grid = (3 * heads, triton.cdiv(rows, block))  # heads vary fastest: neighbouring programs share cos/sin rows
    _qkv_rotary_kernel[grid](
        qkv, cos, sin, out, rows, qkv.stride(0), cos.stride(0), sin.stride(0),
        HEADS=heads, HALF=head_dim // 2, GROUP=group, BLOCK=block, num_warps=num_warps,
    )
    return out


if triton is not None:

    @triton.jit
    def _qkv_rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, rows_total, qkv_stride, cos_stride, sin_stride,
                           HEADS: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        part = tl.program_id(0) // HEADS  # 0: q, 1: k, 2: v
        head = tl.program_id(0) % HEADS
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        lanes = tl.arange(0, HALF)
        in_range = rows[:, None] < rows_total
        source = qkv_ptr + rows[:, None] * qkv_stride + (part * HEADS + head) * 2 * HALF + lanes[None, :]
        first = tl.load(source, mask=in_range, other=0.0).to(tl.float32)
        second = tl.load(source + HALF, mask=in_range, other=0.0).to(tl.float32)
        if part < 2:  # q and k: x * cos + rotate_half(x) * sin, rotate_half(x) = (-second, first)
            cos_at = cos_ptr + rows[:, None] * cos_stride + lanes[None, :]
            sin_at = sin_ptr + rows[:, None] * sin_stride + lanes[None, :]
            cos1 = tl.load(cos_at, mask=in_range, other=0.0)
            cos2 = tl.load(cos_at + HALF, mask=in_range, other=0.0)
            sin1 = tl.load(sin_at, mask=in_range, other=0.0)
            sin2 = tl.load(sin_at + HALF, mask=in_range, other=0.0)
            first, second = first * cos1 - second * sin1, second * cos2 + first * sin2
        groups = rows_total // GROUP
        target = ((part * groups + rows // GROUP) * HEADS + head) * GROUP + rows % GROUP
        destination = out_ptr + target[:, None] * (2 * HALF) + lanes[None, :]
        tl.store(destination, first.to(out_ptr.dtype.element_ty), mask=in_range)
        tl.store(destination + HALF, second.to(out_ptr.dtype.element_ty), mask=in_range)
