"""Decode once, encode once, answer many: the video cache and its users."""

import json
import os

import pytest
import torch

from transformers_tempo import video_cache, video_loading
from transformers_tempo.synthetic import write_test_video
from transformers_tempo.video_cache import LRUByteCache, VideoCache, configure_video_cache, default_video_cache

QUESTIONS = ["What colour is the video?", "What happens?", "Who scores after the goal?"]


@pytest.fixture
def clip(tmp_path):
    return write_test_video(tmp_path / "clip.mp4", num_frames=60, fps=10, width=128, height=96)  # 12 frames


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    original = video_loading.load_video

    def counting(video, **kwargs):
        calls.append(video)
        return original(video, **kwargs)

    monkeypatch.setattr(video_loading, "load_video", counting)
    return calls


@pytest.fixture(autouse=True)
def fresh_default_cache():
    configure_video_cache(enabled=True)
    default_video_cache().clear()
    yield
    default_video_cache().clear()


# ------------------------------------------------------------------ the LRU
def test_lru_evicts_the_least_recently_used_past_its_byte_limit():
    cache = LRUByteCache(max_bytes=100)
    assert cache.put("a", "A", nbytes=40) and cache.put("b", "B", nbytes=40)
    assert cache.get("a") == "A"  # "a" is now the most recent
    cache.put("c", "C", nbytes=40)  # 120 > 100: the oldest, "b", goes
    assert "b" not in cache and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.nbytes == 80 and cache.evictions == 1
    assert not cache.put("huge", "H", nbytes=101) and "huge" not in cache  # larger than the limit alone
    assert cache.get("b") is None and cache.stats()["misses"] == 1 and cache.stats()["hits"] == 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_tensor_bytes_counts_nested_tensors():
    value = {"a": torch.zeros(10, dtype=torch.float32), "b": [torch.zeros(4, dtype=torch.uint8)] * 2}
    assert video_cache.tensor_bytes(value) == 10 * 4 + 2 * 4


def test_configure_drops_entries_over_a_new_limit():
    cache = configure_video_cache()
    cache.frames.put("old", 1, nbytes=300)
    cache.frames.put("new", 2, nbytes=300)
    configure_video_cache(max_host_bytes=400)
    assert "old" not in cache.frames and "new" in cache.frames
    configure_video_cache(max_host_bytes=video_cache.DEFAULT_MAX_HOST_BYTES)


# ------------------------------------------------------------------ keys
def test_frame_keys_follow_the_file_and_the_options_that_change_frames(clip, tmp_path):
    cache = VideoCache()
    key = cache.frames_key(str(clip), {"fps": 2.0})
    assert key == cache.frames_key(clip, {"fps": 2.0, "num_workers": 4, "progress": True})  # speed only
    assert key != cache.frames_key(str(clip), {"fps": 1.0})
    assert key != cache.frames_key(str(clip), {"fps": 2.0, "max_longer_edge": 64})
    data = clip.read_bytes()
    assert cache.frames_key(data, {}) == cache.frames_key(bytearray(data), {})
    assert cache.frames_key(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), {}) is None  # frames in memory
    assert cache.frames_key(str(tmp_path / "missing.mp4"), {}) is None  # the loader reports it
    write_test_video(clip, num_frames=40, fps=10, width=128, height=96)  # rewritten: another video
    os.utime(clip, ns=(1, 1))
    assert cache.frames_key(str(clip), {"fps": 2.0}) != key
    assert VideoCache(enabled=False).frames_key(str(clip), {}) is None
    from transformers.video_utils import VideoMetadata  # an unhashable option still makes a key

    assert cache.frames_key(str(clip), {"video_metadata": VideoMetadata(total_num_frames=4, fps=2.0)}) is not None


