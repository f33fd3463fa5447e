"""`tempo demo`: `tempo ask` end to end on a tiny random model and a generated video (offline)."""

from __future__ import annotations

from .ask import add_ask_options, cmd_ask
from .common import Status, add_debug_option, check_numbers, check_plot, ensure_demo_assets

DEMO_QUESTION = "What colour is the video?"


def add_demo_parser(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run ask end to end on a tiny random model and a generated video (offline)",
        description="Build (once) a tiny random Tempo model and a generated video, and answer a question "
        "about it end to end. The model is random: the answer is noise, the path from file to answer is the real one.",
    )
    demo.add_argument("--question", default=None, help=f"the question (default: {DEMO_QUESTION!r})")
    add_ask_options(demo)
    add_debug_option(demo)
    # what `tempo ask` reads that the demo does not offer: one question, not the released preset
    demo.set_defaults(func=cmd_demo, more_questions=None, reference=False)


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
