"""Convert the released Tempo-6B checkpoint into this package's format (and optionally upload it).

The released checkpoint (``Vision-CAIR/Tempo-6B``) is a LLaVA-style ``tempo_qwen`` model: the Qwen3-4B
decoder at the top level of its ``config.json`` and state dict, plus the compressor (a whole
Qwen3-VL-2B-Instruct body), the memory ("compression") tokens and the projector under
``model.vision_tower_aux_list.0.*`` / ``model.mm_projector.*``. The relevance vector is not stored
there: the released code builds it at run time from the LM head of the *base* Qwen3-VL-2B-Instruct, so
the conversion needs that base model too.

    from transformers_tempo.conversion import convert_tempo_checkpoint

    report = convert_tempo_checkpoint("checkpoints/Tempo-6B", "checkpoints/Qwen3-VL-2B-Instruct", "tempo-6b-hf")
    print(report.summary())

The output folder loads with ``AutoModel.from_pretrained(out)`` after ``import transformers_tempo``, or
with ``trust_remote_code=True`` alone (the package's modules are copied next to the weights).

Nothing is written at the target until everything has succeeded: the output is assembled in a hidden
temporary folder beside it and renamed into place at the end.

The modules, in the order the conversion uses them:

- ``checkpoint``: reading a checkpoint folder's tensors (safetensors, or pickle when allowed), JSON, token ids;
- ``config``: `build_tempo_config`, the TempoConfig from the released and base configs;
- ``key_mapping``: released -> converted tensor names (`KEY_RULES`) and the plan that checks them;
- ``relevance``: `relevance_vector` from the base Qwen3-VL LM head;
- ``export``: the processor, the remote code, the model card, and `push_folder_to_hub`;
- ``convert``: `convert_tempo_checkpoint`, the steps in order; ``report``: `ConversionReport`;
- ``cli``: `add_convert_arguments` / `run_convert` (standard library only, so `tempo convert --help` is instant).

The names below are imported from their modules on first use (this package imports nothing heavy).
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "ConversionError": "errors",
    "ConversionReport": "report",
    "KEY_RULES": "key_mapping",
    "MEMORY_TOKENS_SOURCE": "key_mapping",
    "RELEVANCE_TARGET": "key_mapping",
    "EMBEDDINGS_TARGET": "key_mapping",
    "LM_HEAD": "key_mapping",
    "map_released_key": "key_mapping",
    "map_key_back": "key_mapping",
    "build_tempo_config": "config",
    "relevance_vector": "relevance",
    "BASE_LM_HEAD_KEYS": "relevance",
    "BASE_EMBEDDING_KEYS": "relevance",
    "PICKLE_SUFFIXES": "checkpoint",
    "REMOTE_CODE_AUTO_MAP": "export",
    "PROCESSOR_AUTO_MAP": "export",
    "REMOTE_CODE_ENTRY_MODULES": "export",
    "DEFAULT_MODEL_CARD": "export",
    "MODEL_CARD_REPO_PLACEHOLDER": "export",
    "remote_code_modules": "export",
    "write_processor_files": "export",
    "write_remote_code": "export",
    "write_model_card": "export",
    "push_folder_to_hub": "export",
    "convert_tempo_checkpoint": "convert",
    "Progress": "convert",
    "add_convert_arguments": "cli",
    "run_convert": "cli",
}

__all__ = [
    "ConversionError",
    "ConversionReport",
    "KEY_RULES",
    "REMOTE_CODE_AUTO_MAP",
    "add_convert_arguments",
    "build_tempo_config",
    "convert_tempo_checkpoint",
    "map_released_key",
    "push_folder_to_hub",
    "relevance_vector",
    "run_convert",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
