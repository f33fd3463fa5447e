"""The NVDEC backend on the CPU: a fake PyNvVideoCodec whose decoder hands out the NV12 planes PyAV decodes
from the same file (frame i of its list is the i-th frame in presentation order, as the library counts).
The frames' pixels encode their index (`synthetic.index_pattern`), so which frame came back is read from
the pixels, independently of the code under test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from transformers_tempo import video_decoding_nvdec as nvdec
from transformers_tempo.cli import main
from transformers_tempo.synthetic import decode_frame_index, write_test_video
from transformers_tempo.video_cache import VideoCache
from transformers_tempo.video_frame_store import _limit_longer_edge
from transformers_tempo.video_loading import VideoLoadError, load_video


def _nv12_planes(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.reformat(format="nv12").to_ndarray() for frame in container.decode(video=0)]


def _fake_library(fail: bool = False):
    library = types.ModuleType("PyNvVideoCodec")
    library.__version__ = "fake"
    library.OutputColorType = types.SimpleNamespace(NATIVE="native", RGB="rgb")
    library.decoders = []

    class SimpleDecoder:
        def __init__(self, path, gpu_id=0, use_device_memory=True, max_width=0, max_height=0, output_color_type=None):
            assert use_device_memory and output_color_type == "native"
            self.planes, self.requests, self.reconfigured = _nv12_planes(path), [], 0
            library.decoders.append(self)

        def reconfigure_decoder(self, path):
            self.planes, self.reconfigured = _nv12_planes(path), self.reconfigured + 1

        def __len__(self):
            return len(self.planes)

        def get_batch_frames_by_index(self, indices):
            if fail:
                raise RuntimeError("CUVID_ERROR_SIMULATED")
            self.requests.append(list(indices))
            return [torch.from_numpy(self.planes[i]) for i in indices]  # CPU tensors speak DLPack too

    library.SimpleDecoder = SimpleDecoder
    return library


@pytest.fixture
def fresh_state(monkeypatch):
    """A process that has not tried the library yet and kept no decoder."""
    monkeypatch.setattr(nvdec, "_library", [])
    monkeypatch.setattr(nvdec, "_POOL", nvdec._DecoderPool())


@pytest.fixture
def fake(monkeypatch, fresh_state):
    library = _fake_library()
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", library)
    monkeypatch.setattr(nvdec, "_DEVICE_OVERRIDE", "cpu")
    return library


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    # 90 frames at 30 fps, a keyframe every 12 frames, B-frames: decode order differs from display order
    path = tmp_path_factory.mktemp("nvdec") / "gop.mp4"
    return write_test_video(path, num_frames=90, width=128, height=96, gop=12, codec_options={"bf": "2"})


def _indices_in_pixels(frames: torch.Tensor) -> list[int]:
    return [decode_frame_index(frame.numpy()) for frame in frames]


def test_nvdec_returns_the_frames_pyav_samples(fake, video):
    pyav = load_video(video, fps=4, backend="pyav")
    gpu = load_video(video, fps=4, backend="nvdec")
    assert gpu.metadata.video_backend == "nvdec" and pyav.metadata.video_backend == "pyav"
    assert gpu.frame_indices == pyav.frame_indices and gpu.real_fps == pyav.real_fps
    # 3 s at 4 fps: 12 frames, round(linspace(0, 89, 12))
    assert gpu.frame_indices == [int(i) for i in np.round(np.linspace(0, 89, 12))]
    assert _indices_in_pixels(gpu.frames) == gpu.frame_indices
    difference = (gpu.frames.int() - pyav.frames.int()).abs()
    assert gpu.frames.shape == pyav.frames.shape and difference.max() <= 3  # colour conversion only
    assert gpu.stats["decoded_frames"] == 12 and gpu.stats["decoders"] >= 1


def test_nvdec_honours_clips_as_pyav_does(fake, video):
    pyav = load_video(video, fps=6, min_frames=2, clip=(1.0, 2.0), backend="pyav")
    gpu = load_video(video, fps=6, min_frames=2, clip=(1.0, 2.0), backend="nvdec")
    assert gpu.frame_indices == pyav.frame_indices and gpu.duration == pyav.duration
    assert min(gpu.frame_indices) >= 30 and max(gpu.frame_indices) <= 60  # frames at 1.0 .. 2.0 s
    assert _indices_in_pixels(gpu.frames) == gpu.frame_indices


def test_several_decoders_on_keyframe_ranges_give_the_frames_of_one(fake, video):
    one = load_video(video, fps=30, max_frames=90, backend="nvdec", num_workers=1)
    three = load_video(video, fps=30, max_frames=90, backend="nvdec", num_workers=3)
    assert three.stats["decoders"] == 3 and one.stats["decoders"] == 1
    assert torch.equal(one.frames, three.frames)
    assert _indices_in_pixels(three.frames) == list(range(90))


def test_parts_start_on_keyframes_and_cover_the_targets(fake, video):
    load_video(video, fps=30, max_frames=90, backend="nvdec", num_workers=3)
    asked = [sorted(i for call in decoder.requests for i in call) for decoder in fake.decoders]
    assert len(asked) == 3
    assert sorted(i for part in asked for i in part) == list(range(90))  # every frame once
    assert all(part[0] % 12 == 0 for part in asked)  # keyframes every 12 frames


def test_decoders_are_kept_for_the_next_load(fake, video):
    first = load_video(video, fps=4, backend="nvdec", num_workers=1)
    second = load_video(video, fps=4, backend="nvdec", num_workers=1)
    assert first.stats["decoders_created"] == 1 and second.stats["decoders_created"] == 0
    assert len(fake.decoders) == 1 and fake.decoders[0].reconfigured == 1
    assert torch.equal(first.frames, second.frames)


def test_frames_are_converted_a_few_at_a_time_into_the_right_slots(monkeypatch, fake, video):
    whole = load_video(video, fps=30, max_frames=90, backend="nvdec", num_workers=2)
    sizes, reported = [], []
    convert = nvdec.nv12_to_rgb

    def counting(planes, *args):
        sizes.append(planes.shape[0])
        return convert(planes, *args)

    monkeypatch.setattr(nvdec, "nv12_to_rgb", counting)
    monkeypatch.setattr(nvdec, "CONVERT_FRAMES", 5)
    parts = load_video(
        video, fps=30, max_frames=90, backend="nvdec", num_workers=2, on_frames=lambda ready: reported.extend(ready.slots)
    )
    assert torch.equal(parts.frames, whole.frames) and _indices_in_pixels(parts.frames) == list(range(90))
    # 2 parts of 90 frames, cut into decoder calls of 32 and conversions of at most 5
    assert max(sizes) == 5 and sum(sizes) == 90 and len(sizes) >= 90 // 5
    assert sorted(reported) == list(range(90))


def test_the_automatic_decoder_count_grows_with_the_frames_up_to_max_decoders(monkeypatch, fake, video):
    # a decoder per CHUNK_FRAMES sampled frames: 12 frames -> 1; with 4-frame chunks, 90 frames -> 22,
    # capped at MAX_DECODERS (7; 8 keyframe ranges of 12 frames are there to share)
    assert load_video(video, fps=4, backend="nvdec").stats["decoders"] == 1
    monkeypatch.setattr(nvdec, "CHUNK_FRAMES", 4)
    many = load_video(video, fps=30, max_frames=90, backend="nvdec")
    assert nvdec.MAX_DECODERS == 7 and many.stats["decoders"] == 7
    assert _indices_in_pixels(many.frames) == list(range(90))


def test_longer_edge_resize_is_applied_after_conversion(fake, video):
    full = load_video(video, fps=4, backend="nvdec")
    small = load_video(video, fps=4, backend="nvdec", max_longer_edge=64)
    pyav = load_video(video, fps=4, backend="pyav", max_longer_edge=64)
    assert small.frames.shape == pyav.frames.shape == (12, 48, 64, 3)
    assert torch.equal(small.frames, _limit_longer_edge(full.frames, 64, "torch"))  # the same kernel (on CPU)
    assert (small.frames.int() - pyav.frames.int()).abs().max() <= 4


def test_rotation_is_applied_as_in_the_pyav_path(fake, tmp_path):
    path = write_test_video(tmp_path / "rot.mp4", num_frames=8, width=64, height=48, rotate=90)
    pyav, gpu = load_video(path, backend="pyav"), load_video(path, backend="nvdec")
    assert gpu.frames.shape == pyav.frames.shape == (8, 64, 48, 3)
    assert (gpu.frames.int() - pyav.frames.int()).abs().max() <= 3


# BT.709 tagged, untagged (BT.601), untagged in full range (JPEG's yuvj420p)
@pytest.mark.parametrize("colorspace, pix_fmt", [(1, "yuv420p"), (2, "yuv420p"), (2, "yuvj420p")])
def test_nv12_conversion_follows_the_stream_tags_as_ffmpeg_does(tmp_path, colorspace, pix_fmt):
    from transformers_tempo.synthetic import make_frames

    full_range = pix_fmt == "yuvj420p"
    path = tmp_path / f"cs{colorspace}{pix_fmt}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 128, 96, pix_fmt
        stream.codec_context.colorspace = colorspace
        for array in make_frames(4, 128, 96):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.colorspace = colorspace
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    planes = torch.from_numpy(np.stack([f.reformat(format="nv12").to_ndarray() for f in frames]))
    expected = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in frames]))
    converted = nvdec.nv12_to_rgb(planes, colorspace=colorspace, full_range=full_range)
    difference = (converted.int() - expected.int()).abs()
    assert difference.max() <= 3 and difference.float().mean() < 1.5  # FFmpeg's fixed-point tables round
    if full_range:  # the range matters: read as limited range, it is visibly off
        wrong = nvdec.nv12_to_rgb(planes, colorspace=colorspace, full_range=False)
    else:  # the tag matters: the other matrix is visibly off
        wrong = nvdec.nv12_to_rgb(planes, colorspace=1 if colorspace == 2 else 2)
    assert (wrong.int() - expected.int()).abs().max() > 6


def test_auto_is_pyav_even_where_nvdec_could_decode(fake, video):
    auto = load_video(video, fps=4)
    pyav = load_video(video, fps=4, backend="pyav")
    assert auto.metadata.video_backend == "pyav" and torch.equal(auto.frames, pyav.frames)
    assert nvdec._library == [] and not fake.decoders  # the library is not even imported


def test_nvdec_forced_without_the_library_names_the_extra(monkeypatch, fresh_state, video):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)
    with pytest.raises(VideoLoadError, match=r"backend='nvdec' cannot be used: .*transformers-tempo\[nvdec\]") as info:
        load_video(video, backend="nvdec")
    assert "\n" not in str(info.value) and str(video) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_nvdec_forced_without_a_gpu_says_so(monkeypatch, fake, video):
    monkeypatch.setattr(nvdec, "_DEVICE_OVERRIDE", None)  # the real device check: no GPU here
    with pytest.raises(VideoLoadError, match="no CUDA GPU") as info:
        load_video(video, backend="nvdec")
    assert "\n" not in str(info.value)


def test_nvdec_forced_on_an_unsupported_codec_says_so(fake, tmp_path):
    path = write_test_video(tmp_path / "old.avi", num_frames=8, codec="mpeg4")
    assert load_video(path).metadata.video_backend == "pyav"
    with pytest.raises(VideoLoadError, match="does not decode mpeg4"):
        load_video(path, backend="nvdec")
    assert not fake.decoders


def test_nvdec_refuses_bytes(fake, video):
    data = video.read_bytes()
    assert load_video(data, fps=4).metadata.video_backend == "pyav"
    with pytest.raises(VideoLoadError, match="files given by path"):
        load_video(data, backend="nvdec")


def test_exact_mode_decodes_with_pyav(fake, video):
    assert load_video(video, fps=4, resize_backend="pil").metadata.video_backend == "pyav"
    with pytest.raises(ValueError, match="resize_backend='pil'"):
        load_video(video, backend="nvdec", resize_backend="pil")


def test_frames_given_directly_ignore_the_backend(fake):
    frames = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    loaded = load_video(frames, video_metadata={"fps": 2.0}, backend="nvdec")
    assert torch.equal(loaded.frames, frames) and not fake.decoders


def test_a_bad_backend_value_is_one_line():
    with pytest.raises(ValueError, match=r"^backend must be one of auto, pyav, nvdec, got 'gpu'$"):
        load_video(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), backend="gpu")


def test_a_decoder_failure_is_an_error_and_auto_never_meets_it(monkeypatch, fresh_state, video):
    library = _fake_library(fail=True)
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", library)
    monkeypatch.setattr(nvdec, "_DEVICE_OVERRIDE", "cpu")
    with pytest.raises(VideoLoadError, match="NVDEC decoding failed .*CUVID_ERROR_SIMULATED") as info:
        load_video(video, backend="nvdec")
    assert str(video) in str(info.value)
    decoders = len(library.decoders)
    loaded = load_video(video, fps=4)
    assert loaded.metadata.video_backend == "pyav" and _indices_in_pixels(loaded.frames) == loaded.frame_indices
    assert len(library.decoders) == decoders


def test_the_cache_shares_auto_and_pyav_and_keeps_nvdec_apart(fake, video):
    cache = VideoCache()
    auto = cache.frames_key(str(video), {"fps": 2.0})
    assert auto == cache.frames_key(str(video), {"fps": 2.0, "backend": "auto"})
    assert auto == cache.frames_key(str(video), {"fps": 2.0, "backend": "pyav"})
    assert auto != cache.frames_key(str(video), {"fps": 2.0, "backend": "nvdec"})
    first = cache.load_video(str(video), fps=4)
    assert cache.load_video(str(video), fps=4, backend="pyav") is first
    assert cache.load_video(str(video), fps=4, backend="nvdec").metadata.video_backend == "nvdec"
    with pytest.raises(ValueError, match="backend must be one of"):  # a bad value is not a hit either
        cache.load_video(str(video), fps=4, backend="gpu")


def test_the_cli_takes_decode_backend_and_refuses_a_bad_value(capsys):
    from transformers_tempo.cli import build_parser

    for command in (["ask", "v.mp4", "q"], ["chat", "v.mp4"], ["batch", "--input", "i", "--output", "o"]):
        assert build_parser().parse_args(command).decode_backend == "auto"
        assert build_parser().parse_args([*command, "--decode-backend", "nvdec"]).decode_backend == "nvdec"
    assert main(["ask", "v.mp4", "q", "--decode-backend", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode-backend" in err and "'gpu'" in err


def test_the_cli_says_in_one_line_when_nvdec_cannot_be_used(monkeypatch, fresh_state, video, capsys, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)
    # a model folder: without one the demo model is built first, which says so on stderr
    assert main(["ask", str(video), "q", "--decode-backend", "nvdec", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "transformers-tempo[nvdec]" in err


def test_reference_decodes_with_pyav_and_refuses_nvdec(capsys):
    from transformers_tempo.cli import build_parser
    from transformers_tempo.cli.common import UsageError, check_reference

    args = build_parser().parse_args(["ask", "v.mp4", "q", "--reference"])
    check_reference(args)
    assert args.decode_backend == "pyav"
    args = build_parser().parse_args(["ask", "v.mp4", "q", "--reference", "--decode-backend", "nvdec"])
    with pytest.raises(UsageError, match="--decode-backend nvdec"):
        check_reference(args)


# ---------------------------------------------------------------------------------------- benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_backends.py"


@pytest.mark.slow
def test_bench_tiny_runs_pyav_only_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--pyav-without-skipping", "--folder", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["duration_s"] == 20.0 and result["nvdec"] == {"skipped": "--tiny measures PyAV only (CPU)"}
    assert result["pyav"]["frames"] == 40 and result["pyav"]["backend"] == "pyav"  # 20 s at 2 fps
    assert result["pyav"]["full_decode"]["frames"] == 151  # every frame of 0..5 s at 30 fps, both ends in
    # the file has B-frames: PyAV decodes more of them with its skipping of unwanted ones off, same frames
    without = result["pyav_without_nonref_skipping"]
    assert without["frames_equal_with_skipping"] is True and without["frames"] == 40
    assert without["stats"]["decoded_frames"] > result["pyav"]["stats"]["decoded_frames"]
    assert without["stats"]["nonref_marked_packets"] == 0 < result["pyav"]["stats"]["nonref_marked_packets"]
    assert json.loads(done.stdout) == result


def test_bench_nvdec_measurements_run_with_the_fake_library(fake, video):
    spec = importlib.util.spec_from_file_location("bench_decode_backends", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--decoders", "1,2", "--frames", "12", "--full-seconds", "1"])
    pyav = load_video(video, fps=2.0, max_frames=12, backend="pyav")
    out = bench.measure_nvdec(str(video), args, pyav.frames, duration=3.0, source_fps=30.0)
    for count in (1, 2):
        row = out[f"decoders_{count}"]
        assert row["backend"] == "nvdec" and row["frames"] == pyav.num_frames
        assert row["stats"]["decoders_created"] == 0  # the second load reuses the first one's decoders
        assert row["pixels_vs_pyav"]["max_abs"] <= 3
        assert row["full_decode"]["frames"] == 31  # frames 0..30 (0 s .. 1 s)
    both = out["both_together"]
    # 12 frames shared half and half; each 1.5 s clip is raised to min_frames (8) and capped at its share (6)
    assert "error" not in both and both["frames"] == {"nvdec": 6, "pyav": 6}


def test_bench_records_nvdec_errors_instead_of_stopping(monkeypatch, fresh_state, video):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)
    spec = importlib.util.spec_from_file_location("bench_decode_backends", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.measure_nvdec(str(video), bench.parse_args([]), torch.zeros(1), duration=3.0, source_fps=30.0)
    assert "transformers-tempo[nvdec]" in out["error"]
