import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import pipeline

import transformers_tempo  # noqa: F401  (registers the task)
from transformers_tempo import TempoProcessor, VideoQuestionAnsweringPipeline
from transformers_tempo.synthetic import write_test_video


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    short, longer = root / "short.mp4", root / "longer.mp4"
    write_test_video(short, num_frames=60, fps=10, width=128, height=96)  # 6 s -> 12 frames -> 2 segments
    write_test_video(longer, num_frames=200, fps=10, width=128, height=96)  # 20 s -> 40 frames -> 5 segments
    return short, longer


@pytest.fixture(scope="module")
def vqa(model_dir):
    return pipeline("video-question-answering", model=str(model_dir))


def test_pipeline_task_resolves_to_tempo(vqa):
    assert isinstance(vqa, VideoQuestionAnsweringPipeline)
    assert isinstance(vqa.processor, TempoProcessor)


def test_single_answer_and_facts_match_the_model(vqa, videos):
    out = vqa(video=str(videos[1]), question="What colour is the video?", max_new_tokens=4)
    assert isinstance(out["answer"], str)
    assert out["sampled_frames"] == 40 and out["segments"] == 5
    assert out["real_fps"] == pytest.approx(2.0)
    details = out["segment_details"]
    assert [d["start"] for d in details] == pytest.approx([0, 4, 8, 12, 16])
    assert [d["end"] for d in details] == pytest.approx([4, 8, 12, 16, 20])
    assert out["visual_tokens"] == sum(d["kept_tokens"] for d in details)
    assert out["tokens_per_frame"] == pytest.approx(out["visual_tokens"] / 40)
    # the same allocation as the model computes from the processor's inputs
    inputs = vqa.processor(text="What colour is the video?", videos=str(videos[1]), return_tensors="pt")
    with torch.no_grad():
        model_out = vqa.model(**inputs.to(vqa.model.device))  # the pipeline's device: a GPU where there is one
    assert [d["kept_tokens"] for d in details] == model_out.token_allocation.tolist()
    # on a GPU the pipeline resizes frames there (float path), the processor above on the CPU
    tolerance = 1e-6 if vqa.model.device.type == "cpu" else 1e-3
    assert [d["relevance"] for d in details] == pytest.approx(model_out.relevance_scores.tolist(), abs=tolerance)


def test_batched_equals_one_by_one(vqa, videos):
    questions = ["What colour is the video?", "What happens?"]
    paths = [str(v) for v in videos]
    batched = vqa(video=paths, question=questions, batch_size=2, max_new_tokens=4)
    singles = [vqa(video=p, question=q, max_new_tokens=4) for p, q in zip(paths, questions)]
    assert [b["answer"] for b in batched] == [s["answer"] for s in singles]
    assert [b["segments"] for b in batched] == [2, 5]
    assert [b["visual_tokens"] for b in batched] == [s["visual_tokens"] for s in singles]


def test_pipeline_asks_generate_for_tokens_only(vqa, videos, monkeypatch):
    """No output dict unless the caller asks: a dict hands back the static cache, and the graphed
    decoding loop then cannot keep its captured step for the next question."""
    asked = []
    real_generate = type(vqa.model).generate

    def spy(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        asked.append(bool(kwargs.get("return_dict_in_generate", config.return_dict_in_generate)))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(vqa.model), "generate", spy)
    plain = vqa(video=str(videos[0]), question="What happens?", max_new_tokens=4)
    as_dict = vqa(video=str(videos[0]), question="What happens?", max_new_tokens=4, return_dict_in_generate=True)
    assert asked == [False, True]
    assert plain["answer"] == as_dict["answer"] and plain["visual_tokens"] == as_dict["visual_tokens"]


def test_ata_options_per_call(vqa, videos):
    path = str(videos[1])
    small = vqa(video=path, question="What happens?", visual_token_budget=20, max_new_tokens=2)
    assert small["visual_tokens"] <= 20
    full = vqa(video=path, question="What happens?", use_ata=False, max_new_tokens=2)
    assert full["visual_tokens"] == 5 * 16


def test_frames_with_metadata(vqa):
    frames = np.zeros((16, 64, 64, 3), dtype=np.uint8)
    frames[..., 0] = 255
    out = vqa(video=frames, question="What colour?", video_metadata={"fps": 4.0}, max_new_tokens=2)
    assert out["sampled_frames"] == 16 and out["segments"] == 2
    assert out["real_fps"] == pytest.approx(4.0)
    assert out["segment_details"][1]["start"] == pytest.approx(2.0)


