"""Fine-tuning with transformers' Trainer and PEFT: collator, labels, what trains, checkpointing,
mixed precision, LoRA, save/load, and the example script. Tiny random model, generated frames."""

import copy
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, Trainer

from transformers_tempo.processing_tempo import TempoProcessor
from transformers_tempo.testing_utils import build_tiny_model
from transformers_tempo.training import (
    PARTS,
    TempoDataCollator,
    lora_target_modules,
    set_trainable,
    tempo_training_arguments,
)
from transformers_tempo.video_processing_tempo import TempoVideoProcessor

QUESTION = "What colour is the video?"
CHANNEL = {"red": 0, "blue": 2}
EXAMPLE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tensors here are tiny: extra threads only add overhead on a small shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor(tokenizer):
    # A low pixel minimum: 32x32 frames become 128x128 (fetch_image's floor) instead of 384x384, so that
    # a segment is 64 vision tokens and a training step takes a fraction of a second.
    return TempoProcessor(video_processor=TempoVideoProcessor(video_min_pixels=32 * 32), tokenizer=tokenizer)


def colour_frames(colour, rng, num_frames=8):
    frames = rng.integers(0, 60, (num_frames, 32, 32, 3)).astype(np.uint8)
    frames[..., CHANNEL[colour]] += 180
    return frames


@pytest.fixture(scope="module")
def colour_examples():
    """8 clips (4 red, 4 blue, noisy shades) whose answer is their colour."""
    rng = np.random.default_rng(0)
    return [
        {"video": colour_frames(c, rng), "question": QUESTION, "answer": c, "video_metadata": {"fps": 2.0}}
        for c in ["red", "blue"] * 4
    ]


