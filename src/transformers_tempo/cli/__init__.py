"""The `tempo` command: ask a question about a video, run the offline demo, answer a file of
questions, convert the released weights.

One module per command (`ask`, `chat`, `demo`, `batch`, `convert`), what they share in `common`, and the
batch job itself (no command line) in `batch_job`. Only the standard library is imported until the
work starts: `tempo --help`, `tempo ask --help` and errors in the command line or its paths come back
at once, without loading torch or transformers. Every user error is one line on stderr and exit
status 2; Ctrl-C is one line and exit status 130.
"""

from __future__ import annotations

import sys

from .ask import add_ask_parser, answer_text
from .batch import add_batch_parser
from .chat import add_chat_parser
from .common import Parser, UsageError, add_debug_option, configure_logging, ensure_demo_assets, parse_device_map
from .convert import add_convert_parser
from .demo import add_demo_parser

__all__ = ["UsageError", "answer_text", "build_parser", "ensure_demo_assets", "main", "parse_device_map"]


def build_parser(command: str | None = None) -> Parser:
    """The `tempo` parser. `command`: the subcommand about to run (its options are only added for
    `convert` when it is the one: they live with the conversion code, which imports torch)."""
    parser = Parser(prog="tempo", description="Tempo long-video question answering")
    add_debug_option(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{ask,chat,demo,batch,convert}")
    add_ask_parser(subparsers)
    add_chat_parser(subparsers)
    add_demo_parser(subparsers)
    add_batch_parser(subparsers)
    add_convert_parser(subparsers, with_options=command == "convert")
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
