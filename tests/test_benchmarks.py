"""The benchmarks' --tiny modes run the GPU benchmarks' own code on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each runs a benchmark script in a fresh process

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_e2e_tiny_with_a_file_answered_plain_and_streamed(tmp_path):
    out = tmp_path / "results"
    run(
        "bench_e2e.py", "--tiny", "--frames", "16", "--long-video-minutes", "0.25", "--stream", "--stream-frames",
        "--user-idiom", "--compressor-batch-size", "1", "--decode-modes", "static", "--out", str(out), "--commit", "test", cwd=tmp_path,
    )
    (result,) = out.glob("e2e-tiny-*.json")
    results = json.loads(result.read_text())
    assert results["commit"] == "test" and results["budget"] == 64
    (row,) = results["workloads"]
    assert row["frames"] == 16 and row["segments"] == 2 and row["visual_tokens"] <= 64
    assert 0 < row["time_to_first_token_s"] <= row["end_to_end_s"]
    # frames in memory through compress_streaming, two one-segment batches: the plain path's tokens
    assert row["stream_frames_end_to_end_s"] > 0 and row["stream_frames_same_tokens"] is None
    # processor + generate(**inputs): the same new tokens as the decoder_inputs path
    assert row["user_idiom_end_to_end_s"] > 0 and row["user_idiom_same_tokens"] is None
    (file_row,) = results["files"]
    assert file_row["frames"] == 40  # 15 s asked, whole 10 s clips written: 20 s at 2 fps
    (streamed,) = file_row["stream"]
    assert streamed["segments"] == 5 and 0 <= streamed["compressed_while_decoding"] <= 5
    assert streamed["after_last_frame_s"] <= streamed["file_to_answer_s"]
    assert abs(streamed["decode_s"] + streamed["after_last_frame_s"] - streamed["file_to_answer_s"]) < 1e-6
    table = result.with_suffix(".md").read_text()
    assert "| 16 |" in table and "Streamed (compressor working while the file decodes), run 1" in table


def test_bench_decode_attention_tiny_formulations_agree(tmp_path):
    path = tmp_path / "attention.json"
    run("bench_decode_attention.py", "--tiny", "--out", str(path), cwd=tmp_path)
    kernels = {k["variant"]: k for k in json.loads(path.read_text())["kernels"]}
    assert {"stock", "gqa_sdpa", "tempo_decode"} <= set(kernels)
    for kernel in kernels.values():  # every formulation computes the float32 reference's attention
        assert kernel["max_abs_err_vs_fp32"] < 1e-4 and kernel["us_per_call"] > 0


def test_bench_batch_tiny_answers_every_video(tmp_path):
    path = tmp_path / "batch.json"
    run("bench_batch.py", "--tiny", "--videos", "6", "--batch-size", "1", "4", "--warmup", "2", "--out", str(path), cwd=tmp_path)
    results = json.loads(path.read_text())
    assert [r["batch_size"] for r in results["runs"]] == [1, 4] and results["warmup_videos"] == 2
    for timed in results["runs"]:
        summary = timed["summary"]
        assert (summary["items"], summary["answered"], summary["failed"], summary["missing"]) == (6, 6, 0, 0)
        assert summary["videos_per_s"] > 0 and timed["sampled_frames_per_video"] > 0


def test_trace_gaps_finds_the_idle_gpu_and_names_the_cpu_op(tmp_path):
    """Two kernels 500 us apart while the CPU sat in aten::item: one gap of 500 us, named."""
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 100, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 90, "dur": 20, "args": {"correlation": 2}},  # overlaps
        {"ph": "X", "cat": "kernel", "name": "gelu", "ts": 610, "dur": 50, "args": {"correlation": 3}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0, "dur": 700},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 105, "dur": 400},
        {"ph": "X", "cat": "cpu_op", "name": "aten::gelu", "ts": 595, "dur": 10},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 600, "dur": 5, "args": {"correlation": 3}},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, str(BENCHMARKS / "trace_gaps.py"), str(trace)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "busy 0.2 ms, idle 0.5 ms; 1 gaps of >= 20 us sum to 0.5 ms" in out.stdout
    assert "aten::item  |  aten::gelu" in out.stdout


def test_eager_logit_margin_after_a_prefix_equals_each_rows_own_unpadded_forward(tiny_model, hand_inputs):
    """bench_e2e's near-tie measure, teacher-forced after a different prefix per row on a left-padded
    batch, equals the top-2 gap and top token of each row run alone without padding."""
    sys.path.insert(0, str(BENCHMARKS))
    import bench_e2e

    x = hand_inputs([3, 5]).model_inputs()
    prefix = torch.randint(0, tiny_model.config.text_config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prepared = tiny_model.prepare_generation_inputs(**x)
        margins, tokens = bench_e2e.eager_logit_margin(tiny_model, prepared, prefix)
        decoder = tiny_model.plain_decoder()
        assert not prepared.attention_mask.bool().all()  # one row is left-padded
        for row in range(2):
            kept = prepared.attention_mask[row].bool()
            embeds = torch.cat([prepared.inputs_embeds[row, kept], decoder.get_input_embeddings()(prefix[row])])
            logits = decoder(inputs_embeds=embeds[None]).logits[0, -1].float()
            top = logits.topk(2)
            assert margins[row].item() == pytest.approx(float(top.values[0] - top.values[1]), abs=1e-4)
            assert tokens[row].item() == int(top.indices[0])


def test_compare_answers_checks_the_first_differing_token_against_the_eager_decoder(tiny_model, hand_inputs):
    """Two modes that share two tokens and then differ: the first difference, and there the eager
    margin after the shared tokens and the one mode whose token the eager decoder picks."""
    sys.path.insert(0, str(BENCHMARKS))
    import bench_e2e

    x = hand_inputs([3, 5]).model_inputs()
    with torch.inference_mode():
        prepared = tiny_model.prepare_generation_inputs(**x)
        shared = torch.tensor([[5, 6], [7, 8]])
        margins, eager = bench_e2e.eager_logit_margin(tiny_model, prepared, shared)
    vocab = tiny_model.config.text_config.vocab_size
    agreeing = torch.cat([shared, eager[:, None], torch.zeros(2, 1, dtype=torch.long)], dim=1)
    other = agreeing.clone()
    other[:, 2] = (eager + 1) % vocab
    row = {}
    bench_e2e.compare_answers(tiny_model, prepared, {"static": agreeing, "graphed": other}, "graphed", row)
    assert row["same_tokens_static_vs_graphed"] == row["same_tokens_graphed_vs_static"] == 2
    assert row["eager_logit_margin_at_token_2"] == pytest.approx(float(margins.min()))
    assert row["eager_agrees_at_token_2"] == ["static"]
