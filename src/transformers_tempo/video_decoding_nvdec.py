"""Decoding the sampled frames of a file on the GPU with NVDEC (PyNvVideoCodec), as an optional backend.

`video_loading.load_video(..., backend="nvdec")` probes the file with PyAV and computes the sampled
frame indices exactly as the PyAV path does; only the decoding differs. The wanted frames are cut into
the same keyframe-aligned parts as `video_decoding._plan_parts` makes for PyAV workers, and each part is
decoded by a `PyNvVideoCodec.SimpleDecoder` of its own, in a thread of its own (NVDEC engines decode in
parallel; a GPU has a few of them, 7 on an H200). NVDEC is used only when asked for: "auto" is PyAV
(`choose_backend` says why).

The decoder returns NV12 frames (a 1.5H x W plane) in GPU memory, read through DLPack without a host
copy. Colour conversion happens here, in torch on the GPU, not with the library's RGB output: the
conversion then uses the matrix and range the stream is tagged with (BT.601 when untagged, BT.709,
BT.2020; limited or full range) and repeats each chroma sample over its 2x2 pixels, as FFmpeg's
`rgb24` conversion in the PyAV path does, so the two backends give nearly the same pixels (within a
few grey levels on CPU tests) and the conversion can be checked without a GPU. Then the upright
rotation and the `max_longer_edge` resize (`video_frame_store._limit_longer_edge`, torch kernel) run on
the GPU, a few frames at a time (`CONVERT_FRAMES`), and the frames are copied into a CPU tensor (pinned
on request), so every consumer of a `LoadedVideo` is unchanged.

What is kept per process: the library import (or the reason it failed), and the decoders themselves.
Creating a decoder and getting its first frame costs seconds; a decoder that finished a load goes back
to a pool and the next load re-points it at its file (`reconfigure_decoder`), so only the first load of
a process pays the start-up.

PyNvVideoCodec is imported only here, and only when NVDEC is asked for.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .frame_geometry import resize_frames
from .video_decoding import _plan_parts
from .video_frame_store import _limit_longer_edge
from .video_metadata import VideoLoadError, _check_aspect_ratio

BACKENDS = ("auto", "pyav", "nvdec")
# Codecs NVDEC decodes (FFmpeg's names), and the GPU generations (compute capability majors) whose
# NVDEC lacks one: Hopper (9.x) has no AV1 decode.
NVDEC_CODECS = {"h264": (), "hevc": (), "vp9": (), "av1": (9,)}
# 8-bit 4:2:0 only: the decoder's output is then NV12 (10-bit streams give P016, 4:4:4 other layouts).
NVDEC_PIXEL_FORMATS = ("yuv420p", "yuvj420p", "nv12")
# Automatic number of decoders, at most: the 7 NVDEC engines of an H200 (and an H100). Measured on one
# NVIDIA H200 machine, 1024 sampled frames of a 1-hour 720p H.264 file: 2 / 4 / 7 decoders took 22.5 /
# 12.7 / 8.7 s (reused decoders). A GPU with fewer engines time-slices the extra decoders.
MAX_DECODERS = 7
# Sampled frames per decoder call: bounds the NV12 frames the decoder holds at once (720p: 1.4 MB each).
CHUNK_FRAMES = 32
# Frames converted and resized together. Per decoder thread, at 1280x720 and 8 frames: the NV12 stack
# 11 MB, luma in float32 29.5 MB, chroma in float32 14.7 MB (+ its products, 7.4 MB each), one full-size
# float32 channel 29.5 MB and the uint8 RGB 22 MB: about 0.13 GB while converting; the resize to 512
# then holds the frames in float32 (88 MB) and its output: about 0.13 GB, after the conversion's
# buffers are freed. So about 0.15 GB per thread, about 1 GB for 7 threads (it was 32 frames with
# several full-size float32 intermediates at once: over 1 GB per thread).
CONVERT_FRAMES = 8
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


def choose_backend(requested: str, source, name: str, facts, resize_backend: str) -> tuple[str, StreamTraits | None]:
    """The backend that decodes `source` ("pyav" or "nvdec") and, for NVDEC, the stream's traits.

    "auto" and "pyav": PyAV. "nvdec": NVDEC, or an error saying why it cannot be used.

    "auto" is PyAV because PyAV is the faster for Tempo's sampled loads of long files. Measured on one
    NVIDIA H200 machine with 16 CPU cores, 1024 frames sampled from a 1-hour 720p H.264 file (keyframe
    every 3 s): PyAV with 8 range workers 7.6 s, NVDEC with 2 / 4 / 7 decoders 22.5 / 12.9 / 9.2 s; a
    first question took 8.2 s with PyAV and 13.8 s with NVDEC (4 decoders). NVDEC wins when every frame
    of a range is decoded (3.4x PyAV's frames per second there), not when a few frames per keyframe
    interval are.
    """
    if requested != "nvdec":
        return "pyav", None
    if resize_backend == "pil":
        raise ValueError(
            "backend='nvdec' with resize_backend='pil': the exact (PIL) mode reproduces PyAV's pixels; "
            "use backend='pyav' or 'auto'"
        )
    reason = unusable_reason(source)
    traits = None
    if reason is None:
        traits = read_stream_traits(source, facts.number, facts.rotation)
        reason = unusable_reason(source, traits)
    if reason is not None:
        raise VideoLoadError(f"{name}: backend='nvdec' cannot be used: {reason}")
    return "nvdec", traits


# ----------------------------------------------------------------------------------------
# colour conversion

# (Kr, Kb) of the luma equation for FFmpeg's AVColorSpace values; anything else is BT.601, as in FFmpeg.
_LUMA_COEFFICIENTS = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def nv12_to_rgb(planes: torch.Tensor, colorspace: int = 2, full_range: bool = False) -> torch.Tensor:
    """(N, 1.5H, W) uint8 NV12 planes -> (N, H, W, 3) uint8 RGB, on the planes' device.

    Luma rows first, then H/2 rows of interleaved (U, V) pairs. Each chroma sample covers its 2x2
    pixels (no interpolation), and the matrix follows the stream's tags, as FFmpeg's `rgb24`
    conversion does. The chroma terms are computed at chroma resolution and spread over the pixels one
    output channel at a time, so that besides the luma one full-size float32 plane exists at once.
    """
    if planes.dtype != torch.uint8 or planes.ndim != 3:
        raise ValueError(f"expected (N, 1.5H, W) uint8 NV12 planes, got {tuple(planes.shape)} {planes.dtype}")
    count, rows, width = planes.shape
    height = 2 * rows // 3
    kr, kb = _LUMA_COEFFICIENTS.get(int(colorspace), (0.299, 0.114))
    kg = 1.0 - kr - kb
    y = planes[:, :height].float()
    uv = planes[:, height:, : width - width % 2].reshape(count, rows - height, -1, 2).float().sub_(128.0)
    if not full_range:
        y.sub_(16.0).mul_(255.0 / 219.0)
        uv.mul_(255.0 / 224.0)
    u, v = uv[..., 0], uv[..., 1]
    chroma_terms = (  # what each of R, G, B adds to the luma, per chroma sample
        2.0 * (1.0 - kr) * v,
        -(2.0 * kb * (1.0 - kb) / kg) * u - (2.0 * kr * (1.0 - kr) / kg) * v,
        2.0 * (1.0 - kb) * u,
    )
    # the chroma sample of each pixel row and column (an odd last column or row takes the last one)
    sample_rows = (torch.arange(height, device=planes.device) // 2).clamp_(max=u.shape[1] - 1)
    sample_columns = (torch.arange(width, device=planes.device) // 2).clamp_(max=u.shape[2] - 1)
    rgb = torch.empty((count, height, width, 3), dtype=torch.uint8, device=planes.device)
    for channel, term in enumerate(chroma_terms):
        full = term[:, sample_rows[:, None], sample_columns]
        rgb[..., channel] = full.add_(y).round_().clamp_(0, 255)
    return rgb


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
    # a decoder per CHUNK_FRAMES sampled frames (a short load pays no start-up it cannot use), at most
    # MAX_DECODERS
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
            for sub in range(0, len(frames), CONVERT_FRAMES):  # bounds the GPU memory of the conversion
                chunk = frames[sub : sub + CONVERT_FRAMES]
                planes = torch.stack([_nv12_plane(frame, job.traits.width) for frame in chunk]).to(job.device)
                rgb = _upright_and_sized(job, nv12_to_rgb(planes, job.traits.colorspace, job.traits.full_range))
                del planes
                first = start + sub
                job.output.write(rgb, [job.slots[i] for i in targets[first : first + len(chunk)]])
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
