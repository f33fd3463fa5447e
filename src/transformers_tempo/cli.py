"""The `tempo` command: ask a question about a video, run the offline demo, convert the released weights."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEMO_QUESTION = "What colour is the video?"


class UsageError(Exception):
    """A problem with the command line or its inputs: one line to stderr, exit status 2."""


def demo_dir() -> Path:
    root = os.environ.get("TEMPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "transformers-tempo"
    )
    return Path(root) / "demo"


def ensure_demo_assets(quiet: bool = False) -> tuple[Path, Path]:
    """Build once (then reuse) a tiny random Tempo model + processor and a generated test video."""
    import torch

    from .processing_tempo import TempoProcessor
    from .synthetic import write_test_video
    from .testing_utils import build_tiny_model, build_tiny_tokenizer
    from .video_processing_tempo import TempoVideoProcessor

    root = demo_dir()
    model_dir, video = root / "tiny-tempo", root / "demo.mp4"
    if not (model_dir / "config.json").exists():
        if not quiet:
            print(f"building a tiny random Tempo model in {model_dir} (once)", file=sys.stderr)
        tmp = root / "tiny-tempo.tmp"
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer)
        processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, model_dir)
        del model, torch
    if not video.exists():
        if not quiet:
            print(f"writing a generated 12-second test video to {video} (once)", file=sys.stderr)
        tmp_video = root / "demo.tmp.mp4"
        write_test_video(tmp_video, num_frames=12 * 24, fps=24, width=320, height=240)
        os.replace(tmp_video, video)
    return model_dir, video


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None):
    """--device-map: a strategy name (auto, balanced, ...) or a JSON object {module name: device}."""
    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError:
        device_map = None
    if not isinstance(device_map, dict) or not all(isinstance(v, (int, str)) for v in device_map.values()):
        raise UsageError(
            f"--device-map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object such as "
            f'\'{{"model.compressor": 0, "model.language_model": 1, "lm_head": 1}}\', got {text!r}'
        )
    return device_map


def load_pipeline(model: str, device: str | None, dtype: str | None, device_map=None, compile_compressor=False):
    import torch
    from transformers import pipeline

    from . import pipeline_tempo  # noqa: F401  (registration happens on package import)

    kwargs = {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if dtype and dtype != "auto":
        if not hasattr(torch, dtype):
            raise UsageError(f"--dtype: unknown dtype {dtype!r} (try bfloat16, float16, float32)")
        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype == "auto":
        kwargs["dtype"] = "auto"
    if device:
        kwargs["device"] = device
    try:
        vqa = pipeline("video-question-answering", model=model, **kwargs)
    except OSError as err:
        raise UsageError(f"--model {model}: cannot load a Tempo model from there ({str(err).splitlines()[0]})") from err
    if compile_compressor:
        vqa.model.enable_compiled_inference()
    return vqa


def cmd_ask(args) -> int:
    from .video_loading import VideoLoadError, load_video

    model = args.model
    if model is None:
        model, _ = ensure_demo_assets(quiet=args.json)
        model = str(model)
        if not args.json:
            print("no --model given: using the tiny random demo model (its answers are noise)", file=sys.stderr)
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget must be a positive number of visual tokens, got {args.budget}")
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    device_map = parse_device_map(args.device_map)
    if device_map is not None and args.device:
        raise UsageError("give --device or --device-map, not both")
    video = Path(args.video)
    if not video.exists():
        raise UsageError(f"{video}: no such file")
    load_options = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}
    show_progress = sys.stdout.isatty() and not args.json  # tqdm bars only on a terminal, never with --json
    if args.stream:
        # The model first, then decoding and compression together (a bad video is found after the load).
        vqa = load_pipeline(model, args.device, args.dtype, device_map, compile_compressor=args.compile)
        loaded, decode_s = str(video), None
        call = {"stream": True, **load_options}
    else:
        # Decode first: a bad video fails fast, before the model is loaded.
        t0 = time.perf_counter()
        try:
            loaded = load_video(video, progress=show_progress, **load_options)
        except VideoLoadError as err:
            raise UsageError(str(err)) from err
        decode_s = time.perf_counter() - t0
        vqa = load_pipeline(model, args.device, args.dtype, device_map, compile_compressor=args.compile)
        call = {}
    call.update(max_new_tokens=args.max_new_tokens, progress=show_progress)
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
    try:
        result = vqa(video=loaded, question=args.question, **call)
    except ValueError as err:  # streaming reads the video inside the call
        cause = err
        while cause is not None and not isinstance(cause, VideoLoadError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UsageError(str(cause)) from err
    if decode_s is not None:
        result["timings"]["decode"] = decode_s
    result = {"video": str(video), "question": args.question, "model": model, **result}
    if args.plot:
        plot_allocation(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"answer: {result['answer']!r}" if not result["answer"].strip() else result["answer"])
        print(summary_text(result), file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


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


def cmd_demo(args) -> int:
    model_dir, video = ensure_demo_assets(quiet=args.json)
    if not args.json:
        print("tempo demo: a tiny RANDOM model (no real weights, no network) answers about a generated video;")
        print("the answer is noise, the path from video to answer is the real one.\n")
    args.model, args.video, args.question = str(model_dir), str(video), args.question or DEMO_QUESTION
    # A random model's greedy answer is often empty or blank; sample a few of its (noise) tokens instead.
    if args.min_new_tokens is None:
        args.min_new_tokens = 8
    if not args.temperature:
        args.temperature = 1.0
    return cmd_ask(args)


def cmd_batch(args) -> int:
    from .batch import run_batch

    return run_batch(args)


def cmd_convert(args) -> int:
    from .conversion import run_convert

    return run_convert(args) or 0


def add_answer_options(p: argparse.ArgumentParser) -> None:
    """Sampling, ATA and generation options shared by `ask`, `demo` and `batch`."""
    p.add_argument("--budget", type=int, default=None, help="visual token budget (ATA), e.g. 4096 or 8192")
    p.add_argument("--no-ata", action="store_true", help="keep all memory tokens of every segment")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default 2.0)")
    p.add_argument("--max-frames", type=int, default=None, help="most frames to sample (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=None, help="generate at least this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default: greedy)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the compressor and decode with a static cache (compiled step with CUDA graphs); "
        "on an H100 the compressor is ~1.7x and decoding ~4x faster once the first calls have compiled",
    )


def add_ask_options(p: argparse.ArgumentParser) -> None:
    add_answer_options(p)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--device-map", default=None, help="spread the model over GPUs: auto, or a JSON {module: device}")
    p.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write the token allocation picture")
    p.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--stream",
        action="store_true",
        help="compress the video's segments while the file is still decoding (same answer; saves the "
        "compressor's time on long files); the model is loaded before the video is read",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempo", description="Tempo long-video question answering")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about a video")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--model", default=None, help="path or Hub id of converted Tempo weights (default: tiny demo model)")
    add_ask_options(ask)
    ask.set_defaults(func=cmd_ask)

    demo = sub.add_parser("demo", help="run ask end to end on a tiny random model and a generated video (offline)")
    demo.add_argument("--question", default=None)
    add_ask_options(demo)
    demo.set_defaults(func=cmd_demo)

    from .batch import DESCRIPTION, add_batch_arguments

    batch = sub.add_parser(
        "batch",
        help="answer a JSONL file of {id, video, question} items (resumable; accelerate launch for several GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_batch_arguments(batch)
    batch.set_defaults(func=cmd_batch)

    convert = sub.add_parser("convert", help="convert the released Tempo-6B checkpoint to this format")
    try:
        from .conversion import add_convert_arguments

        add_convert_arguments(convert)
    except ImportError:  # pragma: no cover - conversion module missing
        pass
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"tempo: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"tempo: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m transformers_tempo.cli` runs this file as __main__; use the package's copy of it so that
    # modules importing from .cli (batch.py) raise the UsageError that main() catches.
    from transformers_tempo.cli import main as package_main

    sys.exit(package_main())
