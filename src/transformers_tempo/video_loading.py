"""Video in: open a video with PyAV, sample it at 2 fps the way Tempo does, decode only those frames.

The sampling rule is the released one (docs/released-model.md, "Video in", step 1; `infer.py`'s
`compute_sample_indices`): with `total` frames at `source_fps`,

    duration = total / source_fps
    n        = clamp(max(1, round(duration * fps)), min_frames, max_frames)
    indices  = round(linspace(0, total - 1, n))          (numpy rounding, half to even)
    real_fps = n / duration                               (what every timestamp is computed from)

Frame `i` is the i-th frame in presentation order (the i-th smallest packet timestamp), which
is also what decord, the released decoder, calls frame `i`; this holds for variable frame rate
and B-frames alike.

Decoding keeps only the sampled frames. It walks forward through the stream and seeks to the
keyframe before a wanted frame whenever that skips more than a few dozen frames, so sparse
sampling of long videos does not decode everything in between.

A file can also be decoded by several workers at once (`num_workers`): the wanted frames are cut
into ranges that start on keyframes, and each range is decoded in a thread of its own, with a
container of its own, into the same output buffer. FFmpeg's frame threads alone stop scaling
after a few cores (each frame waits for the rows of the frames it references, and parsing the
bitstream is serial), while ranges that start on keyframes share nothing; PyAV releases the GIL
while FFmpeg decodes. The frames are the same whatever the number of workers.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging
from transformers.video_utils import VideoMetadata

from .frame_geometry import longer_edge_size, resize_frames, resize_frames_pil

logger = logging.get_logger(__name__)

__all__ = [
    "FramesReady",
    "LoadedVideo",
    "TempoVideoMetadata",
    "VideoLoadError",
    "compute_sample_indices",
    "load_video",
]

# Seek to the next wanted frame's keyframe only when that skips at least this many frames;
# below it, decoding forward is as cheap as a seek (which also drains the threaded decoder).
SEEK_MIN_SKIPPED_FRAMES = 32
# Automatic num_workers: one worker per this many frames to decode (fewer: one worker; opening
# another container and filling another FFmpeg thread pool costs about what decoding a few dozen
# frames does), and never more than MAX_WORKERS or the number of cores.
MIN_FRAMES_PER_WORKER = 500
MAX_WORKERS = 8
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


def load_video(
    video: Any,
    fps: float = 2.0,
    min_frames: int = 8,
    max_frames: int = 1024,
    video_metadata: Any = None,
    num_threads: int | None = None,
    progress: bool = False,
    max_longer_edge: int | None = None,
    pin_memory: bool = False,
    num_workers: int | None = None,
    on_frames: Any = None,
    resize_backend: str = "torch",
    clip: tuple[float | None, float | None] | None = None,
) -> LoadedVideo:
    """Load and sample a video.

    Args:
        video: a path (str or `pathlib.Path`), a binary file object, `bytes`, or frames given
            directly: a (T, H, W, 3) uint8 numpy array or torch tensor, or a list of PIL
            images / (H, W, 3) uint8 arrays.
        fps: sampling rate (2.0 for Tempo).
        min_frames, max_frames: bounds on the number of sampled frames (8 and 1024 as in the
            released evaluation and inference).
        video_metadata: timing of frames given directly (a dict or transformers'
            `VideoMetadata` with `fps`, optionally `frames_indices`; of a `TempoVideoMetadata`,
            its `real_fps`). Frames given directly are taken as already sampled; without an fps
            they are assumed to be at 2 fps (with a warning). Ignored for files.
        num_threads: decoder threads (default: FFmpeg's automatic choice).
        progress: show a progress bar while decoding.
        max_longer_edge: if given, frames whose longer edge is larger are resized right after
            decoding exactly as `TempoVideoProcessor` would (longer edge to this size, sides
            rounded to multiples of 16, bicubic). The processor's own first resize is then a
            no-op, so results do not change, but a 4K video no longer holds 1024 full-size
            frames in memory. Use 512 (the processor's limit) for Tempo, and the processor's
            `resize_backend` as `resize_backend`.
        pin_memory: decode straight into page-locked memory (when CUDA is available), so the
            frames go to the GPU at full bus speed and asynchronously. For files only.
        num_workers: decode this many keyframe-aligned ranges of a file at once, each in a
            thread with its own container (FFmpeg threads per container: `num_threads`, else
            the cores divided among the workers). None: automatic, one worker for short jobs
            (under about MIN_FRAMES_PER_WORKER frames to decode per worker), else up to
            min(8, cores); 1: one decoder for the whole file. Bytes and file objects are always
            decoded by one worker. The result does not depend on this number.
        on_frames: called with a `FramesReady` whenever sampled frames have been written to the
            output buffer (from the decoding threads), so a consumer can start on them while the
            rest of the file decodes (`streaming.generate_streaming` does). Frames given directly
            are reported once, all together.
        resize_backend: the kernel of the `max_longer_edge` resize, as `TempoVideoProcessor`'s:
            "torch" (fast) or "pil" (the released PIL bicubic, bit for bit).
        clip: ``(start, end)`` in seconds (either may be None: the start or the end of the file):
            sample only that part of a file, exactly as if it were the whole video (`fps`,
            `min_frames`, `max_frames` apply to the clip; `duration` is the clip's, timestamps
            start at 0 at `start`; `frame_indices` stay indices of the file). Frame ``i`` of the
            file is in the clip when ``start <= i / source_fps <= end``. For files only.

    Raises:
        VideoLoadError: the input is missing, empty, not a video, has no decodable frame,
            has no usable frame rate, an extreme aspect ratio, or a wrong array shape/dtype.
    """
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
    ):
        raise ValueError(f"num_workers must be a positive integer or None, got {num_workers!r}")
    if resize_backend not in ("torch", "pil"):
        raise ValueError(f"resize_backend must be 'torch' or 'pil', got {resize_backend!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        if clip is not None:
            raise ValueError("clip= selects part of a video file; for frames given directly, pass the frames of the clip")
        loaded = _load_frames(video, video_metadata, max_longer_edge, resize_backend)
        if on_frames is not None:
            on_frames(FramesReady(loaded.frames, list(range(loaded.num_frames)), loaded.real_fps))
        return loaded
    source, name = _open_source(video)
    pin = bool(pin_memory) and torch.cuda.is_available()
    return _load_container(
        source, name, fps, min_frames, max_frames, num_threads, progress, max_longer_edge, pin, num_workers, on_frames,
        clip=clip,
        resize_backend=resize_backend,
    )


# ----------------------------------------------------------------------------------------
# frames given directly


def _load_frames(frames: Any, video_metadata: Any, max_longer_edge: int | None, resize_backend="torch") -> LoadedVideo:
    name = f"frames given as {type(frames).__name__}"
    notes: list[str] = []
    if isinstance(frames, (list, tuple)):
        if len(frames) == 0:
            raise VideoLoadError(f"{name}: the list of frames is empty")
        arrays = [_frame_to_array(f, name, i) for i, f in enumerate(frames)]
        for i, array in enumerate(arrays):
            if array.shape != arrays[0].shape:
                raise VideoLoadError(
                    f"{name}: frame {i} is {array.shape[1]}x{array.shape[0]} but frame 0 is "
                    f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all frames of a video need one size"
                )
        frames = torch.from_numpy(np.stack(arrays))
    elif isinstance(frames, np.ndarray):
        _check_frame_array(frames.shape, frames.dtype, name)
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    else:
        _check_frame_array(tuple(frames.shape), frames.dtype, name)
        frames = frames.detach().contiguous()
    if frames.shape[0] == 0:
        raise VideoLoadError(f"{name}: zero frames")
    _check_aspect_ratio(frames.shape[1], frames.shape[2], name)

    fps, indices = _metadata_timing(video_metadata, name)
    if fps is None:
        fps = 2.0
        notes.append(f"{name}: no video_metadata fps; assuming the frames were sampled at 2.0 fps")
    if indices is None or len(indices) != frames.shape[0]:
        indices = list(range(frames.shape[0]))
    if max_longer_edge is not None:
        frames = _limit_longer_edge(frames, max_longer_edge, resize_backend)
    notes = _log_notes(notes)
    count = int(frames.shape[0])
    return LoadedVideo(
        frames=frames,
        real_fps=float(fps),
        duration=count / float(fps),
        frame_indices=[int(i) for i in indices],
        source_fps=float(fps),
        total_frames=count,
        warnings=notes,
    )


def _frame_to_array(frame: Any, name: str, i: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray):
        raise VideoLoadError(f"{name}: frame {i} is a {type(frame).__name__}, expected a PIL image or an array")
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise VideoLoadError(
            f"{name}: frame {i} has shape {frame.shape} and dtype {frame.dtype}, expected (H, W, 3) uint8"
        )
    return frame


def _check_frame_array(shape: tuple, dtype: Any, name: str) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (a single frame? add a leading axis)" if len(shape) == 3 and shape[-1] == 3 else ""
        raise VideoLoadError(f"{name}: shape {tuple(shape)}, expected (T, H, W, 3) RGB frames{hint}")
    if dtype not in (np.uint8, torch.uint8):
        raise VideoLoadError(f"{name}: dtype {dtype}, expected uint8 (0..255)")


def _metadata_timing(video_metadata: Any, name: str) -> tuple[float | None, list[int] | None]:
    if video_metadata is None:
        return None, None
    if isinstance(video_metadata, dict):
        fps = video_metadata.get("fps")
        indices = video_metadata.get("frames_indices")
    else:
        # A TempoVideoMetadata knows the rate of its sampled frames; its `fps` is the source's.
        fps = getattr(video_metadata, "real_fps", None) or getattr(video_metadata, "fps", None)
        indices = getattr(video_metadata, "frames_indices", None)
    if fps is not None:
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise VideoLoadError(f"{name}: video_metadata fps is {fps}; it must be a positive number")
    if indices is not None:
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    return fps, indices


# ----------------------------------------------------------------------------------------
# files, file objects, bytes


def _open_source(video: Any) -> tuple[Any, str]:
    """Check the input and return something `av.open` accepts plus a name for messages."""
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.exists():
            raise VideoLoadError(f"{path}: no such file")
        if path.is_dir():
            raise VideoLoadError(f"{path}: is a directory, not a video file")
        if path.stat().st_size == 0:
            raise VideoLoadError(f"{path}: the file is empty (0 bytes)")
        return str(path), str(path)
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
        name = f"<{len(data)} bytes>"
        if not data:
            raise VideoLoadError(f"{name}: the video bytes are empty")
        return data, name
    if hasattr(video, "read"):
        name = str(getattr(video, "name", f"<{type(video).__name__}>"))
        seekable = getattr(video, "seekable", lambda: False)()
        if not seekable:
            data = video.read()
            if not data:
                raise VideoLoadError(f"{name}: the file object is empty")
            return bytes(data), name
        start = video.tell()
        end = video.seek(0, io.SEEK_END)
        video.seek(start)
        if end - start <= 0:
            raise VideoLoadError(f"{name}: the file object is empty")
        return video, name
    raise VideoLoadError(
        f"unsupported video input of type {type(video).__name__}: expected a path, a binary file "
        "object, bytes, or frames ((T, H, W, 3) uint8 array/tensor or a list of images)"
    )


class _Reader:
    """Opens the source as often as needed (the file object is rewound each time)."""

    def __init__(self, source: Any, name: str):
        self.source = source
        self.name = name
        self.start = source.tell() if hasattr(source, "tell") else 0

    def open(self):
        import av

        if isinstance(self.source, bytes):
            target = io.BytesIO(self.source)
        elif hasattr(self.source, "seek"):
            self.source.seek(self.start)
            target = self.source
        else:
            target = self.source
        try:
            return av.open(target, mode="r")
        except av.error.FFmpegError as error:
            raise VideoLoadError(f"{self.name}: not a readable video container ({error})") from error


@dataclass
class _StreamIndex:
    """Packets of the video stream in presentation order."""

    pts: list[int] | None  # sorted presentation timestamps, None if unusable
    keyframes: list[int]  # presentation indices of keyframes
    seek_ts: dict[int, int]  # keyframe index -> timestamp to seek to (its pts)
    count: int
    read_error: str | None


def _index_stream(container, stream) -> _StreamIndex:
    import av

    pts: list[int | None] = []
    key: list[bool] = []
    read_error = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or getattr(packet, "is_discard", False):
                continue
            pts.append(packet.pts)
            key.append(bool(packet.is_keyframe))
    except av.error.FFmpegError as error:
        read_error = str(error)
    count = len(pts)
    usable = count > 0 and all(p is not None for p in pts) and len(set(pts)) == count
    if not usable:
        return _StreamIndex(None, [], {}, count, read_error)
    order = sorted(range(count), key=lambda i: pts[i])
    keyframes, seek_ts = [], {}
    for position, i in enumerate(order):
        if key[i]:
            keyframes.append(position)
            seek_ts[position] = pts[i]
    return _StreamIndex([pts[i] for i in order], keyframes, seek_ts, count, read_error)


def _source_fps(stream, index: _StreamIndex, name: str, notes: list[str]) -> float:
    for label, rate in (("average", stream.average_rate), ("guessed", stream.guessed_rate)):
        if rate is not None and float(rate) > 0 and math.isfinite(float(rate)):
            if label != "average":
                notes.append(
                    f"{name}: no average frame rate in the container; using the {label} rate {float(rate):.3f}"
                )
            return float(rate)
    if index.pts is not None and index.count > 1 and stream.time_base is not None:
        span = (index.pts[-1] - index.pts[0]) * float(stream.time_base)
        if span > 0:
            rate = (index.count - 1) / span
            notes.append(f"{name}: no frame rate in the container; {rate:.3f} fps from the timestamps")
            return rate
    raise VideoLoadError(f"{name}: the video stream has no usable frame rate (zero, negative or missing)")


def _count_frames(stream, container, index: _StreamIndex, fps: float, name: str, notes: list[str]) -> int:
    declared = stream.frames or 0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    else:
        seconds = None
    expected = declared or (round(seconds * fps) if seconds else 0)
    if index.count > 0:
        if index.read_error:
            notes.append(
                f"{name}: reading stopped after {index.count} frames ({index.read_error}); "
                "the file looks damaged or truncated"
            )
        elif expected and index.count < 0.95 * expected - 1:
            notes.append(
                f"{name}: the container announces about {expected} frames but only {index.count} "
                "could be read; the file looks truncated"
            )
        if not declared:
            notes.append(f"{name}: the container {_BENIGN_NOTE}; counted {index.count} packets")
        return index.count
    if index.read_error is None:
        raise VideoLoadError(f"{name}: the video stream contains zero frames")
    # Nothing could be demuxed: fall back on what the container says.
    if declared:
        notes.append(
            f"{name}: packets could not be read ({index.read_error}); using the declared frame count {declared}"
        )
        return declared
    if seconds:
        estimate = max(1, round(seconds * fps))
        notes.append(
            f"{name}: packets could not be read ({index.read_error}); "
            f"estimated {estimate} frames from duration x fps"
        )
        return estimate
    raise VideoLoadError(f"{name}: no video frame could be read ({index.read_error})")


def _video_stream_number(container) -> int:
    """The first video stream that is not a cover picture (MP4/MKV can carry one as a stream)."""
    import av

    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 0)
    for number, stream in enumerate(container.streams.video):
        if not (attached and int(stream.disposition) & int(attached)):
            return number
    return 0


def _load_container(
    source, name, fps, min_frames, max_frames, num_threads, progress, max_longer_edge, pin_memory=False,
    num_workers=1, on_frames=None, clip=None, resize_backend="torch",
) -> LoadedVideo:
    notes: list[str] = []
    reader = _Reader(source, name)

    with reader.open() as container:
        if not container.streams.video:
            if container.streams.audio:
                raise VideoLoadError(f"{name}: audio-only file (it has no video stream)")
            raise VideoLoadError(f"{name}: no video stream in this file")
        number = _video_stream_number(container)
        stream = container.streams.video[number]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:
            _check_aspect_ratio(height, width, name)
        index = _index_stream(container, stream)
        source_fps = _source_fps(stream, index, name, notes)
        total = _count_frames(stream, container, index, source_fps, name, notes)
        rotation = _stream_rotation(stream)

    first, count = clip_frame_range(total, source_fps, clip, name, notes)
    wanted = [first + i for i in compute_sample_indices(count, source_fps, fps, min_frames, max_frames)]
    duration = count / source_fps
    real_fps = len(wanted) / duration if duration > 0 else fps
    listener = None
    if on_frames is not None:
        def listener(frames, slots):
            on_frames(FramesReady(frames, slots, real_fps))

    # Only a path can be opened once per worker; bytes and file objects have one reader.
    parts = _plan_parts(sorted(set(wanted)), index, num_workers if isinstance(source, str) else 1)
    if len(parts) == 1:
        thread_count = num_threads or 0  # 0: FFmpeg's choice
    else:
        thread_count = num_threads or max(1, _cpu_count() // len(parts))
    frames = _decode_wanted(
        reader, number, index, wanted, parts, thread_count, notes, progress, max_longer_edge, rotation, pin_memory,
        listener, resize_backend=resize_backend,
    )
    stats = {
        "decoded_frames": sum(part.stats["decoded_frames"] for part in parts),
        "seeks": sum(part.stats["seeks"] for part in parts),
        "workers": len(parts),
    }

    notes = _log_notes(notes)
    return LoadedVideo(
        frames=frames,
        real_fps=real_fps,
        duration=duration,
        frame_indices=wanted,
        source_fps=source_fps,
        total_frames=total,
        warnings=notes,
        stats=stats,
        video_backend="pyav",
    )


def _cpu_count() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class _Part:
    """The share of one worker: the wanted frames of consecutive keyframe intervals."""

    number: int  # 0 for the part holding the first wanted frame
    targets: list[int]  # sorted distinct presentation indices
    notes: list[str] = field(default_factory=list)  # merged in part order when all are done
    stats: dict[str, int] = field(default_factory=lambda: {"decoded_frames": 0, "seeks": 0})
    staged: list = field(default_factory=list)  # (image, slots) waiting for the longer-edge resize
    exhausted: bool = False  # the stream ended or decoding failed inside this part


def _plan_parts(targets: list[int], index: _StreamIndex, num_workers: int | None) -> list[_Part]:
    """Cut the sorted distinct `targets` into at most `num_workers` parts (None: automatic).

    Targets after the same keyframe stay in one part, so every part but the first starts on a
    keyframe that no other part decodes past. The cuts balance an estimate of the frames one
    decoder would decode for each keyframe interval (it decodes forward, or seeks to the
    keyframe when that skips SEEK_MIN_SKIPPED_FRAMES frames, as `_Cursor` does).
    """
    if num_workers == 1 or index.pts is None or not index.keyframes:
        return [_Part(0, list(targets))]
    runs: list[list] = []  # [keyframe, its targets, frames to decode]
    position = -1
    for target in targets:
        k = max(bisect.bisect_right(index.keyframes, target) - 1, 0)
        keyframe = index.keyframes[k]
        start = keyframe if keyframe - position - 1 >= SEEK_MIN_SKIPPED_FRAMES else position + 1
        work = max(target - start + 1, 1)
        position = target
        if runs and runs[-1][0] == k:
            runs[-1][1].append(target)
            runs[-1][2] += work
        else:
            runs.append([k, [target], work])
    total = sum(work for _, _, work in runs)
    if num_workers is None:
        num_workers = min(MAX_WORKERS, _cpu_count(), total // MIN_FRAMES_PER_WORKER)
    num_workers = max(1, min(num_workers, len(runs)))
    # Each interval goes to the part where the middle of its work falls.
    parts: list[_Part] = []
    done = 0
    for _, run_targets, work in runs:
        number = min(num_workers - 1, int((done + work / 2) * num_workers / total))
        done += work
        if not parts or number > parts[-1].number:
            parts.append(_Part(len(parts), []))
        parts[-1].targets.extend(run_targets)
    return parts


def _decode_wanted(
    reader, number, index, wanted, parts, thread_count, notes, progress, max_longer_edge, rotation, pin_memory,
    listener=None, resize_backend="torch",
) -> torch.Tensor:
    """Decode the frames at presentation indices `wanted` (sorted, repeats allowed), a thread per part."""
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(wanted):
        slots.setdefault(i, []).append(slot)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(slots), desc="decoding", unit="frame")
    store = _FrameStore(len(wanted), reader.name, max_longer_edge, rotation, pin_memory, bar, listener, resize_backend)
    # The number of the first part that failed: the parts after it stop at their next target (one
    # decoder would never get there); those before it go on, as they may fail earlier in the file.
    first_failed = [len(parts)]
    try:
        if len(parts) == 1:
            _decode_part(reader, number, index, parts[0], slots, store, thread_count, first_failed)
        else:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="load_video") as pool:
                futures = [
                    pool.submit(_decode_part, reader, number, index, part, slots, store, thread_count, first_failed)
                    for part in parts
                ]
                try:
                    for future in futures:
                        future.result()  # raises the first failure in file order, as one decoder meets it
                finally:
                    first_failed[0] = -1  # all stop (after Ctrl-C, or once one has failed)
    finally:
        if bar is not None:
            bar.close()
    # One decoder stops for good where the stream ends or decoding fails. The parts after such a
    # part decoded frames that one decoder never reaches: drop them and their notes, so that the
    # frames and warnings do not depend on the number of workers.
    for j, part in enumerate(parts):
        notes.extend(part.notes)
        if part.exhausted:
            for later in parts[j + 1 :]:
                for i in later.targets:
                    store.decoded.pop(i, None)
            break
    return store.finish(wanted, notes)


def _decode_part(reader, number, index, part, slots, store, thread_count, first_failed) -> None:
    """Decode the targets of one part with a container of its own.

    The cursor starts at the beginning and seeks to the keyframe before the part's first target
    when that skips enough frames, exactly as one decoder walks the whole file; frames of other
    parts that it passes on the way are not stored.
    """
    try:
        with reader.open() as container:
            stream = container.streams.video[number]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = thread_count
            cursor = _Cursor(container, stream, index, reader.name, part.notes, part.stats)
            mine = set(part.targets)
            stored: set[int] = set()
            for target in part.targets:
                if first_failed[0] < part.number:
                    break
                if target in stored or target <= cursor.position:
                    continue  # already have it, or it was passed over (missing; repaired by store.finish)
                cursor.seek_if_worthwhile(target)
                while True:
                    item = cursor.next_frame(target)
                    if item is None:
                        break  # end of stream, or decoding failed
                    i, frame = item
                    if i in mine and i not in stored:
                        store.put(i, frame, slots[i], part)
                        stored.add(i)
                    if i >= target:
                        break
                if cursor.exhausted:
                    part.exhausted = True
                    break
            store.flush(part)
    except BaseException:
        first_failed[0] = min(first_failed[0], part.number)
        raise
    finally:
        if part.number == 0:
            store.first_stored.set()  # also when the first part stored nothing


class _Cursor:
    """Walks the decoded frames of a stream, seeking to keyframes when that skips enough."""

    def __init__(self, container, stream, index: _StreamIndex, name: str, notes: list[str], stats: dict[str, int]):
        self.container = container
        self.stream = stream
        self.index = index
        self.name = name
        self.notes = notes
        self.stats = stats
        self.pts_to_index = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        if self.pts_to_index is None:
            notes.append(f"{name}: packets lack unique timestamps; frames are counted in decoding order (no seeking)")
        self.frames = container.decode(stream)
        self.position = -1  # presentation index of the last frame returned
        self.counter = 0  # frames decoded since the start (the index when there are no timestamps)
        self.exhausted = False
        self.seek_keyframe: int | None = None  # position in index.keyframes of the last seek, until a frame arrives

    def seek_if_worthwhile(self, target: int) -> None:
        if self.pts_to_index is None or not self.index.keyframes:
            return
        k = max(bisect.bisect_right(self.index.keyframes, target) - 1, 0)
        if self.index.keyframes[k] - self.position - 1 >= SEEK_MIN_SKIPPED_FRAMES:
            self._seek(k)

    def _seek(self, k: int) -> None:
        import av

        try:
            # Seek by presentation time: demuxers disagree on whether their index holds dts
            # or pts, and a backward seek to a keyframe's pts lands on it or just before it.
            self.container.seek(self.index.seek_ts[self.index.keyframes[k]], stream=self.stream, backward=True)
        except av.error.FFmpegError as error:
            self.notes.append(f"{self.name}: seeking failed ({error}); decoding forward instead")
            return
        self.frames = self.container.decode(self.stream)
        self.position = -1
        self.seek_keyframe = k
        self.stats["seeks"] += 1

    def next_frame(self, target: int):
        """The next decoded frame as (presentation index, frame), or None at the end."""
        import av

        while True:
            try:
                frame = next(self.frames)
            except StopIteration:
                if self.seek_keyframe:
                    # Nothing after the seek point: some demuxers (MPEG-TS) land a keyframe
                    # late. Go back one keyframe and try again.
                    self._seek(self.seek_keyframe - 1)
                    continue
                self.exhausted = True
                return None
            except av.error.FFmpegError as error:
                self.notes.append(f"{self.name}: decoding stopped after frame {self.position} ({error})")
                self.exhausted = True
                return None
            self.counter += 1
            self.stats["decoded_frames"] += 1
            if self.pts_to_index is None:
                i = self.counter - 1
            else:
                i = self.pts_to_index.get(frame.pts)
                if i is None:
                    i = _nearest_index(self.index.pts, frame.pts)
            if self.seek_keyframe is not None:
                k, self.seek_keyframe = self.seek_keyframe, None
                if i > target and k > 0:
                    # The seek overshot the target: go back one keyframe and try again.
                    self._seek(k - 1)
                    continue
            if i < self.position:
                continue  # a leading frame from before the seek point
            self.position = i
            return i, frame


def _nearest_index(sorted_pts: list[int], pts: int | None) -> int:
    if pts is None:
        return -1
    i = bisect.bisect_left(sorted_pts, pts)
    if i == len(sorted_pts):
        return len(sorted_pts) - 1
    if i > 0 and pts - sorted_pts[i - 1] < sorted_pts[i] - pts:
        return i - 1
    return i


class _FrameStore:
    """Holds the decoded sampled frames (upright, optionally size-limited) in one buffer.

    The buffer is a numpy array: copying a frame into it with numpy is several times faster
    than a torch copy, which wakes its intra-op threads for every 3 MB frame. With a
    longer-edge limit, frames wait in a small staging batch (one per part) and are resized
    together.

    Several workers may put frames at once, each its own frames (so they write different
    slots). A lock guards what they share, and the other parts wait until the first part has
    stored its first frame: the rotation and the buffer's size come from the first sampled
    frame, as with one worker.
    """

    STAGING_FRAMES = 32

    def __init__(
        self, count, name, max_longer_edge, stream_rotation, pin_memory=False, bar=None, listener=None,
        resize_backend="torch",
    ):
        self.count = count
        self.listener = listener  # listener(frames, slots) after slots were written
        self.view: torch.Tensor | None = None  # the buffer as a tensor (shares its memory)
        self.pin_memory = pin_memory
        self.tensor: torch.Tensor | None = None  # owns the buffer's memory when it is pinned
        self.name = name
        self.max_longer_edge = max_longer_edge
        self.resize_backend = resize_backend
        self.stream_rotation = stream_rotation
        self.bar = bar
        self.buffer: np.ndarray | None = None
        self.decoded: dict[int, int] = {}  # source index -> a slot holding it
        self.rotation = None
        self.size_warned = False
        self.lock = threading.Lock()
        self.first_stored = threading.Event()  # set by part 0 after its first frame (or when it ends)

    def put(self, index: int, frame, slots: list[int], part: _Part) -> None:
        if part.number > 0:
            self.first_stored.wait()
        with self.lock:
            if self.rotation is None:
                rotation = getattr(frame, "rotation", 0) or self.stream_rotation
                self.rotation = int(round(rotation / 90.0)) % 4
                if rotation % 90:
                    part.notes.append(f"{self.name}: rotation of {rotation} degrees rounded to a multiple of 90")
        image = frame.to_ndarray(format="rgb24")
        if self.rotation:
            image = np.ascontiguousarray(np.rot90(image, k=self.rotation))  # counter-clockwise, as VideoFrame.rotation
        with self.lock:
            self.decoded[index] = slots[0]
            if self.bar is not None:
                self.bar.update(1)
        if self.max_longer_edge is None:
            self._write(image, slots, part.notes)
        else:
            if part.staged and image.shape != part.staged[0][0].shape:
                self.flush(part)
            part.staged.append((image, slots))
            if len(part.staged) >= self.STAGING_FRAMES or self.buffer is None:
                self.flush(part)  # the first frame at once: it sets the buffer's size
        if part.number == 0:
            self.first_stored.set()

    def flush(self, part: _Part) -> None:
        """Resize and write the frames staged by `part`."""
        if not part.staged:
            return
        batch = torch.from_numpy(np.stack([image for image, _ in part.staged]))
        resized = _limit_longer_edge(batch, self.max_longer_edge, self.resize_backend).numpy()
        for image, (_, slots) in zip(resized, part.staged):
            self._write(image, slots, part.notes)
        part.staged.clear()

    def _write(self, image: np.ndarray, slots: list[int], notes: list[str]) -> None:
        with self.lock:
            if self.buffer is None:
                _check_aspect_ratio(image.shape[0], image.shape[1], self.name)
                if self.pin_memory:
                    self.tensor = torch.empty((self.count, *image.shape), dtype=torch.uint8, pin_memory=True)
                    self.buffer = self.tensor.numpy()
                else:
                    self.buffer = np.empty((self.count, *image.shape), dtype=np.uint8)
                self.view = self.tensor if self.tensor is not None else torch.from_numpy(self.buffer)
            other_size = image.shape != self.buffer.shape[1:]
            if other_size and not self.size_warned:
                notes.append(
                    f"{self.name}: frame size changes inside the stream ({tuple(image.shape[:2])} vs "
                    f"{tuple(self.buffer.shape[1:3])}); later frames are resized to the first size"
                )
                self.size_warned = True
        if other_size:
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            image = resize_frames(chw, tuple(self.buffer.shape[1:3]))[0].permute(1, 2, 0).numpy()
        for slot in slots:
            self.buffer[slot] = image  # slots of one source frame belong to one part: no lock needed
        if self.listener is not None:
            self.listener(self.view, list(slots))

    def finish(self, wanted: list[int], notes: list[str]) -> torch.Tensor:
        if self.buffer is None or not self.decoded:
            raise VideoLoadError(f"{self.name}: no video frame could be decoded")
        missing = sorted({i for i in wanted if i not in self.decoded})
        if missing:
            have = sorted(self.decoded)
            repaired = []
            for i in missing:
                nearest = have[max(bisect.bisect_right(have, i) - 1, 0)]
                for slot, j in enumerate(wanted):
                    if j == i:
                        self.buffer[slot] = self.buffer[self.decoded[nearest]]
                        repaired.append(slot)
            if self.listener is not None:
                self.listener(self.view, repaired)
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            notes.append(
                f"{self.name}: {len(missing)} sampled frame(s) could not be decoded ({shown}); "
                "each was replaced by the nearest earlier decoded frame"
            )
        return self.tensor if self.tensor is not None else torch.from_numpy(self.buffer)


def _stream_rotation(stream) -> float:
    """Counter-clockwise display rotation from the stream's legacy `rotate` tag (clockwise)."""
    tag = (stream.metadata or {}).get("rotate")
    try:
        return -float(tag) if tag is not None else 0.0
    except ValueError:
        return 0.0


# ----------------------------------------------------------------------------------------
# shared helpers

_BENIGN_NOTE = "does not store a frame count"  # normal for Matroska/WebM/MPEG-TS


def _log_notes(notes: list[str]) -> list[str]:
    """Log the notes of one video; returns its warnings: the notes that are not normal for the format
    (those are logged at debug level only)."""
    kept = []
    for note in notes:
        if _BENIGN_NOTE in note:
            logger.debug(note)
        else:
            logger.warning(note)
            kept.append(note)
    return kept



def _check_aspect_ratio(height: int, width: int, name: str) -> None:
    if height <= 0 or width <= 0:
        raise VideoLoadError(f"{name}: frames are {width}x{height} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoLoadError(
            f"{name}: frames are {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1 "
            "that the Qwen3-VL resize cannot handle"
        )


def _limit_longer_edge(frames: torch.Tensor, limit: int, resize_backend: str = "torch") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the same with the processor's longer-edge resize applied."""
    height, width = frames.shape[1:3]
    size = longer_edge_size(height, width, limit)
    if size == (height, width):
        return frames
    if resize_backend == "pil":
        return resize_frames_pil(frames, [size]).permute(0, 2, 3, 1).contiguous()
    return resize_frames(frames.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()
