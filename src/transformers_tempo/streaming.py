"""Answer a video while it is still decoding.

Decoding an hour-long file takes the CPU seconds; compressing its segments takes the GPU about
one. Every compressor row is independent of the others (its own segment, its own query prompt),
so a segment can be compressed as soon as its 8 frames are decoded. Here `load_video` decodes in
a background thread and reports every frame it writes (`on_frames`); the caller's thread
preprocesses and compresses segments, `compressor_batch_size` at a time, while the decoder is
still working on later ones. Only what needs every segment waits for the end of the file: the
last chunk, ATA (its budget is shared by all segments), the splice and the decoder.

The result is the function of the plain path (`processor(...)` then `model.generate(...)`):
the same prompts (the processor builds them from a `PendingVideo`, which needs only the number
of frames, their rate and size), the same pixels (`process_video` on whole segments), the same
compressor rows; only the way rows are grouped into chunks differs, as between chunk sizes.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

from .modeling_tempo import TempoCompressorOutput
from .processing_tempo import PendingVideo
from .token_allocation import ATA_OPTION_NAMES
from .video_loading import FramesReady, LoadedVideo, load_video

__all__ = ["StreamedVideo", "compress_streaming", "generate_streaming"]



@dataclass
class StreamedVideo:
    """A video compressed while it decoded.

    Attributes:
        inputs: the processor's inputs for it (prompts, compressor rows, `video_grid_thw`, no
            pixels), on the compressor's device.
        compressed: features and relevance score of every segment, in segment order.
        video: the decoded video (frames, timing, warnings).
        stats: `decode_s` (start to last frame), `total_s` (start to last segment compressed),
            `segments`, `compressed_while_decoding` (segments done before the last frame),
            `recompressed` (segments done again because a frame was replaced after they were
            compressed: a frame that failed to decode is replaced by an earlier one at the end).
    """

    inputs: BatchFeature
    compressed: TempoCompressorOutput
    video: LoadedVideo
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Finished:
    video: LoadedVideo | None = None
    error: BaseException | None = None
    at: float = 0.0  # time.perf_counter() when decoding ended


class _Cancelled(Exception):
    """Raised in the decoding threads when the caller's side failed: no point decoding on."""


def compress_streaming(
    model,
    processor,
    video: Any,
    question: str = "",
    compressor_batch_size: int | None = None,
    video_metadata: Any = None,
    **load_options,
) -> StreamedVideo:
    """Decode `video` in a background thread and compress its segments as their frames arrive.

    Args:
        model: a `TempoForConditionalGeneration`.
        processor: its `TempoProcessor`.
        video: anything `load_video` takes (a path above all; frames given directly are all
            there at once, so nothing overlaps).
        question: the query the compressor rows are conditioned on.
        compressor_batch_size: segments per compressor call (default: the model config's). The
            compressor starts once this many segments are decoded and always takes this many
            (the last call excepted), so compiled code keeps seeing one batch size.
        video_metadata: for frames given directly, their rate (`{"fps": ...}`), as `load_video` takes it.
        load_options: `fps`, `min_frames`, `max_frames`, `num_workers`, `num_threads` of
            `load_video` (default: the video processor's sampling).

    Raises:
        ValueError: the video cannot be read (the message says why, as `load_video`'s).
    """
    vp = processor.video_processor
    options = {"fps": vp.fps, "min_frames": vp.min_frames, "max_frames": vp.max_frames}
    options.update({k: v for k, v in load_options.items() if v is not None})
    device = model.model.memory_tokens.device
    chunk = int(compressor_batch_size or model.config.compressor_batch_size)
    per_segment = vp.frames_per_segment

    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def report(frames_ready: FramesReady) -> None:  # runs in the decoding threads
        if cancelled.is_set():
            raise _Cancelled()
        events.put(frames_ready)

    def decode() -> None:
        try:
            # Pageable memory: page-locking a 1024-frame 720p buffer took 3 s on an H100 machine, on
            # the critical path of the first frame; the uploads it would speed up overlap decoding here.
            loaded = load_video(video, video_metadata=video_metadata, on_frames=report, **options)
            events.put(_Finished(video=loaded, at=time.perf_counter()))
        except BaseException as error:  # handed to the caller's thread
            events.put(_Finished(error=error, at=time.perf_counter()))

    start = time.perf_counter()
    thread = threading.Thread(target=decode, name="tempo-stream-decode", daemon=True)
    thread.start()

    state = None
    try:
        while True:
            event = events.get()
            if isinstance(event, _Finished):
                break
            if state is None:
                state = _Segments(model, processor, question, event, chunk, per_segment, device)
            state.frames_written(event.slots)
            while len(state.ready) >= chunk:
                state.compress(sorted(state.ready)[:chunk])
    except BaseException:
        cancelled.set()  # the decoders stop at their next frame
        raise
    thread.join()
    if isinstance(event.error, (ValueError, OSError)):  # VideoLoadError among them: the video is bad
        raise ValueError(f"could not read the video: {event.error}") from event.error
    if event.error is not None:
        raise event.error
    decode_s = event.at - start
    if state is None:  # pragma: no cover - load_video reports every frame it returns
        raise RuntimeError("the video decoded without reporting its frames")
    while_decoding = state.done_count
    state.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = {
        "decode_s": decode_s,
        "total_s": time.perf_counter() - start,
        "segments": state.num_segments,
        "compressed_while_decoding": while_decoding,
        "recompressed": state.recompressed,
    }
    compressed = TempoCompressorOutput(features=state.features, relevance_scores=state.scores)
    return StreamedVideo(inputs=state.inputs, compressed=compressed, video=event.video, stats=stats)


