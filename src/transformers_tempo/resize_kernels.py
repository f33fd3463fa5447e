"""Antialiased bicubic resizing of uint8 frames on the GPU as two separable Triton passes.

`F.interpolate(..., mode="bicubic", antialias=True)` on CUDA wants float input, so a uint8 clip
is first copied to float32 (and to a contiguous layout: frames come channels-last from the
decoder), then resized by a kernel in which every output pixel reads its whole window (10 x 10
input pixels when 1280x720 becomes 512x288), then clamped, rounded and cast back. Measured on one
H200 for 1024 frames of 1280x720: 41 ms in that resize kernel and about 30 ms in the conversions
around it; these passes take 27 ms, and preprocessing took 0.124 s against 0.139 s in the same run
(`benchmarks/results/README.md`; the frames' upload now sets its pace).

Here the resize is what it is mathematically, two one-dimensional passes: the first reads the
uint8 frames in whatever layout they have and resamples each row (float32 out), the second
resamples each column and writes rounded uint8. A pass whose size does not change is skipped
(resampling to the same size is the identity). The weights are torch's own: the same span and
bicubic (a = -0.5) filter, normalised per output pixel, accumulated in float32 in the same order,
so the result is the float path's up to float rounding (compared in the tests).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: frame_geometry keeps F.interpolate
    triton = None

__all__ = ["axis_weights", "resize_uint8_frames", "triton_resize_applies"]

BLOCK_ROWS = 16
BLOCK_COLS = 64
# Taps up to this many are unrolled; beyond (shrinking by over ~8x) a loop keeps compile times
# short (unrolled, 183 taps took 47 s to compile for sm_90, 640 taps over 9 minutes).
MAX_UNROLLED_TAPS = 32


def triton_resize_applies(frames: torch.Tensor) -> bool:
    """Whether `resize_uint8_frames` handles these (N, C, H, W) uint8 frames: on CUDA with Triton."""
    return triton is not None and frames.is_cuda and frames.dtype == torch.uint8 and frames.ndim == 4


def _bicubic_aa(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, the filter torch (and Pillow) use for antialiased bicubic."""
    a = np.float32(-0.5)
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(np.float32)


@functools.cache
def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index per output index (out,), weights (out, taps)) of one axis, in float32
    as torch computes them: scale = in/out, a support of 2 * scale (2 when enlarging), the window's
    start and length truncated as in C, weights normalised to sum 1, zero past the window's end."""
    scale = np.float32(in_size) / np.float32(out_size)
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    center = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
    starts = np.maximum(np.trunc(center - support + np.float32(0.5)).astype(np.int64), 0)
    stops = np.minimum(np.trunc(center + support + np.float32(0.5)).astype(np.int64), in_size)
    taps = int((stops - starts).max())
    offsets = np.arange(taps, dtype=np.float32)
    weights = _bicubic_aa((offsets[None, :] + (starts - center)[:, None] + np.float32(0.5)) * invscale)
    weights[offsets[None, :] >= (stops - starts)[:, None]] = 0
    total = weights.sum(axis=1, keepdims=True, dtype=np.float32)
    weights = np.where(total != 0, weights / np.where(total != 0, total, 1), weights).astype(np.float32)
    return starts.astype(np.int32), weights


