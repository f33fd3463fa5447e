"""Matrix-vector products of one decoding step: cuBLAS (`F.linear`) against Triton row-block kernels.

At batch 1 each decoder product reads its weight once; the H200's memory (about 4.8 TB/s) sets the
floor. A profile of the graphed step showed the four products per layer at about 3.2 TB/s. This
times each Tempo-6B decoder shape (fused q/k/v, o, fused gate/up, down, and the head) for
36 distinct weights (one per layer, so the GPU's L2 cache holds none of them between calls),
replayed from a CUDA graph, and reports microseconds per product and the bytes read per second.

    python benchmarks/bench_gemv.py --out benchmarks/results/gemv-h200.json
    python benchmarks/bench_gemv.py --rows 4 8 --shapes gate_up down --out gemv-rows.json

`--narrow` adds settings with 1-2 rows per program and 2048-wide tiles for the outputs of at most 4096
rows (down and o, the slowest per byte). `--rows` also times batch sizes above one, where the
package keeps cuBLAS: `F.linear` against a candidate Triton kernel that reads each weight tile once
for all rows (a `tl.dot` with the rows padded to 16), to see whether batched decoding
(`tempo batch --batch-size 4`) has a gap worth closing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from transformers_tempo.gemv_kernels import gemv, launch_gemv  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the candidate below needs it; the benchmark needs a GPU anyway
    triton = None

SHAPES = {  # name: (out_features, in_features) of the Tempo-6B decoder (Qwen3-4B)
    "qkv": (6144, 2560),
    "o": (2560, 4096),
    "gate_up": (19456, 2560),
    "down": (2560, 9728),
    "head": (151936, 2560),
}
CONFIGS = [
    dict(block_n=bn, block_k=bk, num_warps=w, num_stages=s)
    for bn, bk, w, s in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3))
    if bn * bk <= 8192
]

NARROW_CONFIGS = [
    dict(block_n=bn, block_k=bk, num_warps=w, num_stages=3)
    for bn, bk, w in itertools.product((1, 2), (1024, 2048), (4, 8))
]
ROWS_CONFIGS = [
    dict(block_n=bn, block_k=bk, num_warps=4, num_stages=s)
    for bn, bk, s in itertools.product((16, 32, 64), (128, 256), (3, 4))
]


def skinny_linear(x, weight, out, block_n=32, block_k=128, num_warps=4, num_stages=3):
    """Candidate for a few input rows: `F.linear(x, weight)` for x of at most 16 rows, each weight
    tile read once for all of them."""
    rows, k = x.shape
    n = weight.shape[0]
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, rows, n, weight.stride(0), K=k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


if triton is not None:

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, rows, n, w_row_stride, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ins = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + ins[:, None] * K + ks[None, :], mask=(ins[:, None] < rows) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + outs[None, :] * w_row_stride + ks[:, None], mask=(outs[None, :] < n) & (ks[:, None] < K), other=0.0)
            acc += tl.dot(x, w)
        mask = (ins[:, None] < rows) & (outs[None, :] < n)
        tl.store(out_ptr + ins[:, None] * n + outs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def time_graph(fn, repeats: int = 20) -> float:
    """Milliseconds per replay of a CUDA graph of `fn`, best of `repeats`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def setup(n: int, k: int, rows: int, layers: int, seed: int):
    """`layers` distinct (n, k) bf16 weights, an input of `rows` rows, an output buffer, the float32
    product with the first weight, and `per_product(ms)`: a graph's milliseconds as us and TB/s."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5 for _ in range(layers)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    megabytes = n * k * 2 / 1e6

    def per_product(ms: float) -> dict:
        us = ms * 1000 / layers
        return {"us": round(us, 2), "tb_per_s": round(megabytes / us, 3)}

    return weights, x, out, F.linear(x.float(), weights[0].float()), per_product


def sweep(kernel, configs, weights, x, out, expected, per_product) -> list[dict]:
    """Each setting of `kernel(x, weight, out, **setting)`: its time and error, fastest first."""
    rows = []
    for config in configs:
        got = kernel(x, weights[0], out, **config).float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        ms = time_graph(lambda: [kernel(x, w, out, **config) for w in weights])
        rows.append({**config, **per_product(ms), "rel_error": round(error, 5)})
    return sorted(rows, key=lambda r: r["us"])


def bench_shape(name: str, n: int, k: int, layers: int, configs: list[dict]) -> dict:
    weights, x, out, expected, per_product = setup(n, k, 1, layers, seed=0)
    result = {"shape": [n, k], "megabytes": round(n * k * 2 / 1e6, 1), "layers": layers}
    result["cublas"] = per_product(time_graph(lambda: [F.linear(x, w) for w in weights]))
    # Inductor's own kernel for the product, as the autotuned decoding step compiles it.
    inductor = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    result["inductor_autotune"] = per_product(time_graph(lambda: [inductor(x, w) for w in weights]))
    triton_rows = sweep(launch_gemv, configs, weights, x, out, expected, per_product)
    result["triton_best"] = triton_rows[:5]
    result["triton_default"] = per_product(time_graph(lambda: [gemv(x, w) for w in weights]))  # kernel_settings
    print(f"{name:8s} {result['megabytes']:7.1f} MB  cublas {result['cublas']}  inductor {result['inductor_autotune']}  "
          f"triton best {triton_rows[0]}  default {result['triton_default']}", flush=True)
    return result


def bench_rows(name: str, n: int, k: int, rows: int, layers: int) -> dict:
    """cuBLAS against the skinny candidate for `rows` input rows (batched decoding)."""
    weights, x, out, expected, per_product = setup(n, k, rows, layers, seed=1)
    result = {"rows": rows, "cublas": per_product(time_graph(lambda: [F.linear(x, w) for w in weights]))}
    result["skinny_best"] = sweep(skinny_linear, ROWS_CONFIGS, weights, x, out, expected, per_product)[:3]
    print(f"{name:8s} rows {rows}: cublas {result['cublas']}  skinny best {result['skinny_best'][0]}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["gate_up", "down", "qkv", "o", "head"])
    p.add_argument("--narrow", action="store_true", help="more settings for outputs of at most 4096 rows")
    p.add_argument("--rows", type=int, nargs="*", default=[], help="also time these batch sizes (at most 16)")
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default="")
    args = p.parse_args()
    report = {"machine": torch.cuda.get_device_name(), "commit": args.commit, "shapes": {}}
    for name in args.shapes:
        n, k = SHAPES[name]
        layers = 4 if name == "head" else 36
        configs = CONFIGS + (NARROW_CONFIGS if args.narrow and n <= 4096 else [])
        report["shapes"][name] = bench_shape(name, n, k, layers, configs)
        report["shapes"][name]["batched"] = [bench_rows(name, n, k, rows, layers) for rows in args.rows]
        if args.out:  # after each shape, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
