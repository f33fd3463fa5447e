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

Bicubic kernels. Steps (a) and (b) use PIL in the reference. Two backends, `resize_backend`:

* "torch" (default): torch's uint8 antialiased bicubic kernel on CPU, a port of Pillow's: on a
  natural photo it differs from PIL by at most 1 grey level on 0.04-0.2 % of the values (mean
  abs difference <= 0.003), and it runs on the whole stack of frames at once, several times
  faster than PIL (benchmarks/results/README.md). On CUDA (no uint8 kernel there) the same
  resize runs in float32, clamped and rounded; that differs from PIL by at most 3 grey levels
  (mean abs difference ~0.15-0.19).
* "pil": PIL's bicubic resize, frame by frame, exactly as the reference calls it, so the pixels
  equal the reference's bit for bit (step (c) then runs on the CPU too, as in the reference).
  For reproducing published numbers.

Step (c) and the single-image path use exactly the kernels the reference uses (torchvision's
float path for (c); torchvision's uint8 path, i.e. torch's uint8 kernel, for images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2vl_image_smart_resize
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from .frame_geometry import (  # noqa: F401  (re-exported: their public home before frame_geometry)
    RESIZE_BACKENDS,
    RESIZE_CHUNK_FRAMES,
    fetch_image_size,
    longer_edge_size,
    qwen_vl_utils_smart_resize,
    resize_frames,
    resize_frames_pil,
    upload_and_resize,
    video_frame_sizes,
)
from .video_loading import LoadedVideo, TempoVideoMetadata, compute_sample_indices, load_video
from .video_sampling import patch_times, segment_seconds

__all__ = [
    "TempoVideoProcessor",
    "VideoSegment",
    "fetch_image_size",
    "longer_edge_size",
    "qwen_vl_utils_smart_resize",
    "resize_frames",
    "resize_frames_pil",
    "segment_frames",
    "video_frame_sizes",
]

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
    """The attributes of `TempoVideoProcessor`, each also accepted by `from_pretrained`.

    Transformers' `VideosKwargs` is not extended on purpose: its resize / crop / rescale switches
    have no meaning here (the chain is fixed), and listing them would save options that do nothing.
    """

    do_sample_frames: bool
    fps: float
    num_frames: int | None
    min_frames: int
    max_frames: int
    resize_backend: str
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


class TempoVideoProcessor(BaseVideoProcessor):
    """Turns sampled frames into the compressor's `pixel_values_videos` / `video_grid_thw`.

    A transformers `BaseVideoProcessor` (no torchvision needed): saved with `save_pretrained` as
    ``video_preprocessor_config.json`` (inside ``processor_config.json`` when part of a
    processor), loaded with `from_pretrained` or `AutoVideoProcessor` (model type "tempo").
    Every number of the released preprocessing is an attribute, with the released value as
    default.

    Frame sampling is exposed as in transformers' video processors: `do_sample_frames`, `fps`,
    `num_frames` (instead of `fps`: that many frames, evenly spread), `min_frames`, `max_frames`
    and `sample_frames(metadata)`, which returns the indices Tempo decodes.

    `resize_backend`: "torch" (default, fast) or "pil" (the reference's PIL bicubic for the first
    two resizes: `pixel_values_videos` equal the released ones bit for bit; for reproducing
    published benchmark numbers). See the module docstring.
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
        resize_backend: str = "torch",
        do_sample_frames: bool = True,
        num_frames: int | None = None,
        **kwargs,
    ):
        for key in ("video_processor_type", "image_processor_type", "processor_class", "_valid_kwargs_names"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.do_sample_frames = bool(do_sample_frames)
        self.fps = float(fps)
        self.num_frames = _positive_int_or_none(num_frames, "num_frames")
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        self.resize_backend = _check_resize_backend(resize_backend)
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

    # -- frame sampling -------------------------------------------------------------------

    def sample_frames(
        self,
        metadata: VideoMetadata | dict,
        num_frames: int | None = None,
        fps: float | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Indices of the frames Tempo samples from a video described by `metadata`.

        Tempo's rule (the released one, `compute_sample_indices`): ``n = round(duration * fps)``
        clamped to [min_frames, max_frames], indices ``round(linspace(0, total - 1, n))``. With
        `num_frames` (argument or attribute) exactly that many frames instead; `num_frames` and
        `fps` given together are an error, as in transformers.

        Args:
            metadata: a `VideoMetadata` or dict with `total_num_frames` and `fps` (the source's).
            num_frames: number of frames to sample (default: the attribute, None).
            fps: sampling rate (default: the attribute, 2.0).
        """
        total = metadata.get("total_num_frames")
        if total is None or int(total) < 1:
            raise ValueError(f"video metadata total_num_frames must be a positive number, got {total}")
        fps, min_frames, max_frames = self._sampling(num_frames, fps)
        indices = compute_sample_indices(int(total), metadata.get("fps") or fps, fps, min_frames, max_frames)
        return np.asarray(indices, dtype=np.int64)

    def _sampling(self, num_frames: int | None, fps: float | None) -> tuple[float, int, int]:
        """(fps, min_frames, max_frames) of Tempo's sampling rule for these call arguments: a
        number of frames (the argument, else the attribute unless `fps` is given) is the rule
        with min_frames = max_frames = that number."""
        if fps is not None and num_frames is not None:
            raise ValueError("num_frames and fps are mutually exclusive: give one of them")
        if fps is None and num_frames is None:
            num_frames = self.num_frames
        num_frames = _positive_int_or_none(num_frames, "num_frames")
        fps = float(fps) if fps is not None else self.fps
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps}")
        if num_frames is not None:
            return fps, num_frames, num_frames
        return fps, self.min_frames, self.max_frames

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
        resize_backend: str | None = None,
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
            resize_backend: "torch" or "pil" (default: the attribute). With "pil" the three
                resizes run on the CPU as in the reference, and only the normalisation and the
                patch layout run on `device`.

        Returns a dict with
            pixel_values_videos: float32 (sum of patches, 1536);
            video_grid_thw: int64 (S, 3) on the CPU, one row (t, h/16, w/16) per segment, as
                transformers' video processors return it (reading it needs no device sync);
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
        backend = _check_resize_backend(resize_backend or self.resize_backend)
        if backend == "pil":
            clip = resize_frames_pil(frames, [size_a, size_b])
        elif device is not None and torch.device(device) != frames.device:
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
            if backend == "pil":  # resized on the CPU; normalising is exact on any device, resizing is not
                resized = resized.to(torch.device(device) if device is not None else frames.device)
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
            "video_grid_thw": grid,
            "segment_frame_timestamps": [
                patch_times(seg.start, len(seg.timestamp_indices) // self.temporal_patch_size, real_fps,
                            self.temporal_patch_size)
                for seg in segments
            ],
            "segment_centers": [segment_seconds(i, per_segment, num_frames, real_fps)[2] for i in range(len(segments))],
            "frame_size": (int(frame_size[0]), int(frame_size[1])),
        }

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
        order_index = torch.tensor(order, device=frames.device)  # one copy up, not one per chunk
        for start in range(0, len(order), chunk):
            picked = frames[order_index[start : start + chunk]]
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
        resize_backend: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """One image -> `pixel_values` (h/16 * w/16, 1536) and `image_grid_thw` (1, 3).

        As the released code does for a single image: Qwen3-VL's image processor with its
        Qwen3-VL-2B-Instruct settings (smart_resize with factor 32, 65536..16777216 pixels,
        bicubic, mean/std 0.5) and the frame repeated to fill the temporal patch. The released
        code shrinks images to a 512 longer edge only when several images are given at once;
        `resize_longer_edge=True` applies that step (a) first, with PIL's bicubic as the released
        code when `resize_backend` (default: the attribute) is "pil".
        """
        backend = _check_resize_backend(resize_backend or self.resize_backend)
        array = _image_to_array(image)
        if not array.flags.writeable:  # np.asarray(PIL image) is read-only; torch would warn on it
            array = array.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        if device is not None:
            pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if max(height, width) / min(height, width) > self.max_aspect_ratio:
            raise ValueError(f"image of {width}x{height} pixels: aspect ratio over {self.max_aspect_ratio}:1")
        if resize_longer_edge:
            size = longer_edge_size(height, width, self.longest_edge, self.longest_edge_multiple)
            if backend == "pil":
                pixels = resize_frames_pil(array[None], [size]).contiguous().to(pixels.device)
            else:
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
        video_metadata: VideoMetadata | dict | None = None,
        do_sample_frames: bool | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        resize_backend: str | None = None,
        device: str | torch.device | None = None,
        frames_per_segment: int | None = None,
        return_metadata: bool = False,
        return_tensors: Any = None,
        real_fps: float | None = None,
        **load_options,
    ) -> BatchFeature:
        """One video -> `BatchFeature` with the keys of :meth:`process_video`.

        Args:
            videos: a path, bytes or binary file object (decoded with `load_video`: only the
                sampled frames), a `LoadedVideo` (already sampled), or frames: a (T, H, W, 3)
                uint8 array / tensor or a list of images.
            video_metadata: for frames, their timing (`VideoMetadata` or dict with `fps`).
            do_sample_frames: default the attribute (True). As in transformers, frames given
                directly are then the whole video, sampled with `sample_frames` (their `fps` from
                `video_metadata`); False takes them as the sampled frames, at the metadata's fps.
                Files are always sampled (Tempo decodes only the sampled frames).
            fps, num_frames: sampling (defaults: the attributes; mutually exclusive).
            resize_backend: "torch" or "pil" (default: the attribute).
            device, frames_per_segment: as in :meth:`process_video`.
            return_metadata: add the video's `TempoVideoMetadata` as "video_metadata".
            real_fps: frames given with their frame rate: taken as sampled, no metadata needed.
            load_options: further options of `load_video` (`num_workers`, `num_threads`, `backend`:
                "auto", "pyav" or "nvdec", ...).
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"TempoVideoProcessor returns PyTorch tensors only; got return_tensors={return_tensors!r}")
        do_sample_frames = self.do_sample_frames if do_sample_frames is None else bool(do_sample_frames)
        resize_backend = _check_resize_backend(resize_backend or self.resize_backend)
        load_options.setdefault("resize_backend", resize_backend)  # for a `max_longer_edge` resize while loading
        given_frames = isinstance(videos, (np.ndarray, torch.Tensor, list, tuple))
        if real_fps is not None and given_frames:
            videos = load_video(videos, video_metadata={"fps": real_fps}, **load_options)
        elif given_frames:
            videos = load_video(videos, video_metadata=video_metadata, **load_options)
            if do_sample_frames:
                videos = self._sample_loaded(videos, num_frames=num_frames, fps=fps)
        elif not isinstance(videos, LoadedVideo):
            if not do_sample_frames:
                raise ValueError(
                    "do_sample_frames=False needs decoded frames: a video file is always sampled "
                    "(only the sampled frames are decoded)"
                )
            fps, min_frames, max_frames = self._sampling(num_frames, fps)
            sampling = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
            videos = load_video(videos, **sampling, **load_options)
        out = self.process_video(
            videos, real_fps, device=device, frames_per_segment=frames_per_segment, resize_backend=resize_backend
        )
        if return_metadata:
            out["video_metadata"] = videos.metadata
        return BatchFeature(data=out)

    def _sample_loaded(self, video, num_frames: int | None = None, fps: float | None = None):
        """Frames given as a whole video -> the frames `sample_frames` picks, with their metadata."""
        metadata = video.metadata
        indices = self.sample_frames(metadata, num_frames=num_frames, fps=fps)
        duration = metadata.total_num_frames / metadata.fps
        sampled = TempoVideoMetadata(
            total_num_frames=metadata.total_num_frames,
            fps=metadata.fps,
            width=metadata.width,
            height=metadata.height,
            duration=duration,
            video_backend=metadata.video_backend,
            frames_indices=indices.tolist(),
            real_fps=len(indices) / duration,
            warnings=list(metadata.warnings),
            stats=dict(metadata.stats),
        )
        return LoadedVideo(video.frames[torch.from_numpy(indices)], sampled)


def register_video_processor() -> None:
    """Register `TempoVideoProcessor` with `AutoVideoProcessor` for model type "tempo".

    Through the auto module's class: transformers' top-level `AutoVideoProcessor` name is a
    placeholder that raises without torchvision, while the class itself (and loading a Tempo
    video processor through it) needs no torchvision.
    """
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    from .configuration_tempo import TempoConfig

    AutoVideoProcessor.register(TempoConfig, TempoVideoProcessor, exist_ok=True)


register_video_processor()


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


def _check_resize_backend(value: Any) -> str:
    if value not in RESIZE_BACKENDS:
        raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {value!r}")
    return value


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)
