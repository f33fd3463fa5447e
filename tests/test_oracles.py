"""The decoder's input built by hand, independently of the model's splice.

Starting from what the compressor returns (`model.compress`), the test computes ATA per video,
projects the memory features with the projector's own weights, and lays out every row token by
token: text tokens are embedding rows, each placeholder becomes the first (or last) k projected
features of its compressor row, labels are -100 over them, the context limit drops the last
visual positions (timestamps included) and then caps the whole row, and rows are padded on the
requested side. The model's `inputs_embeds`, attention mask, labels, positions and loss must be
exactly that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformers_tempo import allocate_tokens
from transformers_tempo.testing_utils import build_tiny_model

BUDGET, MIN_TOKENS = 24, 4


def project_by_hand(model, features):
    """The projector (Linear, GELU, Linear) written with its weights, on all (S, M, Dc) features."""
    proj = model.model.projector
    x = F.linear(features, proj.linear_1.weight, proj.linear_1.bias)
    if proj.linear_2 is not None:
        x = F.linear(F.gelu(x), proj.linear_2.weight, proj.linear_2.bias)
    return x


def oracle(model, inputs, compressed, *, padding_side, use_ata=True, budget=BUDGET, selection="head"):
    """(embeds, mask, labels, allocation) the decoder should get, laid out by hand."""
    cfg = model.config
    m = cfg.num_memory_tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ts = inputs.get("timestamp_mask", torch.zeros_like(ids))
    labels = inputs.get("labels")
    table = model.get_input_embeddings().weight
    is_placeholder = lambda t: t in (cfg.video_token_id, cfg.image_token_id)  # noqa: E731

    # rows of the compressor, in the order the placeholders appear (sample by sample, left to right)
    row_owner, row_is_video = [], []
    for b in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if mask[b, j] and is_placeholder(int(ids[b, j])):
                row_owner.append(b)
                row_is_video.append(int(ids[b, j]) == cfg.video_token_id)
    allocation = [m] * len(row_owner)
    if use_ata:
        for b in sorted(set(row_owner)):  # each video on its own budget
            rows = [r for r, (o, v) in enumerate(zip(row_owner, row_is_video)) if o == b and v]
            if rows:
                counts = allocate_tokens(compressed.relevance_scores[rows], budget, MIN_TOKENS, m).tolist()
                for r, k in zip(rows, counts):
                    allocation[r] = k
    projected = project_by_hand(model, compressed.features)

    limit_visual = cfg.max_context_length - cfg.reserved_context_tokens
    rows_out, row = [], 0
    for b in range(ids.shape[0]):
        seq = []  # (embedding, is_visual, label)
        for j in range(ids.shape[1]):
            if not mask[b, j]:
                continue
            token = int(ids[b, j])
            if is_placeholder(token):
                k = allocation[row]
                kept = range(k) if selection == "head" else range(m - k, m)
                seq += [(projected[row, i], True, -100) for i in kept]
                row += 1
            else:
                seq.append((table[token], bool(ts[b, j]), int(labels[b, j]) if labels is not None else -100))
        num_visual = sum(v for _, v, _ in seq)
        room = max(limit_visual - (len(seq) - num_visual), 0)
        drop = max(num_visual - room, 0)
        visual_seen, kept_seq = 0, []
        for item in seq:
            if item[1]:
                visual_seen += 1
                if visual_seen > num_visual - drop:
                    continue
            kept_seq.append(item)
        rows_out.append(kept_seq[: cfg.max_context_length])

    width = max(len(r) for r in rows_out)
    embeds = torch.zeros(len(rows_out), width, table.shape[1], dtype=table.dtype)
    new_mask = torch.zeros(len(rows_out), width, dtype=torch.long)
    new_labels = torch.full((len(rows_out), width), -100, dtype=torch.long)
    for b, seq in enumerate(rows_out):
        start = width - len(seq) if padding_side == "left" else 0
        for i, (e, _, lab) in enumerate(seq):
            embeds[b, start + i] = e
            new_mask[b, start + i] = 1
            new_labels[b, start + i] = lab
    return embeds, new_mask, new_labels, torch.tensor(allocation)


def compress(model, inputs):
    if "compressor_input_ids" not in inputs:
        return None
    return model.compress(
        inputs["compressor_input_ids"],
        inputs["compressor_attention_mask"],
        pixel_values_videos=inputs.get("pixel_values_videos"),
        video_grid_thw=inputs.get("video_grid_thw"),
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
    )


def capture_decoder(model):
    """What the decoder body is called with (inputs_embeds, attention_mask, position_ids)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(dict(kwargs))

    return calls, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def hand_loss(logits, labels):
    """Mean next-token cross entropy over the labelled positions."""
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = shift_labels != -100
    return F.cross_entropy(shift_logits[keep].float(), shift_labels[keep])


