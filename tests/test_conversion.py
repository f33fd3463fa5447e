"""Conversion of the released Tempo checkpoint layout (tiny, built here) into this package's format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, Qwen3VLForConditionalGeneration

import transformers_tempo  # noqa: F401  (registers the Auto classes)
from transformers_tempo import TempoForConditionalGeneration, atomic_files, conversion
from transformers_tempo.conversion import ConversionError, convert_tempo_checkpoint
from transformers_tempo.conversion import export as conversion_export
from transformers_tempo.testing_utils import build_tiny_model, build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = REPO_ROOT / "model_cards" / "tempo-6b.md"
CLI_SCRIPT = REPO_ROOT / "conversion" / "convert_tempo_to_hf.py"

# The released names, written out here independently of conversion.KEY_RULES: converted -> released.
TO_RELEASED = (
    ("model.compressor.visual.", "model.vision_tower_aux_list.0.vlm.model.visual."),
    ("model.compressor.language_model.", "model.vision_tower_aux_list.0.vlm.model.language_model."),
    ("model.projector.linear_1.", "model.mm_projector.0."),
    ("model.projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
)


def released_name(key: str) -> str | None:
    if key == "model.memory_tokens":
        return "model.vision_tower_aux_list.0.compression_tokens"
    if key in ("lm_head.weight", "model.relevance_head.weight"):
        return None  # tied / not in the released checkpoint
    for ours, theirs in TO_RELEASED:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(f"no released name for {key}")


def write_released_checkpoint(folder: Path, model, tokenizer, base_path: Path, shards: int = 3, pickle: bool = False,
                              extra: dict | None = None, drop: tuple = (), config_extra: dict | None = None) -> dict:
    """Write `model` in the released Tempo-6B layout: exact key names, tied lm_head omitted, sharded with an
    index; a released-style config.json; the tokenizer beside it. Returns the released state dict."""
    folder.mkdir(parents=True)
    state = {}
    for key, tensor in model.state_dict().items():
        name = released_name(key)
        if name is None or name in drop:
            continue
        tensor = tensor.detach().clone().contiguous()
        state[name] = tensor.unsqueeze(0) if key == "model.memory_tokens" else tensor
    state.update(extra or {})
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    suffix = "bin" if pickle else "safetensors"
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k] for k in group}
        if pickle:
            torch.save(part, folder / file)
        else:
            save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    index_name = "pytorch_model.bin.index.json" if pickle else "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    text = model.config.text_config
    config = {
        "architectures": ["TempoQwenForCausalLM"],
        "model_type": "tempo_qwen",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],  # transformers 4.x style, as released
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": text.num_hidden_layers,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        # Tempo fields
        "mm_vision_tower_aux_list": [str(base_path)],
        "mm_projector_type": model.config.projector_type,
        "mm_hidden_size": model.config.compressor_hidden_size,
        "num_compression_tokens": model.config.num_memory_tokens,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "dynamic_compress": True,
        # training-time fields
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False,
        "mm_projector_lr": None,
    }
    config.update(config_extra or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    return state


def write_base_qwen3vl(folder: Path, compressor_config, tokenizer, seed: int = 1, tied: bool = True):
    """A tiny base Qwen3-VL-2B-Instruct stand-in: Qwen3VLForConditionalGeneration with a tied LM head (as the
    real one), safetensors, the tokenizer and a chat template beside it."""
    from transformers_tempo.processing_tempo import COMPRESSOR_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = compressor_config.__class__.from_dict(compressor_config.to_dict())
    config.tie_word_embeddings = tied
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": COMPRESSOR_CHAT_TEMPLATE}))
    return model


def expected_relevance(base_model, tokenizer, dtype=torch.bfloat16) -> torch.Tensor:
    """Yes row minus No row of the base LM head, both taken in `dtype` and subtracted there, as float32."""
    vocab = tokenizer.get_vocab()
    w = base_model.get_output_embeddings().weight.detach()
    return (w[vocab["Yes"]].to(dtype) - w[vocab["No"]].to(dtype)).float()[None]


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny source model, its released-layout checkpoint, and a tiny base Qwen3-VL."""
    root = tmp_path_factory.mktemp("conversion")
    tokenizer = build_tiny_tokenizer()
    source = build_tiny_model(tokenizer, seed=3)
    base_path = root / "Qwen3-VL-2B-Instruct"
    base = write_base_qwen3vl(base_path, source.config.compressor_config, tokenizer)
    tempo_path = root / "Tempo-6B"
    released = write_released_checkpoint(tempo_path, source, tokenizer, base_path)
    return SimpleNamespace(root=root, tokenizer=tokenizer, source=source, base=base, base_path=base_path,
                           tempo_path=tempo_path, released=released)


