"""Tempo behaves like every other transformers VLM.

In the spirit of transformers' common model, generation and processor tests, written for Tempo:
`TempoModelTester` builds a tiny config and inputs; each test states one convention a user
copying a Qwen3-VL or LLaVA-OneVision model card relies on.
"""

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.video_utils import VideoMetadata

from transformers_tempo.modeling_tempo import TempoForConditionalGeneration, TempoModel
from transformers_tempo.processing_tempo import TempoProcessor
from transformers_tempo.synthetic import make_frames
from transformers_tempo.testing_utils import build_tiny_model, tiny_tempo_config
from transformers_tempo.video_processing_tempo import TempoVideoProcessor

QUESTION = "What colour is the video?"


class TempoModelTester:
    """A tiny Tempo, its processor, and inputs built by that processor."""

    def __init__(self, tokenizer, seed=0, **config_overrides):
        self.tokenizer = tokenizer
        self.model = build_tiny_model(tokenizer, seed=seed, **config_overrides)
        self.processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
        self.frames = make_frames(20, width=64, height=48)  # 10 s at 2 fps: segments of 8, 8 and 4 frames

    def inputs(self, texts=QUESTION, videos="frames", **kwargs):
        videos = self.frames if isinstance(videos, str) and videos == "frames" else videos
        kwargs.setdefault("video_metadata", {"fps": 2.0})
        out = self.processor(text=texts, videos=videos, return_tensors="pt", **kwargs)
        return {k: v for k, v in out.items() if k != "segment_times"}


@pytest.fixture(scope="module")
def tester(tokenizer):
    return TempoModelTester(tokenizer)