if triton is not None:

    @triton.jit
    def _round_to_uint8(value):
        """Clamp to 0..255 and round half to even, as `clamp_(0, 255).round_()` then the uint8 cast."""
        value = tl.minimum(tl.maximum(value, 0.0), 255.0)
        rounded = tl.floor(value + 0.5)
        tie_to_odd = ((rounded - value) == 0.5) & ((rounded % 2.0) == 1.0)
        return tl.where(tie_to_odd, rounded - 1.0, rounded).to(tl.uint8)

    @triton.jit
    def _add_tap(acc, src, WEIGHTS, start, k, rows, cols, inside, in_len, out_rows, out_cols,
                 stride_row, stride_col, TAPS: tl.constexpr, ALONG_ROWS: tl.constexpr):
        """acc + tap k's weight times its input pixel, for each output pixel of the tile."""
        index = start + k
        if ALONG_ROWS:
            weight = tl.load(WEIGHTS + cols * TAPS + k, mask=cols < out_cols, other=0.0)
            pixel = tl.load(src + rows[:, None] * stride_row + index[None, :] * stride_col,
                            mask=inside & (index < in_len)[None, :], other=0)
            return acc + pixel.to(tl.float32) * weight[None, :]
        else:
            weight = tl.load(WEIGHTS + rows * TAPS + k, mask=rows < out_rows, other=0.0)
            pixel = tl.load(src + index[:, None] * stride_row + cols[None, :] * stride_col,
                            mask=inside & (index < in_len)[:, None], other=0)
            return acc + pixel.to(tl.float32) * weight[:, None]

    @triton.jit
    def _resample_kernel(
        SRC, DST, STARTS, WEIGHTS,
        channels, in_len, out_rows, out_cols,
        stride_n, stride_c, stride_row, stride_col,
        TAPS: tl.constexpr, ALONG_ROWS: tl.constexpr, TO_UINT8: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MAX_UNROLLED_TAPS: tl.constexpr,
    ):
        """One plane's tile of DST (planes, out_rows, out_cols), resampled from SRC along its columns
        (ALONG_ROWS: each row is resampled, in_len -> out_cols) or along its rows (in_len -> out_rows)."""
        plane = tl.program_id(0).to(tl.int64)  # a whole long clip's offsets pass 2**31
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows < out_rows)[:, None] & (cols < out_cols)[None, :]
        src = SRC + (plane // channels) * stride_n + (plane % channels) * stride_c
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        if ALONG_ROWS:
            start = tl.load(STARTS + cols, mask=cols < out_cols, other=0)
        else:
            start = tl.load(STARTS + rows, mask=rows < out_rows, other=0)
        if TAPS <= MAX_UNROLLED_TAPS:
            for k in tl.static_range(TAPS):
                acc = _add_tap(acc, src, WEIGHTS, start, k, rows, cols, inside, in_len, out_rows, out_cols,
                               stride_row, stride_col, TAPS, ALONG_ROWS)
        else:  # strong shrinking (taps grow as 4 * in/out): a loop, not hundreds of unrolled loads
            for k in range(TAPS):
                acc = _add_tap(acc, src, WEIGHTS, start, k, rows, cols, inside, in_len, out_rows, out_cols,
                               stride_row, stride_col, TAPS, ALONG_ROWS)
        out = _round_to_uint8(acc) if TO_UINT8 else acc
        tl.store(DST + plane * out_rows * out_cols + rows[:, None] * out_cols + cols[None, :], out, mask=inside)


@functools.cache
def _device_axis_weights(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    starts, weights = axis_weights(in_size, out_size)
    return torch.from_numpy(starts).to(device), torch.from_numpy(weights).to(device)


def _resample(src: torch.Tensor, out_size: int, along_rows: bool, to_uint8: bool, out: torch.Tensor | None = None):
    """One pass over (N, C, H, W) `src`: resample W (along_rows) or H to `out_size`."""
    n, c, h, w = src.shape
    in_len = w if along_rows else h
    starts, weights = _device_axis_weights(in_len, out_size, src.device)
    rows, cols = (h, out_size) if along_rows else (out_size, w)
    if out is None:
        out = torch.empty((n, c, rows, cols), dtype=torch.uint8 if to_uint8 else torch.float32, device=src.device)
    grid = (n * c, triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    # Triton launches on the current device: frames on another GPU must make theirs current
    with torch.cuda.device(src.device) if src.is_cuda else contextlib.nullcontext():
        _resample_kernel[grid](
            src, out, starts, weights, c, in_len, rows, cols, *src.stride(),
            TAPS=weights.shape[1], ALONG_ROWS=along_rows, TO_UINT8=to_uint8, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS,
            MAX_UNROLLED_TAPS=MAX_UNROLLED_TAPS,
        )
    return out


def resize_uint8_frames(frames: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) uint8 frames, any strides -> (N, C, height, width) uint8: the function of
    `F.interpolate(frames.float(), size, mode="bicubic", antialias=True)` clamped and rounded, within
    float rounding. The result is a new contiguous tensor, or `out` (contiguous, uint8, on the frames'
    device) when given; at the frames' own size and without `out`, the frames themselves."""
    height, width = int(size[0]), int(size[1])
    if triton is None:
        raise RuntimeError("resize_uint8_frames needs Triton, which is not installed")
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be an (N, C, H, W) uint8 tensor, got {tuple(frames.shape)} {frames.dtype}")
    expected = (*frames.shape[:2], height, width)
    if out is not None and (not out.is_contiguous() or out.shape != expected or out.dtype != torch.uint8
                            or out.device != frames.device):
        raise ValueError(f"out must be a contiguous uint8 {expected} tensor on {frames.device}")
    change_width, change_height = frames.shape[3] != width, frames.shape[2] != height
    if not change_width and not change_height:
        return frames if out is None else out.copy_(frames)
    if change_width:
        frames = _resample(frames, width, along_rows=True, to_uint8=not change_height,
                           out=None if change_height else out)
    if change_height:
        frames = _resample(frames, height, along_rows=False, to_uint8=True, out=out)
    return frames
