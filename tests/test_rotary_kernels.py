"""The vision attention's rotary + head-layout kernel: when it applies, its values against the stock
rotary embedding (in Triton's CPU interpreter, and on the GPU), and the attention that uses it."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from transformers_tempo import rotary_kernels
from transformers_tempo.rotary_kernels import qkv_rotary_applies

HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")


def stock_split(qkv, cos, sin, heads, group):
    """transformers' formulation: heads split, float32 rotary, then (groups, heads, group, d)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    rows = qkv.shape[0]
    q, k, v = qkv.reshape(rows, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return [t.reshape(rows // group, group, heads, -1).transpose(1, 2) for t in (q, k, v)]


def test_the_kernel_is_not_used_off_cuda():
    qkv, cos = torch.randn(8, 3 * 2 * 4), torch.randn(8, 4)
    assert not qkv_rotary_applies(qkv, cos, cos, heads=2, group=4)


@NEEDS_GPU
def test_the_kernel_applies_to_the_vision_attentions_tensors_only():
    qkv = torch.randn(64, 3 * 4 * 16, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(64, 16, device="cuda")
    assert qkv_rotary_applies(qkv, cos, cos, heads=4, group=32)
    refused = {
        "float32 product": (qkv.float(), cos, cos, 4, 32),
        "rows not a multiple of the group": (qkv, cos, cos, 4, 48),
        "head dim not a power of two": (qkv[:, : 3 * 4 * 12], cos[:, :12], cos[:, :12], 4, 32),
        "bf16 cos": (qkv, cos.bfloat16(), cos, 4, 32),
        "cos on the CPU": (qkv, cos.cpu(), cos, 4, 32),
        "grad": (qkv.detach().requires_grad_(), cos, cos, 4, 32),
    }
    assert [name for name, args in refused.items() if qkv_rotary_applies(*args)] == []


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter)")
def test_the_kernel_in_tritons_interpreter_equals_the_stock_rotary():
    """float16 (the interpreter has no bfloat16); groups that straddle a program's rows, a last
    partial block, a row-strided product, and the custom op as torch.compile calls it."""
    script = textwrap.dedent(
        """
        import torch
        from transformers_tempo.rotary_kernels import launch_qkv_rotary, _qkv_rotary_op
        from tests.test_rotary_kernels import stock_split
        gen = torch.Generator().manual_seed(0)
        for rows, heads, head_dim, group, block in [(72, 2, 8, 24, 16), (40, 3, 16, 8, 32), (64, 1, 4, 64, 64)]:
            wide = torch.randn(rows, 3 * heads * head_dim + 6, generator=gen).half()
            angles = torch.rand(rows, head_dim // 2, generator=gen) * 40
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos(), angles.sin()
            for qkv in (wide[:, : 3 * heads * head_dim].contiguous(), wide[:, : 3 * heads * head_dim]):
                out = launch_qkv_rotary(qkv, cos, sin, heads, group, rows_per_program=block, num_warps=1)
                expected = stock_split(qkv, cos, sin, heads, group)
                assert out.shape == (3, rows // group, heads, group, head_dim), out.shape
                assert out.is_contiguous() and out.dtype == torch.float16
                assert torch.equal(out[2], expected[2])  # v: a copy
                for got, want in zip(out[:2], expected[:2]):
                    error = (got.float() - want.float()).abs()
                    assert (error <= 1e-3 * want.float().abs().clamp(min=1.0)).all(), (rows, error.max())
        qkv = torch.randn(48, 3 * 2 * 8, generator=gen).half()
        cos, sin = torch.rand(48, 8, generator=gen), torch.rand(48, 8, generator=gen)
        compiled = torch.compile(_qkv_rotary_op, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(qkv, cos, sin, 2, 16), _qkv_rotary_op(qkv, cos, sin, 2, 16))
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_vision_attention_takes_the_kernel_when_it_applies(monkeypatch):
    """The attention's result is the same with the kernel's output routed in (here the stock split
    standing in for the kernel on the CPU) as with its torch formulation."""
    from transformers_tempo import fast_paths
    from transformers_tempo.fast_paths import TempoVisionAttention
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    config = Qwen3VLVisionConfig(hidden_size=32, num_heads=4, intermediate_size=64, depth=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    attention = TempoVisionAttention(config).eval()
    hidden = torch.randn(48, 32)
    angles = torch.rand(48, 4) * 10
    angles = torch.cat((angles, angles), dim=-1)
    embeddings = (angles.cos(), angles.sin())
    cu_seqlens = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
    with torch.no_grad():
        plain = attention(hidden, cu_seqlens, embeddings, vision_group_size=16)
        calls = []

        def stand_in(qkv, cos, sin, heads, group):
            calls.append((tuple(qkv.shape), heads, group))
            return [t.contiguous() for t in stock_split(qkv, cos, sin, heads, group)]

        monkeypatch.setattr(fast_paths, "qkv_rotary_applies", lambda *args: True)
        monkeypatch.setattr(fast_paths, "split_qkv_with_rotary", stand_in)
        routed = attention(hidden, cu_seqlens, embeddings, vision_group_size=16)
    assert calls == [((48, 96), 4, 16)]
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-6)


@NEEDS_GPU
def test_the_kernel_on_gpu_matches_the_stock_rotary_within_one_rounding():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, heads, head_dim, group = 4096, 16, 64, 512
    qkv = torch.randn(rows, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    angles = torch.rand(rows, head_dim // 2, device="cuda", generator=gen) * 50
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    assert qkv_rotary_applies(qkv, cos, sin, heads, group)
    got = rotary_kernels.split_qkv_with_rotary(qkv, cos, sin, heads, group)
    expected = stock_split(qkv, cos, sin, heads, group)
    assert torch.equal(got[2], expected[2])
    for g, e in zip(got[:2], expected[:2]):
        assert g.shape == e.shape
        # one bfloat16 rounding: relative 2**-8 of the value
        assert ((g.float() - e.float()).abs() <= 2**-8 * e.float().abs() + 1e-6).all()
