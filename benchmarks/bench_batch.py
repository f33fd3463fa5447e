"""Throughput of `tempo batch`: generated videos -> answers JSONL, videos per second.

    python benchmarks/bench_batch.py --tiny --out /tmp/batch-tiny.json        # CPU, tiny model, seconds
    python benchmarks/bench_batch.py --out batch-gpu.json                     # GPU: Tempo-6B architecture,
                                                                              #   random bf16 weights
    python benchmarks/bench_batch.py --batch-size 1 4 8 --compile --warmup 8 --out batch-gpu.json
    accelerate launch --num_processes 2 benchmarks/bench_batch.py --out batch-2gpu.json   # data parallel

Generates --videos test videos (--seconds long, --width x --height, H.264) once into --video-dir,
writes an items file, then runs the same code as `tempo batch` (transformers_tempo.cli.batch_job.run):
each process decodes its share of the videos and answers them --batch-size at a time (several
sizes: one run each, one loaded model; --warmup answers a few videos untimed first, so that
compilation is not counted). The answers file is started afresh each run. Prints and writes (--out)
one JSON object: per run the summary (videos/s over the answering time, model load excluded) and the
time spent per stage summed over the videos; the machine, commit and settings.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_e2e import build  # noqa: E402  (the same real-size random model and processor)
from transformers_tempo.cli.batch_job import BatchSettings, default_decode_workers, run  # noqa: E402
from transformers_tempo.synthetic import write_long_video  # noqa: E402

QUESTIONS = [
    "What is the person in the red jacket doing right after the car stops?",
    "What colour is the video?",
    "What happens in the video?",
    "Describe the scene.",
]


def make_videos(folder: Path, count: int, seconds: float, width: int, height: int, fps: int) -> list[Path]:
    """The test videos, written once (a later run with the same settings reuses them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"video-{i:04d}.mp4"
        if not path.exists():
            tmp = folder / f"video-{i:04d}.tmp.mp4"
            # A 2-second clip encoded once per video and repeated by remuxing: encoding every frame
            # of 50 half-minute videos in Python took longer than a device call allows.
            write_long_video(tmp, duration=seconds, clip_seconds=min(2.0, seconds), fps=fps, width=width, height=height)
            tmp.replace(path)
        paths.append(path)
    return paths


def stage_seconds(lines: list[dict]) -> dict:
    """Seconds per stage over all answered videos (model-call stages counted once per batch)."""
    totals = {"decode": 0.0, "preprocess": 0.0, "compress": 0.0, "answer": 0.0}
    for line in lines:
        timings = line.get("timings", {})
        totals["decode"] += timings.get("decode", 0.0)
        for stage in ("preprocess", "compress", "answer"):
            totals[stage] += timings.get(stage, 0.0) / line.get("batch_size", 1)
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (seconds)")
    p.add_argument("--videos", type=int, default=50)
    p.add_argument("--seconds", type=float, default=None, help="length of each video (default 30; 4 with --tiny)")
    p.add_argument("--width", type=int, default=None, help="default 640 (128 with --tiny)")
    p.add_argument("--height", type=int, default=None, help="default 360 (96 with --tiny)")
    p.add_argument("--video-fps", type=int, default=24)
    p.add_argument("--video-dir", default=None, help="where the videos are written (default: a folder in /tmp)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one run per batch size, one model")
    p.add_argument("--decode-workers", type=int, nargs="+", default=[None],
                   help="videos decoded at once (default: tempo batch's choice); one run per value and batch size")
    p.add_argument("--budget", type=int, default=None, help="visual token budget (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--compile", action="store_true", help="as `tempo batch --compile`")
    p.add_argument("--warmup", type=int, default=0, metavar="VIDEOS",
                   help="answer this many videos untimed before each batch size (0: compilation counted in the time)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--commit", default=None, help="commit to report (when the checkout has no usable git HEAD)")
    args = p.parse_args(argv)
    seconds = args.seconds or (4.0 if args.tiny else 30.0)
    width = args.width or (128 if args.tiny else 640)
    height = args.height or (96 if args.tiny else 360)

    from accelerate import PartialState

    state = PartialState(cpu=args.tiny or not torch.cuda.is_available())
    device = state.device
    dtype = torch.float32 if args.tiny else torch.bfloat16
    name = f"tempo-bench-batch-{args.videos}x{seconds:g}s-{width}x{height}-{args.video_fps}fps"
    video_dir = Path(args.video_dir or Path(tempfile.gettempdir()) / name)
    with state.main_process_first():  # the main process writes the videos, the others then find them
        videos = make_videos(video_dir, args.videos, seconds, width, height, args.video_fps)
    items = [{"id": f"v{i:04d}", "video": str(v), "question": QUESTIONS[i % len(QUESTIONS)]} for i, v in enumerate(videos)]

    @functools.cache
    def load():  # once per process: later batch sizes reuse the model (and its compilation)
        from transformers import pipeline

        model, processor = build(args.tiny, device, dtype, args.attn)
        if args.compile:
            model.enable_compiled_inference()
        return pipeline("video-question-answering", model=model, processor=processor, device=device)

    runs = []
    for batch_size, workers in itertools.product(args.batch_size, args.decode_workers):
        settings = BatchSettings(
            visual_token_budget=args.budget, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
            decode_workers=workers,
        )
        if args.warmup:  # the same code on the first videos, untimed: compilation and first-call costs
            answer_items(items[: args.warmup], video_dir / f"warmup-bs{batch_size}", load, settings, state)
        timed = answer_items(items, video_dir / f"run-bs{batch_size}", load, settings, state)
        if timed is not None:
            decoders = workers or default_decode_workers(settings.decode_backend)
            runs.append({"batch_size": batch_size, "decode_workers": decoders, **timed})
            print(json.dumps({"batch_size": batch_size, "decode_workers": decoders, "videos_per_s": timed["videos_per_s"]}), flush=True)
    if not state.is_main_process:
        return None

    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout
    results = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.strip() or "unknown",
        "model": "tiny random" if args.tiny else "Tempo-6B architecture, random bf16 weights",
        "device": str(device),
        "processes": state.num_processes,
        "videos": args.videos,
        "video": f"{seconds:g} s, {width}x{height}, {args.video_fps} fps, H.264",
        "compile": args.compile,
        "warmup_videos": args.warmup,
        "budget": args.budget,
        "max_new_tokens": args.max_new_tokens,
        **runs[0],  # the first batch size's figures at the top, as before
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


def answer_items(items, work: Path, load, settings, state) -> dict | None:
    """`tempo batch`'s code on `items`, answered afresh into work/answers.jsonl; the summary on the
    main process (None on the others)."""
    output = work / "answers.jsonl"
    if state.is_main_process:  # a fresh run, not a resumed one
        work.mkdir(parents=True, exist_ok=True)
        for old in [output, *work.glob("answers.jsonl.rank*.part")]:
            old.unlink(missing_ok=True)
    state.wait_for_everyone()
    summary = run(items, output, load, settings, state)
    if summary is None:
        return None
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    answered = [line for line in lines if "error" not in line]
    return {
        "sampled_frames_per_video": answered[0]["sampled_frames"] if answered else 0,
        "summary": summary,
        "videos_per_s": summary["videos_per_s"],
        "stage_seconds_all_processes": stage_seconds(answered),
    }


if __name__ == "__main__":
    main()
