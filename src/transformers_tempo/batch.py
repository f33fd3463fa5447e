"""The batch job of `tempo batch` under its former name; it lives in `transformers_tempo.cli.batch_job`."""

from .cli.batch_job import (  # noqa: F401
    BatchSettings,
    LineWriter,
    answer_items,
    collect_and_write,
    item_options,
    merge_records,
    part_files,
    part_path,
    pending_items,
    read_items,
    read_records,
    run,
    shard,
)
