"""The buffer that the decoding threads fill with the sampled frames, upright and optionally shrunk."""

from __future__ import annotations

import bisect
import threading

import numpy as np
import torch

from .frame_geometry import longer_edge_size, resize_frames, resize_frames_pil
from .video_metadata import VideoLoadError, _check_aspect_ratio


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

    `put` and `flush` take the worker's `video_decoding._Part`: its number, its notes and its
    staging batch.
    """

    STAGING_FRAMES = 32

    def __init__(
        self, count, name, *, max_longer_edge, stream_rotation, pin_memory=False, bar=None, listener=None,
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

    def put(self, index: int, frame, slots: list[int], part) -> None:
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

    def flush(self, part) -> None:
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


def _limit_longer_edge(frames: torch.Tensor, limit: int, resize_backend: str = "torch") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the same with the processor's longer-edge resize applied."""
    height, width = frames.shape[1:3]
    size = longer_edge_size(height, width, limit)
    if size == (height, width):
        return frames
    if resize_backend == "pil":
        return resize_frames_pil(frames, [size]).permute(0, 2, 3, 1).contiguous()
    return resize_frames(frames.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()
