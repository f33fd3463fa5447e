"""`tempo convert`: the released Tempo-6B checkpoint to this format (the work lives in `conversion`)."""

from __future__ import annotations

from .common import add_debug_option


def add_convert_parser(subparsers, *, with_options: bool) -> None:
    """`with_options`: add the conversion's own options, which live with the conversion code (it
    imports torch): only when `convert` is the command about to run."""
    convert = subparsers.add_parser(
        "convert",
        help="convert the released Tempo-6B checkpoint to this format",
        description="Convert the released Tempo-6B checkpoint (and the base Qwen3-VL-2B-Instruct) into a "
        "folder that AutoModel/AutoProcessor load; optionally upload it to the Hub.",
    )
    if with_options:
        from ..conversion import add_convert_arguments

        add_convert_arguments(convert)
    add_debug_option(convert)
    convert.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from ..conversion import run_convert

    return run_convert(args) or 0