@pytest.fixture(scope="module")
def converted(world):
    """float32 conversion: every value must land exactly."""
    out = world.root / "converted-fp32"
    lines = []
    report = convert_tempo_checkpoint(world.tempo_path, world.base_path, out, dtype="float32",
                                      max_shard_size="200KB", progress=lines.append)
    return SimpleNamespace(out=out, report=report, lines=lines)


@pytest.fixture(scope="module")
def converted_bf16(world):
    out = world.root / "converted-bf16"
    report = convert_tempo_checkpoint(world.tempo_path, world.base_path, out, progress=None)
    return SimpleNamespace(out=out, report=report)


@pytest.fixture(scope="module")
def converted_fp16(world):
    """float16 conversion through `tempo convert`, to check the command passes --dtype through."""
    from transformers_tempo.cli import main

    out = world.root / "converted-fp16"
    code = main(["convert", "--tempo_path", str(world.tempo_path), "--qwen3vl_path", str(world.base_path),
                 "--output_dir", str(out), "--dtype", "float16"])
    assert code == 0
    return SimpleNamespace(out=out)


def source_with_base_relevance(world, dtype=torch.bfloat16):
    """The source model with the relevance vector the conversion must produce (it is not in the checkpoint)."""
    model = build_tiny_model(world.tokenizer, seed=3)
    with torch.no_grad():
        model.model.relevance_head.weight.copy_(expected_relevance(world.base, world.tokenizer, dtype))
    return model


