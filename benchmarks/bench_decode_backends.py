"""Video decoding backends on one long file: PyAV (CPU, automatic workers) vs NVDEC (GPU, 1/2/4/7 decoders)
vs both together, through `load_video`.

    python benchmarks/bench_decode_backends.py                      # GPU machine: writes a 1-hour 720p file
    python benchmarks/bench_decode_backends.py --video long.mp4     # an existing file
    python benchmarks/bench_decode_backends.py --skip-write         # reuse the file an earlier run wrote
    python benchmarks/bench_decode_backends.py --tiny               # CPU, PyAV only, seconds (used by the tests)
    python benchmarks/bench_decode_backends.py --pyav-without-skipping   # adds PyAV without non-reference skipping

The file is H.264 1280x720 at 30 fps with a keyframe every 3 s (`synthetic.write_long_video`). By default
it has 3 B-frames between references, the middle one a reference itself (x264 b-adapt=0, b-pyramid), so
that PyAV's skipping of unwanted non-reference pictures has something to skip, as in most downloaded
videos. `--bframes 0` writes the file of earlier runs (as `bench_questions.py` writes it): x264 was
allowed 2 B-frames there but chose none for this synthetic picture, so every frame is a reference.
Measured per backend:

* `sampled_load`: `load_video` of 1024 frames at 2 fps (Tempo's sampling), a process's first load of
  that backend and configuration (`first_s`: NVDEC pays creating its decoders there) and a second one
  (`second_s`: decoders reused);
* `full_decode`: every frame of the first `--full-seconds` seconds (`fps` = the file's, frames shrunk to
  256 px so that they fit in memory), frames per second;
* `pixels_vs_pyav`: max and mean absolute difference of NVDEC's sampled frames from PyAV's;
* with `--pyav-without-skipping`, `pyav_without_nonref_skipping`: PyAV's sampled load again with
  `video_decoding.SKIP_UNWANTED_NONREF` off (every B-frame passed on the way to a wanted frame is
  decoded), and whether its frames equal those of the load with skipping (they must).

"both together" splits the file in two clips decoded at once, NVDEC the first `--nvdec-share` of it and
PyAV the rest (each clip sampled on its own, so its frames are not exactly those of one whole-file load;
the time is what splitting the ranges between the two decoders would take). Every NVDEC measurement
records its error message instead of stopping the run. JSON to stdout, and to `--out` when given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers_tempo import video_decoding, video_decoding_nvdec  # noqa: E402
from transformers_tempo.synthetic import benchmark_h264_options, write_long_video  # noqa: E402
from transformers_tempo.video_loading import load_video  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--video", default=None, help="decode this file instead of writing one")
    p.add_argument("--folder", default="bench-videos", help="where the generated file goes")
    p.add_argument("--skip-write", action="store_true", help="use the file an earlier run wrote (error if missing)")
    p.add_argument("--minutes", type=float, default=60.0, help="length of the generated file")
    p.add_argument("--frames", type=int, default=1024, help="sampled frames of the sampled load")
    p.add_argument("--full-seconds", type=float, default=300.0, help="decode every frame of this many seconds")
    p.add_argument("--decoders", default="1,2,4,7", help="NVDEC decoder counts to measure")
    p.add_argument("--nvdec-share", type=float, default=0.5, help="share of the file NVDEC decodes in 'both together'")
    p.add_argument(
        "--bframes", type=int, default=3,
        help="B-frames between references in the generated file (0: the earlier runs' file, no B-frames)",
    )
    p.add_argument("--tiny", action="store_true", help="a 20 s 320x240 file, 64 frames, PyAV only (CPU)")
    p.add_argument(
        "--pyav-without-skipping", action="store_true",
        help="also time PyAV's sampled load with the skipping of unwanted non-reference pictures off",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.minutes, args.frames, args.full_seconds = 20 / 60, 64, 5.0
    return args


def video_file(args) -> Path:
    if args.video:
        return Path(args.video)
    width, height = (320, 240) if args.tiny else (1280, 720)
    suffix = f"-b{args.bframes}" if args.bframes else ""
    path = Path(args.folder) / f"decode-{args.minutes:g}min-{width}x{height}{suffix}.mp4"
    if args.skip_write:
        if not path.exists():
            sys.exit(f"--skip-write: {path} does not exist (run once without it)")
        return path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_long_video(
            path, duration=60 * args.minutes, clip_seconds=10.0, fps=30, width=width, height=height, gop=90,
            codec_options=benchmark_h264_options(args.bframes),
        )
    return path


def timed_load(path, **options):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = load_video(path, **options)
    return loaded, time.perf_counter() - t0


def sampled_load(path, frames: int, **options) -> tuple[dict, object]:
    """A first and a second load of `frames` frames at 2 fps; the row and the second load's video."""
    first, first_s = timed_load(path, fps=2.0, max_frames=frames, **options)
    del first
    second, second_s = timed_load(path, fps=2.0, max_frames=frames, **options)
    row = {
        "first_s": round(first_s, 3), "second_s": round(second_s, 3), "frames": second.num_frames,
        "backend": second.metadata.video_backend, "stats": dict(second.stats),
    }
    return row, second


