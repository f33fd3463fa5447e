"""Frames -> Qwen3-VL patches, the way the released Tempo prepares them (torch only, CPU or CUDA).

The released code (docs/released-model.md, "Video in", steps 2-5) sends every 8-frame segment
through qwen-vl-utils 0.0.14 and transformers' Qwen3-VL video processor. For one video that
is the chain below, applied here to the whole clip at once (all segments share a frame size):

(a) longer edge to 512 if larger, each side ``max(16, round(side * 512 / longer / 16) * 16)``
    (PIL bicubic in the reference);
(b) each side to a multiple of 64: qwen-vl-utils ``fetch_image`` = ``smart_resize(factor=64,
    min_pixels=4*64*64, max_pixels=16384*64*64)`` (PIL bicubic);
(c) the clip to ``smart_resize(factor=32, min_pixels=128*32*32, max_pixels=max(min(768*32*32,
    total_pixels / nframes * 2), int(min_pixels * 1.05)))`` with qwen-vl-utils' default
    ``total_pixels = MODEL_SEQ_LEN * 32 * 32 * 0.9`` and ``MODEL_SEQ_LEN = 128000`` (an
    environment variable there; fixed here so that a saved processor means one thing);
    torchvision bicubic with antialias on float, clamped and rounded back to uint8;
then rescale 1/255, normalise with mean 0.5 / std 0.5 (fused, as transformers does it) and
lay out Qwen3-VL patches: patch 16, temporal patch 2, merge 2 -> rows of 3*2*16*16 = 1536.

Bicubic kernels. Steps (a) and (b) use PIL in the reference. On CPU we use torch's uint8
antialiased bicubic kernel, which is a port of Pillow's: on a natural photo it differs from
PIL by at most 1 grey level on 0.04-0.2 % of the values (mean abs difference <= 0.003), and it
is about 12x faster than PIL and runs on the whole stack of frames at once. On CUDA (no uint8
kernel there) the same resize runs in float32, clamped and rounded; that differs from PIL by at
most 3 grey levels (mean abs difference ~0.15-0.19). Step (c) and the single-image path use
exactly the kernels the reference uses (torchvision's float path for (c); torchvision's uint8
path, i.e. torch's uint8 kernel, for images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2vl_image_smart_resize
from transformers.video_processing_utils import VideoProcessorMixin

__all__ = [
    "TempoVideoProcessor",
    "VideoSegment",
    "fetch_image_size",
    "longer_edge_size",
    "qwen_vl_utils_smart_resize",
    "resize_frames",
    "segment_frames",
    "video_frame_sizes",
]

# How many frames one interpolate call handles; bounds the float32 scratch memory.
RESIZE_CHUNK_FRAMES = 64


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


def resize_frames(frames: torch.Tensor, size: tuple[int, int], like_pil: bool = True) -> torch.Tensor:
    """Bicubic antialiased resize of a (N, C, H, W) uint8 stack to `size` = (height, width).

    like_pil=True: on CPU torch's uint8 kernel (a port of Pillow's, within 1 grey level of PIL
    BICUBIC); elsewhere float32, clamped and rounded. like_pil=False: always the float32 path,
    which is exactly torchvision's `transforms.functional.resize` on a uint8 tensor (what
    qwen-vl-utils calls for step (c)).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) uint8 tensor, got {tuple(frames.shape)} {frames.dtype}")
    size = (int(size[0]), int(size[1]))
    if tuple(frames.shape[-2:]) == size:
        return frames
    out = torch.empty((frames.shape[0], frames.shape[1], *size), dtype=torch.uint8, device=frames.device)
    native_uint8 = like_pil and frames.device.type == "cpu"
    for start in range(0, frames.shape[0], RESIZE_CHUNK_FRAMES):
        chunk = frames[start : start + RESIZE_CHUNK_FRAMES]
        if native_uint8:
            out[start : start + chunk.shape[0]] = F.interpolate(
                chunk, size=size, mode="bicubic", align_corners=False, antialias=True
            )
        else:
            resized = F.interpolate(chunk.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
            out[start : start + chunk.shape[0]] = resized.clamp_(0, 255).round_().to(torch.uint8)
    return out


def upload_and_resize(
    frames: torch.Tensor, device: str | torch.device, sizes: list[tuple[int, int]], chunk: int = RESIZE_CHUNK_FRAMES
) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, h, w) uint8 on `device`, resized through `sizes` in turn.

    The same function as moving all frames, then `resize_frames` for each size, done `chunk` frames
    at a time; on CUDA the copies run on a side stream so the next chunk's copy overlaps this
    chunk's resizing.
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
        for size in sizes:
            piece = resize_frames(piece, size, like_pil=True)
        out[start : start + piece.shape[0]] = piece
    return out


