"""lmms-eval model `tempo`: evaluate Tempo with the lmms-eval from PyPI (0.7 and later).

Registered through this package's `lmms_eval.models` entry point (see `integrations/__init__.py`),
so with both packages installed

    python -m lmms_eval --model tempo --model_args pretrained=DIR,visual_token_budget=8192 --tasks lvbench
    accelerate launch --num_processes 4 -m lmms_eval --model tempo --model_args pretrained=DIR --tasks lvbench

work unchanged. `simple_evaluate(model=Tempo(pretrained=DIR), ...)` takes a built instance too.

What one process does with its share of the requests (lmms-eval hands each process every N-th
document and gathers the answers itself):

1. Each request's visuals come from the task's `doc_to_visual`: a video path, a dict holding a
   path and clip bounds (``{"path": ..., "video_start": s, "video_end": e}``, lmms-eval's and
   qwen-vl-utils' form; ``start_time``/``end_time`` and ``bound=(s, e)`` are read too), a PIL
   image, or nothing (text only). Tempo takes one video or image per question.
2. Requests are reordered so that the questions about one video (same file, same clip) follow
   each other; each such video is decoded once, its frames serve all of its questions, and the
   next video decodes on a CPU thread while the model answers the current one. At most the
   current batch's videos and the next one are held in memory. Answers go back in request order.
3. Questions are answered `batch_size` at a time (consecutive questions with the same generation
   settings; batching only changes padding, not the answer).
4. A video that cannot be read (missing, damaged, no video stream, bad clip bounds) or a doc
   whose visuals cannot be built gives its questions an empty answer and an error in the log
   naming the file and the document; the run goes on, as lmms-eval's own models do.

Only `generate_until` is implemented: the published benchmarks (lvbench, videomme, mlvu_dev,
longvideobench_val_v) are all generation tasks scored from the answer's option letter.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor

from transformers_tempo import load_video
from transformers_tempo.pipeline_tempo import vision_features_per_video
from transformers_tempo.processing_tempo import PendingVideo
from transformers_tempo.reference import apply_reference_precision, reference_settings
from transformers_tempo.video_decoding_nvdec import BACKENDS as DECODE_BACKENDS

# The released evaluation settings (TEMPO: greedy, 16 new tokens, 2 fps, 8..1024 frames, budget 8K).
RELEASED_SETTINGS = {
    "fps": 2.0,
    "min_frames": 8,
    "max_frames": 1024,
    "visual_token_budget": 8192,
    "max_new_tokens": 16,
}
# The released adapter's argument names, accepted so its command lines work unchanged.
RELEASED_ARG_NAMES = {"video_fps": "fps", "min_frames_num": "min_frames", "max_frames_num": "max_frames"}
PIXEL_KEYS = ("pixel_values_videos", "pixel_values")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


@dataclass(frozen=True)
class Visual:
    """The one visual input of a question: a video file (with optional clip bounds), an image, or none."""

    kind: str  # "video", "image" or "text"
    source: Any = None  # path of a video; PIL image
    clip: tuple[float | None, float | None] | None = None

    @property
    def key(self):
        """Questions with equal keys share one decoded video."""
        if self.kind == "video":
            return ("video", os.path.realpath(self.source), self.clip)
        return (self.kind, id(self.source))


def parse_visuals(visuals) -> Visual:
    """The `Visual` of what a task's `doc_to_visual` returned; ValueError names what is not supported."""
    if visuals is None or (isinstance(visuals, (list, tuple)) and len(visuals) == 0):
        return Visual("text")
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    if len(items) > 1:
        raise ValueError(f"got {len(items)} visuals; Tempo answers about one video or one image per question")
    item = items[0]
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if path.lower().endswith(IMAGE_EXTENSIONS):
            from PIL import Image

            with Image.open(path) as image:
                return Visual("image", image.convert("RGB"))
        return Visual("video", path)
    if isinstance(item, dict):
        path = item.get("path") or item.get("url") or item.get("video")
        if isinstance(path, str) and path.startswith("file://"):
            path = path[len("file://") :]
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"a visual dict needs a video path under 'path', 'url' or 'video'; got keys {sorted(item)}")
        if item.get("type", "video") == "image":
            return parse_visuals([path])
        start = item.get("video_start", item.get("start_time"))
        end = item.get("video_end", item.get("end_time"))
        if item.get("bound") is not None:
            start, end = item["bound"]
        clip = None if start is None and end is None else (start, end)
        return Visual("video", os.fspath(path), clip)
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        return Visual("image", item.convert("RGB"))
    raise ValueError(f"unsupported visual of type {type(item).__name__}; Tempo takes a video path or a PIL image")


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model arg {name} must be true or false, got {value!r}")


