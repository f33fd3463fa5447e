"""Faster versions of three compressor steps that compute the same function as the stock ones.

The stock transformers code is written for chat use (one image or a few frames); Tempo runs the
compressor over hundreds of equal-sized frame groups, where per-group Python loops dominate:

* `TempoVisionAttention`: the sdpa path of `Qwen3VLVisionAttention` calls attention once per frame
  group (512 calls per layer for 1024 frames). When every group in the call has the same number of
  patches (all frames of a video are resized alike) we run one batched sdpa call instead.
* `TempoVisionPatchEmbed`: the patch embedding is a Conv3d whose stride equals its kernel, i.e. one
  matmul per patch; cuDNN's bf16 Conv3d is slow for this shape, a Linear on the flattened patch is not.
* `mrope_position_ids`: `Qwen3VLModel.get_rope_index` loops in Python over rows and token groups;
  this builds the same 3-axis position ids with a few tensor ops for the whole chunk.

The decoder gets two more: `decode_attention`, registered as the attention implementation
`DECODE_ATTENTION`, reads the grouped-query KV cache directly in compiled single-token steps
instead of through `repeat_kv` copies (Tempo's `generate` selects it for an sdpa decoder); and
`TempoDecoderAttention`, the stock `Qwen3Attention` with its element-wise steps before the cache
(q/k norms, head transposes, rotary embedding) in a method that `TempoModel.compile_decoder`
compiles (`set_split_decoder_attention` switches it in; only `compile_decoder` does).

`set_fast_paths(compressor, enabled)` switches the first two in or out (they keep the stock
parameters and names, so checkpoints do not change); tests compare both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLVisionAttention,
    Qwen3VLVisionPatchEmbed,
    apply_rotary_pos_emb_vision,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.import_utils import is_torch_greater_or_equal

from .split_kv_attention import split_kv_applies, split_kv_decode_attention


def equal_group_length(cu_seqlens: torch.Tensor) -> int | None:
    """The common length of the attention groups in `cu_seqlens`, or None when they differ.

    Only answered for CPU tensors (no GPU sync); `TempoModel` passes CPU `cu_seqlens` for that.
    """
    if cu_seqlens.device.type != "cpu" or cu_seqlens.numel() < 2:
        return None
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first = int(lengths[0])
    return first if first > 0 and bool((lengths == first).all()) else None


class TempoVisionAttention(Qwen3VLVisionAttention):
    """`Qwen3VLVisionAttention` with one sdpa call over all frame groups when they are equal-sized."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        # `vision_group_size` (a Python int, from TempoModel) spares the check and keeps this
        # function free of data-dependent branches under torch.compile.
        group = kwargs.pop("vision_group_size", None)
        if self.config._attn_implementation != "sdpa":
            group = None
        elif group is None:
            group = equal_group_length(cu_seqlens)
        if group is None:
            if cu_seqlens.device != hidden_states.device:
                cu_seqlens = cu_seqlens.to(hidden_states.device)
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        groups = seq_length // group
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        # (N, heads, d) -> (groups, heads, group, d): each group attends only to itself, as in the loop
        q, k, v = (t.reshape(groups, group, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        out = out.transpose(1, 2).reshape(seq_length, -1)
        return self.proj(out)


class TempoVisionPatchEmbed(Qwen3VLVisionPatchEmbed):
    """The Conv3d patch embedding as the Linear it is (stride == kernel size): same weights, same sums."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(flat, weight.reshape(self.embed_dim, -1), self.proj.bias)


_FAST = {Qwen3VLVisionAttention: TempoVisionAttention, Qwen3VLVisionPatchEmbed: TempoVisionPatchEmbed}
_STOCK = {fast: stock for stock, fast in _FAST.items()}


def set_fast_paths(module: torch.nn.Module, enabled: bool = True) -> int:
    """Switch the fast vision modules in (or back out) under `module`; returns how many were switched."""
    table = _FAST if enabled else _STOCK
    switched = 0
    for sub in module.modules():
        cls = table.get(type(sub))
        if cls is not None:
            sub.__class__ = cls  # same parameters and buffers, another forward
            switched += 1
    return switched


def vision_cu_seqlens_cpu(grid_thw: torch.Tensor) -> torch.Tensor:
    """Per-frame-group cumulative patch counts, as transformers computes them, but on the CPU."""
    grid = grid_thw.detach().to("cpu", torch.long)
    lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def mrope_position_ids(
    token_type: torch.Tensor,
    attention_mask: torch.Tensor | None,
    grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
) -> torch.Tensor:
    """(3, B, S) Qwen3-VL M-RoPE position ids, equal to `Qwen3VLModel.get_rope_index(...)[0]`.

    token_type: (B, S) 0 for text, non-zero for visual tokens (one visual kind per call).
    grid_thw: (G, 3) grids of the visual inputs in row order; each temporal step is its own run of
    visual tokens (timestamps separate frames), with (h / merge) * (w / merge) tokens.
    Masked positions get 0. Text advances the position by one per token; a visual run of an
    (h', w') grid puts (t, h, w) = (p, p + row, p + col) on its tokens and advances by max(h', w').
    """
    batch, seq = token_type.shape
    device = token_type.device
    valid = torch.ones_like(token_type, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visual = (token_type != 0) & valid
    kind = torch.where(valid, token_type.long(), torch.full_like(token_type, -1, dtype=torch.long))

    # the previous and next *valid* token of each position (masked tokens are skipped, as upstream)
    index = torch.arange(seq, device=device).expand(batch, seq)
    last_valid = torch.cummax(torch.where(valid, index, -1), dim=1).values
    prev = F.pad(last_valid[:, :-1], (1, 0), value=-1)
    next_valid = torch.flip(torch.cummin(torch.flip(torch.where(valid, index, seq), [1]), dim=1).values, [1])
    nxt = F.pad(next_valid[:, 1:], (0, 1), value=seq)
    prev_kind = torch.where(prev >= 0, kind.gather(1, prev.clamp(min=0)), -1)
    next_kind = torch.where(nxt < seq, kind.gather(1, nxt.clamp(max=seq - 1)), -1)
    run_start = visual & (prev_kind != kind)
    run_end = visual & (next_kind != kind)

    positions = torch.zeros(3, batch, seq, dtype=torch.long, device=device)
    num_runs = int(run_start.sum())
    compact = valid.long().cumsum(1) - 1  # index among the row's valid tokens
    advance = (valid & ~visual).long()
    if num_runs:
        if grid_thw is None:
            raise ValueError("the rows hold visual tokens but no grid_thw was given")
        grid = grid_thw.to(device=device, dtype=torch.long)
        grid = torch.repeat_interleave(grid, grid[:, 0], dim=0)  # one (1, h, w) grid per frame group
        if grid.shape[0] != num_runs:
            raise ValueError(f"the rows hold {num_runs} runs of visual tokens but grid_thw describes {grid.shape[0]}")
        h = grid[:, 1] // spatial_merge_size
        w = grid[:, 2] // spatial_merge_size
        run_id = (run_start.flatten().long().cumsum(0) - 1).view(batch, seq).clamp(min=0)
        run_len = torch.bincount(run_id[visual], minlength=num_runs)
        if bool((run_len != h * w).any()):
            raise ValueError("the visual runs in the rows do not match the sizes given by grid_thw")
        advance = advance + torch.where(run_end, torch.maximum(h, w)[run_id], 0)
        start_compact = torch.zeros(num_runs, dtype=torch.long, device=device)
        start_compact[run_id[run_start]] = compact[run_start]
        offset = compact - start_compact[run_id]
        run_w = w[run_id]
    base = advance.cumsum(1) - advance  # positions used before this token
    positions[:] = torch.where(valid, base, 0)
    if num_runs:
        positions[1] = torch.where(visual, base + offset // run_w, positions[1])
        positions[2] = torch.where(visual, base + offset % run_w, positions[2])
    return positions



# ------------------------------------------------------------------------------------------
# decoding attention

DECODE_ATTENTION = "tempo_decode_sdpa"
# Measured on torch 2.11 (H100): sdpa with enable_gqa and a mask runs a fused kernel; transformers
# avoids that combination because older torch fell back to the math kernel for it.
_GQA_WITH_MASK = is_torch_greater_or_equal("2.11", accept_dev=True)
# Whether CUDA steps with a boolean mask take `split_kv_attention`'s Triton kernels (when Triton is
# installed) instead of sdpa; the benchmarks switch it off to time sdpa in the same run.
SPLIT_KV_DECODING = True


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except for single-token steps on a CUDA device or under torch.compile.

    Why: with a static cache (compiled decoding) transformers' sdpa path has a mask, so it does not
    pass `enable_gqa`; it copies each layer's whole KV cache n_rep (4) times with `repeat_kv` at every
    step and attends over the copies. `bench_decode_attention.py` on an H100 at 8.3k cached tokens:
    120 us per layer that way, 15 us with `enable_gqa=True` and the same mask (same error against a
    float32 reference); generate() 69-78 -> 99 tokens/s. Every CUDA step takes it, not only the
    captured ones: the graphed loop's warm-up step must run the very kernels its capture records,
    so that nothing is set up for the first time inside the capture. (On one H200 a batch-8 capture
    failed, "operation not permitted when stream is capturing", while only the capture took this
    path; not yet re-run with both on it.) Every other call (prefill, training, decoding on the
    CPU) is transformers' own. Where Triton is installed, CUDA steps with a boolean mask take the
    split-KV kernels of `split_kv_attention` instead of sdpa (11.9 us per layer against 15.5 on one
    H200 at 9.2k slots; `SPLIT_KV_DECODING = False` turns them off).
    """
    step = torch.compiler.is_compiling() or query.is_cuda
    if query.shape[2] != 1 or not _GQA_WITH_MASK or (dropout and module.training) or not step:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if SPLIT_KV_DECODING and split_kv_applies(query, key, value, attention_mask):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return split_kv_decode_attention(query, key, value, attention_mask, scale), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def register_attention_functions() -> None:
    """Make `DECODE_ATTENTION` a valid `attn_implementation` (with sdpa's masks)."""
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


register_attention_functions()


# ------------------------------------------------------------------------------------------
# decoder attention, split for compilation


class TempoDecoderAttention(Qwen3Attention):
    """`Qwen3Attention` with the element-wise steps between the projections and the KV cache in a
    method of their own, `rotated_states`, so that they can be compiled on their own.

    Why a method: a compiled attention module (or decoder layer) is compiled again for every layer,
    since torch.compile specialises on the integer `layer_idx` that the cache update reads. The
    method does not read it, so one compilation serves every layer. The projections stay outside it,
    so that the fused q/k/v product of `fused_projections` keeps serving the prefill (inside a trace
    it is only taken in graphed decoding's step). Everything else is the stock forward: cache
    update, attention implementation, output projection and the returned pair.
    """

    # Set per module by `TempoModel.compile_decoder`: `rotated_states` compiled, a plain function
    # called with the module first. Not a bound method: torch 2.11's dynamo, tracing graphed
    # decoding's step, called a method bound around a compiled function without its module
    # ("missing 1 required positional argument"; one H200), so the step was captured uncompiled.
    compiled_rotated_states = None

    def __getstate__(self):
        # As `nn.Module` drops what `Module.compile` installed: a compiled function cannot be
        # pickled, so a pickled or deep-copied module runs `rotated_states` eagerly, like its
        # compiled norms and MLPs, until `compile_decoder` is called on the copy.
        state = super().__getstate__()
        state.pop("compiled_rotated_states", None)
        return state

    def rotated_states(self, query, key, value, cos, sin):
        """The q/k/v projections' outputs (batch, seq, heads * head_dim) as (batch, heads, seq,
        head_dim) each: query and key normalised per head and rotated."""
        heads = (*query.shape[:-1], -1, self.head_dim)
        query = self.q_norm(query.view(heads)).transpose(1, 2)
        key = self.k_norm(key.view(heads)).transpose(1, 2)
        value = value.view(heads).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        projected = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        rotate = self.compiled_rotated_states or TempoDecoderAttention.rotated_states
        query, key, value = rotate(self, *projected, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(output), weights


def set_split_decoder_attention(decoder: torch.nn.Module, enabled: bool = True) -> list[torch.nn.Module]:
    """Switch the `Qwen3Attention` modules under `decoder` to `TempoDecoderAttention` (or back);
    returns the modules switched. Same parameters and names; only the class changes."""
    source, target = (Qwen3Attention, TempoDecoderAttention) if enabled else (TempoDecoderAttention, Qwen3Attention)
    switched = [module for module in decoder.modules() if type(module) is source]
    for module in switched:
        module.__class__ = target
    return switched
