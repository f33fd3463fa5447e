"""`tempo batch`: sharding over processes, resuming after a kill, bad videos and lines, device maps."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

import transformers_tempo  # noqa: F401  (registers the task)
from transformers_tempo import TempoProcessor, TempoVideoProcessor
from transformers_tempo.cli.batch_job import BatchSettings, LineWriter, answer_items, read_items, read_records, run, shard
from transformers_tempo.cli import UsageError, main, parse_device_map
from transformers_tempo.synthetic import write_test_video
from transformers_tempo.testing_utils import build_tiny_model

NEW_TOKENS = 3
QUESTIONS = ["What colour is the video?", "What happens?", "What is shown?", "Describe the scene."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model with larger random weights, so that greedy answers differ between videos and questions."""
    path = tmp_path_factory.mktemp("tiny-tempo-batch")
    model = build_tiny_model(tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return path


def _solid(color):
    return lambda i, w, h: np.full((h, w, 3), color, dtype=np.uint8)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-videos")
    write_test_video(root / "short.mp4", num_frames=30, fps=10, width=64, height=48)  # 3 s: 1 segment
    write_test_video(root / "long.mp4", num_frames=50, fps=10, width=64, height=48)  # 5 s: 2 segments
    write_test_video(root / "red.mp4", num_frames=40, fps=10, width=64, height=48, color_fn=_solid((220, 20, 20)))
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return root


VIDEOS = ["short.mp4", "long.mp4", "red.mp4"]


@pytest.fixture(scope="module")
def vqa(model_dir):
    return pipeline("video-question-answering", model=str(model_dir), device="cpu")


def make_items(count, videos=VIDEOS):
    return [
        {"id": f"item-{i}", "video": videos[i % len(videos)], "question": QUESTIONS[i % len(QUESTIONS)]}
        for i in range(count)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct(vqa, video_dir, item, **options):
    return vqa(video=str(video_dir / item["video"]), question=item["question"], max_new_tokens=NEW_TOKENS, **options)


def assert_matches_direct(line, expected, item):
    assert line["id"] == item["id"] and line["question"] == item["question"] and line["video"] == item["video"]
    for key in ("answer", "visual_tokens", "sampled_frames", "tokens_per_frame", "duration", "segments"):
        assert line[key] == expected[key], key
    assert set(line["timings"]) >= {"decode", "preprocess", "compress", "answer"}


class ThreadState:
    """accelerate's PartialState for one of `world` processes, played by threads sharing a barrier."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


class RecordingPipeline:
    """The real pipeline, noting which questions each model call got (and refusing some, if asked)."""

    def __init__(self, vqa, refuse=()):
        self.vqa, self.processor, self.refuse = vqa, vqa.processor, set(refuse)
        self.calls = []

    def __call__(self, video, question, **kwargs):
        self.calls.append(list(question))
        if self.refuse & set(question):
            raise ValueError("this question is refused by the test")
        return self.vqa(video=video, question=question, **kwargs)


def settings_for(video_dir, **overrides):
    return BatchSettings(max_new_tokens=NEW_TOKENS, base_dir=video_dir, **overrides)


# ------------------------------------------------------------------------------- (a) two processes
def test_two_processes_answer_each_item_once_in_input_order(vqa, video_dir, tmp_path):
    items = make_items(5)
    output = tmp_path / "answers.jsonl"
    barrier = threading.Barrier(2)
    pipes = {rank: RecordingPipeline(vqa) for rank in (0, 1)}
    summaries, errors = {}, []

    def process(rank):
        try:
            state = ThreadState(rank, 2, barrier)
            summaries[rank] = run(items, output, lambda: pipes[rank], settings_for(video_dir, batch_size=2), state)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # the strided split: rank 0 got items 0, 2, 4 and rank 1 items 1, 3, two per model call
    questions = [item["question"] for item in items]
    assert pipes[0].calls == [[questions[0], questions[2]], [questions[4]]]
    assert pipes[1].calls == [[questions[1], questions[3]]]
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    for line, item in zip(lines, items):
        assert_matches_direct(line, direct(vqa, video_dir, item), item)
    assert [line["batch_size"] for line in lines] == [2, 2, 2, 2, 1]
    assert summaries[1] is None
    assert summaries[0]["answered"] == 5 and summaries[0]["failed"] == 0 and summaries[0]["skipped"] == 0
    assert summaries[0]["processes"] == 2
    assert not list(tmp_path.glob("*.part"))


def test_shard_is_a_fixed_strided_split():
    items = list(range(7))
    shares = [shard(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes(model_dir, video_dir, vqa, tmp_path):
    """The real thing: `accelerate launch` starts two processes (torchrun; gloo on this CPU machine)."""
    items = make_items(4)
    source = write_jsonl(video_dir / f"items-{tmp_path.name}.jsonl", items)
    output = tmp_path / "answers.jsonl"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "transformers_tempo.cli", "batch", "--input", str(source), "--output", str(output),
        "--model", str(model_dir), "--max-new-tokens", str(NEW_TOKENS), "--json",
    ]  # fmt: skip
    # two CPU processes, also on a machine with one GPU (its second process would find no GPU)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["processes"] == 2 and summary["answered"] == 4 and summary["items"] == 4
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    for line, item in zip(lines, items):
        assert_matches_direct(line, direct(vqa, video_dir, item), item)
    assert not list(tmp_path.glob("*.part"))


# ------------------------------------------------------------------------------- (b) killed and resumed
@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(model_dir, video_dir, tmp_path, capsys):
    items = make_items(10)
    source = write_jsonl(video_dir / f"items-{tmp_path.name}.jsonl", items)
    output = tmp_path / "answers.jsonl"
    part = tmp_path / "answers.jsonl.rank0.part"
    args = ["batch", "--input", str(source), "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "transformers_tempo.cli", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (part.exists() and part.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before answering"
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9  # killed midway, not finished
    assert not output.exists()
    before = read_records(part)  # the lines written before the kill, each complete
    assert 1 <= len(before) < len(items)
    assert [r["id"] for r in before] == [item["id"] for item in items[: len(before)]]

    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == len(before) and summary["answered"] == len(items) - len(before)
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [item["id"] for item in items]  # each once, input order
    assert lines[: len(before)] == before  # finished answers were kept as they were, not redone
    assert not part.exists()


def test_torn_lines_in_part_files_are_cut_and_redone(vqa, video_dir, tmp_path):
    items = make_items(4)
    output = tmp_path / "answers.jsonl"
    settings = settings_for(video_dir)
    # a killed two-process run: rank 0 finished item 0 and tore item 2's line, rank 1 finished item 1
    reference = {}
    for rank, share in ((0, [items[0], items[2]]), (1, [items[1]])):
        writer = LineWriter(tmp_path / f"answers.jsonl.rank{rank}.part")
        answer_items(vqa, share, writer, settings)
        writer.close()
    for rank in (0, 1):
        for record in read_records(tmp_path / f"answers.jsonl.rank{rank}.part"):
            reference[record["id"]] = record
    rank0 = tmp_path / "answers.jsonl.rank0.part"
    text = rank0.read_text()
    rank0.write_text(text[: len(text) - 25])  # the last line loses its end and its newline
    assert [r["id"] for r in read_records(rank0)] == ["item-0"]
    assert rank0.read_text().count("\n") == 1 and rank0.read_text().endswith("\n")  # torn tail cut off
    with open(tmp_path / "answers.jsonl.rank1.part", "a") as f:
        f.write('{"id": "item-3", "answ\n')  # a torn line that happens to end in a newline

    recorder = RecordingPipeline(vqa)
    summary = run(items, output, lambda: recorder, settings)
    assert summary["skipped"] == 2 and summary["answered"] == 2
    assert recorder.calls == [[items[2]["question"]], [items[3]["question"]]]
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    assert lines[0] == reference["item-0"] and lines[1] == reference["item-1"]
    assert_matches_direct(lines[2], direct(vqa, video_dir, items[2]), items[2])
    assert_matches_direct(lines[3], direct(vqa, video_dir, items[3]), items[3])
    assert not list(tmp_path.glob("*.part"))


def test_a_bad_line_inside_an_output_file_is_an_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "answer": "x"}\nnot json\n{"id": "b", "answer": "y"}\n')
    with pytest.raises(UsageError, match=r"answers.jsonl line 2: not valid JSON"):
        read_records(path)


# ------------------------------------------------------------------------------- (c) bad videos
def test_bad_videos_become_error_lines_and_the_rest_is_answered(vqa, video_dir, tmp_path):
    items = [
        {"id": "good-1", "video": "short.mp4", "question": QUESTIONS[0]},
        {"id": "missing", "video": "nowhere/missing.mp4", "question": QUESTIONS[1]},
        {"id": "good-2", "video": "long.mp4", "question": QUESTIONS[1]},
        {"id": "corrupt", "video": "corrupt.mp4", "question": QUESTIONS[2]},
        {"id": "bad-option", "video": "red.mp4", "question": QUESTIONS[2], "max_frames": 0},
        {"id": "good-3", "video": "red.mp4", "question": QUESTIONS[3], "budget": 12},
    ]
    output = tmp_path / "answers.jsonl"
    recorder = RecordingPipeline(vqa)
    summary = run(items, output, lambda: recorder, settings_for(video_dir, batch_size=4))
    assert summary["answered"] == 3 and summary["failed"] == 3
    # the bad videos were decoded alone and never reached the model; good-3 has its own budget
    assert recorder.calls == [[QUESTIONS[0], QUESTIONS[1]], [QUESTIONS[3]]]
    lines = {line["id"]: line for line in read_jsonl(output)}
    assert list(lines) == [item["id"] for item in items]
    assert lines["missing"]["error"] == f"{video_dir / 'nowhere/missing.mp4'}: no such file"
    assert lines["corrupt"]["error"].startswith(f"{video_dir / 'corrupt.mp4'}: ")
    assert "answer" not in lines["corrupt"]
    assert lines["bad-option"]["error"] == "red.mp4: option 'max_frames' must be a positive integer, got 0"
    for item in (items[0], items[2]):
        assert_matches_direct(lines[item["id"]], direct(vqa, video_dir, item), item)
    assert_matches_direct(lines["good-3"], direct(vqa, video_dir, items[5], visual_token_budget=12), items[5])
    assert lines["good-3"]["visual_tokens"] <= 12


def test_a_batch_the_model_refuses_is_answered_one_by_one(vqa, video_dir, tmp_path):
    items = make_items(3)
    recorder = RecordingPipeline(vqa, refuse={items[1]["question"]})
    output = tmp_path / "answers.jsonl"
    summary = run(items, output, lambda: recorder, settings_for(video_dir, batch_size=3))
    assert summary["answered"] == 2 and summary["failed"] == 1
    questions = [item["question"] for item in items]
    assert recorder.calls == [questions, [questions[0]], [questions[1]], [questions[2]]]
    lines = read_jsonl(output)
    assert lines[1] == {
        "id": "item-1", "video": "long.mp4", "question": questions[1],
        "error": "long.mp4: this question is refused by the test",
    }  # fmt: skip
    for index in (0, 2):
        assert_matches_direct(lines[index], direct(vqa, video_dir, items[index]), items[index])
        assert lines[index]["batch_size"] == 1


def test_errors_are_kept_on_resume_unless_retried(model_dir, video_dir, tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(video_dir / "short.mp4", clips / "a.mp4")
    items = [
        {"id": "a", "video": "a.mp4", "question": QUESTIONS[0]},
        {"id": "b", "video": "b.mp4", "question": QUESTIONS[1]},
    ]
    source = write_jsonl(clips / "items.jsonl", items)
    output = tmp_path / "answers.jsonl"
    args = ["batch", "--input", str(source), "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", str(NEW_TOKENS), "--json"]  # fmt: skip
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["answered"], first["failed"], first["error_lines"]) == (1, 1, 1)
    assert read_jsonl(output)[1]["error"] == f"{clips / 'b.mp4'}: no such file"

    shutil.copy(video_dir / "long.mp4", clips / "b.mp4")  # the missing video appears
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["skipped"], second["answered"], second["error_lines"]) == (2, 0, 1)
    assert "error" in read_jsonl(output)[1]

    assert main([*args, "--retry-errors"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert (third["skipped"], third["answered"], third["error_lines"]) == (1, 1, 0)
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == ["a", "b"]
    assert lines[1]["segments"] == 2 and "error" not in lines[1]


# ------------------------------------------------------------------------------- (d) bad input
@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "video": "v.mp4", "question": "q"}\n{"id": "b", "video": \n', r"line 2: not valid JSON"),
        ('{"id": "a", "video": "v.mp4"}\n', r"line 1: missing 'question'"),
        ('\n["a", "v.mp4", "q"]\n', r"line 2: expected a JSON object with id, video, question, got list"),
        ('{"id": null, "video": "v.mp4", "question": "q"}\n', r"line 1: 'id' must be a string or an integer"),
        ('{"id": "a", "video": "", "question": "q"}\n', r"line 1: 'video' must be a non-empty path string"),
        (
            '{"id": "a", "video": "v.mp4", "question": "q"}\n{"id": "b", "video": "v.mp4", "question": "q"}\n'
            '{"id": "a", "video": "w.mp4", "question": "q"}\n',
            r"line 3: duplicate id 'a' \(first on line 1\)",
        ),
    ],
)
def test_bad_input_lines_stop_before_any_work(tmp_path, content, message, capsys):
    source = tmp_path / "items.jsonl"
    source.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_items(source)
    output = tmp_path / "answers.jsonl"
    assert main(["batch", "--input", str(source), "--output", str(output), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tempo: error: {source}: ") and "Traceback" not in err
    assert not output.exists() and not list(tmp_path.glob("*.part"))


def test_bad_command_lines_exit_2(tmp_path, capsys):
    assert main(["batch", "--input", str(tmp_path / "nope.jsonl"), "--output", "x"]) == 2
    assert "nope.jsonl: no such input file" in capsys.readouterr().err
    source = write_jsonl(tmp_path / "items.jsonl", make_items(1))
    base = ["batch", "--input", str(source), "--output", str(tmp_path / "out.jsonl")]
    for extra, message in (
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--decode-workers", "0"], "--decode-workers must be a positive integer, got 0"),
        (["--device-map", "{not json"], "--device-map: expected one of auto"),
        (["--device", "cpu", "--device-map", "auto"], "give --device or --device-map, not both"),
    ):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["batch", "--input", str(source), "--output", str(source)]) == 2
    assert "--output must not be the input file" in capsys.readouterr().err


# ------------------------------------------------------------------------------- (e) device maps
SPLIT_MAP = {
    "model.compressor": 0,
    "model.memory_tokens": 0,
    "model.relevance_head": 0,
    "model.projector": 1,
    "model.language_model": 1,
    "lm_head": 1,
}


def test_parse_device_map():
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map(json.dumps(SPLIT_MAP)) == SPLIT_MAP
    with pytest.raises(UsageError):
        parse_device_map('{"model.compressor": [0]}')


def model_outputs(model, inputs):
    """Everything the model computes for these inputs: logits, relevance, allocation, sampled tokens."""
    inputs = inputs.to(model.device)
    with torch.no_grad():
        out = model(**inputs)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0)
    return out.logits.cpu(), out.relevance_scores.cpu(), out.token_allocation.cpu(), sampled.cpu()


def assert_same_outputs(got, want):
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1]) or torch.allclose(got[1], want[1], atol=1e-6)
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[3], want[3])


@pytest.fixture(scope="module")
def model_inputs(model_dir, video_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    return processor(
        text=[QUESTIONS[0], QUESTIONS[1]],
        videos=[str(video_dir / "long.mp4"), str(video_dir / "red.mp4")],
        return_tensors="pt",
    )


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")
def test_device_maps_on_cpu_give_the_plain_model_outputs(model_dir, model_inputs, tmp_path):
    from accelerate import dispatch_model

    plain = model_outputs(AutoModel.from_pretrained(model_dir), model_inputs)
    cpu_map = {name: "cpu" for name in SPLIT_MAP}
    assert_same_outputs(model_outputs(AutoModel.from_pretrained(model_dir, device_map=cpu_map), model_inputs), plain)
    # accelerate's planner, kept to the CPU (on a GPU machine it would place everything on the GPU)
    auto = AutoModel.from_pretrained(model_dir, device_map="auto", max_memory={"cpu": "4GiB"})
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    assert_same_outputs(model_outputs(auto, model_inputs), plain)
    # accelerate's hooks on every part (as with several devices), and the decoder's weights offloaded to disk
    hooked = dispatch_model(AutoModel.from_pretrained(model_dir), device_map=cpu_map, force_hooks=True)
    assert hasattr(hooked.model.projector, "_hf_hook")
    assert_same_outputs(model_outputs(hooked, model_inputs), plain)
    offload_map = {**cpu_map, "model.language_model": "disk", "lm_head": "disk"}
    offloaded = AutoModel.from_pretrained(model_dir, device_map=offload_map, offload_folder=str(tmp_path / "offload"))
    assert offloaded.hf_device_map["model.language_model"] == "disk"
    assert_same_outputs(model_outputs(offloaded, model_inputs), plain)


def test_batch_with_a_device_map_gives_the_same_answers(model_dir, video_dir, vqa, tmp_path, capsys):
    items = make_items(3)
    source = write_jsonl(video_dir / f"items-{tmp_path.name}.jsonl", items)
    output = tmp_path / "answers.jsonl"
    device_map = json.dumps({name: "cpu" for name in SPLIT_MAP})
    args = ["batch", "--input", str(source), "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", str(NEW_TOKENS), "--device-map", device_map, "--batch-size", "2", "--json"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["answered"] == 3
    for line, item in zip(read_jsonl(output), items):
        assert_matches_direct(line, direct(vqa, video_dir, item), item)


def test_ask_with_a_device_map(model_dir, video_dir, vqa, capsys):
    item = make_items(2)[1]
    device_map = json.dumps({name: "cpu" for name in SPLIT_MAP})
    args = ["ask", str(video_dir / item["video"]), item["question"], "--model", str(model_dir),
            "--device-map", device_map, "--max-new-tokens", str(NEW_TOKENS), "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    expected = direct(vqa, video_dir, item)
    assert (result["answer"], result["visual_tokens"]) == (expected["answer"], expected["visual_tokens"])
    assert main([*args, "--device", "cpu"]) == 2
    assert "give --device or --device-map, not both" in capsys.readouterr().err


def test_more_processes_than_gpus_is_a_usage_error(model_dir, video_dir, tmp_path, monkeypatch, capsys):
    # a second process (LOCAL_RANK=1) on a machine with one GPU: said plainly, before any work
    source = write_jsonl(tmp_path / "items.jsonl", make_items(2))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = ["batch", "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--model", str(model_dir)]
    assert main(args) == 2
    assert "process 1 of this machine has no GPU of its own (1 visible)" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_device_maps_over_two_gpus_give_the_single_gpu_outputs(model_dir, model_inputs, video_dir):
    single = model_outputs(AutoModel.from_pretrained(model_dir, device_map={"": 0}), model_inputs)
    split = AutoModel.from_pretrained(model_dir, device_map=SPLIT_MAP)
    assert split.model.compressor.device.index == 0 and split.lm_head.weight.device.index == 1
    assert_same_outputs(model_outputs(split, model_inputs), single)
    # the Tempo parts and the decoder's layers spread over both devices
    crossed = {
        "model.compressor": 1,
        "model.memory_tokens": 0,
        "model.relevance_head": 0,
        "model.projector": 0,
        "model.language_model.embed_tokens": 1,
        "model.language_model.rotary_emb": 1,
        "model.language_model.layers.0": 0,
        "model.language_model.layers.1": 1,
        "model.language_model.norm": 1,
        "lm_head": 1,
    }
    assert_same_outputs(model_outputs(AutoModel.from_pretrained(model_dir, device_map=crossed), model_inputs), single)
    auto = AutoModel.from_pretrained(model_dir, device_map="auto")
    assert_same_outputs(model_outputs(auto, model_inputs), single)
    # the pipeline, as `tempo batch --device-map` runs it
    item = {"video": str(video_dir / "long.mp4"), "question": QUESTIONS[1], "max_new_tokens": NEW_TOKENS}
    one = pipeline("video-question-answering", model=str(model_dir), device=0)(**item)
    two = pipeline("video-question-answering", model=str(model_dir), device_map=SPLIT_MAP)(**item)
    assert (two["answer"], two["visual_tokens"]) == (one["answer"], one["visual_tokens"])


def test_next_batch_is_decoded_while_the_model_answers(video_dir, tmp_path, monkeypatch):
    """Decoding (CPU) of batch i+1 overlaps the model call (GPU) of batch i, and order is kept."""
    from transformers_tempo import video_loading

    events = []
    real_load = video_loading.load_video

    def load(path, **kwargs):
        events.append(("decode", os.path.basename(path)))
        return real_load(path, **kwargs)

    class SlowModel:
        device = "cpu"
        processor = types.SimpleNamespace(video_processor=types.SimpleNamespace(longest_edge=512))

        def __call__(self, video, question, batch_size, **call):
            events.append(("answer-start", len(video)))
            time.sleep(0.3)  # long enough for the next batch's decode to begin meanwhile
            events.append(("answer-end", len(video)))
            return [{"answer": q.upper(), "timings": {}} for q in question]

    monkeypatch.setattr(video_loading, "load_video", load)
    items = [{"id": str(i), "video": v, "question": f"q{i}"} for i, v in enumerate(VIDEOS)]
    out = tmp_path / "answers.jsonl"
    writer = LineWriter(out)
    counts = answer_items(SlowModel(), items, writer, BatchSettings(base_dir=video_dir, batch_size=1))
    writer.close()
    assert counts == {"answered": 3, "failed": 0}
    assert [r["answer"] for r in read_records(out)] == ["Q0", "Q1", "Q2"]
    first_answer_end = events.index(("answer-end", 1))
    assert events.index(("decode", "long.mp4")) < first_answer_end  # batch 2 decoded during batch 1's call


@pytest.mark.parametrize("workers,decoded_by_first_answer", [(1, 1 + 2), (3, 1 + 3)])
def test_videos_are_decoded_several_at_once_and_at_most_ahead(video_dir, tmp_path, monkeypatch, workers, decoded_by_first_answer):
    """`decode_workers` videos are decoded at the same time, never more than `ahead` (2 x batch
    size, at least the workers) beyond the batch being answered, and the answers keep input order."""
    from transformers_tempo import video_loading

    lock, running, most, started = threading.Lock(), [0], [0], []
    together = threading.Barrier(workers, timeout=10)  # the first loads wait for each other: broken if serial

    def slow_load(path, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(os.path.basename(path))
            first = len(started) <= workers
        if first:
            together.wait()
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return types.SimpleNamespace(frames=torch.zeros(2, 2, 2, 3, dtype=torch.uint8), path=path, kwargs=kwargs)

    class Model:
        device = "cpu"
        processor = types.SimpleNamespace(video_processor=types.SimpleNamespace(longest_edge=512))
        decoded_before_first_answer = None

        def __call__(self, video, question, batch_size, **call):
            if self.decoded_before_first_answer is None:  # the workers run ahead meanwhile, up to `ahead`
                deadline = time.monotonic() + 10
                while len(started) < decoded_by_first_answer and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.5)  # time enough for one more decode, were it allowed
                with lock:
                    self.decoded_before_first_answer = len(started)
            return [{"answer": os.path.basename(v.path), "timings": {}} for v in video]

    monkeypatch.setattr(video_loading, "load_video", slow_load)
    names = [f"v{i}.mp4" for i in range(6)]
    items = [{"id": str(i), "video": name, "question": "q"} for i, name in enumerate(names)]
    model, out = Model(), tmp_path / "answers.jsonl"
    writer = LineWriter(out)
    counts = answer_items(model, items, writer, BatchSettings(base_dir=video_dir, batch_size=1, decode_workers=workers))
    writer.close()
    assert counts == {"answered": 6, "failed": 0}
    assert [r["answer"] for r in read_records(out)] == names
    assert most[0] == workers and sorted(started) == names
    assert model.decoded_before_first_answer == decoded_by_first_answer  # the batch answered + ahead


def test_a_video_let_go_is_decoded_ahead_again_before_its_next_item(tmp_path, monkeypatch):
    """Items a b a c c a with room for one decoded video: `a` is held when its third item first
    comes into view, then let go for `c`; its decode for that item starts ahead, not when reached."""
    from transformers_tempo.cli import batch_job

    loads = []

    def load(self, item, options):
        loads.append(item["video"])
        return types.SimpleNamespace(frames=torch.zeros(10, dtype=torch.uint8)), 0.01

    monkeypatch.setattr(batch_job.VideoDecoder, "_load", load)
    names = ["a", "b", "a", "c", "c", "a"]
    batches = [[({"video": name}, {"fps": None, "max_frames": None})] for name in names]
    settings = BatchSettings(base_dir=tmp_path, batch_size=1, decode_workers=2, max_held_bytes=10)
    decoder = batch_job.VideoDecoder(types.SimpleNamespace(device="cpu", processor=None), batches, settings)
    ahead_after = []
    try:
        for batch in batches:
            loaded, failed = decoder.decode(batch)
            assert failed == [] and [item["video"] for item, _, _ in loaded] == [batch[0][0]["video"]]
            ahead_after.append(sorted(os.path.basename(key[0]) for key in decoder.pending))
    finally:
        decoder.close()
    assert ahead_after == [["b", "c"], ["c"], ["c"], ["a"], ["a"], []]
    assert sorted(loads) == ["a", "a", "b", "c"]  # a again for its third item, c once for both


def test_decoding_threads_share_the_cores_between_the_videos_decoded_at_once(monkeypatch):
    from transformers_tempo import video_decoding
    from transformers_tempo.cli import batch_job

    vqa = types.SimpleNamespace(device="cpu", processor=None)
    monkeypatch.setattr(video_decoding, "_cpu_count", lambda: 16)

    def decoder_settings(**settings):
        decoder = batch_job.VideoDecoder(vqa, [], BatchSettings(**settings))
        decoder.close()
        options = decoder.load_options
        return decoder.workers, options.get("num_threads"), options.get("num_workers"), decoder.ahead

    # (videos at once, FFmpeg threads and ranges of a long file per video, videos decoded ahead)
    assert decoder_settings() == (8, 2, 1, 8)
    assert decoder_settings(decode_workers=2, batch_size=4) == (2, 8, 4, 8)
    assert decoder_settings(decode_workers=1) == (1, None, None, 2)  # load_video's own choices
    assert decoder_settings(decode_backend="nvdec")[0] == 1  # one GPU decoder
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes on this machine: 4 cores each
    assert decoder_settings()[:3] == (4, 1, 2)


# ------------------------------------------------------------------------------- (e) one decode per video
def interleaved_items():
    """3 videos x 3 questions, the videos interleaved: a1 b1 c1 a2 b2 c2 a3 b3 c3."""
    return [
        {"id": f"{video}-{q}", "video": video, "question": QUESTIONS[q]}
        for q in range(3)
        for video in VIDEOS
    ]


@pytest.fixture
def decodes(monkeypatch):
    """The paths `video_loading.load_video` is called with (every decode the batch job does)."""
    from transformers_tempo import video_loading

    calls, real = [], video_loading.load_video

    def counting(path, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, **kwargs)

    monkeypatch.setattr(video_loading, "load_video", counting)
    return calls


class ObjectRecorder(RecordingPipeline):
    """Notes the decoded video objects the model calls got, in order."""

    def __init__(self, vqa):
        super().__init__(vqa)
        self.objects = []

    def __call__(self, video, question, **kwargs):
        self.objects.extend(video)
        return super().__call__(video, question, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_each_video_is_decoded_once_and_the_answers_are_unchanged(vqa, video_dir, tmp_path, decodes, monkeypatch, batch_size):
    items = interleaved_items()
    encodes, real_encode = [], vqa.model.encode_video_features
    monkeypatch.setattr(vqa.model, "encode_video_features", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    recorder = ObjectRecorder(vqa)
    summary = run(items, tmp_path / "grouped.jsonl", lambda: recorder, settings_for(video_dir, batch_size=batch_size))
    assert summary["answered"] == 9 and summary["failed"] == 0
    assert sorted(decodes) == sorted(VIDEOS)  # each video once
    objects = {}  # the calls answer the items in input order: video file -> ids of the objects given
    for item, loaded in zip(items, recorder.objects, strict=True):
        objects.setdefault(item["video"], set()).add(id(loaded))
    assert objects == {video: {id(recorder.objects[i])} for i, video in enumerate(VIDEOS)}  # one object per video
    # batch size 4: calls [a1 b1 c1 a2] [b2 c2 a3 b3] [c3]: a video's features once per call
    assert len(encodes) == (9 if batch_size == 1 else 3 + 3 + 1)
    grouped = read_jsonl(tmp_path / "grouped.jsonl")
    assert [line["id"] for line in grouped] == [item["id"] for item in items]
    first = {}
    for line in grouped:
        assert line["timings"]["decode"] > 0 if line["video"] not in first else line["timings"]["decode"] == 0.0
        first.setdefault(line["video"], line["id"])

    # one at a time and nothing kept between items (the job as it was): a decode per item, same answers
    decodes.clear()
    alone = settings_for(video_dir, batch_size=1, max_held_bytes=0)
    run(items, tmp_path / "alone.jsonl", lambda: RecordingPipeline(vqa), alone)
    assert len(decodes) == 9
    for line, single in zip(grouped, read_jsonl(tmp_path / "alone.jsonl")):
        for key in ("id", "answer", "visual_tokens", "sampled_frames", "tokens_per_frame", "duration", "segments"):
            assert line[key] == single[key], key
    for line, item in zip(grouped, items):  # and the pipeline's own answer, decoding the file itself
        assert_matches_direct(line, direct(vqa, video_dir, item), item)


def test_a_bad_video_is_tried_once_for_all_its_items(vqa, video_dir, tmp_path, decodes):
    items = [
        {"id": "bad-1", "video": "corrupt.mp4", "question": QUESTIONS[0]},
        {"id": "good", "video": "short.mp4", "question": QUESTIONS[0]},
        {"id": "bad-2", "video": "corrupt.mp4", "question": QUESTIONS[1]},
    ]
    summary = run(items, tmp_path / "answers.jsonl", lambda: vqa, settings_for(video_dir))
    assert summary["answered"] == 1 and summary["failed"] == 2
    assert sorted(decodes) == ["corrupt.mp4", "short.mp4"]  # decoded at once: either may start first
    lines = read_jsonl(tmp_path / "answers.jsonl")
    assert lines[0]["error"] == lines[2]["error"] and lines[0]["error"].startswith(f"{video_dir / 'corrupt.mp4'}: ")


def test_resume_after_a_partial_run_with_shared_videos(vqa, video_dir, tmp_path, decodes):
    items = interleaved_items()
    output = tmp_path / "answers.jsonl"

    class Interrupted(RecordingPipeline):
        def __call__(self, video, question, **kwargs):
            if len(self.calls) == 4:  # a kill during the 5th item (b2)
                raise KeyboardInterrupt
            return super().__call__(video, question, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run(items, output, lambda: Interrupted(vqa), settings_for(video_dir))
    before = read_records(tmp_path / "answers.jsonl.rank0.part")
    assert [r["id"] for r in before] == [item["id"] for item in items[:4]]
    decodes.clear()
    recorder = RecordingPipeline(vqa)
    summary = run(items, output, lambda: recorder, settings_for(video_dir))
    assert summary["skipped"] == 4 and summary["answered"] == 5
    assert recorder.calls == [[item["question"]] for item in items[4:]]  # the rest, in input order
    assert sorted(decodes) == sorted(VIDEOS)  # b, c and a once each
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    assert lines[:4] == before
    for line, item in zip(lines, items):
        assert_matches_direct(line, direct(vqa, video_dir, item), item)
    assert not list(tmp_path.glob("*.part"))


def test_the_old_import_path_is_the_same_job():
    from transformers_tempo import batch as old
    from transformers_tempo.cli import batch_job

    assert old.run is batch_job.run and old.BatchSettings is batch_job.BatchSettings
