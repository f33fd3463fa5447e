"""End-to-end Tempo benchmark: frames (or a file) -> answer, per stage, at real size on a GPU.

    python benchmarks/bench_e2e.py                      # GPU: Tempo-6B architecture, random bf16 weights
    python benchmarks/bench_e2e.py --frames 256 1024    # a subset of workloads
    python benchmarks/bench_e2e.py --tiny               # same code on CPU in seconds (used by the tests)

Writes benchmarks/results/e2e-<machine>-<date>.json and .md (machine, date, commit).
Stages are timed with CUDA synchronisation: preprocessing (frames -> patches), compressor,
ATA + projection + splice, prefill (first decoder step), decoding tokens/s; peak memory per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trace_gaps  # noqa: E402

from transformers_tempo import TempoConfig, TempoForConditionalGeneration  # noqa: E402
from transformers_tempo import fast_paths, frame_geometry, gemv_kernels, split_kv_attention  # noqa: E402
from transformers_tempo.fast_paths import TempoDecoderAttention, set_split_decoder_attention  # noqa: E402
from transformers_tempo.fused_projections import fuse_decoder_projections, set_fused_projections  # noqa: E402
from transformers_tempo.graphed_decoding import release_graphed_decoding  # noqa: E402
from transformers_tempo.modeling_tempo import compiled_decoder_modules  # noqa: E402
from transformers_tempo.processing_tempo import TempoProcessor  # noqa: E402
from transformers_tempo.streaming import compress_streaming, generate_streaming  # noqa: E402
from transformers_tempo.testing_utils import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from transformers_tempo.video_loading import load_video  # noqa: E402
from transformers_tempo.video_processing_tempo import TempoVideoProcessor  # noqa: E402

QUESTION = "What is the person in the red jacket doing right after the car stops?"


def now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peak_tflops(device, n=8192, repeats=20) -> float:
    """The bf16 matmul rate this GPU reaches here, to compare the compressor against."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0 = now(device)
    for _ in range(repeats):
        a @ b
    dt = now(device) - t0
    return 2 * n**3 * repeats / dt / 1e12


def build(tiny: bool, device, dtype, attn: str):
    if tiny:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer).to(device)
        processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
        return model, processor
    from transformers_tempo.testing_utils import build_tiny_tokenizer as _tok

    # The real vocabulary is not reachable offline; the tiny tokenizer's ids are remapped onto the
    # real vocabulary size by the config (token ids below 151936), so prompts have realistic lengths
    # per timestamp/text piece but a different vocabulary. The network sizes are Tempo-6B's.
    tokenizer = _tok()
    config = TempoConfig.tempo_6b()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config.video_token_id, config.image_token_id = ids["<|video_pad|>"], ids["<|image_pad|>"]
    cc = config.compressor_config
    cc.video_token_id, cc.image_token_id = ids["<|video_pad|>"], ids["<|image_pad|>"]
    cc.vision_start_token_id, cc.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    cc.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = TempoForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
    processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
    return model, processor


