"""Decoding the sampled frames of a file on the GPU with NVDEC (PyNvVideoCodec), as an optional backend.

`video_loading.load_video(..., backend="nvdec")` (or "auto", when this backend can be used) probes the
file with PyAV and computes the sampled frame indices exactly as the PyAV path does; only the decoding
differs. The wanted frames are cut into the same keyframe-aligned parts as `video_decoding._plan_parts`
makes for PyAV workers, and each part is decoded by a `PyNvVideoCodec.SimpleDecoder` of its own, in a
thread of its own (NVDEC engines decode in parallel; a GPU has a few of them, 7 on an H200).

The decoder returns NV12 frames (a 1.5H x W plane) in GPU memory, read through DLPack without a host
copy. Colour conversion happens here, in torch on the GPU, not with the library's RGB output: the
conversion then uses the matrix and range the stream is tagged with (BT.601 when untagged, BT.709,
BT.2020; limited or full range) and repeats each chroma sample over its 2x2 pixels, as FFmpeg's
`rgb24` conversion in the PyAV path does, so the two backends give nearly the same pixels (within a
few grey levels on CPU tests) and the conversion can be checked without a GPU. Then the upright
rotation and the `max_longer_edge` resize (`video_frame_store._limit_longer_edge`, torch kernel) run on
the GPU, and the frames are copied once into a CPU tensor (pinned on request), so every consumer of a
`LoadedVideo` is unchanged.

What is kept per process: the library import (or the reason it failed), and the decoders themselves.
Creating a decoder and getting its first frame costs seconds; a decoder that finished a load goes back
to a pool and the next load re-points it at its file (`reconfigure_decoder`), so only the first load of
a process pays the start-up.

PyNvVideoCodec is imported only here, and only when NVDEC is asked for or considered.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from .frame_geometry import resize_frames
from .video_decoding import _plan_parts
from .video_frame_store import _limit_longer_edge
from .video_metadata import VideoLoadError, _check_aspect_ratio

logger = logging.get_logger(__name__)

BACKENDS = ("auto", "pyav", "nvdec")
# Codecs NVDEC decodes (FFmpeg's names), and the GPU generations (compute capability majors) whose
# NVDEC lacks one: Hopper (9.x) has no AV1 decode.
NVDEC_CODECS = {"h264": (), "hevc": (), "vp9": (), "av1": (9,)}
# 8-bit 4:2:0 only: the decoder's output is then NV12 (10-bit streams give P016, 4:4:4 other layouts).
NVDEC_PIXEL_FORMATS = ("yuv420p", "yuvj420p", "nv12")
# Automatic number of decoders: NVDEC engines are few (and shared by every process on the GPU).
MAX_DECODERS = 4
# Sampled frames per decoder call: bounds the NV12 frames held in GPU memory at once.
CHUNK_FRAMES = 32
INSTALL_HINT = "pip install transformers-tempo[nvdec]"

# Where the frames are converted; None: the CUDA device. Tests set "cpu" (with a fake library).
_DEVICE_OVERRIDE: str | None = None

_library_lock = threading.Lock()
_library: list = []  # [module] or [None, reason] once the import was tried


def _import_library():
    """PyNvVideoCodec, or None and the reason it cannot be imported (tried once per process)."""
    with _library_lock:
        if not _library:
            try:
                import PyNvVideoCodec

                _library.extend([PyNvVideoCodec, None])
            except ImportError:
                _library.extend([None, f"PyNvVideoCodec is not installed ({INSTALL_HINT})"])
            except Exception as error:  # noqa: BLE001 - its import checks the driver and raises RuntimeError
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                _library.extend([None, f"PyNvVideoCodec could not be loaded ({first_line})"])
        return _library[0], _library[1]


def _device() -> torch.device:
    if _DEVICE_OVERRIDE is not None:
        return torch.device(_DEVICE_OVERRIDE)
    return torch.device("cuda", torch.cuda.current_device())


def _gpu_reason() -> str | None:
    """None when a CUDA GPU is there to decode on, else why not."""
    if _DEVICE_OVERRIDE is not None:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


@dataclass
class StreamTraits:
    """What NVDEC needs to know of a stream besides `video_probing._StreamFacts`."""

    codec: str  # FFmpeg's codec name
    pix_fmt: str | None
    colorspace: int  # FFmpeg's AVColorSpace (1: BT.709, 9/10: BT.2020, else BT.601)
    full_range: bool
    width: int
    height: int
    rotation: float  # counter-clockwise degrees, of the first frame (display matrix) or the stream tag


def read_stream_traits(path: str, stream_number: int, tag_rotation: float) -> StreamTraits:
    """Open the file with PyAV and read the codec, pixel format, colour tags and the display rotation
    (from the first decoded frame: its display matrix, as the PyAV path reads it)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[stream_number]
        context = stream.codec_context
        rotation = tag_rotation
        try:
            for frame in container.decode(stream):
                rotation = getattr(frame, "rotation", 0) or tag_rotation
                break
        except av.error.FFmpegError:
            pass  # the PyAV path would report it; here only the rotation is looked for
        return StreamTraits(
            codec=context.name,
            pix_fmt=context.pix_fmt,
            colorspace=int(context.colorspace or 2),
            full_range=int(context.color_range or 0) == 2,
            width=int(context.width or 0),
            height=int(context.height or 0),
            rotation=rotation,
        )


