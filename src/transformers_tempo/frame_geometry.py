"""Frame geometry shared by video loading and video processing: the sizes of Tempo's resize chain
and the bicubic kernels that produce them (see `video_processing_tempo` for the chain itself).

A low module: it imports only the leaf `resize_kernels` from the package, so the loader can shrink
frames while decoding exactly as the processor would, without the two modules importing each other.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .resize_kernels import resize_uint8_frames, triton_resize_applies

__all__ = [
    "RESIZE_BACKENDS",
    "fetch_image_size",
    "longer_edge_size",
    "qwen_vl_utils_smart_resize",
    "resize_frames",
    "resize_frames_pil",
    "upload_and_resize",
    "video_frame_sizes",
]

# How many frames one interpolate call handles; bounds the float32 scratch memory.
RESIZE_CHUNK_FRAMES = 64
# Kernels for steps (a) and (b): torch's uint8 kernel (fast), or PIL's (the reference's, exact).
RESIZE_BACKENDS = ("torch", "pil")
# On CUDA with Triton, resize uint8 frames with `resize_kernels` (two separable passes, no float
# copy of the frames) rather than F.interpolate on a float32 copy: the same function within float
# rounding. False keeps F.interpolate (for comparison in benchmarks).
TRITON_RESIZE = True


# ----------------------------------------------------------------------------------------
# sizes


def longer_edge_size(height: int, width: int, limit: int = 512, multiple: int = 16) -> tuple[int, int]:
    """Step (a): the size after Tempo's longer-edge resize (unchanged if already small enough)."""
    longer = max(height, width)
    if longer <= limit:
        return height, width
    ratio = limit / longer
    new_height = max(multiple, int(round((height * ratio) / multiple) * multiple))
    new_width = max(multiple, int(round((width * ratio) / multiple) * multiple))
    return new_height, new_width


def qwen_vl_utils_smart_resize(
    height: int, width: int, factor: int, min_pixels: float, max_pixels: float, max_ratio: float = 200
) -> tuple[int, int]:
    """`smart_resize` of qwen-vl-utils 0.0.14 (Python `round`, i.e. half to even)."""
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ValueError(f"cannot resize a {width}x{height} frame within {min_pixels}..{max_pixels} pixels")
    return h_bar, w_bar


def fetch_image_size(
    height: int, width: int, factor: int = 64, min_tokens: int = 4, max_tokens: int = 16384
) -> tuple[int, int]:
    """Step (b): qwen-vl-utils 0.0.14 `fetch_image` as `fetch_video` calls it for a list of frames.

    `fetch_video` passes its image factor (16 * 2 = 32) as `fetch_image`'s patch size, which
    doubles it again: the factor is 64 and the pixel bounds are 4 and 16384 blocks of 64x64.
    """
    return qwen_vl_utils_smart_resize(
        height, width, factor, min_pixels=min_tokens * factor * factor, max_pixels=max_tokens * factor * factor
    )


def video_frame_sizes(
    height: int,
    width: int,
    num_frames: int = 8,
    longest_edge: int = 512,
    longest_edge_multiple: int = 16,
    frame_factor: int = 64,
    video_factor: int = 32,
    video_min_pixels: int = 128 * 32 * 32,
    video_max_pixels: int = 768 * 32 * 32,
    video_total_pixels: float = 128000 * 32 * 32 * 0.9,
    temporal_patch_size: int = 2,
    max_ratio: float = 200,
) -> list[tuple[int, int]]:
    """(height, width) after steps (a), (b) and (c) for a segment of `num_frames` (padded) frames."""
    size_a = longer_edge_size(height, width, longest_edge, longest_edge_multiple)
    size_b = fetch_image_size(*size_a, factor=frame_factor)
    max_pixels = max(
        min(video_max_pixels, video_total_pixels / num_frames * temporal_patch_size), int(video_min_pixels * 1.05)
    )
    size_c = qwen_vl_utils_smart_resize(
        *size_b, factor=video_factor, min_pixels=video_min_pixels, max_pixels=max_pixels, max_ratio=max_ratio
    )
    return [size_a, size_b, size_c]


# ----------------------------------------------------------------------------------------
# resizing


