"""Probe: what page-locked (pinned) host buffers cost when decoding an hour-long file on this machine.

    python benchmarks/probe_host_buffers.py [--out FILE]

Times a cold and a cached 1024-frame 720p pinned allocation (what `load_video(pin_memory=True)`
makes for one hour-long video), then decodes the generated 1-hour 1280x720 file into pinned memory
(with the first result alive, after freeing it), into pageable memory, and with a no-op `on_frames`.
Needs CUDA for the pinned part. Session 4 on an H100 machine: `results/probe-host-buffers-2026-11-25.txt`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from transformers_tempo.synthetic import write_long_video  # noqa: E402
from transformers_tempo.video_loading import load_video  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the lines to this file")
    args = p.parse_args(argv)
    lines = []

    def timed(label, fn):
        t0 = time.perf_counter()
        result = fn()
        lines.append(f"{label}: {time.perf_counter() - t0:.2f} s")
        print(lines[-1], flush=True)
        return result

    path = write_long_video("/tmp/probe-long-60min.mp4", duration=3600, width=1280, height=720, fps=30)
    size = 1024 * 720 * 1280 * 3
    torch.cuda.init()
    first = timed("pinned empty 2.83 GB, cold", lambda: torch.empty(size, dtype=torch.uint8, pin_memory=True))
    del first
    again = timed("pinned empty 2.83 GB, cached", lambda: torch.empty(size, dtype=torch.uint8, pin_memory=True))
    other = timed("pinned empty 2.83 GB while another is alive", lambda: torch.empty(size, dtype=torch.uint8, pin_memory=True))
    del again, other
    a = timed("decode into pinned memory #1", lambda: load_video(path, pin_memory=True))
    b = timed("decode into pinned memory #2, #1 alive", lambda: load_video(path, pin_memory=True))
    del a, b
    timed("decode into pinned memory #3, both freed", lambda: load_video(path, pin_memory=True))
    timed("decode into pageable memory", lambda: load_video(path, pin_memory=False))
    timed("decode into pinned memory with a no-op on_frames", lambda: load_video(path, pin_memory=True, on_frames=lambda e: None))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
