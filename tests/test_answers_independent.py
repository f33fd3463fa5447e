"""Answers checked against computations that are not the code under test.

- the pipeline's and `tempo batch`'s answers are `processor.batch_decode` of the new tokens of
  `model.generate`, called here;
- beam search equals a small beam search written here over `forward()`;
- sampling with a seed equals sampling by hand from the softmax of `forward()` logits with the
  same global generator;
- bfloat16 logits and relevance scores stay within a stated distance of float32.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, pipeline

import transformers_tempo  # noqa: F401  (registers the task)
from transformers_tempo import TempoProcessor, TempoVideoProcessor
from transformers_tempo.cli import main
from transformers_tempo.synthetic import write_test_video
from transformers_tempo.testing_utils import build_tiny_model

NEW_TOKENS = 4
QUESTIONS = ["What colour is the video?", "What happens in the video?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny model with large random weights: peaked distributions, answers that differ per input."""
    path = tmp_path_factory.mktemp("tiny-tempo-answers")
    model = build_tiny_model(tokenizer, seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    # no special token as an answer token: every generated token shows in the decoded answer
    model.generation_config.suppress_tokens = list(tokenizer.all_special_ids)
    model.save_pretrained(path)
    TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def processor(model_dir):
    return TempoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer-videos")
    write_test_video(root / "a.mp4", num_frames=30, fps=10, width=64, height=48)  # 3 s: 8 frames, 1 segment
    write_test_video(root / "b.mp4", num_frames=90, fps=10, width=64, height=48)  # 9 s: 18 frames, 3 segments
    return [str(root / "a.mp4"), str(root / "b.mp4")]


def generated_answers(model, processor, videos, questions, **options):
    """Answers computed here: generate, keep the new tokens, batch_decode."""
    inputs = processor(text=questions, videos=videos, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)], new


def assert_first_token_shows(processor, new_tokens):
    """The case can see a lost first token: it is a real (non-special) token with visible text."""
    for row in new_tokens:
        first = int(row[0])
        assert first not in processor.tokenizer.all_special_ids
        assert processor.decode([first]).strip()


def test_pipeline_answers_are_the_decoded_new_tokens(model_dir, model, processor, videos):
    vqa = pipeline("video-question-answering", model=str(model_dir), device="cpu")
    expected, new = generated_answers(model, processor, [[v] for v in videos], QUESTIONS)
    assert_first_token_shows(processor, new)
    one_by_one = [vqa(video=v, question=q, max_new_tokens=NEW_TOKENS)["answer"] for v, q in zip(videos, QUESTIONS)]
    alone = [generated_answers(model, processor, [[v]], [q])[0][0] for v, q in zip(videos, QUESTIONS)]
    assert one_by_one == alone
    batched = vqa(video=videos, question=QUESTIONS, batch_size=2, max_new_tokens=NEW_TOKENS)
    assert [r["answer"] for r in batched] == expected


