"""Decoding the sampled frames of a file: the wanted frames cut into keyframe-aligned parts, one thread
and one container per part, and a cursor that decodes forward or seeks to a keyframe when that skips enough."""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .video_frame_store import _FrameStore
from .video_probing import _Reader, _StreamIndex

# Seek to the next wanted frame's keyframe only when that skips at least this many frames;
# below it, decoding forward is as cheap as a seek (which also drains the threaded decoder).
SEEK_MIN_SKIPPED_FRAMES = 32
# Automatic num_workers: one worker per this many frames to decode (fewer: one worker; opening
# another container and filling another FFmpeg thread pool costs about what decoding a few dozen
# frames does), and never more than MAX_WORKERS or the number of cores.
MIN_FRAMES_PER_WORKER = 500
MAX_WORKERS = 8
# Ask the decoder to drop the non-reference pictures (most B-frames) that the sampler does not
# want, instead of decoding them on the way to the wanted ones. It is exact: a non-reference
# picture is never used to predict another, so every other picture decodes to the same pixels
# (the tests compare the sampled frames bit for bit with it on and off). FFmpeg reads
# `skip_frame` for each packet it is sent (the frame-threaded decoder copies it when the packet
# is submitted), so it is set packet by packet from the packet's presentation index. Switch it
# off (False) to time decoding without it (bench_decode_backends.py --pyav-without-skipping
# times both). On a one-hour 720p H.264 file with 3 B-frames between references, 1024 sampled
# frames took 24,552 decoded pictures instead of 47,310 and 5.6-6.2 s instead of 8.0-8.2 s (8
# workers, one machine with 16 cores).
SKIP_UNWANTED_NONREF = True


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
    stats: dict[str, int] = field(
        default_factory=lambda: {"decoded_frames": 0, "seeks": 0, "nonref_marked_packets": 0}
    )
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
    reader: _Reader, *, stream_number, index, wanted, num_workers, num_threads, notes, progress, max_longer_edge,
    rotation, pin_memory, listener=None, resize_backend="torch",
) -> tuple[torch.Tensor, dict[str, int]]:
    """Decode the frames at presentation indices `wanted` (sorted, repeats allowed), a thread per part.

    Returns the (len(wanted), H, W, 3) frames and the decoding statistics (``decoded_frames``: the
    frames the decoders returned, ``seeks``, ``nonref_marked_packets``: packets of unwanted frames
    sent with FFmpeg's skip_frame NONREF, of which the decoder drops those holding non-reference
    pictures, ``workers``); the notes of every part are added to `notes`, in file order.
    """
    # Only a path can be opened once per worker; bytes and file objects have one reader.
    parts = _plan_parts(sorted(set(wanted)), index, num_workers if isinstance(reader.source, str) else 1)
    if len(parts) == 1:
        thread_count = num_threads or 0  # 0: FFmpeg's choice
    else:
        thread_count = num_threads or max(1, _cpu_count() // len(parts))
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(wanted):
        slots.setdefault(i, []).append(slot)
    bar = None
    if progress:
        from transformers.utils.logging import tqdm  # honours disable_progress_bar()

        bar = tqdm(total=len(slots), desc="decoding", unit="frame")
    store = _FrameStore(
        len(wanted), reader.name, max_longer_edge=max_longer_edge, stream_rotation=rotation, pin_memory=pin_memory,
        bar=bar, listener=listener, resize_backend=resize_backend,
    )
    # The number of the first part that failed: the parts after it stop at their next target (one
    # decoder would never get there); those before it go on, as they may fail earlier in the file.
    job = _DecodeJob(reader, stream_number, index, slots, store, thread_count, first_failed=[len(parts)])
    try:
        _run_parts(job, parts)
    finally:
        if bar is not None:
            bar.close()
    _drop_frames_past_the_end(parts, store, notes)
    stats = {
        "decoded_frames": sum(part.stats["decoded_frames"] for part in parts),
        "seeks": sum(part.stats["seeks"] for part in parts),
        "nonref_marked_packets": sum(part.stats["nonref_marked_packets"] for part in parts),
        "workers": len(parts),
    }
    return store.finish(wanted, notes), stats


@dataclass
class _DecodeJob:
    """What the workers of one `_decode_wanted` call share."""

    reader: _Reader
    stream_number: int  # among the container's video streams
    index: _StreamIndex
    slots: dict[int, list[int]]  # presentation index -> its positions in the sampled sequence
    store: _FrameStore
    thread_count: int  # FFmpeg threads per container (0: FFmpeg's choice)
    first_failed: list[int]  # [number of the first part that failed]; len(parts) while none has


def _run_parts(job: _DecodeJob, parts: list[_Part]) -> None:
    if len(parts) == 1:
        _decode_part(job, parts[0])
        return
    with ThreadPoolExecutor(len(parts), thread_name_prefix="load_video") as pool:
        futures = [pool.submit(_decode_part, job, part) for part in parts]
        try:
            for future in futures:
                future.result()  # raises the first failure in file order, as one decoder meets it
        finally:
            job.first_failed[0] = -1  # all stop (after Ctrl-C, or once one has failed)


def _drop_frames_past_the_end(parts: list[_Part], store: _FrameStore, notes: list[str]) -> None:
    """One decoder stops for good where the stream ends or decoding fails. The parts after such a
    part decoded frames that one decoder never reaches: drop them and their notes, so that the
    frames and warnings do not depend on the number of workers."""
    for j, part in enumerate(parts):
        notes.extend(part.notes)
        if part.exhausted:
            for later in parts[j + 1 :]:
                for i in later.targets:
                    store.decoded.pop(i, None)
            break


def _decode_part(job: _DecodeJob, part: _Part) -> None:
    """Decode the targets of one part with a container of its own.

    The cursor starts at the beginning and seeks to the keyframe before the part's first target
    when that skips enough frames, exactly as one decoder walks the whole file; frames of other
    parts that it passes on the way are not stored.
    """
    store = job.store
    try:
        with job.reader.open() as container:
            stream = container.streams.video[job.stream_number]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = job.thread_count
            mine = set(part.targets)
            cursor = _Cursor(container, stream, job.index, job.reader.name, part.notes, part.stats, wanted=mine)
            stored: set[int] = set()
            for target in part.targets:
                if job.first_failed[0] < part.number:
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
                        store.put(i, frame, job.slots[i], part)
                        stored.add(i)
                    if i >= target:
                        break
                if cursor.exhausted:
                    part.exhausted = True
                    break
            store.flush(part)
    except BaseException:
        job.first_failed[0] = min(job.first_failed[0], part.number)
        raise
    finally:
        if part.number == 0:
            store.first_stored.set()  # also when the first part stored nothing


class _Cursor:
    """Walks the decoded frames of a stream, seeking to keyframes when that skips enough.

    With timestamps, the decoder drops the non-reference pictures that are not in `wanted`
    (SKIP_UNWANTED_NONREF); without them frames are counted in decoding order, so none is dropped.
    """

    def __init__(
        self, container, stream, index: _StreamIndex, name: str, notes: list[str], stats: dict[str, int],
        wanted: set[int] = frozenset(),
    ):
        self.container = container
        self.stream = stream
        self.index = index
        self.name = name
        self.notes = notes
        self.stats = stats
        self.pts_to_index = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        if self.pts_to_index is None:
            notes.append(f"{name}: packets lack unique timestamps; frames are counted in decoding order (no seeking)")
        self.wanted = wanted
        self.skip_unwanted = (
            SKIP_UNWANTED_NONREF and self.pts_to_index is not None and _nonref_skipping_is_exact(stream.codec_context)
        )
        self.frames = self._decode()
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
        self.frames = self._decode()
        self.position = -1
        self.seek_keyframe = k
        self.stats["seeks"] += 1

    def _decode(self):
        """The decoded frames from the demuxer's position on (`container.decode`, packet by packet)."""
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):  # ends with an empty packet that flushes
            if self.skip_unwanted:
                i = self.pts_to_index.get(packet.pts)  # None for the flushing packet
                if i is None or i in self.wanted:
                    context.skip_frame = "DEFAULT"
                else:
                    context.skip_frame = "NONREF"
                    self.stats["nonref_marked_packets"] += 1
            yield from packet.decode()

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


def _nonref_skipping_is_exact(codec_context) -> bool:
    """Whether FFmpeg's decoder of this stream drops only pictures that no other picture uses.

    H.264: a picture with nal_ref_idc 0. HEVC: a sub-layer non-reference picture, which pictures of
    higher temporal sub-layers may still use, so only when the stream has one sub-layer (read from
    the hvcC record of MP4/MKV: numTemporalLayers, bits 3-5 of byte 21). Other codecs: not skipped.
    """
    if codec_context.name == "h264":
        return True
    if codec_context.name == "hevc":
        record = codec_context.extradata
        return record is not None and len(record) > 22 and record[0] == 1 and (record[21] >> 3) & 7 == 1
    return False


def _nearest_index(sorted_pts: list[int], pts: int | None) -> int:
    if pts is None:
        return -1
    i = bisect.bisect_left(sorted_pts, pts)
    if i == len(sorted_pts):
        return len(sorted_pts) - 1
    if i > 0 and pts - sorted_pts[i - 1] < sorted_pts[i] - pts:
        return i - 1
    return i
