"""Write the generated videos of the `tempo_tiny_mcq` lmms-eval task (a few KB each, not committed).

    python examples/lmms_eval/make_videos.py [OUT_DIR]      # default: examples/lmms_eval/videos

Every frame carries its frame index in binary blocks on its top half
(`transformers_tempo.synthetic.index_pattern`, readable with `decode_frame_index`) and a flat
colour on its bottom half: the colour the task's questions ask about. The task reads the videos
from `$TEMPO_TINY_MCQ_VIDEOS`, else from the `videos/` folder next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers_tempo.synthetic import index_pattern, write_test_video

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
FPS = 10
# file name -> [(first second, colour)]: the colour from that second on
VIDEOS = {
    "red.mp4": [(0, "red")],
    "green.mp4": [(0, "green")],
    "blue.mp4": [(0, "blue")],
    "red_then_blue.mp4": [(0, "red"), (3, "blue")],
}
SECONDS = {"red.mp4": 4, "green.mp4": 4, "blue.mp4": 4, "red_then_blue.mp4": 6}


def colour_at(name: str, second: float) -> str:
    """The colour of video `name` at `second` (what a correct answer names)."""
    colour = VIDEOS[name][0][1]
    for start, value in VIDEOS[name]:
        if second >= start:
            colour = value
    return colour


def write_videos(out_dir: str | Path) -> Path:
    """Write every video of the task into `out_dir` (kept if already there); returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, seconds in SECONDS.items():
        path = out_dir / name
        if path.exists():
            continue

        def draw(index, width, height, name=name):
            frame = index_pattern(index, width, height)
            frame[height // 2 :] = COLOURS[colour_at(name, index / FPS)]
            return frame

        tmp = path.with_name("tmp." + name)
        write_test_video(tmp, num_frames=seconds * FPS, fps=FPS, width=64, height=48, color_fn=draw)
        tmp.replace(path)
    return out_dir


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "videos"
    print(write_videos(target))
