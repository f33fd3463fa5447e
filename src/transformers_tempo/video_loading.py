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

This module holds `load_video` and frames given directly; the rest has a module of its own:
`video_metadata` (what a load returns), `video_sampling` (which frames), `video_probing` (opening
a source, the stream's packets, rate and frame count), `video_decoding` (parts, threads, seeking)
and `video_frame_store` (the output buffer). They are flat modules rather than a package because
converted checkpoints copy the modules the model code imports for `trust_remote_code`, and
transformers copies only modules next to the model code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .video_decoding import _decode_wanted
from .video_decoding_nvdec import BACKENDS, choose_backend, decode_wanted_nvdec
from .video_frame_store import _limit_longer_edge
from .video_metadata import (
    FramesReady,
    LoadedVideo,
    TempoVideoMetadata,
    VideoLoadError,
    _check_aspect_ratio,
)
from .video_probing import _BENIGN_NOTE, _open_source, _probe_stream, _Reader
from .video_sampling import clip_frame_range, compute_sample_indices

# isort: split
# Names that lived in this module before it was split, still importable from here. Assigning to
# these constants here changes nothing: set them on the module that reads them (`video_decoding`).
from .video_decoding import (
    MAX_WORKERS,  # noqa: F401
    MIN_FRAMES_PER_WORKER,  # noqa: F401
    SEEK_MIN_SKIPPED_FRAMES,  # noqa: F401
    _cpu_count,  # noqa: F401
    _plan_parts,  # noqa: F401
)
from .video_frame_store import _FrameStore  # noqa: F401
from .video_metadata import MAX_ASPECT_RATIO  # noqa: F401
from .video_probing import _index_stream  # noqa: F401

logger = logging.get_logger(__name__)

__all__ = [
    "FramesReady",
    "LoadedVideo",
    "TempoVideoMetadata",
    "VideoLoadError",
    "compute_sample_indices",
    "load_video",
]


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
    backend: str = "auto",
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
        backend: the decoder of files: "pyav" (FFmpeg on the CPU), "nvdec" (the GPU's video decoder,
            through PyNvVideoCodec: `pip install transformers-tempo[nvdec]`; an error says why when it
            cannot be used) or "auto" (default): PyAV, the faster for sampled loads of long files even
            on a GPU machine (measured: `video_decoding_nvdec.choose_backend`). Both decode the same
            sampled frames; their colour conversions differ by a few grey levels.
            `resize_backend="pil"` needs PyAV. Frames given directly are not decoded and ignore it.

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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
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
        source, name,
        fps=fps,
        min_frames=min_frames,
        max_frames=max_frames,
        num_threads=num_threads,
        progress=progress,
        max_longer_edge=max_longer_edge,
        pin_memory=pin,
        num_workers=num_workers,
        on_frames=on_frames,
        clip=clip,
        resize_backend=resize_backend,
        backend=backend,
    )


# ----------------------------------------------------------------------------------------
# files, file objects, bytes


def _load_container(
    source, name, *, fps, min_frames, max_frames, num_threads, progress, max_longer_edge, pin_memory=False,
    num_workers=1, on_frames=None, clip=None, resize_backend="torch", backend="pyav",
) -> LoadedVideo:
    notes: list[str] = []
    reader = _Reader(source, name)
    facts = _probe_stream(reader, notes)
    source_fps, total = facts.source_fps, facts.total_frames

    first, count = clip_frame_range(total, source_fps, clip, name, notes)
    wanted = [first + i for i in compute_sample_indices(count, source_fps, fps, min_frames, max_frames)]
    duration = count / source_fps
    real_fps = len(wanted) / duration if duration > 0 else fps
    listener = None
    if on_frames is not None:
        def listener(frames, slots):
            on_frames(FramesReady(frames, slots, real_fps))

    decoder, traits = choose_backend(backend, source, name, facts, resize_backend)
    if decoder == "nvdec":
        frames, stats = _decode_nvdec(
            source, name, facts, traits, wanted, notes, num_workers, max_longer_edge, pin_memory, listener
        )
    else:
        frames, stats = _decode_wanted(
            reader,
            stream_number=facts.number,
            index=facts.index,
            wanted=wanted,
            num_workers=num_workers,
            num_threads=num_threads,
            notes=notes,
            progress=progress,
            max_longer_edge=max_longer_edge,
            rotation=facts.rotation,
            pin_memory=pin_memory,
            listener=listener,
            resize_backend=resize_backend,
        )
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
        video_backend=decoder,
    )


def _decode_nvdec(source, name, facts, traits, wanted, notes, num_workers, max_longer_edge, pin_memory, listener):
    """The sampled frames decoded by NVDEC; a failure is a `VideoLoadError` naming the library's error."""
    try:
        frames, stats, nvdec_notes = decode_wanted_nvdec(
            source, name=name, facts=facts, traits=traits, wanted=wanted, num_workers=num_workers,
            max_longer_edge=max_longer_edge, pin_memory=pin_memory, listener=listener,
        )
    except VideoLoadError:
        raise
    except Exception as error:  # the library's errors have no common class
        raise VideoLoadError(f"{name}: NVDEC decoding failed ({type(error).__name__}: {error})") from error
    notes.extend(nvdec_notes)
    return frames, stats


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


