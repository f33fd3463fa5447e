"""How long converting a real-size (Tempo-6B) checkpoint takes, with random weights, on this machine (CPU).

    python benchmarks/bench_conversion.py                    # work folder /tmp/tempo-conversion-bench, deleted after
    python benchmarks/bench_conversion.py --keep --workdir /data/bench --shard-gb 4

Steps:
1. writes a random bfloat16 checkpoint in the released layout (the key names, shapes and dtype of
   Vision-CAIR/Tempo-6B: ``TempoConfig.tempo_6b()``, ~6.2B parameters, ~12.3 GB) shard by shard, with
   an index, a released-style config.json and a tokenizer; and a base "Qwen3-VL-2B-Instruct" folder with
   the real config and a random embedding matrix (the only tensor the conversion reads from it);
2. runs the conversion in a child process (so its peak memory is its own) and reports wall time per
   step, peak resident memory and output size;
3. deletes everything (unless ``--keep``).

The tokenizer is the tiny offline test tokenizer (no Hub access): its ids are valid rows of the real
vocabulary, which is all the conversion needs from it. Timings depend on the disk and on the page cache
(the checkpoint was just written, so part of it may still be cached when it is read back).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetensors.torch import save_file  # noqa: E402

from transformers_tempo import TempoConfig, TempoForConditionalGeneration  # noqa: E402
from transformers_tempo.configuration_tempo import QWEN3_VL_2B_INSTRUCT  # noqa: E402
from transformers_tempo.conversion import KEY_RULES  # noqa: E402
from transformers_tempo.testing_utils import build_tiny_tokenizer  # noqa: E402

def released_layout(config: TempoConfig) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = TempoForConditionalGeneration(config)
    out = []
    for key, tensor in model.state_dict().items():
        if key in ("lm_head.weight", "model.relevance_head.weight"):
            continue
        shape = (1, *tensor.shape) if key == "model.memory_tokens" else tuple(tensor.shape)
        # the converter's rules read backwards (first match: the mlp2x projector's released names)
        for theirs, ours in KEY_RULES:
            if key.startswith(ours):
                out.append((theirs + key[len(ours) :], shape))
                break
        else:
            raise AssertionError(key)
    return out


def write_random_checkpoint(folder: Path, base: Path, shard_bytes: int, seed: int = 0) -> dict:
    config = TempoConfig.tempo_6b()
    layout = released_layout(config)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size = [], [], 0
    for key, shape in layout:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    started = time.perf_counter()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for key, shape in shard}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key, _ in shard})
        del tensors
        print(f"  wrote {name} ({len(shard)} tensors)", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    text = config.text_config
    released = {
        "architectures": ["TempoQwenForCausalLM"],
        "model_type": "tempo_qwen",
        **{k: getattr(text, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id")},
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "mm_vision_tower_aux_list": [str(base)],
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 2048,
        "num_compression_tokens": 128,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": 32768,
    }
    (folder / "config.json").write_text(json.dumps(released, indent=2))
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(folder)

    base.mkdir(parents=True)
    from transformers import Qwen3VLConfig

    Qwen3VLConfig(**{k: v for k, v in QWEN3_VL_2B_INSTRUCT.items() if k != "model_type"}).save_pretrained(base)
    embed = (torch.randn(151936, 2048, generator=gen) * 0.02).to(torch.bfloat16)
    save_file({"model.language_model.embed_tokens.weight": embed}, str(base / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(base)
    return {"tensors": len(layout), "bytes": total, "shards": len(shards), "seconds": time.perf_counter() - started}


def convert_child(args) -> None:
    """Run in a child process: convert and print one JSON line with the report and peak memory."""
    from transformers_tempo.conversion import convert_tempo_checkpoint

    report = convert_tempo_checkpoint(args.tempo, args.base, args.out, max_shard_size=args.max_shard_size,
                                      progress=lambda s: print(f"    {s}", file=sys.stderr, flush=True))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": report.seconds, "steps": report.step_seconds, "peak_rss_gb": peak_kb / 2**20,
                      "parameters": report.num_parameters, "files": report.files, "summary": report.summary()}))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tempo-conversion-bench")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="shard size of the generated released checkpoint")
    parser.add_argument("--max_shard_size", default="5GB", help="shard size of the converted output")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted folders")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--child", nargs=3, metavar=("TEMPO", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.tempo, args.base, args.out = args.child
        convert_child(args)
        return 0

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    tempo, base, out = work / "Tempo-6B", work / "Qwen3-VL-2B-Instruct", work / "tempo-6b-hf"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    free_disk = shutil.disk_usage(work.parent).free / 2**30
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {mem_gb:.1f} GiB RAM, {free_disk:.0f} GiB free disk")
    try:
        print(f"1. writing a random released-layout checkpoint to {tempo}")
        made = write_random_checkpoint(tempo, base, int(args.shard_gb * 2**30))
        print(f"   {made['tensors']} tensors, {made['bytes'] / 2**30:.2f} GiB in {made['shards']} shards, "
              f"{made['seconds']:.0f} s")
        print("2. converting (child process)")
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--max_shard_size", args.max_shard_size, "--child",
                              str(tempo), str(base), str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - started
        sys.stderr.write(run.stderr[-4000:])
        if run.returncode != 0:
            print(f"conversion failed (exit {run.returncode}); a kill by the kernel (-9) means it ran out of memory")
            return 1
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result.update({"process_wall_seconds": wall, "input_gib": made["bytes"] / 2**30,
                       "output_gib": folder_bytes(out) / 2**30, "machine": platform.node(), "cores": os.cpu_count(),
                       "ram_gib": mem_gb, "torch": torch.__version__})
        print(result.pop("summary"))
        print(f"conversion: {result['seconds']:.0f} s inside convert_tempo_checkpoint, {wall:.0f} s for the process "
              f"(imports included); peak RSS {result['peak_rss_gb']:.1f} GiB; "
              f"{result['input_gib']:.2f} GiB in, {result['output_gib']:.2f} GiB out")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"deleted {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
