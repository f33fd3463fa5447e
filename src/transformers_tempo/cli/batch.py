"""`tempo batch`: the command line of the batch job (`batch_job`): its options, checks, accelerate
setup and summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .batch_job import BatchSettings, read_items, run
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
    check_reference,
    ensure_demo_assets,
    load_pipeline,
    parse_device_map,
)

DESCRIPTION = """\
Answer many questions about many videos. INPUT is a JSONL file, one item per line:
  {"id": "q1", "video": "clips/a.mp4", "question": "Who scores?"}
with optional per-item options "budget" (or "visual_token_budget"), "max_new_tokens", "fps",
"max_frames". Relative video paths are relative to the input file's folder.

OUTPUT gets one JSON line per item, in input order: id, question, video, answer, visual_tokens,
sampled_frames, tokens_per_frame, duration, segments, timings, ... or, for an item that failed,
{"id": ..., "error": "..."}. A run that is stopped can be started again with the same command:
items already in OUTPUT (or in the OUTPUT.rankN.part files a killed run leaves) are skipped.
Error lines are kept and not retried unless --retry-errors is given. The exit status is 0 when the
run completes (failed items included: see the summary), 2 for a bad command line or input file.
Several questions about one video decode it once per process (its later items' timings say
"decode": 0), in any order in the file; the answers are those of one question at a time.

Data parallel over several GPUs: accelerate launch --num_processes 2 -m transformers_tempo.cli batch ...
"""




def add_batch_parser(subparsers) -> None:
    batch = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of {id, video, question} items (resumable; accelerate launch for several GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_batch_arguments(batch)
    add_debug_option(batch)
    batch.set_defaults(func=run_batch)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL file of {id, video, question} items")
    p.add_argument("--output", required=True, help="JSONL file of answers (resumed if it exists)")
    p.add_argument("--model", default=None, help="path or Hub id of converted Tempo weights (default: tiny demo model)")
    p.add_argument("--batch-size", type=int, default=1, help="videos per model call (default 1)")
    p.add_argument("--retry-errors", action="store_true", help="answer again the items whose line is an error")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="videos decoded at once, ahead of the model (default: the cores, at most 8; 1 with NVDEC)")
    p.add_argument("--reference", action="store_true", help=REFERENCE_HELP)
    add_answer_options(p)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (one process; accelerate picks it otherwise)")
    p.add_argument(
        "--device-map",
        default=None,
        help='spread one model over several GPUs (one process): auto, or JSON such as \'{"model.compressor": 0, '
        '"model.memory_tokens": 0, "model.relevance_head": 0, "model.projector": 1, "model.language_model": 1, '
        '"lm_head": 1}\'',
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help="the weights' dtype (default: auto, as saved)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _check_output(output: Path, input_path: str) -> None:
    """The output file can be written (its folder is made if missing) and is not the input."""
    if output.resolve() == Path(input_path).resolve():
        raise UsageError("--output must not be the input file")
    if output.is_dir():
        raise UsageError(f"--output {output}: is a folder, expected a file name")
    folder = output.parent
    while not folder.exists():  # the nearest existing folder must take the new ones
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"--output {output}: cannot write in {str(folder)!r}")
    if output.exists() and not os.access(output, os.W_OK):
        raise UsageError(f"--output {output}: not writable (permission denied)")


def run_batch(args) -> int:
    """`tempo batch`: check the command line, set up accelerate, run, print the summary."""
    check_numbers(args)
    check_reference(args)
    items = read_items(args.input)
    output = Path(args.output)
    _check_output(output, args.input)
    device_map = parse_device_map(args.device_map)
    if device_map is not None and args.device:
        raise UsageError("give --device or --device-map, not both")
    model = check_model(args.model) if args.model is not None else None

    with Status("loading torch and accelerate"):
        import torch
        from accelerate import PartialState

        check_device(args.device, device_map)
    # Several CPU processes need accelerate's CPU mode (gloo); on a GPU machine each process takes its GPU.
    cpu = (args.device or "").startswith("cpu") or not torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not cpu and local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} visible): "
            "launch at most one process per GPU, or pass --device cpu"
        )
    state = PartialState(cpu=cpu)
    if state.num_processes > 1 and (device_map is not None or (args.device and not cpu)):
        raise UsageError(
            "under accelerate launch each process uses its own device: leave out --device and --device-map"
        )
    if model is None:
        with state.main_process_first():  # one process builds the demo model, the others wait for it
            model = str(ensure_demo_assets(quiet=True)[0])
        if state.is_main_process and not args.json:
            print("no --model given: using the tiny random demo model (its answers are noise)", file=sys.stderr)
    if args.temperature:
        torch.manual_seed(args.seed + state.process_index)
    if device_map is None:
        # one device per process: accelerate's (cuda:N under accelerate launch), or --device
        device = torch.device(args.device or state.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device_map = {"": str(device)}

    settings = BatchSettings(
        visual_token_budget=args.budget,
        max_new_tokens=args.max_new_tokens,
        fps=args.fps,
        max_frames=args.max_frames,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        use_ata=not args.no_ata,
        batch_size=args.batch_size,
        retry_errors=args.retry_errors,
        base_dir=Path(args.input).resolve().parent,
        decode_backend=args.decode_backend,
        decode_workers=args.decode_workers,
    )
    progress = sys.stderr.isatty() and not args.json
    summary = run(
        items, output,
        lambda: load_pipeline(
            model, None, args.dtype, device_map, compile_compressor=args.compile, reference=args.reference
        ),
        settings, state, progress,
    )
    if summary is not None:
        summary["model"] = model
        print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0


def summary_text(s: dict) -> str:
    tokens = "n/a" if s["mean_tokens_per_frame"] is None else f"{s['mean_tokens_per_frame']:.2f}"
    lines = [
        f"items: {s['items']}, answered: {s['answered']}, failed: {s['failed']}, skipped (already done): {s['skipped']}",
        f"wall time: {s['wall_s']:.1f} s (model load {s['load_s']:.1f} s), answering {s['answer_s']:.1f} s: "
        f"{s['videos_per_s']:.2f} videos/s over {s['processes']} process(es), batch size {s['batch_size']}",
        f"visual tokens per frame: {tokens} (mean over the videos answered)",
        f"output: {s['output']}",
    ]
    if s["error_lines"]:
        lines.append(f"{s['error_lines']} item(s) have an error line; --retry-errors answers them again")
    return "\n".join(lines)
