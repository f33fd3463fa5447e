"""Which frames Tempo samples and when they are: the released 2 fps rule (`compute_sample_indices`), the
frames a ``(start, end)`` clip keeps (`clip_frame_range`), and the times of segments and of their
temporal patches (`segment_seconds`, `patch_times`), the one place every prompt and report takes
them from."""

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


def segment_seconds(index: int, frames_per_segment: int, num_frames: int, real_fps: float) -> tuple[float, float, float]:
    """(start, end, centre) in seconds of segment `index` of the sampled frames.

    Start and end are those of its frames (the last segment may be shorter). The centre is the
    released decoder timestamp, ``(index * frames_per_segment + frames_per_segment / 2) / real_fps``
    ((8 i + 4) / fps), also for a shorter last segment.
    """
    start = index * frames_per_segment
    end = min(start + frames_per_segment, num_frames)
    return start / real_fps, end / real_fps, (start + frames_per_segment / 2) / real_fps


def patch_times(first_index: int, num_patches: int, fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Times of the temporal patches of a segment whose first frame has index `first_index`.

    As the released code gets them from qwen-vl-utils + Qwen3-VL's processor: frame j of the segment
    (padding frames included) has index ``first_index + j``; each patch's time is the mean of its
    first and last frame's ``index / fps``.
    """
    times = [(first_index + j) / fps for j in range(num_patches * temporal_patch_size)]
    step = temporal_patch_size
    return [(times[k] + times[k + step - 1]) / 2 for k in range(0, len(times), step)]