def assert_decoder_call(call, embeds, mask):
    assert torch.equal(call["inputs_embeds"], embeds)
    assert torch.equal(call["attention_mask"], mask)
    positions = call["position_ids"]
    for b in range(mask.shape[0]):
        valid = mask[b].bool()
        assert torch.equal(positions[b, valid], torch.arange(int(valid.sum())))


# ------------------------------------------------------------------------------ relevance
def test_relevance_reads_the_token_before_the_memory_tokens(tiny_model, hand_inputs):
    """sigmoid(r . h) with h the compressor's last hidden state at each row's last prompt token,
    taken from the compressor's own output (hooked), in float64."""
    inputs = hand_inputs([3, "image"]).model_inputs()
    states = []
    handle = tiny_model.model.compressor.language_model.register_forward_hook(
        lambda module, args, output: states.append(output.last_hidden_state)
    )
    try:
        with torch.no_grad():
            compressed = compress(tiny_model, inputs)
    finally:
        handle.remove()
    lengths = inputs["compressor_attention_mask"].sum(1).tolist()
    is_video = (inputs["compressor_input_ids"] == tiny_model.config.compressor_config.video_token_id).any(1)
    rows = is_video.nonzero().flatten().tolist() + (~is_video).nonzero().flatten().tolist()  # video chunks first
    hidden = [h for chunk in states for h in chunk]
    r = tiny_model.model.relevance_head.weight[0].double()
    expected = torch.empty(len(rows), dtype=torch.float64)
    for h, row in zip(hidden, rows):
        expected[row] = torch.sigmoid(h[lengths[row] - 1].double() @ r)
    torch.testing.assert_close(compressed.relevance_scores.double(), expected, atol=1e-6, rtol=1e-5)
    m = tiny_model.config.num_memory_tokens
    for h, row in zip(hidden, rows):  # the features are the M positions right after the prompt
        assert torch.equal(compressed.features[row], h[lengths[row] : lengths[row] + m])