def unusable_reason(source, traits: StreamTraits | None = None) -> str | None:
    """None when NVDEC can decode `source` here, else a short reason. Without `traits`, only what can be
    told before opening the file (library, GPU, kind of input)."""
    library, reason = _import_library()
    if library is None:
        return reason
    reason = _gpu_reason()
    if reason is not None:
        return reason
    if not isinstance(source, str):
        return "NVDEC decodes files given by path, not bytes or file objects"
    if traits is None:
        return None
    if traits.codec not in NVDEC_CODECS:
        return f"NVDEC does not decode {traits.codec} (it decodes {', '.join(NVDEC_CODECS)})"
    device = _device()
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in NVDEC_CODECS[traits.codec]:
        return f"this GPU ({torch.cuda.get_device_name(device)}) has no {traits.codec} decoder"
    if traits.pix_fmt not in NVDEC_PIXEL_FORMATS:
        return f"pixel format {traits.pix_fmt} is not 8-bit 4:2:0 (NVDEC here takes {', '.join(NVDEC_PIXEL_FORMATS)})"
    return None


_notice_given = threading.Event()


def fallback_notice(name: str, reason: str) -> None:
    """Say once per process why "auto" decodes with PyAV although NVDEC is installed (later: debug level)."""
    if _notice_given.is_set():
        logger.debug(f"{name}: decoding with PyAV, not NVDEC: {reason}")
        return
    _notice_given.set()
    logger.warning(f"video decoding: PyAV, not NVDEC, for {name}: {reason} (said once per process)")


def choose_backend(requested: str, source, name: str, facts, resize_backend: str) -> tuple[str, StreamTraits | None]:
    """The backend that decodes `source` ("pyav" or "nvdec") and, for NVDEC, the stream's traits.

    "pyav": PyAV. "nvdec": NVDEC, or a `VideoLoadError` saying why it cannot be used. "auto": NVDEC
    when the library imports, a CUDA GPU is there, `source` is a path and NVDEC decodes its stream,
    else PyAV (with `fallback_notice` once the library is installed). `resize_backend="pil"` (the
    released pixels, exact mode) always decodes with PyAV, whose colour conversion it reproduces.
    """
    if requested == "pyav":
        return "pyav", None
    if resize_backend == "pil":
        if requested == "nvdec":
            raise ValueError(
                "backend='nvdec' with resize_backend='pil': the exact (PIL) mode reproduces PyAV's pixels; "
                "use backend='pyav' or 'auto'"
            )
        return "pyav", None
    reason = unusable_reason(source)
    traits = None
    if reason is None:
        traits = read_stream_traits(source, facts.number, facts.rotation)
        reason = unusable_reason(source, traits)
    if reason is None:
        return "nvdec", traits
    if requested == "nvdec":
        raise VideoLoadError(f"{name}: backend='nvdec' cannot be used: {reason}")
    if not reason.startswith("PyNvVideoCodec is not installed"):  # installed: say why it is not used
        fallback_notice(name, reason)
    return "pyav", None


# ----------------------------------------------------------------------------------------
# colour conversion