# ---------------------------------------------------------------------------------------------- layout
def test_fixture_is_in_released_layout(world):
    index = json.loads((world.tempo_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2
    keys = set(index["weight_map"])
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert "model.vision_tower_aux_list.0.compression_tokens" in keys
    assert any(k.startswith("model.vision_tower_aux_list.0.vlm.model.visual.") for k in keys)
    assert any(k.startswith("model.vision_tower_aux_list.0.vlm.model.language_model.layers.") for k in keys)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= keys


def test_every_tensor_lands_where_it_should(world, converted):
    out = read_all(converted.out)
    source = world.source.state_dict()
    expected_keys = set(source) - {"lm_head.weight"}  # tied: not stored
    assert set(out) == expected_keys
    for key in expected_keys - {"model.relevance_head.weight"}:
        assert out[key].dtype == torch.float32
        assert torch.equal(out[key], source[key]), key
    # the report's mapping covers every released tensor, and says what it did
    mapping = converted.report.key_mapping
    assert set(mapping) == set(world.released)
    for released, target in mapping.items():
        assert torch.equal(out[target].reshape(world.released[released].shape), world.released[released])
    assert converted.report.tied_weights == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    assert mapping["model.vision_tower_aux_list.0.compression_tokens"] == "model.memory_tokens"
    assert mapping["model.mm_projector.2.weight"] == "model.projector.linear_2.weight"
    assert mapping["model.layers.1.mlp.up_proj.weight"] == "model.language_model.layers.1.mlp.up_proj.weight"
    index = json.loads((converted.out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # max_shard_size honoured


def test_bf16_conversion_values(world, converted_bf16):
    out = read_all(converted_bf16.out)
    source = world.source.state_dict()
    for key, tensor in out.items():
        if key == "model.relevance_head.weight":
            assert tensor.dtype == torch.float32
            continue
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, source[key].to(torch.bfloat16)), key
    config = json.loads((converted_bf16.out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("name, dtype", [("converted", torch.float32), ("converted_bf16", torch.bfloat16),
                                         ("converted_fp16", torch.float16)])
def test_relevance_vector_is_subtracted_in_the_converted_dtype(world, request, name, dtype):
    result = request.getfixturevalue(name)
    got = read_all(result.out)["model.relevance_head.weight"]
    assert got.dtype == torch.float32 and got.shape == (1, 64)
    assert torch.equal(got, expected_relevance(world.base, world.tokenizer, dtype))
    # each rounding is real: the three differences are three different vectors
    for other in {torch.float32, torch.bfloat16, torch.float16} - {dtype}:
        assert not torch.equal(got, expected_relevance(world.base, world.tokenizer, other)), other
    dtype_name = str(dtype).removeprefix("torch.")
    config = json.loads((result.out / "config.json").read_text())
    assert config["relevance_vector_dtype"] == dtype_name and config["dtype"] == dtype_name
    assert AutoModel.from_pretrained(result.out).config.relevance_vector_dtype == dtype_name


def test_float32_relevance_vector_is_the_exact_float32_difference(world, converted):
    got = read_all(converted.out)["model.relevance_head.weight"]
    w = world.base.get_output_embeddings().weight.detach()
    vocab = world.tokenizer.get_vocab()
    assert w.dtype == torch.float32
    assert torch.equal(got, (w[vocab["Yes"]] - w[vocab["No"]])[None])


def test_report_records_how_the_relevance_vector_was_made(world, converted, converted_bf16):
    vocab = world.tokenizer.get_vocab()
    for result, dtype_name in ((converted, "float32"), (converted_bf16, "bfloat16")):
        rel = result.report.relevance
        assert rel["subtract_dtype"] == dtype_name
        assert (rel["yes_id"], rel["no_id"]) == (vocab["Yes"], vocab["No"])
        assert rel["source_key"] == "model.language_model.embed_tokens.weight"  # tied base: the embeddings
        assert f"(subtracted in {dtype_name}, stored float32)" in result.report.summary()


def test_configs_without_relevance_vector_dtype_still_load(converted, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    config = json.loads((converted.out / "config.json").read_text())
    del config["relevance_vector_dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    from transformers_tempo import TempoConfig

    assert TempoConfig.from_pretrained(folder).relevance_vector_dtype is None


def test_relevance_uses_lm_head_of_untied_base(world, tmp_path):
    base = write_base_qwen3vl(tmp_path / "base", world.source.config.compressor_config, world.tokenizer, tied=False)
    vector, info = conversion.relevance_vector(tmp_path / "base")
    assert info["source_key"] == "lm_head.weight"
    assert torch.equal(vector, expected_relevance(base, world.tokenizer))
    assert not torch.equal(base.lm_head.weight, base.get_input_embeddings().weight)


def test_config_generation_config_and_files(world, converted):
    out = converted.out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tempo"
    assert config["architectures"] == ["TempoForConditionalGeneration"]
    assert config["auto_map"]["AutoModel"] == "modeling_tempo.TempoForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_tempo.TempoConfig"
    assert config["auto_map"]["AutoProcessor"] == "processing_tempo.TempoProcessor"
    assert config["num_memory_tokens"] == 16 and config["projector_type"] == "mlp2x_gelu"
    assert config["max_context_length"] == 32768  # default: the released config has no tokenizer_model_max_length
    assert config["video_token_id"] == world.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config["text_config"]["rope_parameters"]["rope_theta"] == world.source.config.text_config.rope_parameters["rope_theta"]
    assert config["compressor_config"]["vision_config"]["depth"] == 2
    for field in ("mm_projector_type", "tune_mm_mlp_adapter", "tokenizer_padding_side"):
        assert field not in config and field not in config["text_config"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["eos_token_id"] == world.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (generation["visual_token_budget"], generation["min_tokens_per_segment"], generation["use_ata"]) == (8192, 4, True)
    processor_files = {p.name for p in out.iterdir()}
    assert {"README.md", "tokenizer_config.json", "configuration_tempo.py", "modeling_tempo.py",
            "processing_tempo.py", "token_allocation.py"} <= processor_files
    assert not any(name.startswith(".") for name in os.listdir(converted.out.parent) if "converted-fp32" in name)
    assert any("[5/6]" in line for line in converted.lines)


@pytest.mark.parametrize("same", [True, False])
def test_released_lm_head_is_accepted_as_tied(world, tmp_path, same):
    embeddings = world.source.model.language_model.embed_tokens.weight.detach().clone()
    head = embeddings if same else embeddings + 1
    tempo = tmp_path / "tempo"
    write_released_checkpoint(tempo, world.source, world.tokenizer, world.base_path, shards=2,
                              extra={"lm_head.weight": head})
    report = convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "out", dtype="float32", progress=None)
    assert report.key_mapping["lm_head.weight"] is None
    assert "lm_head.weight" not in read_all(tmp_path / "out")
    assert any("lm_head.weight differs" in w for w in report.warnings) is (not same)


def test_dtype_auto_and_released_float16_rounding(world, tmp_path):
    tempo = tmp_path / "tempo"
    tiny = torch.tensor([2e-8, 3e-6, 0.5, 1.0e5])  # below/inside float16's subnormal range, normal, overflow
    source = build_tiny_model(world.tokenizer, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        source.model.projector.linear_1.bias[:4] = tiny.to(torch.bfloat16)
    write_released_checkpoint(tempo, source, world.tokenizer, world.base_path, shards=1)
    convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "auto", dtype="auto", progress=None)
    auto = read_all(tmp_path / "auto")
    assert auto["model.projector.linear_1.bias"].dtype == torch.bfloat16
    assert torch.equal(auto["model.projector.linear_1.bias"], source.model.projector.linear_1.bias)
    convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "fp16", released_float16_rounding=True, progress=None)
    rounded = read_all(tmp_path / "fp16")["model.projector.linear_1.bias"][:4]
    expected = tiny.to(torch.bfloat16).to(torch.float16).to(torch.bfloat16)
    assert torch.equal(rounded, expected) and rounded[0] == 0 and torch.isinf(rounded[3])
    assert rounded[1] != tiny[1].to(torch.bfloat16) and rounded[2] == 0.5


def test_context_length_from_released_config(world, tmp_path):
    tempo = tmp_path / "tempo"
    write_released_checkpoint(tempo, world.source, world.tokenizer, world.base_path, shards=1,
                              config_extra={"tokenizer_model_max_length": 16384})
    convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "out", progress=None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_context_length"] == 16384


# ---------------------------------------------------------------------------------------------- behaviour
def test_converted_model_forward_generate_and_reload(world, converted, hand_inputs):
    model = AutoModel.from_pretrained(converted.out)
    assert isinstance(model, TempoForConditionalGeneration)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    reference = source_with_base_relevance(world, torch.float32)
    inputs = hand_inputs([3, 1]).model_inputs()
    with torch.no_grad():
        out = model(**inputs)
        ref = reference(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.relevance_scores, ref.relevance_scores, rtol=0, atol=0)
    ids = model.generate(**inputs, max_new_tokens=4)
    assert ids.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(ids, reference.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_reload_gives_identical_logits(converted_bf16, hand_inputs, tmp_path):
    model = AutoModel.from_pretrained(converted_bf16.out)
    assert model.dtype == torch.bfloat16 and model.model.relevance_head.weight.dtype == torch.float32
    inputs = hand_inputs([2]).model_inputs()
    with torch.no_grad():
        first = model(**inputs).logits
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        second = again(**inputs).logits
    assert torch.equal(first, second)
    reloaded = AutoModel.from_pretrained(converted_bf16.out)
    with torch.no_grad():
        assert torch.equal(first, reloaded(**inputs).logits)


REMOTE_SCRIPT = r"""
import sys
sys.modules["transformers_tempo"] = None  # `import transformers_tempo` now raises ImportError
try:
    import transformers_tempo  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("transformers_tempo is importable")
import numpy as np, torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
out, result = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(out, trust_remote_code=True)
assert type(model).__name__ == "TempoForConditionalGeneration", type(model)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__module__.startswith("transformers_modules.")
assert type(AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)).__name__ == type(model).__name__
processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
assert type(processor).__name__ == "TempoProcessor" and type(processor).__module__.startswith("transformers_modules.")
frames = np.random.default_rng(0).integers(0, 256, size=(12, 64, 96, 3), dtype=np.uint8)
inputs = processor(text="What colour is the video?", videos=frames, video_metadata={"fps": 2.0})
inputs = {k: v for k, v in inputs.items() if k != "segment_times"}
with torch.no_grad():
    logits = model(**inputs).logits
ids = model.generate(**inputs, max_new_tokens=3)
assert not any(name == "transformers_tempo" or name.startswith("transformers_tempo.") for name in sys.modules if sys.modules[name] is not None)
torch.save({"inputs": dict(inputs), "logits": logits, "ids": ids}, result)
print("remote ok")
"""


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(converted, tmp_path):
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    # PYTHONPATH without this repository's src (other entries, such as a newer transformers, stay)
    src = str(Path(__file__).resolve().parents[1] / "src")
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) != os.path.realpath(src)]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": os.pathsep.join(kept)}
    result = tmp_path / "result.pt"
    run = subprocess.run([sys.executable, str(script), str(converted.out), str(result)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "remote ok" in run.stdout
    # the remote-code model computes what the package's model computes
    saved = torch.load(result, weights_only=False)
    model = AutoModel.from_pretrained(converted.out)
    with torch.no_grad():
        logits = model(**saved["inputs"]).logits
    assert torch.equal(logits, saved["logits"])


def test_remote_code_modules_are_relative_only():
    names = {p.name for p in conversion.remote_code_modules()}
    assert {"configuration_tempo.py", "modeling_tempo.py", "token_allocation.py", "processing_tempo.py",
            "video_processing_tempo.py", "video_loading.py"} <= names
    for name in names:
        text = (REPO_ROOT / "src" / "transformers_tempo" / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+transformers_tempo\b", text, flags=re.M), name


# ---------------------------------------------------------------------------------------------- failures
def test_unknown_and_missing_keys_fail_listing_them(world, tmp_path):
    tempo = tmp_path / "tempo"
    write_released_checkpoint(
        tempo, world.source, world.tokenizer, world.base_path, shards=2,
        extra={"model.vision_tower_aux_list.0.linear_layer.weight": torch.zeros(1, 64),
               "model.some_new_head.weight": torch.zeros(2, 2)},
        drop=("model.mm_projector.2.bias", "model.layers.0.self_attn.q_norm.weight"),
    )
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_tempo_checkpoint(tempo, world.base_path, out, progress=None)
    message = str(info.value)
    assert "2 tensor(s) of the released checkpoint have no place" in message
    assert "model.vision_tower_aux_list.0.linear_layer.weight" in message and "model.some_new_head.weight" in message
    assert "2 parameter(s) of the converted model are not in the released checkpoint" in message
    assert "model.projector.linear_2.bias" in message and "model.language_model.layers.0.self_attn.q_norm.weight" in message
    assert "lm_head.weight tied weight(s) excepted" in message
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_shape_mismatch_fails(world, tmp_path):
    tempo = tmp_path / "tempo"
    write_released_checkpoint(tempo, world.source, world.tokenizer, world.base_path, shards=1,
                              extra={"model.mm_projector.0.bias": torch.zeros(7)})
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.0\.bias \[7\] -> model\.projector\.linear_1\.bias expects \[48\]"):
        convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "out", progress=None)


def test_pickle_refused_unless_allowed(world, tmp_path):
    tempo = tmp_path / "tempo"
    write_released_checkpoint(tempo, world.source, world.tokenizer, world.base_path, shards=2, pickle=True)
    with pytest.raises(ConversionError, match="arbitrary code") as info:
        convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "out", progress=None)
    assert "allow_pickle=True" in str(info.value) and "model-00001-of-00002.bin" in str(info.value)
    assert not (tmp_path / "out").exists()
    report = convert_tempo_checkpoint(tempo, world.base_path, tmp_path / "out", allow_pickle=True, dtype="float32",
                                      progress=None)
    assert any("pickle" in w for w in report.warnings)
    out = read_all(tmp_path / "out")
    assert torch.equal(out["model.projector.linear_1.weight"], world.source.model.projector.linear_1.weight)


@pytest.mark.parametrize(
    "owner, step",
    [(TempoForConditionalGeneration, "save_pretrained"), (conversion_export, "write_remote_code"),
     (atomic_files, "replace_directory")],
)
def test_interrupted_conversion_leaves_nothing(world, tmp_path, monkeypatch, owner, step):
    def boom(*args, **kwargs):
        raise RuntimeError(f"interrupted in {step}")

    monkeypatch.setattr(owner, step, boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_tempo_checkpoint(world.tempo_path, world.base_path, out, progress=None)
    assert os.listdir(tmp_path) == []  # no output, no temporary folder


def test_interrupted_overwrite_keeps_the_old_output(world, converted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(conversion_export, "write_model_card", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        convert_tempo_checkpoint(world.tempo_path, world.base_path, out, overwrite=True, progress=None)
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]


def test_non_empty_output_refused_without_overwrite(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConversionError, match="not empty.*overwrite"):
        convert_tempo_checkpoint(world.tempo_path, world.base_path, out, progress=None)
    assert os.listdir(out) == ["something"]
    convert_tempo_checkpoint(world.tempo_path, world.base_path, out, overwrite=True, progress=None)
    assert not (out / "something").exists() and (out / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine without overwrite
    convert_tempo_checkpoint(world.tempo_path, world.base_path, tmp_path / "empty", progress=None)
    assert (tmp_path / "empty" / "config.json").is_file()


def test_wrong_inputs_are_named(world, tmp_path):
    with pytest.raises(ConversionError, match="qwen3vl_path"):
        convert_tempo_checkpoint(world.tempo_path, tmp_path / "nowhere", tmp_path / "out", progress=None)
    with pytest.raises(ConversionError, match="model_type is 'qwen3_vl', expected 'tempo_qwen'"):
        convert_tempo_checkpoint(world.base_path, world.base_path, tmp_path / "out", progress=None)
    # a base whose special-token ids are not the decoder tokenizer's
    base = tmp_path / "base"
    base.mkdir()
    for name in os.listdir(world.base_path):
        (base / name).symlink_to(world.base_path / name)
    (base / "config.json").unlink()
    config = json.loads((world.base_path / "config.json").read_text())
    config["video_token_id"] += 1
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="video_token_id=.*must agree"):
        convert_tempo_checkpoint(world.tempo_path, base, tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- hub, CLI, card
def test_push_to_hub_uploads_the_output_folder(world, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", folder_path, repo_id, kwargs, sorted(os.listdir(folder_path))))
            return SimpleNamespace(commit_url="https://huggingface.co/me/tempo-6b/commit/1")

    monkeypatch.setattr(conversion_export, "HfApi", FakeApi)
    out = tmp_path / "out"
    report = convert_tempo_checkpoint(world.tempo_path, world.base_path, out, push_to_hub="me/tempo-6b", progress=None)
    assert calls[1][0] == "create_repo" and calls[1][1] == "me/tempo-6b" and calls[1][2]["exist_ok"] is True
    upload = calls[2]
    assert upload[0] == "upload_folder" and Path(upload[1]) == out.absolute() and upload[2] == "me/tempo-6b"
    assert "config.json" in upload[4] and "model.safetensors" in upload[4]
    assert report.pushed_to == "me/tempo-6b"
    # the card names the repository it was uploaded to
    assert 'MODEL_ID = "me/tempo-6b"' in (out / "README.md").read_text()


@pytest.mark.slow
def test_cli_script(world, tmp_path, capsys):
    out = tmp_path / "cli-out"
    argv = ["--tempo_path", str(world.tempo_path), "--qwen3vl_path", str(world.base_path), "--output_dir", str(out)]
    run = subprocess.run([sys.executable, str(CLI_SCRIPT), *argv, "--max_shard_size", "300KB"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"model\.vision_tower_aux_list\.0\.vlm\.model\.visual\.\* +-> model\.compressor\.visual\.\*", run.stdout)
    assert "tied: lm_head.weight = model.language_model.embed_tokens.weight" in run.stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    # the same script in-process: a second run into the now non-empty folder is refused
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_tempo_to_hf", CLI_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(argv) == 1
    assert "not empty" in capsys.readouterr().err


def test_tempo_cli_subcommand_reuses_the_arguments():
    import argparse

    parser = conversion.add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--tempo_path", "a", "--qwen3vl_path", "b", "--output_dir", "c", "--allow-pickle",
                              "--push_to_hub", "me/x", "--dtype", "float16", "--max_shard_size", "2GB"])
    assert (args.allow_pickle, args.push_to_hub, args.dtype, args.max_shard_size, args.overwrite) == (
        True, "me/x", "float16", "2GB", False)


@pytest.mark.parametrize("argv", [["convert", "--help"], ["convert", "--tempo_path", "x"]])
def test_convert_help_and_argument_errors_import_no_heavy_module(argv):
    """`tempo convert --help` builds the conversion options without torch, transformers or huggingface_hub."""
    code = (
        "import sys\nfrom transformers_tempo.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(rc, sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"{0 if '--help' in argv else 2} []", result.stdout + result.stderr
    assert "--qwen3vl_path" in result.stdout + result.stderr  # the options came from conversion.cli


def card_metadata(text: str) -> dict:
    import yaml

    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "the model card starts with YAML metadata"
    return yaml.safe_load(match.group(1))


def test_model_card_metadata():
    text = MODEL_CARD.read_text()
    meta = card_metadata(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "video-text-to-text"
    assert set(meta["base_model"]) == {"Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-4B", "Vision-CAIR/Tempo-6B"}
    assert meta["license"] == "other" and "non-commercial" in meta["license_name"]
    for number in ("52.3", "52.7", "57.0", "57.8", "75.2", "75.6", "65.1", "64.5", "2604.08120"):
        assert number in text


@pytest.mark.slow
def test_model_card_usage_snippet_runs(converted_bf16, tmp_path, monkeypatch):
    from transformers_tempo.synthetic import write_test_video

    text = (converted_bf16.out / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the card has a python usage snippet"
    snippet = blocks[0]
    assert 'MODEL_ID = "<org>/tempo-6b"' in snippet and 'VIDEO = "video.mp4"' in snippet
    video = write_test_video(tmp_path / "clip.mp4", num_frames=40, fps=10)
    snippet = snippet.replace("<org>/tempo-6b", str(converted_bf16.out)).replace('"video.mp4"', repr(str(video)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippet, "model_card_snippet", "exec"), namespace)  # noqa: S102
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]
    # the answer is the new tokens alone: equal to decoding from the spliced embeddings (new tokens only)
    model, inputs = namespace["model"], namespace["inputs"]
    prepared = model.prepare_generation_inputs(**{k: v for k, v in inputs.items() if k != "segment_times"},
                                               visual_token_budget=4096)
    new_tokens = model.generate(decoder_inputs=prepared, max_new_tokens=128)
    assert namespace["answer"] == namespace["processor"].batch_decode(new_tokens, skip_special_tokens=True)[0]
