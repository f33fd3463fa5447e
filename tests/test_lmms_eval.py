"""`--model tempo` in the real lmms-eval (PyPI), on the CPU, with a tiny model and the example task.

Skipped where lmms-eval is not installed (`.ci/run` installs it without its CUDA dependencies).
One in-process `simple_evaluate` run over the example task plus a doc whose video is missing
feeds most tests; `accelerate launch` runs the same task in two processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")

from loguru import logger  # noqa: E402  (a dependency of lmms-eval)

from transformers_tempo import TempoProcessor, TempoVideoProcessor, load_video  # noqa: E402
from transformers_tempo.integrations import lmms_eval as adapter  # noqa: E402
from transformers_tempo.synthetic import decode_frame_index  # noqa: E402
from transformers_tempo.testing_utils import build_tiny_model, build_tiny_tokenizer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lmms_eval"
TASK = "tempo_tiny_mcq"
MISSING = "missing.mp4"


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_videos = _import(EXAMPLE / "make_videos.py", "tempo_tiny_mcq_make_videos")
task_utils = _import(EXAMPLE / "utils.py", "tempo_tiny_mcq_utils")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Tempo whose greedy answers depend on the question and the video.

    The tiny model's default init answers "\\n" to everything (an empty answer once stripped, which
    would look like an error); decoder weights drawn wider make the answers differ. Frames are
    upscaled to only 128x128 (instead of 384x384) to keep the CPU work small.
    """
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.startswith("model.language_model") and weight.dim() == 2:
                weight.normal_(0.0, 0.5)
    processor = TempoProcessor(video_processor=TempoVideoProcessor(video_min_pixels=128 * 128), tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("tiny-tempo")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The example task, its videos generated, plus one doc whose video does not exist."""
    path = tmp_path_factory.mktemp("task")
    for name in ("tempo_tiny_mcq.yaml", "utils.py"):
        shutil.copy(EXAMPLE / name, path / name)
    docs = json.loads((EXAMPLE / "tempo_tiny_mcq.json").read_text())
    docs.insert(3, {**docs[0], "id": "missing", "video": MISSING})  # between the others: the run must go on
    (path / "tempo_tiny_mcq.json").write_text(json.dumps(docs))
    make_videos.write_videos(path / "videos")
    return path


@pytest.fixture(scope="module")
def environment(task_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-datasets")
    env = {"TEMPO_TINY_MCQ_VIDEOS": str(task_dir / "videos"), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def docs_of(task_dir):
    return json.loads((task_dir / "tempo_tiny_mcq.json").read_text())


@pytest.fixture(scope="module")
def run(model_dir, task_dir, environment):
    """One `simple_evaluate(model="tempo", ...)` (batch size 2), recording every video the adapter loads
    and every error it logs."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    loads, errors = [], []

    def recording_load_video(video, **options):
        loaded = load_video(video, **options)
        loads.append({"video": video, "clip": options.get("clip"), "frames": loaded.frames.clone()})
        return loaded

    sink = logger.add(lambda message: errors.append(str(message)), level="ERROR")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adapter, "load_video", recording_load_video)
            results = simple_evaluate(
                model="tempo",
                model_args=f"pretrained={model_dir},dtype=float32,batch_size=2",
                tasks=[TASK],
                task_manager=TaskManager(include_path=str(task_dir)),
                log_samples=True,
            )
    finally:
        logger.remove(sink)
    answers = {s["doc_id"]: s["resps"][0][0] for s in results["samples"][TASK]}
    return {"results": results, "answers": answers, "loads": loads, "errors": errors}


def direct_answer(model, processor, doc, video_dir):
    """The answer of the plain transformers path (processor + generate), one question at a time."""
    clip = None if doc["start"] is None and doc["end"] is None else (doc["start"], doc["end"])
    video = load_video(video_dir / doc["video"], clip=clip)
    inputs = processor(text=task_utils.doc_to_text(doc, {"post_prompt": "\nAnswer with the option's letter from the given choices directly."}),
                       videos=video)  # fmt: skip
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    prompt = inputs["input_ids"]
    if out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt):
        out = out[:, prompt.shape[1] :]  # generate returned prompt + new tokens
    return processor.batch_decode(out, skip_special_tokens=True)[0].strip()


# ------------------------------------------------------------------------------------ registration
def test_entry_point_resolves_tempo_to_the_adapter():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "tempo"]
    manifest = point.load()()
    assert manifest.model_id == "tempo"
    assert get_model("tempo") is adapter.Tempo


def test_unknown_or_bad_model_args_name_the_arg(model_dir):
    with pytest.raises(ValueError, match="unknown model arg.*budget"):
        adapter.Tempo(pretrained=str(model_dir), budget=4096)
    with pytest.raises(ValueError, match="visual_token_budget must be a positive integer"):
        adapter.Tempo(pretrained=str(model_dir), visual_token_budget=0)
    with pytest.raises(ValueError, match="reference=true reproduces the released bfloat16"):
        adapter.Tempo(pretrained=str(model_dir), dtype="float32", reference=True)


