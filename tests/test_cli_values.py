"""Options and entry points checked by the values they must produce: the `tempo` command's
--fps, --max-frames, --no-ata, --dtype, --seed and `tempo convert`, the timestamps in the
prompts, `TempoVideoProcessor.__call__`, and ValueError paths of the model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoModel

import transformers_tempo  # noqa: F401  (registers the Auto classes and the task)
from transformers_tempo import TempoProcessor, TempoVideoProcessor, cli
from transformers_tempo.cli import ask as cli_ask
from transformers_tempo.synthetic import write_test_video
from transformers_tempo.testing_utils import build_tiny_model

SECONDS, SOURCE_FPS = 20, 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-tempo-cli")
    model = build_tiny_model(tokenizer)
    model.generation_config.suppress_tokens = list(tokenizer.all_special_ids)  # sampled answers show every token
    model.save_pretrained(path)
    TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-video") / "v.mp4"
    write_test_video(path, num_frames=SECONDS * SOURCE_FPS, fps=SOURCE_FPS, width=64, height=48)
    return str(path)


@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-short-video") / "short.mp4"
    write_test_video(path, num_frames=8 * SOURCE_FPS, fps=SOURCE_FPS, width=64, height=48)  # 16 frames, 2 segments
    return str(path)


def ask(capsys, model_dir, video, *options, question="What happens?"):
    argv = ["ask", video, question, "--model", str(model_dir), "--json", "--max-new-tokens", "3", "--device", "cpu"]
    assert cli.main([*argv, *options]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------ timestamps
def test_timestamps_in_both_prompts(tokenizer):
    """Decoder: one `<t seconds>` per segment, t = its centre (8 i + 4) / fps. Compressor row i: one
    per temporal patch j, the mean of its two frames' times (8 i + 2 j) / fps and (8 i + 2 j + 1) / fps."""
    processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
    fps, frames = 4.0, np.zeros((24, 64, 64, 3), dtype=np.uint8)
    out = processor(text="What?", videos=[frames], video_metadata={"fps": fps}, return_tensors="pt")
    stamp = re.compile(r"<(\d+\.\d) seconds>")
    decoder_text = tokenizer.decode(out["input_ids"][0])
    assert stamp.findall(decoder_text) == [f"{(8 * i + 4) / fps:.1f}" for i in range(3)] == ["1.0", "3.0", "5.0"]
    for i in range(3):
        row = tokenizer.decode(out["compressor_input_ids"][i][out["compressor_attention_mask"][i].bool()])
        times = [((8 * i + 2 * j) / fps + (8 * i + 2 * j + 1) / fps) / 2 for j in range(4)]
        assert stamp.findall(row) == [f"{t:.1f}" for t in times]
    assert out["segment_times"].tolist() == [[0.0, 2.0], [2.0, 4.0], [4.0, 6.0]]


# ------------------------------------------------------------------------------ video processor
def test_video_processor_call(video):
    vp = TempoVideoProcessor()
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 48, 64, 3), dtype=np.uint8))
    out = vp(frames, real_fps=4.0)
    direct = vp.process_video(frames, 4.0)
    assert torch.equal(out["pixel_values_videos"], direct["pixel_values_videos"])
    assert out["video_grid_thw"].tolist() == direct["video_grid_thw"].tolist()
    # 12 frames: a segment of 8 and one of 4, centres (8 i + 4) / 4 s; patch times as above
    assert [row[0] for row in out["video_grid_thw"].tolist()] == [4, 2]
    assert out["segment_centers"] == pytest.approx([1.0, 3.0])
    assert out["segment_frame_timestamps"][1] == pytest.approx([(8 / 4 + 9 / 4) / 2, (10 / 4 + 11 / 4) / 2])
    # a file is loaded at the processor's own rate: 2 fps over 20 s -> 40 frames -> 5 segments
    from_file = vp(video)
    assert from_file["video_grid_thw"].shape[0] == 5
    assert from_file["segment_centers"] == pytest.approx([2.0, 6.0, 10.0, 14.0, 18.0])
    slow = TempoVideoProcessor(fps=1.0)(video)
    assert slow["video_grid_thw"].shape[0] == 3 and slow["segment_centers"] == pytest.approx([4.0, 12.0, 20.0])