def resize_frames(
    frames: torch.Tensor, size: tuple[int, int], like_pil: bool = True, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bicubic antialiased resize of a (N, C, H, W) uint8 stack to `size` = (height, width).

    like_pil=True: on CPU torch's uint8 kernel (a port of Pillow's, within 1 grey level of PIL
    BICUBIC); elsewhere float32, clamped and rounded. like_pil=False: always the float32 path,
    which is exactly torchvision's `transforms.functional.resize` on a uint8 tensor (what
    qwen-vl-utils calls for step (c)). On CUDA the float32 path runs as `resize_kernels`' Triton
    passes when Triton is installed. `out`: a contiguous tensor of the result's shape to write to.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) uint8 tensor, got {tuple(frames.shape)} {frames.dtype}")
    size = (int(size[0]), int(size[1]))
    if tuple(frames.shape[-2:]) == size:
        return frames if out is None else out.copy_(frames)
    if out is None:
        out = torch.empty((frames.shape[0], frames.shape[1], *size), dtype=torch.uint8, device=frames.device)
    kernels = TRITON_RESIZE and triton_resize_applies(frames)
    native_uint8 = like_pil and frames.device.type == "cpu"
    # A chunk at a time bounds the scratch memory: float32 copies here, the kernels' float32 rows
    # (4 bytes per frame, channel, input row and output column: 18 GB for 4096 frames of 1280x720).
    for start in range(0, frames.shape[0], RESIZE_CHUNK_FRAMES):
        chunk = frames[start : start + RESIZE_CHUNK_FRAMES]
        target = out[start : start + chunk.shape[0]]
        if kernels:
            resize_uint8_frames(chunk, size, out=target)
        elif native_uint8:
            target.copy_(F.interpolate(chunk, size=size, mode="bicubic", align_corners=False, antialias=True))
        else:
            resized = F.interpolate(chunk.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
            target.copy_(resized.clamp_(0, 255).round_().to(torch.uint8))
    return out


def upload_and_resize(
    frames: torch.Tensor, device: str | torch.device, sizes: list[tuple[int, int]], chunk: int = RESIZE_CHUNK_FRAMES
) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, h, w) uint8 on `device`, resized through `sizes` in turn.

    The same function as moving all frames, then `resize_frames` for each size, done `chunk` frames
    at a time; pinned frames going to CUDA are copied on a side stream, so the next chunk's copy
    overlaps this chunk's resizing.
    """
    device = torch.device(device)
    num_frames = frames.shape[0]
    out_size = sizes[-1] if sizes else tuple(frames.shape[1:3])
    out = torch.empty((num_frames, 3, *out_size), dtype=torch.uint8, device=device)
    # Pinned (page-locked) frames, as load_video(pin_memory=True) gives, go up asynchronously on a
    # side stream, overlapping the resizing of the previous chunk; pageable ones are copied as they come.
    async_copy = device.type == "cuda" and frames.device.type == "cpu" and frames.is_pinned()
    if async_copy:
        copy_stream = torch.cuda.Stream(device)
        compute_stream = torch.cuda.current_stream(device)
    for start in range(0, num_frames, chunk):
        piece = frames[start : start + chunk]
        if not async_copy:
            piece = piece.to(device)
        else:
            with torch.cuda.stream(copy_stream):
                piece = piece.to(device, non_blocking=True)
            compute_stream.wait_stream(copy_stream)
            piece.record_stream(compute_stream)
        piece = piece.permute(0, 3, 1, 2)
        for size in sizes[:-1]:
            piece = resize_frames(piece, size, like_pil=True)
        resize_frames(piece, out_size, like_pil=True, out=out[start : start + piece.shape[0]])
    return out


def resize_frames_pil(frames: Any, sizes: list[tuple[int, int]], num_workers: int | None = None) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames (CPU) -> (T, 3, h, w) uint8, each frame resized through `sizes`
    in turn with PIL's bicubic filter, as the reference does for steps (a) and (b).

    A step whose size is the frame's own is skipped (PIL then returns a copy, the same pixels).
    Frames are spread over `num_workers` threads (default: torch's intra-op thread count);
    Pillow releases the GIL while it resamples, so they run in parallel.
    """
    from PIL import Image

    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    out_size = tuple(sizes[-1]) if sizes else tuple(frames.shape[1:3])
    out = np.empty((frames.shape[0], *out_size, 3), dtype=np.uint8)

    def resize_one(i: int) -> None:
        image = Image.fromarray(np.ascontiguousarray(frames[i]))
        for height, width in sizes:
            if image.size != (width, height):
                image = image.resize((int(width), int(height)), resample=Image.Resampling.BICUBIC)
        out[i] = np.asarray(image)

    workers = max(1, min(num_workers or torch.get_num_threads(), frames.shape[0]))
    if workers == 1:
        for i in range(frames.shape[0]):
            resize_one(i)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="resize_pil") as pool:
            list(pool.map(resize_one, range(frames.shape[0])))
    return torch.from_numpy(out).permute(0, 3, 1, 2)
