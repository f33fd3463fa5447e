"""The job behind `tempo batch`: answer many {id, video, question} items into a JSONL file, resumably.

One process, or data parallel under `accelerate launch` (one process per GPU). The steps:

1. Every process reads and checks the input (bad lines stop the run before any work, exit 2).
2. The main process folds what an earlier run left behind (the output and any `OUTPUT.rankN.part`
   files) into the output, so ids answered before are skipped, whatever the number of processes.
3. Each process takes every `num_processes`-th of the items still to do (a fixed, strided split),
   answers them in input order, `batch_size` at a time, and appends each finished line (answer or
   error) to its own `OUTPUT.rankN.part`, flushed and fsynced: a kill loses at most the line being
   written, and a torn last line is cut away when the file is read again. Each video is decoded
   once per process: several questions about it get the same decoded frames (`VideoDecoder`), and
   those in one model call the same vision features.
4. After all processes are done, the main process merges output + part files (one line per id, in
   input order) into a temporary file, renames it onto the output and deletes the part files.

An item that fails (missing or corrupt video, no video stream, bad per-item option, a ValueError
from the model) becomes a line `{"id": ..., "error": "..."}` and the run goes on. Such errors are
kept on resume, not retried, unless `--retry-errors` is given.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..atomic_files import atomic_file
from .common import UsageError

REQUIRED_KEYS = ("id", "video", "question")
# How far `VideoDecoder` looks for videos to decode ahead: this many items per video it may decode
# ahead (questions about videos already held or being decoded are passed over).
LOOKAHEAD_ITEMS = 8
# Per-item keys that override the command line for that item, and the pipeline option each sets.
ITEM_OPTIONS = {
    "budget": "visual_token_budget",
    "visual_token_budget": "visual_token_budget",
    "max_new_tokens": "max_new_tokens",
    "fps": "fps",
    "max_frames": "max_frames",
}
# What an answer line keeps from the pipeline's result (segment_details is left out: it is long).
RESULT_KEYS = (
    "answer",
    "duration",
    "sampled_frames",
    "real_fps",
    "segments",
    "visual_tokens",
    "tokens_per_frame",
    "warnings",
)


@dataclass
class BatchSettings:
    """Options of one run; per-item options override the first four."""

    visual_token_budget: int | None = None
    max_new_tokens: int = 64
    fps: float | None = None
    max_frames: int | None = None
    min_new_tokens: int | None = None
    temperature: float = 0.0
    use_ata: bool = True
    batch_size: int = 1
    retry_errors: bool = False
    base_dir: Path = Path(".")
    # decoded frames kept for later items of the same video (see VideoDecoder); 4 GiB holds a few
    # 1024-frame videos at the processor's size
    max_held_bytes: int = 4 * 1024**3
    decode_backend: str = "auto"  # load_video's backend: auto, pyav or nvdec
    decode_workers: int | None = None  # videos decoded at once (None: `default_decode_workers`)


# ------------------------------------------------------------------------------------- input
def read_items(path: str | os.PathLike) -> list[dict]:
    """The items of a JSONL input file; any bad line is a UsageError naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such input file")
    items, problems, first_line = [], [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"line {number}: not valid JSON ({err.msg})")
                continue
            problem = _item_problem(item)
            if problem is None and item["id"] in first_line:
                problem = f"duplicate id {item['id']!r} (first on line {first_line[item['id']]})"
            if problem is not None:
                problems.append(f"line {number}: {problem}")
                continue
            first_line[item["id"]] = number
            items.append(item)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UsageError(f"{path}: {shown}")
    return items


def _item_problem(item) -> str | None:
    if not isinstance(item, dict):
        return f"expected a JSON object with {', '.join(REQUIRED_KEYS)}, got {type(item).__name__}"
    missing = [key for key in REQUIRED_KEYS if key not in item]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    if isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)):
        return f"'id' must be a string or an integer, got {item['id']!r}"
    if not isinstance(item["video"], str) or not item["video"]:
        return f"'video' must be a non-empty path string, got {item['video']!r}"
    if not isinstance(item["question"], str):
        return f"'question' must be a string, got {item['question']!r}"
    return None