class TokenClock(BaseStreamer):
    """Wall time (CUDA-synchronised) at which each generated token reaches the streamer."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        self.times.append(now(self.device))

    def end(self):
        pass


def timed_generate(model, prepared, device, new_tokens, via_tempo_forward=False, **extra):
    """(seconds to the first token, decode tokens/s after it, total seconds, output ids).

    via_tempo_forward: decode through TempoForConditionalGeneration.forward (GenerationMixin on the
    Tempo model itself), the path before decoding moved to the plain Qwen3 view.
    """
    from transformers import GenerationMixin

    clock = TokenClock(device)
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock, **extra)
    t0 = now(device)
    if via_tempo_forward:
        out = GenerationMixin.generate(
            model, inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **common
        )
    else:
        out = model.generate(decoder_inputs=prepared, **common)
    total = now(device) - t0
    times = clock.times[-out.shape[1]:]  # one put per new token (a first put of the prompt is skipped)
    first = times[0] - t0
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return first, rate, total, out


def timed_answer(model, prepared, device, new_tokens, **extra):
    """`timed_generate` without a streamer (which syncs every step and switches the graphed loop
    off): the first token's time is that of a one-token answer, the decoding rate that of the
    remaining tokens. No end
    token stops it (eos_token_id=None), so every answer has `new_tokens` tokens."""
    common = dict(do_sample=False, eos_token_id=None, **extra)
    t0 = now(device)
    model.generate(decoder_inputs=prepared, max_new_tokens=1, **common)
    first = now(device) - t0
    t0 = now(device)
    out = model.generate(decoder_inputs=prepared, max_new_tokens=new_tokens, **common)
    total = now(device) - t0
    rate = (out.shape[1] - 1) / (total - first) if out.shape[1] > 1 and total > first else 0.0
    return first, rate, total, out


def first_difference(a, b) -> int | None:
    """None when two answers are the same tokens, else the index of the first differing token."""
    n = min(a.shape[1], b.shape[1])
    differs = (a[:, :n].cpu() != b[:, :n].cpu()).any(0).nonzero()
    if len(differs):
        return int(differs[0, 0])
    return None if a.shape[1] == b.shape[1] else n


def eager_logit_margin(model, prepared, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the top-1 minus top-2 logit and the top-1 token of the decoder as it stands at the
    new token after `prefix` (batch, tokens), teacher-forced: one forward over the spliced prompt
    and `prefix`. Given the prefix two modes share before their first differing token, a margin
    within bf16 rounding makes the difference a near tie rather than a wrong step."""
    decoder = model.plain_decoder()
    device = prepared.inputs_embeds.device
    prefix = prefix.to(device)
    mask = torch.cat([prepared.attention_mask, prepared.attention_mask.new_ones(prefix.shape)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding, as generate counts them
    with torch.inference_mode():
        embeds = torch.cat([prepared.inputs_embeds, decoder.get_input_embeddings()(prefix)], dim=1)
        logits = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                         use_cache=False).logits
    top = logits[:, -1].float().topk(2, dim=-1)
    return (top.values[:, 0] - top.values[:, 1]).cpu(), top.indices[:, 0].cpu()


def compare_answers(model, prepared, answers: dict, first_mode: str, row: dict) -> None:
    """Each mode's greedy tokens against the eager (dynamic) and compiled (static) loops and the
    first mode: the first differing token; there, the stock eager decoder's (unfused, uncompiled)
    smallest margin over the batch, teacher-forced along the tokens the two modes share, and which
    modes with that prefix pick its token."""
    differing = {}  # first differing token -> the tokens the two modes share before it
    for mode, out in answers.items():
        for other in ("dynamic", "static", first_mode):
            if other in answers and other != mode:
                position = row[f"same_tokens_{mode}_vs_{other}"] = first_difference(out, answers[other])
                if position is not None:
                    differing.setdefault(position, out[:, :position].cpu())
    set_fused_projections(model, False)
    with uncompiled_decoder(model):
        for position, shared in sorted(differing.items()):
            margins, eager = eager_logit_margin(model, prepared, shared)
            row[f"eager_logit_margin_at_token_{position}"] = float(margins.min())
            row[f"eager_agrees_at_token_{position}"] = sorted(
                mode for mode, out in answers.items()
                if torch.equal(out[:, :position].cpu(), shared) and torch.equal(out[:, position].cpu(), eager)
            )


# model.graphed_decoding per graphed decode mode (the other modes run transformers' loop)
GRAPHED_MODES = {
    "graphed": True,
    "graphed-cublas": True,  # the same step with cuBLAS's products instead of the matrix-vector kernel
    "graphed-autotune": "max-autotune-no-cudagraphs",
    "graphed-autotune-sdpa": "max-autotune-no-cudagraphs",  # attention by sdpa, not the split-KV kernel
    "graphed-eager": "eager",
    "graphed-unfused": "eager",
}


@contextlib.contextmanager
def uncompiled_decoder(model, uncompiled: bool = True):
    """Run the decoder without the compile of `compile_decoder`: eager norms and MLPs, and the stock
    attention instead of the one with a compiled `rotated_states` (nothing to undo when it was not compiled)."""
    decoder = model.model.language_model
    modules = compiled_decoder_modules(decoder)
    saved = [module._compiled_call_impl for module in modules]
    split = []
    if uncompiled:
        for module in modules:
            module._compiled_call_impl = None
        split = set_split_decoder_attention(decoder, False)
    try:
        yield
    finally:
        for module, compiled in zip(modules, saved):
            module._compiled_call_impl = compiled
        for attention in split:
            attention.__class__ = TempoDecoderAttention


# decode modes that time the paths before `compile_decoder`: the eager decoder captured as it was
UNCOMPILED_DECODER_MODES = {"graphed-eager", "graphed-unfused"}


def device_profile(device):
    """A torch.profiler over the CPU and, on CUDA, the device."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def write_profile(prof, device, path: Path, rows: int) -> Path:
    """`prof`'s top `rows` ops and kernels by self time on the device (the CPU without CUDA) into `path`."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    return path


def write_trace(prof, stem: Path) -> list[Path]:
    """`prof` as a gzipped chrome trace, and `trace_gaps.py`'s account of the GPU's idle time beside it."""
    raw = stem.with_suffix(".json")
    prof.export_chrome_trace(str(raw))
    packed = stem.with_suffix(".json.gz")
    with open(raw, "rb") as source, gzip.open(packed, "wb") as target:
        shutil.copyfileobj(source, target)
    raw.unlink()
    gaps = stem.parent / f"{stem.name}-gaps.txt"
    with open(gaps, "w") as handle, contextlib.redirect_stdout(handle):
        trace_gaps.main([str(packed)])
    return [packed, gaps]


def profile_decode(model, prepared, device, out_dir: Path, new_tokens: int, mode: str = "static") -> Path:
    """Profile one static-cache answer (its prefill included: `profile_prefill` profiles that
    alone): transformers' loop ("static") or a graphed mode."""
    model.graphed_decoding = GRAPHED_MODES.get(mode, False)
    set_fused_projections(model, mode != "graphed-unfused")
    release_graphed_decoding(model.plain_decoder())
    options = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, cache_implementation="static")
    model.generate(decoder_inputs=prepared, **options)  # capture outside the profile
    with device_profile(device) as prof:
        model.generate(decoder_inputs=prepared, **options)
        now(device)
    model.graphed_decoding = True
    set_fused_projections(model, True)
    return write_profile(prof, device, out_dir / f"profile-decode-{mode}.txt", rows=30)


