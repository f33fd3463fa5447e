"""Decode throughput of `load_video` at Tempo's 2-fps sampling.

Generates (once, cached) a long H.264 test video with a low-detail picture and measures how long
`load_video` takes to sample and decode it. Prints one JSON line.

    python benchmarks/bench_decode.py                       # 10 min, 1280x720, 30 fps, gop 250
    python benchmarks/bench_decode.py --minutes 60 --max-frames 1024 --repeat 3
    python benchmarks/bench_decode.py --forward-only        # never seek (for comparison)
    python benchmarks/bench_decode.py --workers 1           # one decoder (default: automatic)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from transformers_tempo import video_decoding
from transformers_tempo.synthetic import decode_frame_index, write_test_video
from transformers_tempo.video_loading import load_video


def cached_video(args) -> Path:
    name = f"tempo_bench_{args.minutes:g}min_{args.width}x{args.height}_{args.fps:g}fps_gop{args.gop}.mp4"
    path = Path(args.cache_dir) / name
    if not path.exists():
        num_frames = round(args.minutes * 60 * args.fps)
        print(f"writing {num_frames} frames to {path} (once) ...", file=sys.stderr)
        start = time.perf_counter()
        tmp = path.with_suffix(".tmp.mp4")
        write_test_video(
            tmp,
            num_frames=num_frames,
            fps=args.fps,
            width=args.width,
            height=args.height,
            codec="libx264",
            gop=args.gop,
            codec_options={"preset": "ultrafast", "crf": "23"},
        )
        os.replace(tmp, path)
        print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gop", type=int, default=250, help="keyframe interval of the generated file")
    parser.add_argument("--sample-fps", type=float, default=2.0)
    parser.add_argument("--min-frames", type=int, default=8)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="decoder threads (default: FFmpeg's choice)")
    parser.add_argument(
        "--workers", type=int, default=None, help="load_video num_workers: parallel keyframe ranges (default: auto)"
    )
    parser.add_argument("--max-longer-edge", type=int, default=None, help="resize while decoding (e.g. 512)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best and all times are reported")
    parser.add_argument(
        "--forward-only", action="store_true", help="never seek (decode every frame; meant with --workers 1)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip checking which frames were decoded")
    parser.add_argument("--cache-dir", default="/tmp")
    parser.add_argument("--video", default=None, help="benchmark this file instead of a generated one")
    args = parser.parse_args()

    path = Path(args.video) if args.video else cached_video(args)
    if args.forward_only:
        video_decoding.SEEK_MIN_SKIPPED_FRAMES = 1 << 62

    times, video = [], None
    for _ in range(args.repeat):
        start = time.perf_counter()
        video = load_video(
            path,
            fps=args.sample_fps,
            min_frames=args.min_frames,
            max_frames=args.max_frames,
            num_threads=args.threads,
            num_workers=args.workers,
            max_longer_edge=args.max_longer_edge,
        )
        times.append(time.perf_counter() - start)

    # The demux-only pass that load_video does first (to count frames and find keyframes).
    import av

    start = time.perf_counter()
    with av.open(str(path)) as container:
        packets = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    index_seconds = time.perf_counter() - start

    correct = None
    if not args.no_check and not args.video:
        correct = [decode_frame_index(f.numpy()) for f in video.frames] == video.frame_indices

    best = min(times)
    result = {
        "benchmark": "decode",
        "video": str(path),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "source": {
            "frames": video.total_frames,
            "fps": video.source_fps,
            "seconds": round(video.duration, 2),
            "width": args.width,
            "height": args.height,
            "gop": args.gop,
        },
        "sampled_frames": video.num_frames,
        "frame_shape": list(video.frames.shape[1:]),
        "real_fps": round(video.real_fps, 4),
        "wall_s": round(best, 3),
        "wall_s_all": [round(t, 3) for t in times],
        "sampled_frames_per_s": round(video.num_frames / best, 1),
        "source_frames_per_s": round(video.total_frames / best, 1),
        "decoded_frames": video.stats.get("decoded_frames"),
        "seeks": video.stats.get("seeks"),
        "index_pass_s": round(index_seconds, 3),
        "index_packets": packets,
        "forward_only": args.forward_only,
        "threads": args.threads or "auto",
        "workers": video.stats.get("workers"),
        "workers_requested": args.workers or "auto",
        "right_frames": correct,
        "warnings": video.warnings,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "pyav": av.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
