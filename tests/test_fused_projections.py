"""Fused projections (`fused_projections.fuse_projections`): one matmul for the decoder's q/k/v and
gate/up (and o and down as groups of one, for the matrix-vector kernel), the same function, the same parameters and checkpoint, and a plain fallback where the
fused product must not run (gradients, a moved or replaced weight)."""

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from transformers_tempo import fused_projections
from transformers_tempo.fused_projections import (
    DECODER_GROUPS,
    fuse_decoder_projections,
    fuse_projections,
    fused_member,
    fused_products_in_trace,
    set_fused_projections,
)


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )
    return Qwen3ForCausalLM(config).eval()


def fused_copy(model):
    fused = copy.deepcopy(model)
    assert fuse_projections(fused, DECODER_GROUPS) == 2 * model.config.num_hidden_layers
    return fused


def test_same_logits_and_greedy_tokens(decoder):
    fused = fused_copy(decoder)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, decoder(ids).logits, rtol=1e-5, atol=1e-5)
    expected = decoder.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(fused.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_weights_are_views_of_one_buffer_and_the_checkpoint_is_unchanged(decoder, tmp_path):
    fused = fused_copy(decoder)
    attention = fused.model.layers[0].self_attn
    q, k, v = attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()  # side by side: no copy kept
    reference = decoder.state_dict()
    state = fused.state_dict()
    assert list(state) == list(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in decoder.parameters())
    fused.save_pretrained(tmp_path)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_one_product_per_group_and_nothing_kept(decoder, monkeypatch):
    fused = fused_copy(decoder)
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    mlp = fused.model.layers[0].mlp
    x = torch.randn(3, 64)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert calls == [(192, 64)]  # gate and up (96 rows each) in one product
    torch.testing.assert_close(gate, x @ decoder.model.layers[0].mlp.gate_proj.weight.T)
    torch.testing.assert_close(up, x @ decoder.model.layers[0].mlp.up_proj.weight.T)
    group = fused_member(mlp.gate_proj).group
    assert group is fused_member(mlp.up_proj).group
    assert group.pending == {}  # released once both were taken


def compiled_logits(model, ids, fused_in_trace=True):
    """Logits of `model` compiled by inductor (CPU), with the code inductor generated."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    allowed = fused_products_in_trace(model) if fused_in_trace else contextlib.nullcontext()
    with torch.inference_mode(), allowed:
        logits, code = run_and_get_code(torch.compile(lambda x: model(x).logits, fullgraph=True, dynamic=False), ids)
    return logits, "\n".join(code)


def test_compiled_model_computes_one_product_per_group(decoder):
    fused = fused_copy(decoder)
    ids = torch.randint(0, 101, (1, 5))
    logits, code = compiled_logits(fused, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, decoder(ids).logits, rtol=1e-5, atol=1e-5)
    # per layer: q/k/v, o, gate/up, down; then the head (unfused: 7 per layer + 1)
    assert code.count("extern_kernels.mm(") == 4 * decoder.config.num_hidden_layers + 1
    groups = {fused_member(member).group for member in (fused.model.layers[0].self_attn.q_proj, fused.model.layers[1].mlp.up_proj)}
    assert all(group.traced is None and group.pending == {} for group in groups)  # nothing outlives the call


def test_compiled_model_outside_the_block_takes_each_projections_product(decoder):
    fused = fused_copy(decoder)
    ids = torch.randint(0, 101, (1, 5))
    logits, code = compiled_logits(fused, ids, fused_in_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, decoder(ids).logits, rtol=1e-5, atol=1e-5)
    assert code.count("extern_kernels.mm(") == 7 * decoder.config.num_hidden_layers + 1


def test_compiled_model_after_weights_left_the_buffer_in_place_takes_the_plain_path(decoder):
    """The same parameter objects, device and dtype, but new storage: a cast there and back, then
    new values loaded; a deep copy, then edited. No eager call in between."""
    ids = torch.randint(0, 101, (1, 5))
    other = copy.deepcopy(decoder)
    for parameter in other.parameters():
        parameter.data.normal_()
    round_trip = fused_copy(decoder).to(torch.float64).to(torch.float32)
    round_trip.load_state_dict(other.state_dict())
    copied = copy.deepcopy(fused_copy(decoder))
    copied.load_state_dict(other.state_dict())
    with torch.no_grad():
        expected = other(ids).logits
    for model in (round_trip, copied):
        logits, code = compiled_logits(model, ids)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert code.count("extern_kernels.mm(") == 7 * decoder.config.num_hidden_layers + 1
        group = fused_member(model.model.layers[0].mlp.gate_proj).group
        assert group.stale and group.weight is None  # the old buffer is freed


def test_compiled_model_after_a_cast_or_a_replaced_weight_takes_the_plain_path(decoder):
    fused = fused_copy(decoder).to(torch.float64)  # no eager call in between: the trace must notice
    plain = copy.deepcopy(decoder).to(torch.float64)
    ids = torch.randint(0, 101, (1, 5))
    logits, code = compiled_logits(fused, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(ids).logits)
    assert code.count("extern_kernels.mm(") == 7 * decoder.config.num_hidden_layers + 1
    fused = fused_copy(decoder)
    fused.model.layers[0].self_attn.k_proj.weight = nn.Parameter(torch.zeros(32, 64))
    logits, _ = compiled_logits(fused, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, fused(ids).logits)


def test_members_called_out_of_order_or_alone_are_right(decoder):
    fused = fused_copy(decoder)
    attention, plain = fused.model.layers[1].self_attn, decoder.model.layers[1].self_attn
    x, y = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(attention.v_proj(x), plain.v_proj(x))
        torch.testing.assert_close(attention.k_proj(y), plain.k_proj(y))  # a new input: computed afresh
        torch.testing.assert_close(attention.q_proj(x), plain.q_proj(x))
        torch.testing.assert_close(attention.k_proj(x), plain.k_proj(x))


def test_gradients_take_the_plain_path(decoder):
    fused = fused_copy(decoder)
    fused.train()
    ids = torch.randint(0, 101, (1, 5))
    fused(ids, labels=ids).loss.backward()
    decoder.train()
    decoder(ids, labels=ids).loss.backward()
    for (name, p), (_, r) in zip(fused.named_parameters(), decoder.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_a_moved_or_replaced_weight_turns_the_fused_product_off(decoder):
    fused = fused_copy(decoder).to(torch.float64)
    plain = copy.deepcopy(decoder).to(torch.float64)
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    attention = fused.model.layers[0].self_attn
    attention.k_proj.weight = nn.Parameter(torch.zeros_like(attention.k_proj.weight))
    with torch.no_grad():
        assert torch.equal(attention.k_proj(torch.ones(1, 64, dtype=torch.float64)), torch.zeros(1, 32, dtype=torch.float64))


def test_a_moved_model_frees_the_old_buffer_and_can_be_fused_again(decoder):
    fused = fused_copy(decoder).to(torch.float64)
    group = fused_member(fused.model.layers[0].mlp.gate_proj).group
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        fused(ids)
    assert group.stale and group.weight is None  # the float32 buffer is not kept alive
    assert fuse_projections(fused, DECODER_GROUPS) == 4
    refused = fused_member(fused.model.layers[0].mlp.gate_proj).group
    assert refused is not group and refused.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, copy.deepcopy(decoder).to(torch.float64)(ids).logits)


def test_a_deep_copy_computes_with_its_own_weights(decoder):
    fused = fused_copy(decoder)
    twin = copy.deepcopy(fused)
    attention = twin.model.layers[0].self_attn
    assert fused_member(attention.q_proj).group is not fused_member(fused.model.layers[0].self_attn.q_proj).group
    assert fused_member(attention.q_proj).linear is attention.q_proj
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        x = torch.randn(2, 64)
        assert torch.equal(attention.q_proj(x), torch.zeros(2, 64))  # the copy's zeros, not the source's weights
        assert fused.model.layers[0].self_attn.q_proj(x).abs().sum() > 0


def test_a_fused_model_pickles(decoder):
    import io

    fused = fused_copy(decoder)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, decoder(ids).logits, rtol=1e-5, atol=1e-5)


def test_two_threads_get_their_own_slices(decoder):
    from concurrent.futures import ThreadPoolExecutor

    mlp = fused_copy(decoder).model.layers[0].mlp
    plain = decoder.model.layers[0].mlp

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        wrong = 0
        with torch.no_grad():
            for _ in range(200):
                x = torch.randn(4, 64, generator=g)
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
                wrong += not (torch.allclose(gate, plain.gate_proj(x), atol=1e-5) and torch.allclose(up, plain.up_proj(x), atol=1e-5))
        return wrong

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, [1, 2])) == [0, 0]


def test_groups_that_cannot_be_fused_are_left_alone(decoder):
    decoder.model.layers[0].self_attn.k_proj.bias = nn.Parameter(torch.zeros(32))
    assert fuse_projections(decoder, DECODER_GROUPS) == 3  # every group but layer 0's q/k/v
    assert "forward" not in vars(decoder.model.layers[0].self_attn.q_proj)
    assert fuse_projections(decoder, DECODER_GROUPS) == 0  # fusing twice changes nothing


def test_enable_compiled_inference_fuses_the_decoder_only(tiny_model, monkeypatch, hand_inputs):
    from transformers_tempo import modeling_tempo

    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_compressor", lambda self, **kw: None)
    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_decoder", lambda self, **kw: None)
    model = copy.deepcopy(tiny_model).enable_compiled_inference()
    fused = [name for name, m in model.named_modules() if "forward" in vars(m)]
    layers = model.config.text_config.num_hidden_layers
    # q/k/v and gate/up fused, o and down as groups of one (the matrix-vector kernel on CUDA)
    assert len(fused) == 7 * layers and all(name.startswith("model.language_model.") for name in fused)
    inputs = hand_inputs([2, 1]).model_inputs()
    expected = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=5, cache_implementation="static")
    assert torch.equal(model.generate(**inputs, do_sample=False, max_new_tokens=5), expected)


def test_set_fused_projections_switches_every_group(decoder, monkeypatch):
    fused = fused_copy(decoder)
    products = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: products.append(w.shape[0]) or linear(x, w, b))
    ids = torch.randint(0, 101, (1, 4))
    with torch.no_grad():
        assert set_fused_projections(fused, False) == 4
        off = fused(ids).logits
        unfused_products, products[:] = list(products), []
        assert set_fused_projections(fused, True) == 4
        on = fused(ids).logits
    assert len(unfused_products) == len(products) + 3 * 2  # per layer: q/k/v 3 -> 1, gate/up 2 -> 1
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def test_o_and_down_become_groups_of_one_on_their_own_weights(decoder, monkeypatch):
    fused = copy.deepcopy(decoder)
    o_proj = fused.model.layers[0].self_attn.o_proj
    weight = o_proj.weight
    assert fuse_decoder_projections(fused) == 4 * decoder.config.num_hidden_layers
    assert o_proj.weight is weight and fused_member(o_proj).group.weight.data_ptr() == weight.data_ptr()
    assert fused_member(fused.model.layers[1].mlp.down_proj) is not None
    assert list(fused.state_dict()) == list(decoder.state_dict())
    products = []

    def recording_gemv(x, w):
        products.append(tuple(w.shape))
        return torch.nn.functional.linear(x, w)

    monkeypatch.setattr(fused_projections, "gemv", recording_gemv)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, decoder(ids).logits, rtol=1e-5, atol=1e-5)
    # every projection of every layer through the groups' product: q/k/v, o, gate/up, down
    assert products == [(64 + 32 + 32, 64), (64, 64), (2 * 96, 64), (64, 96)] * 2