def profile_prefill(model, prepared, device, out_dir: Path) -> Path:
    """Profile the prefill alone: a one-token static-cache answer (after one untimed)."""
    options = dict(max_new_tokens=1, do_sample=False, cache_implementation="static")
    model.generate(decoder_inputs=prepared, **options)
    with device_profile(device) as prof:
        model.generate(decoder_inputs=prepared, **options)
        now(device)
    return write_profile(prof, device, out_dir / "profile-prefill.txt", rows=40)


def compressor_flops(model, inputs, compressor_batch_size=None) -> float:
    """Matmul FLOPs of one compressor pass: every Linear (2*in*out per token) plus attention
    (4*L_q*L_k*width per sequence: scores and weighted sum; vision attention per frame pair)."""
    total = 0.0

    def linear_hook(module, args, output):
        nonlocal total
        total += 2.0 * args[0].numel() / args[0].shape[-1] * module.in_features * module.out_features

    cfg = model.config.compressor_config
    handles = [m.register_forward_hook(linear_hook) for m in model.model.compressor.modules() if isinstance(m, torch.nn.Linear)]
    keys = ("compressor_input_ids", "compressor_attention_mask", "pixel_values_videos", "video_grid_thw")
    try:
        with torch.inference_mode():
            model.compress(
                inputs[keys[0]], inputs[keys[1]], pixel_values_videos=inputs[keys[2]], video_grid_thw=inputs[keys[3]],
                compressor_batch_size=compressor_batch_size,
            )
    finally:
        for h in handles:
            h.remove()
    # attention: text model over each padded row (prompt + memory tokens), vision per frame pair
    rows = inputs[keys[1]].sum(1).double() + model.config.num_memory_tokens
    text = cfg.text_config
    total += float((4 * rows**2 * text.num_attention_heads * text.head_dim).sum()) * text.num_hidden_layers
    grid = inputs[keys[3]]
    per_pair = (grid[:, 1] * grid[:, 2]).double()
    pairs = grid[:, 0].double()
    vision = cfg.vision_config
    total += float((4 * per_pair**2 * pairs).sum()) * vision.hidden_size * vision.depth
    return total


