"""One decoding step's attention at Tempo-6B's decoder size, kernel by kernel, and whole decoding.

    python benchmarks/bench_decode_attention.py --out $OUT/attn.json             # GPU
    python benchmarks/bench_decode_attention.py --decoder sdpa tempo_decode_sdpa # + generate() tok/s
    python benchmarks/bench_decode_attention.py --tiny                           # CPU, seconds

Part 1 times the attention of one query token over a static KV cache (Qwen3-4B: 32 query heads,
8 key/value heads, head dim 128; default 8.3k slots, as at 1024 frames and budget 8192) for
several formulations, each under torch.compile, against a float32 reference:
  - stock:    what transformers' sdpa path does with a mask (repeat_kv copies, then sdpa)
  - gqa_sdpa: sdpa with enable_gqa=True and the mask
  - grouped_sdpa: the query heads of one key/value head as that head's queries (tried in session 2)
  - grouped_matmul: two matmuls per key/value head (bf16 scores)
  - tempo_decode: `fast_paths.decode_attention` (the package's decoding attention: split_kv on
    CUDA with Triton, else gqa_sdpa)
  - split_kv: `split_kv_attention`'s Triton kernels (chunks of slots per key/value head, merged)
  - flex_decode: flex_attention's decoding kernel with the mask read in a mask_mod
  - unmasked_lower_bound: sdpa over the valid slots without a mask (a floor, not a usable path)
Part 2 (--decoder) runs the real decoder (random bf16 weights) through `generate` with a static
cache for each named attention implementation and reports tokens/s after the first token
(--profile-out: a torch.profiler table of one more generate() with the last one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers_tempo import TempoConfig, split_kv_attention  # noqa: E402
from transformers_tempo.fast_paths import DECODE_ATTENTION, decode_attention  # noqa: E402


def stock(q, k, v, mask, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
    return sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]


def gqa_sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


def grouped_sdpa(q, k, v, mask, scale):
    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], h // k.shape[1], d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, 1, d).transpose(1, 2)


def grouped_matmul(q, k, v, mask, scale):
    """One token's attention as two matmuls per key/value head (bf16 scores, as transformers' eager)."""
    b, h, _, d = q.shape
    scores = torch.matmul(q.reshape(b, k.shape[1], h // k.shape[1], d), k.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v.dtype), v).reshape(b, h, 1, d).transpose(1, 2)


def tempo_decode(q, k, v, mask, scale):
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
    return decode_attention(module, q, k, v, mask, scaling=scale)[0]


def flex_decode(q, k, v, mask, scale):
    """flex_attention (its split-KV decoding kernel for short queries) reading the step's mask
    tensor in a mask_mod, over a block mask that marks every block partial: the same compiled code
    stays right as the mask changes from step to step, as in a captured decoding graph."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    slots, block = k.shape[2], 128
    blocks = -(-slots // block)
    valid = mask.view(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    counts = torch.full((1, 1, 1), blocks, dtype=torch.int32, device=q.device)
    indices = torch.arange(blocks, dtype=torch.int32, device=q.device).view(1, 1, 1, blocks)
    block_mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(1, slots))
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)


def split_kv(q, k, v, mask, scale):
    """`split_kv_attention`'s two Triton kernels: chunks of slots per key/value head, then their merge."""
    from transformers_tempo.split_kv_attention import split_kv_decode_attention

    return split_kv_decode_attention(q, k, v, mask, scale)


def unmasked_lower_bound(q, k, v, mask, scale):
    """sdpa over the valid slots only, no mask: not usable in a captured step (the length changes
    every step), timed as the kernel-time floor the masked formulations are compared with."""
    valid = k.shape[2] - 40  # as `kernels` builds the mask
    return F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid], scale=scale, enable_gqa=True).transpose(1, 2)


VARIANTS = {
    "stock": stock,
    "flex_decode": flex_decode,
    "unmasked_lower_bound": unmasked_lower_bound,
    "gqa_sdpa": gqa_sdpa,
    "grouped_sdpa": grouped_sdpa,
    "grouped_matmul": grouped_matmul,
    "tempo_decode": tempo_decode,
    "split_kv": split_kv,
}


# split_kv_attention's settings, in the order --split-configs gives them
SPLIT_KNOBS = ("TARGET_PROGRAMS", "BLOCK_SLOTS", "NUM_WARPS", "NUM_STAGES")


def reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def time_calls(fn, args, device, layers: int, repeats: int) -> float:
    """Microseconds per call, averaged over `repeats` x `layers` back-to-back calls.

    On the GPU the `layers` calls are captured in one CUDA graph and replayed (as the compiled
    decoding step is), so launch overhead does not hide the kernels' time.
    """
    for _ in range(3):
        fn(*args)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats * layers):
            fn(*args)
        return (time.perf_counter() - t0) / (repeats * layers) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (repeats * layers) * 1e6