def full_decode(path, seconds: float, source_fps: float, **options) -> dict:
    """Every frame of the first `seconds` (sampled at the file's own rate), shrunk to 256 px."""
    loaded, elapsed = timed_load(
        path, fps=source_fps, max_frames=10**7, clip=(0.0, seconds), max_longer_edge=256, **options
    )
    return {
        "frames": loaded.num_frames, "seconds": round(elapsed, 3), "frames_per_s": round(loaded.num_frames / elapsed, 1),
        "backend": loaded.metadata.video_backend, "stats": dict(loaded.stats),
    }


def without_nonref_skipping(path, frames: int, frames_with_skipping: torch.Tensor) -> dict:
    """PyAV's sampled load with the decoder told to decode the unwanted non-reference pictures too."""
    before = video_decoding.SKIP_UNWANTED_NONREF
    video_decoding.SKIP_UNWANTED_NONREF = False
    try:
        row, loaded = sampled_load(path, frames, backend="pyav")
    finally:
        video_decoding.SKIP_UNWANTED_NONREF = before
    row["frames_equal_with_skipping"] = torch.equal(loaded.frames, frames_with_skipping)
    return row


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"error": f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"}
    largest, total = 0, 0.0
    for start in range(0, a.shape[0], 64):
        d = (a[start : start + 64].int() - b[start : start + 64].int()).abs()
        largest, total = max(largest, int(d.max())), total + float(d.sum())
    return {"max_abs": largest, "mean_abs": round(total / a.numel(), 4)}


def both_together(path, duration: float, frames: int, share: float) -> dict:
    """NVDEC on the first `share` of the file and PyAV on the rest, at once (two threads)."""
    cut = duration * share
    jobs = {"nvdec": (0.0, cut), "pyav": (cut, None)}
    shares = {"nvdec": max(1, round(frames * share)), "pyav": max(1, frames - round(frames * share))}
    results, errors = {}, {}

    def run(backend):
        try:
            results[backend] = load_video(path, fps=2.0, max_frames=shares[backend], clip=jobs[backend], backend=backend)
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            errors[backend] = f"{type(error).__name__}: {error}"

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(backend,)) for backend in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = {"seconds": round(time.perf_counter() - t0, 3), "nvdec_share": share}
    row["frames"] = {backend: video.num_frames for backend, video in results.items()}
    if errors:
        row["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    return row


def measure_nvdec(path, args, reference_frames: torch.Tensor, duration: float, source_fps: float) -> dict:
    out: dict = {}
    try:
        _, startup_s = timed_load(path, fps=2.0, max_frames=8, backend="nvdec", num_workers=1)
        out["process_first_load_8_frames_s"] = round(startup_s, 3)  # library import, CUDA context, a decoder
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}", "library": video_decoding_nvdec.describe()}
    for count in [int(c) for c in args.decoders.split(",") if c.strip()]:
        key = f"decoders_{count}"
        video_decoding_nvdec.clear_decoders()  # each count's first load creates its decoders
        try:
            row, loaded = sampled_load(path, args.frames, backend="nvdec", num_workers=count)
            row["pixels_vs_pyav"] = pixel_difference(loaded.frames, reference_frames)
            del loaded
            row["full_decode"] = full_decode(path, args.full_seconds, source_fps, backend="nvdec", num_workers=count)
            out[key] = row
        except Exception as error:  # noqa: BLE001
            out[key] = {"error": f"{type(error).__name__}: {error}"}
    try:
        out["both_together"] = both_together(path, duration, args.frames, args.nvdec_share)
    except Exception as error:  # noqa: BLE001
        out["both_together"] = {"error": f"{type(error).__name__}: {error}"}
    out["library"] = video_decoding_nvdec.describe()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = video_file(args)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "video": str(path), "bframes": None if args.video else args.bframes,
        "frames": args.frames, "full_seconds": args.full_seconds,
    }
    pyav_row, pyav_video = sampled_load(path, args.frames, backend="pyav")
    source_fps = pyav_video.metadata.fps
    duration = pyav_video.metadata.total_num_frames / source_fps
    result["duration_s"] = round(duration, 1)
    pyav_row["full_decode"] = full_decode(path, args.full_seconds, source_fps, backend="pyav")
    result["pyav"] = pyav_row
    if args.pyav_without_skipping:
        result["pyav_without_nonref_skipping"] = without_nonref_skipping(path, args.frames, pyav_video.frames)
    if args.tiny:
        result["nvdec"] = {"skipped": "--tiny measures PyAV only (CPU)"}
    else:
        result["nvdec"] = measure_nvdec(path, args, pyav_video.frames, duration, source_fps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
