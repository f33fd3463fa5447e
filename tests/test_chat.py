"""A conversation about one video: `VideoChat` and `tempo chat`."""

import io

import pytest
import torch

from transformers_tempo import TempoProcessor, TempoVideoProcessor, load_video
from transformers_tempo.chat import VideoChat
from transformers_tempo.modeling_tempo import TempoForConditionalGeneration
from transformers_tempo.synthetic import write_test_video

QUESTIONS = ["What colour is the video?", "What happens?"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("chat") / "clip.mp4", num_frames=60, fps=10, width=64, height=48)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return TempoForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return TempoProcessor.from_pretrained(tiny_model_dir)


def answer_by_hand(model, processor, video, history, question, **kw):
    """The turn's answer computed from the whole conversation with pixels (no reused features)."""
    messages = []
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]})
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs.pop("segment_times")
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_each_turn_sees_the_conversation_and_the_video_is_encoded_once(model, processor, clip, monkeypatch):
    video = load_video(str(clip))
    encodes = []
    original = TempoForConditionalGeneration.encode_video_features
    monkeypatch.setattr(
        TempoForConditionalGeneration, "encode_video_features",
        lambda self, *a, **k: encodes.append(1) or original(self, *a, **k),
    )
    # the tiny random model's greedy answer is blank: forbid newline and special tokens so it says something
    blank = [198] + processor.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=blank)
    chat = VideoChat(model, processor, video, **kw)
    answers = [chat.ask(q) for q in QUESTIONS]
    assert all(answers)
    assert len(encodes) == 1 and chat.history == list(zip(QUESTIONS, answers))
    assert answers[0] == answer_by_hand(model, processor, video, [], QUESTIONS[0], **kw)
    assert answers[1] == answer_by_hand(model, processor, video, [(QUESTIONS[0], answers[0])], QUESTIONS[1], **kw)
    # the second turn's decoder prompt holds the first question and answer; the compressor reads the new one
    turn = processor.apply_chat_template(chat.messages("Who scores?"), add_generation_prompt=True)
    decoder_text = processor.decode(turn["input_ids"][0])
    compressor_text = processor.decode(turn["compressor_input_ids"][0])
    assert QUESTIONS[0] in decoder_text and QUESTIONS[1] in decoder_text and "Who scores?" in decoder_text
    assert "Who scores?" in compressor_text and QUESTIONS[0] not in compressor_text


def test_tempo_chat_answers_each_line_until_exit(tiny_model_dir, model, processor, clip, monkeypatch, capsys):
    from transformers_tempo import cli

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\nexit\nnever asked\n"))
    args = ["chat", str(clip), "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--min-new-tokens", "3",
            "--temperature", "1", "--seed", "7"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    torch.manual_seed(7)  # what --seed does, before the first turn
    chat = VideoChat(model, processor, load_video(str(clip)), max_new_tokens=3, min_new_tokens=3, do_sample=True, temperature=1.0)
    expected = [chat.ask(q) for q in QUESTIONS]
    assert printed == expected and all(expected)  # one line per question; the empty line skipped, exit ends


def test_tempo_chat_bad_video_is_one_line(tmp_path, capsys):
    from transformers_tempo import cli

    assert cli.main(["chat", str(tmp_path / "missing.mp4")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.mp4: no such file")