# (Kr, Kb) of the luma equation for FFmpeg's AVColorSpace values; anything else is BT.601, as in FFmpeg.
_LUMA_COEFFICIENTS = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def nv12_to_rgb(planes: torch.Tensor, colorspace: int = 2, full_range: bool = False) -> torch.Tensor:
    """(N, 1.5H, W) uint8 NV12 planes -> (N, H, W, 3) uint8 RGB, on the planes' device.

    Luma rows first, then H/2 rows of interleaved (U, V) pairs. Each chroma sample covers its 2x2
    pixels (no interpolation), and the matrix follows the stream's tags, as FFmpeg's `rgb24`
    conversion does.
    """
    if planes.dtype != torch.uint8 or planes.ndim != 3:
        raise ValueError(f"expected (N, 1.5H, W) uint8 NV12 planes, got {tuple(planes.shape)} {planes.dtype}")
    rows, width = planes.shape[1:]
    height = 2 * rows // 3
    kr, kb = _LUMA_COEFFICIENTS.get(int(colorspace), (0.299, 0.114))
    kg = 1.0 - kr - kb
    y = planes[:, :height].float()
    uv = planes[:, height:, : width - width % 2].reshape(planes.shape[0], rows - height, -1, 2).float()
    uv = uv.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    if uv.shape[2] < width:  # odd width: the last column takes the last chroma sample
        uv = torch.cat([uv, uv[:, :, -1:]], dim=2)
    uv = uv[:, :height, :width] - 128.0
    if full_range:
        y_scale, c_scale = 1.0, 1.0
    else:
        y, y_scale, c_scale = y - 16.0, 255.0 / 219.0, 255.0 / 224.0
    y = y * y_scale
    u, v = uv[..., 0] * c_scale, uv[..., 1] * c_scale
    r = y + 2.0 * (1.0 - kr) * v
    g = y - (2.0 * kb * (1.0 - kb) / kg) * u - (2.0 * kr * (1.0 - kr) / kg) * v
    b = y + 2.0 * (1.0 - kb) * u
    return torch.stack([r, g, b], dim=-1).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# decoders, kept per process


