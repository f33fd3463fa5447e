"""`ConversionReport`: what a conversion did, and its printed summary."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from .key_mapping import KEY_RULES, MEMORY_TOKENS_SOURCE, RELEVANCE_TARGET, match_rule


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did.

    key_mapping: released tensor name -> converted parameter name, for every released tensor (in the
        order of the checkpoint); tied tensors (an ``lm_head.weight`` that duplicates the embeddings)
        map to ``None`` with the reason in ``tied_weights``.
    tied_weights: converted parameter -> the parameter it is tied to (not stored separately).
    relevance: how the relevance vector was built (base checkpoint, token ids, rows, rounding).
    """

    output_dir: str
    dtype: str
    key_mapping: dict[str, str | None]
    tied_weights: dict[str, str]
    relevance: dict[str, Any]
    config_notes: list[str]
    warnings: list[str]
    num_tensors: int
    num_parameters: int
    files: list[str]
    step_seconds: dict[str, float]
    seconds: float
    pushed_to: str | None = None

    def rule_counts(self) -> list[tuple[str, str, int]]:
        """(released prefix, converted prefix, number of tensors) for every rule that was used."""
        counts: Counter = Counter()
        for source, target in self.key_mapping.items():
            rule = match_rule(source) if target is not None else None
            if rule is not None:
                counts[rule] += 1
        return [(src, dst, counts[(src, dst)]) for src, dst in KEY_RULES if counts[(src, dst)]]

    def summary(self) -> str:
        lines = [f"Converted Tempo checkpoint -> {self.output_dir} ({self.dtype})", "Key mapping (released -> converted):"]
        width = max((len(src) for src, _, _ in self.rule_counts()), default=0)
        for src, dst, n in self.rule_counts():
            note = "  [(1, M, D) -> (M, D)]" if src == MEMORY_TOKENS_SOURCE else ""
            lines.append(f"  {src + '*' if src.endswith('.') else src:<{width + 1}} -> {dst}{'*' if dst.endswith('.') else ''}"
                         f"  ({n} tensor{'s' if n != 1 else ''}){note}")
        rel = self.relevance
        lines.append(
            f"  (base) {rel['source_key']}[Yes={rel['yes_id']}] - [No={rel['no_id']}] -> {RELEVANCE_TARGET}"
            f"  (subtracted in {rel['subtract_dtype']}, stored float32)"
        )
        for target, source in self.tied_weights.items():
            dropped = " (the checkpoint's copy was compared and dropped)" if target in self.key_mapping else ""
            lines.append(f"  tied: {target} = {source} (not stored){dropped}")
        lines.extend(f"config: {note}" for note in self.config_notes)
        lines.extend(f"WARNING: {warning}" for warning in self.warnings)
        lines.append(
            f"{self.num_tensors} tensors, {self.num_parameters:,} parameters, {len(self.files)} files, "
            f"{self.seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.step_seconds.items()) + ")"
        )
        if self.pushed_to:
            lines.append(f"uploaded to https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)