class _Segments:
    """Which segments have all their frames, which are compressed, and the compressor's outputs."""

    def __init__(self, model, processor, question, first: FramesReady, chunk, per_segment, device):
        self.model, self.processor, self.chunk, self.per_segment, self.device = model, processor, chunk, per_segment, device
        self.frames = first.frames  # the loader's output buffer, filled as decoding goes
        self.real_fps = first.real_fps
        num_frames, height, width = (int(x) for x in self.frames.shape[:3])
        self.num_frames = num_frames
        pending = PendingVideo(num_frames=num_frames, real_fps=first.real_fps, height=height, width=width)
        self.inputs = processor(text=question, videos=pending, return_tensors="pt").to(device)
        self.num_segments = int(self.inputs["video_grid_thw"].shape[0])
        self.missing = [min(per_segment, num_frames - s * per_segment) for s in range(self.num_segments)]
        self.seen: set[int] = set()
        self.ready: set[int] = set()  # all frames in, not compressed yet
        self.done: set[int] = set()
        self.stale: set[int] = set()  # compressed, then one of its frames changed
        self.recompressed = 0
        self.features = None
        self.scores = torch.empty(self.num_segments, dtype=torch.float32, device=device)

    @property
    def done_count(self) -> int:
        return len(self.done)

    def frames_written(self, slots: list[int]) -> None:
        for slot in slots:
            segment = slot // self.per_segment
            if segment in self.done:
                self.stale.add(segment)
            elif slot not in self.seen:
                self.missing[segment] -= 1
                if self.missing[segment] == 0:
                    self.ready.add(segment)
            self.seen.add(slot)

    def finish(self) -> None:
        """After the last frame: every segment left (and any stale one) is final now."""
        left = sorted(self.ready | self.stale | (set(range(self.num_segments)) - self.done))
        self.recompressed = len(self.stale)
        for begin in range(0, len(left), self.chunk):
            self.compress(left[begin : begin + self.chunk])

    def compress(self, segments: list[int]) -> None:
        vp = self.processor.video_processor
        pixels, grids = [], []
        for first, last in _runs(segments):  # consecutive segments are one slice of the buffer
            clip = self.frames[first * self.per_segment : min((last + 1) * self.per_segment, self.num_frames)]
            out = vp.process_video(
                clip,
                self.real_fps,
                device=self.device if self.device.type != "cpu" else None,
                frames_per_segment=self.per_segment,
                dtype=self.model.dtype,
            )
            pixels.append(out["pixel_values_videos"])
            grids.append(out["video_grid_thw"].to(self.device))
        rows = torch.tensor(segments, device=self.device)
        grid = torch.cat(grids)
        if not torch.equal(grid, self.inputs["video_grid_thw"][rows]):  # pragma: no cover - an internal check
            raise RuntimeError("segment grids differ from the planned ones; the frames changed size while decoding")
        with torch.inference_mode():
            out = self.model.compress(
                self.inputs["compressor_input_ids"][rows],
                self.inputs["compressor_attention_mask"][rows],
                pixel_values_videos=torch.cat(pixels).to(self.device),
                video_grid_thw=grid,
                compressor_batch_size=len(segments),
            )
        if self.features is None:
            self.features = out.features.new_empty(self.num_segments, *out.features.shape[1:])
        self.features[rows] = out.features
        self.scores[rows] = out.relevance_scores
        self.ready.difference_update(segments)
        self.stale.difference_update(segments)
        self.done.update(segments)


def _runs(sorted_items: list[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive integers."""
    runs = []
    for item in sorted_items:
        if runs and item == runs[-1][1] + 1:
            runs[-1][1] = item
        else:
            runs.append([item, item])
    return [(a, b) for a, b in runs]


def generate_streaming(
    model,
    processor,
    video: Any,
    question: str = "",
    compressor_batch_size: int | None = None,
    load_options: dict | None = None,
    **generate_kwargs,
):
    """`processor(text=question, videos=video)` + `model.generate(...)`, with the compressor working
    while the file decodes. Takes `generate`'s keyword arguments (ATA options included) and returns
    what `generate(decoder_inputs=...)` returns: the new tokens only, one row (no prompt ids lead
    them). `load_options` go to `load_video` (`fps`, `max_frames`, `num_workers`...).
    """
    streamed = compress_streaming(
        model, processor, video, question, compressor_batch_size=compressor_batch_size, **(load_options or {})
    )
    ata = {name: generate_kwargs.pop(name) for name in ATA_OPTION_NAMES if name in generate_kwargs}
    text = {k: v for k, v in streamed.inputs.items() if k != "segment_times"}
    with torch.inference_mode():
        prepared = model.prepare_generation_inputs(**text, compressed=streamed.compressed, **ata)
        return model.generate(decoder_inputs=prepared, **generate_kwargs)