def greedy_new_tokens(model, inputs, steps):
    """Greedy decoding by re-running `forward()` on the whole growing prompt, without a cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    prepared = model.prepare_generation_inputs(ids, attention_mask=mask, **visual)
    embeds, mask = prepared.inputs_embeds, prepared.attention_mask
    tokens = []
    for _ in range(steps):
        next_token = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1)
        tokens.append(next_token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(next_token)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


# ------------------------------------------------------------------ outputs
@pytest.mark.parametrize("which", ["TempoModel", "TempoForConditionalGeneration"])
def test_return_dict_false_gives_the_same_values_as_a_tuple(tester, which):
    model = tester.model if which == "TempoForConditionalGeneration" else tester.model.model
    inputs = tester.inputs()
    with torch.no_grad():
        as_dict = model(**inputs, use_cache=False)
        as_tuple = model(**inputs, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_outputs_are_transformers_output_classes(tester):
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    inputs = tester.inputs()
    with torch.no_grad():
        out = tester.model(**inputs)
        body = tester.model.model(**inputs)
    assert isinstance(out, CausalLMOutputWithPast) and isinstance(body, BaseModelOutputWithPast)
    assert out.past_key_values is out.cache is not None  # the name most users know still answers
    assert out.relevance_scores.shape == (3,) and out.token_allocation.shape == (3,)


def test_save_and_load_give_identical_logits(tester, tmp_path):
    tester.model.save_pretrained(tmp_path)
    reloaded = TempoForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tester.model(**inputs).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ generate
def test_model_card_slicing_idiom_gives_the_answer(tester):
    inputs = tester.inputs()
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = tester.model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)
        expected = greedy_new_tokens(tester.model, inputs, 5)
    assert out.shape == (1, prompt_length + 5)
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(out[:, prompt_length:], expected)
    answers = tester.processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    trimmed = [o[len(i) :] for i, o in zip(inputs["input_ids"], out)]  # the other idiom of the model cards
    assert answers == tester.processor.batch_decode(expected, skip_special_tokens=True)
    assert tester.processor.post_process_image_text_to_text(trimmed) == answers


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_with_and_without_cache_equals_forward_loop(tester, use_cache):
    inputs = tester.inputs(texts=[QUESTION, "What happens in the video?"], videos=[tester.frames, None])
    with torch.no_grad():
        out = tester.model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, use_cache=use_cache)
        expected = greedy_new_tokens(tester.model, inputs, 4)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected)


def test_beam_search_and_sampling_do_not_depend_on_the_cache(tester):
    inputs = tester.inputs()
    runs = {}
    with torch.no_grad():
        for use_cache in (True, False):
            beams = tester.model.generate(
                **inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                eos_token_id=None, use_cache=use_cache,
            )
            torch.manual_seed(0)
            sampled = tester.model.generate(
                **inputs, max_new_tokens=4, do_sample=True, top_k=0, eos_token_id=None, use_cache=use_cache
            )
            runs[use_cache] = (beams, sampled)
    prompt_length = inputs["input_ids"].shape[1]
    assert runs[True][0].shape == (2, prompt_length + 4)  # each returned beam starts with its prompt
    assert torch.equal(runs[True][0][:, :prompt_length], inputs["input_ids"].expand(2, -1))
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


def test_a_sample_answers_the_same_alone_and_left_padded_in_a_batch(tester):
    alone = tester.inputs(texts="What happens in the video? Describe the scene.")
    batch = tester.inputs(texts=["What happens in the video? Describe the scene.", "red"], videos=[tester.frames] * 2)
    assert batch["attention_mask"][1, 0] == 0  # the second prompt is shorter: left padded
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        one = tester.model.generate(**alone, **kw)[:, alone["input_ids"].shape[1] :]
        both = tester.model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    assert torch.equal(both[0], one[0])


def test_text_only_prompt_as_inputs_embeds(tester):
    inputs = tester.inputs(texts="What happens in the video?", videos=None)
    embeds = tester.model.get_input_embeddings()(inputs["input_ids"])
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        from_ids = tester.model.generate(**inputs, **kw)
        both = tester.model.generate(**inputs, inputs_embeds=embeds, **kw)
        embeds_only = tester.model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kw)
    assert torch.equal(both, from_ids)
    assert torch.equal(embeds_only, from_ids[:, inputs["input_ids"].shape[1] :])  # embeddings only: new tokens


def test_position_ids_honoured_for_text_and_refused_for_visual_prompts(tester):
    text = tester.inputs(texts="What happens in the video?", videos=None)
    length = text["input_ids"].shape[1]
    with torch.no_grad():
        default = tester.model(**text).logits
        same = tester.model(**text, position_ids=torch.arange(length)[None]).logits
        shifted = tester.model(**text, position_ids=torch.arange(length)[None] + 7).logits
    torch.testing.assert_close(same, default, rtol=0, atol=0)
    assert not torch.allclose(shifted, default)
    visual = tester.inputs()
    positions = torch.arange(visual["input_ids"].shape[1])[None]
    with pytest.raises(ValueError, match="decoder sequence is longer than input_ids"):
        tester.model(**visual, position_ids=positions)
    with pytest.raises(ValueError, match="decoder sequence is longer than input_ids"):
        tester.model.generate(**visual, position_ids=positions, max_new_tokens=2)
    with pytest.raises(ValueError, match="inputs_embeds cannot be given with visual inputs"):
        tester.model.generate(**visual, inputs_embeds=torch.zeros(1, 3, 48), max_new_tokens=2)


class RecordSeen(LogitsProcessor):
    """Records what a logits processor sees at each step."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


def test_context_penalties_see_the_text_prompt(tester):
    inputs = tester.inputs()
    recorder = RecordSeen()
    penalty = 1.7
    with torch.no_grad():
        plain = tester.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=None,
        )
        penalised = tester.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True,
            repetition_penalty=penalty, logits_processor=LogitsProcessorList([recorder]), eos_token_id=None,
        )
    assert torch.equal(recorder.seen[0], inputs["input_ids"])  # the whole text prompt, placeholders included
    raw, got = plain.logits[0][0], penalised.scores[0][0]
    in_prompt = torch.zeros_like(raw, dtype=torch.bool)
    in_prompt[inputs["input_ids"][0].unique()] = True
    expected = torch.where(in_prompt, torch.where(raw > 0, raw / penalty, raw * penalty), raw)
    torch.testing.assert_close(got, expected)


