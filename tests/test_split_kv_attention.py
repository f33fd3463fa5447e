"""The split-KV decoding attention: its chunking, when decode_attention takes it, and its values
(on the GPU, and in Triton's CPU interpreter where Triton is installed)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from transformers_tempo import fast_paths
from transformers_tempo.split_kv_attention import BLOCK_SLOTS, MAX_CHUNKS, TARGET_PROGRAMS, split_sizes

HAS_TRITON = importlib.util.find_spec("triton") is not None


def reference(query, key, value, mask, scale):
    """float32 attention of each query head over its key/value head's valid slots: (batch, 1, heads, dim)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.float().repeat_interleave(groups, 1), value.float().repeat_interleave(groups, 1)
    scores = (query.float() @ key.transpose(-1, -2)) * scale
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value).transpose(1, 2)


def step_inputs(batch, heads, kv_heads, slots, dim, dtype, device="cpu", seed=0):
    """A decoding step's query (strided, as the projections give it), cache and mask: an empty tail of
    slots, and in a batch a left-padded row whose first chunk is wholly masked."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=generator).to(device, dtype).transpose(1, 2)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(device, dtype)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(device, dtype)
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool)
    mask[..., : slots - slots // 5] = True
    if batch > 1:
        mask[-1, ..., : slots // 3] = False
    return query, key, value, mask.to(device), dim**-0.5


@pytest.mark.parametrize(
    "batch,kv_heads,slots", [(1, 8, 9216), (1, 8, 8281), (4, 8, 3000), (2, 1, 70), (16, 8, 9216), (1, 1, 131072)]
)
def test_chunks_are_whole_tiles_that_cover_the_slots_once(batch, kv_heads, slots):
    chunk, chunks = split_sizes(batch, kv_heads, slots)
    assert chunk % BLOCK_SLOTS == 0
    assert (chunks - 1) * chunk < slots <= chunks * chunk  # every slot in exactly one chunk, no empty chunk
    tiles = -(-slots // BLOCK_SLOTS)
    assert chunks <= MAX_CHUNKS  # what the merge kernel holds at once
    busy = min(TARGET_PROGRAMS, batch * kv_heads * min(tiles, MAX_CHUNKS)) // 2
    assert batch * kv_heads * chunks >= busy  # the GPU is kept busy


def test_decode_attention_takes_the_split_kernel_for_compiled_steps_it_applies_to(monkeypatch):
    query, key, value, mask, _ = step_inputs(2, 8, 2, 40, 16, torch.float32)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    calls = []

    def fake_split(q, k, v, m, scale):
        calls.append(scale)
        return reference(q, k, v, m, scale)

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # a traced step, as on the GPU
    monkeypatch.setattr(fast_paths, "split_kv_applies", lambda *args: True)
    monkeypatch.setattr(fast_paths, "split_kv_decode_attention", fake_split)
    out, weights = fast_paths.decode_attention(module, query, key, value, mask, scaling=0.3)
    assert calls == [0.3] and weights is None and out.shape == (2, 1, 8, 16)
    fast_paths.decode_attention(module, query, key, value, mask, scaling=None)
    assert calls[-1] == pytest.approx(16**-0.5)  # sdpa's default scale

    monkeypatch.setattr(fast_paths, "SPLIT_KV_DECODING", False)  # switched off: sdpa, the same values
    out_sdpa, _ = fast_paths.decode_attention(module, query, key, value, mask, scaling=0.3)
    assert len(calls) == 2
    torch.testing.assert_close(out_sdpa, out, rtol=1e-5, atol=1e-5)


def test_cpu_tensors_keep_sdpa():
    from transformers_tempo.split_kv_attention import split_kv_applies

    query, key, value, mask, _ = step_inputs(1, 8, 2, 64, 16, torch.bfloat16)
    assert not split_kv_applies(query, key, value, mask)


def test_a_gpu_without_bf16_tensor_cores_gets_sdpa_from_the_op(monkeypatch):
    from transformers_tempo import split_kv_attention

    monkeypatch.setattr(split_kv_attention, "_has_bf16_tensor_cores", lambda device: False)
    query, key, value, mask, scale = step_inputs(2, 8, 2, 50, 16, torch.float32)
    out = split_kv_attention.split_kv_decode_attention(query, key, value, mask, scale)
    assert out.shape == (2, 1, 8, 16)
    torch.testing.assert_close(out, reference(query, key, value, mask, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")
def test_split_kernel_refuses_what_it_cannot_compute():
    from transformers_tempo.split_kv_attention import split_kv_applies

    query, key, value, mask, _ = step_inputs(2, 8, 2, 64, 16, torch.bfloat16, device="cuda")
    assert split_kv_applies(query, key, value, mask)
    refused = {
        "float32": (query.float(), key.float(), value.float(), mask),
        "two query tokens": (query.expand(-1, -1, 2, -1), key, value, mask),
        "a float mask": (query, key, value, mask.float()),
        "a mask per query position": (query, key, value, mask.expand(-1, -1, 2, -1)),
        "grad": (query.detach().requires_grad_(), key, value, mask),
        "head dim 512": step_inputs(1, 2, 1, 64, 512, torch.bfloat16, device="cuda")[:4],
        "head dim 80": step_inputs(1, 2, 1, 64, 80, torch.bfloat16, device="cuda")[:4],
        "heads not a multiple of the key/value heads": (query[:, :7], key, value, mask),
    }
    assert [name for name, args in refused.items() if split_kv_applies(*args)] == []


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (its CPU interpreter)")
def test_the_kernels_in_tritons_interpreter_equal_float32_attention():
    """float16 (the interpreter has no bfloat16): multi-tile chunks, a batch mask, an empty tail and
    a wholly masked chunk, under torch.compile too (the custom op is called as it is)."""
    script = textwrap.dedent(
        """
        import torch
        from test_split_kv_attention import reference, step_inputs
        from transformers_tempo.split_kv_attention import split_kv_decode_attention
        for shape in [(4, 16, 8, 3000, 16), (2, 4, 1, 130, 32), (1, 8, 2, 300, 64)]:
            query, key, value, mask, scale = step_inputs(*shape, torch.float16)
            out = split_kv_decode_attention(query, key, value, mask, scale)
            error = (out.float() - reference(query, key, value, mask, scale)).abs().max().item()
            assert out.shape == (shape[0], 1, shape[1], shape[4]) and error < 2e-3, (shape, error)
        compiled = torch.compile(split_kv_decode_attention, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(query, key, value, mask, scale), out)
        # head dim 128, query groups of 1 and 3, fewer slots than a tile, a contiguous query, one
        # mask row for the whole batch, and a wholly masked row (zeros, not NaN)
        for batch, heads, kv_heads, slots in [(3, 2, 2, 40), (2, 6, 2, 100)]:
            query, key, value, _, scale = step_inputs(batch, heads, kv_heads, slots, 128, torch.float16)
            query = query.contiguous()
            mask = torch.rand(1, 1, 1, slots, generator=torch.Generator().manual_seed(slots)) < 0.6
            out = split_kv_decode_attention(query, key, value, mask, scale)
            error = (out.float() - reference(query, key, value, mask, scale)).abs().max().item()
            assert error < 2e-3, (batch, heads, kv_heads, slots, error)
        out = split_kv_decode_attention(query, key, value, torch.zeros_like(mask), scale)
        assert torch.equal(out, torch.zeros_like(out))
        print("ok")
        """
    )
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("batch,slots", [(1, 9216), (4, 8281)])
def test_split_kernel_on_gpu_is_as_close_to_float32_as_sdpa(batch, slots):
    """The Tempo-6B decoder's heads (32 query, 8 key/value, dim 128) in bf16, also replayed from a CUDA graph."""
    from transformers_tempo.split_kv_attention import split_kv_applies, split_kv_decode_attention

    query, key, value, mask, scale = step_inputs(batch, 32, 8, slots, 128, torch.bfloat16, device="cuda")
    assert split_kv_applies(query, key, value, mask)
    expected = reference(query, key, value, mask, scale)
    out = split_kv_decode_attention(query, key, value, mask, scale)
    sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    error, sdpa_error = ((t.float() - expected).abs().max().item() for t in (out, sdpa))
    assert error <= max(2 * sdpa_error, 1e-2), (error, sdpa_error)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        split_kv_decode_attention(query, key, value, mask, scale)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        replayed = split_kv_decode_attention(query, key, value, mask, scale)
    mask[..., : slots // 2] = False  # the next step's mask, read by the replay
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed.float(), reference(query, key, value, mask, scale), atol=2e-2, rtol=0)
