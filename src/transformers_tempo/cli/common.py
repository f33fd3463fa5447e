"""What the `tempo` commands share: one-line usage errors, the status line, the checks that run
before any model is loaded or video decoded, the --reference settings, logging, loading the pipeline,
and the tiny demo model.

Only the standard library at module level: `tempo --help` and argument errors stay instant.
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

from ..atomic_files import atomic_directory, atomic_path

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
        from ..processing_tempo import TempoProcessor
        from ..testing_utils import build_tiny_model, build_tiny_tokenizer
        from ..video_processing_tempo import TempoVideoProcessor

        if not quiet:
            print(f"building a tiny random Tempo model in {model_dir} (once)", file=sys.stderr)
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer)
        processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
        with atomic_directory(model_dir, replace=True) as tmp:  # a half-written folder never shows
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        del model
    if not video.exists():
        from ..synthetic import write_test_video

        if not quiet:
            print(f"writing a generated 12-second test video to {video} (once)", file=sys.stderr)
        with atomic_path(video) as tmp_video:
            write_test_video(tmp_video, num_frames=12 * 24, fps=24, width=320, height=240)
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
    positive_ints = ("budget", "max_frames", "max_new_tokens", "batch_size", "decode_workers")
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


DECODE_BACKENDS = ("auto", "pyav", "nvdec")  # load_video's `backend` (kept here: the CLI imports no torch early)

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
        "--decode-backend nvdec": getattr(args, "decode_backend", "auto") == "nvdec",
    }
    given = [name for name, value in refused.items() if value]
    if given:
        raise UsageError(f"--reference computes the released function: leave out {', '.join(given)}")
    args.dtype, args.fps, args.max_frames = "bfloat16", 2.0, 1024
    args.decode_backend = "pyav"  # the released pixels come from FFmpeg's colour conversion
    if args.budget is None:
        args.budget = 8192


def apply_reference(vqa) -> None:
    """The model and processor settings of `reference_settings()` (see --reference)."""
    from ..reference import apply_reference_precision, reference_settings

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
        # transformers' own loading bars stay hidden (the status line says it is loading); Tempo's
        # decoding and compression bars share transformers' switch, so turn it back on
        hf_logging.enable_progress_bar()
        if compile_compressor:
            vqa.model.enable_compiled_inference()
        if reference:
            apply_reference(vqa)
    return vqa



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
        "--decode-backend",
        default="auto",
        choices=DECODE_BACKENDS,
        help="video decoder: pyav (FFmpeg on the CPU), nvdec (the GPU's video decoder; needs "
        "'pip install transformers-tempo[nvdec]' and a CUDA GPU) or auto (default: pyav, the faster "
        "for Tempo's sampled frames of long files); --reference always uses pyav",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the compressor and decode with a static cache (compiled step with CUDA graphs); "
        "on an H100 the compressor is ~1.7x and decoding ~4x faster once the first calls have compiled",
    )


def add_debug_option(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--debug before or after the subcommand (a subcommand's default must not undo the top-level flag)."""
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show tracebacks and debug-level log messages",
    )

