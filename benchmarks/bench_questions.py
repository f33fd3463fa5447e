"""Many questions about long video files: the video cache off (every question decodes and encodes
again) and on (decode once, encode once, answer many), through `pipeline("video-question-answering")`.

    python benchmarks/bench_questions.py                 # GPU: Tempo-6B architecture, random bf16 weights
    python benchmarks/bench_questions.py --files 4 --minutes 60 --questions 12
    python benchmarks/bench_questions.py --tiny          # same code on CPU in seconds (used by the tests)

Files are generated H.264 (1280x720, 30 fps, a keyframe every 3 s, 3 B-frames between references). Writes
benchmarks/results/questions-<machine>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import build  # noqa: E402

from transformers_tempo.pipeline_tempo import VideoQuestionAnsweringPipeline  # noqa: E402
from transformers_tempo.synthetic import benchmark_h264_options, write_long_video  # noqa: E402
from transformers_tempo.video_cache import configure_video_cache, default_video_cache  # noqa: E402

QUESTIONS = [
    "What is the person in the red jacket doing right after the car stops?",
    "How many people enter the room?",
    "What colour is the car?",
    "What happens at the end of the video?",
    "Where does the video take place?",
    "Who scores after the goal?",
    "What is written on the sign?",
    "What does the woman pick up?",
    "Which animal appears first?",
    "What is the weather like?",
    "When does the music start?",
    "Why does the crowd cheer?",
]


def now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_files(folder: Path, count: int, minutes: float, width: int, height: int, bframes: int = 3) -> list[Path]:
    """`count` distinct long files (each its own clip, so no two decode alike), with `bframes`
    B-frames between references (`benchmark_h264_options`)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        suffix = f"-b{bframes}" if bframes else ""
        path = folder / f"questions-{i}-{minutes:g}min{suffix}.mp4"
        if not path.exists():
            write_long_video(
                path, duration=60 * minutes, clip_seconds=10.0, fps=30, width=width, height=height, gop=90,
                codec_options={**benchmark_h264_options(bframes), "crf": str(20 + i)},
            )
        files.append(path)
    return files


def ask(vqa, path, question, args) -> float:
    t0 = now(vqa.device)
    vqa(video=str(path), question=question, max_new_tokens=args.new_tokens, visual_token_budget=args.budget,
        max_frames=args.max_frames, decode_backend=args.decode_backend)
    return now(vqa.device) - t0


def run_cache_off(vqa, files, args) -> dict:
    """Today's behaviour: every question pays decoding, preprocessing and the vision tower."""
    configure_video_cache(enabled=False)
    seconds = [ask(vqa, files[0], q, args) for q in QUESTIONS[: args.uncached_questions]]
    configure_video_cache(enabled=True)
    return {"questions": len(seconds), "seconds_per_question": statistics.mean(seconds), "all_s": seconds}


def run_cache_on(vqa, files, args, together: bool) -> dict:
    """Each file's questions one after another (as a benchmark or a user asks them), or all at once."""
    cache = default_video_cache()
    cache.clear()
    first, later = [], []
    t0 = now(vqa.device)
    for path in files:
        questions = QUESTIONS[: args.questions]
        if together:
            t1 = now(vqa.device)
            vqa(video=str(path), question=questions, batch_size=args.batch_size, max_new_tokens=args.new_tokens,
                visual_token_budget=args.budget, max_frames=args.max_frames, decode_backend=args.decode_backend)
            first.append(now(vqa.device) - t1)
            continue
        first.append(ask(vqa, path, questions[0], args))
        later.extend(ask(vqa, path, q, args) for q in questions[1:])
    total = now(vqa.device) - t0
    asked = len(files) * args.questions
    row = {
        "files": len(files), "questions": asked, "total_s": total,
        "questions_per_minute": 60 * asked / total, "seconds_per_question": total / asked,
        "cache": cache.stats(),
    }
    if together:
        row["seconds_per_file"] = statistics.mean(first)
    else:
        row["first_question_s"] = statistics.mean(first)
        row["later_question_s"] = statistics.mean(later) if later else None
    return row


def warm_up(vqa, files, args):
    """Answer once on a file of the measured length, so that no mode pays the compilation (the
    static cache's length bucket and the compiled shapes follow the prompt's length)."""
    ask(vqa, files[0], QUESTIONS[0], args)
    if args.together or args.only_together:  # the batched step compiles for its own batch size
        vqa(video=str(files[0]), question=QUESTIONS[: args.batch_size], batch_size=args.batch_size,
            max_new_tokens=args.new_tokens, visual_token_budget=args.budget, max_frames=args.max_frames,
            decode_backend=args.decode_backend)
    default_video_cache().clear()


def profile_later_question(vqa, files, args) -> str:
    """cProfile of one question about a file whose frames and vision features are cached: where a
    later question's time goes (functions by cumulative time; the GPU work shows up where it syncs)."""
    import cProfile
    import io
    import pstats

    ask(vqa, files[0], QUESTIONS[0], args)  # cached from here on
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = ask(vqa, files[0], QUESTIONS[1], args)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    return f"one later question: {seconds:.3f} s under cProfile\n" + text.getvalue()