# ------------------------------------------------------------------ decoding once
def test_a_file_is_decoded_once_per_options(clip, count_decodes):
    cache = VideoCache()
    first = cache.load_video(str(clip), fps=2.0)
    again = cache.load_video(str(clip), fps=2.0, num_workers=1)
    assert again is first and len(count_decodes) == 1
    other = cache.load_video(str(clip), fps=1.0)
    assert other.num_frames == 8 and first.num_frames == 12 and len(count_decodes) == 2  # 6 s at 1 fps, min 8


def test_turned_off_it_decodes_every_time(clip, count_decodes):
    cache = VideoCache(enabled=False)
    cache.load_video(str(clip))
    cache.load_video(str(clip))
    assert len(count_decodes) == 2 and len(cache.frames) == 0


def test_processor_decodes_and_processes_a_shared_video_once(processor, clip, count_decodes):
    out = processor(text=QUESTIONS[:2], videos=[str(clip), str(clip)])
    assert len(count_decodes) == 1
    rows = out["video_grid_thw"].shape[0] // 2
    half = out["pixel_values_videos"].shape[0] // 2
    assert rows == 2 and torch.equal(out["pixel_values_videos"][:half], out["pixel_values_videos"][half:])
    processor(text=QUESTIONS[2], videos=str(clip))  # a later call: still no new decode
    assert len(count_decodes) == 1


# ------------------------------------------------------------------ encoding once
def test_reused_vision_features_give_the_uncached_answer_bit_for_bit(tiny_model, processor, clip):
    inputs = processor(text=QUESTIONS[0], videos=str(clip))
    inputs.pop("segment_times")
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        plain = tiny_model.generate(**inputs, **kw)
        features = tiny_model.encode_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        reused = tiny_model.generate(**inputs, video_features=features, **kw)
    assert len(features) == inputs["video_grid_thw"].shape[0]
    assert torch.equal(reused.sequences, plain.sequences)
    assert torch.equal(reused.relevance_scores, plain.relevance_scores)
    assert all(torch.equal(a, b) for a, b in zip(reused.logits, plain.logits))
    with pytest.raises(ValueError, match="video_features cover 1 segments but the compressor rows hold 2"):
        tiny_model.generate(**inputs, video_features=features.rows(0, 1), max_new_tokens=1)


def test_features_key_changes_when_the_weights_change(tokenizer):
    from transformers_tempo.testing_utils import build_tiny_model

    model = build_tiny_model(tokenizer)
    cache = VideoCache()
    with torch.no_grad():
        key = cache.features_key(("file", "x"), model, {"dtype": torch.float32})
        assert key == cache.features_key(("file", "x"), model, {"dtype": torch.float32})
        assert key != cache.features_key(("file", "x"), model, {"dtype": torch.bfloat16})
        next(model.model.compressor.visual.parameters()).add_(1.0)  # a training step, in place
        assert cache.features_key(("file", "x"), model, {"dtype": torch.float32}) != key
    assert cache.features_key(("file", "x"), model, {}) is None  # gradients on: nothing is cached
    model.train()
    with torch.no_grad():
        assert cache.features_key(("file", "x"), model, {}) is None


# ------------------------------------------------------------------ many questions, one video
@pytest.fixture(scope="module")
def vqa(tiny_model_dir):
    from transformers import pipeline

    import transformers_tempo  # noqa: F401  (registers the task)

    return pipeline("video-question-answering", model=str(tiny_model_dir), device="cpu")


@pytest.fixture
def processor(tokenizer):
    from transformers_tempo import TempoProcessor, TempoVideoProcessor

    return TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)


