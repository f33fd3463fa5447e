"""The NVDEC backend on the CPU: a fake PyNvVideoCodec whose decoder hands out the NV12 planes PyAV decodes
from the same file (frame i of its list is the i-th frame in presentation order, as the library counts).
The frames' pixels encode their index (`synthetic.index_pattern`), so which frame came back is read from
the pixels, independently of the code under test."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import threading
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

NOTICE = "PyAV, not NVDEC"


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
    """A process that has not tried the library yet, kept no decoder and said no notice."""
    monkeypatch.setattr(nvdec, "_library", [])
    monkeypatch.setattr(nvdec, "_POOL", nvdec._DecoderPool())
    monkeypatch.setattr(nvdec, "_notice_given", threading.Event())


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


@pytest.mark.parametrize("colorspace", [1, 2])  # BT.709 tagged, untagged (BT.601)
def test_nv12_conversion_follows_the_stream_tags_as_ffmpeg_does(tmp_path, colorspace):
    from transformers_tempo.synthetic import make_frames

    path = tmp_path / f"cs{colorspace}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
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
    converted = nvdec.nv12_to_rgb(planes, colorspace=colorspace)
    difference = (converted.int() - expected.int()).abs()
    assert difference.max() <= 3 and difference.float().mean() < 1.5  # FFmpeg's fixed-point tables round
    wrong = nvdec.nv12_to_rgb(planes, colorspace=1 if colorspace == 2 else 2)
    assert (wrong.int() - expected.int()).abs().max() > 6  # the tag matters: the other matrix is visibly off


def test_auto_without_the_library_is_pyav_silently(monkeypatch, fresh_state, video, caplog):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # import fails: not installed
    with caplog.at_level(logging.DEBUG, logger=nvdec.__name__):
        loaded = load_video(video, fps=4)
    assert loaded.metadata.video_backend == "pyav"
    assert not [r for r in caplog.records if NOTICE in r.getMessage()]


def test_nvdec_forced_without_the_library_names_the_extra(monkeypatch, fresh_state, video):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)
    with pytest.raises(VideoLoadError, match=r"backend='nvdec' cannot be used: .*transformers-tempo\[nvdec\]") as info:
        load_video(video, backend="nvdec")
    assert "\n" not in str(info.value) and str(video) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_auto_with_the_library_but_no_gpu_is_pyav_with_one_notice(monkeypatch, fake, video, caplog):
    monkeypatch.setattr(nvdec, "_DEVICE_OVERRIDE", None)  # the real device check: no GPU here
    with caplog.at_level(logging.WARNING, logger=nvdec.__name__):
        first, second = load_video(video, fps=4), load_video(video, fps=5)
    assert first.metadata.video_backend == second.metadata.video_backend == "pyav"
    notices = [r.getMessage() for r in caplog.records if NOTICE in r.getMessage()]
    assert len(notices) == 1 and "no CUDA GPU" in notices[0] and "\n" not in notices[0]
    with pytest.raises(VideoLoadError, match="no CUDA GPU"):
        load_video(video, backend="nvdec")


def test_auto_with_an_unsupported_codec_is_pyav_with_a_notice(fake, tmp_path, caplog):
    path = write_test_video(tmp_path / "old.avi", num_frames=8, codec="mpeg4")
    with caplog.at_level(logging.WARNING, logger=nvdec.__name__):
        loaded = load_video(path)
    assert loaded.metadata.video_backend == "pyav" and not fake.decoders
    (notice,) = [r.getMessage() for r in caplog.records if NOTICE in r.getMessage()]
    assert "does not decode mpeg4" in notice
    with pytest.raises(VideoLoadError, match="does not decode mpeg4"):
        load_video(path, backend="nvdec")


def test_auto_with_bytes_is_pyav_and_nvdec_refuses_them(fake, video, caplog):
    data = video.read_bytes()
    with caplog.at_level(logging.WARNING, logger=nvdec.__name__):
        loaded = load_video(data, fps=4)
    assert loaded.metadata.video_backend == "pyav"
    assert any("files given by path" in r.getMessage() for r in caplog.records)
    with pytest.raises(VideoLoadError, match="files given by path"):
        load_video(data, backend="nvdec")


def test_auto_picks_nvdec_when_it_can(fake, video):
    assert load_video(video, fps=4).metadata.video_backend == "nvdec"


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


def test_a_decoder_failure_falls_back_under_auto_and_is_an_error_when_forced(monkeypatch, fresh_state, video, caplog):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", _fake_library(fail=True))
    monkeypatch.setattr(nvdec, "_DEVICE_OVERRIDE", "cpu")
    with caplog.at_level(logging.WARNING, logger=nvdec.__name__):
        loaded = load_video(video, fps=4)
    assert loaded.metadata.video_backend == "pyav" and _indices_in_pixels(loaded.frames) == loaded.frame_indices
    assert any("CUVID_ERROR_SIMULATED" in r.getMessage() for r in caplog.records)
    with pytest.raises(VideoLoadError, match="NVDEC decoding failed .*CUVID_ERROR_SIMULATED"):
        load_video(video, backend="nvdec")


def test_the_cache_keeps_backends_apart(video):
    cache = VideoCache()
    auto = cache.frames_key(str(video), {"fps": 2.0})
    assert auto == cache.frames_key(str(video), {"fps": 2.0, "backend": "auto"})
    assert auto != cache.frames_key(str(video), {"fps": 2.0, "backend": "pyav"})
    assert cache.frames_key(str(video), {"backend": "nvdec"}) != cache.frames_key(str(video), {"backend": "pyav"})


def test_the_cli_takes_decode_backend_and_refuses_a_bad_value(capsys):
    from transformers_tempo.cli import build_parser

    for command in (["ask", "v.mp4", "q"], ["chat", "v.mp4"], ["batch", "--input", "i", "--output", "o"]):
        assert build_parser().parse_args(command).decode_backend == "auto"
        assert build_parser().parse_args([*command, "--decode-backend", "nvdec"]).decode_backend == "nvdec"
    assert main(["ask", "v.mp4", "q", "--decode-backend", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode-backend" in err and "'gpu'" in err


def test_the_cli_says_in_one_line_when_nvdec_cannot_be_used(monkeypatch, fresh_state, video, capsys):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)
    assert main(["ask", str(video), "q", "--decode-backend", "nvdec"]) == 2
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
        [sys.executable, str(BENCH), "--tiny", "--folder", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["duration_s"] == 20.0 and result["nvdec"] == {"skipped": "--tiny measures PyAV only (CPU)"}
    assert result["pyav"]["frames"] == 40 and result["pyav"]["backend"] == "pyav"  # 20 s at 2 fps
    assert result["pyav"]["full_decode"]["frames"] == 151  # every frame of 0..5 s at 30 fps, both ends in
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