def markdown(results: dict) -> str:
    lines = [
        f"# Many questions about long files ({results['machine']}, {results['date']}, commit {results['commit']})",
        "",
        f"{results['questions_per_file']} questions per file, {results['minutes']} min each, "
        f"{results['width']}x{results['height']} H.264, {results['max_frames']} frames, budget {results['budget']}, "
        f"{results['new_tokens']} new tokens.",
        "",
        "| mode | decoder | questions | s/question | questions/min | first question s | later question s | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, row in results.items():
        if not mode.startswith("cache_") or not isinstance(row, dict):
            continue
        if "error" in row:
            lines.append(f"| {mode} | {row['decode_backend']} | failed: {row['error'][:120]} | | | | | |")
            continue
        per_minute = row.get("questions_per_minute", 60 / row["seconds_per_question"])
        first, later = row.get("first_question_s"), row.get("later_question_s")
        lines.append(
            f"| {mode} | {row['decode_backend']} | {row['questions']} | {row['seconds_per_question']:.2f} | "
            f"{per_minute:.1f} | {'' if first is None else f'{first:.2f}'} | {'' if later is None else f'{later:.2f}'} | "
            f"{row['peak_gpu_gib']:.1f} |"
        )
    on = results.get("cache_on", {})
    if "cache" in on:
        lines += [
            "",
            f"Cache after the run: frames {on['cache']['frames']['bytes'] / 2**30:.2f} GiB, vision features "
            f"{on['cache']['features']['bytes'] / 2**30:.2f} GiB ({on['cache']['frames']['entries']} / "
            f"{on['cache']['features']['entries']} entries).",
        ]
    lines.append(f"Peak GPU memory {results['peak_gpu_gib']:.1f} GiB, peak host RSS {results['peak_host_gib']:.1f} GiB.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU, short files")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--questions", type=int, default=12, help="questions per file")
    parser.add_argument("--uncached-questions", type=int, default=3, help="questions asked with the cache off")
    parser.add_argument("--batch-size", type=int, default=4, help="for the questions-in-one-call mode")
    parser.add_argument("--together", action="store_true", help="also ask each file's questions in one call")
    parser.add_argument("--only-together", action="store_true",
                        help="ask each file's questions in one call, and skip the one-question-per-call modes")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=int, default=8192)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--bframes", type=int, default=3, help="B-frames between references (0: x264's choice)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile-later", action="store_true", help="also write a cProfile of a later question")
    parser.add_argument("--decode-backends", nargs="+", default=["auto"], choices=["auto", "pyav", "nvdec"],
                        help="measure the cache-on mode once per backend (the cache-off mode with the first)")
    parser.add_argument("--workdir", default="/tmp/tempo-questions")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.files, args.minutes, args.questions, args.uncached_questions = 2, 0.25, 3, 2
        args.width, args.height, args.budget, args.new_tokens, args.no_compile = 128, 96, 64, 4, True
    args.questions = min(args.questions, len(QUESTIONS))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model, processor = build(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16, "sdpa")
    if not args.no_compile and device.type == "cuda":
        model.enable_compiled_inference()
    vqa = VideoQuestionAnsweringPipeline(model=model, processor=processor, device=device)
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = make_files(folder, args.files, args.minutes, args.width, args.height, args.bframes)
    print(f"files ready in {time.perf_counter() - t0:.1f} s", flush=True)
    args.decode_backend = args.decode_backends[0]
    warm_up(vqa, files, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or _commit(),
        "minutes": args.minutes, "questions_per_file": args.questions, "width": args.width, "height": args.height,
        "max_frames": args.max_frames, "budget": args.budget, "new_tokens": args.new_tokens,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.tiny else results["machine"].replace(" ", "-").lower()
    stem = out / f"questions-{name}-{results['date']}"
    modes = [("cache_off", args.decode_backends[0], lambda: run_cache_off(vqa, files, args))]
    for backend in args.decode_backends:
        suffix = "" if backend == args.decode_backends[0] else f"_{backend}"
        modes.append(("cache_on" + suffix, backend, lambda: run_cache_on(vqa, files, args, together=False)))
    if args.only_together:
        modes = []
    if args.together or args.only_together:
        modes.append(("cache_on_together", args.decode_backends[0], lambda: run_cache_on(vqa, files, args, together=True)))
    results["decode_backend"] = args.decode_backends[0]
    for mode, backend, run in modes:  # results written after each mode, so a run cut short keeps what it measured
        args.decode_backend = backend
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            results[mode] = run()
        except Exception as error:  # noqa: BLE001 - a failing mode is a result; the others still run
            results[mode] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        results[mode]["decode_backend"] = backend
        results[mode]["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        print(f"{mode}:", results[mode], flush=True)
        results["peak_gpu_gib"] = max(row.get("peak_gpu_gib", 0.0) for row in results.values() if isinstance(row, dict))
        results["peak_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    if args.profile_later:
        stem.with_name(stem.name + "-later-question-profile.txt").write_text(profile_later_question(vqa, files, args))
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
