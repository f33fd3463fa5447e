"""The conversion's command-line options and runner, shared by `tempo convert` and
`conversion/convert_tempo_to_hf.py`. Only the standard library is imported here: `tempo convert --help`
must not wait for torch; the conversion itself is imported when it runs."""

from __future__ import annotations

import argparse
import sys

from .errors import ConversionError


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The conversion options, shared by `conversion/convert_tempo_to_hf.py` and `tempo convert`."""
    parser.add_argument("--tempo_path", "--tempo-path", required=True, help="released Tempo-6B folder (config, weights, tokenizer)")
    parser.add_argument("--qwen3vl_path", "--qwen3vl-path", required=True, help="base Qwen3-VL-2B-Instruct folder")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB")
    parser.add_argument("--push_to_hub", "--push-to-hub", default=None, metavar="REPO_ID", help="upload the result to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                        help="accept .bin/.pt weights (pickle can execute code: only for files you trust)")
    parser.add_argument("--released-float16-rounding", dest="released_float16_rounding", action="store_true",
                        help="round weights through float16 first, as the released scripts load them")
    parser.add_argument("--model_card", "--model-card", default=None, help="README.md to write (default: model_cards/tempo-6b.md)")
    parser.add_argument("--mapping", action="store_true", help="also print every tensor's released -> converted name")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; prints the mapping summary. Returns a process exit code."""
    from .convert import convert_tempo_checkpoint

    try:
        report = convert_tempo_checkpoint(
            args.tempo_path,
            args.qwen3vl_path,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            push_to_hub=args.push_to_hub,
            private=True if getattr(args, "private", False) else None,
            released_float16_rounding=getattr(args, "released_float16_rounding", False),
            model_card=getattr(args, "model_card", None),
            progress=lambda line: print(line, flush=True),
        )
    except ConversionError as err:
        print(f"conversion failed: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    if getattr(args, "mapping", False):
        for source, target in report.key_mapping.items():
            print(f"{source} -> {target if target is not None else '(tied, not stored)'}")
    return 0
