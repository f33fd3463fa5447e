"""The `tempo` command: ask a question about a video, run the offline demo, convert the released weights.

Only the standard library is imported until the work starts: `tempo --help`, `tempo ask --help` and
errors in the command line or its paths come back at once, without loading torch or transformers.
Every user error is one line on stderr and exit status 2; Ctrl-C is one line and exit status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

DEMO_QUESTION = "What colour is the video?"
DTYPES = ("auto", "bfloat16", "float16", "float32")


class UsageError(Exception):
    """A problem with the command line or its inputs: one line to stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Status:
    """One status line on stderr while something slow runs (a terminal only: a spinner and the seconds)."""

    FRAMES = "|/-\\"

    def __init__(self, text: str, enabled: bool | None = None):
        self.text = text
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.stop = threading.Event()
        self.thread = None

    def _spin(self):
        start, i = time.monotonic(), 0
        while not self.stop.wait(0.1 if i else 0):
            sys.stderr.write(f"\r{self.text} {self.FRAMES[i % 4]} {time.monotonic() - start:.0f} s")
            sys.stderr.flush()
            i += 1

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self._spin, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            sys.stderr.write("\r" + " " * (len(self.text) + 12) + "\r")
            sys.stderr.flush()
        return False


def demo_dir() -> Path:
    root = os.environ.get("TEMPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "transformers-tempo"
    )
    return Path(root) / "demo"


def ensure_demo_assets(quiet: bool = False) -> tuple[Path, Path]:
    """Build once (then reuse) a tiny random Tempo model + processor and a generated test video."""
    root = demo_dir()
    model_dir, video = root / "tiny-tempo", root / "demo.mp4"
    if not (model_dir / "config.json").exists():
        from .processing_tempo import TempoProcessor
        from .testing_utils import build_tiny_model, build_tiny_tokenizer
        from .video_processing_tempo import TempoVideoProcessor

        if not quiet:
            print(f"building a tiny random Tempo model in {model_dir} (once)", file=sys.stderr)
        tmp = root / "tiny-tempo.tmp"
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer)
        processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, model_dir)
        del model
    if not video.exists():
        from .synthetic import write_test_video

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


# ------------------------------------------------------------------------------------- checks
# All of these run before any model is loaded or any video decoded: a mistake costs no waiting.


