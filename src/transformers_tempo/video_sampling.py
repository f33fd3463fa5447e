"""Which frames Tempo samples: the released 2 fps rule (`compute_sample_indices`) and the frames a
``(start, end)`` clip keeps (`clip_frame_range`)."""

from __future__ import annotations

import math

import numpy as np

from .video_metadata import VideoLoadError


def compute_sample_indices(
    total_frames: int,
    source_fps: float,
    fps: float = 2.0,
    min_frames: int = 8,
    max_frames: int = 1024,
) -> list[int]:
    """Indices of the frames Tempo samples from a `total_frames` video at `source_fps`.

    Same rule as the released `infer.py`, including its corner cases: a one-frame video
    gives ``[0]``; a clip that rounds to one sampled frame (only possible with
    ``min_frames <= 1``) gives its last frame; ``min_frames`` may exceed the number of
    frames, in which case frames repeat.
    """
    if total_frames <= 1:
        return [0]
    if source_fps is None or source_fps <= 0:
        source_fps = fps
    duration = total_frames / source_fps
    n = max(1, round(duration * fps))
    n = min(max(n, min_frames), max_frames)
    if n == 1:
        return [total_frames - 1]
    indices = np.round(np.linspace(0, total_frames - 1, n)).astype(int)
    return np.clip(indices, 0, total_frames - 1).tolist()


def clip_frame_range(
    total_frames: int, source_fps: float, clip=None, name: str = "video", notes: list[str] | None = None
) -> tuple[int, int]:
    """``(first, count)``: the frames of a `total_frames` video at `source_fps` that `clip` keeps.

    `clip` is None (the whole video) or ``(start, end)`` in seconds, where either may be None
    (the start / the end of the video). Frame ``i`` shows at ``i / source_fps`` and is kept when
    ``start <= i / source_fps <= end`` (the rule of qwen-vl-utils' ``video_start`` /
    ``video_end``, which lmms-eval tasks use). A clip shorter than one frame interval keeps
    the frame showing at `start`; an end past the video is cut to the video (with a note).
    Raises VideoLoadError for bounds that are not numbers, negative, reversed, or start after
    the end of the video.
    """
    if clip is None:
        return 0, total_frames
    try:
        start, end = clip
    except (TypeError, ValueError):
        raise VideoLoadError(f"{name}: clip must be (start, end) in seconds, got {clip!r}") from None
    for label, value in (("start", start), ("end", end)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise VideoLoadError(f"{name}: clip {label} must be a number of seconds >= 0, got {value!r}")
    duration = total_frames / source_fps
    start = 0.0 if start is None else float(start)
    if end is not None and end < start:
        raise VideoLoadError(f"{name}: clip ends ({end} s) before it starts ({start} s)")
    if start >= duration:
        raise VideoLoadError(f"{name}: clip starts at {start} s, after the end of the video ({duration:.3f} s)")
    if end is not None and end > duration + 1 / source_fps and notes is not None:
        notes.append(f"{name}: clip end {end} s is past the end of the video ({duration:.3f} s); sampled to the end")
    # Tolerate float noise in `seconds * fps`: a bound meant to sit on a frame (0.1 s at 30 fps is 3.0000000000000004).
    eps = 1e-6
    first = min(math.ceil(start * source_fps - eps), total_frames - 1)
    last = total_frames - 1 if end is None else min(math.floor(float(end) * source_fps + eps), total_frames - 1)
    if last < first:  # the clip falls between two frames: the frame showing at `start`
        first = last = min(math.floor(start * source_fps + eps), total_frames - 1)
    return first, last - first + 1