def test_fps_and_max_frames_set_the_sampling(capsys, model_dir, video):
    default = ask(capsys, model_dir, video)
    assert default["sampled_frames"] == 2 * SECONDS and default["real_fps"] == pytest.approx(2.0)
    one = ask(capsys, model_dir, video, "--fps", "1")
    assert one["sampled_frames"] == SECONDS and one["real_fps"] == pytest.approx(1.0)
    assert one["segments"] == 3  # 20 frames: 8 + 8 + 4
    assert [d["start"] for d in one["segment_details"]] == pytest.approx([0, 8, 16])
    capped = ask(capsys, model_dir, video, "--max-frames", "16")
    assert capped["sampled_frames"] == 16 and capped["segments"] == 2
    assert capped["real_fps"] == pytest.approx(16 / SECONDS)
    assert [d["start"] for d in capped["segment_details"]] == pytest.approx([0, 10])


def test_no_ata_keeps_every_memory_token(capsys, model_dir, short_video):
    with_ata = ask(capsys, model_dir, short_video, "--budget", "20")
    without = ask(capsys, model_dir, short_video, "--budget", "20", "--no-ata")
    assert [d["kept_tokens"] for d in without["segment_details"]] == [16, 16]
    assert without["visual_tokens"] == 32
    kept = [d["kept_tokens"] for d in with_ata["segment_details"]]
    assert sum(kept) <= 20 and sorted(kept) == [4, 16]  # ATA: the least relevant segment keeps the minimum
    assert [d["relevance"] for d in without["segment_details"]] == pytest.approx(
        [d["relevance"] for d in with_ata["segment_details"]], abs=1e-6
    )


def test_dtype_loads_the_model_in_that_dtype(capsys, model_dir, short_video, monkeypatch):
    loaded = []
    real = cli_ask.load_pipeline
    monkeypatch.setattr(cli_ask, "load_pipeline", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    full = ask(capsys, model_dir, short_video, "--dtype", "float32", "--no-ata")
    half = ask(capsys, model_dir, short_video, "--dtype", "bfloat16", "--no-ata")
    assert [vqa.model.dtype for vqa in loaded] == [torch.float32, torch.bfloat16]
    assert loaded[1].model.model.relevance_head.weight.dtype == torch.float32
    full_scores = [d["relevance"] for d in full["segment_details"]]
    half_scores = [d["relevance"] for d in half["segment_details"]]
    assert half_scores == pytest.approx(full_scores, abs=0.05)  # bf16 tolerance (see test_answers_independent)
    assert half_scores != full_scores  # it did run in bfloat16


def test_seed_fixes_the_sampled_answer(capsys, model_dir, short_video):
    """--seed s --temperature 1: the answer of torch.manual_seed(s) then the model's own sampling."""
    options = ("--temperature", "1.0", "--max-new-tokens", "3")
    answers = {seed: ask(capsys, model_dir, short_video, *options, "--seed", str(seed))["answer"] for seed in (3, 4)}
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = TempoProcessor.from_pretrained(model_dir)
    inputs = processor(text="What happens?", videos=[short_video], return_tensors="pt")
    for seed, answer in answers.items():
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=1.0)
        new = out[:, inputs["input_ids"].shape[1] :]
        assert answer == processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    assert answers[3] != answers[4]