def item_options(item: dict, settings: BatchSettings) -> dict:
    """The pipeline options of one item: the run's settings with the item's own keys on top."""
    options = {
        "visual_token_budget": settings.visual_token_budget,
        "max_new_tokens": settings.max_new_tokens,
        "fps": settings.fps,
        "max_frames": settings.max_frames,
    }
    given = {}
    for key, name in ITEM_OPTIONS.items():
        if key not in item:
            continue
        value = item[key]
        if name == "fps":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            kind = "a positive number"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            kind = "a positive integer"
        if not ok:
            raise ValueError(f"option {key!r} must be {kind}, got {value!r}")
        if name in given and given[name] != value:
            raise ValueError(f"options 'budget' and 'visual_token_budget' disagree ({given[name]} vs {value})")
        given[name] = value
    options.update(given)
    return options


# ------------------------------------------------------------------------------------- output files
def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def part_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.rank*.part"))


def read_records(path: Path) -> list[dict]:
    """The complete lines of an output or part file.

    A last line without its newline, or a last line that is not JSON, was torn by a kill: it is
    ignored and cut off the file. Any other bad line is a UsageError (the file was edited by hand).
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end, offset = [], 0, 0
    lines = data.split(b"\n")
    complete = lines[:-1]  # the piece after the last newline is empty, or torn
    for number, line in enumerate(complete, start=1):
        offset += len(line) + 1
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(complete):
                    break  # a torn last line that happened to end in a newline
                raise UsageError(f"{path} line {number}: not valid JSON; fix or remove that line") from None
            if not isinstance(record, dict) or "id" not in record:
                raise UsageError(f"{path} line {number}: not an answer line (no 'id'); fix or remove that line")
            records.append(record)
        good_end = offset
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def merge_records(records: list[dict]) -> dict:
    """One record per id: the first answer wins; an error line is replaced by any later line."""
    merged = {}
    for record in records:
        old = merged.get(record["id"])
        if old is None or "error" in old:
            merged[record["id"]] = record
    return merged


def collect_and_write(output: Path, items: list[dict]) -> dict:
    """Merge output + part files into the output (input order, atomically); delete the part files.

    Returns the merged records by id. Lines whose id is not in the input are kept, after the others.
    """
    parts = part_files(output)
    merged = merge_records(read_records(output) + [r for part in parts for r in read_records(part)])
    if not parts:
        return merged
    input_ids = [item["id"] for item in items]
    known = set(input_ids)
    order = [i for i in input_ids if i in merged] + [i for i in merged if i not in known]
    write_lines_atomically(output, [merged[record_id] for record_id in order])
    for part in parts:
        part.unlink()
    return merged


def write_lines_atomically(path: Path, records: list[dict]) -> None:
    """`path` holds `records`, one JSON line each, or (after a crash) what it held before: written
    to a temporary file, synced, then renamed onto it (`atomic_files.atomic_file`)."""
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def pending_items(items: list[dict], done: dict, retry_errors: bool) -> list[dict]:
    return [item for item in items if item["id"] not in done or (retry_errors and "error" in done[item["id"]])]


def shard(items: list, rank: int, world: int) -> list:
    """This process's share: every `world`-th item from `rank` (long and short videos mix evenly)."""
    return items[rank::world]


