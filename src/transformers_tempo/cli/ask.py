"""`tempo ask`: answer one or several questions about a video."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (
    DTYPES,
    REFERENCE_HELP,
    Status,
    UsageError,
    add_answer_options,
    add_debug_option,
    check_device,
    check_model,
    check_numbers,
    check_plot,
    check_reference,
    check_video,
    ensure_demo_assets,
    is_demo_model,
    load_pipeline,
    parse_device_map,
)


def add_ask_parser(subparsers) -> None:
    ask = subparsers.add_parser("ask", help="answer a question about a video", description="Answer a question about a video.")
    ask.add_argument("video", help="video file (mp4, mkv, webm, mov, ...; any format PyAV reads)")
    ask.add_argument("question", nargs="?", default=None, help="the question, in quotes")
    ask.add_argument(
        "-q", "--question", dest="more_questions", action="append", metavar="QUESTION",
        help="another question about the same video (repeatable): the video is decoded and encoded once",
    )
    ask.add_argument("--reference", action="store_true", help=REFERENCE_HELP)
    ask.add_argument("--model", default=None, help="folder or Hub id of converted Tempo weights (default: the tiny random demo model)")
    add_ask_options(ask)
    add_debug_option(ask)
    ask.set_defaults(func=cmd_ask)


def add_ask_options(p: argparse.ArgumentParser) -> None:
    add_answer_options(p)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--device-map", default=None, help="spread the model over GPUs: auto, or a JSON {module: device}")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="the weights' dtype (default: auto, as saved)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write the token allocation picture")
    p.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--stream",
        action="store_true",
        help="compress the video's segments while the file is still decoding (same answer; saves the "
        "compressor's time on long files); the model is loaded before the video is read",
    )


def cmd_ask(args) -> int:
    check_numbers(args)
    check_reference(args)
    questions = _questions(args)
    device_map = parse_device_map(args.device_map)
    if device_map is not None and args.device:
        raise UsageError("give --device or --device-map, not both")
    video = check_video(args.video)
    check_plot(args.plot)
    demo = args.model is None or is_demo_model(args.model)
    model = None if args.model is None else check_model(args.model)
    with Status("loading torch"):
        check_device(args.device, device_map)
        from ..video_loading import VideoLoadError, load_video
    if model is None:
        with Status("preparing the demo model"):
            model = str(ensure_demo_assets(quiet=args.json)[0])

    load_options = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}
    load_options["backend"] = args.decode_backend
    show_progress = sys.stderr.isatty() and not args.json  # progress bars only on a terminal, never with --json
    if args.stream:
        # The model first, then decoding and compression together (a bad video is found after the load).
        demo_notice(args)
        vqa = load_pipeline(model, args.device, args.dtype, device_map, args.compile, args.reference)
        loaded, decode_s = str(video), None
        call = {"stream": True, **{k: v for k, v in load_options.items() if k != "backend"}}
        call["decode_backend"] = load_options["backend"]  # the pipeline's name for load_video's backend
    else:
        # Decode first: a bad video fails fast, before the model is loaded.
        t0 = time.perf_counter()
        try:
            loaded = load_video(video, progress=show_progress, **load_options)
        except VideoLoadError as err:
            raise UsageError(str(err)) from err
        decode_s = time.perf_counter() - t0
        demo_notice(args)
        vqa = load_pipeline(model, args.device, args.dtype, device_map, args.compile, args.reference)
        call = {}
    call.update(generation_options(args), progress=show_progress)
    with Status("answering", enabled=sys.stderr.isatty() and not show_progress):
        results = _answer(vqa, loaded, questions, call)
    for i, (question, result) in enumerate(zip(questions, results)):
        if decode_s is not None:
            result["timings"]["decode"] = decode_s if i == 0 else 0.0  # decoded once, for the first
        if demo and args.json:  # (on a terminal the notice above and the answer line say it)
            result.setdefault("warnings", []).append(DEMO_WARNING)
        results[i] = {"video": str(video), "question": question, "model": model, **result}
    if args.plot:
        plot_allocation(results[0], args.plot)
    print_results(results, args, demo)
    return 0


def _questions(args) -> list[str]:
    """The question after the video, then those given with -q."""
    questions = ([args.question] if args.question is not None else []) + (args.more_questions or [])
    if not questions:
        raise UsageError("give a question (after the video, or with -q)")
    if args.stream and len(questions) > 1:
        raise UsageError("--stream answers one question; leave it out to ask several (the video is decoded once)")
    return questions


def generation_options(args) -> dict:
    """The pipeline options of --max-new-tokens, --min-new-tokens, --temperature, --budget, --no-ata."""
    call = {"max_new_tokens": args.max_new_tokens}
    if args.min_new_tokens:
        call["min_new_tokens"] = min(args.min_new_tokens, args.max_new_tokens)
    if args.temperature:
        import torch

        torch.manual_seed(args.seed)
        call.update(do_sample=True, temperature=args.temperature)
    if args.budget is not None:
        call["visual_token_budget"] = args.budget
    if args.no_ata:
        call["use_ata"] = False
    return call


def _answer(vqa, loaded, questions: list[str], call: dict) -> list[dict]:
    """One result per question; several questions: one decode (done before) and one vision-tower pass."""
    from ..video_loading import VideoLoadError

    try:
        results = vqa(video=loaded, question=questions if len(questions) > 1 else questions[0], **call)
    except ValueError as err:  # streaming reads the video inside the call
        cause = err
        while cause is not None and not isinstance(cause, VideoLoadError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UsageError(str(cause)) from err
    return results if isinstance(results, list) else [results]


def print_results(results: list[dict], args, demo: bool) -> None:
    if args.json:  # one object; several questions: one object per line, in order
        print(json.dumps(results[0], indent=2) if len(results) == 1 else "\n".join(map(json.dumps, results)))
        return
    for result in results:
        if len(results) > 1:
            print(f"Q: {result['question']}")
        print(answer_text(result["answer"], demo))
    print(summary_text(results[-1]), file=sys.stderr if args.quiet_summary else sys.stdout)


DEMO_WARNING = "the model is the tiny random demo model: its answers are noise"


def demo_notice(args) -> None:
    if args.model is None and not args.json:
        print("no --model given: using the tiny random demo model (its answers are noise)", file=sys.stderr)


def answer_text(answer: str, demo: bool) -> str:
    """The answer as printed; an empty one says so (and why, for the demo model)."""
    if answer.strip():
        return answer
    if demo:
        return (
            "answer: '' (empty, as expected: the demo model is random and its greedy answer is usually "
            "empty; `tempo demo` or --temperature 1 --min-new-tokens 8 samples some of its noise)"
        )
    return "answer: '' (the model generated no text)"


def summary_text(result: dict) -> str:
    t = result.get("timings", {})
    lines = [
        "",
        f"video: {result['video']} ({result.get('duration', 0):.1f} s)",
        f"frames sampled: {result.get('sampled_frames', 0)} at {result.get('real_fps', 0):.2f} fps, "
        f"segments: {result.get('segments', 0)}",
        f"visual tokens kept: {result.get('visual_tokens', 0)} "
        f"({result.get('tokens_per_frame', 0):.2f} per frame)",
        "time: decode {decode:.2f} s, preprocess {preprocess:.2f} s, compress {compress:.2f} s, answer {answer:.2f} s".format(
            **{k: t.get(k, 0.0) for k in ("decode", "preprocess", "compress", "answer")}
        ),
    ]
    for warning in result.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def plot_allocation(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install 'transformers-tempo[plot]'") from err
    segments = result.get("segment_details", [])
    if not segments:
        raise UsageError("--plot: this input has no video segments to plot")
    starts = [s["start"] for s in segments]
    widths = [s["end"] - s["start"] for s in segments]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(starts, [s["kept_tokens"] for s in segments], width=widths, align="edge", color="#4C72B0", label="tokens kept")
    ax.set_xlabel("video time (s)")
    ax.set_ylabel("tokens kept per segment")
    twin = ax.twinx()
    twin.plot([a + w / 2 for a, w in zip(starts, widths)], [s["relevance"] for s in segments], color="#DD8452", marker=".", label="relevance")
    twin.set_ylabel("relevance score")
    twin.set_ylim(0, 1)
    ax.set_title(f"{result.get('visual_tokens', 0)} visual tokens over {len(segments)} segments")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
