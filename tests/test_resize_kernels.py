"""The Triton frame resize: its weights against torch's own resampler, its values in Triton's CPU
interpreter and on the GPU against the float32 F.interpolate path, and when resize_frames takes it."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformers_tempo import frame_geometry
from transformers_tempo.resize_kernels import axis_weights

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda_and_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton"
)


def float_path(frames: torch.Tensor, size) -> torch.Tensor:
    """What resize_frames computed on CUDA before the kernels: float32 F.interpolate, clamped, rounded."""
    out = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


@pytest.mark.parametrize("in_size,out_size", [(1280, 512), (720, 288), (288, 256), (40, 17), (20, 33), (7, 7)])
def test_axis_weights_are_torchs_resampling_matrix(in_size, out_size):
    """Resampling each one-hot row gives the (input, output) weight matrix of torch's kernel."""
    eye = torch.eye(in_size).view(in_size, 1, 1, in_size)
    expected = F.interpolate(eye, size=(1, out_size), mode="bicubic", antialias=True, align_corners=False)
    starts, weights = axis_weights(in_size, out_size)
    dense = np.zeros((in_size, out_size), dtype=np.float32)
    for out_index, (start, row) in enumerate(zip(starts, weights)):
        for tap, weight in enumerate(row):
            if weight:
                dense[start + tap, out_index] += weight
    np.testing.assert_allclose(dense, expected.view(in_size, out_size).numpy(), atol=2e-6)
    assert (starts >= 0).all() and (starts + (weights != 0).sum(1) <= in_size).all()


def test_resize_frames_routes_cuda_frames_to_the_kernels(monkeypatch):
    calls = []

    def fake_kernels(frames, size, out=None):
        calls.append(size)
        return float_path(frames, size) if out is None else out.copy_(float_path(frames, size))

    frames = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(frame_geometry, "triton_resize_applies", lambda frames: True)  # as for CUDA frames
    monkeypatch.setattr(frame_geometry, "resize_uint8_frames", fake_kernels)
    out = torch.empty(2, 3, 20, 24, dtype=torch.uint8)
    assert frame_geometry.resize_frames(frames, (20, 24), out=out) is out and calls == [(20, 24)]
    monkeypatch.setattr(frame_geometry, "TRITON_RESIZE", False)  # switched off: F.interpolate, the same pixels
    assert torch.equal(frame_geometry.resize_frames(frames, (20, 24), like_pil=False), out) and len(calls) == 1


def test_resize_frames_gives_the_kernels_a_chunk_of_frames_at_a_time(monkeypatch):
    """The first pass's float32 rows of a whole long clip would not fit: chunks, into one output."""
    calls = []

    def fake_kernels(frames, size, out=None):
        calls.append(frames.shape[0])
        return out.copy_(float_path(frames, size))

    frames = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(frame_geometry, "triton_resize_applies", lambda frames: True)
    monkeypatch.setattr(frame_geometry, "resize_uint8_frames", fake_kernels)
    monkeypatch.setattr(frame_geometry, "RESIZE_CHUNK_FRAMES", 2)
    assert torch.equal(frame_geometry.resize_frames(frames, (20, 24)), float_path(frames, (20, 24)))
    assert calls == [2, 2, 1]


@pytest.mark.slow  # a subprocess running the kernels in Triton's interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter)")
def test_the_kernels_in_tritons_interpreter_equal_the_float_path():
    """Shrinking, enlarging, one axis only, channels-last input, into `out`, and the float pass alone."""
    script = textwrap.dedent(
        """
        import torch
        from test_resize_kernels import float_path
        from transformers_tempo.resize_kernels import _resample, resize_uint8_frames
        generator = torch.Generator().manual_seed(0)
        for n, h, w, size in [(2, 72, 128, (29, 51)), (1, 20, 24, (33, 24)), (1, 30, 40, (30, 17)), (2, 36, 64, (32, 64)),
                                (1, 40, 300, (5, 4))]:  # the last: over MAX_UNROLLED_TAPS taps, the looped kernel
            frames = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=generator).permute(0, 3, 1, 2)
            out = resize_uint8_frames(frames, size)
            assert out.shape == (n, 3, *size) and out.is_contiguous(), (size, out.shape)
            assert (out.int() - float_path(frames, size).int()).abs().max() <= 1, size
            assert (out != float_path(frames, size)).float().mean() < 1e-3, size
        into = torch.empty(4, 3, 29, 51, dtype=torch.uint8)
        frames = torch.randint(0, 256, (2, 3, 72, 128), dtype=torch.uint8, generator=generator)
        resize_uint8_frames(frames, (29, 51), out=into[1:3])
        assert torch.equal(into[1:3], resize_uint8_frames(frames, (29, 51)))
        assert resize_uint8_frames(frames, (72, 128)) is frames  # its own size: nothing to do
        rows = _resample(frames, 51, along_rows=True, to_uint8=False)  # the float pass alone
        expected = torch.nn.functional.interpolate(frames.float(), size=(72, 51), mode="bicubic", antialias=True)
        assert rows.dtype == torch.float32 and (rows - expected).abs().max() < 1e-3
        print("ok")
        """
    )
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@needs_cuda_and_triton
def test_the_kernels_on_gpu_equal_the_float_path_for_tempos_chain():
    """1280x720 frames, channels-last as decoded, through Tempo's two resizes (512x288, then 512x256)."""
    generator = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (5, 720, 1280, 3), dtype=torch.uint8, generator=generator)
    frames = frames.cuda().permute(0, 3, 1, 2)
    expected, out = frames, frames
    for size in [(288, 512), (256, 512)]:
        expected = float_path(expected, size)
        out = frame_geometry.resize_frames(out, size)
        assert (out.int() - expected.int()).abs().max() <= 1 and (out != expected).float().mean() < 1e-3, size
        expected = out  # each step from the same input


@needs_cuda_and_triton
def test_the_kernels_on_gpu_loop_past_the_unrolled_taps_and_chunk_long_clips():
    """Shrinking 1280x720 by 18x (over MAX_UNROLLED_TAPS taps: the looped kernel) and a clip longer
    than one chunk of frames, against the float path."""
    generator = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (70, 720, 1280, 3), dtype=torch.uint8, generator=generator).cuda().permute(0, 3, 1, 2)
    for size in [(40, 71), (360, 640)]:
        expected = float_path(frames, size)
        out = frame_geometry.resize_frames(frames, size)
        assert out.shape == (70, 3, *size)
        assert (out.int() - expected.int()).abs().max() <= 1 and (out != expected).float().mean() < 1e-3, size