# ----------------------------------------------------------------------------------------
# segments


@dataclass(frozen=True)
class VideoSegment:
    """One compressor segment.

    Attributes:
        start: position of its first frame in the sampled sequence.
        frames: positions in the sampled sequence of its frames, padding included (repeats).
        timestamp_indices: the frame indices its timestamps are computed from (absolute; a
            padding frame takes the next index, not its source's).
    """

    start: int
    frames: tuple[int, ...]
    timestamp_indices: tuple[int, ...]

    @property
    def num_padding(self) -> int:
        return len(self.frames) - len(set(self.frames))


def segment_frames(num_frames: int, frames_per_segment: int = 8) -> list[VideoSegment]:
    """Cut `num_frames` sampled frames into segments of `frames_per_segment`, stride the same.

    A segment with an odd number of frames (the single-frame last segment included) is padded
    to an even length by repeating its last frame, as Tempo and qwen-vl-utils do.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if frames_per_segment < 1:
        raise ValueError(f"frames_per_segment must be >= 1, got {frames_per_segment}")
    segments = []
    for start in range(0, num_frames, frames_per_segment):
        frames = list(range(start, min(start + frames_per_segment, num_frames)))
        if len(frames) % 2:
            frames.append(frames[-1])
        segments.append(
            VideoSegment(
                start=start,
                frames=tuple(frames),
                timestamp_indices=tuple(start + j for j in range(len(frames))),
            )
        )
    return segments


# ----------------------------------------------------------------------------------------
# the processor


class TempoVideoProcessorKwargs(TypedDict, total=False):
    fps: float
    min_frames: int
    max_frames: int
    longest_edge: int
    longest_edge_multiple: int
    frame_factor: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: float
    image_min_pixels: int
    image_max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    frames_per_segment: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    max_aspect_ratio: float


class TempoVideoProcessor(VideoProcessorMixin):
    """Turns sampled frames into the compressor's `pixel_values_videos` / `video_grid_thw`.

    Saved with `save_pretrained` (as ``video_preprocessor_config.json``, or inside
    ``processor_config.json`` when part of a processor) and loaded with `from_pretrained`.
    Every number of the released preprocessing is an attribute, with the released value as
    default.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    valid_kwargs = TempoVideoProcessorKwargs

    def __init__(
        self,
        fps: float = 2.0,
        min_frames: int = 8,
        max_frames: int = 1024,
        longest_edge: int = 512,
        longest_edge_multiple: int = 16,
        frame_factor: int = 64,
        video_min_pixels: int = 128 * 32 * 32,
        video_max_pixels: int = 768 * 32 * 32,
        video_total_pixels: float = 128000 * 32 * 32 * 0.9,
        image_min_pixels: int = 65536,
        image_max_pixels: int = 16777216,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        frames_per_segment: int = 8,
        rescale_factor: float = 1 / 255,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_aspect_ratio: float = 200,
        **kwargs,
    ):
        for key in ("video_processor_type", "image_processor_type", "processor_class", "_valid_kwargs_names"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.fps = float(fps)
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        self.longest_edge = int(longest_edge)
        self.longest_edge_multiple = int(longest_edge_multiple)
        self.frame_factor = int(frame_factor)
        self.video_min_pixels = int(video_min_pixels)
        self.video_max_pixels = int(video_max_pixels)
        self.video_total_pixels = float(video_total_pixels)
        self.image_min_pixels = int(image_min_pixels)
        self.image_max_pixels = int(image_max_pixels)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.frames_per_segment = int(frames_per_segment)
        self.rescale_factor = float(rescale_factor)
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.max_aspect_ratio = float(max_aspect_ratio)

    # -- sizes ---------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """Side multiple of the compressor input (patch size x merge size = 32)."""
        return self.patch_size * self.merge_size

    def frame_sizes(self, height: int, width: int, num_frames: int = 8) -> list[tuple[int, int]]:
        """(height, width) after each resize step for a segment of `num_frames` padded frames."""
        return video_frame_sizes(
            height,
            width,
            num_frames=num_frames,
            longest_edge=self.longest_edge,
            longest_edge_multiple=self.longest_edge_multiple,
            frame_factor=self.frame_factor,
            video_factor=self.factor,
            video_min_pixels=self.video_min_pixels,
            video_max_pixels=self.video_max_pixels,
            video_total_pixels=self.video_total_pixels,
            temporal_patch_size=self.temporal_patch_size,
            max_ratio=self.max_aspect_ratio,
        )

    def segment_grids(
        self, num_frames: int, height: int, width: int, frames_per_segment: int | None = None
    ) -> torch.Tensor:
        """The `video_grid_thw` that `process_video` gives for `num_frames` sampled frames of
        height x width, without any pixels: one row (t, h/16, w/16) per segment."""
        per_segment = int(frames_per_segment or self.frames_per_segment)
        by_length: dict[int, list[int]] = {}  # at most two segment lengths: full and the last one
        rows = []
        for segment in segment_frames(num_frames, per_segment):
            length = len(segment.frames)
            if length not in by_length:
                size_c = self.frame_sizes(height, width, num_frames=length)[2]
                t = length // self.temporal_patch_size
                by_length[length] = [t, size_c[0] // self.patch_size, size_c[1] // self.patch_size]
            rows.append(by_length[length])
        return torch.tensor(rows, dtype=torch.long)

    # -- videos --------------------------------------------------------------------------

    def process_video(
        self,
        frames: Any,
        real_fps: float | None = None,
        device: str | torch.device | None = None,
        frames_per_segment: int | None = None,
        dtype: torch.dtype | None = None,
        output_device: str | torch.device | None = None,
    ) -> dict[str, Any]:
        """Sampled frames of one video -> compressor inputs, one segment per `video_grid_thw` row.

        Args:
            frames: (T, H, W, 3) uint8 RGB tensor or array, or a `LoadedVideo` (then its
                `real_fps` is used unless given).
            real_fps: the frame rate of the sampled frames (timestamps are index / real_fps).
            device: where to do the work ("cuda" for the GPU); outputs stay there.
            frames_per_segment: segment length (default: the attribute, 8).
            dtype: dtype of `pixel_values_videos` (default float32); the model's dtype saves memory
                and a cast (the vision tower casts first thing, so the result is the same).
            output_device: where `pixel_values_videos` should end up (default: where the work ran).
                "cpu" with a CUDA `device`: made on the GPU, kept in pinned host memory, so GPU
                memory does not grow with the video's length (`compress` uploads chunk by chunk).

        Returns a dict with
            pixel_values_videos: float32 (sum of patches, 1536);
            video_grid_thw: int64 (S, 3), one row (t, h/16, w/16) per segment;
            segment_frame_timestamps: per segment, the time of each temporal patch (mean of
                its two frames' index / real_fps);
            segment_centers: per segment, (i * frames_per_segment + frames_per_segment / 2) / real_fps;
            frame_size: (H, W) of the frames reaching the compressor.
        """
        if hasattr(frames, "frames") and hasattr(frames, "real_fps"):
            real_fps = frames.real_fps if real_fps is None else real_fps
            frames = frames.frames
        frames = _as_uint8_video(frames)
        if real_fps is None or not math.isfinite(float(real_fps)) or float(real_fps) <= 0:
            raise ValueError(f"real_fps must be a positive number, got {real_fps}")
        real_fps = float(real_fps)
        per_segment = int(frames_per_segment or self.frames_per_segment)
        num_frames, height, width = frames.shape[:3]
        segments = segment_frames(num_frames, per_segment)
        size_a, size_b, _ = self.frame_sizes(height, width)
        if device is not None and torch.device(device) != frames.device:
            # Full-size frames never sit on the device all at once: they go over a chunk at a
            # time and are shrunk there (memory stays flat in video length, copies overlap resizing).
            clip = upload_and_resize(frames, device, (size_a, size_b))
        else:
            # (T, H, W, 3) -> (T, 3, H, W): a channels-last view, what the uint8 kernel likes best.
            clip = frames.permute(0, 3, 1, 2)
            clip = resize_frames(clip, size_a, like_pil=True)
            clip = resize_frames(clip, size_b, like_pil=True)

        # Step (c) depends on the segment length only through max_pixels, which binds only
        # for segments of hundreds of frames; group segments by their resulting size anyway.
        grid = self.segment_grids(num_frames, height, width, per_segment)
        groups: dict[tuple[int, int], list[int]] = {}
        for s, (_, gh, gw) in enumerate(grid.tolist()):
            groups.setdefault((gh * self.patch_size, gw * self.patch_size), []).append(s)

        patches_by_segment: list[torch.Tensor | None] = [None] * len(segments)
        for size_c, members in groups.items():
            resized = resize_frames(clip, size_c, like_pil=False)
            order = [i for s in members for i in segments[s].frames]
            patches = self._frames_to_patches(resized, order, dtype, output_device)  # members' rows, in order
            rows_per_frame_pair = (size_c[0] // self.patch_size) * (size_c[1] // self.patch_size)
            offset = 0
            for s in members:
                t = len(segments[s].frames) // self.temporal_patch_size
                patches_by_segment[s] = patches[offset : offset + t * rows_per_frame_pair]
                offset += t * rows_per_frame_pair
        if len(groups) == 1:
            pixel_values = patches  # already in segment order
        else:
            pixel_values = torch.cat(patches_by_segment, dim=0)
        frame_size = next(size for size, members in groups.items() if 0 in members)

        return {
            "pixel_values_videos": pixel_values,
            "video_grid_thw": grid.to(pixel_values.device),
            "segment_frame_timestamps": [self._patch_times(seg, real_fps) for seg in segments],
            "segment_centers": [(i * per_segment + per_segment / 2) / real_fps for i in range(len(segments))],
            "frame_size": (int(frame_size[0]), int(frame_size[1])),
        }

    def _patch_times(self, segment: VideoSegment, real_fps: float) -> list[float]:
        # As transformers' Qwen3VLProcessor._calculate_timestamps: times first, then the mean.
        times = [i / real_fps for i in segment.timestamp_indices]
        step = self.temporal_patch_size
        return [(times[k] + times[k + step - 1]) / 2 for k in range(0, len(times), step)]

    def _frames_to_patches(self, frames: torch.Tensor, order: list[int], dtype=None, output_device=None) -> torch.Tensor:
        """Normalise and patchify `frames[order]` ((N, 3, H, W) uint8, N even), a chunk of
        frames at a time into one preallocated output (the float copy of the whole clip is
        never held twice)."""
        height, width = frames.shape[-2:]
        tp = self.temporal_patch_size
        rows_per_step = (height // self.patch_size) * (width // self.patch_size)
        output_device = torch.device(output_device) if output_device is not None else frames.device
        to_host = output_device.type == "cpu" and frames.device.type == "cuda"
        out = torch.empty(
            (len(order) // tp * rows_per_step, 3 * tp * self.patch_size**2),
            dtype=dtype or torch.float32,
            device=output_device,
            pin_memory=to_host,
        )
        chunk = max(tp, RESIZE_CHUNK_FRAMES // tp * tp)
        for start in range(0, len(order), chunk):
            picked = frames[torch.tensor(order[start : start + chunk], device=frames.device)]
            rows = self._patchify(self._normalize(picked)).to(out.dtype)
            first = start // tp * rows_per_step
            out[first : first + rows.shape[0]].copy_(rows, non_blocking=to_host)
        if to_host:
            torch.cuda.synchronize(frames.device)  # the pinned copy is complete before anyone reads it
        return out

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 ((x - mean/scale) / (std/scale)), transformers' fused form."""
        mean = torch.tensor(self.image_mean, device=pixels.device) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std, device=pixels.device) * (1.0 / self.rescale_factor)
        out = pixels.to(torch.float32)
        return out.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    def _patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) with N a multiple of the temporal patch -> (N/2 * H/16 * W/16, C*2*16*16).

        Row order: temporal patch, then merge-window row, merge-window column, then the 2x2
        patches inside the window; each row holds (channel, time, y, x), as Qwen3-VL.
        """
        n, c, h, w = pixels.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if n % tp:
            raise ValueError(f"{n} frames is not a multiple of the temporal patch size {tp}")
        gt, gh, gw = n // tp, h // p, w // p
        x = pixels.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p)

    # -- images --------------------------------------------------------------------------

    def process_image(
        self,
        image: Any,
        device: str | torch.device | None = None,
        resize_longer_edge: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One image -> `pixel_values` (h/16 * w/16, 1536) and `image_grid_thw` (1, 3).

        As the released code does for a single image: Qwen3-VL's image processor with its
        Qwen3-VL-2B-Instruct settings (smart_resize with factor 32, 65536..16777216 pixels,
        bicubic, mean/std 0.5) and the frame repeated to fill the temporal patch. The released
        code shrinks images to a 512 longer edge only when several images are given at once;
        `resize_longer_edge=True` applies that step (a) first.
        """
        array = _image_to_array(image)
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        if device is not None:
            pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if max(height, width) / min(height, width) > self.max_aspect_ratio:
            raise ValueError(f"image of {width}x{height} pixels: aspect ratio over {self.max_aspect_ratio}:1")
        if resize_longer_edge:
            size = longer_edge_size(height, width, self.longest_edge, self.longest_edge_multiple)
            pixels = resize_frames(pixels, size)
            height, width = pixels.shape[-2:]
        size = qwen2vl_image_smart_resize(
            height, width, factor=self.factor, min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels
        )
        # torchvision v2 resizes uint8 CPU images with torch's uint8 kernel, like like_pil=True
        pixels = resize_frames(pixels, size, like_pil=True)
        pixels = self._normalize(pixels).expand(self.temporal_patch_size, -1, -1, -1)
        patches = self._patchify(pixels)
        grid = torch.tensor([[1, size[0] // self.patch_size, size[1] // self.patch_size]], dtype=torch.long)
        return {"pixel_values": patches, "image_grid_thw": grid.to(patches.device)}

    # -- transformers entry points ---------------------------------------------------------

    def __call__(self, videos: Any, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        real_fps: float | None = None,
        device: str | torch.device | None = None,
        frames_per_segment: int | None = None,
        return_tensors: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """One video (a `LoadedVideo`, frames with `real_fps`, or anything `load_video`
        accepts) -> `BatchFeature` with the keys of :meth:`process_video`."""
        if not (hasattr(videos, "frames") and hasattr(videos, "real_fps")) and real_fps is None:
            from .video_loading import load_video

            videos = load_video(
                videos, fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames, **kwargs
            )
        out = self.process_video(videos, real_fps=real_fps, device=device, frames_per_segment=frames_per_segment)
        return BatchFeature(data=out)


def _as_uint8_video(frames: Any) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"expected a (T, H, W, 3) uint8 tensor, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8 or frames.shape[0] < 1:
        raise ValueError(f"expected a (T, H, W, 3) uint8 tensor with T >= 1, got {tuple(frames.shape)} {frames.dtype}")
    return frames


def _image_to_array(image: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        from transformers.image_transforms import convert_to_rgb

        return np.asarray(convert_to_rgb(image, return_numpy=True))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    return image
