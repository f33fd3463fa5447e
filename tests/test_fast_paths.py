"""The loop-free compressor steps compute the same function as the stock transformers code."""

import copy

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention, Qwen3VLVisionPatchEmbed

from transformers_tempo.fast_paths import (
    TempoVisionAttention,
    TempoVisionPatchEmbed,
    equal_group_length,
    mrope_position_ids,
    set_fast_paths,
    vision_cu_seqlens_cpu,
)


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

