"""TempoProcessor: both prompts token for token, labels, batching, errors, save/load.

Expected token ids are built here independently of the processor: the texts are written out
the way the released code produces them (`conv_qwen` + `tokenizer_image_token` +
`compute_segment_timestamp` for the decoder; `construct_message` + Qwen3-VL's processor for
the compressor) and tokenised piece by piece as the released code does.
"""

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_tempo.processing_tempo import (
    COMPRESSOR_SYSTEM_PROMPT,
    TempoProcessor,
)
from transformers_tempo.synthetic import make_frames, write_test_video
from transformers_tempo.video_loading import load_video
from transformers_tempo.video_processing_tempo import TempoVideoProcessor

FPS2 = {"fps": 2.0}
QUESTION = "What is shown?"
DECODER_BEFORE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
GENERATION = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def processor(tokenizer):
    return TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def frames():
    return make_frames(20, width=64, height=48)  # 10 s at 2 fps -> segments of 8, 8, 4 frames


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def tid(tokenizer, token):
    return tokenizer.convert_tokens_to_ids(token)


def unpadded(ids, mask):
    return ids[mask.bool()].tolist()


def reference_decoder_ids(tokenizer, question, stamps, answer=None):
    """The released inference prompt: conv_qwen with "<image>\\n{question}", split on <image>
    and tokenised chunk by chunk; the image slot becomes timestamp tokens + one placeholder each."""
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    before, after = prompt.split("<image>")
    ids, ts = enc(tokenizer, before), [0] * len(enc(tokenizer, before))
    for stamp in stamps:
        stamp_ids = enc(tokenizer, stamp)
        ids += stamp_ids + [tid(tokenizer, "<|video_pad|>")]
        ts += [1] * len(stamp_ids) + [0]
    ids += enc(tokenizer, after)
    ts += [0] * len(enc(tokenizer, after))
    if answer is not None:
        ids += enc(tokenizer, f"{answer}<|im_end|>\n")
        ts += [0] * len(enc(tokenizer, f"{answer}<|im_end|>\n"))
    return ids, ts


