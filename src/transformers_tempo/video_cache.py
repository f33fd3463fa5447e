"""Decode a video once, answer many questions about it.

Most use asks several questions about one video (a benchmark's questions per video, follow-ups in a
chat, an archive queried again and again). Two results do not depend on the question and are kept
here for the next one:

* the decoded, sampled frames (`LoadedVideo`), in host memory, keyed by the file's identity and the
  sampling options;
* the compressor's vision-tower output of each segment (`modeling_tempo.VisionFeatures`: merged tokens plus
  Qwen3-VL's deepstack features), where the model runs, keyed by the same video, the preprocessing
  and the model's weights. The compressor's language model reads the question, so it runs again.

Both stores are LRUs bounded in bytes. `default_video_cache()` is the one the processor and the
pipeline use; `configure_video_cache(...)` sets its limits or turns it off, `.clear()` empties it.
The environment variable `TEMPO_VIDEO_CACHE=0` turns it off for a whole process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

__all__ = [
    "LRUByteCache",
    "VideoCache",
    "configure_video_cache",
    "default_video_cache",
    "video_identity",
]

GiB = 1024**3
# A 1024-frame 720p video decodes to 2.8 GB of uint8 frames; 4 GiB keeps the last one or two hours of
# video a process looked at (or many more at 512 px, see `load_video(max_longer_edge=...)`).
DEFAULT_MAX_HOST_BYTES = 4 * GiB
# The vision-tower output of Tempo-6B's compressor is about 8 MB per 8-frame segment in bfloat16
# (512 merged tokens x 2048 x (1 + 3 deepstack layers) x 2 bytes), so ~1 GB per 1024-frame video.
DEFAULT_MAX_DEVICE_BYTES = 2 * GiB


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in `value` (a tensor, or lists/tuples/dicts/dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


class LRUByteCache:
    """A least-recently-used map whose values are sized in bytes; the oldest go when the sum exceeds
    `max_bytes`. A value larger than the limit is not kept. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key):
        with self._lock:
            if key not in self._entries:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][0]

    def put(self, key, value, nbytes: int | None = None) -> bool:
        """Keep `value`; returns whether it was kept (False when it alone exceeds the limit)."""
        size = tensor_bytes(value) if nbytes is None else int(nbytes)
        with self._lock:
            self._entries.pop(key, None)
            if size > self.max_bytes:
                return False
            self._entries[key] = (value, size)
            total = sum(s for _, s in self._entries.values())
            while total > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                total -= evicted
                self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        return {
            "entries": len(self), "bytes": self.nbytes, "max_bytes": self.max_bytes,
            "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
        }


def video_identity(video: Any) -> tuple | None:
    """What identifies a video's content without decoding it, or None when it cannot be cached.

    A path: its resolved path, size and modification time (a rewritten file is a new video).
    Bytes: a SHA-1 of the content. File objects and frames in memory are not cached (the caller
    holds them already; reading a stream to hash it would consume it).
    """
    if isinstance(video, (str, os.PathLike)):
        try:
            stat = os.stat(video)
        except OSError:
            return None  # missing: let the loader say so
        return ("file", os.path.realpath(video), stat.st_size, stat.st_mtime_ns)
    if isinstance(video, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(bytes(video)).hexdigest())
    return None