def test_pipeline_answers_several_questions_with_one_decode_and_one_vision_pass(vqa, clip, count_decodes, monkeypatch):
    encodes = []
    original = vqa.model.encode_video_features
    monkeypatch.setattr(vqa.model, "encode_video_features", lambda *a, **k: encodes.append(1) or original(*a, **k))
    many = vqa(video=str(clip), question=QUESTIONS, max_new_tokens=4, visual_token_budget=20)
    assert len(many) == 3 and len(count_decodes) == 1 and len(encodes) == 1
    again = vqa(video=str(clip), question=QUESTIONS[1], max_new_tokens=4, visual_token_budget=20)
    assert len(count_decodes) == 1 and len(encodes) == 1  # a later question: both from the cache
    assert again["answer"] == many[1]["answer"]

    configure_video_cache(enabled=False)  # the uncached path, one question at a time
    for result, question in zip(many, QUESTIONS):
        alone = vqa(video=str(clip), question=question, max_new_tokens=4, visual_token_budget=20)
        assert result["answer"] == alone["answer"]
        assert [d["kept_tokens"] for d in result["segment_details"]] == [d["kept_tokens"] for d in alone["segment_details"]]
        assert [d["relevance"] for d in result["segment_details"]] == [d["relevance"] for d in alone["segment_details"]]
    assert len(count_decodes) == 4


def test_batched_questions_about_one_video_equal_one_at_a_time(vqa, clip):
    batched = vqa(video=str(clip), question=QUESTIONS, batch_size=3, max_new_tokens=4)
    singles = [vqa(video=str(clip), question=q, max_new_tokens=4) for q in QUESTIONS]
    assert [b["answer"] for b in batched] == [s["answer"] for s in singles]
    for b, s in zip(batched, singles):
        assert [d["kept_tokens"] for d in b["segment_details"]] == [d["kept_tokens"] for d in s["segment_details"]]
        # the compressor's language model runs three rows together here: float32 rounding only
        relevance = [d["relevance"] for d in s["segment_details"]]
        assert [d["relevance"] for d in b["segment_details"]] == pytest.approx(relevance, abs=1e-6)


def test_bench_questions_tiny_decodes_each_file_once(tmp_path):
    """The GPU benchmark's own code on the CPU: with the cache on, each file is decoded and encoded
    once and every later question is a hit."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_questions.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--workdir", str(tmp_path / "videos"), "--out", str(tmp_path),
         "--commit", "test"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("questions-tiny-*.json")
    results = json.loads(result.read_text())
    on = results["cache_on"]
    assert results["cache_off"]["questions"] == 2 and on["questions"] == 6 and on["files"] == 2
    assert on["cache"]["frames"]["entries"] == 2 and on["cache"]["features"]["entries"] == 2
    # the cache's counters run over the process: the warm-up and cache-off runs missed, the 4 later questions hit
    assert on["cache"]["features"]["hits"] >= 4
    assert "| cache_on | auto | 6 |" in result.with_suffix(".md").read_text()


def test_tempo_ask_several_questions_decodes_and_encodes_once(tiny_model_dir, vqa, clip, count_decodes, monkeypatch, capsys):
    from transformers_tempo import cli
    from transformers_tempo.modeling_tempo import TempoForConditionalGeneration

    encodes = []
    original = TempoForConditionalGeneration.encode_video_features
    monkeypatch.setattr(
        TempoForConditionalGeneration, "encode_video_features",
        lambda self, *a, **k: encodes.append(1) or original(self, *a, **k),
    )
    args = ["ask", str(clip), QUESTIONS[0], "-q", QUESTIONS[1], "-q", QUESTIONS[2], "--model", str(tiny_model_dir),
            "--json", "--max-new-tokens", "3", "--budget", "20"]  # fmt: skip
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["question"] for line in lines] == QUESTIONS  # one JSON object per question, in order
    assert len(count_decodes) == 1 and len(encodes) == 1
    assert lines[0]["timings"]["decode"] > 0 and lines[1]["timings"]["decode"] == 0.0
    configure_video_cache(enabled=False)
    for line, question in zip(lines, QUESTIONS):  # the same answers as one question at a time, uncached
        alone = vqa(video=str(clip), question=question, max_new_tokens=3, visual_token_budget=20)
        assert line["answer"] == alone["answer"] and line["visual_tokens"] == alone["visual_tokens"]
