import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, GenerationConfig

import transformers_tempo  # noqa: F401  (registers the Auto classes)
from transformers_tempo import TempoConfig, TempoForConditionalGeneration, allocate_tokens, generation_tempo, modeling_tempo
from transformers_tempo.testing_utils import build_tiny_model, tiny_tempo_config


def capture_compressor_lm(model):
    """Record the inputs and output of the compressor's language model on each call."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({**kwargs, "last_hidden_state": output.last_hidden_state})

    handle = model.model.compressor.language_model.register_forward_hook(hook, with_kwargs=True)
    return calls, handle


# ---------------------------------------------------------------------------- config
def test_tempo_6b_preset_matches_released_architecture():
    config = TempoConfig.tempo_6b()
    vision = config.compressor_config.vision_config
    ctext = config.compressor_config.text_config
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (24, 1024, 2048)
    assert list(vision.deepstack_visual_indexes) == [5, 11, 17]
    assert (ctext.hidden_size, ctext.num_hidden_layers, ctext.num_attention_heads, ctext.num_key_value_heads) == (
        2048,
        28,
        16,
        8,
    )
    assert ctext.rope_parameters["mrope_section"] == [24, 20, 20]
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (2560, 36, 9728, 151936)
    assert text.tie_word_embeddings and config.tie_word_embeddings
    assert config.num_memory_tokens == 128 and config.projector_type == "mlp2x_gelu"
    assert (config.visual_token_budget, config.min_tokens_per_segment, config.token_selection) == (8192, 4, "head")
    assert (config.max_context_length, config.reserved_context_tokens) == (32768, 16)
    assert (config.video_token_id, config.image_token_id) == (151656, 151655)


def test_config_round_trip_and_auto(tmp_path, tokenizer):
    config = tiny_tempo_config(tokenizer, visual_token_budget=123)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TempoConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    # sub-configs accepted as objects too
    again = TempoConfig(compressor_config=config.compressor_config, text_config=config.text_config)
    assert again.compressor_config.text_config.hidden_size == 64


def test_config_rejects_bad_values(tokenizer):
    with pytest.raises(ValueError, match="projector_type"):
        tiny_tempo_config(tokenizer, projector_type="mlp9x")
    with pytest.raises(ValueError, match="min_tokens_per_segment"):
        tiny_tempo_config(tokenizer, min_tokens_per_segment=17)


# ---------------------------------------------------------------------------- compressor
def test_memory_tokens_follow_each_rows_own_prompt(tiny_model, hand_inputs):
    inputs = hand_inputs([3])
    lengths = inputs.compressor_attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "rows must differ in length for this test"
    calls, handle = capture_compressor_lm(tiny_model)
    with torch.no_grad():
        tiny_model.compress(
            inputs.compressor_input_ids,
            inputs.compressor_attention_mask,
            pixel_values_videos=inputs.pixel_values_videos,
            video_grid_thw=inputs.video_grid_thw,
            compressor_batch_size=8,
        )
    handle.remove()
    (call,) = calls
    embeds, mask, positions = call["inputs_embeds"], call["attention_mask"], call["position_ids"]
    memory = tiny_model.model.memory_tokens
    m = memory.shape[0]
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(embeds[row, length : length + m], memory)
        assert mask[row, : length + m].all() and not mask[row, length + m :].any()
        # memory tokens count as text for M-RoPE: all three axes continue from the prompt's end
        last = positions[:, row, length - 1].max()
        expected = last + 1 + torch.arange(m)
        for axis in range(3):
            assert torch.equal(positions[axis, row, length : length + m], expected)


def test_relevance_is_sigmoid_of_relevance_vector_dot_hidden(tiny_model, hand_inputs):
    inputs = hand_inputs([3])
    calls, handle = capture_compressor_lm(tiny_model)
    with torch.no_grad():
        out = tiny_model.compress(
            inputs.compressor_input_ids,
            inputs.compressor_attention_mask,
            pixel_values_videos=inputs.pixel_values_videos,
            video_grid_thw=inputs.video_grid_thw,
        )
    handle.remove()
    hidden = torch.cat([c["last_hidden_state"] for c in calls])
    lengths = inputs.compressor_attention_mask.sum(1)
    r = tiny_model.model.relevance_head.weight[0].double()
    expected = [torch.sigmoid(hidden[i, lengths[i] - 1].double() @ r) for i in range(len(lengths))]
    assert out.relevance_scores.dtype == torch.float32
    torch.testing.assert_close(out.relevance_scores.double(), torch.stack(expected), atol=1e-6, rtol=1e-5)
    # features are the hidden states at the memory positions
    m = tiny_model.config.num_memory_tokens
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out.features[i], hidden[i, length : length + m])


def test_chunked_compression_equals_unchunked(tiny_model, hand_inputs):
    inputs = hand_inputs([5])
    args = (inputs.compressor_input_ids, inputs.compressor_attention_mask)
    kw = dict(pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw)
    with torch.no_grad():
        whole = tiny_model.compress(*args, **kw, compressor_batch_size=100)
        chunked = tiny_model.compress(*args, **kw, compressor_batch_size=2)
    torch.testing.assert_close(chunked.features, whole.features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.relevance_scores, whole.relevance_scores, atol=1e-6, rtol=1e-5)


def test_vision_features_reach_the_compressor(tiny_model, hand_inputs):
    inputs = hand_inputs([2])
    kw = dict(video_grid_thw=inputs.video_grid_thw)
    with torch.no_grad():
        a = tiny_model.compress(inputs.compressor_input_ids, inputs.compressor_attention_mask, pixel_values_videos=inputs.pixel_values_videos, **kw)
        b = tiny_model.compress(inputs.compressor_input_ids, inputs.compressor_attention_mask, pixel_values_videos=inputs.pixel_values_videos + 1, **kw)
    assert not torch.allclose(a.features, b.features)


# ---------------------------------------------------------------------------- forward
def test_forward_shapes_allocation_and_loss(tiny_model, hand_inputs):
    inputs = hand_inputs([3, 0], answer="The video is red.", padding_side="right")
    with torch.no_grad():
        out = tiny_model(**inputs.model_inputs(with_labels=True), use_ata=True, visual_token_budget=20)
    assert out.relevance_scores.shape == (3,)
    assert out.segment_sample_index.tolist() == [0, 0, 0]
    expected_alloc = allocate_tokens(out.relevance_scores, budget=20, min_tokens=4, max_tokens=16)
    assert torch.equal(out.token_allocation, expected_alloc)
    text_len = inputs.attention_mask.sum(1)
    widened = text_len[0] - 3 + expected_alloc.sum()
    assert out.logits.shape == (2, int(max(widened, text_len[1])), tiny_model.config.text_config.vocab_size)
    # loss: cross entropy over the answer tokens, which sit at the end of each row (right padding)
    logits, labels_list = out.logits, []
    for b in range(2):
        n = int(widened if b == 0 else text_len[1])
        lab = inputs.labels[b, : text_len[b]]
        answer = lab[lab != -100]
        labels_list.append((b, n, answer))
    losses = []
    for b, n, answer in labels_list:
        k = answer.numel()
        losses.append(F.cross_entropy(logits[b, n - k - 1 : n - 1], answer, reduction="sum"))
    expected_loss = sum(losses) / sum(a.numel() for _, _, a in labels_list)
    torch.testing.assert_close(out.loss, expected_loss)


def test_use_ata_false_keeps_all_memory_features(tiny_model, hand_inputs):
    inputs = hand_inputs([4])
    with torch.no_grad():
        out = tiny_model(**inputs.model_inputs(), use_ata=False)
    assert out.token_allocation.tolist() == [16] * 4
    assert out.logits.shape[1] == int(inputs.attention_mask.sum()) - 4 + 4 * 16


def test_training_mode_keeps_all_features_unless_asked(hand_inputs, tokenizer):
    model = build_tiny_model(tokenizer)
    inputs = hand_inputs([4])
    model.train()
    assert model(**inputs.model_inputs()).token_allocation.tolist() == [16] * 4
    assert model(**inputs.model_inputs(), use_ata=True, visual_token_budget=20).token_allocation.sum() <= 20


def test_ata_defaults_come_from_generation_config(hand_inputs, tokenizer):
    model = build_tiny_model(tokenizer)
    inputs = hand_inputs([4])
    model.generation_config.visual_token_budget = 16
    with torch.no_grad():
        assert model(**inputs.model_inputs()).token_allocation.tolist() == [4] * 4
        # a per-call option wins over the saved default
        assert model(**inputs.model_inputs(), visual_token_budget=1000).token_allocation.max() == 16


def test_invalid_ata_options_raise(tiny_model, hand_inputs):
    inputs = hand_inputs([2])
    with pytest.raises(ValueError, match="visual_token_budget"):
        tiny_model(**inputs.model_inputs(), visual_token_budget=0)
    with pytest.raises(ValueError, match="min_tokens_per_segment"):
        tiny_model(**inputs.model_inputs(), min_tokens_per_segment=99)


def test_placeholder_row_mismatch_is_an_error(tiny_model, hand_inputs):
    inputs = hand_inputs([3]).model_inputs()
    inputs["compressor_input_ids"] = inputs["compressor_input_ids"][:2]
    inputs["compressor_attention_mask"] = inputs["compressor_attention_mask"][:2]
    with pytest.raises(ValueError, match="3 visual placeholders but 2 compressor rows"):
        tiny_model(**inputs)


def test_labels_are_ignored_over_visual_positions(tiny_model, hand_inputs):
    inputs = hand_inputs([2], answer="red", padding_side="right")
    with torch.no_grad():
        prepared = tiny_model.model.prepare_decoder_inputs(
            **inputs.model_inputs(with_labels=True), use_ata=False, visual_token_budget=64, min_tokens_per_segment=4,
            token_selection="head",
        )
    answer = tokenizer_answer = inputs.labels[inputs.labels != -100]
    assert torch.equal(prepared.labels[prepared.labels != -100], tokenizer_answer)
    assert prepared.labels.shape[1] == inputs.input_ids.shape[1] - 2 + 2 * 16
    assert answer.numel() > 0


def test_context_limit_cuts_the_visual_part_at_its_end(tokenizer, hand_inputs):
    model = build_tiny_model(tokenizer)
    inputs = hand_inputs([3])
    text_only_len = int(inputs.attention_mask.sum()) - 3 - int(inputs.timestamp_mask.sum())
    visual_len = int(inputs.timestamp_mask.sum()) + 3 * 16
    model.config.max_context_length = text_only_len + visual_len - 10 + model.config.reserved_context_tokens
    with torch.no_grad():
        full = build_tiny_model(tokenizer).model.prepare_decoder_inputs(
            **inputs.model_inputs(), use_ata=False, visual_token_budget=64, min_tokens_per_segment=4, token_selection="head"
        )
        cut = model.model.prepare_decoder_inputs(
            **inputs.model_inputs(), use_ata=False, visual_token_budget=64, min_tokens_per_segment=4, token_selection="head"
        )
    assert cut.inputs_embeds.shape[1] == full.inputs_embeds.shape[1] - 10
    # the last 10 visual positions (the end of the last segment's features) are gone; the text after stays
    tail = inputs.input_ids.shape[1] - int(inputs.input_ids[0].eq(tokenizer.convert_tokens_to_ids("<|video_pad|>")).nonzero().max()) - 1
    torch.testing.assert_close(cut.inputs_embeds[0, -tail:], full.inputs_embeds[0, -tail:])
    torch.testing.assert_close(cut.inputs_embeds[0, : -tail], full.inputs_embeds[0, : -tail - 10])


# ---------------------------------------------------------------------------- generate
def greedy_by_hand(model, inputs, steps, **options):
    """Greedy decoding without a KV cache: re-run the whole decoder each step."""
    opts = dict(use_ata=True, visual_token_budget=model.generation_config.visual_token_budget, min_tokens_per_segment=4, token_selection="head")
    opts.update(options)
    prepared = model.model.prepare_decoder_inputs(**inputs, padding_side="left", **opts)
    embeds, mask = prepared.inputs_embeds, prepared.attention_mask
    tokens = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


def test_generate_greedy_equals_step_by_step_forward(tiny_model, hand_inputs):
    inputs = hand_inputs([3]).model_inputs()
    with torch.no_grad():
        generated = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
        expected = greedy_by_hand(tiny_model, inputs, 6)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])  # the prompt leads, as in transformers
    assert torch.equal(generated[:, prompt_length:], expected)


def test_sample_alone_equals_sample_in_a_batch(tiny_model, hand_inputs):
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        alone_inputs = hand_inputs([2], seed=1).model_inputs()
        alone = tiny_model.generate(**alone_inputs, **kw)
        # the same sample (seed 1, first) next to a longer video and a text-only prompt
        batch_inputs = hand_inputs([2, 5, 0], seed=1)
        batch = tiny_model.generate(**batch_inputs.model_inputs(), return_dict_in_generate=True, **kw)
    batch_prompt = batch_inputs.model_inputs()["input_ids"].shape[1]
    assert torch.equal(batch.sequences[0, batch_prompt:], alone[0, alone_inputs["input_ids"].shape[1] :])
    assert batch.segment_sample_index.tolist() == [0, 0, 1, 1, 1, 1, 1]
    # each video gets its own budget
    alloc = batch.token_allocation
    assert alloc[:2].sum() <= tiny_model.generation_config.visual_token_budget
    assert alloc[2:].sum() <= tiny_model.generation_config.visual_token_budget


def test_generate_beam_search_sampling_image_and_text(tiny_model, hand_inputs):
    inputs = hand_inputs([2, "image", 0]).model_inputs()
    with torch.no_grad():
        beams = tiny_model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None)
        torch.manual_seed(0)
        s1 = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=None)
        torch.manual_seed(0)
        s2 = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=None)
        out = tiny_model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, eos_token_id=None)
    prompt_length = inputs["input_ids"].shape[1]
    assert beams.shape == (3, prompt_length + 4) and s1.shape == (3, prompt_length + 4)
    assert torch.equal(s1, s2)
    # images keep all features and skip ATA
    assert out.token_allocation.tolist()[-1] == 16
    assert out.segment_sample_index.tolist() == [0, 0, 1]


def test_generate_text_only(tiny_model, hand_inputs):
    inputs = hand_inputs([0]).model_inputs()
    with torch.no_grad():
        out = tiny_model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3, eos_token_id=None)
        plain = greedy_by_hand(tiny_model, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, 3)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], plain)


def test_generate_stops_on_eos(tiny_model, tokenizer, hand_inputs):
    assert tiny_model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    inputs = hand_inputs([2]).model_inputs()
    with torch.no_grad():
        prompt_length = inputs["input_ids"].shape[1]
        free = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=None)[:, prompt_length:]
        stopped = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=int(free[0, 2]))[:, prompt_length:]
    first_hit = int((free[0] == free[0, 2]).nonzero()[0])
    assert torch.equal(stopped[0], free[0, : first_hit + 1])


# ---------------------------------------------------------------------------- save / load / auto
def test_save_load_gives_identical_logits(tmp_path, tiny_model, hand_inputs):
    inputs = hand_inputs([3]).model_inputs()
    tiny_model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is TempoForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is TempoForConditionalGeneration
    with torch.no_grad():
        a = tiny_model(**inputs).logits
        b = loaded.eval()(**inputs).logits
    assert torch.equal(a, b)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()


def test_bfloat16_keeps_relevance_in_float32(tmp_path, tiny_model, hand_inputs):
    tiny_model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.relevance_head.weight.dtype == torch.float32
    assert model.model.memory_tokens.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**hand_inputs([2]).model_inputs())
    assert out.relevance_scores.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16


def test_eager_and_sdpa_agree(tmp_path, tiny_model, hand_inputs):
    tiny_model.save_pretrained(tmp_path)
    inputs = hand_inputs([2]).model_inputs()  # one sample: no padded positions to compare
    eager = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        a, b = eager(**inputs), sdpa(**inputs)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_same_loss_and_grads(tokenizer, hand_inputs):
    inputs = hand_inputs([2], answer="The video is red.", padding_side="right").model_inputs(with_labels=True)
    plain = build_tiny_model(tokenizer).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.model.compressor.language_model.gradient_checkpointing
    assert ckpt.model.compressor.visual.gradient_checkpointing
    assert ckpt.model.language_model.gradient_checkpointing
    l1 = plain(**inputs).loss
    l1.backward()
    l2 = ckpt(**inputs).loss
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert plain.model.memory_tokens.grad is not None and plain.model.memory_tokens.grad.abs().sum() > 0


def test_released_rotary_rounding_matches_fp16_then_bf16(tokenizer):
    model = build_tiny_model(tokenizer)
    rotary = model.model.compressor.language_model.rotary_emb
    before = rotary.inv_freq.clone()
    model.apply_released_rotary_rounding()
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, before.half().bfloat16().float())
    assert not torch.equal(rotary.inv_freq, before)


def test_device_map_auto_no_split_modules(tmp_path, tiny_model):
    pytest.importorskip("accelerate")
    tiny_model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, device_map="auto").eval()
    assert set(model._no_split_modules) >= {"Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer", "Qwen3DecoderLayer"}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        placed = model(input_ids=ids.to(model.device)).logits.cpu()  # "auto" puts it on a GPU if there is one
        expected = tiny_model(input_ids=ids).logits
    if model.device.type == "cpu":
        assert torch.equal(placed, expected)
    else:  # another device's kernels round differently
        torch.testing.assert_close(placed, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_on_gpu_matches_cpu(tiny_model, hand_inputs):
    inputs = hand_inputs([3]).model_inputs()
    with torch.no_grad():
        cpu = tiny_model.generate(**inputs, max_new_tokens=4, eos_token_id=None)
        gpu_model = copy.deepcopy(tiny_model).cuda()
        gpu = gpu_model.generate(**{k: v.cuda() for k, v in inputs.items()}, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_host_pixels_uploaded_ahead_give_the_device_pixels_result(tiny_model, hand_inputs):
    """Chunks of pinned host patches go up on a side stream one chunk ahead; the result is that of
    patches already on the GPU, for `compress` and `encode_video_features` alike."""
    inputs = hand_inputs([5])
    gpu_model = copy.deepcopy(tiny_model).cuda()
    args = (inputs.compressor_input_ids.cuda(), inputs.compressor_attention_mask.cuda())
    grid = inputs.video_grid_thw.cuda()
    pinned = inputs.pixel_values_videos.pin_memory()
    with torch.no_grad():
        on_device = gpu_model.compress(*args, pixel_values_videos=pinned.cuda(), video_grid_thw=grid, compressor_batch_size=2)
        ahead = gpu_model.compress(*args, pixel_values_videos=pinned, video_grid_thw=grid, compressor_batch_size=2)
        features = gpu_model.encode_video_features(pinned, grid, compressor_batch_size=2)
        reused = gpu_model.compress(*args, video_grid_thw=grid, video_features=features, compressor_batch_size=2)
    assert torch.equal(ahead.features, on_device.features)
    assert torch.equal(ahead.relevance_scores, on_device.relevance_scores)
    assert torch.equal(reused.features, on_device.features)


def test_compress_progress_bar_same_result(tiny_model, hand_inputs, capsys):
    inputs = hand_inputs([3])
    args = (inputs.compressor_input_ids, inputs.compressor_attention_mask)
    kw = dict(pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw)
    with torch.no_grad():
        quiet = tiny_model.compress(*args, **kw)
        assert "compressing segments" not in capsys.readouterr().err
        shown = tiny_model.compress(*args, **kw, progress=True)
    assert "compressing segments" in capsys.readouterr().err
    assert torch.equal(quiet.features, shown.features)


def test_decoding_runs_through_a_plain_qwen3_view_that_shares_weights(tiny_model, hand_inputs):
    lm = tiny_model.plain_decoder()
    assert type(lm).__name__ == "Qwen3ForCausalLM"
    assert lm.model is tiny_model.model.language_model and lm.lm_head is tiny_model.lm_head
    assert tiny_model.plain_decoder() is lm  # built once
    assert not any("_plain_decoder" in name for name in tiny_model.state_dict())
    assert all(p.device.type != "meta" for p in lm.parameters())
    # the view decodes exactly what Tempo's own forward would, step by step, from the spliced embeddings
    inputs = hand_inputs([2]).model_inputs()
    with torch.no_grad():
        prepared = tiny_model.prepare_generation_inputs(**inputs)
        ours = tiny_model.generate(decoder_inputs=prepared, max_new_tokens=3, do_sample=False, eos_token_id=None)
        embeds, mask = prepared.inputs_embeds, prepared.attention_mask
        expected = []
        for _ in range(3):
            logits = tiny_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            expected.append(token)
            embeds = torch.cat([embeds, tiny_model.get_input_embeddings()(token)], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(ours, torch.cat(expected, dim=1))


def test_static_cache_length_is_bucketed_and_never_shrinks():
    from transformers import Qwen3Config, StaticCache

    bucket = generation_tempo.STATIC_CACHE_BUCKET
    config = GenerationConfig(max_new_tokens=32)

    class Decoder:  # what size_static_cache reads of the decoder: its config and its __dict__
        def __init__(self):
            self.config = Qwen3Config(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, num_key_value_heads=1)

    def sized(prompt_length, decoder=None, **kwargs):
        kwargs.setdefault("generation_config", config)
        generation_tempo.size_static_cache(decoder or Decoder(), kwargs, GenerationConfig(), prompt_length)
        cache = kwargs.get("cache")
        if not isinstance(cache, StaticCache):
            return None
        assert kwargs["cache_implementation"] is None  # transformers refuses a cache with an implementation
        return cache.get_max_length()

    assert sized(8287, cache_implementation="static") == 9 * bucket  # 8319 slots needed
    assert sized(8287, cache_implementation="static", max_new_tokens=1) == 9 * bucket  # 8288
    assert sized(bucket - 32, cache_implementation="static") == bucket  # exactly full
    assert sized(bucket - 31, cache_implementation="static") == 2 * bucket
    assert sized(100, cache_implementation="static", max_cache_len=5000) == 5000  # the caller's floor
    assert sized(100) is None  # dynamic cache: nothing to size
    assert sized(100, generation_config=GenerationConfig(cache_implementation="static", max_cache_len=3000, max_new_tokens=8)) == 3000
    assert sized(100, generation_config=GenerationConfig(cache_implementation="static")) is None  # no max_new_tokens: transformers sizes it
    assert sized(100, generation_config=GenerationConfig(cache_implementation="static", max_new_tokens=8)) == bucket
    mine = StaticCache(config=Decoder().config, max_cache_len=77)
    kwargs = {"cache": mine, "cache_implementation": "static", "generation_config": config}
    generation_tempo.size_static_cache(Decoder(), kwargs, GenerationConfig(), 100)
    assert kwargs["cache"] is mine and kwargs["cache_implementation"] == "static"  # the caller's cache: untouched
    decoder = Decoder()  # a long video, then a short one: the cache keeps the longer length
    assert sized(3 * bucket, decoder, cache_implementation="static") == 4 * bucket
    assert sized(100, decoder, cache_implementation="static") == 4 * bucket


@pytest.mark.parametrize("with_input_ids", [True, False])
def test_static_cache_generate_sizes_the_cache_to_the_spliced_prompt_and_gives_the_same_tokens(
    tiny_model, hand_inputs, monkeypatch, with_input_ids
):
    """`generate(**inputs)` hands transformers the text ids along with the spliced embeddings; the
    cache is sized to the embeddings and the new tokens alone, as without the ids."""
    from transformers import Qwen3ForCausalLM

    monkeypatch.setattr(generation_tempo, "STATIC_CACHE_BUCKET", 16)
    model = copy.deepcopy(tiny_model)
    model.plain_decoder().__dict__.pop(generation_tempo._LAST_CACHE_SLOTS, None)  # forget earlier tests' lengths
    inputs = hand_inputs([3, 2]).model_inputs()
    gen = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    with torch.no_grad():
        prepared = model.prepare_generation_inputs(**inputs)
        call = inputs if with_input_ids else {"decoder_inputs": prepared}
        dynamic = model.generate(**call, **gen)
        spliced = prepared.inputs_embeds.shape[1]
        assert spliced > inputs["input_ids"].shape[1]
        with mock.patch.object(Qwen3ForCausalLM, "_prepare_static_cache", side_effect=AssertionError("sized by transformers")):
            static = model.generate(**call, cache_implementation="static", **gen)
    assert static.cache.get_max_length() == -(-(spliced + 4) // 16) * 16
    assert torch.equal(static.sequences, dynamic.sequences)


def test_enable_compiled_inference_compiles_compressor_and_decoder_and_selects_static_cache(tiny_model, monkeypatch):
    model = copy.deepcopy(tiny_model)
    compiled = []
    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_compressor", lambda self, **kw: compiled.append(kw))
    monkeypatch.setattr(modeling_tempo.TempoModel, "compile_decoder", lambda self, **kw: compiled.append(("decoder", kw)))
    assert model.enable_compiled_inference(mode="max-autotune") is model
    assert compiled == [{"mode": "max-autotune"}, ("decoder", {"mode": "max-autotune"})]
    assert model.generation_config.cache_implementation == "static"
    assert tiny_model.generation_config.cache_implementation != "static"