def test_reference_loads_the_released_settings(model_dir):
    model = adapter.Tempo(pretrained=str(model_dir), dtype="bfloat16", reference=True)
    weight = model.model.lm_head.weight
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, weight.to(torch.float16).to(torch.bfloat16))
    assert model.processor.video_processor.resize_backend == "pil"
    assert model.model.config.max_context_length == 32768
    with pytest.raises(ValueError, match="reference=true computes the released .eager. function"):
        adapter.Tempo(pretrained=str(model_dir), dtype="bfloat16", reference=True, compile=True)


def test_released_argument_names_set_the_sampling(model_dir):
    model = adapter.Tempo(pretrained=str(model_dir), dtype="float32", video_fps=1, min_frames_num=4, max_frames_num=64)
    assert (model.fps, model.min_frames, model.max_frames) == (1.0, 4, 64)
    defaults = adapter.Tempo(pretrained=str(model_dir), dtype="float32")
    assert (defaults.fps, defaults.min_frames, defaults.max_frames, defaults.visual_token_budget, defaults.max_new_tokens) == (
        2.0, 8, 1024, 8192, 16)  # fmt: skip


# ------------------------------------------------------------------------------------ a full run
def test_run_gives_one_answer_per_doc_and_a_score(run, task_dir):
    docs = docs_of(task_dir)
    answers = run["answers"]
    assert sorted(answers) == list(range(len(docs)))
    missing = [i for i, doc in enumerate(docs) if doc["video"] == MISSING]
    assert all(answers[i] for i in answers if i not in missing), answers
    # the score is the mean over the docs of "the answer's option letter is the target", recomputed here
    expected = np.mean([task_utils.answer_letter(answers[i]) == doc["answer"] for i, doc in enumerate(docs)])
    assert run["results"]["results"][TASK]["accuracy,none"] == pytest.approx(expected)