def train_args(tmp_path, **kwargs):
    defaults = dict(per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no",
                    disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    return tempo_training_arguments(str(tmp_path), **{**defaults, **kwargs})


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def answer_of(model, processor, frames):
    inputs = processor(text=QUESTION, videos=frames, video_metadata={"fps": 2.0}).to(model.device)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def trained(tokenizer, processor, colour_examples, tmp_path_factory):
    """The red/blue overfit run, shared by the loss test and the save/load test."""
    model = build_tiny_model(tokenizer)
    set_trainable(model, "projector+memory+decoder")
    args = train_args(tmp_path_factory.mktemp("overfit"), max_steps=40, learning_rate=1e-2)
    collator = TempoDataCollator(processor, use_ata=False)
    trainer = Trainer(model=model, args=args, train_dataset=colour_examples, data_collator=collator)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------- collator and labels
def supervised_text(tokenizer, labels_row):
    return tokenizer.decode(labels_row[labels_row != -100])


def test_labels_cover_exactly_the_assistant_answer(tokenizer, processor, colour_examples):
    frames = colour_examples[0]["video"]
    examples = [
        colour_examples[0],  # question / answer form
        {  # messages with a system turn, the video given next to them
            "video": frames,
            "video_metadata": {"fps": 2.0},
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The video is blue."}]},
            ],
        },
        {  # messages that carry the video themselves, plain-string content
            "messages": [
                {"role": "user", "content": [{"type": "video", "video": frames, "video_metadata": {"fps": 2.0}},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": "green"},
            ],
        },
    ]
    batch = TempoDataCollator(processor)(examples)
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for row, answer in enumerate(["red", "The video is blue.", "green"]):
        labels = batch["labels"][row]
        # The processor's rule: the answer, its <|im_end|> and the newline after it.
        assert supervised_text(tokenizer, labels) == answer + "<|im_end|>\n"
        positions = (labels != -100).nonzero().flatten()
        assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))  # one span
        assert batch["input_ids"][row, positions[0] - len(header) : positions[0]].tolist() == header
        assert torch.equal(labels[positions], batch["input_ids"][row, positions])
    assert batch["attention_mask"][:, 0].all()  # right padding
    assert (batch["compressor_input_ids"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")).any(1).all()

    # The collator is the processor, called as documented.
    direct = processor(text=QUESTION, videos=frames, answers="red", video_metadata={"fps": 2.0}, padding_side="right")
    single = TempoDataCollator(processor)(examples[:1])
    assert set(single) == set(direct)
    for key in direct:
        assert torch.equal(single[key], direct[key]), key


def test_collator_decodes_files_and_is_picklable(tmp_path, processor):
    from transformers_tempo.synthetic import encoder_available, write_test_video

    codec = "libx264" if encoder_available("libx264") else "mpeg4"
    path = write_test_video(tmp_path / "clip.mp4", num_frames=16, fps=8, width=32, height=32, codec=codec)
    collator = TempoDataCollator(processor, video_kwargs={"min_frames": 4})
    examples = [{"video": str(path), "question": QUESTION, "answer": "red"}]
    clone = pickle.loads(pickle.dumps(collator))  # DataLoader workers may receive it pickled
    a, b = collator(examples), clone(examples)
    assert a["video_grid_thw"].tolist() == [[2, 8, 8]]  # 2 s at 2 fps -> 4 frames -> one segment
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="example 0"):
        collator([{"video": str(tmp_path / "missing.mp4"), "question": QUESTION, "answer": "red"}])
    with pytest.raises(ValueError, match="needs 'question' and 'answer'"):
        collator([{"video": str(path), "question": QUESTION}])


def test_trainer_column_filter_is_named_in_the_error(tokenizer, processor, colour_examples, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True)  # remove_unused_columns=True
    trainer = Trainer(model=build_tiny_model(tokenizer), args=args, train_dataset=colour_examples,
                      data_collator=TempoDataCollator(processor))
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
    assert tempo_training_arguments(str(tmp_path)).remove_unused_columns is False


# ---------------------------------------------------------------------------- what trains
def test_frozen_parts_get_no_gradient(tokenizer, processor, colour_examples):
    model = build_tiny_model(tokenizer).train()
    every_part = tuple(prefix for prefixes in PARTS.values() for prefix in prefixes)
    assert all(name.startswith(every_part) for name, _ in model.named_parameters())
    count = set_trainable(model, "projector+memory+decoder")
    expected = sum(p.numel() for n, p in model.named_parameters() if n.startswith(
        PARTS["projector"] + PARTS["memory_tokens"] + PARTS["decoder"]))
    assert count == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model(**TempoDataCollator(processor)(colour_examples[:2])).loss.backward()
    for name, param in model.named_parameters():
        trained = name.startswith(PARTS["projector"] + PARTS["memory_tokens"] + PARTS["decoder"])
        if trained:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert model.model.compressor.visual.patch_embed.proj.weight.grad is None
    assert model.model.compressor.language_model.layers[0].self_attn.q_proj.weight.grad is None

    decoder_only = build_tiny_model(tokenizer)
    set_trainable(decoder_only, "all", freeze=["vision", "compressor", "memory_tokens", "projector"])
    assert {n for n, p in decoder_only.named_parameters() if p.requires_grad} == {
        n for n, _ in decoder_only.named_parameters() if n.startswith(PARTS["decoder"])}
    decoder_size = sum(p.numel() for p in decoder_only.model.language_model.parameters())
    assert set_trainable(decoder_only, "decoder") == decoder_size  # lm_head is tied: counted once
    with pytest.raises(ValueError, match="unknown"):
        set_trainable(decoder_only, "everything")
    with pytest.raises(ValueError, match="unknown part"):
        set_trainable(decoder_only, ["decoder", "visoin"])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_gradients(tokenizer, processor, colour_examples, use_reentrant):
    batch = TempoDataCollator(processor)(colour_examples[:2])
    plain = build_tiny_model(tokenizer).train()
    set_trainable(plain, "all")
    ckpt = copy.deepcopy(plain)
    # What the Trainer calls for TrainingArguments(activation_checkpointing=True, ...).
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert ckpt.model.compressor.language_model.gradient_checkpointing
    assert ckpt.model.compressor.visual.gradient_checkpointing
    assert ckpt.model.language_model.gradient_checkpointing
    loss_plain, loss_ckpt = plain(**batch).loss, ckpt(**batch).loss
    loss_plain.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_plain, loss_ckpt)
    checked = set()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p1.grad is None:
            assert p2.grad is None, name
            continue
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=name)
        checked.add(next(part for part, prefixes in PARTS.items() if name.startswith(prefixes)))
    assert checked >= {"vision", "compressor", "memory_tokens", "projector", "decoder"}


# ---------------------------------------------------------------------------- training runs
def test_trainer_overfits_answers_that_depend_on_the_video(trained, processor, colour_examples, capsys):
    losses = logged_losses(trained)
    start, end = losses[0], sum(losses[-5:]) / 5
    with capsys.disabled():
        print(f"\noverfit: loss {start:.3f} at step 1 -> {end:.3f} (mean of the last 5 of {len(losses)} steps)")
    assert end < 0.5 * start, losses
    assert end < 0.2, losses  # below what answering without looking (ln 2 on the colour token) gives
    model = trained.model.eval()
    for example in colour_examples[:2]:
        assert answer_of(model, processor, example["video"]) == example["answer"]
    # Evaluation runs in eval mode; use_ata=False keeps every memory feature, as in training.
    metrics = trained.evaluate(colour_examples, metric_key_prefix="eval")
    assert metrics["eval_loss"] < 0.2


