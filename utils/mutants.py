"""Mutation check: deliberate bugs applied at run time, and which tests catch them.

Each mutant is a small wrong version of one behaviour (keep the last k features instead of the
first k, one ATA budget for the whole batch, ...), applied by monkeypatching the function that
has the behaviour, so the list keeps working while the code around it changes. A mutant whose
target has moved is reported as "not applied", never as killed.

Run every mutant against its test files (each in its own `pytest -x` process) and report which
tests killed it and which mutants survived (exit status 1 if any survived or could not be applied):

    python utils/mutants.py                 # all mutants, their own test files
    python utils/mutants.py shared_budget   # some of them
    python utils/mutants.py --list          # names, bugs and test files
    python utils/mutants.py --files tests/test_modeling.py tests/test_streaming.py   # other tests
    python utils/mutants.py --every         # no -x: list every test that fails under each mutant

One mutant by hand, as a pytest plugin (this folder on PYTHONPATH):

    TEMPO_MUTANT=tail_features PYTHONPATH=src:utils python -m pytest -p mutants tests/test_oracles.py

Mutants live only in the pytest process: tests that run the `tempo` command in a subprocess
still run the correct code.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "TEMPO_MUTANT"
ORACLES, ANSWERS, VALUES = "tests/test_oracles.py", "tests/test_answers_independent.py", "tests/test_cli_values.py"


class NotApplied(Exception):
    """The code a mutant patches is not where the mutant expects it."""


def replace(owner, name: str, new) -> None:
    """owner.name = new, refusing to create an attribute that is not there."""
    if not hasattr(owner, name):
        raise NotApplied(f"{getattr(owner, '__name__', owner)} has no attribute {name!r}")
    setattr(owner, name, new)


# ------------------------------------------------------------------------------------ the mutants
def tail_features():
    """Each segment keeps its last k memory features instead of its first k."""
    from transformers_tempo import modeling_tempo, token_allocation

    real = token_allocation.select_tokens

    def select_tokens(features, counts, strategy="head"):
        return real(features, counts, strategy="tail")

    replace(modeling_tempo, "select_tokens", select_tokens)


def pipeline_drops_first_token():
    """The pipeline decodes each answer without its first generated token."""
    from transformers_tempo.pipeline_tempo import VideoQuestionAnsweringPipeline

    real = VideoQuestionAnsweringPipeline.postprocess

    def postprocess(self, model_outputs):
        output = model_outputs["output"]
        output["sequences"] = output["sequences"][:, 1:]
        return real(self, model_outputs)

    replace(VideoQuestionAnsweringPipeline, "postprocess", postprocess)


def shared_budget():
    """ATA gives the whole batch one budget instead of one per video."""
    from transformers_tempo import modeling_tempo, token_allocation

    def ata_for_samples(scores, sample_index, budget=8192, min_tokens=4, max_tokens=128):
        return token_allocation.allocate_tokens(scores, budget, min_tokens, max_tokens)

    replace(modeling_tempo, "ata_for_samples", ata_for_samples)


def timestamps_off_by_one_segment():
    """The decoder's timestamp of segment i is the centre of segment i + 1."""
    from transformers_tempo import processing_tempo

    cls = processing_tempo.TempoProcessor
    if not hasattr(cls, "_video_layout"):
        raise NotApplied("TempoProcessor has no _video_layout")
    real = cls._video_layout

    def video_layout(self, out, real_fps, num_frames):
        layout = real(self, out, real_fps, num_frames)
        if "decoder_stamps" not in layout:
            raise NotApplied("_video_layout no longer returns decoder_stamps")
        per = self.video_processor.frames_per_segment
        layout["decoder_stamps"] = [
            processing_tempo.format_timestamp(((i + 1) * per + per / 2) / real_fps)
            for i in range(len(layout["decoder_stamps"]))
        ]
        return layout

    replace(cls, "_video_layout", video_layout)


def relevance_wrong_position():
    """The relevance score reads the first memory token's hidden state instead of the token before it."""
    import torch
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    from transformers_tempo import modeling_tempo

    last = {}
    text_model = modeling_qwen3_vl.Qwen3VLTextModel
    real_forward = text_model.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        last["hidden"] = out.last_hidden_state
        return out

    replace(text_model, "forward", forward)
    real_scores = modeling_tempo.TempoModel.relevance_scores

    def relevance_scores(self, hidden):
        full = last.get("hidden")
        if full is not None and full.shape[0] == hidden.shape[0]:
            moved = []
            for i in range(hidden.shape[0]):
                match = (full[i].to(hidden.device) == hidden[i]).all(-1).nonzero()
                if match.numel() == 0 or int(match[0]) + 1 >= full.shape[1]:
                    break
                moved.append(full[i, int(match[0]) + 1].to(hidden.device))
            else:
                hidden = torch.stack(moved)
        return real_scores(self, hidden)

    replace(modeling_tempo.TempoModel, "relevance_scores", relevance_scores)


