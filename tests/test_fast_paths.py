"""The loop-free compressor steps compute the same function as the stock transformers code."""

import copy
import operator
import pickle
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers import DynamicCache
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention, Qwen3VLVisionPatchEmbed

from transformers_tempo import fast_paths, modeling_tempo
from transformers_tempo.fast_paths import (
    DECODE_ATTENTION,
    TempoDecoderAttention,
    TempoVisionAttention,
    TempoVisionPatchEmbed,
    decode_attention,
    equal_group_length,
    mrope_position_ids,
    set_fast_paths,
    set_split_decoder_attention,
    vision_cu_seqlens_cpu,
)
from transformers_tempo.fused_projections import DECODER_GROUPS, fuse_projections
from transformers_tempo.modeling_tempo import TempoForConditionalGeneration
from transformers_tempo.testing_utils import tiny_tempo_config


def stock_copy(model):
    plain = copy.deepcopy(model)
    plain.model.set_fast_paths(False)
    return plain


def compress(model, inputs):
    x = inputs.model_inputs()
    with torch.no_grad():
        return model.model.compress(
            x["compressor_input_ids"],
            x["compressor_attention_mask"],
            pixel_values_videos=x.get("pixel_values_videos"),
            video_grid_thw=x.get("video_grid_thw"),
            pixel_values=x.get("pixel_values"),
            image_grid_thw=x.get("image_grid_thw"),
        )


def test_fast_modules_are_installed_and_switch_back(tiny_model):
    vision = tiny_model.model.compressor.visual
    assert type(vision.patch_embed) is TempoVisionPatchEmbed
    assert all(type(b.attn) is TempoVisionAttention for b in vision.blocks)
    plain = stock_copy(tiny_model)
    pv = plain.model.compressor.visual
    assert type(pv.patch_embed) is Qwen3VLVisionPatchEmbed
    assert all(type(b.attn) is Qwen3VLVisionAttention for b in pv.blocks)
    assert plain.model.fast_paths is False
    # parameter names (the checkpoint format) do not change
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in tiny_model.named_parameters()]
    assert set_fast_paths(pv, True) == 1 + len(pv.blocks)


@pytest.mark.parametrize("samples", [[3], [2, "image", 0], [1, 2]])
def test_compressor_fast_paths_equal_stock(tiny_model, hand_inputs, samples):
    inputs = hand_inputs(samples, grid=(4, 4, 6), seed=len(samples))
    fast = compress(tiny_model, inputs)
    stock = compress(stock_copy(tiny_model), inputs)
    torch.testing.assert_close(fast.features, stock.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.relevance_scores, stock.relevance_scores, rtol=1e-4, atol=1e-6)


