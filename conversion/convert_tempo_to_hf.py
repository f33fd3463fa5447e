"""Convert the released Tempo-6B checkpoint into a transformers folder (and optionally upload it).

    python conversion/convert_tempo_to_hf.py \
        --tempo_path checkpoints/Tempo-6B \
        --qwen3vl_path checkpoints/Qwen3-VL-2B-Instruct \
        --output_dir tempo-6b-hf [--dtype bfloat16] [--max_shard_size 5GB] \
        [--push_to_hub ORG/tempo-6b] [--overwrite] [--allow-pickle]

Both inputs are local folders (download them first, e.g. with `hf download`). The same conversion runs
as `tempo convert ...` and as `transformers_tempo.conversion.convert_tempo_checkpoint(...)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from transformers_tempo.conversion import add_convert_arguments, run_convert
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers_tempo.conversion import add_convert_arguments, run_convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert the released Tempo-6B checkpoint (tempo_qwen) into the transformers-tempo format."
    )
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