def test_no_deprecation_warning_from_the_readme_idiom(tester, caplog):
    inputs = tester.inputs()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        out = tester.model.generate(**inputs, max_new_tokens=3, visual_token_budget=8)
        tester.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


# ------------------------------------------------------------------ weights, dtypes, attention
def test_relevance_head_stays_float32_in_a_bf16_model(tokenizer, tmp_path):
    config = tiny_tempo_config(tokenizer)
    model = TempoForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert model.model.relevance_head.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = TempoForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.relevance_head.weight.dtype == torch.float32


def test_tied_head_has_the_decoders_tensor_parallel_plan():
    from transformers import Qwen3ForCausalLM

    assert TempoForConditionalGeneration._tp_plan == Qwen3ForCausalLM._tp_plan
    assert TempoForConditionalGeneration._tp_plan["lm_head"] == "colwise_gather_output"


def test_eager_and_sdpa_attention_agree(tokenizer):
    inputs = TempoModelTester(tokenizer).inputs()
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = build_tiny_model(tokenizer, seed=3)
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_get_video_features_is_the_query_free_vision_tower_the_compressor_uses(tester, monkeypatch):
    inputs = tester.inputs()
    pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    with torch.no_grad():
        features = tester.model.get_video_features(pixels, grid)
        direct = tester.model.model.compressor.visual(pixels, grid_thw=grid, return_dict=True)
    assert len(features.pooler_output) == grid.shape[0]  # one tensor per segment
    torch.testing.assert_close(torch.cat(features.pooler_output), direct.pooler_output, rtol=0, atol=0)
    assert len(features.deepstack_features) == len(direct.deepstack_features)
    calls = []
    original = TempoModel.get_video_features
    monkeypatch.setattr(TempoModel, "get_video_features", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with torch.no_grad():
        tester.model.generate(**inputs, max_new_tokens=1)
    assert calls  # the compressor goes through it, so the two cannot drift


# ------------------------------------------------------------------ processor call forms
def _same_inputs(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_a_string_with_a_one_video_list_is_one_sample(tester):
    single = tester.inputs(texts=QUESTION, videos=tester.frames)
    _same_inputs(tester.inputs(texts=QUESTION, videos=[tester.frames]), single)
    _same_inputs(tester.inputs(texts=[QUESTION], videos=[[tester.frames]]), single)
    _same_inputs(tester.inputs(texts=QUESTION, videos=[tester.frames], video_metadata=[{"fps": 2.0}]), single)
    metadata = VideoMetadata(total_num_frames=20, fps=2.0)
    _same_inputs(tester.inputs(texts=QUESTION, videos=[tester.frames], video_metadata=metadata), single)
    assert single["input_ids"].shape[0] == 1 and single["compressor_input_ids"].shape[0] == 3


def test_a_string_with_a_one_image_list_is_one_sample(tester):
    image = Image.fromarray(tester.frames[0])
    single = tester.processor(text=QUESTION, images=image)
    for form in ([image], [[image]]):
        text = QUESTION if len(form) == 1 and not isinstance(form[0], list) else [QUESTION]
        _same_inputs(tester.processor(text=text, images=form), single)
    array = tester.processor(text=QUESTION, images=[np.asarray(image)])
    assert torch.equal(array["pixel_values"], single["pixel_values"])


def test_batches_flat_and_nested_lists_mean_one_entry_per_sample(tester):
    flat = tester.inputs(texts=[QUESTION, "red"], videos=[tester.frames, None])
    nested = tester.inputs(texts=[QUESTION, "red"], videos=[[tester.frames], []])
    _same_inputs(nested, flat)
    assert flat["input_ids"].shape[0] == 2 and flat["compressor_input_ids"].shape[0] == 3


def test_ambiguous_or_mismatched_counts_say_what_was_given(tester):
    with pytest.raises(ValueError, match=r"got 1 text but 2 videos"):
        tester.inputs(texts=QUESTION, videos=[tester.frames, tester.frames])
    with pytest.raises(ValueError, match=r"sample 0: got 2 videos; Tempo takes at most one"):
        tester.inputs(texts=[QUESTION], videos=[[tester.frames, tester.frames]])
    with pytest.raises(ValueError, match=r"got 2 samples but 3 video_metadata entries"):
        tester.inputs(texts=[QUESTION, "red"], videos=[tester.frames] * 2, video_metadata=[{"fps": 2.0}] * 3)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def vqa(tester, tmp_path_factory):
    from transformers import pipeline

    import transformers_tempo  # noqa: F401  (registers the task)

    path = tmp_path_factory.mktemp("tiny-tempo")
    tester.model.save_pretrained(path)
    tester.processor.save_pretrained(path)
    return pipeline("video-question-answering", model=str(path), device="cpu")


@pytest.mark.parametrize("selection", ["head", "tail"])
def test_pipeline_forwards_every_ata_option_and_answers_as_generate(tester, vqa, selection):
    options = {"visual_token_budget": 20, "min_tokens_per_segment": 4, "use_ata": True, "token_selection": selection}
    inputs = tester.inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vqa(video=tester.frames, question=QUESTION, video_metadata={"fps": 2.0}, max_new_tokens=4, **options)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]
    with torch.no_grad():
        ids = tester.model.generate(**inputs, max_new_tokens=4, **options)
    expected = tester.processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out["answer"] == expected[0].strip()
    assert out["visual_tokens"] == 20


def test_pipeline_hands_every_ata_option_to_the_model(vqa, tester, monkeypatch):
    from transformers_tempo.token_allocation import ATA_OPTION_NAMES

    seen = {}
    original = vqa.model.prepare_generation_inputs

    def spy(*args, **kwargs):
        seen.update({k: kwargs.get(k) for k in ATA_OPTION_NAMES})
        return original(*args, **kwargs)

    monkeypatch.setattr(vqa.model, "prepare_generation_inputs", spy)
    options = {"visual_token_budget": 12, "min_tokens_per_segment": 2, "use_ata": True, "token_selection": "tail"}
    vqa(video=tester.frames, question=QUESTION, video_metadata={"fps": 2.0}, max_new_tokens=1, **options)
    assert seen == options


def test_every_entry_point_hands_every_allocation_option_to_the_splice(tester, tmp_path, monkeypatch):
    """model.generate, model(...), generate_streaming and the pipeline (above) all reach the splice
    with the call's four allocation options (one list: token_allocation.ATA_OPTION_NAMES)."""
    from transformers_tempo import generate_streaming
    from transformers_tempo.synthetic import write_test_video
    from transformers_tempo.token_allocation import ATA_OPTION_NAMES

    seen = []
    original = TempoModel.prepare_decoder_inputs

    def spy(self, *args, **kwargs):
        seen.append({name: kwargs.get(name) for name in ATA_OPTION_NAMES})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TempoModel, "prepare_decoder_inputs", spy)
    options = {"visual_token_budget": 12, "min_tokens_per_segment": 2, "use_ata": True, "token_selection": "tail"}
    inputs = tester.inputs()
    clip = write_test_video(tmp_path / "clip.mp4", num_frames=60, fps=10, width=64, height=48)
    with torch.no_grad():
        tester.model.generate(**inputs, max_new_tokens=1, **options)
        tester.model(**inputs, **options)
        generate_streaming(tester.model, tester.processor, str(clip), QUESTION, max_new_tokens=1, **options)
    assert seen == [options] * 3