def peaky_copy(model):
    """A copy whose vision attention is far from uniform, so a wrong grouping or scale shows."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.model.compressor.visual.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


def test_batched_vision_attention_equals_per_group_loop(tiny_model):
    tiny_model = peaky_copy(tiny_model)
    vision = tiny_model.model.compressor.visual
    grid = torch.tensor([[4, 4, 6], [2, 4, 6]])  # 6 groups of 24 patches
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536)
    plain = stock_copy(tiny_model).model.compressor.visual
    with torch.no_grad():
        fast = vision(pixels, grid_thw=grid, cu_seqlens=vision_cu_seqlens_cpu(grid))
        stock = plain(pixels, grid_thw=grid)
    torch.testing.assert_close(fast.pooler_output, stock.pooler_output, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.deepstack_features, stock.deepstack_features):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unequal_groups_fall_back_to_the_loop(tiny_model):
    tiny_model = peaky_copy(tiny_model)
    vision = tiny_model.model.compressor.visual
    grid = torch.tensor([[2, 4, 6], [2, 6, 4], [2, 4, 4]])  # group sizes 24, 24, 16
    cu = vision_cu_seqlens_cpu(grid)
    assert equal_group_length(cu) is None
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536)
    plain = stock_copy(tiny_model).model.compressor.visual
    with torch.no_grad():
        fast = vision(pixels, grid_thw=grid, cu_seqlens=cu)
        stock = plain(pixels, grid_thw=grid)
    torch.testing.assert_close(fast.pooler_output, stock.pooler_output, rtol=1e-4, atol=1e-5)


def test_cu_seqlens_and_group_length():
    grid = torch.tensor([[2, 4, 6], [1, 4, 6]])
    assert vision_cu_seqlens_cpu(grid).tolist() == [0, 24, 48, 72]
    assert equal_group_length(vision_cu_seqlens_cpu(grid)) == 24
    assert equal_group_length(torch.tensor([0, 4, 9])) is None


def test_patch_embed_linear_equals_conv3d(tiny_model):
    embed = tiny_model.model.compressor.visual.patch_embed
    torch.manual_seed(2)
    x = torch.randn(10, 1536)
    with torch.no_grad():
        expected = embed.proj(x.view(-1, 3, 2, 16, 16)).view(10, -1)
        got = embed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _random_rows(gen, kind, grids, merge, pad_to):
    """Rows of text and visual runs (one per temporal step of each grid) with right padding."""
    rows, types = [], []
    it = iter(grids)
    for n_inputs in (1, 2, 0, 1):
        ids, tt = [], []
        for _ in range(n_inputs):
            t, h, w = next(it)
            ids += [5] * int(torch.randint(1, 4, (1,), generator=gen))
            tt += [0] * (len(ids) - len(tt))
            for _ in range(t):
                n = (h // merge) * (w // merge)
                stamp = int(torch.randint(1, 5, (1,), generator=gen))
                ids += [7] * stamp + [9] * n + [8]
                tt += [0] * stamp + [kind] * n + [0]
        tail = int(torch.randint(1, 6, (1,), generator=gen))
        ids += [3] * tail
        tt += [0] * tail
        rows.append(tt)
    width = max(len(r) for r in rows) + pad_to
    token_type = torch.zeros(len(rows), width, dtype=torch.int)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        token_type[i, : len(r)] = torch.tensor(r, dtype=torch.int)
        mask[i, : len(r)] = 1
    return token_type, mask


@pytest.mark.parametrize("kind", [1, 2])
def test_mrope_position_ids_equal_get_rope_index(tiny_model, kind):
    compressor = tiny_model.model.compressor
    merge = compressor.config.vision_config.spatial_merge_size
    gen = torch.Generator().manual_seed(kind)
    grids = torch.tensor([[1 if kind == 1 else 3, 4, 6], [1 if kind == 1 else 2, 6, 4], [1, 2, 8], [1 if kind == 1 else 2, 4, 4]])
    token_type, mask = _random_rows(gen, kind, grids.tolist(), merge, pad_to=3)
    ids = torch.where(token_type != 0, 99, 5)
    key = "image_grid_thw" if kind == 1 else "video_grid_thw"
    expected, _ = compressor.get_rope_index(ids, mm_token_type_ids=token_type, attention_mask=mask, **{key: grids.clone()})
    got = mrope_position_ids(token_type, mask, grids, merge)
    assert torch.equal(got, expected)
    # text-only rows: plain positions on all three axes
    text = torch.zeros(2, 6, dtype=torch.int)
    text_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    assert mrope_position_ids(text, text_mask, None, merge)[:, 1].tolist() == [[0, 1, 2, 3, 0, 0]] * 3


def test_mrope_position_ids_reject_mismatched_grids(tiny_model):
    merge = 2
    token_type = torch.tensor([[0, 2, 2, 2, 2, 0]], dtype=torch.int)
    with pytest.raises(ValueError, match="runs of visual tokens"):
        mrope_position_ids(token_type, None, torch.tensor([[2, 4, 4]]), merge)
    with pytest.raises(ValueError, match="do not match"):
        mrope_position_ids(token_type, None, torch.tensor([[1, 2, 4]]), merge)
    with pytest.raises(ValueError, match="no grid_thw"):
        mrope_position_ids(token_type, None, None, merge)


@pytest.mark.slow
def test_compiled_compressor_equals_eager(tiny_model, hand_inputs):
    inputs = hand_inputs([2, 1], grid=(4, 4, 6), seed=5)
    compiled = copy.deepcopy(tiny_model)
    torch._dynamo.reset()
    # aot_eager traces exactly what inductor would compile, without needing a C compiler here
    compiled.model.compile_compressor(backend="aot_eager")
    expected = compress(tiny_model, inputs)
    got = compress(compiled, inputs)
    torch.testing.assert_close(got.features, expected.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.relevance_scores, expected.relevance_scores, rtol=1e-4, atol=1e-6)


def counting_backend(graphs: list):
    """A torch.compile backend that runs each traced graph as it is and appends it to `graphs`
    (one entry per compilation)."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("dynamic", [True, None])