def labels_not_masked():
    """Labels over the spliced visual positions are the video token id instead of -100."""
    from transformers_tempo import modeling_tempo

    real = modeling_tempo.TempoModel.prepare_decoder_inputs
    signature = inspect.signature(real)
    if "labels" not in signature.parameters:
        raise NotApplied("prepare_decoder_inputs takes no labels")
    text_marker = -7

    def prepare_decoder_inputs(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None:
            return real(self, *args, **kwargs)
        bound.arguments["labels"] = labels.masked_fill(labels == -100, text_marker)  # -100 only where visual
        out = real(*bound.args, **bound.kwargs)
        visual = (out.labels == -100) & out.attention_mask.bool()
        text_ignored = out.labels == text_marker
        out.labels = out.labels.masked_fill(visual, self.config.video_token_id).masked_fill(text_ignored, -100)
        return out

    replace(modeling_tempo.TempoModel, "prepare_decoder_inputs", prepare_decoder_inputs)


def fps_halved():
    """Video files are sampled at half the requested frame rate."""
    from transformers_tempo import video_loading

    real = video_loading.compute_sample_indices

    def compute_sample_indices(total_frames, source_fps, fps=2.0, min_frames=8, max_frames=1024):
        return real(total_frames, source_fps, fps / 2, min_frames, max_frames)

    replace(video_loading, "compute_sample_indices", compute_sample_indices)


def fps_ignored():
    """Video files are always sampled at 2 fps, whatever rate was asked for."""
    from transformers_tempo import video_loading

    real = video_loading.compute_sample_indices

    def compute_sample_indices(total_frames, source_fps, fps=2.0, min_frames=8, max_frames=1024):
        return real(total_frames, source_fps, 2.0, min_frames, max_frames)

    replace(video_loading, "compute_sample_indices", compute_sample_indices)


@dataclass
class Mutant:
    apply: Callable[[], None]
    tests: list[str]  # pytest arguments: the files (first the one expected to kill it)

    @property
    def bug(self) -> str:
        return inspect.getdoc(self.apply).splitlines()[0]


MUTANTS = {
    "tail_features": Mutant(tail_features, [ORACLES]),
    "pipeline_drops_first_token": Mutant(pipeline_drops_first_token, [ANSWERS]),
    "shared_budget": Mutant(shared_budget, [ORACLES]),
    "timestamps_off_by_one_segment": Mutant(timestamps_off_by_one_segment, [VALUES]),
    "relevance_wrong_position": Mutant(relevance_wrong_position, [ORACLES]),
    "labels_not_masked": Mutant(labels_not_masked, [ORACLES]),
    "fps_halved": Mutant(fps_halved, [VALUES]),
    "fps_ignored": Mutant(fps_ignored, [VALUES]),
}


# ------------------------------------------------------------------------------ pytest plugin
def pytest_configure(config):
    """Apply the mutant named by TEMPO_MUTANT (before test modules are imported)."""
    name = os.environ.get(ENV_VAR)
    if not name:
        return
    if name not in MUTANTS:
        raise SystemExit(f"{ENV_VAR}={name}: unknown mutant (known: {', '.join(MUTANTS)})")
    try:
        MUTANTS[name].apply()
    except NotApplied as err:
        print(f"mutant {name} NOT APPLIED: {err}", file=sys.stderr)
        raise SystemExit(4) from err
    config._tempo_mutant = name


def pytest_report_header(config):
    name = getattr(config, "_tempo_mutant", None)
    return f"TEMPO MUTANT APPLIED: {name}" if name else None


# ------------------------------------------------------------------------------ runner
@dataclass
class Outcome:
    name: str
    status: str  # killed, SURVIVED, NOT APPLIED, ERROR
    detail: str
    seconds: float


def run_one(name: str, tests: list[str], timeout: int, every: bool = False) -> Outcome:
    env = dict(os.environ)
    env[ENV_VAR] = name
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "utils"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    stop = [] if every else ["-x"]
    cmd = [sys.executable, "-m", "pytest", *stop, "-q", "-p", "mutants", "-p", "no:cacheprovider", "-rfE", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(name, "ERROR", f"timed out after {timeout} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    if "NOT APPLIED" in text:
        line = next(line for line in text.splitlines() if "NOT APPLIED" in line)
        return Outcome(name, "NOT APPLIED", line, seconds)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 1 and failed:
        return Outcome(name, "killed", " ".join(failed) if every else failed[0], seconds)
    if proc.returncode == 0:
        return Outcome(name, "SURVIVED", text.strip().splitlines()[-1] if text.strip() else "", seconds)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return Outcome(name, "ERROR", f"pytest exit {proc.returncode}: {last}", seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="show the mutants and exit")
    parser.add_argument("--files", nargs="+", default=None, help="test files to run for every mutant instead of its own")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    parser.add_argument("--every", action="store_true", help="run all the tests (no -x) and list every test that fails")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; known: {', '.join(MUTANTS)}")
    names = args.names or list(MUTANTS)
    if args.list:
        for name in names:
            print(f"{name}: {MUTANTS[name].bug}  [{' '.join(MUTANTS[name].tests)}]")
        return 0
    total = time.perf_counter()
    outcomes = []
    for name in names:
        tests = args.files or MUTANTS[name].tests
        outcome = run_one(name, tests, args.timeout, args.every)
        outcomes.append(outcome)
        print(f"{outcome.status:11} {name:30} {outcome.seconds:6.1f} s  {outcome.detail}", flush=True)
    total = time.perf_counter() - total
    bad = [o for o in outcomes if o.status != "killed"]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} mutants killed in {total:.0f} s", end="")
    print(f"; not killed: {', '.join(o.name for o in bad)}" if bad else "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
