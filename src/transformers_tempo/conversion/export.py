"""Writing the converted folder's other files (processor, remote code, model card) and uploading it."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi

from .checkpoint import read_json
from .errors import ConversionError

# config.json "auto_map" of the converted folder: Auto class -> module.Class of the copied code.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_tempo.TempoConfig",
    "AutoModel": "modeling_tempo.TempoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_tempo.TempoForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_tempo.TempoForConditionalGeneration",
    "AutoProcessor": "processing_tempo.TempoProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_tempo.TempoProcessor"}
REMOTE_CODE_ENTRY_MODULES = ("configuration_tempo", "modeling_tempo", "processing_tempo")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_NAME = __name__.split(".")[0]
DEFAULT_MODEL_CARD = PACKAGE_DIR.parents[1] / "model_cards" / "tempo-6b.md"  # in a checkout of the repository
MODEL_CARD_REPO_PLACEHOLDER = "<org>/tempo-6b"


def write_folder_extras(folder: Path, *, tokenizer, base_path: Path, model_card, repo_id: str | None) -> tuple[list[str], list[str]]:
    """Processor files, the package's code (for `trust_remote_code`) and the model card, into `folder`.
    Returns (config notes, warnings) for the report."""
    notes = write_processor_files(folder, tokenizer, base_path)
    code = write_remote_code(folder)
    notes.append(f"remote code copied: {', '.join(code)}")
    card_note = write_model_card(folder, model_card, repo_id)
    return notes, [card_note] if card_note else []


def write_processor_files(output_dir: Path, tokenizer, base_path: Path) -> list[str]:
    """Save the TempoProcessor (video processor + decoder tokenizer + both chat templates) into output_dir.

    The decoder prompt template is the processor's own (the released ChatML prompt); the compressor's is
    the base Qwen3-VL processor's chat template (``chat_template.jinja``/``.json`` or its tokenizer's), or
    the processor's restatement of it when the base folder has none. Returns notes for the report.
    """
    from ..processing_tempo import COMPRESSOR_CHAT_TEMPLATE, TempoProcessor
    from ..video_processing_tempo import TempoVideoProcessor

    notes = []
    compressor_template = _base_chat_template(base_path)
    kwargs = {}
    if compressor_template is None:
        notes.append("the base Qwen3-VL folder has no chat template; the processor's built-in compressor template is used")
    else:
        # The released compressor prompt is rendered by the base Qwen3-VL processor's own template: keep it.
        kwargs["compressor_chat_template"] = compressor_template
        differs = [
            kind
            for kind in ("video", "image")
            if _render(tokenizer, compressor_template, kind) != _render(tokenizer, COMPRESSOR_CHAT_TEMPLATE, kind)
        ]
        if differs:
            notes.append(
                f"the base Qwen3-VL chat template renders the {'/'.join(differs)} compressor prompt differently from the "
                "processor's built-in template; the base template (the released behaviour) was saved"
            )
        else:
            notes.append("compressor chat template: the base Qwen3-VL one (renders Tempo's prompts as the built-in one)")
    processor = TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer, **kwargs)
    processor.save_pretrained(output_dir)
    _add_auto_map(output_dir / "processor_config.json", PROCESSOR_AUTO_MAP)
    return notes


def _render(tokenizer, template: str, kind: str) -> str | None:
    from ..processing_tempo import TempoProcessor

    try:
        messages = TempoProcessor._compressor_view(kind, "What happens?")
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template that cannot render is reported as different
        return f"<error: {err}>"


def _base_chat_template(base_path: Path) -> str | None:
    if (base_path / "chat_template.jinja").is_file():
        return (base_path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (base_path / name).is_file():
            template = read_json(base_path / name, "base Qwen3-VL").get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _add_auto_map(path: Path, auto_map: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("auto_map", {}).update(auto_map)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remote_code_modules(entry_modules=REMOTE_CODE_ENTRY_MODULES) -> list[Path]:
    """The package modules that `trust_remote_code` loading needs: the entry modules and every module they
    import relatively, transitively. Refuses a module that imports the package by its absolute name (it
    would not import where the package is not installed). Only the package's top-level modules are
    followed (the copied files sit side by side in one folder)."""
    todo = [m for m in entry_modules if (PACKAGE_DIR / f"{m}.py").is_file()]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = PACKAGE_DIR / f"{name}.py"
        if not path.is_file():
            raise ConversionError(f"remote code: module {name!r} is imported relatively but {path} does not exist")
        seen[name] = path
        todo.extend(_relative_imports(path))
    return [seen[name] for name in sorted(seen)]


def _relative_imports(path: Path) -> list[str]:
    """The top-level package modules that `path` imports relatively (absolute package imports refused)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE_NAME:
            raise ConversionError(
                f"remote code: {path.name}:{node.lineno} imports {node.module!r} absolutely; use a relative import"
            )
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE_NAME for a in node.names):
            raise ConversionError(f"remote code: {path.name}:{node.lineno} imports the package absolutely")
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.level > 1:
                raise ConversionError(f"remote code: {path.name}:{node.lineno} imports from outside the package")
            if node.module:
                found.append(node.module.split(".")[0])
            else:
                found.extend(a.name for a in node.names if (PACKAGE_DIR / f"{a.name}.py").is_file())
    return found


def write_remote_code(output_dir: Path) -> list[str]:
    """Copy `remote_code_modules()` into output_dir; returns the file names."""
    copied = []
    for path in remote_code_modules():
        shutil.copyfile(path, output_dir / path.name)
        copied.append(path.name)
    return copied


def write_model_card(output_dir: Path, model_card: str | os.PathLike | None, repo_id: str | None) -> str | None:
    """Write README.md from `model_card` (default: the repository's card, with `repo_id` filled in).
    Returns a warning when the default card is not there (an installed package has no checkout)."""
    path = Path(model_card) if model_card is not None else DEFAULT_MODEL_CARD
    if not path.is_file():
        if model_card is not None:
            raise ConversionError(f"model card {path} does not exist")
        return f"no model card written ({path} not found)"
    text = path.read_text()
    if repo_id:
        text = text.replace(MODEL_CARD_REPO_PLACEHOLDER, repo_id)
    (output_dir / "README.md").write_text(text)
    return None


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload Tempo (converted with transformers-tempo)") -> str:
    """Create the model repository if needed and upload the folder; the token comes from `token`, else the
    usual HF_TOKEN / `hf auth login`. Returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