# ------------------------------------------------------------------------------ ValueError paths
def test_model_value_errors(tiny_model, hand_inputs):
    video = hand_inputs([2]).model_inputs()
    image = hand_inputs(["image"]).model_inputs()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        tiny_model.model(input_ids=video["input_ids"], inputs_embeds=torch.zeros(1, 3, 48))
    with pytest.raises(ValueError, match="position_ids cannot be given with visual inputs"):
        tiny_model(**video, position_ids=torch.zeros_like(video["input_ids"]))
    with pytest.raises(ValueError, match="inputs_embeds cannot be given with visual inputs"):
        tiny_model.generate(**video, inputs_embeds=torch.zeros(1, 3, 48), max_new_tokens=1)
    no_grid = {k: v for k, v in video.items() if k != "video_grid_thw"}
    with pytest.raises(ValueError, match="2 compressor rows hold video placeholders, but video_grid_thw was not given"):
        tiny_model(**no_grid)
    no_pixels = {k: v for k, v in video.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    with pytest.raises(ValueError, match="but pixel_values_videos and video_grid_thw were not given"):
        tiny_model(**no_pixels)  # not silently compressed as text
    no_image = {k: v for k, v in image.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="1 compressor rows hold image placeholders, but pixel_values was not given"):
        tiny_model(**no_image)
    with pytest.raises(ValueError, match="1 visual grids for 2 compressor rows"):
        tiny_model(**{**video, "video_grid_thw": video["video_grid_thw"][:1]})
    short = video["compressor_input_ids"].clone()
    first_pad = int((short[0] == tiny_model.config.compressor_config.video_token_id).nonzero()[0])
    short[0, first_pad] = tiny_model.config.text_config.pad_token_id  # one visual token fewer than the pixels give
    tokens = int((video["compressor_input_ids"] == tiny_model.config.compressor_config.video_token_id).sum())
    with pytest.raises(ValueError, match=f"hold {tokens - 1} visual tokens but the pixels give {tokens} features"):
        tiny_model(**{**video, "compressor_input_ids": short})
    both = dict(video)
    ids = both["compressor_input_ids"].clone()
    ids[0, -1] = tiny_model.config.compressor_config.image_token_id
    with pytest.raises(ValueError, match="holds both a video and an image"):
        tiny_model(**{**both, "compressor_input_ids": ids})
    # the decoder says image where the compressor row holds a video
    swapped = video["input_ids"].clone()
    swapped[swapped == tiny_model.config.video_token_id] = tiny_model.config.image_token_id
    with pytest.raises(ValueError, match="disagree on which rows are video"):
        tiny_model(**{**video, "input_ids": swapped})
    assert image["input_ids"].shape[0] == 1  # the image sample itself is accepted
    with torch.no_grad():
        assert tiny_model(**image).token_allocation.tolist() == [16]


# ------------------------------------------------------------------------------ tempo convert
def test_tempo_convert_writes_the_released_values(tmp_path, tokenizer, capsys):
    """`tempo convert` on a tiny checkpoint in the released layout: every converted tensor is the
    released one (float32 here, so exactly), the relevance vector is the base model's Yes row minus
    its No row (subtracted in the dtype the converted config names, bfloat16 by default), and the
    converted model computes the source model's logits."""
    from test_conversion import write_base_qwen3vl, write_released_checkpoint

    source = build_tiny_model(tokenizer, seed=5)
    base_path, tempo_path, out = tmp_path / "base", tmp_path / "released", tmp_path / "converted"
    base = write_base_qwen3vl(base_path, source.config.compressor_config, tokenizer)
    write_released_checkpoint(tempo_path, source, tokenizer, base_path)
    argv = ["convert", "--tempo-path", str(tempo_path), "--qwen3vl-path", str(base_path), "--output-dir", str(out),
            "--dtype", "float32"]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    converted = AutoModel.from_pretrained(out).eval()
    assert converted.dtype == torch.float32
    want = source.state_dict()
    rows = base.get_output_embeddings().weight.detach()[[tokenizer.get_vocab()["Yes"], tokenizer.get_vocab()["No"]]]
    subtract = getattr(converted.config, "relevance_vector_dtype", "bfloat16")
    subtract = getattr(torch, subtract) if isinstance(subtract, str) else subtract
    want["model.relevance_head.weight"] = (rows[0].to(subtract) - rows[1].to(subtract)).float()[None]
    got = converted.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    ids = torch.tensor([tokenizer.encode("What colour is the video?")])
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, source(input_ids=ids).logits)
    # a second run into the now non-empty folder is refused, leaving it as it was
    assert cli.main(argv) != 0
    assert "not empty" in capsys.readouterr().err