def reference_compressor_text(segment, query):
    """What Qwen3-VL's chat template + processor (transformers 4.57) produce for one segment,
    written out: `segment` is a list of (timestamp text, video pads per temporal patch)."""
    visual = "".join(
        f"{stamp}<|vision_start|>" + "<|video_pad|>" * pads + "<|vision_end|>" for stamp, pads in segment
    )
    return (
        f"<|im_start|>system\n{COMPRESSOR_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{visual}\nQuery:\n{query}<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------ decoder prompt
def test_decoder_prompt_ids_match_released_construction(processor, tokenizer, frames):
    out = processor(text=QUESTION, videos=frames, video_metadata=FPS2)
    stamps = ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>"]  # (8i + 4) / 2
    ids, ts = reference_decoder_ids(tokenizer, QUESTION, stamps)
    assert out["input_ids"].tolist() == [ids]
    assert out["timestamp_mask"].tolist() == [ts]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert "labels" not in out
    # the timestamps are tokenised on their own, not as part of the surrounding text
    assert tokenizer.decode(out["input_ids"][0]) == (
        DECODER_BEFORE + "".join(s + "<|video_pad|>" for s in stamps) + f"\n{QUESTION}<|im_end|>\n" + GENERATION
    )


def test_decoder_timestamps_format_half_to_even(processor, tokenizer, frames):
    # at 16 fps the segment centres are 0.25, 0.75, 1.25 s: "{:.1f}" gives 0.2, 0.8, 1.2
    out = processor(text=QUESTION, videos=frames, video_metadata={"fps": 16.0})
    ids, ts = reference_decoder_ids(tokenizer, QUESTION, ["<0.2 seconds>", "<0.8 seconds>", "<1.2 seconds>"])
    assert out["input_ids"].tolist() == [ids]
    assert out["timestamp_mask"].tolist() == [ts]


def test_image_gives_one_placeholder_without_timestamp(processor, tokenizer):
    image = Image.fromarray(make_frames(1, width=64, height=48)[0])
    out = processor(text=QUESTION, images=image)
    before, after = enc(tokenizer, DECODER_BEFORE), enc(tokenizer, f"\n{QUESTION}<|im_end|>\n{GENERATION}")
    assert out["input_ids"].tolist() == [before + [tid(tokenizer, "<|image_pad|>")] + after]
    assert out["timestamp_mask"].sum() == 0
    assert "pixel_values_videos" not in out and "video_grid_thw" not in out
    assert out["image_grid_thw"].shape == (1, 3) and out["pixel_values"].shape[1] == 1536
    t, h, w = out["image_grid_thw"][0].tolist()
    row = unpadded(out["compressor_input_ids"][0], out["compressor_attention_mask"][0])
    expected = (
        f"<|im_start|>system\n{COMPRESSOR_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + f"<|vision_end|>\nQuery:\n{QUESTION}<|im_end|>\n"
        + GENERATION
    )
    assert row == enc(tokenizer, expected)
    assert math.isnan(out["segment_times"][0, 0])


# ------------------------------------------------------------------ compressor prompt
def test_compressor_rows_layout(processor, tokenizer, frames):
    out = processor(text=QUESTION, videos=frames, video_metadata=FPS2)
    grid = out["video_grid_thw"]
    assert grid[:, 0].tolist() == [4, 4, 2]  # temporal patches of 8, 8 and 4 frames
    # absolute times: frames 8i + 2k and 8i + 2k + 1 at 2 fps, e.g. (8 + 9) / 2 / 2 = 4.25 -> "4.2"
    patch_stamps = [
        ["<0.2 seconds>", "<1.2 seconds>", "<2.2 seconds>", "<3.2 seconds>"],
        ["<4.2 seconds>", "<5.2 seconds>", "<6.2 seconds>", "<7.2 seconds>"],
        ["<8.2 seconds>", "<9.2 seconds>"],
    ]
    ids, mask = out["compressor_input_ids"], out["compressor_attention_mask"]
    assert ids.shape[0] == 3
    pad = tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    for row, (t, h, w) in enumerate(grid.tolist()):
        pads = (h // 2) * (w // 2)
        expected = enc(tokenizer, reference_compressor_text([(s, pads) for s in patch_stamps[row]], QUESTION))
        length = int(mask[row].sum())
        assert ids[row, :length].tolist() == expected
        assert (ids[row] == tid(tokenizer, "<|video_pad|>")).sum() == t * pads
        # right padding with <|endoftext|>, whatever the decoder's padding side
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (ids[row, length:] == pad).all()
    assert int(mask[2].sum()) < ids.shape[1]  # the shorter last segment is padded
    assert out["pixel_values_videos"].shape == (int(grid.prod(-1).sum()), 1536)
    assert torch.allclose(out["segment_times"], torch.tensor([[0.0, 4.0], [4.0, 8.0], [8.0, 10.0]]))


@pytest.mark.parametrize(
    "num_frames, last_stamps",
    [
        (17, ["<8.2 seconds>"]),  # 1 frame + its copy: indices 16, 17 -> 8.25 s (not 8.0)
        (19, ["<8.2 seconds>", "<9.2 seconds>"]),  # 3 frames + copy: (18 + 19) / 2 / 2 = 9.25 (not 9.0)
        (21, ["<8.2 seconds>", "<9.2 seconds>", "<10.2 seconds>"]),  # 5 frames + copy
    ],
)
def test_padding_frames_take_the_next_index(processor, tokenizer, num_frames, last_stamps):
    out = processor(text=QUESTION, videos=make_frames(num_frames, 64, 48), video_metadata=FPS2)
    t, h, w = out["video_grid_thw"][-1].tolist()
    assert t == len(last_stamps)
    expected = enc(tokenizer, reference_compressor_text([(s, h * w // 4) for s in last_stamps], QUESTION))
    assert unpadded(out["compressor_input_ids"][-1], out["compressor_attention_mask"][-1]) == expected


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_query_becomes_describe_this_content(processor, tokenizer, frames, question):
    out = processor(text=question, videos=frames[:8], video_metadata=FPS2)
    row = tokenizer.decode(out["compressor_input_ids"][0][out["compressor_attention_mask"][0].bool()])
    assert row.endswith("<|vision_end|>\nQuery:\nDescribe this content.<|im_end|>\n<|im_start|>assistant\n")
    # the decoder keeps the question as given (the released prompt is "<image>\n" + question)
    ids, _ = reference_decoder_ids(tokenizer, question, ["<2.0 seconds>"])
    assert out["input_ids"].tolist() == [ids]


def test_compressor_rows_equal_transformers_qwen3vl_processor(processor, tokenizer, frames):
    """An independent implementation of the compressor prompt: transformers' Qwen3VLProcessor.

    Fed as the released code feeds it: per segment, the (resized) frames padded to an even
    count, metadata fps = real fps and frames_indices = segment start + 0, 1, 2, ... (padding
    frames included, as qwen-vl-utils numbers a list of frames), resizing off.

    One difference between transformers versions: 4.57 (the reference's) replaces the whole
    `<|vision_start|><|video_pad|><|vision_end|>` of the chat template by the expansion,
    while 5.x replaces only `<|video_pad|>` and so wraps the expansion in a second
    vision_start/vision_end pair. Giving 5.x the bare `<|video_pad|>` yields 4.57's text (4.57
    did the same for a bare token). The timestamps are computed the same way in both
    (`_calculate_timestamps` over the metadata's indices and fps).
    Without torchvision, Qwen3VLVideoProcessor can only run with RGB conversion and
    normalisation off, which change pixels, not the prompt.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    class LocalQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)  # the stock check needs torchvision's video processor registry

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216}
    )
    qwen = LocalQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor()
    )
    qwen_text = (
        f"<|im_start|>system\n{COMPRESSOR_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|video_pad|>\nQuery:\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    video = frames[:19]  # segments of 8, 8 and 3 (+1 padding) frames
    out = processor(text=QUESTION, videos=video, video_metadata=FPS2)
    for row, (t, h, w) in enumerate(out["video_grid_thw"].tolist()):
        start = row * 8
        count = 2 * t
        clip = np.zeros((count, h * 16, w * 16, 3), dtype=np.uint8)
        metadata = {"fps": 2.0, "frames_indices": [start + j for j in range(count)], "total_num_frames": 19}
        expected = qwen(
            text=[qwen_text],
            videos=[clip],
            video_metadata=[metadata],
            do_sample_frames=False,
            do_resize=False,
            do_convert_rgb=False,
            do_normalize=False,
            return_tensors="pt",
        )
        assert expected["video_grid_thw"].tolist() == [[t, h, w]]
        assert unpadded(out["compressor_input_ids"][row], out["compressor_attention_mask"][row]) == (
            expected["input_ids"][0].tolist()
        )

    # the image path: Qwen3-VL's image processor settings, the template's own vision tokens
    image = Image.fromarray(make_frames(1, width=100, height=70)[0])
    ours = processor(text=QUESTION, images=image)
    expected = qwen(
        text=[qwen_text.replace("<|video_pad|>", "<|vision_start|><|image_pad|><|vision_end|>")],
        images=[image],
        return_tensors="pt",
    )
    assert ours["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert unpadded(ours["compressor_input_ids"][0], ours["compressor_attention_mask"][0]) == (
        expected["input_ids"][0].tolist()
    )


def test_compressor_rows_are_tokenised_as_whole_strings_would_be(processor, tokenizer):
    pad = "<|video_pad|>"
    rows = [
        "<|im_start|>system\nYou compress.<|im_end|>\n<|im_start|>user\n<0.5 seconds><|vision_start|>"
        + pad * 64 + "<|vision_end|><1234.5 seconds><|vision_start|>" + pad * 3 + "<|vision_end|>"
        + "\nQuery:\nWhat  happens <|endoftext|> next?  数字<|im_end|>\n<|im_start|>assistant\n",
        "text only, no special token at all",
        pad + "starts and ends with specials" + "<|image_pad|>" * 2,
        "<|im_start|><|im_end|>  \n\n <|vision_start|>x<|vision_end|>",
    ]
    expected = tokenizer(rows, add_special_tokens=False)["input_ids"]
    assert processor._encode_rows(rows) == expected
    assert processor._encode_rows(rows[::-1]) == expected[::-1]

    class OddTokenizer:  # treats its added tokens otherwise: pieces do not add up to the whole
        def convert_tokens_to_ids(self, token):
            return 7

        def __call__(self, texts, add_special_tokens=False):
            texts = [texts] if isinstance(texts, str) else texts
            return {"input_ids": [[len(t)] for t in texts]}

    odd = copy.copy(processor)
    odd.__dict__["tokenizer"] = OddTokenizer()
    assert odd._encode_rows(rows) == [[len(r)] for r in rows]  # the fallback: whole rows


def test_templates_render_the_standard_texts(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "SYS"}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nQuery:\nq"}]},
    ]
    rendered = processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.compressor_chat_template, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "\nQuery:\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}, {"type": "text", "text": "q"}]}]
    assert processor.apply_chat_template(chat, tokenize=False) == (
        DECODER_BEFORE + "<|video_pad|>\nq<|im_end|>\n" + GENERATION
    )


# ------------------------------------------------------------------ labels
def test_labels_cover_exactly_the_answer(processor, tokenizer, frames):
    answer = "The video is red."
    out = processor(text=QUESTION, videos=frames, video_metadata=FPS2, answers=answer)
    stamps = ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>"]
    ids, _ = reference_decoder_ids(tokenizer, QUESTION, stamps, answer=answer)
    assert out["input_ids"].tolist() == [ids]
    supervised = enc(tokenizer, f"{answer}<|im_end|>\n")  # answer, <|im_end|> and the newline after it
    assert out["labels"].tolist() == [[-100] * (len(ids) - len(supervised)) + supervised]


def test_reference_label_scope_is_preprocess_qwen(processor, tokenizer, frames):
    answer = "The video is red."
    out = processor(text=QUESTION, videos=frames, video_metadata=FPS2, answers=answer, label_scope="reference")
    ids = out["input_ids"][0].tolist()
    turn = enc(tokenizer, f"<|im_start|>assistant\n{answer}<|im_end|>\n")
    # preprocess_qwen: the whole assistant turn, plus <|im_start|>, <|im_end|> and "\n" (198) elsewhere;
    # timestamps and the visual placeholders are never targets
    structural = {tid(tokenizer, "<|im_start|>"), tid(tokenizer, "<|im_end|>"), 198}
    prompt = ids[: len(ids) - len(turn)]
    ts = out["timestamp_mask"][0].tolist()
    expected = [i if (i in structural and not ts[k]) else -100 for k, i in enumerate(prompt)] + turn
    assert enc(tokenizer, "\n") == [198]
    assert out["labels"][0].tolist() == expected


def test_multi_turn_labels_every_assistant_turn(processor, tokenizer, frames):
    chat = [
        {"role": "user", "content": [{"type": "video", "video": frames[:8], "video_metadata": FPS2},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    out = processor.apply_chat_template(chat, add_generation_prompt=False)
    ids = out["input_ids"][0].tolist()
    expected_ids, _ = reference_decoder_ids(tokenizer, QUESTION, ["<2.0 seconds>"], answer="red")
    tail = enc(tokenizer, "<|im_start|>user\nAnd then?<|im_end|>\n")
    tail += enc(tokenizer, "<|im_start|>assistant\nblue<|im_end|>\n")
    assert ids == expected_ids + tail
    labels = out["labels"][0].tolist()
    kept = [(k, i) for k, i in enumerate(labels) if i != -100]
    assert [i for _, i in kept] == enc(tokenizer, "red<|im_end|>\n") + enc(tokenizer, "blue<|im_end|>\n")
    # the compressor's query is the text of the turn holding the video
    row = tokenizer.decode(out["compressor_input_ids"][0])
    assert f"\nQuery:\n{QUESTION}<|im_end|>" in row


# ------------------------------------------------------------------ batches
def test_batch_of_video_and_text_only(processor, tokenizer, frames):
    out = processor(text=[QUESTION, "Who scores?"], videos=[frames, None], video_metadata=FPS2)
    assert out["input_ids"].shape[0] == 2
    stamps = ["<2.0 seconds>", "<6.0 seconds>", "<10.0 seconds>"]
    video_ids, video_ts = reference_decoder_ids(tokenizer, QUESTION, stamps)
    text_ids = enc(tokenizer, DECODER_BEFORE + "Who scores?<|im_end|>\n" + GENERATION)
    length = len(video_ids)
    assert out["input_ids"].shape[1] == length
    # left padding by default
    pad = tokenizer.pad_token_id
    assert out["input_ids"][0].tolist() == video_ids
    assert out["input_ids"][1].tolist() == [pad] * (length - len(text_ids)) + text_ids
    assert out["attention_mask"][1].tolist() == [0] * (length - len(text_ids)) + [1] * len(text_ids)
    assert out["timestamp_mask"][0].tolist() == video_ts and out["timestamp_mask"][1].sum() == 0
    # compressor rows only for the video, one per placeholder
    placeholders = (out["input_ids"] == tid(tokenizer, "<|video_pad|>")) & out["attention_mask"].bool()
    assert out["compressor_input_ids"].shape[0] == int(placeholders.sum()) == 3
    assert out["video_grid_thw"].shape == (3, 3)

    right = processor(text=[QUESTION, "Who scores?"], videos=[frames, None], video_metadata=FPS2, padding_side="right")
    assert right["input_ids"][1].tolist() == text_ids + [pad] * (length - len(text_ids))
    assert torch.equal(right["compressor_input_ids"], out["compressor_input_ids"])


def test_rows_follow_placeholder_order_across_the_batch(processor, tokenizer, frames):
    image = Image.fromarray(frames[0])
    out = processor(
        text=["first", "second", "third"],
        videos=[frames[:8], None, frames[:16]],
        images=[None, image, None],
        video_metadata=FPS2,
    )
    queries = []
    for row in range(out["compressor_input_ids"].shape[0]):
        text = tokenizer.decode(out["compressor_input_ids"][row][out["compressor_attention_mask"][row].bool()])
        query = text.split("Query:\n")[1].split("<|im_end|>")[0]
        queries.append(("image" if "<|image_pad|>" in text else "video", query))
    assert queries == [("video", "first"), ("image", "second"), ("video", "third"), ("video", "third")]
    assert out["video_grid_thw"].shape[0] == 3 and out["image_grid_thw"].shape[0] == 1
    order = out["input_ids"][out["attention_mask"].bool()]
    kinds = [("video" if i == tid(tokenizer, "<|video_pad|>") else "image") for i in order.tolist()
             if i in (tid(tokenizer, "<|video_pad|>"), tid(tokenizer, "<|image_pad|>"))]
    assert kinds == [k for k, _ in queries]


def test_allocation_options_belong_to_the_model_not_the_processor(processor, frames):
    # transformers processors carry no generation options: the processor says where they go
    with pytest.raises(TypeError, match=r"allocation options \(use_ata, visual_token_budget\) belong to the model: pass them to model.generate"):
        processor(text=QUESTION, videos=frames[:8], video_metadata=FPS2, visual_token_budget=4096, use_ata=False)
    with pytest.raises(TypeError, match=r"apply_chat_template: allocation options \(token_selection\)"):
        processor.apply_chat_template([{"role": "user", "content": "q"}], token_selection="tail")
    out = processor(text=QUESTION, videos=frames[:8], video_metadata=FPS2)
    assert not set(out) & {"visual_token_budget", "min_tokens_per_segment", "use_ata", "token_selection"}


def test_loaded_video_and_file_inputs(processor, tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=60, fps=30, width=64, height=48)  # 2 s
    from_path = processor(text=QUESTION, videos=str(path))
    loaded = load_video(path)
    from_loaded = processor(text=QUESTION, videos=loaded)
    assert loaded.num_frames == 8  # min_frames
    for key in ("input_ids", "compressor_input_ids", "video_grid_thw", "pixel_values_videos"):
        assert torch.equal(from_path[key], from_loaded[key])


# ------------------------------------------------------------------ chat template path
def test_apply_chat_template_equals_direct_call(processor, frames):
    chat = [
        [{"role": "user", "content": [{"type": "video", "video": frames, "video_metadata": FPS2},
                                      {"type": "text", "text": QUESTION}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Who scores?"}]}],
    ]
    via_chat = processor.apply_chat_template(chat, add_generation_prompt=True)
    direct = processor(text=[QUESTION, "Who scores?"], videos=[frames, None], video_metadata=FPS2)
    assert set(via_chat) == set(direct)
    for key in direct:
        assert torch.equal(via_chat[key], direct[key]), key

    # training: the answer as an assistant turn, no generation prompt -> labels
    train_chat = [chat[0][0], {"role": "assistant", "content": "red"}]
    via_chat = processor.apply_chat_template(train_chat, add_generation_prompt=False)
    direct = processor(text=QUESTION, videos=frames, video_metadata=FPS2, answers="red")
    assert set(via_chat) == set(direct) and "labels" in direct
    for key in direct:
        assert torch.equal(via_chat[key], direct[key]), key
    ids_only = processor.apply_chat_template(chat[1], return_dict=False)
    assert torch.equal(ids_only, processor(text="Who scores?")["input_ids"])


# ------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(tmp_path, tokenizer, frames):
    processor = TempoProcessor(
        video_processor=TempoVideoProcessor(longest_edge=448, min_frames=4),
        tokenizer=tokenizer,
        chat_template=TempoProcessor(TempoVideoProcessor(), tokenizer).chat_template.replace(
            "You are a helpful assistant.", "You are Tempo."
        ),
        compressor_chat_template="{{- 'custom compressor template' }}",
    )
    processor.save_pretrained(tmp_path)
    loaded = TempoProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == processor.chat_template
    assert loaded.compressor_chat_template == "{{- 'custom compressor template' }}"
    assert loaded.video_processor.longest_edge == 448 and loaded.video_processor.min_frames == 4
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    a = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert a == loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are Tempo." in a

    default = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)
    default.save_pretrained(tmp_path / "default")
    reloaded = TempoProcessor.from_pretrained(tmp_path / "default")
    x = default(text=QUESTION, videos=frames, video_metadata=FPS2)
    y = reloaded(text=QUESTION, videos=frames, video_metadata=FPS2)
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_auto_processor_loads_it(tmp_path, tokenizer):
    from transformers import AutoProcessor

    import transformers_tempo  # noqa: F401  (registers TempoProcessor with AutoProcessor)

    TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer).save_pretrained(tmp_path)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), TempoProcessor)


def test_a_processor_saved_before_the_video_processor_became_a_base_video_processor_still_loads(
    tmp_path, tokenizer, frames
):
    import shutil
    from pathlib import Path

    from transformers import AutoProcessor

    import transformers_tempo  # noqa: F401  (registers TempoProcessor with AutoProcessor)

    # processor_config.json and chat_template.jinja as the code of 2026-12-01 saved
    # TempoProcessor(TempoVideoProcessor(longest_edge=448, min_frames=4), tokenizer)
    for name in ("processor_config.json", "chat_template.jinja"):
        shutil.copy(Path(__file__).parent / "fixtures" / "saved_2026_12_01" / name, tmp_path / name)
    tokenizer.save_pretrained(tmp_path)
    expected = TempoProcessor(TempoVideoProcessor(longest_edge=448, min_frames=4), tokenizer)
    for loaded in (TempoProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, TempoProcessor)
        assert loaded.video_processor.to_dict() == expected.video_processor.to_dict()
        assert loaded.video_processor.resize_backend == "torch"
        assert loaded.chat_template == expected.chat_template
        assert loaded.compressor_chat_template == expected.compressor_chat_template
        x = expected(text=QUESTION, videos=frames, video_metadata=FPS2)
        y = loaded(text=QUESTION, videos=frames, video_metadata=FPS2)
        for key in x:
            assert torch.equal(x[key], y[key]), key
    # an option given to from_pretrained reaches the video processor
    assert TempoProcessor.from_pretrained(tmp_path, resize_backend="pil").video_processor.resize_backend == "pil"


# ------------------------------------------------------------------ errors
def test_mismatched_batch_sizes_name_both_counts(processor, frames):
    with pytest.raises(ValueError, match=r"2 texts but 3 videos"):
        processor(text=["a", "b"], videos=[frames, frames, None], video_metadata=FPS2)
    with pytest.raises(ValueError, match=r"2 texts but 1 answer;"):
        processor(text=["a", "b"], videos=[frames, None], video_metadata=FPS2, answers=["x"])
    with pytest.raises(ValueError, match=r"1 text but 2 videos"):
        processor(text="a", videos=["x.mp4", "y.mp4"])
    with pytest.raises(ValueError, match="both a video and an image"):
        processor(text="a", videos=frames, images=Image.fromarray(frames[0]), video_metadata=FPS2)


def test_bad_video_names_the_sample_and_mutates_nothing(processor, frames, tmp_path):
    videos = [frames, str(tmp_path / "missing.mp4")]
    metadata = [dict(FPS2), None]
    before = (copy.deepcopy(metadata), list(videos))
    with pytest.raises(ValueError, match=r"sample 1: .*missing\.mp4: no such file"):
        processor(text=["a", "b"], videos=videos, video_metadata=metadata)
    with pytest.raises(ValueError, match=r"sample 0: .*uint8"):
        processor(text=["a"], videos=[frames.astype(np.float32)])
    assert metadata == before[0] and videos[1] == before[1][1] and videos[0] is before[1][0]
    chat = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "video", "video": frames}]}]
    with pytest.raises(ValueError, match="conversation 0: holds 2 videos"):
        processor.apply_chat_template(chat)