def test_bad_video_names_the_item(vqa, videos, tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(ValueError, match=r"video 1: .*nope\.mp4"):
        vqa(video=[str(videos[0]), str(missing)], question=["a", "b"], max_new_tokens=2)


def test_streamed_answers_equal_the_plain_ones(vqa, videos, monkeypatch):
    from transformers_tempo import pipeline_tempo

    calls = []
    real = pipeline_tempo.compress_streaming
    monkeypatch.setattr(pipeline_tempo, "compress_streaming", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    path = str(videos[1])
    options = {"question": "What happens?", "visual_token_budget": 40, "max_new_tokens": 4, "num_workers": 2}
    plain = vqa(video=path, stream=False, **options)
    assert calls == []
    default = vqa(video=path, **options)  # off by default
    assert calls == []
    streamed = vqa(video=path, stream=True, **options)
    assert calls == [path]
    for result in (default, streamed):
        assert result["answer"] == plain["answer"] and result["visual_tokens"] == plain["visual_tokens"] <= 40
        assert [d["kept_tokens"] for d in result["segment_details"]] == [d["kept_tokens"] for d in plain["segment_details"]]
        assert [d["relevance"] for d in result["segment_details"]] == pytest.approx(
            [d["relevance"] for d in plain["segment_details"]], abs=1e-5
        )
    assert streamed["timings"]["decode"] > 0 and streamed["timings"]["preprocess"] == 0
    # a batch of several is answered the plain way even when asked to stream; errors name the item
    with pytest.raises(ValueError, match=r"video 0: .*nope\.mp4"):
        vqa(video=str(videos[0]).replace("short", "nope"), question="a", stream=True)
    before = len(calls)
    batched = vqa(video=[path, path], question=["What happens?"] * 2, batch_size=2, stream=True, max_new_tokens=2)
    assert len(batched) == 2 and len(calls) == before


# ---------------------------------------------------------------------------- the `tempo` command
# In-process (`cli.main`); tests/test_cli_errors.py has the table of bad invocations.
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tempo-cache")


def test_tempo_demo_runs_and_says_the_model_is_random(cache, capsys, monkeypatch):
    from transformers_tempo.cli import main

    monkeypatch.setenv("TEMPO_CACHE", str(cache))
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out
    assert "visual tokens kept" in out and "segments: 3" in out
    answer_line = out.split("the real one.")[1].strip().splitlines()[0]
    assert answer_line.strip() and not answer_line.startswith("answer: ''")  # the demo shows generated tokens
    assert (cache / "demo" / "tiny-tempo" / "config.json").exists()


def test_tempo_ask_json_and_plot(model_dir, videos, tmp_path, capsys):
    from transformers_tempo.cli import main

    plot = tmp_path / "alloc.png"
    args = ["ask", str(videos[1]), "What happens?", "--model", str(model_dir), "--json", "--budget", "30",
            "--max-new-tokens", "3", "--plot", str(plot)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("answer", "duration", "sampled_frames", "segments", "visual_tokens", "tokens_per_frame", "segment_details", "timings"):
        assert key in data
    assert data["segments"] == 5 and data["visual_tokens"] <= 30
    assert set(data["timings"]) == {"decode", "preprocess", "compress", "answer"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000


def test_tempo_ask_missing_and_corrupt_files_exit_2(model_dir, tmp_path, capsys):
    from transformers_tempo.cli import main

    assert main(["ask", str(tmp_path / "missing.mp4"), "q", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "missing.mp4" in err and "Traceback" not in err
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    assert main(["ask", str(corrupt), "q", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "corrupt.mp4" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_tempo_runs_as_a_module(cache, model_dir, videos):
    """`python -m transformers_tempo.cli` (what `accelerate launch -m` runs) answers and fails like `tempo`."""
    env = {**os.environ, "TEMPO_CACHE": str(cache)}
    command = [sys.executable, "-m", "transformers_tempo.cli", "ask", str(videos[0]), "q", "--model", str(model_dir)]
    bad = subprocess.run([*command, "--budget", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "tempo: error: --budget must be a positive integer, got 0\n"
    good = subprocess.run([*command, "--json", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["segments"] == 2


def test_tempo_ask_stream_gives_the_same_answer_and_names_bad_files(model_dir, videos, tmp_path, capsys):
    from transformers_tempo.cli import main

    args = ["ask", str(videos[1]), "What happens?", "--model", str(model_dir), "--json", "--budget", "30",
            "--max-new-tokens", "3"]  # fmt: skip
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--stream"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    for key in ("answer", "segments", "visual_tokens", "sampled_frames"):
        assert streamed[key] == plain[key], key
    assert streamed["timings"]["decode"] > 0 and set(streamed["timings"]) == set(plain["timings"])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    assert main(["ask", str(corrupt), "q", "--model", str(model_dir), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt.mp4" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_compile_flag_compiles_the_compressor(tmp_path, monkeypatch, capsys):
    from transformers_tempo import cli, modeling_tempo

    calls, caches = [], []
    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_compressor", lambda self, **kw: calls.append(self))
    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_decoder", lambda self, **kw: calls.append(self))
    real_generate = modeling_tempo.TempoForConditionalGeneration.generate

    def spy_generate(self, *args, **kwargs):
        caches.append(kwargs.get("generation_config", self.generation_config).cache_implementation)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(modeling_tempo.TempoForConditionalGeneration, "generate", spy_generate)
    monkeypatch.setenv("TEMPO_CACHE", str(tmp_path))
    assert cli.main(["demo", "--json", "--compile", "--max-new-tokens", "2"]) == 0
    assert len(calls) == 2 and all(isinstance(call, modeling_tempo.TempoModel) for call in calls)
    assert caches == ["static"]  # decoding through a static cache (compiled on GPUs)
    assert json.loads(capsys.readouterr().out)["sampled_frames"] == 24