def _freeze(options: dict) -> tuple:
    """A hashable, order-free form of keyword options (dicts and lists inside become tuples)."""

    def frozen(value):
        if isinstance(value, dict):
            return tuple(sorted((k, frozen(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, (torch.device, torch.dtype)):
            return str(value)
        try:
            hash(value)
        except TypeError:  # e.g. a VideoMetadata: its text stands for it
            return repr(value)
        return value

    return frozen({k: v for k, v in options.items() if v is not None})


class VideoCache:
    """Decoded videos (host memory) and their vision-tower features (device memory), both LRUs.

    Args:
        max_host_bytes: limit for decoded frames (default 4 GiB).
        max_device_bytes: limit for vision-tower features (default 2 GiB); they stay where the model
            computed them (GPU memory on a GPU).
        enabled: False turns both stores off (every call decodes and encodes again).
    """

    def __init__(
        self, max_host_bytes: int = DEFAULT_MAX_HOST_BYTES, max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.frames = LRUByteCache(max_host_bytes)
        self.features = LRUByteCache(max_device_bytes)

    def clear(self) -> None:
        """Drop everything (frees the memory once no caller holds the values)."""
        self.frames.clear()
        self.features.clear()

    def stats(self) -> dict:
        return {"enabled": self.enabled, "frames": self.frames.stats(), "features": self.features.stats()}

    # -- decoded frames --------------------------------------------------------------------------
    def load_video(self, video: Any, **load_options):
        """`video_loading.load_video(video, **load_options)`, decoded once per file and options.

        Options that only change how fast a video decodes (threads, workers, progress, pinning,
        callbacks) are not part of the key; a cached video is returned as it was decoded. The decoder is
        ("auto" and "pyav" are one, PyAV; "nvdec"): the two decoders' pixels differ slightly.
        """
        from .video_loading import load_video

        key = self.frames_key(video, load_options)
        if key is None:
            return load_video(video, **load_options)
        loaded = self.frames.get(key)
        if loaded is None:
            loaded = load_video(video, **load_options)
            self.frames.put(key, loaded, tensor_bytes(loaded.frames))
        elif load_options.get("on_frames") is not None:
            from .video_loading import FramesReady

            load_options["on_frames"](FramesReady(loaded.frames, list(range(loaded.num_frames)), loaded.real_fps))
        return loaded

    def frames_key(self, video: Any, load_options: dict) -> tuple | None:
        """Key of a decoded video: its identity (`video_identity`) and the options that change the
        frames. None when it cannot be cached (frames in memory, file objects, cache off)."""
        if not self.enabled:
            return None
        identity = video_identity(video)
        if identity is None:
            return None
        speed_only = {"num_threads", "num_workers", "progress", "pin_memory", "on_frames"}
        options = {k: v for k, v in load_options.items() if k not in speed_only}
        # The decoder is part of the key (NVDEC's colour conversion differs from PyAV's by a few grey
        # levels); "auto" (the default, given or not) decodes with PyAV, so it shares PyAV's entries.
        backend = options.get("backend") or "auto"
        options["backend"] = "pyav" if backend == "auto" else backend
        return identity, _freeze(options)

    # -- vision-tower features -------------------------------------------------------------------
    def features_key(self, frames_key: tuple | None, model, processing: dict) -> tuple | None:
        """Key of a video's vision features: its frame-cache key, the preprocessing options, and the
        model's vision weights (their identity and in-place version, so that a training step or a
        weight reload computes them again). None (do not cache) while training or with gradients on."""
        if frames_key is None or not self.enabled or model.training or torch.is_grad_enabled():
            return None
        visual = _vision_tower(model)
        weight = next(visual.parameters())
        weights = (id(visual), weight.data_ptr(), weight._version, str(weight.device), str(weight.dtype))
        return frames_key, _freeze(processing), weights


def _vision_tower(model):
    body = model.model if hasattr(model, "model") else model
    return body.compressor.visual


_DEFAULT_CACHE: VideoCache | None = None


def default_video_cache() -> VideoCache:
    """The process-wide cache used by `TempoProcessor` and the pipeline (off if `TEMPO_VIDEO_CACHE=0`)."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = VideoCache(enabled=os.environ.get("TEMPO_VIDEO_CACHE", "1") not in ("0", "false", "off"))
    return _DEFAULT_CACHE


def configure_video_cache(
    max_host_bytes: int | None = None, max_device_bytes: int | None = None, enabled: bool | None = None
) -> VideoCache:
    """Change the default cache's limits or turn it on/off; entries over a new limit are dropped."""
    cache = default_video_cache()
    if enabled is not None:
        cache.enabled = bool(enabled)
        if not enabled:
            cache.clear()
    for store, limit in ((cache.frames, max_host_bytes), (cache.features, max_device_bytes)):
        if limit is not None:
            store.max_bytes = int(limit)
            while store.nbytes > store.max_bytes and len(store):
                store._entries.popitem(last=False)
                store.evictions += 1
    return cache