def compressor_seconds(model, processor, frames_count, args, device, repeats=2, count_flops=False) -> float:
    """Best of `repeats` timed compressor passes (after one warm-up) on random 1280x720 frames."""
    h, w = (720, 1280) if not args.tiny else (96, 160)
    frames = torch.randint(0, 256, (frames_count, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    gpu = args.gpu_preprocess and device.type == "cuda"
    inputs = processor(text=QUESTION, videos=frames, video_metadata={"fps": 2.0}, return_tensors="pt",
                       device=device if gpu else None, pixel_dtype=model.dtype, pixel_device="cpu")
    pixels = inputs.pop("pixel_values_videos")
    inputs = inputs.to(device)
    if count_flops:
        return compressor_flops(model, {**inputs, "pixel_values_videos": pixels}, args.compressor_batch_size)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = now(device)
            model.compress(inputs["compressor_input_ids"], inputs["compressor_attention_mask"], pixel_values_videos=pixels,
                           video_grid_thw=inputs["video_grid_thw"], compressor_batch_size=args.compressor_batch_size)
            if i:
                best = min(best, now(device) - t0)
    return best


def run_decode_mode(model, prepared, device, mode: str, args, row: dict, answers: dict) -> None:
    """Time one decode mode's answer (after a warm-up) into `row`, its tokens into `answers`."""
    extra = {"cache_implementation": "static"} if mode != "dynamic" else {}
    model.graphed_decoding = GRAPHED_MODES.get(mode, False)
    set_fused_projections(model, mode != "graphed-unfused")
    fast_paths.SPLIT_KV_DECODING = not mode.endswith("-sdpa")
    gemv_kernels.USE_KERNEL = mode != "graphed-cublas"
    release_graphed_decoding(model.plain_decoder())  # a graph kept from another mode would replay it
    # timed without a streamer: it would sync every step (and switch the graphed loop off)
    try:  # warm-up with the same shapes (the static cache's length follows max_new_tokens)
        row[f"warmup_{mode}_s"] = timed_answer(model, prepared, device, args.new_tokens, **extra)[2]  # compiling included
    except Exception as error:  # noqa: BLE001 - a failing mode is a result, not the end of the run
        row[f"error_{mode}"] = f"{type(error).__name__}: {error}"[:2000]
        print(f"decode mode {mode} failed: {row[f'error_{mode}']}", flush=True)
        return
    reset_peak(device)
    first, rate, total, out = timed_answer(model, prepared, device, args.new_tokens, **extra)
    answers[mode] = out
    row[f"prefill_{mode}_s"] = first
    row[f"generate_{mode}_s"] = total
    row[f"decode_{mode}_tokens_per_s"] = rate
    row["generate_peak_gib"] = max(row.get("generate_peak_gib", 0.0), peak_gib(device))
    print(json.dumps({"frames": row["frames"], "mode": mode, "prefill_s": first, "tokens_per_s": rate}), flush=True)
    if mode.startswith("graphed") and args.long_answer:
        _, long_rate, long_total, long_out = timed_answer(model, prepared, device, args.long_answer, **extra)
        row[f"answer_{args.long_answer}_tokens_{mode}_s"] = long_total
        row[f"answer_{args.long_answer}_tokens_{mode}_tokens_per_s"] = long_rate
        row[f"answer_{args.long_answer}_tokens_{mode}_produced"] = int(long_out.shape[1])


def compressor_by_batch_size(model, processor, frames_count, args, device) -> list[dict]:
    """The compressor alone (best of two after a warm-up) and its peak memory at each chunk size."""
    rows = []
    for size in args.compressor_batch_sizes:
        reset_peak(device)
        seconds = compressor_seconds(model, processor, frames_count, argparse.Namespace(**{**vars(args), "compressor_batch_size": size}), device)
        rows.append({"frames": frames_count, "compressor_batch_size": size, "compressor_s": seconds, "peak_gib": peak_gib(device)})
    return rows


def timed_preprocess(model, processor, frames, args, device) -> tuple[dict, float]:
    """The processor's inputs for `frames` on `device` and the seconds it took."""
    t0 = now(device)
    # GPU preprocessing hands the patches back in pinned host memory, in the model's dtype (the vision
    # tower casts to it first thing, so the same function); compress() uploads them chunk by chunk.
    gpu = args.gpu_preprocess and device.type == "cuda"
    inputs = processor(
        text=QUESTION,
        videos=frames,
        video_metadata={"fps": 2.0},
        return_tensors="pt",
        device=device if gpu else None,
        pixel_dtype=model.dtype,
        pixel_device="cpu",
    )
    pixels = inputs.pop("pixel_values_videos")
    inputs = inputs.to(device)
    inputs["pixel_values_videos"] = pixels
    return inputs, now(device) - t0


def stream_frames_to_answer(model, processor, frames, args, device):
    """(seconds, tokens): frames in memory -> answer through `generate_streaming` (the patches stay on
    the GPU, batch by batch) and the default decoding step."""
    t0 = now(device)
    out = generate_streaming(
        model, processor, frames, QUESTION, compressor_batch_size=args.compressor_batch_size,
        load_options={"video_metadata": {"fps": 2.0}, "max_frames": len(frames)},
        visual_token_budget=args.budget, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
        cache_implementation="static",
    )
    return now(device) - t0, out


def time_stream_frames(model, processor, frames, args, device, row: dict, plain_answer) -> None:
    """Best of two frames -> answer runs through `generate_streaming`, after a warm-up."""
    stream_frames_to_answer(model, processor, frames, args, device)
    runs = [stream_frames_to_answer(model, processor, frames, args, device) for _ in range(2)]
    row["stream_frames_end_to_end_s"] = min(seconds for seconds, _ in runs)
    row["stream_frames_same_tokens"] = first_difference(runs[-1][1], plain_answer)


def time_user_idiom(model, processor, frames, args, device, row: dict, plain_answer) -> None:
    """`processor(...)` then `model.generate(**inputs)`, the model-card idiom (text ids handed along
    with the spliced prompt), from frames in memory after a warm-up: its time, peak and tokens."""
    def answer():
        inputs, _ = timed_preprocess(model, processor, frames, args, device)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                cache_implementation="static", visual_token_budget=args.budget,
            )
        return out[:, inputs["input_ids"].shape[1]:]

    answer()
    reset_peak(device)
    t0 = now(device)
    new_tokens = answer()
    row["user_idiom_end_to_end_s"] = now(device) - t0
    row["user_idiom_peak_gib"] = peak_gib(device)
    row["user_idiom_same_tokens"] = first_difference(new_tokens, plain_answer)


def run_workload(model, processor, frames_count, args, device):
    args.frames_for_profile = args.profile or 1024
    h, w = (720, 1280) if not args.tiny else (96, 160)
    gen = torch.Generator().manual_seed(frames_count)
    frames = torch.randint(0, 256, (frames_count, h, w, 3), dtype=torch.uint8, generator=gen)
    if device.type == "cuda":  # in page-locked memory, as load_video(pin_memory=True) decodes them
        frames = frames.pin_memory()
    row = {"frames": frames_count}

    if args.compare_resize:  # the frames resized by F.interpolate on float copies, same run, one pass as below
        frame_geometry.TRITON_RESIZE = False
        try:
            row["preprocess_interpolate_s"] = timed_preprocess(model, processor, frames, args, device)[1]
        finally:
            frame_geometry.TRITON_RESIZE = True
    reset_peak(device)
    inputs, row["preprocess_s"] = timed_preprocess(model, processor, frames, args, device)
    row["preprocess_peak_gib"] = peak_gib(device)
    row["segments"] = int(inputs["video_grid_thw"].shape[0])

    keys = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode():
        # warm-up of every kernel shape on the first workload only costs time once
        reset_peak(device)
        t0 = now(device)
        compress_args = (keys["compressor_input_ids"], keys["compressor_attention_mask"])
        compress_kwargs = {
            "pixel_values_videos": keys["pixel_values_videos"],
            "video_grid_thw": keys["video_grid_thw"],
            "compressor_batch_size": args.compressor_batch_size,
        }
        compressed = model.compress(*compress_args, **compress_kwargs)
        row["compressor_s"] = now(device) - t0
        row["compressor_peak_gib"] = peak_gib(device)

        reset_peak(device)
        t0 = now(device)
        prepared = model.prepare_generation_inputs(**keys, visual_token_budget=args.budget, compressed=compressed)
        row["ata_splice_s"] = now(device) - t0
        row["compress_ata_splice_s"] = row["compressor_s"] + row["ata_splice_s"]
        del compressed
        row["visual_tokens"] = int(prepared.token_allocation.sum())
        row["decoder_len"] = int(prepared.inputs_embeds.shape[1])

        if args.compile_decoder:  # the prefill before and after compile_decoder, same run
            with uncompiled_decoder(model):
                row["prefill_uncompiled_decoder_s"] = min(
                    timed_answer(model, prepared, device, 1, cache_implementation="static")[0] for _ in range(2)
                )
        answers = {}
        for mode in args.decode_modes:
            with uncompiled_decoder(model, mode in UNCOMPILED_DECODER_MODES):
                run_decode_mode(model, prepared, device, mode, args, row, answers)
        fast_paths.SPLIT_KV_DECODING = gemv_kernels.USE_KERNEL = True
        compare_answers(model, prepared, answers, args.decode_modes[0], row)
        model.graphed_decoding = True
        set_fused_projections(model, True)
        best = min(answers, key=lambda m: row[f"generate_{m}_s"])
        row["decode_mode"] = best
        row["prefill_s"] = row[f"prefill_{best}_s"]
        row["prefill_peak_gib"] = row["generate_peak_gib"]
        row["generate_s"] = row[f"generate_{best}_s"]
        row["decode_tokens_per_s"] = row[f"decode_{best}_tokens_per_s"]

        if args.compare_tempo_forward_decode:  # the old decoding path, same prompt, same run
            for mode in args.decode_modes:
                extra = {"cache_implementation": "static"} if mode == "static" else {}
                timed_generate(model, prepared, device, args.new_tokens, via_tempo_forward=True, **extra)
                first, rate, total, old = timed_generate(model, prepared, device, args.new_tokens, via_tempo_forward=True, **extra)
                row[f"tempo_forward_decode_{mode}_tokens_per_s"] = rate
                row[f"tempo_forward_decode_{mode}_same_tokens"] = bool(torch.equal(old[:, -answers[mode].shape[1]:], answers[mode]))
        if args.profile_decode and frames_count == args.frames_for_profile:
            for mode in set(args.decode_modes) - {"dynamic"}:
                with uncompiled_decoder(model, mode in UNCOMPILED_DECODER_MODES):
                    path = profile_decode(model, prepared, device, Path(args.out), args.new_tokens, mode)
                print(f"wrote {path}", flush=True)
        if args.profile_prefill and frames_count == args.frames_for_profile:
            print(f"wrote {profile_prefill(model, prepared, device, Path(args.out))}", flush=True)

        if args.compare_stock:  # the same compressor pass with the stock transformers code paths
            model.model.set_fast_paths(False)
            try:
                model.compress(*compress_args, **compress_kwargs)  # warm-up of its shapes
                t0 = now(device)
                model.compress(*compress_args, **compress_kwargs)
                row["compressor_stock_s"] = now(device) - t0
            finally:
                model.model.set_fast_paths(True)

    if args.stream_frames:
        time_stream_frames(model, processor, frames, args, device, row, answers[best])
    if args.user_idiom:
        time_user_idiom(model, processor, frames, args, device, row, answers[best])
    row["time_to_first_token_s"] = row["compress_ata_splice_s"] + row["prefill_s"]
    row["end_to_end_s"] = row["preprocess_s"] + row["compress_ata_splice_s"] + row["generate_s"]
    row["peak_gib"] = max(row["preprocess_peak_gib"], row["compressor_peak_gib"], row["generate_peak_gib"])
    if args.flops:
        # counted by forward hooks, which do not fire inside compiled modules: count on the eager
        # model (before compile_compressor) when the compressor is compiled
        flops = args.eager_flops.get(frames_count) or compressor_flops(model, keys, args.compressor_batch_size)
        row["compressor_tflop"] = flops / 1e12
        row["compressor_tflops_per_s"] = flops / row["compressor_s"] / 1e12
    return row


def profile_stages(model, processor, frames_count, args, device, out_dir: Path) -> list[Path]:
    """torch.profiler tables (top kernels and ops by device time) of preprocessing and one compressor pass."""
    h, w = (720, 1280) if not args.tiny else (96, 160)
    frames = torch.randint(0, 256, (frames_count, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        frames = frames.pin_memory()
    written = []
    gpu = args.gpu_preprocess and device.type == "cuda"
    options = dict(device=device if gpu else None, pixel_dtype=model.dtype, pixel_device="cpu")
    with device_profile(device) as prof:
        inputs = processor(text=QUESTION, videos=frames, video_metadata={"fps": 2.0}, return_tensors="pt", **options)
        now(device)
    written.append(write_profile(prof, device, out_dir / f"profile-preprocess-{frames_count}.txt", rows=30))
    if args.trace:
        written += write_trace(prof, out_dir / f"trace-preprocess-{frames_count}")
    pixels = inputs.pop("pixel_values_videos")
    inputs = inputs.to(device)
    with torch.inference_mode():
        with device_profile(device) as prof:
            model.compress(
                inputs["compressor_input_ids"], inputs["compressor_attention_mask"], pixel_values_videos=pixels,
                video_grid_thw=inputs["video_grid_thw"], compressor_batch_size=args.compressor_batch_size,
            )
            now(device)
    written.append(write_profile(prof, device, out_dir / f"profile-compressor-{frames_count}.txt", rows=40))
    if args.trace:
        written += write_trace(prof, out_dir / f"trace-compressor-{frames_count}")
    return written


def run_file_workload(model, processor, path, args, device):
    """From a file: decode (CPU threads) -> preprocess (GPU) -> answer; wall time file to answer.

    Decoding uses `load_video`'s automatic number of parallel range decoders (--decode-workers to
    fix it); --compare-decode-workers first decodes the file once with a single decoder, for the
    before/after in the same run. The answer uses the fastest of --decode-modes' caches.
    """
    row = {"file": Path(path).name}
    if args.compare_decode_workers:
        t0 = time.perf_counter()
        one = load_video(path, max_frames=args.max_frames, pin_memory=device.type == "cuda", num_workers=1)
        row["decode_one_worker_s"] = time.perf_counter() - t0
        del one
    t0 = time.perf_counter()
    video = load_video(path, max_frames=args.max_frames, pin_memory=device.type == "cuda", num_workers=args.decode_workers)
    row["decode_s"] = time.perf_counter() - t0
    row["decode_workers"] = int(video.stats.get("workers", 1))
    row["frames"] = int(video.frames.shape[0])
    row["source_frames_decoded"] = int(video.stats.get("decoded_frames", 0))
    row["decode_frames_per_s"] = row["frames"] / row["decode_s"]
    row["decoded_frames_per_s"] = row["source_frames_decoded"] / row["decode_s"]
    def answer() -> dict:
        times = {}
        t1 = now(device)
        gpu = device.type == "cuda"
        inputs = processor(
            text=QUESTION, videos=video, return_tensors="pt", device=device if gpu else None,
            pixel_dtype=model.dtype, pixel_device="cpu",
        )
        pixels = inputs.pop("pixel_values_videos")
        inputs = inputs.to(device)
        times["preprocess_s"] = now(device) - t1
        extra = {"cache_implementation": "static"} if set(args.decode_modes) - {"dynamic"} else {}
        with torch.inference_mode():
            model.generate(**inputs, pixel_values_videos=pixels, max_new_tokens=args.new_tokens,
                           visual_token_budget=args.budget, **extra)
        times["answer_s"] = now(device) - t1
        return times

    row.update(answer())
    row["file_to_answer_s"] = now(device) - t0
    if args.file_repeats > 1:  # the same video again: shapes new to the compiled code were compiled above
        warm = [answer() for _ in range(args.file_repeats - 1)]
        row["answer_warm_s"] = min(t["answer_s"] for t in warm)
        row["preprocess_warm_s"] = min(t["preprocess_s"] for t in warm)
        row["file_to_answer_warm_s"] = row["decode_s"] + row["answer_warm_s"]
    if args.stream:
        row["stream"] = [stream_file_to_answer(model, processor, path, args, device) for _ in range(args.file_repeats)]
    return row


def stream_file_to_answer(model, processor, path, args, device) -> dict:
    """File -> answer with the compressor working while the file decodes (`compress_streaming`)."""
    extra = {"cache_implementation": "static"} if set(args.decode_modes) - {"dynamic"} else {}
    t0 = now(device)
    streamed = compress_streaming(
        model, processor, path, QUESTION, compressor_batch_size=args.compressor_batch_size,
        max_frames=args.max_frames, num_workers=args.decode_workers,
    )
    t1 = now(device)
    text = {k: v for k, v in streamed.inputs.items() if k != "segment_times"}
    with torch.inference_mode():
        prepared = model.prepare_generation_inputs(**text, compressed=streamed.compressed, visual_token_budget=args.budget)
        model.generate(decoder_inputs=prepared, max_new_tokens=args.new_tokens, **extra)
    t2 = now(device)
    stats = streamed.stats
    return {
        "decode_s": stats["decode_s"],
        "decode_frames_per_s": streamed.video.num_frames / stats["decode_s"],
        "decode_workers": int(streamed.video.stats.get("workers", 1)),
        "segments": stats["segments"],
        "compressed_while_decoding": stats["compressed_while_decoding"],
        "compress_after_last_frame_s": t1 - t0 - stats["decode_s"],
        "answer_after_compress_s": t2 - t1,
        "after_last_frame_s": t2 - t0 - stats["decode_s"],
        "file_to_answer_s": t2 - t0,
    }


def markdown(results: dict) -> str:
    lines = [
        f"# Tempo end-to-end benchmark ({results['machine']}, {results['date']}, commit {results['commit']})",
        "",
        f"dtype {results['dtype']}, attention {results['attn']}, budget {results['budget']}, "
        f"{results['new_tokens']} new tokens, compressor batch {results['compressor_batch_size']}, "
        f"bf16 matmul peak measured {results['matmul_peak_tflops']:.0f} TFLOP/s",
        "",
        "| frames | preprocess | compressor | ATA+splice | prefill | TTFT | decode tok/s | end to end | peak GiB | compressor TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    stock = [r for r in results["workloads"] if "compressor_stock_s" in r]
    extra = []
    if stock:
        extra = ["", "Compressor with the stock transformers code paths (same run):", ""]
        extra += [f"- {r['frames']} frames: stock {r['compressor_stock_s']:.3f} s, fast paths {r['compressor_s']:.3f} s "
                  f"({r['compressor_stock_s'] / r['compressor_s']:.2f}x)" for r in stock]
    eager = [r for r in results["workloads"] if "compressor_eager_s" in r]
    if eager:
        extra += ["", "Compressor eager vs torch.compile (same run; the table above is compiled):", ""]
        extra += [f"- {r['frames']} frames: eager {r['compressor_eager_s']:.3f} s, compiled {r['compressor_s']:.3f} s "
                  f"({r['compressor_eager_s'] / r['compressor_s']:.2f}x)" for r in eager]
    for r in results["workloads"]:
        lines.append(
            f"| {r['frames']} | {r['preprocess_s']:.3f} s | {r['compressor_s']:.3f} s | {r['ata_splice_s']:.3f} s | "
            f"{r['prefill_s']:.3f} s | {r['time_to_first_token_s']:.3f} s | {r['decode_tokens_per_s']:.0f} | "
            f"{r['end_to_end_s']:.3f} s | {r['peak_gib']:.1f} | {r.get('compressor_tflops_per_s', 0):.0f} |"
        )
    lines += extra
    for r in results.get("files", []):
        lines.append("")
        lines.append(
            f"From file {Path(r['file']).name}: {r['frames']} frames decoded in {r['decode_s']:.1f} s "
            f"by {r.get('decode_workers', 1)} parallel decoder(s) ({r['decode_frames_per_s']:.1f} sampled frames/s, "
            f"{r['decoded_frames_per_s']:.0f} source frames/s), file to answer {r['file_to_answer_s']:.1f} s"
            + (f"; one decoder: {r['decode_one_worker_s']:.1f} s" if "decode_one_worker_s" in r else "")
            + (f"; answering again (warm): {r['answer_warm_s']:.2f} s, so {r['file_to_answer_warm_s']:.1f} s file to answer"
               if "answer_warm_s" in r else "")
        )
        for k, s in enumerate(r.get("stream", [])):
            lines.append("")
            lines.append(
                f"Streamed (compressor working while the file decodes), run {k + 1}: decoded in {s['decode_s']:.1f} s "
                f"({s['decode_frames_per_s']:.1f} sampled frames/s, {s['decode_workers']} decoder(s)); "
                f"{s['compressed_while_decoding']} of {s['segments']} segments compressed before the last frame; "
                f"last frame to answer {s['after_last_frame_s']:.2f} s (compressor {s['compress_after_last_frame_s']:.2f} s, "
                f"ATA + prefill + {results['new_tokens']} tokens {s['answer_after_compress_s']:.2f} s); "
                f"file to answer {s['file_to_answer_s']:.1f} s"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU (seconds)")
    p.add_argument("--frames", type=int, nargs="+", default=None)
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compressor-batch-size", type=int, default=None)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--gpu-preprocess", action="store_true", help="preprocess frames on the GPU")
    p.add_argument("--long-answer", type=int, default=None, metavar="TOKENS",
                   help="with a graphed decode mode: also time an answer of this many tokens")
    p.add_argument("--decode-modes", nargs="+", default=["dynamic"], choices=["dynamic", "static", *GRAPHED_MODES],
                   help="KV cache for decoding: 'static' is transformers' compiled loop; 'graphed' replays one CUDA graph of the compiled step ('graphed-autotune': compiled with max-autotune), 'graphed-eager' of the eager kernels, 'graphed-unfused' the same without fused projections, 'graphed-cublas' the compiled step with cuBLAS's products instead of the matrix-vector kernel")
    p.add_argument("--split-kv-programs", type=int, default=None, metavar="N",
                   help="split_kv_attention.TARGET_PROGRAMS for the split-KV decoding attention")
    p.add_argument("--compare-resize", action="store_true",
                   help="also time preprocessing with F.interpolate resizing instead of the Triton kernels")
    p.add_argument("--flops", action="store_true", help="count compressor FLOPs (one extra pass)")
    p.add_argument("--compare-tempo-forward-decode", action="store_true",
                   help="also decode through Tempo's own forward (the path before the plain Qwen3 view)")
    p.add_argument("--profile-decode", action="store_true", help="profile static-cache decoding at the --profile size")
    p.add_argument("--profile-prefill", action="store_true", help="profile the prefill alone at the --profile size")
    p.add_argument("--compile-compressor", action="store_true", help="torch.compile the compressor layers first")
    p.add_argument("--compile-decoder", action="store_true",
                   help="with --compile-compressor: also compile the decoder (compile_decoder, as "
                   "enable_compiled_inference does); the prefill is also timed without it")
    p.add_argument("--compressor-batch-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="also time the compressor alone at these chunk sizes (segments per chunk)")
    p.add_argument("--compressor-compile-mode", default=None, metavar="MODE",
                   help="with --compile-compressor: a torch.compile mode, e.g. max-autotune-no-cudagraphs "
                   "(inductor's matmul templates can take the bias, GELU and residual add as epilogues)")
    p.add_argument("--compile-static-shapes", action="store_true",
                   help="with --compile-compressor: specialise on the first shapes (torch.compile's default; "
                   "a new row length recompiles) instead of compiling for any shape")
    p.add_argument("--compare-eager", action="store_true", help="with --compile-compressor: time the eager compressor first")
    p.add_argument("--compare-stock", action="store_true", help="also time the compressor with the stock code paths")
    p.add_argument("--trace", action="store_true",
                   help="with --profile: also write gzipped chrome traces and trace_gaps.py's account of idle GPU time")
    p.add_argument("--profile", type=int, default=None, metavar="FRAMES",
                   help="write a torch.profiler table of one compressor pass at this many frames")
    p.add_argument("--file", default=None, help="also time file -> answer on this video")
    p.add_argument("--long-video-minutes", type=float, default=None,
                   help="generate a 1280x720 30 fps H.264 file this long and time file -> answer on it")
    p.add_argument("--max-frames", type=int, default=1024)
    p.add_argument("--decode-workers", type=int, default=None, help="load_video num_workers (default: automatic)")
    p.add_argument("--compare-decode-workers", action="store_true", help="also decode the file with one decoder")
    p.add_argument("--file-repeats", type=int, default=1, help="answer the decoded file this many times (warm timing)")
    p.add_argument("--stream", action="store_true",
                   help="also answer the file with compression overlapping decoding (--file-repeats times)")
    p.add_argument("--user-idiom", action="store_true",
                   help="also time processor(...) + model.generate(**inputs) from frames in memory, with its peak")
    p.add_argument("--stream-frames", action="store_true",
                   help="also time frames in memory -> answer through generate_streaming")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--machine", default=None)
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = p.parse_args(argv)
    if args.split_kv_programs:
        split_kv_attention.TARGET_PROGRAMS = args.split_kv_programs

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    frames_list = args.frames or ([16, 40] if args.tiny else [256, 512, 1024, 2048, 4096])
    if args.tiny and args.budget == 8192:
        args.budget = 64
    model, processor = build(args.tiny, device, dtype, args.attn)
    eager_compressor = {}
    args.eager_flops = {}
    if args.compile_compressor:  # the eager compressor first, in the same run, for the before/after
        for n in frames_list:
            if args.compare_eager:
                eager_compressor[n] = compressor_seconds(model, processor, n, args, device)
            if args.flops:
                args.eager_flops[n] = compressor_seconds(model, processor, n, args, device, count_flops=True)
        options = {"dynamic": None} if args.compile_static_shapes else {}
        if args.compressor_compile_mode:
            options["mode"] = args.compressor_compile_mode
        model.model.compile_compressor(**options)
        fuse_decoder_projections(model.model.language_model)  # as enable_compiled_inference does
        if args.compile_decoder:
            model.model.compile_decoder()
        t0 = time.perf_counter()
        for n in frames_list:  # compile for every shape before timing (automatic dynamic shapes settle)
            compressor_seconds(model, processor, n, args, device, repeats=1)
        args.compressor_compile_s = time.perf_counter() - t0  # compilation and two passes per size
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = "unknown"
    machine = args.machine or (torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    results = {
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit or commit or "unknown",
        "split_kv_target_programs": split_kv_attention.TARGET_PROGRAMS,
        "compressor_compile_mode": args.compressor_compile_mode,
        "compressor_compile_and_two_passes_s": getattr(args, "compressor_compile_s", None),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn,
        "budget": args.budget,
        "new_tokens": args.new_tokens,
        "compressor_batch_size": args.compressor_batch_size or model.config.compressor_batch_size,
        "matmul_peak_tflops": matmul_peak_tflops(device),
        "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "workloads": [],
    }
    # warm-up: first CUDA calls pay for kernel selection
    warm_up = {"flops": False, "profile_decode": False, "profile_prefill": False}
    first = run_workload(model, processor, frames_list[0], argparse.Namespace(**{**vars(args), **warm_up}), device)
    # each decode mode's first answer in this process: its compilation (and autotuning) included
    results["first_answer_s"] = {key[len("warmup_"):]: value for key, value in first.items() if key.startswith("warmup_")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{'tiny' if args.tiny else 'gpu'}-{results['date'][:10]}"

    def save():  # after every step: a run cut short still leaves what it measured
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stem}.md").write_text(markdown(results))

    for n in frames_list:
        row = run_workload(model, processor, n, args, device)
        if n in eager_compressor:
            row["compressor_eager_s"] = eager_compressor[n]
        results["workloads"].append(row)
        print(json.dumps(row), flush=True)
        save()
    if args.compressor_batch_sizes:
        results["compressor_by_batch_size"] = compressor_by_batch_size(model, processor, frames_list[-1], args, device)
        print(json.dumps(results["compressor_by_batch_size"]), flush=True)
        save()
    if args.profile:
        for path in profile_stages(model, processor, args.profile, args, device, out):
            print(f"wrote {path}", flush=True)
    if args.long_video_minutes and not args.file:
        from transformers_tempo.synthetic import write_long_video

        t0 = time.perf_counter()
        size = (160, 96) if args.tiny else (1280, 720)
        args.file = str(write_long_video(
            Path(os.environ.get("TMPDIR", "/tmp")) / f"tempo-long-{args.long_video_minutes}min.mp4",
            duration=60 * args.long_video_minutes, width=size[0], height=size[1], fps=30,
        ))
        print(f"wrote a {args.long_video_minutes}-minute test video in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.file:
        results["files"] = [run_file_workload(model, processor, args.file, args, device)]
        print(json.dumps(results["files"][0]), flush=True)
        save()

    save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
