"""The reference preset: the settings that reproduce the released Tempo-6B outputs."""

import pytest
import torch

from transformers import AutoModel

from transformers_tempo.reference import (
    REFERENCE_SETTINGS,
    RELEASED_BUDGETS,
    apply_reference_precision,
    reference_settings,
)
from transformers_tempo.testing_utils import build_tiny_model
from transformers_tempo.video_processing_tempo import TempoVideoProcessor, TempoVideoProcessorKwargs


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("reference") / "tiny"
    build_tiny_model(tokenizer, seed=5).save_pretrained(folder)
    return folder


def load_bf16(folder):
    """Loaded as a user would: bfloat16 weights, float32 relevance vector and rotary buffers."""
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.model.relevance_head.weight.dtype == torch.float32
    return model


def test_preset_holds_the_released_values():
    # The released inference path: 2 fps, 8..1024 frames, PIL resizes, bf16 loaded through float16 with the
    # rotary rounding, ATA at 8192 (or 4096) with at least 4 tokens and head truncation, greedy, 32768 context.
    settings = reference_settings()
    assert settings["processor"] == {"resize_backend": "pil", "fps": 2.0, "min_frames": 8, "max_frames": 1024}
    assert settings["model"] == {"dtype": "bfloat16", "float16_weight_rounding": True,
                                 "released_rotary_rounding": True, "compiled_inference": False}
    assert settings["conversion"] == {"dtype": "bfloat16", "released_float16_rounding": True}
    assert settings["allocation"] == {"visual_token_budget": 8192, "min_tokens_per_segment": 4, "use_ata": True,
                                      "token_selection": "head"}
    assert settings["generation"] == {"do_sample": False, "num_beams": 1}
    assert settings["max_context_length"] == 32768
    assert RELEASED_BUDGETS == (4096, 8192)
    assert reference_settings(4096)["allocation"]["visual_token_budget"] == 4096


def test_settings_are_copies_and_the_constant_is_read_only():
    settings = reference_settings()
    settings["processor"]["fps"] = 1.0
    assert REFERENCE_SETTINGS["processor"]["fps"] == 2.0 and reference_settings()["processor"]["fps"] == 2.0
    with pytest.raises(TypeError):
        REFERENCE_SETTINGS["allocation"]["visual_token_budget"] = 1
    assert {k: dict(v) if hasattr(v, "items") else v for k, v in REFERENCE_SETTINGS.items()} == reference_settings()


@pytest.mark.parametrize("budget", [0, -1, 8192.0, True, "8192"])
def test_bad_budget_is_named(budget):
    with pytest.raises(ValueError, match="budget"):
        reference_settings(budget)


def test_processor_accepts_the_preset():
    options = dict(reference_settings()["processor"])
    if "resize_backend" not in TempoVideoProcessorKwargs.__annotations__:
        options.pop("resize_backend")  # the PIL backend arrives with its own change
    processor = TempoVideoProcessor(**options)
    for name, value in options.items():
        assert getattr(processor, name) == value, name


def test_generate_accepts_the_preset(saved_model, hand_inputs):
    model = apply_reference_precision(load_bf16(saved_model))
    settings = reference_settings(4096)
    inputs = hand_inputs([3]).model_inputs()
    out = model.generate(**inputs, **settings["allocation"], **settings["generation"], max_new_tokens=2)
    assert out.shape[0] == 1 and out.shape[1] >= 2


def test_reference_precision_rounds_weights_through_float16_and_the_rotary_buffers(saved_model):
    model = load_bf16(saved_model)
    values = torch.tensor([2e-8, 1e-6, 0.5, 1.0e5])  # below fp16's subnormals, inside them, normal, beyond fp16
    with torch.no_grad():
        model.model.projector.linear_1.bias[:4] = values.to(torch.bfloat16)
    relevance = model.model.relevance_head.weight.detach().clone()
    fresh = load_bf16(saved_model)
    inv_freqs = {name: buf.clone() for name, buf in fresh.named_buffers() if name.endswith("inv_freq")}
    assert len(inv_freqs) >= 2 and all(v.dtype == torch.float32 for v in inv_freqs.values())

    apply_reference_precision(model)

    bias = model.model.projector.linear_1.bias[:4]
    assert bias[0] == 0 and torch.isinf(bias[3]) and bias[2] == 0.5
    assert torch.equal(bias, values.to(torch.bfloat16).to(torch.float16).to(torch.bfloat16))
    assert bias[1] != values[1].to(torch.bfloat16)
    weight = fresh.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight,
                       weight.to(torch.float16).to(torch.bfloat16))
    assert torch.equal(model.model.relevance_head.weight, relevance)  # the float32 vector is left alone
    buffers = dict(model.named_buffers())
    for name, inv_freq in inv_freqs.items():
        assert torch.equal(buffers[name], inv_freq.half().bfloat16().float()), name
    assert any(not torch.equal(buffers[name], inv_freq) for name, inv_freq in inv_freqs.items())


def test_reference_precision_is_idempotent(saved_model):
    model = apply_reference_precision(load_bf16(saved_model))
    once = {k: v.clone() for k, v in model.state_dict().items()}
    apply_reference_precision(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, once[key]), key


def test_reference_precision_needs_a_bfloat16_model(tokenizer):
    with pytest.raises(ValueError, match="bfloat16"):
        apply_reference_precision(build_tiny_model(tokenizer))


def test_tempo_ask_reference_loads_the_released_settings(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json

    import torch

    from transformers_tempo import cli
    from transformers_tempo.cli import ask as cli_ask
    from transformers_tempo.synthetic import write_test_video

    video = write_test_video(tmp_path / "clip.mp4", num_frames=60, fps=10, width=64, height=48)
    loaded = []
    original = cli_ask.load_pipeline
    monkeypatch.setattr(cli_ask, "load_pipeline", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    assert cli.main(["ask", str(video), "What happens?", "--model", str(tiny_model_dir), "--reference", "--json",
                     "--max-new-tokens", "2"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    (vqa,) = loaded
    model = vqa.model
    assert model.dtype == torch.bfloat16 and model.model.relevance_head.weight.dtype == torch.float32
    assert vqa.processor.video_processor.resize_backend == "pil"
    assert model.config.max_context_length == 32768
    assert model.generation_config.min_tokens_per_segment == 4 and model.generation_config.token_selection == "head"
    # every weight was rounded through float16: rounding again changes nothing
    weight = model.lm_head.weight
    assert torch.equal(weight, weight.to(torch.float16).to(torch.bfloat16))
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert torch.equal(inv_freq, inv_freq.to(torch.float16).to(torch.bfloat16).to(inv_freq.dtype))
    assert result["sampled_frames"] == 12 and result["visual_tokens"] <= 8192
