"""Where the GPU sat idle in a torch.profiler chrome trace, and what the CPU was doing then.

    python benchmarks/trace_gaps.py trace.json.gz [--min-us 20] [--top 25]

Merges every kernel, copy and memset (all streams) into busy intervals; each idle stretch of at
least --min-us between them is a gap. For each gap it names the innermost CPU op running (on any
thread) when the GPU went idle, and the CPU op that launched the work ending the gap, so a
sync (`aten::item`, `aten::nonzero`, `cudaStreamSynchronize`) or a stretch of Python between
launches shows by name. Prints the total, the gaps grouped by those two names, and the longest.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def busy_intervals(gpu: list[dict]) -> list[tuple[float, float, dict]]:
    """GPU events merged across streams: (start, end, the event that opened the interval)."""
    merged = []
    for event in sorted(gpu, key=lambda e: e["ts"]):
        start, end = event["ts"], event["ts"] + event["dur"]
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end), merged[-1][2])
        else:
            merged.append((start, end, event))
    return merged


def innermost_op(cpu_ops: list[dict], starts: list[float], time: float) -> str:
    """The shortest CPU op that spans `time` (looked up among ops starting before it)."""
    best = None
    for op in reversed(cpu_ops[max(0, bisect.bisect_right(starts, time) - 400) : bisect.bisect_right(starts, time)]):
        if op["ts"] + op["dur"] >= time and (best is None or op["dur"] < best["dur"]):
            best = op
    return best["name"] if best else "(no CPU op: Python between launches)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    events = load_events(args.trace)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    cpu_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "python_function")),
                     key=lambda e: e["ts"])
    starts = [op["ts"] for op in cpu_ops]
    launching_ops = [op for op in cpu_ops if op.get("cat") != "cuda_runtime"]  # the op around a launch
    launching_starts = [op["ts"] for op in launching_ops]
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "args" in e}
    merged = busy_intervals(gpu)
    if not merged:
        print("no GPU work in this trace")
        return
    busy = sum(end - start for start, end, _ in merged)
    span = merged[-1][1] - merged[0][0]
    gaps = []
    for (_, idle_from, _), (idle_to, _, opener) in zip(merged, merged[1:]):
        if idle_to - idle_from >= args.min_us:
            launch = launches.get(opener.get("args", {}).get("correlation"))
            ended_by = innermost_op(launching_ops, launching_starts, launch["ts"]) if launch else "?"
            gaps.append((idle_to - idle_from, innermost_op(cpu_ops, starts, idle_from), ended_by, opener["name"]))
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms; "
          f"{len(gaps)} gaps of >= {args.min_us:g} us sum to {sum(g[0] for g in gaps) / 1e3:.1f} ms")
    grouped = collections.Counter()
    counts = collections.Counter()
    for length, idle_at, ended_by, _ in gaps:
        grouped[(idle_at[:60], ended_by[:60])] += length
        counts[(idle_at[:60], ended_by[:60])] += 1
    print("\nms  count  CPU op when the GPU went idle  |  CPU op that launched the next work")
    for key, total in grouped.most_common(args.top):
        print(f"{total / 1e3:7.2f} {counts[key]:5d}  {key[0]}  |  {key[1]}")
    print("\nlongest gaps (us, idle at, ended by, next GPU work):")
    for gap in sorted(gaps, reverse=True)[: args.top]:
        print(f"{gap[0]:9.0f}  {gap[1][:50]}  |  {gap[2][:50]}  |  {gap[3][:60]}")


if __name__ == "__main__":
    main()