class LineWriter:
    """Appends one JSON line at a time to a part file, each flushed and fsynced."""

    def __init__(self, path: Path):
        read_records(path)  # cut a torn last line before appending after it
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------- answering
class VideoDecoder:
    """Decodes the videos of one process's items, each video once, several at a time, ahead of the model.

    A video is a file with its sampling options (fps, max_frames). Its decoded frames (or its
    error message) are kept while later items of this process ask about it, and handed to the model
    as the same `LoadedVideo` object, so one model call computes its vision features once. What is
    kept is bounded by `max_held_bytes` of frames: past it, the oldest video kept is let go and
    decoded again when its next item comes.

    `workers` threads decode the videos in the order the batches need them, at most `ahead` videos
    (twice the batch size, at least `workers`) beyond those held and the batch being answered; the
    model answers meanwhile (PyAV releases the GIL). A video let go and needed again is decoded
    ahead again. Why several at once: a short video does not keep FFmpeg's threads busy. With fifty
    30 s 640x360 H.264 videos sampled to 60 frames each, decoding one at a time held this job to
    3.6 videos/s on a 16-core H200 machine (decoding 13-18 s of its 14-19 s). Decoding alone on 2 cores: 3.1 videos/s one at a
    time, 4.3-4.5 two at a time. Which video is held and what is let go is decided in the calling
    thread only (`decode`); the workers only run `load_video`.
    """

    def __init__(self, vqa, batches: list, settings: BatchSettings):
        video_processor = getattr(vqa.processor, "video_processor", None)
        self.workers = settings.decode_workers or default_decode_workers(settings.decode_backend)
        self.load_options = {
            "max_longer_edge": getattr(video_processor, "longest_edge", None),
            # shrink while decoding with the processor's own kernel, so that the exact (PIL) mode stays exact
            "resize_backend": getattr(video_processor, "resize_backend", "torch"),
            "pin_memory": str(getattr(vqa, "device", "cpu")).startswith("cuda"),  # page-locked frames upload fast
            "backend": settings.decode_backend,
        }
        if self.workers > 1:  # the cores and the ranges of long files shared out between the videos
            from ..video_decoding import MAX_WORKERS

            self.load_options["num_threads"] = max(1, cores_of_this_process() // self.workers)
            self.load_options["num_workers"] = max(1, MAX_WORKERS // self.workers)
        self.base_dir, self.max_held_bytes = settings.base_dir, settings.max_held_bytes
        self.ahead = max(2 * settings.batch_size, self.workers)
        self.wanted = [(self.key(item, options), item, options) for batch in batches for item, options in batch]
        self.next_wanted = 0  # index in `wanted` of the next item `decode` hands out
        self.items_left = Counter(key for key, _, _ in self.wanted)
        self.held = OrderedDict()  # key -> (LoadedVideo or error message, bytes)
        self.pending = {}  # key -> Future of (LoadedVideo or error message, decode seconds)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tempo-decode")

    def key(self, item: dict, options: dict) -> tuple:
        path = os.path.realpath(self.base_dir / item["video"])
        return path, options["fps"], options["max_frames"]

    def decode(self, batch: list) -> tuple[list, list]:
        """A batch's videos: ([(item, video, decode seconds)], [(item, error message)]); a video
        decoded for an earlier item is reused (0 seconds). Starts decoding the next videos."""
        self._start_ahead()
        loaded, failed = [], []
        for item, options in batch:
            key = self.key(item, options)
            if key in self.held:
                video, seconds = self.held[key][0], 0.0
            else:  # being decoded, or let go since it was scheduled: decoded now
                future = self.pending.pop(key, None) or self.pool.submit(self._load, item, options)
                video, seconds = future.result()
            self.items_left[key] -= 1
            if self.items_left[key] > 0:
                self._hold(key, video)
            else:
                self.held.pop(key, None)
            if isinstance(video, str):
                failed.append((item, video))
            else:
                loaded.append((item, video, seconds))
            self.next_wanted += 1
        self._start_ahead()
        return loaded, failed

    def close(self) -> None:
        """Drop the decodes not started; wait for those running (after Ctrl-C too: FFmpeg's
        decoding cannot be interrupted from Python)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _start_ahead(self) -> None:
        """Start decoding the next items' videos that are neither held nor being decoded (again,
        for one let go since), up to `ahead` of them, looking `LOOKAHEAD_ITEMS` items ahead."""
        window = self.wanted[self.next_wanted : self.next_wanted + LOOKAHEAD_ITEMS * self.ahead]
        for key, item, options in window:
            if len(self.pending) >= self.ahead:
                return
            if key not in self.held and key not in self.pending:
                self.pending[key] = self.pool.submit(self._load, item, options)

    def _load(self, item: dict, options: dict):
        """(the item's decoded video or the loader's one-line error message, seconds it took)."""
        from ..video_loading import load_video

        sampling = {name: options[name] for name in ("fps", "max_frames") if options[name] is not None}
        t0 = time.perf_counter()
        try:
            video = load_video(self.base_dir / item["video"], **self.load_options, **sampling)
        except ValueError as err:  # VideoLoadError: the message names the file and the problem
            video = str(err)
        return video, time.perf_counter() - t0

    def _hold(self, key: tuple, video) -> None:
        if key in self.held:
            return
        size = 0 if isinstance(video, str) else video.frames.numel() * video.frames.element_size()
        self.held[key] = (video, size)
        while self.held and sum(nbytes for _, nbytes in self.held.values()) > self.max_held_bytes:
            self.held.popitem(last=False)


def default_decode_workers(backend: str) -> int:
    """Videos decoded at once: with NVDEC one (the GPU's decoder); else one per core of this
    process's share (`cores_of_this_process`), at most `MAX_WORKERS`."""
    from ..video_decoding import MAX_WORKERS

    return 1 if backend == "nvdec" else min(MAX_WORKERS, cores_of_this_process())


def cores_of_this_process() -> int:
    """This process's share of the cores: processes launched together on one machine (accelerate
    sets LOCAL_WORLD_SIZE) split them."""
    from ..video_decoding import _cpu_count

    processes_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, _cpu_count() // processes_here)


def answer_items(vqa, items: list[dict], writer: LineWriter, settings: BatchSettings, progress: bool = False) -> dict:
    """Answer `items` with the pipeline `vqa`, in their order, writing each line as soon as it is known.

    Items with the same model options are answered `settings.batch_size` at a time. Each video is
    decoded once (`VideoDecoder`) before the model call, so a bad video becomes an error line and
    the rest of its batch goes on. Returns counts: {"answered": n, "failed": n}.
    """
    from transformers.utils.logging import tqdm  # honours disable_progress_bar()

    counts = {"answered": 0, "failed": 0}
    bar = tqdm(total=len(items), desc="answering", unit="video", disable=not progress)

    def fail(item, message):
        writer.write({"id": item["id"], "video": item["video"], "question": item["question"], "error": message})
        counts["failed"] += 1
        bar.update(1)

    ready = []  # (item, options) of the items whose options are valid
    for item in items:
        try:
            ready.append((item, item_options(item, settings)))
        except ValueError as err:
            fail(item, f"{item['video']}: {err}")

    batches = list(_batches(ready, settings.batch_size))
    decoder = VideoDecoder(vqa, batches, settings)  # decodes ahead while the model answers
    try:
        for batch in batches:
            loaded, failed = decoder.decode(batch)
            for item, message in failed:
                fail(item, message)
            if not loaded:
                continue
            call = _call_options(batch[0][1], settings)
            answered = _answer_batch(vqa, loaded, call, fail)
            for (item, _, decode_s), result in answered:
                writer.write(answer_line(item, result, decode_s))
                counts["answered"] += 1
                bar.update(1)
    finally:
        decoder.close()
    bar.close()
    return counts


def _answer_batch(vqa, loaded: list, call: dict, fail) -> list:
    """[((item, video, decode seconds), result)] of one batch; an item the model refuses goes to `fail`."""
    try:
        return list(zip(loaded, _ask(vqa, loaded, call)))
    except ValueError as err:
        if len(loaded) == 1:
            fail(loaded[0][0], f"{loaded[0][0]['video']}: {err}")
            return []
    answered = []  # the model refused this batch: answer each video on its own to find the bad one
    for one in loaded:
        try:
            answered.append((one, _ask(vqa, [one], call)[0]))
        except ValueError as err:
            fail(one[0], f"{one[0]['video']}: {err}")
    return answered


def _batches(ready: list, size: int):
    """Runs of consecutive items with the same model options, at most `size` long."""
    batch, key = [], None
    for item, options in ready:
        item_key = (options["visual_token_budget"], options["max_new_tokens"])
        if batch and (len(batch) == size or item_key != key):
            yield batch
            batch = []
        batch.append((item, options))
        key = item_key
    if batch:
        yield batch


def _call_options(options: dict, settings: BatchSettings) -> dict:
    call = {"max_new_tokens": options["max_new_tokens"], "progress": False}
    if options["visual_token_budget"] is not None:
        call["visual_token_budget"] = options["visual_token_budget"]
    if not settings.use_ata:
        call["use_ata"] = False
    if settings.min_new_tokens:
        call["min_new_tokens"] = min(settings.min_new_tokens, options["max_new_tokens"])
    if settings.temperature:
        call.update(do_sample=True, temperature=settings.temperature)
    return call


def _ask(vqa, loaded: list, call: dict) -> list[dict]:
    """One model call for the (item, video, decode seconds) in `loaded`; notes the call's size on each result."""
    videos = [video for _, video, _ in loaded]
    questions = [item["question"] for item, _, _ in loaded]
    results = vqa(video=videos, question=questions, batch_size=len(loaded), **call)
    for result in results:
        result["batch_size"] = len(loaded)
    return results


def answer_line(item: dict, result: dict, decode_s: float) -> dict:
    line = {"id": item["id"], "question": item["question"], "video": item["video"]}
    line.update({key: result[key] for key in RESULT_KEYS if key in result})
    # preprocess/compress/answer are for the whole model call (batch_size videos); decode is this video's
    line["timings"] = {**result.get("timings", {}), "decode": decode_s}
    line["batch_size"] = result["batch_size"]
    return line


# ------------------------------------------------------------------------------------- one run
def run(
    items: list[dict],
    output: str | os.PathLike,
    load,
    settings: BatchSettings,
    state=None,
    progress: bool = False,
) -> dict | None:
    """Answer the items not yet in `output`; the core of `tempo batch` (and of the benchmark).

    `load()` returns the video-question-answering pipeline; it is called only by a process that
    has items to answer. `state` is accelerate's `PartialState` (or any object with
    process_index, num_processes, is_main_process and wait_for_everyone); by default one is made.
    Returns the summary on the main process, None on the others.
    """
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    started = time.perf_counter()
    output = Path(output)
    if state.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        collect_and_write(output, items)  # what a killed run left in part files
    state.wait_for_everyone()
    done = merge_records(read_records(output))  # clean now: the main process cut any torn line
    pending = pending_items(items, done, settings.retry_errors)
    mine = shard(pending, state.process_index, state.num_processes)

    load_s = 0.0
    if mine:
        t0 = time.perf_counter()
        vqa = load()
        load_s = time.perf_counter() - t0
    state.wait_for_everyone()
    t_answer = time.perf_counter()
    if mine:
        writer = LineWriter(part_path(output, state.process_index))
        try:
            answer_items(vqa, mine, writer, settings, progress=progress and state.is_main_process)
        finally:
            writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    answer_s = time.perf_counter() - t_answer
    new = merge_records([r for part in part_files(output) for r in read_records(part)])
    merged = collect_and_write(output, items)
    answers = [r for r in new.values() if "error" not in r]
    per_frame = [r["tokens_per_frame"] for r in answers if "tokens_per_frame" in r]
    return {
        "items": len(items),
        "answered": len(answers),
        "failed": len(new) - len(answers),
        "skipped": len(items) - len(pending),
        "error_lines": sum(1 for item in items if "error" in merged.get(item["id"], {})),
        "missing": sum(1 for item in items if item["id"] not in merged),
        "processes": state.num_processes,
        "batch_size": settings.batch_size,
        "wall_s": time.perf_counter() - started,
        "load_s": load_s,
        "answer_s": answer_s,
        "videos_per_s": len(answers) / answer_s if answers and answer_s > 0 else 0.0,
        "mean_tokens_per_frame": sum(per_frame) / len(per_frame) if per_frame else None,
        "output": str(output),
    }
