"""Synthetic test videos, written with PyAV.

Tests, `tempo demo` and the benchmarks need videos without downloading any. This module
draws simple frames whose content says which frame they are, and encodes them with any
encoder of the installed PyAV build.

The default picture (:func:`index_pattern`) has two parts:

* the top half is a 2 x 8 grid of black/white blocks holding the frame index in binary
  (16 bits, most significant bit first, row by row). Flat blocks survive lossy codecs and
  chroma subsampling, and :func:`decode_frame_index` reads them back from a decoded frame;
* the bottom half is a flat colour that changes with the index (:func:`index_color`), so
  that a sequence of frames also looks like a (low-detail) video to a person.

Example::

    from transformers_tempo.synthetic import write_test_video, decode_frame_index
    from transformers_tempo.video_loading import load_video

    path = write_test_video("/tmp/clip.mp4", num_frames=90, fps=30)   # 3 s of H.264
    video = load_video(path)                                          # 2 fps -> 8 frames (min_frames)
    [decode_frame_index(f.numpy()) for f in video.frames] == video.frame_indices
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "CODE_BITS",
    "decode_frame_index",
    "encoder_available",
    "index_color",
    "index_pattern",
    "make_frames",
    "write_damaged_copy",
    "write_test_video",
]

CODE_BITS = 16  # the binary code holds frame indices 0 .. 65535
_CODE_ROWS, _CODE_COLS = 2, 8

ColorFn = Callable[[int, int, int], np.ndarray]


def index_color(index: int) -> tuple[int, int, int]:
    """A colour that changes with `index` (a fixed walk through RGB space; not unique)."""
    return ((37 * index + 64) % 256, (91 * index + 128) % 256, (53 * index + 16) % 256)


def index_pattern(index: int, width: int, height: int) -> np.ndarray:
    """The default frame: the index in binary blocks on top, a colour from the index below.

    Returns an (height, width, 3) uint8 RGB array. Frames should be at least 16x8 pixels
    (each code block is width/8 x height/4 pixels); use :func:`decode_frame_index` to read
    the index back.
    """
    if not 0 <= index < 2**CODE_BITS:
        raise ValueError(f"index {index} does not fit in {CODE_BITS} bits")
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = index_color(index)
    ys = np.linspace(0, height // 2, _CODE_ROWS + 1).astype(int)
    xs = np.linspace(0, width, _CODE_COLS + 1).astype(int)
    for bit in range(CODE_BITS):
        row, col = divmod(bit, _CODE_COLS)
        on = (index >> (CODE_BITS - 1 - bit)) & 1
        frame[ys[row] : ys[row + 1], xs[col] : xs[col + 1]] = 255 if on else 0
    return frame


def decode_frame_index(frame: np.ndarray) -> int:
    """Read back the index drawn by :func:`index_pattern` from a decoded (H, W, 3) frame.

    Each block is judged by the mean brightness of its central part (away from the edges
    that codecs blur), so small resizes and lossy compression do not change the answer.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=-1)
    ys = np.linspace(0, height // 2, _CODE_ROWS + 1)
    xs = np.linspace(0, width, _CODE_COLS + 1)
    value = 0
    for bit in range(CODE_BITS):
        row, col = divmod(bit, _CODE_COLS)
        y0, y1 = ys[row], ys[row + 1]
        x0, x1 = xs[col], xs[col + 1]
        # the middle half of the block
        cy0, cy1 = int(y0 + (y1 - y0) / 4), int(np.ceil(y1 - (y1 - y0) / 4))
        cx0, cx1 = int(x0 + (x1 - x0) / 4), int(np.ceil(x1 - (x1 - x0) / 4))
        value = (value << 1) | int(gray[cy0:cy1, cx0:cx1].mean() > 127.5)
    return value


def make_frames(
    num_frames: int,
    width: int = 64,
    height: int = 48,
    color_fn: ColorFn | None = None,
    start: int = 0,
) -> np.ndarray:
    """Frames ``start .. start + num_frames - 1`` as one (T, H, W, 3) uint8 RGB array.

    `color_fn(index, width, height)` draws one frame; it may return an (H, W, 3) array or
    an RGB triple for a flat frame. The default is :func:`index_pattern`.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = _draw(color_fn, start + i, width, height)
    return frames


def encoder_available(codec: str) -> bool:
    """Whether this PyAV build can encode with `codec` (e.g. "libx264", "libsvtav1")."""
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


_DEFAULT_SUFFIX = {"libvpx-vp9": ".webm", "libvpx": ".webm", "vp9": ".webm", "vp8": ".webm"}


def write_test_video(
    path: str | os.PathLike,
    num_frames: int = 16,
    fps: float | Fraction = 30,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    color_fn: ColorFn | None = None,
    rotate: int | None = None,
    vfr: bool | Sequence[float] = False,
    gop: int | None = None,
    codec_options: dict[str, str] | None = None,
    audio: bool = False,
) -> Path:
    """Encode a synthetic video with PyAV and return its path.

    Args:
        path: output file; the container follows the extension (.mp4, .mkv, .webm, .avi ...).
        num_frames: number of frames.
        fps: nominal frame rate (the stream's average rate for `vfr=False`).
        width, height: frame size in pixels. Odd sizes need a `pix_fmt` without chroma
            subsampling (e.g. "yuv444p") or an encoder that accepts them.
        codec: PyAV encoder name: "libx264", "libx265", "libvpx-vp9", "libsvtav1", "mpeg4", ...
            Use :func:`encoder_available` to skip cleanly where a build lacks one.
        pix_fmt: the encoded pixel format, e.g. "yuv420p", "yuv444p", "yuv420p10le", "gray".
        color_fn: draws frame `i`: ``color_fn(i, width, height)`` -> (H, W, 3) uint8 array or an
            RGB triple. Default :func:`index_pattern` (readable with :func:`decode_frame_index`).
        rotate: display rotation in degrees counter-clockwise, stored as the stream's display
            matrix (read back as ``VideoFrame.rotation``). A phone's portrait clip carries -90
            (ffmpeg's legacy ``rotate=90`` tag). The pixels are stored unrotated.
        vfr: variable frame rate. ``True``: frame durations alternate between 0.5 and 1.5
            nominal frame periods (same average rate). A sequence: the presentation time of
            each frame in seconds (strictly increasing, one per frame).
        gop: keyframe interval in frames (scene-cut keyframes are switched off for x264/x265 so
            that the interval is regular).
        codec_options: extra encoder options (passed to PyAV as ``stream.options``).
        audio: also write a short silent AAC track (to test that audio streams are ignored).
    """
    import av

    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(_DEFAULT_SUFFIX.get(codec, ".mp4"))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    fps = Fraction(fps).limit_denominator(100000)
    frame_times = _frame_times(num_frames, fps, vfr)

    options = dict(codec_options or {})
    if codec == "libx265" and "x265-params" not in options:
        options["x265-params"] = "log-level=error"  # x265 prints its settings otherwise
    if gop is not None and codec in ("libx264", "libx265"):
        key = "x264-params" if codec == "libx264" else "x265-params"
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        options[key] = f"{options[key]}:{params}" if key in options else params

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        if frame_times is not None:
            # a fine clock so that uneven presentation times are representable
            stream.codec_context.time_base = Fraction(1, 1000 * max(1, round(float(fps))))
        if rotate:
            if hasattr(stream, "set_display_rotation"):
                stream.set_display_rotation(rotate)
            else:  # older PyAV: the legacy tag, clockwise degrees
                stream.metadata["rotate"] = str(-rotate % 360)
        audio_stream = container.add_stream("aac", rate=16000) if audio else None

        time_base = stream.codec_context.time_base
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_draw(color_fn, i, width, height), format="rgb24")
            if frame_times is not None:
                frame.pts = round(frame_times[i] / time_base)
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

        if audio_stream is not None:
            _write_silence(audio_stream, container, seconds=float(num_frames / fps))
    return path


def _draw(color_fn: ColorFn | None, index: int, width: int, height: int) -> np.ndarray:
    if color_fn is None:
        return index_pattern(index, width, height)
    out = color_fn(index, width, height)
    out = np.asarray(out, dtype=np.uint8)
    if out.shape == (3,):
        out = np.broadcast_to(out, (height, width, 3))
    if out.shape != (height, width, 3):
        raise ValueError(f"color_fn returned shape {out.shape}, expected {(height, width, 3)}")
    return np.ascontiguousarray(out)


def _frame_times(num_frames: int, fps: Fraction, vfr: bool | Sequence[float]) -> list[float] | None:
    if vfr is False:
        return None
    if vfr is True:
        period = 1 / float(fps)
        durations = [0.5 * period if i % 2 == 0 else 1.5 * period for i in range(num_frames)]
        return [float(t) for t in np.concatenate([[0.0], np.cumsum(durations)[:-1]])]
    times = [float(t) for t in vfr]
    if len(times) != num_frames:
        raise ValueError(f"vfr gives {len(times)} frame times for {num_frames} frames")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError("vfr frame times must be strictly increasing")
    return times


def _write_silence(stream, container, seconds: float) -> None:
    import av

    samples = max(1, int(seconds * stream.codec_context.sample_rate))
    layout = stream.codec_context.layout.name
    channels = stream.codec_context.layout.nb_channels
    frame_size = stream.codec_context.frame_size or 1024
    pts = 0
    while pts < samples:
        frame = av.AudioFrame.from_ndarray(
            np.zeros((channels, frame_size), dtype=np.float32), format="fltp", layout=layout
        )
        frame.sample_rate = stream.codec_context.sample_rate
        frame.pts = pts
        pts += frame_size
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def benchmark_h264_options(bframes: int) -> dict[str, str]:
    """x264 options of the benchmarks' generated long files: `bframes` B-frames between references,
    the middle one a reference too (b-adapt=0, b-pyramid), as most downloaded videos have. With 0,
    x264 may use 2 but chooses none for this synthetic picture (the files of runs before 2026-12-02)."""
    if not bframes:
        return {"preset": "veryfast", "bf": "2"}
    return {"preset": "veryfast", "x264-params": f"bframes={bframes}:b-adapt=0:b-pyramid=normal"}


def write_long_video(
    path: str | os.PathLike,
    duration: float,
    clip_seconds: float = 10.0,
    fps: float = 30,
    width: int = 1280,
    height: int = 720,
    gop: int = 250,
    codec_options: dict[str, str] | None = None,
) -> Path:
    """An hour-long H.264 file in seconds: encode a `clip_seconds` clip once, then copy its packets
    over and over with shifted timestamps (no re-encoding). Decoding it costs what decoding any
    H.264 file of that size, rate and keyframe interval costs; the picture repeats every clip.
    """
    import av

    path = Path(path)
    clip_frames = max(1, round(clip_seconds * fps))
    clip = write_test_video(
        path.with_name(path.stem + ".clip.mp4"), num_frames=clip_frames, fps=fps, width=width, height=height,
        gop=gop, codec_options={"preset": "ultrafast", **(codec_options or {})},
    )
    copies = max(1, math.ceil(duration / (clip_frames / fps)))
    with av.open(str(clip)) as source, av.open(str(path), mode="w") as out:
        in_stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        packets = [p for p in source.demux(in_stream) if p.dts is not None]
        span = clip_frames / fps / in_stream.time_base  # one clip in stream ticks
        for copy in range(copies):
            shift = int(round(copy * span))
            for packet in packets:
                packet.stream = out_stream
                packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                out.mux(packet)
                packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
    clip.unlink()
    return path


def write_damaged_copy(path: str | os.PathLike, out: str | os.PathLike, at: float = 0.3, length: int = 400) -> Path:
    """Copy `path` to `out` with `length` bytes zeroed `at` (a fraction) of the way in: packets there
    no longer decode, so a decoder stops early and the frames after it are missing."""
    data = bytearray(Path(path).read_bytes())
    start = int(len(data) * at)
    data[start : start + length] = bytes(length)
    Path(out).write_bytes(bytes(data))
    return Path(out)