def test_tempo_batch_answers_are_the_decoded_new_tokens(model_dir, model, processor, videos, tmp_path, capsys):
    items = [{"id": f"q{i}", "video": v, "question": q} for i, (v, q) in enumerate(zip(videos, QUESTIONS))]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in items))
    output = tmp_path / "out.jsonl"
    argv = ["batch", "--input", str(source), "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    lines = {line["id"]: line for line in map(json.loads, output.read_text().splitlines())}
    for item in items:
        (expected,), new = generated_answers(model, processor, [[item["video"]]], [item["question"]])
        assert_first_token_shows(processor, new)
        assert lines[item["id"]]["answer"] == expected


# ------------------------------------------------------------------------------ decoding by hand
def spliced(model, processor, videos):
    inputs = processor(text=QUESTIONS, videos=videos, return_tensors="pt")
    with torch.no_grad():
        prepared = model.prepare_generation_inputs(**inputs)
    return inputs, prepared.inputs_embeds, prepared.attention_mask


def next_logits(model, embeds, mask, tokens):
    """Last-position logits of the decoder over the spliced prompt plus `tokens`, no cache."""
    if tokens.shape[1]:
        embeds = torch.cat([embeds, model.get_input_embeddings()(tokens)], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    return model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()


def suppress(model, scores):
    """What the generation config's `suppress_tokens` does to the scores: -inf, nothing renormalised."""
    return scores.index_fill(1, torch.tensor(model.generation_config.suppress_tokens), float("-inf"))


def beam_search_by_hand(model, embeds, mask, num_beams, steps):
    """Plain beam search (no end token, so every beam has the same length): keep the num_beams
    best continuations by summed log-probability, return the best one."""
    beams = torch.zeros(1, 0, dtype=torch.long)
    scores = torch.zeros(1)
    for _ in range(steps):
        logits = next_logits(model, embeds.expand(len(beams), -1, -1), mask.expand(len(beams), -1), beams)
        logp = suppress(model, torch.log_softmax(logits, -1))
        total = (scores[:, None] + logp).flatten()
        top = torch.topk(total, num_beams)
        vocab = logp.shape[1]
        beams = torch.cat([beams[top.indices // vocab], (top.indices % vocab)[:, None]], dim=1)
        scores = top.values
    return beams[scores.argmax()]


def test_beam_search_equals_a_beam_search_by_hand(model, processor, videos):
    inputs, embeds, mask = spliced(model, processor, [[v] for v in videos])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False, eos_token_id=None)
        new = out[:, inputs["input_ids"].shape[1] :]
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        for b in range(len(videos)):
            valid = mask[b].bool()
            expected = beam_search_by_hand(model, embeds[b : b + 1, valid], mask[b : b + 1, valid], 3, NEW_TOKENS)
            assert new[b].tolist() == expected.tolist(), b
    assert not torch.equal(new, greedy[:, inputs["input_ids"].shape[1] :]), "the case must tell beams from greedy"


def test_seeded_sampling_equals_sampling_by_hand(model, processor, videos):
    inputs, embeds, mask = spliced(model, processor, [[v] for v in videos])
    temperature, top_k = 0.7, 20
    with torch.no_grad():
        torch.manual_seed(123)
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=temperature, top_k=top_k,
            top_p=None, eos_token_id=None,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        torch.manual_seed(123)
        tokens = torch.zeros(len(videos), 0, dtype=torch.long)
        for _ in range(NEW_TOKENS):
            scores = suppress(model, next_logits(model, embeds, mask, tokens)) / temperature
            kth = torch.topk(scores, top_k).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
            tokens = torch.cat([tokens, torch.multinomial(torch.softmax(scores, -1), 1)], dim=1)
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(new, tokens)
    assert not torch.equal(new, greedy[:, inputs["input_ids"].shape[1] :])  # it did sample


# ------------------------------------------------------------------------------ bfloat16
# Stated tolerance. bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4 %), and the error
# grows through the two networks: measured on this model, logits move by 1.4 % of their standard
# deviation on average and 14 % at most, relevance scores by 0.001. Allowed: 3 % on average,
# 30 % at most, 0.05 for relevance; a splice or dtype bug moves them by the whole spread.
BF16_MEAN_TOLERANCE, BF16_MAX_TOLERANCE, BF16_RELEVANCE_TOLERANCE = 0.03, 0.3, 0.05


def test_bfloat16_results_are_float32_results_within_tolerance(model_dir, model, processor, videos):
    half = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    assert half.dtype == torch.bfloat16 and half.model.relevance_head.weight.dtype == torch.float32
    inputs = processor(text=QUESTIONS, videos=[[v] for v in videos], return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs, use_ata=False)
        low = half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}, use_ata=False)
    assert low.logits.dtype == torch.bfloat16 and low.relevance_scores.dtype == torch.float32
    assert low.logits.shape == full.logits.shape
    spread = full.logits.std()
    difference = (low.logits.float() - full.logits).abs()
    assert 0 < difference.mean() <= BF16_MEAN_TOLERANCE * spread
    assert difference.max() <= BF16_MAX_TOLERANCE * spread
    torch.testing.assert_close(low.relevance_scores, full.relevance_scores, atol=BF16_RELEVANCE_TOLERANCE, rtol=0)
    # the next token agrees wherever float32 prefers it by more than twice the largest allowed error
    last = full.logits[:, -1]
    top2 = last.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_MAX_TOLERANCE * spread
    assert torch.equal(low.logits[:, -1].argmax(-1)[clear], last.argmax(-1)[clear])
