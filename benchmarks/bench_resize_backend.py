"""Preprocessing speed of the two resize backends of `TempoVideoProcessor` on the CPU.

Makes `--frames` synthetic 1280x720 frames (smooth shading, edges and noise) and times
`process_video` with resize_backend="torch" (torch's uint8 kernel on the whole stack) and "pil"
(PIL bicubic frame by frame in threads: the released pixels bit for bit), plus the first two
resizes alone (the only part that differs). Prints one JSON object; `--out` also writes it.

    python benchmarks/bench_resize_backend.py                   # 1024 frames, 3 repeats
    python benchmarks/bench_resize_backend.py --frames 256 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from transformers_tempo.video_processing_tempo import TempoVideoProcessor, resize_frames, resize_frames_pil


def synthetic_frames(count: int, height: int, width: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0), 128 + 90 * np.cos((x + y) / 51.0),
                     255 * (x / width) * (y / height)], axis=-1)
    base[(x // 40 + y // 40) % 5 == 0] = (250, 240, 30)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    noise = rng.normal(0, 8, (8, height, width, 3)).astype(np.float32)
    for i in range(count):  # moving picture, a few noise fields reused
        frames[i] = np.clip(np.roll(base, 3 * i, axis=1) + noise[i % 8], 0, 255)
    return torch.from_numpy(frames)


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    frames = synthetic_frames(args.frames, args.height, args.width)
    processor = TempoVideoProcessor()
    size_a, size_b, size_c = processor.frame_sizes(args.height, args.width)
    processor.process_video(frames[:16], 2.0)  # warm-up: thread pools, allocator
    processor.process_video(frames[:16], 2.0, resize_backend="pil")
    result = {
        "frames": args.frames,
        "frame_size": [args.width, args.height],
        "sizes_hw": [size_a, size_b, size_c],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    for backend in ("torch", "pil"):
        whole = timed(lambda: processor.process_video(frames, 2.0, resize_backend=backend), args.repeat)
        if backend == "torch":
            first_two = lambda: resize_frames(resize_frames(frames.permute(0, 3, 1, 2), size_a), size_b)  # noqa: E731
        else:
            first_two = lambda: resize_frames_pil(frames, [size_a, size_b])  # noqa: E731
        steps = timed(first_two, args.repeat)
        result[backend] = {
            "process_video_s": whole,
            "process_video_frames_per_s": args.frames / statistics.median(whole),
            "resizes_a_b_s": steps,
            "resizes_a_b_frames_per_s": args.frames / statistics.median(steps),
        }
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