CASES = {
    "videos-left": dict(samples=[3, 2], padding_side="left"),
    "videos-right": dict(samples=[2, 4], padding_side="right"),
    "video-image-text-left": dict(samples=[3, "image", 0], padding_side="left"),
    "text-video-image-right": dict(samples=[0, 2, "image"], padding_side="right"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_feeds_the_decoder_the_hand_built_splice(tiny_model, hand_inputs, case):
    spec = CASES[case]
    built = hand_inputs(spec["samples"], padding_side=spec["padding_side"], answer="The video is red.")
    inputs = built.model_inputs(with_labels=True)
    calls, handle = capture_decoder(tiny_model)
    try:
        with torch.no_grad():
            compressed = compress(tiny_model, inputs)
            out = tiny_model(**inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, use_ata=True)
    finally:
        handle.remove()
    embeds, mask, labels, allocation = oracle(tiny_model, inputs, compressed, padding_side=spec["padding_side"])
    (call,) = calls
    assert_decoder_call(call, embeds, mask)
    assert torch.equal(out.token_allocation, allocation)
    torch.testing.assert_close(out.loss, hand_loss(out.logits, labels))
    # the labels themselves: the answer tokens, at the answer's positions, nothing over visual ones
    with torch.no_grad():
        prepared = tiny_model.model.prepare_decoder_inputs(
            **inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, use_ata=True,
            token_selection="head",
        )
    assert torch.equal(prepared.labels, labels)
    assert torch.equal(prepared.inputs_embeds, embeds)
    # the case really splices: the allocation varies and visual features are in the sequence
    if any(isinstance(s, int) and s > 1 for s in spec["samples"]):
        assert len(set(allocation.tolist())) > 1


def test_tail_selection_through_the_model(tiny_model, hand_inputs):
    inputs = hand_inputs([3, 2], padding_side="left").model_inputs()
    calls, handle = capture_decoder(tiny_model)
    try:
        with torch.no_grad():
            compressed = compress(tiny_model, inputs)
            tiny_model(**inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, token_selection="tail")
            tiny_model(**inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, token_selection="head")
    finally:
        handle.remove()
    tail, head = calls
    embeds, mask, _, _ = oracle(tiny_model, inputs, compressed, padding_side="left", selection="tail")
    assert_decoder_call(tail, embeds, mask)
    embeds_head, _, _, _ = oracle(tiny_model, inputs, compressed, padding_side="left", selection="head")
    assert_decoder_call(head, embeds_head, mask)
    assert not torch.equal(embeds, embeds_head)


def test_generation_inputs_are_the_hand_built_splice_left_padded(tiny_model, hand_inputs):
    inputs = hand_inputs([2, "image", 3, 0], padding_side="right").model_inputs()
    with torch.no_grad():
        compressed = compress(tiny_model, inputs)
        prepared = tiny_model.prepare_generation_inputs(
            **inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, use_ata=True
        )
    embeds, mask, _, allocation = oracle(tiny_model, inputs, compressed, padding_side="left")
    assert torch.equal(prepared.inputs_embeds, embeds)
    assert torch.equal(prepared.attention_mask, mask)
    assert torch.equal(prepared.token_allocation, allocation)
    assert prepared.segment_sample_index.tolist() == [0, 0, 1, 2, 2, 2]


def test_greedy_answer_equals_plain_qwen3_on_the_hand_built_splice(tiny_model, hand_inputs):
    inputs = hand_inputs([3, "image", 0]).model_inputs()
    options = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        compressed = compress(tiny_model, inputs)
        embeds, mask, _, _ = oracle(tiny_model, inputs, compressed, padding_side="left")
        expected = tiny_model.plain_decoder().generate(inputs_embeds=embeds, attention_mask=mask, **options)
        out = tiny_model.generate(
            **inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, use_ata=True, **options
        )
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected)


@pytest.mark.parametrize("where", ["visual", "whole"])
def test_context_limit_cut(tokenizer, hand_inputs, where):
    """`visual`: the limit falls inside the visual part (its end is cut, the question stays);
    `whole`: the text alone is longer than the context, every visual position goes and the row is capped."""
    model = build_tiny_model(tokenizer)
    built = hand_inputs([3, 1], padding_side="right", answer="red")
    inputs = built.model_inputs(with_labels=True)
    ids, mask, ts = built.input_ids, built.attention_mask, built.timestamp_mask
    placeholder = (ids == model.config.video_token_id) | (ids == model.config.image_token_id)
    text_len = int((mask.bool() & (ts == 0) & ~placeholder).sum(1).max())  # longest row's plain text
    if where == "visual":
        model.config.max_context_length = text_len + 20 + model.config.reserved_context_tokens
    else:
        model.config.max_context_length = text_len - 5
    calls, handle = capture_decoder(model)
    try:
        with torch.no_grad():
            compressed = compress(model, inputs)
            out = model(**inputs, visual_token_budget=BUDGET, min_tokens_per_segment=MIN_TOKENS, use_ata=True)
    finally:
        handle.remove()
    embeds, new_mask, labels, _ = oracle(model, inputs, compressed, padding_side="right")
    assert_decoder_call(calls[0], embeds, new_mask)
    assert int(new_mask.sum(1).max()) <= model.config.max_context_length
    uncut, _, _, _ = oracle(build_tiny_model(tokenizer), inputs, compressed, padding_side="right")
    assert embeds.shape[1] < uncut.shape[1]  # the case does cut
    if where == "visual":
        torch.testing.assert_close(out.loss, hand_loss(out.logits, labels))  # the answer survives the cut
    else:
        assert int(new_mask.sum(1).max()) == model.config.max_context_length


# ------------------------------------------------------------------------------ ATA per video
def test_each_video_gets_its_own_budget(tiny_model, hand_inputs):
    """A long and a short video in one batch: one shared budget would squeeze the short one too."""
    budget = 40
    inputs = hand_inputs([6, 2]).model_inputs()
    with torch.no_grad():
        compressed = compress(tiny_model, inputs)
        out = tiny_model(**inputs, visual_token_budget=budget, min_tokens_per_segment=MIN_TOKENS, use_ata=True)
    scores = compressed.relevance_scores
    per_video = torch.cat([allocate_tokens(scores[:6], budget, MIN_TOKENS, 16), allocate_tokens(scores[6:], budget, MIN_TOKENS, 16)])
    shared = allocate_tokens(scores, budget, MIN_TOKENS, 16)
    assert not torch.equal(per_video, shared), "the case must tell per-video and shared budgets apart"
    assert torch.equal(out.token_allocation, per_video)
    assert out.token_allocation[:6].sum() <= budget and out.token_allocation[6:].sum() <= budget
    assert out.token_allocation.sum() > budget  # together they hold more than one budget
