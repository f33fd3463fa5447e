"""Row -> visual, prompt and score for the `tempo_tiny_mcq` task (see tempo_tiny_mcq.yaml)."""

import os
import re
from pathlib import Path

LETTERS = "ABCD"


def video_dir() -> Path:
    """Where the videos are: $TEMPO_TINY_MCQ_VIDEOS, else the `videos/` folder next to this file."""
    return Path(os.environ.get("TEMPO_TINY_MCQ_VIDEOS") or Path(__file__).resolve().parent / "videos")


def doc_to_visual(doc):
    """The row's video; with clip bounds (seconds) in lmms-eval's form when the row has them.

    A missing file is handed over as it is: the model reports it and answers empty.
    """
    path = str(video_dir() / doc["video"])
    if doc.get("start") is None and doc.get("end") is None:
        return [path]
    return [{"type": "video", "path": path, "video_start": doc.get("start"), "video_end": doc.get("end")}]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(doc["options"]))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def answer_letter(response: str):
    """The option letter a response gives: its first standalone A-D, or None."""
    match = re.search(r"\b([A-D])\b", response or "")
    return match.group(1) if match else None


def process_results(doc, results):
    return {"accuracy": float(answer_letter(results[0]) == doc["answer"])}