def test_compiled_compressor_takes_new_row_lengths_without_recompiling(tiny_model, hand_inputs, dynamic):
    graphs = []
    compiled = copy.deepcopy(tiny_model)
    torch._dynamo.reset()
    compiled.model.compile_compressor(backend=counting_backend(graphs), **({} if dynamic else {"dynamic": None}))
    first, other = hand_inputs([2, 1], grid=(4, 4, 6), seed=5), hand_inputs([3], grid=(2, 6, 6), seed=6)
    assert first.model_inputs()["compressor_input_ids"].shape[1] != other.model_inputs()["compressor_input_ids"].shape[1]
    compress(compiled, first)
    compiled_once = len(graphs)
    assert compiled_once >= 2  # vision blocks and text layers
    got = compress(compiled, other)  # longer rows, more patches, another batch size
    if dynamic:  # the default
        assert len(graphs) == compiled_once
        expected = compress(tiny_model, other)
        torch.testing.assert_close(got.features, expected.features, rtol=1e-4, atol=1e-5)
    else:  # torch.compile's own default specialises on the first shapes
        assert len(graphs) > compiled_once
    torch._dynamo.reset()


def test_compiled_decoder_answers_as_eager_for_any_prompt_length(tiny_model, hand_inputs):
    graphs = []
    compiled = copy.deepcopy(tiny_model)
    torch._dynamo.reset()
    compiled.model.compile_decoder(backend=counting_backend(graphs))
    options = dict(do_sample=False, max_new_tokens=4, cache_implementation="static")
    lengths = []
    for samples, seed in (([2], 5), ([3], 6)):  # one video each, prompts of two lengths
        inputs = hand_inputs(samples, seed=seed).model_inputs()
        lengths.append(compiled.prepare_generation_inputs(**inputs).inputs_embeds.shape[1])
        expected = tiny_model.generate(**inputs, **options)
        assert torch.equal(compiled.generate(**inputs, **options), expected)
        if seed == 5:
            compiled_once = len(graphs)
    assert lengths[0] != lengths[1]
    assert compiled_once >= 1
    modules = modeling_tempo.compiled_decoder_modules(compiled.model.language_model)
    assert len(modules) == 5 * compiled.config.text_config.num_hidden_layers + 1  # 4 norms and the MLP per layer
    assert all(module._compiled_call_impl is not None for module in modules)
    assert len(graphs) == compiled_once  # the second prompt, of another length, compiled nothing new
    torch._dynamo.reset()


def test_compiled_decoder_compiles_once_for_every_layer_with_fused_projections(tiny_model, hand_inputs):
    """The fused projections must not make each layer's MLP a compilation of its own."""
    inputs = hand_inputs([2], seed=5).model_inputs()
    options = dict(do_sample=False, max_new_tokens=3, cache_implementation="static")
    expected = tiny_model.generate(**inputs, **options)
    compilations = {}
    for fused in (False, True):
        graphs = []
        model = copy.deepcopy(tiny_model)
        torch._dynamo.reset()
        if fused:
            assert fuse_projections(model.model.language_model, DECODER_GROUPS) > 0
        model.model.compile_decoder(backend=counting_backend(graphs))
        assert torch.equal(model.generate(**inputs, **options), expected)
        compilations[fused] = len(graphs)
    assert compilations[True] == compilations[False]
    torch._dynamo.reset()


def run_decoder(decoder, embeds, steps=2, **kwargs):
    """A prefill of `embeds` then `steps` one-token steps, eager: the outputs and the cache's keys and values."""
    cache, outputs = DynamicCache(config=decoder.config), []
    with torch.no_grad():
        for chunk in (embeds[:, :-steps], *embeds[:, -steps:].split(1, dim=1)):
            out = decoder(inputs_embeds=chunk, cache=cache, use_cache=True, **kwargs)
            outputs += [out.last_hidden_state, *(out.attentions or ())]
    return outputs, [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [False, True])
