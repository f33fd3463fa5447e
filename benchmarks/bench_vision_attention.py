"""Time the compressor's vision attention block (qkv product, float32 rotary, grouped attention,
output product) at Tempo-6B's sizes under torch.compile, in a few formulations of the same function.

Why: in a profile of the compiled compressor at 1024 frames on an H200, the kernel that inductor
makes of the rotary embedding plus the copy into the attention's layout took 61 ms (636 us per
call, about 1.2 TB/s for the 0.8 GB it moves), next to 78 ms of attention itself. The variants:

* ``current``: `fast_paths.TempoVisionAttention`'s formulation (rotary on (N, heads, d), then
  (groups, heads, group, d) views for sdpa; the backend is torch's choice).
* ``rotary-in-layout``: the views first, the rotary on them, so the elementwise kernel writes in the
  order sdpa reads.
* ``rotary-halves`` / ``rotary-halves-stack``: the rotary half by half (the same float32 operations
  per element, no negated copy), joined by a concatenation or a stack.
* ``flash`` / ``cudnn`` / ``efficient``: ``current`` with that sdpa backend forced.

Each is compiled, warmed up, then timed with CUDA events (median of `--repeats`). The outputs are
compared with ``current`` (max abs difference). One chunk of 32 segments of 720p video by default:
65,536 patches in 128 groups of 512.

    python benchmarks/bench_vision_attention.py --out benchmarks/results/vision-attention-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary(x, cos, sin):
    """float32 rotary, back to the input dtype (the vision tower's)."""
    return ((x.float() * cos) + (rotate_half(x.float()) * sin)).to(x.dtype)


def rotary_halves(x, cos, sin, stack=False):
    """`rotary` computed half by half (the same float32 operations on each element: first half
    x1*c - x2*s, second half x2*c + x1*s), without the negated copy that `rotate_half` makes."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    halves = (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)
    out = torch.stack(halves, dim=-2).flatten(-2) if stack else torch.cat(halves, dim=-1)
    return out.to(x.dtype)


def current(x, w, b, pw, pb, cos, sin, heads, group, backend=None, rotate=rotary):
    n = x.shape[0]
    q, k, v = F.linear(x, w, b).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotate(q, cos.unsqueeze(-2), sin.unsqueeze(-2)), rotate(k, cos.unsqueeze(-2), sin.unsqueeze(-2))
    q, k, v = (t.reshape(n // group, group, heads, -1).transpose(1, 2) for t in (q, k, v))
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(n, -1), pw, pb)


def rotary_in_layout(x, w, b, pw, pb, cos, sin, heads, group):
    n = x.shape[0]
    qkv = F.linear(x, w, b).reshape(n // group, group, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (groups, heads, group, d) views
    cos, sin = (t.reshape(n // group, 1, group, -1) for t in (cos, sin))
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(n, -1), pw, pb)


VARIANTS = {
    "current": lambda *a: current(*a),
    "rotary-in-layout": rotary_in_layout,
    "rotary-halves": lambda *a: current(*a, rotate=rotary_halves),
    "rotary-halves-stack": lambda *a: current(*a, rotate=lambda x, c, s: rotary_halves(x, c, s, stack=True)),
    "flash": lambda *a: current(*a, backend=SDPBackend.FLASH_ATTENTION),
    "cudnn": lambda *a: current(*a, backend=SDPBackend.CUDNN_ATTENTION),
    "efficient": lambda *a: current(*a, backend=SDPBackend.EFFICIENT_ATTENTION),
}


def time_ms(fn, args, repeats: int) -> float:
    """Median time of one call: CUDA events on a GPU, the wall clock on the CPU."""
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=65536)
    p.add_argument("--group", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke test
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    d = args.hidden // args.heads
    x = torch.randn(args.patches, args.hidden, device=device, dtype=dtype)
    w = torch.randn(3 * args.hidden, args.hidden, device=device, dtype=dtype) * args.hidden**-0.5
    b = torch.randn(3 * args.hidden, device=device, dtype=dtype) * 0.02
    pw = torch.randn(args.hidden, args.hidden, device=device, dtype=dtype) * args.hidden**-0.5
    pb = torch.zeros(args.hidden, device=device, dtype=dtype)
    angles = torch.rand(args.patches, d // 2, device=device) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    inputs = (x, w, b, pw, pb, cos, sin, args.heads, args.group)
    rows, reference = [], None
    with torch.inference_mode():
        for name in args.variants:
            fn = torch.compile(VARIANTS[name], dynamic=False)
            try:
                out = fn(*inputs)
                for _ in range(3):
                    fn(*inputs)
                ms = time_ms(fn, inputs, args.repeats)
            except Exception as error:  # noqa: BLE001 - a backend that does not run is a result
                rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:500]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            reference = out if reference is None else reference
            rows.append({"variant": name, "ms": ms, "max_abs_diff_vs_first": float((out - reference).abs().max())})
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