def test_answers_equal_the_plain_transformers_answers(run, task_dir, model_dir):
    """Grouping by video, decoding once, batching two at a time and reordering change no answer."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    for i, doc in enumerate(docs_of(task_dir)):
        if doc["video"] != MISSING:
            assert run["answers"][i] == direct_answer(model, processor, doc, task_dir / "videos"), doc["id"]


def test_missing_video_gives_an_empty_answer_and_an_error_naming_it(run, task_dir):
    (index,) = [i for i, doc in enumerate(docs_of(task_dir)) if doc["video"] == MISSING]
    assert run["answers"][index] == ""
    named = [e for e in run["errors"] if MISSING in e]
    assert len(named) == 1 and f"doc {index} of task {TASK}" in named[0] and "no such file" in named[0]


def test_each_video_is_decoded_once(run, task_dir):
    docs = [d for d in docs_of(task_dir) if d["video"] != MISSING]
    wanted = {(d["video"], d["start"], d["end"]) for d in docs}
    seen = [(Path(load["video"]).name, *(load["clip"] or (None, None))) for load in run["loads"]]
    assert sorted(seen, key=str) == sorted(wanted, key=str)  # one load per distinct (file, clip)
    assert len(docs) > len(wanted)  # the task does ask several questions about some videos


def test_clip_bounds_reach_the_sampler(run):
    """red_then_blue.mp4: 60 frames at 10 fps, red for frames 0-29, blue from 30.

    clip (0.0, 2.5): frames 0..25 (26 frames, 2.6 s) -> round(2.6 * 2) = 5 sampled, raised to
    min_frames 8 -> round(linspace(0, 25, 8)) = 0 4 7 11 14 18 21 25.
    clip (3.5, 6.0): frames ceil(35)=35 .. min(60, 59)=59 (25 frames, 2.5 s) -> 8 frames,
    35 + round(linspace(0, 24, 8)) = 35 38 42 45 49 52 56 59.
    """
    by_clip = {load["clip"]: load["frames"] for load in run["loads"] if Path(load["video"]).name == "red_then_blue.mp4"}
    expected = {(0.0, 2.5): [0, 4, 7, 11, 14, 18, 21, 25], (3.5, 6.0): [35, 38, 42, 45, 49, 52, 56, 59]}
    assert set(by_clip) == set(expected)
    for clip, indices in expected.items():
        frames = by_clip[clip].numpy()
        assert [decode_frame_index(frame) for frame in frames] == indices
        colour = make_videos.COLOURS[make_videos.colour_at("red_then_blue.mp4", clip[0])]
        bottom = frames[:, frames.shape[1] * 3 // 4 :].reshape(-1, 3).mean(axis=0)
        assert np.abs(bottom - np.array(colour)).max() < 12


def test_visual_forms_of_lmms_eval_tasks():
    clip = adapter.parse_visuals([{"type": "video", "path": "a.mp4", "video_start": 1.5, "video_end": 4}])
    assert (clip.kind, clip.source, clip.clip) == ("video", "a.mp4", (1.5, 4))
    assert adapter.parse_visuals([{"url": "file:///x/b.mp4", "start_time": 2, "end_time": None}]).clip == (2, None)
    assert adapter.parse_visuals([{"video": "c.mp4", "bound": (3, 9)}]).clip == (3, 9)
    assert adapter.parse_visuals(["d.mp4"]).clip is None
    assert adapter.parse_visuals([]).kind == "text" and adapter.parse_visuals(None).kind == "text"
    with pytest.raises(ValueError, match="got 2 visuals; Tempo answers about one video or one image"):
        adapter.parse_visuals(["a.mp4", "b.mp4"])


def test_video_image_and_text_requests_in_one_call(model_dir, task_dir):
    """Requests of every kind, mixed, batch size 2: each answer equals the plain path's, one question at a time."""
    from lmms_eval.api.instance import Instance
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = adapter.Tempo(pretrained=str(model_dir), dtype="float32", batch_size=2)
    image = Image.fromarray(make_videos.index_pattern(7, 64, 48))
    video = str(task_dir / "videos" / "green.mp4")
    docs = [{"visual": [video]}, {"visual": [image]}, {"visual": []}, {"visual": [video, video]}, {"visual": [image]}]
    model.task_dict = {"t": {"test": docs}}
    questions = ["What colour is it?", "What is shown?", "Who scores after the goal?", "Two videos?", "Describe the scene."]
    requests = [
        Instance("generate_until", (q, {"max_new_tokens": 8}, lambda doc: doc["visual"], i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, q in enumerate(questions)
    ]  # fmt: skip
    answers = model.generate_until(requests)

    plain = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def direct(question, **visual):
        inputs = processor(text=question, **visual)
        out = plain.generate(**inputs, max_new_tokens=8, do_sample=False)
        prompt = inputs["input_ids"]
        if out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt):
            out = out[:, prompt.shape[1] :]
        return processor.batch_decode(out, skip_special_tokens=True)[0].strip()

    assert answers[0] == direct(questions[0], videos=load_video(video))
    assert answers[1] == direct(questions[1], images=image)
    assert answers[2] == direct(questions[2])
    assert answers[3] == ""  # two visuals: Tempo answers about one
    assert answers[4] == direct(questions[4], images=image)
    assert all(answers[i] for i in (0, 1, 2, 4))


def test_each_video_is_encoded_once_for_all_its_questions(model_dir, task_dir, monkeypatch):
    """Two videos, three questions each, interleaved, batch size 2: the vision tower runs twice, and the
    answers equal the plain path's, one question at a time."""
    from lmms_eval.api.instance import Instance
    from transformers import AutoModel, AutoProcessor

    from transformers_tempo.modeling_tempo import TempoForConditionalGeneration

    encodes = []
    original = TempoForConditionalGeneration.encode_video_features
    monkeypatch.setattr(
        TempoForConditionalGeneration, "encode_video_features",
        lambda self, *a, **k: encodes.append(1) or original(self, *a, **k),
    )
    model = adapter.Tempo(pretrained=str(model_dir), dtype="float32", batch_size=2)
    videos = [str(task_dir / "videos" / "green.mp4"), str(task_dir / "videos" / "red.mp4")]
    questions = ["What colour is it?", "What is shown?", "Describe the scene."]
    docs = [{"visual": [videos[i % 2]], "q": questions[i // 2]} for i in range(6)]
    model.task_dict = {"t": {"test": docs}}
    requests = [
        Instance("generate_until", (doc["q"], {"max_new_tokens": 8}, lambda d: d["visual"], i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, doc in enumerate(docs)
    ]  # fmt: skip
    answers = model.generate_until(requests)
    assert len(encodes) == 2

    plain = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    for doc, answer in zip(docs, answers):
        inputs = processor(text=doc["q"], videos=load_video(doc["visual"][0]))
        out = plain.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        assert answer == expected


def test_stop_strings_cut_the_answer():
    assert adapter._cut_at("B. red\n\nC. green", ["\n\n", "C."]) == "B. red"
    assert adapter._cut_at("A", []) == "A"


def test_loglikelihood_names_the_alternative(model_dir):
    model = adapter.Tempo(pretrained=str(model_dir), dtype="float32")
    with pytest.raises(NotImplementedError, match="generate_until"):
        model.loglikelihood([])


# ------------------------------------------------------------------------------------ two processes
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_give_the_same_answers(run, model_dir, task_dir, environment, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "lmms_eval", "--model", "tempo", "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", TASK, "--include_path", str(task_dir), "--log_samples", "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, **environment, "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes, also on a GPU machine
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (samples,) = output.rglob(f"*samples_{TASK}.jsonl")
    lines = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    two = {line["doc_id"]: line["filtered_resps"] for line in lines}  # the saved file keeps the answer here
    assert two == run["answers"]