def test_save_pretrained_after_training_reproduces_logits(trained, processor, colour_examples, tmp_path):
    model = trained.model.eval()
    trained.save_model(str(tmp_path))
    # the Trainer put the model on the GPU where there is one; compare there
    loaded = AutoModel.from_pretrained(tmp_path).to(model.device).eval()
    batch = TempoDataCollator(processor)(colour_examples[:2]).to(model.device)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    fresh = build_tiny_model(processor.tokenizer)
    assert not torch.equal(fresh.model.projector.linear_1.weight, loaded.model.projector.linear_1.weight.cpu())


def test_lora_adapter_trains_saves_and_reloads(tokenizer, processor, colour_examples, tmp_path):
    peft = pytest.importorskip("peft")
    base = build_tiny_model(tokenizer)
    targets = lora_target_modules(("decoder", "compressor"), ("q_proj", "v_proj"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))
    expected = [
        f"base_model.model.model.{lm}.layers.{i}.self_attn.{proj}"
        for lm in ("compressor.language_model", "language_model")
        for i in range(2)
        for proj in ("q_proj", "v_proj")
    ]
    assert wrapped == sorted(expected)  # nothing in the vision tower (its attention is `qkv`)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    with pytest.raises(TypeError, match="modules_to_save"):
        set_trainable(model, "projector")

    # Reentrant checkpointing with a frozen base: gradients reach the compressor's adapters only
    # because the Trainer makes the (frozen) input embeddings' outputs require grad.
    args = train_args(tmp_path / "run", max_steps=4, learning_rate=1e-2, activation_checkpointing=True,
                      activation_checkpointing_kwargs={"use_reentrant": True})
    trainer = Trainer(model=model, args=args, train_dataset=colour_examples, data_collator=TempoDataCollator(processor))
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if n in lora and torch.equal(p.cpu(), lora[n])]
    assert unchanged == []

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(build_tiny_model(tokenizer), tmp_path / "adapter").eval()
    batch = TempoDataCollator(processor)(colour_examples[:2])
    model.cpu().eval()  # the Trainer put it on the GPU where there is one; the reloaded copy is on the CPU
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(logits, reloaded(**batch).logits)
        assert not torch.allclose(logits, build_tiny_model(tokenizer)(**batch).logits)


def test_bf16_mixed_precision_step(tokenizer, processor, colour_examples, tmp_path):
    # Trainer refuses bf16=True without a GPU unless use_cpu=True; with it, it runs the model under
    # torch.autocast("cpu", dtype=torch.bfloat16) and keeps float32 weights.
    model = build_tiny_model(tokenizer)
    set_trainable(model, "projector+memory+decoder")
    before = model.model.projector.linear_1.weight.detach().clone()
    seen = {}
    model.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, inputs, output: seen.update(dtype=output.dtype)
    )
    args = train_args(tmp_path, max_steps=1, learning_rate=1e-3, bf16=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=colour_examples, data_collator=TempoDataCollator(processor))
    trainer.train()  # relevance stays float32 under autocast (it used to crash here)
    assert seen["dtype"] == torch.bfloat16
    assert model.model.projector.linear_1.weight.dtype == torch.float32
    assert not torch.equal(before, model.model.projector.linear_1.weight)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ---------------------------------------------------------------------------- the example script
def test_example_script_full_and_lora(tokenizer, processor, tmp_path):
    pytest.importorskip("peft")
    from transformers_tempo.synthetic import encoder_available, write_test_video

    model_dir = tmp_path / "tiny-tempo"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data_dir = tmp_path / "data"
    (data_dir / "clips").mkdir(parents=True)
    codec = "libx264" if encoder_available("libx264") else "mpeg4"
    records = []
    for i, colour in enumerate(["red", "blue", "red", "blue"]):
        rgb = [0, 0, 0]
        rgb[CHANNEL[colour]] = 220
        write_test_video(data_dir / "clips" / f"{i}.mp4", num_frames=16, fps=8, width=32, height=32,
                         codec=codec, color_fn=lambda index, w, h, rgb=rgb: rgb)
        records.append({"video": f"clips/{i}.mp4", "question": QUESTION, "answer": colour})
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE_SCRIPT)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    assert finetune.load_records(str(data_dir / "train.jsonl"))[0]["video"] == str(data_dir / "clips" / "0.mp4")

    common = ["--model", str(model_dir), "--data", str(data_dir / "train.jsonl"), "--max-steps", "2",
              "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--logging-steps", "1"]
    full = finetune.main([*common, "--output-dir", str(tmp_path / "full"), "--gradient-checkpointing",
                           "--num-workers", "1"])
    assert full.state.global_step == 2
    assert isinstance(AutoModel.from_pretrained(tmp_path / "full"), type(full.model))
    assert (tmp_path / "full" / "processor_config.json").exists()

    lora = finetune.main([*common, "--output-dir", str(tmp_path / "lora"), "--lora", "--lora-r", "4",
                          "--lora-parts", "decoder,compressor"])
    assert lora.state.global_step == 2
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert (tmp_path / "lora" / "processor_config.json").exists()
