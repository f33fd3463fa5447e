"""Bad invocations of `tempo`: each is one line on stderr naming the input and the problem, exit status 2,
found before any model is loaded or video decoded; Ctrl-C is one line and exit status 130."""

import json
import subprocess
import sys

import pytest
import torch

from transformers_tempo import cli
from transformers_tempo.cli import common as cli_common
from transformers_tempo.synthetic import write_test_video

REAL_HUB_PROBE = cli_common._hub_reachable  # (the autouse fixture below replaces the module's)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    video = root / "clip.mp4"
    write_test_video(video, num_frames=60, fps=10, width=64, height=48)  # 6 s: 12 frames, 2 segments
    (root / "notes.txt").write_text("not a video\n")
    (root / "no-config").mkdir()
    (root / "fake-model").mkdir()
    (root / "fake-model" / "config.json").write_text("{}")
    (root / "items.jsonl").write_text(json.dumps({"id": 1, "video": "clip.mp4", "question": "q"}) + "\n")
    (root / "bad.jsonl").write_text('{"id": 1, "video": "clip.mp4"}\nnot json\n')
    return root


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """No test here may reach the network: the Hub is unreachable and its cache empty."""
    monkeypatch.setattr(cli_common, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TEMPO_CACHE", str(tmp_path / "tempo-cache"))


NO_CUDA = not torch.cuda.is_available()

# (arguments, with {video}, {dir}, ... filled in; a piece of the one-line message)
BAD_INVOCATIONS = [
    (["ask", "{video}", "q", "--max-frames", "0"], "--max-frames must be a positive integer, got 0"),
    (["ask", "{video}", "q", "--budget", "0"], "--budget must be a positive integer, got 0"),
    (["ask", "{video}", "q", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["ask", "{video}", "q", "--min-new-tokens", "-1"], "--min-new-tokens must be 0 or more"),
    (["ask", "{video}", "q", "--fps", "0"], "--fps must be a positive number, got 0.0"),
    (["ask", "{video}", "q", "--fps", "nan"], "--fps must be a positive number, got nan"),
    (["ask", "{video}", "q", "--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
    (["ask", "{video}", "q", "--fps", "fast"], "argument --fps: invalid float value: 'fast'"),
    (["ask", "{video}", "q", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    (["ask", "{video}"], "give a question (after the video, or with -q)"),
    (["ask", "{video}", "q", "-q", "q2", "--stream"], "--stream answers one question; leave it out to ask several"),
    (["ask", "{video}", "q", "--reference", "--no-ata"], "--reference computes the released function: leave out --no-ata"),
    (["ask", "{video}", "q", "--reference", "--fps", "1", "--dtype", "float32"],
     "leave out --fps other than 2, --dtype other than bfloat16"),
    (["batch", "--input", "{dir}/items.jsonl", "--output", "{dir}/o.jsonl", "--reference", "--temperature", "1"],
     "--reference computes the released function: leave out --temperature"),
    (["ask", "{video}", "q", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["ask", "{video}", "q", "--device", "cpu", "--device-map", "auto"], "give --device or --device-map, not both"),
    (["ask", "{video}", "q", "--device-map", "{{bad"], "--device-map: expected one of auto"),
    (["ask", "{video}", "q", "--device", "warp-drive"], "--device: 'warp-drive' is not a device"),
    pytest.param(
        ["ask", "{video}", "q", "--device", "cuda"], "--device: cuda: no CUDA device on this machine",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
    pytest.param(
        ["ask", "{video}", "q", "--device-map", '{{"model.compressor": 0}}'], "--device-map: cuda:0: no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
    (["ask", "{dir}/missing.mp4", "q"], "missing.mp4: no such file"),
    (["ask", "{dir}", "q"], "is a folder, expected a video file"),
    (["ask", "{dir}/notes.txt", "q", "--model", "{dir}/fake-model"], "notes.txt: not a readable video container"),
    (["ask", "{video}", "q", "--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["ask", "{video}", "q", "--model", "./no-such-model"], "--model ./no-such-model: no such directory"),
    (["ask", "{video}", "q", "--model", "{dir}/no-config"], "no config.json in that folder"),
    (["ask", "{video}", "q", "--model", "{video}"], "is a file, expected a folder of converted Tempo weights"),
    (["ask", "{video}", "q", "--model", "org/tempo-6b"], "the Hugging Face Hub cannot be reached (no network?)"),
    (["ask", "{video}", "q", "--model", "bad id!"], "neither a folder nor a Hub id"),
    (["ask", "{video}", "q", "--plot", "/no/such/dir/x.png"], "--plot /no/such/dir/x.png: no such folder '/no/such/dir'"),
    (["ask", "{video}", "q", "--plot", "{dir}"], "is a folder, expected a file name"),
    (["demo", "--max-frames", "0"], "--max-frames must be a positive integer, got 0"),
    (["demo", "--plot", "/no/such/dir/x.png"], "no such folder"),
    (["batch", "--input", "{dir}/none.jsonl", "--output", "{dir}/out.jsonl"], "none.jsonl: no such input file"),
    (["batch", "--input", "{dir}/bad.jsonl", "--output", "{dir}/out.jsonl"], "line 1: missing 'question'; line 2: not valid JSON"),
    (["batch", "--input", "{dir}/items.jsonl", "--output", "{dir}/items.jsonl"], "--output must not be the input file"),
    (["batch", "--input", "{dir}/items.jsonl", "--output", "{dir}"], "is a folder, expected a file name"),
    (["batch", "--input", "{dir}/items.jsonl", "--output", "{dir}/o.jsonl", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["batch", "--input", "{dir}/items.jsonl", "--output", "{dir}/o.jsonl", "--model", "/no/such/dir"], "no such directory"),
    (["batch", "--input", "{dir}/items.jsonl"], "the following arguments are required: --output"),
    (["convert", "--tempo_path", "x"], "the following arguments are required: --qwen3vl_path"),
]


def fill(args, files):
    return [a.format(video=files / "clip.mp4", dir=files) for a in args]


@pytest.mark.parametrize("args, message", BAD_INVOCATIONS)
def test_bad_invocation_is_one_line_and_exit_2(args, message, files, capsys):
    assert cli.main(fill(args, files)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(("tempo: error: ", "tempo ask: error: ", "tempo batch: error: ", "tempo convert: error: "))
    assert message in lines[0]
    assert captured.out == ""


def test_hub_id_with_hf_hub_offline_fails_at_once(files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cli_common, "_hub_reachable", lambda timeout=3.0: pytest.fail("HF_HUB_OFFLINE: no connection"))
    assert cli.main(["ask", str(files / "clip.mp4"), "q", "--model", "org/tempo-6b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tempo: error: --model org/tempo-6b: no such folder, and HF_HUB_OFFLINE is set while it is not in the local Hugging Face cache"


def test_debug_after_the_subcommand_shows_the_traceback(files):
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.main(["ask", str(files / "missing.mp4"), "q", "--debug"])
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.main(["--debug", "ask", str(files / "missing.mp4"), "q"])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["ask", "--help"], ["demo", "--help"], ["batch", "--help"], ["ask", "/no/such.mp4", "q"],
     ["ask", "x.mp4", "q", "--max-frames", "0"], ["batch", "--input", "/no/such.jsonl", "--output", "o.jsonl"]],
)
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv):
    code = (
        "import sys\nfrom transformers_tempo.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(rc, sorted(m for m in ('torch', 'transformers', 'av') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"{0 if '--help' in argv else 2} []", result.stdout + result.stderr


def test_package_import_registers_with_transformers_once_it_is_imported():
    code = (
        "import sys\nimport transformers_tempo\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "from transformers import AutoConfig, AutoModel, AutoProcessor\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "from transformers.models.auto.modeling_auto import MODEL_MAPPING\n"
        "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
        "config = AutoConfig.for_model('tempo')\n"
        "print(type(config).__name__, MODEL_MAPPING[type(config)].__name__, PROCESSOR_MAPPING[type(config)].__name__,\n"
        "      'video-question-answering' in PIPELINE_REGISTRY.get_supported_tasks())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split("\n")[:2] == [
        "False False",
        "TempoConfig TempoForConditionalGeneration TempoProcessor True",
    ], result.stderr


def test_budget_below_the_segments_is_said_in_the_json(tiny_model_dir, files, capsys):
    # 2 segments, budget 1: every segment still keeps a token, so 2 tokens are used
    args = ["ask", str(files / "clip.mp4"), "q", "--model", str(tiny_model_dir), "--json", "--budget", "1",
            "--max-new-tokens", "2"]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments"] == 2 and out["visual_tokens"] == 2
    assert out["warnings"] == [
        "visual token budget 1 is below the video's 2 segments: every segment keeps at least one token, "
        "so 2 visual tokens were used, more than the budget"
    ]
    assert cli.main([*args[:-4], "--budget", "6", "--max-new-tokens", "2"]) == 0  # 2 x 4 > 6: minimum lowered to 3
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] <= 6
    assert out["warnings"] == ["visual token budget 6 is below 2 segments x 4 tokens: the minimum per segment was lowered to 3"]


def test_empty_answer_of_the_demo_model_is_explained():
    assert "demo model is random" in cli.answer_text("  ", demo=True)
    assert cli.answer_text("", demo=False) == "answer: '' (the model generated no text)"
    assert cli.answer_text("red", demo=True) == "red"


def test_ctrl_c_is_one_line_and_exit_130(files, capsys, monkeypatch):
    from transformers_tempo import video_loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_loading, "load_video", interrupted)
    assert cli.main(["ask", str(files / "clip.mp4"), "q", "--model", str(files / "fake-model")]) == 130
    assert capsys.readouterr().err == "tempo: interrupted\n"


def test_ctrl_c_in_batch_keeps_the_answers_and_the_next_run_resumes(tiny_model_dir, files, tmp_path, capsys, monkeypatch):
    from transformers_tempo.cli import batch_job as batch

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "video": str(files / "clip.mp4"), "question": f"q{i}"}) + "\n" for i in range(3)))
    output = tmp_path / "answers.jsonl"
    args = ["batch", "--input", str(items), "--output", str(output), "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    real_ask, calls = batch._ask, []

    def ask_then_interrupt(vqa, loaded, call):
        calls.append(loaded[0][0]["id"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_ask(vqa, loaded, call)

    monkeypatch.setattr(batch, "_ask", ask_then_interrupt)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert err.endswith("tempo: interrupted (the answers written so far are kept: run the same command again to resume)\n")
    kept = [json.loads(line) for line in batch.part_path(output, 0).read_text().splitlines()]
    assert [r["id"] for r in kept] == [0] and "answer" in kept[0]
    monkeypatch.setattr(batch, "_ask", real_ask)
    assert cli.main(args) == 0
    done = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in done] == [0, 1, 2] and done[0] == kept[0]
    assert not batch.part_path(output, 0).exists()


def test_each_warning_is_shown_once_and_kept_in_the_json(tiny_model_dir, tmp_path, capsys):
    # A Matroska file cut short: its frame count is missing (normal for the format: not a warning)
    # and its sampled frames past the cut cannot be decoded (a warning, shown once).
    whole = write_test_video(tmp_path / "whole.mkv", num_frames=60, fps=10, width=64, height=48)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    args = ["ask", str(cut), "q", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    shown = [line for line in (captured.out + captured.err).splitlines() if "cut.mkv" in line and "video:" not in line]
    assert len(shown) >= 1 and all(line.startswith("warning: ") for line in shown)
    assert len(set(shown)) == len(shown)  # none twice
    assert "frame count" not in captured.out + captured.err
    assert cli.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["warnings"] == [line.removeprefix("warning: ") for line in shown]


def test_hub_probe_is_a_short_connection_and_trusts_a_proxy(monkeypatch):
    import socket

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    assert REAL_HUB_PROBE(timeout=2.0) is False
    assert calls == [(("hub.example.org", 443), 2.0)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert REAL_HUB_PROBE() is True and len(calls) == 1