def kernels(args, device, dtype) -> list[dict]:
    text = TempoConfig.tempo_6b().text_config
    heads, kv_heads, dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    slots = args.slots
    valid = args.valid or slots - 40  # the last steps' slots are still empty
    torch.manual_seed(0)
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, slots, dim, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, slots, dim, device=device, dtype=dtype)
    mask = (torch.arange(slots, device=device) < valid).view(1, 1, 1, slots)
    scale = dim**-0.5
    ref = reference(q, k, v, mask, scale)
    rows = []
    runs = [(name, None) for name in args.variants] + [("split_kv", config) for config in args.split_configs]
    for name, config in runs:
        fn = VARIANTS[name]
        compiled = torch.compile(fn, dynamic=False) if not args.no_compile and config is None else fn
        label = name if config is None else f"split_kv@{config}"
        saved = {knob: getattr(split_kv_attention, knob) for knob in SPLIT_KNOBS}
        for knob, value in zip(SPLIT_KNOBS, config.split(":") if config else []):
            setattr(split_kv_attention, knob, int(value))
        try:
            out = compiled(q, k, v, mask, scale)
            err = (out.float() - ref).abs().max().item()
            us = time_calls(compiled, (q, k, v, mask, scale), device, text.num_hidden_layers, args.repeats)
            row = {"variant": label, "us_per_call": round(us, 1), "max_abs_err_vs_fp32": err}
        except Exception as exc:  # a formulation this torch cannot run is reported, not fatal
            row = {"variant": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            for knob, value in saved.items():
                setattr(split_kv_attention, knob, value)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def decoder_rates(args, device, dtype) -> list[dict]:
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen3ForCausalLM

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    text = TempoConfig.tempo_6b().text_config
    if args.tiny:
        text.num_hidden_layers, text.hidden_size, text.intermediate_size = 2, 64, 128
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(text, dtype=dtype, attn_implementation="sdpa").eval()
    embeds = torch.randn(1, args.slots - args.new_tokens, text.hidden_size, device=device, dtype=dtype) * 0.02
    rows, first_tokens = [], None
    for name in args.decoder:
        impl = name
        torch._dynamo.reset()  # a fresh compiled decoding step for each implementation
        model.config._attn_implementation = impl
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        gen["cache_implementation"] = "static"
        t0 = time.perf_counter()
        model.generate(inputs_embeds=embeds, **gen)  # warm-up: compiles the decoding step
        warm = time.perf_counter() - t0
        clock = Clock()
        out = model.generate(inputs_embeds=embeds, logits_processor=LogitsProcessorList([clock]), **gen)
        rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
        same, first_diff = None, None
        if first_tokens is None:
            first_tokens = out
        else:
            same = bool(torch.equal(out, first_tokens))
            differ = (out != first_tokens).nonzero()
            first_diff = int(differ[0, 1]) if len(differ) else None
        row = {"decoder_attention": name, "tokens_per_s": round(rate, 1), "warmup_s": round(warm, 1),
               "same_tokens_as_first": same, "first_different_token": first_diff}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.profile_out:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            model.generate(inputs_embeds=embeds, **gen)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=90)
        Path(args.profile_out).write_text(f"generate({args.new_tokens} tokens) with {args.decoder[-1]}\n{table}\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, small sizes, no compile")
    p.add_argument("--slots", type=int, default=8320, help="static cache length")
    p.add_argument("--valid", type=int, default=None, help="slots the mask lets through (default: all but 40)")
    p.add_argument("--split-configs", nargs="*", default=[], metavar="P:B:W:S",
                   help="also time split_kv (uncompiled: a custom op) with these settings of "
                   "split_kv_attention's " + ", ".join(SPLIT_KNOBS))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--variants", nargs="*", default=None, help="default: all (split_kv only on CUDA)")
    p.add_argument("--decoder", nargs="*", default=[], help=f"attention implementations, e.g. sdpa {DECODE_ATTENTION}")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile-out", default=None, help="write a profiler table of one generate() here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.variants is None:  # Triton kernels need a GPU (or Triton's interpreter)
        args.variants = [name for name in VARIANTS if device.type == "cuda" or name != "split_kv"]
    if args.tiny:
        args.slots, args.repeats, args.no_compile = min(args.slots, 300), 2, True
    result = {
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "slots": args.slots,
        "kernels": kernels(args, device, dtype),
    }
    if args.decoder:
        result["decoder"] = decoder_rates(args, device, dtype)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
