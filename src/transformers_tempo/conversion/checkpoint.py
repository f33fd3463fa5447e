"""Reading the inputs: a checkpoint folder's tensors, JSON files, token ids, and the dtype option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class CheckpointReader:
    """The tensors of a checkpoint folder: safetensors (one file or sharded with an index), or, only when
    allowed, pickle files read with ``torch.load(weights_only=True)``."""

    def __init__(self, folder: Path, allow_pickle: bool = False, what: str = "checkpoint"):
        self.folder = folder
        self.what = what
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self.key_file: dict[str, Path] = {}
        self.format = "safetensors"
        safetensors_files = self._files(folder, "model.safetensors.index.json", (".safetensors",))
        if safetensors_files is not None:
            self._open_safetensors(safetensors_files)
            return
        pickle_files = self._files(folder, "pytorch_model.bin.index.json", PICKLE_SUFFIXES)
        if pickle_files is None:
            raise ConversionError(f"{what} {folder}: no weights found (expected *.safetensors, optionally with an index)")
        if not allow_pickle:
            names = ", ".join(sorted(p.name for p in pickle_files))
            raise ConversionError(
                f"{what} {folder} holds only pickle weights ({names}). Unpickling can execute arbitrary code "
                "hidden in the file, so it is refused by default. Convert them to safetensors, or pass "
                "allow_pickle=True (--allow-pickle) if you trust the file; it is then read with "
                "torch.load(weights_only=True)."
            )
        self.format = "pickle"
        for path in pickle_files:
            self._read_pickle_file(path)

    def _read_pickle_file(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - name the file
            raise ConversionError(f"{self.what} {path}: cannot be read with torch.load(weights_only=True): {err}") from err
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{self.what} {path}: expected a flat dict of tensors")
        for key, tensor in state.items():
            if key in self._pickled:
                raise ConversionError(f"{self.what}: tensor {key!r} appears in more than one file")
            self._pickled[key] = tensor
            self.key_file[key] = path

    def _files(self, folder: Path, index_name: str, suffixes: tuple[str, ...]) -> list[Path] | None:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{self.what} index {index}: not a valid index file ({err})") from err
            files = sorted({folder / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise ConversionError(f"{self.what} index {index} names shards that do not exist: {', '.join(missing)}")
            self._index = weight_map
            return files
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
        self._index = None
        return files or None

    def _open_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # noqa: BLE001
                raise ConversionError(f"{self.what} {path}: not a readable safetensors file ({err})") from err
            self._handles[path] = handle
            for key in handle.keys():
                if key in self.key_file:
                    raise ConversionError(
                        f"{self.what}: tensor {key!r} is in both {self.key_file[key].name} and {path.name}"
                    )
                self.key_file[key] = path
        if self._index is not None:
            wrong = [k for k, name in self._index.items() if self.key_file.get(k, Path()).name != name]
            if wrong:
                raise ConversionError(
                    f"{self.what}: the index and the shards disagree on {len(wrong)} tensors: {', '.join(wrong)}"
                )

    def keys(self) -> list[str]:
        return list(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.format == "pickle":
            return tuple(self._pickled[key].shape)
        return tuple(self._handles[self.key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self.format == "pickle":
            return self._pickled[key].dtype
        name = self._handles[self.key_file[key]].get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.what}: tensor {key!r} has dtype {name}, not a float type")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        """The tensor (for pickle input, handed over: the reader forgets it so that only one copy lives)."""
        if self.format == "pickle":
            return self._pickled.pop(key)
        return self._handles[self.key_file[key]].get_tensor(key)

    def rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Selected rows of a 2-D tensor, without reading the rest (safetensors)."""
        if self.format == "pickle":
            return self._pickled[key][rows]
        piece = self._handles[self.key_file[key]].get_slice(key)
        return torch.stack([piece[r : r + 1][0] for r in rows])

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()


def read_json(path: Path, what: str) -> dict:
    """The parsed JSON file; `ConversionError` naming `what` when it is missing or not JSON."""
    if not path.is_file():
        raise ConversionError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{what}: {path} is not valid JSON ({err})") from err


def token_id(tokenizer, token: str, what: str) -> int:
    """The id of `token` in the tokenizer's vocabulary; `ConversionError` naming `what` if absent."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ConversionError(f"{what}: the tokenizer has no token {token!r}")
    return int(vocab[token])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype) -> torch.dtype | None:
    """The `dtype` option as a torch dtype; None for "auto" (= the checkpoint's own)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConversionError(f"dtype {dtype} is not supported (bfloat16, float16, float32)")
        return dtype
    if dtype in (None, "auto"):
        return None
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported (bfloat16, float16, float32 or auto)")
    return DTYPES[name]
