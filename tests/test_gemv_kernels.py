"""The decoding step's matrix-vector kernel: when it applies, and its values (in Triton's CPU
interpreter where Triton is installed, and on the GPU)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from transformers_tempo.gemv_kernels import gemv, gemv_applies

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_gemv_off_cuda_is_f_linear():
    x, weight = torch.randn(1, 1, 48), torch.randn(20, 48)
    assert not gemv_applies(x, weight)
    assert torch.equal(gemv(x, weight), F.linear(x, weight))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")
def test_gemv_applies_to_one_row_in_half_precision_only():
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    assert gemv_applies(x, weight)
    refused = {
        "two rows": (x.expand(2, 1, 256), weight),
        "float32": (x.float(), weight.float()),
        "mixed dtypes": (x, weight.half()),
        "a transposed weight": (x, torch.randn(256, 64, device="cuda", dtype=torch.bfloat16).t()),
        "grad": (x, weight.detach().requires_grad_()),
        "CPU": (x.cpu(), weight.cpu()),
        "on two devices": (x, weight.cpu()),
    }
    assert [name for name, args in refused.items() if gemv_applies(*args)] == []


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter)")
def test_the_kernel_in_tritons_interpreter_equals_a_float32_product():
    """float16 (the interpreter has no bfloat16): rows not a multiple of the block, inputs not a
    multiple of the inner tile (masked loads), and a row-strided weight (a slice of a wider one)."""
    script = textwrap.dedent(
        """
        import torch
        from transformers_tempo.gemv_kernels import launch_gemv
        gen = torch.Generator().manual_seed(0)
        for rows, cols, block_n, block_k in [(40, 96, 8, 32), (37, 100, 8, 32), (16, 64, 4, 64), (9, 64, 1, 32), (35, 96, 16, 32)]:
            wide = torch.randn(rows, cols + 8, generator=gen).half()
            for weight in (wide[:, :cols].contiguous(), wide[:, :cols]):
                x = torch.randn(1, 1, cols, generator=gen).half()
                out = launch_gemv(x, weight, None, block_n, block_k, 1, 1)
                expected = (x.float() @ weight.float().T)
                error = (out.float() - expected).abs().max().item()
                assert out.shape == (1, 1, rows) and out.dtype == torch.float16, out.shape
                assert error <= 2e-3 * expected.abs().max().item(), (rows, cols, error)
        # the custom op (with its own settings) as torch.compile calls it
        from transformers_tempo.gemv_kernels import _gemv_op
        compiled = torch.compile(_gemv_op, backend="aot_eager", fullgraph=True)
        weight = torch.randn(4100, 64, generator=gen).half()
        x = torch.randn(1, 64, generator=gen).half()
        out = compiled(x, weight)
        assert out.shape == (1, 4100) and torch.equal(out, _gemv_op(x, weight))
        assert (out.float() - x.float() @ weight.float().T).abs().max() < 2e-2
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("rows,cols", [(6144, 2560), (2560, 9728), (2560, 4096), (19456, 2560), (1000, 300)])
def test_gemv_on_gpu_is_as_close_to_float32_as_cublas(rows, cols):
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(1, 1, cols, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen) / cols**0.5
    expected = x.float() @ weight.float().T
    out, cublas = gemv(x, weight), F.linear(x, weight)
    error, cublas_error = ((t.float() - expected).abs().max().item() for t in (out, cublas))
    assert out.shape == cublas.shape and out.dtype == torch.bfloat16
    assert error <= max(2 * cublas_error, 1e-2), (error, cublas_error)
    compiled = torch.compile(lambda a, b: gemv(a, b) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), out * 2, atol=0, rtol=0)
