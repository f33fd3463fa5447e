"""Opening a video source and reading the facts of its video stream before decoding: the packets in
presentation order and their keyframes, the frame rate, the frame count, the display rotation."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .video_metadata import VideoLoadError, _check_aspect_ratio

# The note for a container without a frame count; normal for Matroska/WebM/MPEG-TS, so it is logged at debug level only.
_BENIGN_NOTE = "does not store a frame count"


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


def _stream_rotation(stream) -> float:
    """Counter-clockwise display rotation from the stream's legacy `rotate` tag (clockwise)."""
    tag = (stream.metadata or {}).get("rotate")
    try:
        return -float(tag) if tag is not None else 0.0
    except ValueError:
        return 0.0


@dataclass
class _StreamFacts:
    """What `_probe_stream` learns about the video stream of a source before decoding it."""

    number: int  # among the container's video streams
    index: _StreamIndex
    source_fps: float
    total_frames: int
    rotation: float  # counter-clockwise degrees, from the stream's tag


def _probe_stream(reader: _Reader, notes: list[str]) -> _StreamFacts:
    """Open the source once and read the facts of its video stream (adding what was guessed to `notes`)."""
    name = reader.name
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
        return _StreamFacts(number, index, source_fps, total, _stream_rotation(stream))
