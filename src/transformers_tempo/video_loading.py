"""Video in: open a video with PyAV, sample it at 2 fps the way Tempo does, decode only those frames.

The sampling rule is the released one (TEMPO_REFERENCE.md, "Video in", step 1; `infer.py`'s
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
"""

from __future__ import annotations

import bisect
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["LoadedVideo", "VideoLoadError", "compute_sample_indices", "load_video"]

# Seek to the next wanted frame's keyframe only when that skips at least this many frames;
# below it, decoding forward is as cheap as a seek (which also drains the threaded decoder).
SEEK_MIN_SKIPPED_FRAMES = 32
# Frames whose longer side is over MAX_ASPECT_RATIO times the shorter one are refused (the
# Qwen3-VL resize refuses them too).
MAX_ASPECT_RATIO = 200


class VideoLoadError(ValueError):
    """A video could not be loaded; the message names the input and the problem."""


@dataclass
class LoadedVideo:
    """Sampled frames of one video and their timing.

    Attributes:
        frames: uint8 tensor (T, H, W, 3), RGB, upright (rotation metadata applied).
        real_fps: frame rate of the sampled frames, ``T / duration``; timestamps use it.
        duration: seconds, ``total_frames / source_fps``.
        frame_indices: source frame index of each sampled frame (presentation order).
        source_fps: average frame rate of the source.
        total_frames: number of frames of the source.
        warnings: everything that was guessed, repaired or worked around.
        stats: decoding statistics (``decoded_frames``, ``seeks``; empty for frames given directly).
    """

    frames: torch.Tensor
    real_fps: float
    duration: float
    frame_indices: list[int]
    source_fps: float
    total_frames: int
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


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
            `VideoMetadata` with `fps`, optionally `frames_indices`). Frames given directly are
            taken as already sampled; without an fps they are assumed to be at 2 fps (with a
            warning). Ignored for files.
        num_threads: decoder threads (default: FFmpeg's automatic choice).
        progress: show a progress bar while decoding.
        max_longer_edge: if given, frames whose longer edge is larger are resized right after
            decoding exactly as `TempoVideoProcessor` would (longer edge to this size, sides
            rounded to multiples of 16, bicubic). The processor's own first resize is then a
            no-op, so results do not change, but a 4K video no longer holds 1024 full-size
            frames in memory. Use 512 (the processor's limit) for Tempo.
        pin_memory: decode straight into page-locked memory (when CUDA is available), so the
            frames go to the GPU at full bus speed and asynchronously. For files only.

    Raises:
        VideoLoadError: the input is missing, empty, not a video, has no decodable frame,
            has no usable frame rate, an extreme aspect ratio, or a wrong array shape/dtype.
    """
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        return _load_frames(video, video_metadata, max_longer_edge)
    source, name = _open_source(video)
    pin = bool(pin_memory) and torch.cuda.is_available()
    return _load_container(source, name, fps, min_frames, max_frames, num_threads, progress, max_longer_edge, pin)


# ----------------------------------------------------------------------------------------
# frames given directly


def _load_frames(frames: Any, video_metadata: Any, max_longer_edge: int | None) -> LoadedVideo:
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
        frames = _limit_longer_edge(frames, max_longer_edge)
    _log_notes(notes)
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
        fps = getattr(video_metadata, "fps", None)
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
    source, name, fps, min_frames, max_frames, num_threads, progress, max_longer_edge, pin_memory=False
) -> LoadedVideo:
    notes: list[str] = []
    reader = _Reader(source, name)

    with reader.open() as container:
        if not container.streams.video:
            if container.streams.audio:
                raise VideoLoadError(f"{name}: audio-only file (it has no video stream)")
            raise VideoLoadError(f"{name}: no video stream in this file")
        stream = container.streams.video[_video_stream_number(container)]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:
            _check_aspect_ratio(height, width, name)
        index = _index_stream(container, stream)
        source_fps = _source_fps(stream, index, name, notes)
        total = _count_frames(stream, container, index, source_fps, name, notes)

    wanted = compute_sample_indices(total, source_fps, fps, min_frames, max_frames)
    duration = total / source_fps

    with reader.open() as container:
        stream = container.streams.video[_video_stream_number(container)]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = num_threads or 0
        stats = {"decoded_frames": 0, "seeks": 0}
        frames = _decode_wanted(
            container, stream, index, wanted, name, notes, progress, max_longer_edge, stats, pin_memory
        )

    _log_notes(notes)
    return LoadedVideo(
        frames=frames,
        real_fps=len(wanted) / duration if duration > 0 else fps,
        duration=duration,
        frame_indices=wanted,
        source_fps=source_fps,
        total_frames=total,
        warnings=notes,
        stats=stats,
    )


def _decode_wanted(
    container, stream, index, wanted, name, notes, progress, max_longer_edge, stats, pin_memory=False
) -> torch.Tensor:
    """Decode the frames at presentation indices `wanted` (sorted, repeats allowed)."""
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(wanted):
        slots.setdefault(i, []).append(slot)
    store = _FrameStore(len(wanted), name, notes, max_longer_edge, stream, pin_memory)
    cursor = _Cursor(container, stream, index, name, notes, stats)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(slots), desc="decoding", unit="frame")
    for target in sorted(slots):
        if target in store.decoded or target <= cursor.position:
            continue  # already have it, or it was passed over (missing; repaired by store.finish)
        cursor.seek_if_worthwhile(target)
        while True:
            item = cursor.next_frame(target)
            if item is None:
                break  # end of stream, or decoding failed
            i, frame = item
            if i in slots and i not in store.decoded:
                store.put(i, frame, slots[i])
                if bar is not None:
                    bar.update(1)
            if i >= target:
                break
        if cursor.exhausted:
            break
    if bar is not None:
        bar.close()
    return store.finish(wanted)


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
    longer-edge limit, frames wait in a small staging batch and are resized together.
    """

    STAGING_FRAMES = 32

    def __init__(self, count, name, notes, max_longer_edge, stream, pin_memory=False):
        self.count = count
        self.pin_memory = pin_memory
        self.tensor: torch.Tensor | None = None  # owns the buffer's memory when it is pinned
        self.name = name
        self.notes = notes
        self.max_longer_edge = max_longer_edge
        self.stream_rotation = _stream_rotation(stream)
        self.buffer: np.ndarray | None = None
        self.decoded: dict[int, int] = {}  # source index -> a slot holding it
        self.staged: list[tuple[np.ndarray, list[int]]] = []
        self.rotation = None
        self.size_warned = False

    def put(self, index: int, frame, slots: list[int]) -> None:
        if self.rotation is None:
            rotation = getattr(frame, "rotation", 0) or self.stream_rotation
            self.rotation = int(round(rotation / 90.0)) % 4
            if rotation % 90:
                self.notes.append(f"{self.name}: rotation of {rotation} degrees rounded to a multiple of 90")
        image = frame.to_ndarray(format="rgb24")
        if self.rotation:
            image = np.ascontiguousarray(np.rot90(image, k=self.rotation))  # counter-clockwise, as VideoFrame.rotation
        self.decoded[index] = slots[0]
        if self.max_longer_edge is None:
            self._write(image, slots)
            return
        if self.staged and image.shape != self.staged[0][0].shape:
            self._flush()
        self.staged.append((image, slots))
        if len(self.staged) >= self.STAGING_FRAMES:
            self._flush()

    def _flush(self) -> None:
        if not self.staged:
            return
        batch = torch.from_numpy(np.stack([image for image, _ in self.staged]))
        resized = _limit_longer_edge(batch, self.max_longer_edge).numpy()
        for image, (_, slots) in zip(resized, self.staged):
            self._write(image, slots)
        self.staged = []

    def _write(self, image: np.ndarray, slots: list[int]) -> None:
        if self.buffer is None:
            _check_aspect_ratio(image.shape[0], image.shape[1], self.name)
            if self.pin_memory:
                self.tensor = torch.empty((self.count, *image.shape), dtype=torch.uint8, pin_memory=True)
                self.buffer = self.tensor.numpy()
            else:
                self.buffer = np.empty((self.count, *image.shape), dtype=np.uint8)
        if image.shape != self.buffer.shape[1:]:
            if not self.size_warned:
                self.notes.append(
                    f"{self.name}: frame size changes inside the stream ({tuple(image.shape[:2])} vs "
                    f"{tuple(self.buffer.shape[1:3])}); later frames are resized to the first size"
                )
                self.size_warned = True
            from .video_processing_tempo import resize_frames

            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            image = resize_frames(chw, tuple(self.buffer.shape[1:3]))[0].permute(1, 2, 0).numpy()
        for slot in slots:
            self.buffer[slot] = image

    def finish(self, wanted: list[int]) -> torch.Tensor:
        self._flush()
        if self.buffer is None or not self.decoded:
            raise VideoLoadError(f"{self.name}: no video frame could be decoded")
        missing = sorted({i for i in wanted if i not in self.decoded})
        if missing:
            have = sorted(self.decoded)
            for i in missing:
                nearest = have[max(bisect.bisect_right(have, i) - 1, 0)]
                for slot, j in enumerate(wanted):
                    if j == i:
                        self.buffer[slot] = self.buffer[self.decoded[nearest]]
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            self.notes.append(
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


def _log_notes(notes: list[str]) -> None:
    for note in notes:
        if _BENIGN_NOTE in note:
            logger.info(note)
        else:
            logger.warning(note)



def _check_aspect_ratio(height: int, width: int, name: str) -> None:
    if height <= 0 or width <= 0:
        raise VideoLoadError(f"{name}: frames are {width}x{height} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoLoadError(
            f"{name}: frames are {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1 "
            "that the Qwen3-VL resize cannot handle"
        )


def _limit_longer_edge(frames: torch.Tensor, limit: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the same with the processor's longer-edge resize applied."""
    from .video_processing_tempo import longer_edge_size, resize_frames

    height, width = frames.shape[1:3]
    size = longer_edge_size(height, width, limit)
    if size == (height, width):
        return frames
    return resize_frames(frames.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()
