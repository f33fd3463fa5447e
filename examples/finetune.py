"""Fine-tune Tempo on your own video QA data with transformers' Trainer (optionally with LoRA).

The dataset is a JSON list or a JSONL file of records
    {"video": "clips/goal.mp4", "question": "Who scores?", "answer": "The striker in red."}
with video paths relative to the dataset file ({"video": ..., "messages": [...]} works too).

    python examples/finetune.py --model path/to/tempo-6b --data train.jsonl --output-dir tempo-ft \
        --bf16 --gradient-checkpointing --train projector+memory+decoder
    python examples/finetune.py --model path/to/tempo-6b --data train.jsonl --output-dir tempo-lora \
        --bf16 --gradient-checkpointing --lora --lora-parts decoder,compressor

Saves the fine-tuned model (or, with --lora, only the adapter) and the processor to --output-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModel, AutoProcessor, Trainer

import transformers_tempo  # noqa: F401  (registers Tempo with the Auto classes)
from transformers_tempo.training import (
    TRAINING_PRESETS,
    TempoDataCollator,
    lora_target_modules,
    set_trainable,
    tempo_training_arguments,
)


def load_records(path: str) -> list[dict]:
    """JSON list or JSONL; relative video paths are resolved against the dataset's folder."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        if isinstance(record.get("video"), str):
            record["video"] = str(path.parent / record["video"])  # an absolute path stays as it is
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Tempo model folder or Hub id")
    p.add_argument("--data", required=True, help="JSON or JSONL file of {video, question, answer}")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=1, help="per device")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    p.add_argument("--fp16", action="store_true", help="fp16 mixed precision (autocast + loss scaling)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--train", default="projector+memory+decoder", choices=sorted(TRAINING_PRESETS),
                   help="what trains (\"lora\" is the same as --lora)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (base model frozen)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-parts", default="decoder", help="comma-separated: decoder, compressor")
    p.add_argument("--lora-modules", default="q_proj,v_proj", help="comma-separated: q/k/v/o_proj, gate/up/down_proj")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (they decode the videos)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--use-cpu", action="store_true", help="train on the CPU (also needed for --bf16 without a GPU)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = AutoModel.from_pretrained(args.model)  # float32 weights; --bf16/--fp16 compute under autocast
    processor = AutoProcessor.from_pretrained(args.model)
    if args.lora or args.train == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules(args.lora_parts.split(","), args.lora_modules.split(","))
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets)
        model = get_peft_model(model, config)
        model.print_trainable_parameters()
    else:
        print(f"training {args.train}: {set_trainable(model, args.train):,} parameters")

    training_args = tempo_training_arguments(
        args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16,
        fp16=args.fp16,
        activation_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=args.num_workers,
        logging_steps=args.logging_steps,
        seed=args.seed,
        use_cpu=args.use_cpu,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=load_records(args.data),
        data_collator=TempoDataCollator(processor),
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the whole model, or only the adapter with --lora
    processor.save_pretrained(args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