def _positive(value, name: str, kind=int):
    """A positive int (or float) model arg; lmms-eval hands numbers over already parsed."""
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            pass
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
    if not ok:
        raise ValueError(f"model arg {name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


class Tempo(lmms):
    """Tempo for lmms-eval; every model arg defaults to the released evaluation setting.

    Model args (``--model_args key=value,...``):
        pretrained: folder or Hub id of converted Tempo weights (required).
        dtype: bfloat16 (default, as released), float16, float32 or auto.
        device_map: spread one model over several GPUs (e.g. auto; one process only). Default:
            the whole model on this process's device (cuda:N under accelerate launch).
        attn_implementation: e.g. sdpa, flash_attention_2 (default: transformers' choice).
        visual_token_budget: ATA budget per video (8192; the 4K setting is 4096).
        min_tokens_per_segment: ATA minimum per segment (default: the checkpoint's, 4).
        fps, min_frames, max_frames: frame sampling (2, 8, 1024); the released names
            video_fps, min_frames_num, max_frames_num are accepted too.
        max_new_tokens: answer length when the task sets none (16); a task's own
            max_new_tokens (LongVideoBench: 32) or --gen_kwargs wins.
        batch_size: questions per model call (1, as released); on the command line it is
            lmms-eval's own --batch_size (the CLI passes it; giving it in --model_args too is an error).
        compile: compile the compressor and decode with a static cache (GPU; pays off over
            long runs).
        decode_backend: video decoder: auto (PyAV, the faster for sampled long files), pyav or
            nvdec (`load_video`'s backend); reference=true decodes with PyAV.
        reference: reproduce the released bfloat16 function (rotary buffers rounded as the
            released scripts do, and the exact PIL resize where this version has it).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "bfloat16",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        visual_token_budget: int = RELEASED_SETTINGS["visual_token_budget"],
        min_tokens_per_segment: int | None = None,
        fps: float = RELEASED_SETTINGS["fps"],
        min_frames: int = RELEASED_SETTINGS["min_frames"],
        max_frames: int = RELEASED_SETTINGS["max_frames"],
        max_new_tokens: int = RELEASED_SETTINGS["max_new_tokens"],
        batch_size: int | str = 1,
        compile: bool = False,
        decode_backend: str = "auto",
        reference: bool = False,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; unused
        **released_names,
    ) -> None:
        super().__init__()
        sampling = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
        for old_name, name in RELEASED_ARG_NAMES.items():
            if old_name in released_names:
                sampling[name] = released_names.pop(old_name)
        fps, min_frames, max_frames = sampling["fps"], sampling["min_frames"], sampling["max_frames"]
        if released_names:
            raise ValueError(f"tempo: unknown model arg(s) {', '.join(sorted(released_names))}")
        if not pretrained:
            raise ValueError("tempo: model arg pretrained=<folder or Hub id of converted Tempo weights> is required")
        if str(dtype) not in DTYPES:
            raise ValueError(f"model arg dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.fps = _positive(fps, "fps", float)
        self.min_frames = _positive(min_frames, "min_frames")
        self.max_frames = _positive(max_frames, "max_frames")
        self.visual_token_budget = _positive(visual_token_budget, "visual_token_budget")
        self.min_tokens_per_segment = None if min_tokens_per_segment is None else _positive(
            min_tokens_per_segment, "min_tokens_per_segment"
        )
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")
        self.batch_size_per_process = _positive(batch_size, "batch_size")
        reference = _flag(reference, "reference")
        if reference and str(dtype) != "bfloat16":
            raise ValueError("model arg reference=true reproduces the released bfloat16 run: leave dtype at bfloat16")
        self.load_options = self._decode_options(str(decode_backend), reference)

        on_cpu = (device is not None and str(device).startswith("cpu")) or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=on_cpu)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if device_map is not None and self._world_size > 1:
            raise ValueError("model arg device_map spreads one model over several GPUs: use it in one process, not under accelerate launch")
        load = {"dtype": DTYPES[str(dtype)]}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        if device_map is not None:
            load["device_map"] = device_map
        elif self._world_size > 1 or device is None:
            load["device_map"] = str(self.accelerator.device)
        else:
            load["device_map"] = str(device)
        self._model = AutoModel.from_pretrained(pretrained, **load).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self._device = self._model.device
        if reference:  # everything of `reference_settings()` that the model and processor hold
            if _flag(compile, "compile"):
                raise ValueError("model arg reference=true computes the released (eager) function: leave out compile")
            settings = reference_settings()
            apply_reference_precision(self._model)
            self._model.config.max_context_length = settings["max_context_length"]
            self.processor.video_processor.resize_backend = settings["processor"]["resize_backend"]
        if _flag(compile, "compile"):
            self._model.enable_compiled_inference()
        if self._world_size > 1 and self.accelerator.is_local_main_process:
            eval_logger.info(f"tempo: {self._world_size} processes, data parallel (one model per process)")

    # ------------------------------------------------------------------ lmms-eval's properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_process

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "tempo answers generation tasks only (output_type: generate_until); the published video "
            "benchmarks (lvbench, videomme, mlvu_dev, longvideobench_val_v) are all of that kind. For a "
            "multiple-choice task scored by loglikelihood, use its generate_until variant, which scores the "
            "option letter in the answer"
        )

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError(
            "tempo answers single-turn questions (the released prompt has one user turn); use a generate_until task"
        )

    def generate_until(self, requests: list[Instance]) -> list[str]:
        entries = [self._entry(i, request) for i, request in enumerate(requests)]
        answers = [""] * len(entries)
        ordered = _grouped_by_video([e for e in entries if e.error is None])
        for entry in entries:
            if entry.error is not None:
                eval_logger.error(f"tempo: {entry.where}: {entry.error}; empty answer")
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        bar.update(len(entries) - len(ordered))
        frames = _VideoFrames(self._load, ordered)
        try:
            for batch in _batches(ordered, self.batch_size_per_process):
                loaded = []
                for entry in batch:
                    try:
                        loaded.append((entry, frames.get(entry.visual)))
                    except (ValueError, OSError) as err:
                        message = str(err)  # a VideoLoadError names the file and the problem
                        if str(entry.visual.source) not in message:
                            message = f"could not read the video {entry.visual.source}: {message}"
                        eval_logger.error(f"tempo: {entry.where}: {message}; empty answer")
                for entry, text in self._answer_batch(loaded):
                    answers[entry.index] = text
                    self.cache_hook.add_partial("generate_until", (entry.context, entry.gen_kwargs), text)
                frames.done(batch)
                bar.update(len(batch))
        finally:
            frames.close()
            bar.close()
        return answers

    # ------------------------------------------------------------------ helpers
    def _entry(self, index: int, request: Instance) -> _Entry:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        where = f"doc {doc_id} of task {task}"
        gen_kwargs = dict(gen_kwargs or {})
        try:
            visual = parse_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        except SystemExit as err:  # some tasks' doc_to_visual exit on a missing video (mlvu, videomme)
            return _Entry(index, context, gen_kwargs, None, where, f"the task could not find its video ({err})")
        except Exception as err:  # noqa: BLE001 - any failure of the task's code is this doc's error
            return _Entry(index, context, gen_kwargs, None, where, f"the task could not give its visuals ({type(err).__name__}: {err})")
        return _Entry(index, context, gen_kwargs, visual, where)

    @staticmethod
    def _decode_options(backend: str, reference: bool = False) -> dict:
        """`load_video`'s backend option: auto, pyav or nvdec; reference=true decodes with PyAV."""
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"model arg decode_backend must be one of {', '.join(DECODE_BACKENDS)}, got {backend!r}")
        if reference and backend == "nvdec":
            raise ValueError("model arg reference=true reproduces the released pixels (PyAV): leave out decode_backend=nvdec")
        return {"backend": "pyav" if reference else backend}

    def _load(self, visual: Visual):
        """Decode and sample one video (runs on the decoding thread)."""
        video_processor = self.processor.video_processor
        options = {k: v for k, v in self.load_options.items() if v is not None}
        return load_video(
            visual.source,
            fps=self.fps,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
            clip=visual.clip,
            max_longer_edge=getattr(video_processor, "longest_edge", None),  # 1024 4K frames need not be held
            resize_backend=video_processor.resize_backend,  # the processor's kernel: exact mode stays exact
            pin_memory=self.device.type == "cuda",
            **options,
        )

    def _answer_batch(self, loaded: list) -> list[tuple]:
        """[(entry, answer)] for the (entry, frames) pairs; a refused batch is retried one by one."""
        if not loaded:
            return []
        try:
            texts = self._generate(loaded)
        except ValueError as err:
            if len(loaded) == 1:
                entry = loaded[0][0]
                eval_logger.error(f"tempo: {entry.where} ({_name(entry.visual)}): {err}; empty answer")
                return [(entry, "")]
            return [pair for one in loaded for pair in self._answer_batch([one])]
        return [(entry, text) for (entry, _), text in zip(loaded, texts)]

    def _generate(self, loaded: list) -> list[str]:
        entries = [entry for entry, _ in loaded]
        kind = entries[0].visual.kind
        on_gpu = self.device.type == "cuda"
        # On a GPU: resize and patchify there, keep the patches in pinned host memory (the model
        # uploads them a chunk at a time), as the video-question-answering pipeline does.
        pixel_options = {"device": self.device, "pixel_device": "cpu", "pixel_dtype": self.model.dtype} if on_gpu else {}
        keys = [entry.visual.key for entry in entries]
        # Requests come grouped by video: keep only the features of the videos now being asked about.
        self._vision_memo = {key: f for key, f in getattr(self, "_vision_memo", {}).items() if key in keys}
        videos = [frames for _, frames in loaded]
        if kind == "video" and all(key in self._vision_memo for key in keys):
            videos = [PendingVideo.layout_of(video) for video in videos]  # encoded already: no pixels needed
        inputs = self.processor(
            text=[entry.context for entry in entries],
            videos=videos if kind == "video" else None,
            images=[entry.visual.source for entry in entries] if kind == "image" else None,
            return_tensors="pt",
            **pixel_options,
        )
        inputs = {
            k: v if k in PIXEL_KEYS or not isinstance(v, torch.Tensor) else v.to(self.device)
            for k, v in inputs.items()
        }
        ata = {"visual_token_budget": self.visual_token_budget}
        if self.min_tokens_per_segment is not None:
            ata["min_tokens_per_segment"] = self.min_tokens_per_segment
        generate_kwargs, until = self._generation_options(entries[0].gen_kwargs)
        with torch.inference_mode():
            if kind == "video":  # the vision tower runs once per video, whatever the number of questions
                ata["video_features"] = vision_features_per_video(self.model, inputs, keys, self._vision_memo)
            prepared = self.model.prepare_generation_inputs(**inputs, **ata)
            new_tokens = self.model.generate(decoder_inputs=prepared, **generate_kwargs)  # only the new tokens
        return [_cut_at(text, until).strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if temperature > 0 or gen_kwargs.get("do_sample"):
            options.update(do_sample=True, temperature=temperature or 1.0)
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        else:
            options["do_sample"] = False  # greedy, as released
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            options["num_beams"] = int(gen_kwargs["num_beams"])
        until = gen_kwargs.get("until") or []
        return options, [until] if isinstance(until, str) else list(until)


@dataclass
class _Entry:
    index: int
    context: str
    gen_kwargs: dict
    visual: Visual | None
    where: str
    error: str | None = None

    @property
    def batch_key(self):
        """Questions answered in one model call share the kind of visual and the generation settings."""
        return (self.visual.kind, repr(sorted(self.gen_kwargs.items())))


def _grouped_by_video(entries: list[_Entry]) -> list[_Entry]:
    """The entries with the questions about one video next to each other (videos in order of first
    appearance, questions in request order); images and text keep their places among the groups."""
    groups: dict = {}
    for entry in entries:
        groups.setdefault(entry.visual.key, []).append(entry)
    return [entry for group in groups.values() for entry in group]


def _batches(entries: list[_Entry], size: int):
    batch: list[_Entry] = []
    for entry in entries:
        if batch and (len(batch) == size or entry.batch_key != batch[0].batch_key):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


class _VideoFrames:
    """Decoded videos for the ordered entries: each video decoded once, the next one ahead on a thread.

    A video's frames are dropped when its last question has been answered, so memory holds the
    current batch's videos plus the one being decoded.
    """

    def __init__(self, load, ordered: list[_Entry]):
        self.load = load
        self.keys = list(dict.fromkeys(e.visual.key for e in ordered if e.visual.kind == "video"))
        self.visual_of = {e.visual.key: e.visual for e in ordered if e.visual.kind == "video"}
        self.remaining: dict = {}
        for entry in ordered:
            self.remaining[entry.visual.key] = self.remaining.get(entry.visual.key, 0) + 1
        self.futures: dict[Any, Future] = {}
        self.position = 0  # keys[:position] have been submitted
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tempo-lmms-eval-decode")

    def _submit_through(self, key) -> None:
        while self.position < len(self.keys) and key not in self.futures:
            next_key = self.keys[self.position]
            self.futures[next_key] = self.pool.submit(self.load, self.visual_of[next_key])
            self.position += 1

    def get(self, visual: Visual):
        """The frames of a video entry (raises what loading raised); None for images and text."""
        if visual.kind != "video":
            return None
        self._submit_through(visual.key)
        if self.position < len(self.keys):  # decode the next video while this one is answered
            self._submit_through(self.keys[self.position])
        return self.futures[visual.key].result()

    def done(self, batch: list[_Entry]) -> None:
        for entry in batch:
            key = entry.visual.key
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                self.futures.pop(key, None)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _cut_at(text: str, until: list[str]) -> str:
    cuts = [text.find(stop) for stop in until if stop]
    cuts = [cut for cut in cuts if cut >= 0]
    return text[: min(cuts)] if cuts else text


def _name(visual: Visual | None) -> str:
    if visual is None or visual.kind == "text":
        return "text only"
    if visual.kind == "image":
        return "image"
    return visual.source if visual.clip is None else f"{visual.source} clip {visual.clip}"
