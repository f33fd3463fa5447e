"""Released tensor names -> converted parameter names, and the plan that checks every tensor has a place.

Pure Python: the plan reads shapes through the checkpoint reader and never loads a tensor.
"""

from __future__ import annotations

from .errors import ConversionError

# Released key prefix -> converted key prefix, checked in this order (first match wins).
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower_aux_list.0.vlm.model.visual.", "model.compressor.visual."),
    ("model.vision_tower_aux_list.0.vlm.model.language_model.", "model.compressor.language_model."),
    ("model.vision_tower_aux_list.0.compression_tokens", "model.memory_tokens"),  # (1, M, D) -> (M, D)
    ("model.mm_projector.0.", "model.projector.linear_1."),  # mlp2x_gelu: Linear, GELU, Linear
    ("model.mm_projector.2.", "model.projector.linear_2."),
    ("model.mm_projector.", "model.projector.linear_1."),  # projector_type "linear": a bare nn.Linear
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),  # tied to the embeddings in Tempo-6B; optional
)
MEMORY_TOKENS_SOURCE = "model.vision_tower_aux_list.0.compression_tokens"
RELEVANCE_TARGET = "model.relevance_head.weight"
EMBEDDINGS_TARGET = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def match_rule(key: str) -> tuple[str, str] | None:
    """The (released prefix, converted prefix) rule of KEY_RULES that covers `key`, or None."""
    for src, dst in KEY_RULES:
        if src.endswith("."):
            if key.startswith(src):
                return src, dst
        elif key == src or key.startswith(src + "."):
            return src, dst
    return None


def map_released_key(key: str) -> str | None:
    """The converted name of a released tensor, or None when no rule covers it."""
    rule = match_rule(key)
    if rule is None:
        return None
    src, dst = rule
    return dst + key[len(src) :]


def map_key_back(mapping: dict[str, str | None], target: str) -> str:
    """The released name that maps to `target` (for messages); the target itself if none does."""
    for source, dst in mapping.items():
        if dst == target:
            return source
    return target


def _shape_matches(key: str, shape: tuple, want: tuple) -> tuple[bool, list[int]]:
    """Whether a released tensor's shape fits its target, and the released shape that would fit."""
    if key == MEMORY_TOKENS_SOURCE:
        return len(shape) == 3 and shape[0] == 1 and tuple(shape[1:]) == tuple(want), [1, *want]
    return tuple(shape) == tuple(want), list(want)


def plan_tensor_mapping(checkpoint, target_shapes: dict[str, tuple], tied: dict[str, str]) -> dict[str, str | None]:
    """Map every released tensor of `checkpoint` (a `CheckpointReader`) to its converted name, check
    shapes, and fail once listing every problem (`ConversionError`)."""
    mapping: dict[str, str | None] = {}
    unknown, mismatched, duplicates = [], [], []
    filled: dict[str, str] = {}
    for key in checkpoint.keys():
        target = map_released_key(key)
        if target is None or target not in target_shapes:
            unknown.append(f"{key} {list(checkpoint.shape(key))}" + (f" (would be {target})" if target else ""))
            continue
        shape = checkpoint.shape(key)
        ok, expect = _shape_matches(key, shape, target_shapes[target])
        if not ok:
            mismatched.append(f"{key} {list(shape)} -> {target} expects {expect}")
        if target in filled:
            duplicates.append(f"{key} and {filled[target]} both map to {target}")
        filled[target] = key
        mapping[key] = target
    missing = [t for t in target_shapes if t not in filled and t not in tied and t != RELEVANCE_TARGET]
    problems = _plan_problems(unknown, missing, mismatched, duplicates, target_shapes=target_shapes, tied=tied)
    if problems:
        raise ConversionError(f"released checkpoint {checkpoint.folder}: " + "\n".join(problems))
    return mapping


def _plan_problems(unknown, missing, mismatched, duplicates, *, target_shapes, tied) -> list[str]:
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) of the released checkpoint have no place in the converted model:\n    "
            + "\n    ".join(unknown)
        )
    if missing:
        problems.append(
            f"{len(missing)} parameter(s) of the converted model are not in the released checkpoint:\n    "
            + "\n    ".join(f"{t} {list(target_shapes[t])}" for t in missing)
            + f"\n  ({', '.join(tied) or 'no'} tied weight(s) excepted; {RELEVANCE_TARGET} comes from the base model)"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n    " + "\n    ".join(mismatched))
    if duplicates:
        problems.append("duplicate targets:\n    " + "\n    ".join(duplicates))
    return problems