def check_numbers(args) -> None:
    """The numeric options shared by ask, demo and batch."""
    positive_ints = ("budget", "max_frames", "max_new_tokens", "batch_size")
    for name in positive_ints:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if getattr(args, "min_new_tokens", None) is not None and args.min_new_tokens < 0:
        raise UsageError(f"--min-new-tokens must be 0 or more, got {args.min_new_tokens}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UsageError(f"--fps must be a positive number, got {args.fps}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")


REFERENCE_HELP = (
    "reproduce the released model's outputs (for benchmark numbers): bfloat16 weights rounded as the "
    "released scripts round them, PIL resizing, 2 fps and 8-1024 frames, ATA at budget 8192 (or --budget), "
    "greedy decoding, a 32768-token context; slower (no compilation, PIL)"
)


def check_reference(args) -> None:
    """--reference: refuse the options that would change the released function; fill in its settings."""
    if not getattr(args, "reference", False):
        return
    refused = {
        "--no-ata": args.no_ata,
        "--temperature": args.temperature,
        "--min-new-tokens": args.min_new_tokens,
        "--compile": args.compile,
        "--fps other than 2": args.fps not in (None, 2.0),
        "--max-frames other than 1024": args.max_frames not in (None, 1024),
        "--dtype other than bfloat16": args.dtype not in (None, "bfloat16"),
    }
    given = [name for name, value in refused.items() if value]
    if given:
        raise UsageError(f"--reference computes the released function: leave out {', '.join(given)}")
    args.dtype, args.fps, args.max_frames = "bfloat16", 2.0, 1024
    if args.budget is None:
        args.budget = 8192


def apply_reference(vqa) -> None:
    """The model and processor settings of `reference_settings()` (see --reference)."""
    from .reference import apply_reference_precision, reference_settings

    settings = reference_settings()
    apply_reference_precision(vqa.model)
    vqa.model.config.max_context_length = settings["max_context_length"]
    vqa.processor.video_processor.resize_backend = settings["processor"]["resize_backend"]
    for name in ("min_tokens_per_segment", "use_ata", "token_selection"):
        setattr(vqa.model.generation_config, name, settings["allocation"][name])


def check_video(path: str) -> Path:
    video = Path(path).expanduser()
    if not video.exists():
        raise UsageError(f"{path}: no such file")
    if video.is_dir():
        raise UsageError(f"{path}: is a folder, expected a video file")
    if not os.access(video, os.R_OK):
        raise UsageError(f"{path}: not readable (permission denied)")
    return video


def check_output_file(path: str, option: str) -> None:
    """An output path must be writable where it is, before the work that produces it."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a folder, expected a file name")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: no such folder {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write in {str(parent)!r} (permission denied)")


def check_plot(path: str | None) -> None:
    if path is None:
        return
    check_output_file(path, "--plot")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'transformers-tempo[plot]'")


def _looks_like_path(text: str) -> bool:
    """True for what can only be a folder, never a Hub id ("name" or "org/name")."""
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.endswith("/")
        or text.count("/") > 1
        or os.path.isabs(text)
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection within `timeout` seconds (no HTTP request).

    Behind a proxy a direct connection says nothing: then the Hub client is left to try."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_on_hub(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: not cached
        return False


def check_model(model: str) -> str:
    """`--model`: a folder of converted weights, or a Hub id that can be had now (cached or reachable).

    Without network, or with HF_HUB_OFFLINE set, a Hub id that is not in the local cache fails here
    at once (instead of after the Hub client's retries); a cached one is then used offline.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: no config.json in that folder (converted Tempo weights expected; see tempo convert)")
        return str(path)
    if path.exists():
        raise UsageError(f"--model {model}: is a file, expected a folder of converted Tempo weights or a Hub id")
    if _looks_like_path(model):
        raise UsageError(f"--model {model}: no such directory")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", model):
        raise UsageError(f"--model {model}: neither a folder nor a Hub id such as org/name")
    cached = _cached_on_hub(model)
    if _offline():
        if not cached:
            raise UsageError(f"--model {model}: no such folder, and HF_HUB_OFFLINE is set while it is not in the local Hugging Face cache")
        return model
    if not _hub_reachable():
        if not cached:
            raise UsageError(
                f"--model {model}: no such folder, and the Hugging Face Hub cannot be reached (no network?) "
                "while it is not in the local cache"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"  # the cached copy, without the Hub client's retries
        try:
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover
            pass
    return model


def check_device(device: str | None, device_map) -> None:
    """--device / --device-map name devices this machine has (imports torch)."""
    import torch

    names = [device] if device else []
    if isinstance(device_map, dict):
        names += [f"cuda:{v}" if isinstance(v, int) else v for v in device_map.values()]
    for name in names:
        option = "--device" if name == device else "--device-map"
        if name in ("disk", "meta"):
            continue
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise UsageError(f"{option}: {name!r} is not a device (try cpu, cuda, cuda:1)") from None
        if dev.type == "cpu":
            continue
        backend = getattr(torch, dev.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            build = " (this torch is a CPU-only build)" if dev.type == "cuda" and torch.version.cuda is None else ""
            raise UsageError(f"{option}: {name}: no {dev.type.upper()} device on this machine{build}; use --device cpu")
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{option}: {name}: this machine has {count} {dev.type} device(s), numbered from 0")


def is_demo_model(model: str) -> bool:
    try:
        return Path(model).expanduser().resolve() == (demo_dir() / "tiny-tempo").resolve()
    except OSError:
        return False


def configure_logging(debug: bool) -> None:
    """Each warning once, in one place: what video loading and ATA log is also in the result's
    `warnings` (printed in the summary, kept in --json and batch lines), so their log records are
    shown only with --debug, which shows everything down to debug level."""
    package = logging.getLogger("transformers_tempo")
    if debug:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        package.setLevel(logging.DEBUG)
        return
    for name in ("video_loading", "token_allocation"):
        logging.getLogger(f"transformers_tempo.{name}").setLevel(logging.ERROR)


def load_pipeline(
    model: str, device: str | None, dtype: str | None, device_map=None, compile_compressor=False, reference=False
):
    """The video-question-answering pipeline for `model` (with a status line while it loads)."""
    with Status(f"loading {model}"):
        import torch
        from transformers import pipeline
        from transformers.utils import logging as hf_logging

        import transformers_tempo  # noqa: F401  (registers the task with transformers)

        if not logging.getLogger("transformers_tempo").isEnabledFor(logging.DEBUG):
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        check_device(device, device_map)
        kwargs = {}
        if device_map is not None:
            kwargs["device_map"] = device_map
        if dtype and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise UsageError(f"--dtype: unknown dtype {dtype!r} (try bfloat16, float16, float32)")
            kwargs["dtype"] = getattr(torch, dtype)
        elif dtype == "auto":
            kwargs["dtype"] = "auto"
        if device:
            kwargs["device"] = device
        try:
            vqa = pipeline("video-question-answering", model=model, **kwargs)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--model {model}: cannot load a Tempo model from there ({first})") from err
        if compile_compressor:
            vqa.model.enable_compiled_inference()
        if reference:
            apply_reference(vqa)
    return vqa


def cmd_ask(args) -> int:
    check_numbers(args)
    check_reference(args)
    questions = ([args.question] if args.question is not None else []) + (getattr(args, "more_questions", None) or [])
    if not questions:
        raise UsageError("give a question (after the video, or with -q)")
    if args.stream and len(questions) > 1:
        raise UsageError("--stream answers one question; leave it out to ask several (the video is decoded once)")
    device_map = parse_device_map(args.device_map)
    if device_map is not None and args.device:
        raise UsageError("give --device or --device-map, not both")
    video = check_video(args.video)
    check_plot(args.plot)
    demo = args.model is None or is_demo_model(args.model)
    model = None if args.model is None else check_model(args.model)
    with Status("loading torch"):
        check_device(args.device, device_map)
        from .video_loading import VideoLoadError, load_video
    if model is None:
        with Status("preparing the demo model"):
            model = str(ensure_demo_assets(quiet=args.json)[0])

    load_options = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}
    show_progress = sys.stderr.isatty() and not args.json  # progress bars only on a terminal, never with --json
    if args.stream:
        # The model first, then decoding and compression together (a bad video is found after the load).
        demo_notice(args)
        vqa = load_pipeline(model, args.device, args.dtype, device_map, args.compile, getattr(args, "reference", False))
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
        demo_notice(args)
        vqa = load_pipeline(model, args.device, args.dtype, device_map, args.compile, getattr(args, "reference", False))
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
        with Status("answering", enabled=sys.stderr.isatty() and not show_progress):
            # several questions: one decode (above) and one vision-tower pass, answered in order
            results = vqa(video=loaded, question=questions if len(questions) > 1 else questions[0], **call)
    except ValueError as err:  # streaming reads the video inside the call
        cause = err
        while cause is not None and not isinstance(cause, VideoLoadError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UsageError(str(cause)) from err
    results = results if isinstance(results, list) else [results]
    for i, (question, result) in enumerate(zip(questions, results)):
        if decode_s is not None:
            result["timings"]["decode"] = decode_s if i == 0 else 0.0  # decoded once, for the first
        if demo and args.json:  # (on a terminal the notice above and the answer line say it)
            result.setdefault("warnings", []).append(DEMO_WARNING)
        results[i] = {"video": str(video), "question": question, "model": model, **result}
    if args.plot:
        plot_allocation(results[0], args.plot)
    if args.json:  # one object; several questions: one object per line, in order
        print(json.dumps(results[0], indent=2) if len(results) == 1 else "\n".join(map(json.dumps, results)))
        return 0
    for result in results:
        if len(results) > 1:
            print(f"Q: {result['question']}")
        print(answer_text(result["answer"], demo))
    print(summary_text(results[-1]), file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


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


def cmd_demo(args) -> int:
    check_numbers(args)
    check_plot(args.plot)
    with Status("preparing the demo model"):
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
    p.add_argument("--budget", type=int, default=None, help="most visual tokens for the video (default: the model's, 8192 for Tempo-6B); every segment keeps at least one")
    p.add_argument("--no-ata", action="store_true", help="keep all memory tokens of every segment")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default 2.0)")
    p.add_argument("--max-frames", type=int, default=None, help="most frames to sample (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens (default 64)")
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


def add_debug_option(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--debug before or after the subcommand (a subcommand's default must not undo the top-level flag)."""
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show tracebacks and debug-level log messages",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `tempo` parser. `command`: the subcommand about to run (its options are only added for
    `convert` when it is the one: they live with the conversion code, which imports torch)."""
    parser = Parser(prog="tempo", description="Tempo long-video question answering")
    add_debug_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ask,demo,batch,convert}")

    ask = sub.add_parser("ask", help="answer a question about a video", description="Answer a question about a video.")
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

    demo = sub.add_parser(
        "demo",
        help="run ask end to end on a tiny random model and a generated video (offline)",
        description="Build (once) a tiny random Tempo model and a generated video, and answer a question "
        "about it end to end. The model is random: the answer is noise, the path from file to answer is the real one.",
    )
    demo.add_argument("--question", default=None, help=f"the question (default: {DEMO_QUESTION!r})")
    add_ask_options(demo)
    add_debug_option(demo)
    demo.set_defaults(func=cmd_demo)

    from .batch import DESCRIPTION, add_batch_arguments

    batch = sub.add_parser(
        "batch",
        help="answer a JSONL file of {id, video, question} items (resumable; accelerate launch for several GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_batch_arguments(batch)
    add_debug_option(batch)
    batch.set_defaults(func=cmd_batch)

    convert = sub.add_parser(
        "convert",
        help="convert the released Tempo-6B checkpoint to this format",
        description="Convert the released Tempo-6B checkpoint (and the base Qwen3-VL-2B-Instruct) into a "
        "folder that AutoModel/AutoProcessor load; optionally upload it to the Hub.",
    )
    if command == "convert":
        from .conversion import add_convert_arguments

        add_convert_arguments(convert)
    add_debug_option(convert)
    convert.set_defaults(func=cmd_convert)
    return parser


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, command = "--debug" in argv, _subcommand(argv)
    try:
        try:
            args = build_parser(command).parse_args(argv)
        except SystemExit as done:  # --help, or an argument error already printed on one line
            return done.code if isinstance(done.code, int) else 2
        debug = args.debug
        configure_logging(debug)
        return args.func(args)
    except UsageError as err:
        if debug:
            raise
        print(f"tempo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        note = " (the answers written so far are kept: run the same command again to resume)" if command == "batch" else ""
        print(f"tempo: interrupted{note}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"tempo: error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m transformers_tempo.cli` runs this file as __main__; use the package's copy of it so that
    # modules importing from .cli (batch.py) raise the UsageError that main() catches.
    from transformers_tempo.cli import main as package_main

    sys.exit(package_main())
