"""What loading a video gives: `LoadedVideo` (frames and metadata), `TempoVideoMetadata` (transformers'
`VideoMetadata` plus Tempo's sampled frame rate, warnings and decoding statistics), `FramesReady` (frames
reported while a file still decodes), `VideoLoadError`, and the frame sizes that are refused."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers.video_utils import VideoMetadata

# Frames whose longer side is over MAX_ASPECT_RATIO times the shorter one are refused (the
# Qwen3-VL resize refuses them too).
MAX_ASPECT_RATIO = 200


class VideoLoadError(ValueError):
    """A video could not be loaded; the message names the input and the problem."""


@dataclass
class TempoVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` of a sampled video, with what Tempo adds.

    The fields of `VideoMetadata` keep their transformers meaning: `total_num_frames` and `fps` are
    the source's, `frames_indices` the source index of each sampled frame (presentation order),
    `duration` is ``total_num_frames / fps``, `height` / `width` the size of the frames returned.
    Iterating over it (``dict(metadata)``, ``VideoMetadata(**metadata)``) gives those fields only,
    so it can go wherever transformers expects a `VideoMetadata`.

    Attributes:
        real_fps: frame rate of the sampled frames, ``len(frames_indices) / duration``; every
            Tempo timestamp is computed from it.
        warnings: everything that was guessed, repaired or worked around.
        stats: decoding statistics, empty for frames given directly: ``decoded_frames`` and ``seeks``
            (summed over the workers) and ``workers``. Each worker starts at the keyframe of its
            range, so several workers can decode fewer frames than one that decodes through the
            gaps between ranges (or a few more, where a seek lands early).

    The names this package used before (`source_fps`, `total_frames`, `frame_indices`) still work.
    """

    real_fps: float | None = None
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __iter__(self):
        return (f.name for f in fields(VideoMetadata))

    def __len__(self):
        return len(fields(VideoMetadata))

    source_fps = property(lambda self: self.fps, lambda self, value: setattr(self, "fps", value))
    total_frames = property(
        lambda self: self.total_num_frames, lambda self, value: setattr(self, "total_num_frames", value)
    )
    frame_indices = property(
        lambda self: self.frames_indices, lambda self, value: setattr(self, "frames_indices", value)
    )


class LoadedVideo:
    """Sampled frames of one video and their metadata.

    Attributes:
        frames: uint8 tensor (T, H, W, 3), RGB, upright (rotation metadata applied).
        metadata: a `TempoVideoMetadata` (transformers' `VideoMetadata` plus `real_fps`, `warnings`,
            `stats`).

    The metadata is also readable here under its old names: `real_fps`, `duration`,
    `frame_indices`, `source_fps` (the source's average frame rate), `total_frames` (of the
    source), `warnings` and `stats`; `LoadedVideo(frames, real_fps=..., ...)` with those names
    builds the metadata.
    """

    def __init__(
        self,
        frames: torch.Tensor,
        metadata: TempoVideoMetadata | None = None,
        *,
        real_fps: float | None = None,
        duration: float | None = None,
        frame_indices: list[int] | None = None,
        source_fps: float | None = None,
        total_frames: int | None = None,
        warnings: list[str] | None = None,
        stats: dict[str, int] | None = None,
        video_backend: str | None = None,
    ):
        self.frames = frames
        if metadata is None:
            metadata = TempoVideoMetadata(
                total_num_frames=total_frames,
                fps=source_fps,
                width=int(frames.shape[2]),
                height=int(frames.shape[1]),
                duration=duration,
                video_backend=video_backend,
                frames_indices=list(frame_indices) if frame_indices is not None else None,
                real_fps=real_fps,
                warnings=warnings if warnings is not None else [],
                stats=stats if stats is not None else {},
            )
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"LoadedVideo(frames={tuple(self.frames.shape)}, metadata={self.metadata!r})"

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    real_fps = property(lambda self: self.metadata.real_fps)
    duration = property(lambda self: self.metadata.duration)
    frame_indices = property(lambda self: self.metadata.frames_indices)
    source_fps = property(lambda self: self.metadata.fps)
    total_frames = property(lambda self: self.metadata.total_num_frames)
    warnings = property(lambda self: self.metadata.warnings)
    stats = property(lambda self: self.metadata.stats)


@dataclass
class FramesReady:
    """What `load_video(on_frames=...)` reports each time sampled frames land in the output buffer.

    Attributes:
        frames: the whole (T, H, W, 3) uint8 output buffer, still being filled; the rows listed in
            `slots` hold their frames now. A row can be reported again, later, when its content
            changed: a frame that could not be decoded is replaced by an earlier one at the end.
        slots: positions in the sampled sequence that were just written.
        real_fps: frame rate of the sampled frames (known before decoding starts).
    """

    frames: torch.Tensor
    slots: list[int]
    real_fps: float


def _check_aspect_ratio(height: int, width: int, name: str) -> None:
    if height <= 0 or width <= 0:
        raise VideoLoadError(f"{name}: frames are {width}x{height} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoLoadError(
            f"{name}: frames are {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1 "
            "that the Qwen3-VL resize cannot handle"
        )