def test_split_decoder_attention_computes_the_stock_attention(tiny_model, fused, implementation):
    stock = copy.deepcopy(tiny_model)
    stock.model.language_model.set_attn_implementation(implementation)
    if fused:
        assert fuse_projections(stock.model.language_model, DECODER_GROUPS) > 0
    decoder = stock.model.language_model
    assert all(type(layer.self_attn) is Qwen3Attention for layer in decoder.layers)  # not installed unasked
    embeds = torch.randn(2, 9, decoder.config.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    options = {"output_attentions": implementation == "eager"}
    expected = run_decoder(decoder, embeds, attention_mask=mask, **options)

    split = set_split_decoder_attention(decoder)
    assert split == [layer.self_attn for layer in decoder.layers]
    assert all(type(module) is TempoDecoderAttention for module in split)
    got = run_decoder(decoder, embeds, attention_mask=mask, **options)
    assert len(got[0]) == 3 * (1 + len(split) * options["output_attentions"])  # hidden states and weights
    for got_tensors, expected_tensors in zip(got, expected):  # the outputs, then the cache
        assert len(got_tensors) == len(expected_tensors)
        for a, b in zip(got_tensors, expected_tensors):
            assert torch.equal(a, b)
    assert set_split_decoder_attention(decoder, False) == split
    assert all(type(layer.self_attn) is Qwen3Attention for layer in decoder.layers)


def tiny_decoder_with_layers(tokenizer, layers):
    config = tiny_tempo_config(tokenizer)
    config.text_config.num_hidden_layers = layers
    config.text_config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    return TempoForConditionalGeneration(config).eval()


def is_rotary_graph(graph) -> bool:
    """Whether a traced graph holds the rotary embedding's half rotation (negation and concatenation)."""
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    return bool(targets & {torch.cat, torch.ops.aten.cat.default}) and bool(
        targets & {torch.neg, operator.neg, torch.ops.aten.neg.default}
    )


def test_compiled_decoder_attention_compiles_once_for_any_layer_count(tokenizer, hand_inputs):
    """The compiled `rotated_states` runs in generate, answers as the eager model, and compiles
    as often for 4 layers as for 2; a prompt of another length compiles nothing new."""
    options = dict(do_sample=False, max_new_tokens=3, cache_implementation="static")
    prompts = [hand_inputs([2], seed=5).model_inputs(), hand_inputs([3], seed=6).model_inputs()]
    compilations = {}
    for layers in (2, 4):
        model = tiny_decoder_with_layers(tokenizer, layers)
        expected = [model.generate(**inputs, **options) for inputs in prompts]
        graphs = []
        torch._dynamo.reset()
        assert fuse_projections(model.model.language_model, DECODER_GROUPS) > 0  # as enable_compiled_inference
        model.model.compile_decoder(backend=counting_backend(graphs))
        attentions = [layer.self_attn for layer in model.model.language_model.layers]
        assert len(attentions) == layers and all(type(module) is TempoDecoderAttention for module in attentions)
        assert torch.equal(model.generate(**prompts[0], **options), expected[0])
        first_prompt = len(graphs)
        assert torch.equal(model.generate(**prompts[1], **options), expected[1])
        assert len(graphs) == first_prompt
        # the prefill's and the one-token steps' rotary: the compiled method is what ran
        assert sum(is_rotary_graph(graph) for graph in graphs) == 2
        compilations[layers] = len(graphs)
        assert not hasattr(attentions[0].compiled_rotated_states, "__self__")  # takes the module as an argument
        # a deep copy or a pickled model is eager, like torch's compiled modules, and answers the same
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            attention = copied.model.language_model.layers[0].self_attn
            assert type(attention) is TempoDecoderAttention and attention.compiled_rotated_states is None
            assert torch.equal(copied.generate(**prompts[0], **options), expected[0])
    assert compilations[2] == compilations[4]
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_compiled_compressor_on_gpu_equals_eager(tiny_model, hand_inputs):
    inputs = hand_inputs([3], grid=(4, 4, 6), seed=6)
    eager = copy.deepcopy(tiny_model).cuda()
    compiled = copy.deepcopy(tiny_model).cuda()
    torch._dynamo.reset()
    compiled.model.compile_compressor()
    x = {k: v.cuda() for k, v in inputs.model_inputs().items()}
    with torch.no_grad():
        args = (x["compressor_input_ids"], x["compressor_attention_mask"])
        kwargs = {"pixel_values_videos": x["pixel_values_videos"], "video_grid_thw": x["video_grid_thw"]}
        expected = eager.model.compress(*args, **kwargs)
        got = compiled.model.compress(*args, **kwargs)
    torch.testing.assert_close(got.features, expected.features, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.relevance_scores, expected.relevance_scores, rtol=1e-3, atol=1e-5)



# ------------------------------------------------------------------------------------------
# decoding attention


def _decode_case(batch=2, heads=8, kv_heads=2, slots=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, slots, dim, generator=g)
    v = torch.randn(batch, kv_heads, slots, dim, generator=g)
    mask = torch.ones(batch, 1, 1, slots, dtype=torch.bool)
    mask[:, ..., slots - 6 :] = False  # empty static-cache slots
    mask[1, ..., :4] = False  # left padding of the second row
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    return module.eval(), q, k, v, mask


def _reference_attention(q, k, v, mask, scale):
    """Independent float64 attention with the key/value heads repeated per query head."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.skipif(not fast_paths._GQA_WITH_MASK, reason="grouped decoding attention needs torch >= 2.11")
def test_compiled_decode_attention_reads_grouped_cache_and_equals_reference():
    module, q, k, v, mask = _decode_case()
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return real_sdpa(*args, **kwargs)

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def step(q, k, v, mask):
        return decode_attention(module, q, k, v, mask, scaling=0.25)[0]

    # aot_eager traces the function as inductor would, so torch.compiler.is_compiling() is True in it
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa):
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    assert out.shape == (2, 1, 8, 16)
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)
    assert calls == [True]  # one grouped call, no repeat_kv copies
    stock = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-6)


def test_decode_attention_is_transformers_sdpa_outside_compiled_single_token_steps():
    module, q, k, v, mask = _decode_case()
    # a single-token step on the CPU (eager decoding): transformers' function, bit for bit
    eager = decode_attention(module, q, k, v, mask, scaling=0.25)[0]
    assert torch.equal(eager, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])
    # several query tokens (prefill), even under compile: transformers' function
    g = torch.Generator().manual_seed(1)
    q5 = torch.randn(2, 8, 5, 16, generator=g)
    mask5 = torch.ones(2, 1, 5, 40, dtype=torch.bool).tril(diagonal=35)
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        prefill = decode_attention(module, q5, k, v, mask5, scaling=0.25)[0]
    assert torch.equal(prefill, sdpa_attention_forward(module, q5, k, v, mask5, scaling=0.25)[0])


def test_generate_uses_decode_attention_and_restores_sdpa(tiny_model, hand_inputs):
    text_config = tiny_model.config.text_config
    assert tiny_model.model.language_model.config is text_config
    assert text_config._attn_implementation == "sdpa"
    inputs = hand_inputs([2, 3]).model_inputs()
    seen = []
    wrapped = ALL_ATTENTION_FUNCTIONS[DECODE_ATTENTION]

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return wrapped(module, query, *args, **kwargs)

    gen = dict(max_new_tokens=3, do_sample=False, eos_token_id=None)
    with torch.no_grad(), mock.patch.dict(ALL_ATTENTION_FUNCTIONS._global_mapping, {DECODE_ATTENTION: spy}):
        ours = tiny_model.generate(**inputs, **gen)
    assert text_config._attn_implementation == "sdpa"  # restored
    layers = text_config.num_hidden_layers
    assert len(seen) == 3 * layers and seen[layers:] == [1] * (2 * layers)  # prefill, then 2 single-token steps
    with torch.no_grad(), mock.patch.object(modeling_tempo, "decode_attention_while_generating", nullcontext):
        plain = tiny_model.generate(**inputs, **gen)
    assert torch.equal(ours, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_static_cache_decoding_on_gpu_equals_dynamic(tiny_model, hand_inputs):
    """On a GPU, generate(cache_implementation="static") compiles the single-token step (CUDA graphs),
    where decode_attention takes its grouped path; the tokens equal eager dynamic-cache decoding."""
    gpu_model = copy.deepcopy(tiny_model).cuda()
    inputs = {k: v.cuda() for k, v in hand_inputs([3, 2]).model_inputs().items()}
    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        dynamic = gpu_model.generate(**inputs, **gen)
        static = gpu_model.generate(**inputs, cache_implementation="static", **gen)
    assert torch.equal(dynamic, static)