class _DecoderPool:
    """Idle `SimpleDecoder`s per GPU. A load takes one per part and gives them back when done; a taken
    decoder is pointed at the new file with `reconfigure_decoder`, which keeps its hardware session."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: dict[int, list] = {}
        self.created = 0

    def take(self, library, path: str, gpu_id: int, traits: StreamTraits) -> tuple[object, bool]:
        """A decoder for `path` and whether it was created now (paying the start-up)."""
        with self.lock:
            decoder = self.idle.get(gpu_id, []).pop() if self.idle.get(gpu_id) else None
        if decoder is not None:
            try:
                decoder.reconfigure_decoder(path)
                return decoder, False
            except Exception:  # noqa: BLE001 - e.g. a larger frame than it was made for: make a new one
                del decoder
        decoder = library.SimpleDecoder(
            path,
            gpu_id=gpu_id,
            use_device_memory=True,
            # room for other files' sizes, so that the decoder can be reused (`reconfigure_decoder`)
            max_width=max(traits.width, 2048),
            max_height=max(traits.height, 2048),
            output_color_type=library.OutputColorType.NATIVE,
        )
        with self.lock:
            self.created += 1
        return decoder, True

    def give_back(self, decoder, gpu_id: int) -> None:
        with self.lock:
            self.idle.setdefault(gpu_id, []).append(decoder)

    def clear(self) -> None:
        with self.lock:
            self.idle.clear()


_POOL = _DecoderPool()


def clear_decoders() -> None:
    """Let go of the decoders kept for later loads (they are freed once nothing holds them)."""
    _POOL.clear()


# ----------------------------------------------------------------------------------------
# decoding


@dataclass
class _Output:
    """The CPU buffer the decoder threads fill (allocated at the first converted frames)."""

    count: int
    name: str
    pin_memory: bool
    listener: object = None
    tensor: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, frames: torch.Tensor, slot_lists: list[list[int]]) -> None:
        with self.lock:
            if self.tensor is None:
                _check_aspect_ratio(frames.shape[1], frames.shape[2], self.name)
                self.tensor = torch.empty(
                    (self.count, *frames.shape[1:]), dtype=torch.uint8, pin_memory=self.pin_memory
                )
            if frames.shape[1:] != self.tensor.shape[1:]:
                self.notes.append(
                    f"{self.name}: frame size changes inside the stream ({tuple(frames.shape[1:3])} vs "
                    f"{tuple(self.tensor.shape[1:3])}); later frames are resized to the first size"
                )
                resize = True
            else:
                resize = False
        if resize:
            frames = resize_frames(frames.permute(0, 3, 1, 2), tuple(self.tensor.shape[1:3])).permute(0, 2, 3, 1)
        host = frames.to("cpu")  # one copy per chunk, synchronous: the decoder may reuse its surfaces next
        slots = [slot for slot_list in slot_lists for slot in slot_list]
        index = torch.tensor([i for i, slot_list in enumerate(slot_lists) for _ in slot_list])
        self.tensor[torch.tensor(slots)] = host[index]
        if self.listener is not None:
            self.listener(self.tensor, slots)


@dataclass
class _Job:
    library: object
    path: str
    gpu_id: int
    device: torch.device
    traits: StreamTraits
    total_frames: int
    slots: dict[int, list[int]]
    max_longer_edge: int | None
    output: _Output
    stop: threading.Event = field(default_factory=threading.Event)


def decode_wanted_nvdec(
    path: str, *, name: str, facts, traits: StreamTraits, wanted: list[int], num_workers: int | None,
    max_longer_edge: int | None, pin_memory: bool, listener=None,
) -> tuple[torch.Tensor, dict[str, int], list[str]]:
    """Decode the frames at presentation indices `wanted` (sorted, repeats allowed) with NVDEC.

    Returns the (len(wanted), H, W, 3) uint8 CPU frames, the statistics (``decoders``, ``workers``,
    ``decoders_created``: how many paid the start-up in this load, ``decoded_frames``: the distinct
    sampled frames the decoders returned) and the notes.
    """
    library, reason = _import_library()
    if library is None:
        raise VideoLoadError(f"{name}: {reason}")
    device = _device()
    targets = sorted(set(wanted))
    # unmeasured rule of thumb: a decoder per CHUNK_FRAMES sampled frames, at most MAX_DECODERS
    automatic = max(1, min(MAX_DECODERS, len(targets) // CHUNK_FRAMES))
    parts = _plan_parts(targets, facts.index, num_workers or automatic)
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(wanted):
        slots.setdefault(i, []).append(slot)
    output = _Output(len(wanted), name, pin_memory and torch.cuda.is_available(), listener)
    job = _Job(
        library, path, device.index or 0, device, traits, facts.total_frames, slots, max_longer_edge, output
    )
    if len(parts) == 1:
        created = [_decode_part(job, parts[0].targets)]
    else:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="load_video_nvdec") as pool:
            futures = [pool.submit(_decode_part, job, part.targets) for part in parts]
            try:
                created = [future.result() for future in futures]
            finally:
                job.stop.set()
    if output.tensor is None:
        raise VideoLoadError(f"{name}: no video frame could be decoded")
    stats = {
        "decoded_frames": len(targets),
        "decoders": len(parts),
        "workers": len(parts),
        "decoders_created": sum(created),
    }
    return output.tensor, stats, output.notes


def _decode_part(job: _Job, targets: list[int]) -> bool:
    """Decode one part's targets with a pooled decoder; returns whether the decoder was created now."""
    decoder, created = _POOL.take(job.library, job.path, job.gpu_id, job.traits)
    try:
        available = len(decoder)
        asked = [min(i, available - 1) for i in targets]
        if asked != targets:
            with job.output.lock:
                job.output.notes.append(
                    f"{job.output.name}: NVDEC counts {available} frames where PyAV counts {job.total_frames}; "
                    "the sampled frames past its end are its last frame"
                )
        for start in range(0, len(targets), CHUNK_FRAMES):
            if job.stop.is_set():
                break
            frames = decoder.get_batch_frames_by_index(asked[start : start + CHUNK_FRAMES])
            planes = torch.stack([_nv12_plane(frame, job.traits.width) for frame in frames]).to(job.device)
            rgb = _upright_and_sized(job, nv12_to_rgb(planes, job.traits.colorspace, job.traits.full_range))
            job.output.write(rgb, [job.slots[i] for i in targets[start : start + CHUNK_FRAMES]])
    except BaseException:
        job.stop.set()
        raise
    finally:
        _POOL.give_back(decoder, job.gpu_id)
    return created


def _nv12_plane(frame, width: int) -> torch.Tensor:
    """A decoded frame as its (1.5H, W) NV12 plane (DLPack, no copy): the library gives that shape; a
    trailing unit axis or a flat buffer is folded back."""
    plane = torch.from_dlpack(frame)
    if plane.ndim == 3 and plane.shape[-1] == 1:
        plane = plane[..., 0]
    elif plane.ndim == 1 and width:
        plane = plane.reshape(-1, width)
    return plane


def _upright_and_sized(job: _Job, rgb: torch.Tensor) -> torch.Tensor:
    turns = round(job.traits.rotation / 90.0) % 4
    if turns:  # counter-clockwise, as the PyAV path
        rgb = torch.rot90(rgb, k=turns, dims=(1, 2)).contiguous()
    if job.max_longer_edge is not None:
        rgb = _limit_longer_edge(rgb, job.max_longer_edge, "torch")
    return rgb


def describe() -> dict:
    """What this process has of NVDEC: whether the library imports, and the decoders kept."""
    library, reason = _import_library()
    return {
        "library": getattr(library, "__version__", None) if library is not None else None,
        "unavailable": reason,
        "decoders_created": _POOL.created,
        "decoders_idle": sum(len(v) for v in _POOL.idle.values()),
    }
