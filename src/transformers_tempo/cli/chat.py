"""`tempo chat`: a conversation about one video, one question per line on standard input."""

from __future__ import annotations

import sys

from .ask import demo_notice, generation_options
from .common import (
    DTYPES,
    Status,
    UsageError,
    add_answer_options,
    add_debug_option,
    check_device,
    check_model,
    check_numbers,
    check_video,
    ensure_demo_assets,
    load_pipeline,
)

QUIT_WORDS = ("exit", "quit")


def add_chat_parser(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="a conversation about one video (questions on standard input, one per line)",
        description="Ask about a video turn after turn: one question per line on standard input, an empty "
        "line is skipped, 'exit' or end of input ends. The video is decoded and encoded once; each answer "
        "sees the earlier questions and answers.",
    )
    chat.add_argument("video", help="video file (any format PyAV reads)")
    chat.add_argument("--model", default=None, help="folder or Hub id of converted Tempo weights (default: the demo model)")
    add_answer_options(chat)
    chat.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    chat.add_argument("--dtype", default=None, choices=DTYPES, help="the weights' dtype (default: auto, as saved)")
    add_debug_option(chat)
    chat.set_defaults(func=cmd_chat, json=False)


def cmd_chat(args) -> int:
    check_numbers(args)
    video = check_video(args.video)
    model = None if args.model is None else check_model(args.model)
    with Status("loading torch"):
        check_device(args.device, None)
        from ..chat import VideoChat
        from ..video_loading import VideoLoadError, load_video
    load_options = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}
    load_options["backend"] = args.decode_backend
    try:
        loaded = load_video(video, **load_options)
    except VideoLoadError as err:
        raise UsageError(str(err)) from err
    if model is None:
        with Status("preparing the demo model"):
            model = str(ensure_demo_assets(quiet=True)[0])
    demo_notice(args)
    vqa = load_pipeline(model, args.device, args.dtype, None, args.compile)
    chat = VideoChat(vqa.model, vqa.processor, loaded, **generation_options(args))
    if sys.stdin.isatty():
        print(f"{video}: {loaded.num_frames} frames sampled; ask away ('exit' ends)", file=sys.stderr)
    for line in sys.stdin:
        question = line.strip()
        if not question:
            continue
        if question.lower() in QUIT_WORDS:
            break
        print(chat.ask(question), flush=True)
    return 0
