"""`pipeline("video-question-answering")`: video + question -> answer, with where the tokens went."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import BatchFeature, Pipeline
from transformers.utils import ModelOutput

from .generation_tempo import resolve_ata_options
from .modeling_tempo import VisionFeatures
from .processing_tempo import PendingVideo
from .streaming import compress_streaming
from .token_allocation import ATA_OPTION_NAMES
from .video_cache import default_video_cache
from .video_loading import LoadedVideo
from .video_sampling import segment_seconds

PIXEL_KEYS = ("pixel_values_videos", "pixel_values")
LOAD_OPTIONS = ("fps", "min_frames", "max_frames", "num_workers")


@dataclass
class StageTimes:
    """Wall time per stage, in seconds (CUDA-synchronised when the model is on a GPU)."""

    decode: float = 0.0
    preprocess: float = 0.0
    compress: float = 0.0
    answer: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"decode": self.decode, "preprocess": self.preprocess, "compress": self.compress, "answer": self.answer}


def _sync(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def segment_report(video: LoadedVideo, relevance, allocation, frames_per_segment: int = 8) -> dict:
    """The facts a user wants next to an answer: how the video was sampled and where the tokens went."""
    num_frames = int(video.frames.shape[0])
    num_segments = len(allocation)
    segments = []
    for i in range(num_segments):
        start, end, _ = segment_seconds(i, frames_per_segment, num_frames, video.real_fps)
        segments.append(
            {
                "index": i,
                "start": start,
                "end": end,
                "relevance": float(relevance[i]),
                "kept_tokens": int(allocation[i]),
            }
        )
    kept = int(sum(int(a) for a in allocation))
    return {
        "duration": float(video.duration),
        "sampled_frames": num_frames,
        "real_fps": float(video.real_fps),
        "segments": num_segments,
        "visual_tokens": kept,
        "tokens_per_frame": kept / num_frames if num_frames else 0.0,
        "segment_details": segments,
    }


class VideoQuestionAnsweringPipeline(Pipeline):
    """Answer questions about (long) videos with Tempo.

    ```python
    import transformers_tempo
    from transformers import pipeline

    vqa = pipeline("video-question-answering", model="path/to/tempo-6b")
    out = vqa(video="match.mp4", question="Who scores?", visual_token_budget=4096)
    out["answer"], out["visual_tokens"], out["segment_details"][0]
    ```
    Videos may be paths, bytes, file objects or frame arrays (give `video_metadata={"fps": ...}` with
    frames). Lists of videos and questions are answered in batches of `batch_size` through the model.

    `stream=True` compresses a video's segments while the file is still decoding
    (`streaming.compress_streaming`; same answer, the GPU work hidden behind decoding) when videos
    are answered one at a time. It is off by default: measured on H100 machines with an hour-long
    file, it saved 0.6-1.6 s on some and cost 1.2 s on another, and a process's first streamed
    video decoded 2-8 s slower (benchmarks/results, runs 10, 13, 14).

    `decode_backend="auto" | "pyav" | "nvdec"` picks the decoder of video files (`load_video`'s
    `backend`; "auto" by default). A processor in the exact mode (`resize_backend="pil"`) decodes
    with PyAV.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, **kwargs):
        preprocess, forward = {}, {}
        for name in ("video_metadata", *LOAD_OPTIONS):
            if name in kwargs:
                preprocess[name] = kwargs.pop(name)
        if "decode_backend" in kwargs:
            preprocess["backend"] = kwargs.pop("decode_backend")
        for name in ATA_OPTION_NAMES:
            if name in kwargs:
                forward[name] = kwargs.pop(name)
        if "progress" in kwargs:
            preprocess["progress"] = forward["progress"] = kwargs.pop("progress")
        forward["generate_kwargs"] = kwargs.pop("generate_kwargs", {}) | kwargs
        return preprocess, forward, {}

    def __call__(self, video=None, question=None, batch_size: int | None = None, stream: bool = False, **kwargs):
        """`vqa(video=..., question=...)` -> dict; lists (or a list of {"video", "question"} dicts) -> list."""
        single = isinstance(video, LoadedVideo) or not isinstance(video, (list, tuple)) or _is_frame_list(video)
        if isinstance(video, (list, tuple)) and video and isinstance(video[0], dict):
            items = [dict(v) for v in video]
            single = False
        elif single and isinstance(question, (list, tuple)):
            # several questions about one video: decoded once, its vision features computed once
            items = [{"video": video, "question": q} for q in question]
            single = False
        elif single:
            items = [{"video": video, "question": question}]
        else:
            questions = question if isinstance(question, (list, tuple)) else [question] * len(video)
            if len(questions) != len(video):
                raise ValueError(f"got {len(video)} videos but {len(questions)} questions")
            items = [{"video": v, "question": q} for v, q in zip(video, questions)]
        preprocess_params, forward_params, _ = self._sanitize_parameters(**kwargs)
        batch_size = batch_size or self._batch_size or 1
        results = []
        features_memo = {}  # vision features of this call's videos, shared by their questions
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if self._streams(chunk, stream):
                model_inputs = self.preprocess_streaming(chunk[0], offset=start, **preprocess_params)
            else:
                model_inputs = self.preprocess(chunk, offset=start, features_memo=features_memo, **preprocess_params)
            outputs = self._forward(model_inputs, **forward_params)
            results.extend(self.postprocess(outputs))
        return results[0] if single else results

    def preprocess(
        self, items, offset: int = 0, video_metadata=None, progress: bool = False, features_memo=None, **load_options
    ):
        times = StageTimes()
        t0 = time.perf_counter()
        cache = default_video_cache()
        videos, frame_keys = [], []
        for i, item in enumerate(items):
            if item.get("video") is None or isinstance(item["video"], LoadedVideo):
                videos.append(item.get("video"))
                frame_keys.append(("object", id(item["video"])) if item.get("video") is not None else None)
                continue
            options = dict(
                video_metadata=item.get("video_metadata", video_metadata),
                progress=progress,
                pin_memory=torch.device(self.device).type == "cuda",  # fast, async upload
                **self._decode_options(load_options),
            )
            try:
                videos.append(cache.load_video(item["video"], **options))
            except ValueError as err:
                raise ValueError(f"video {offset + i}: {err}") from err
            frame_keys.append(cache.frames_key(item["video"], options) or ("object", id(videos[-1])))
        times.decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_gpu = torch.device(self.device).type == "cuda"
        # On a GPU: resize and patchify there, keep the patches (in the model's dtype) in pinned host
        # memory; compress() uploads them a chunk at a time, so GPU memory does not grow with length.
        pixel_options = {"device": self.device, "pixel_device": "cpu", "pixel_dtype": self.model.dtype} if on_gpu else {}
        processing = self._processing_key(pixel_options.get("pixel_dtype") or torch.float32)
        features_memo = {} if features_memo is None else features_memo
        cached = {key: features_memo[key] for key in frame_keys if key in features_memo}
        cached.update(self._cached_features(frame_keys, processing))
        # Every video's vision features are cached: the compressor needs no pixels, only the layout.
        without_pixels = bool(cached) and all(k in cached for k, v in zip(frame_keys, videos) if v is not None)
        inputs = self.processor(
            text=[item.get("question") or "" for item in items],
            videos=[_layout_only(v) for v in videos] if without_pixels else _none_if_all_none(videos),
            return_tensors="pt",
            **pixel_options,
        )
        inputs = BatchFeature(
            {k: v if k in PIXEL_KEYS else (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        )
        times.preprocess = _sync(self.device) - t0
        return {
            "inputs": inputs, "videos": videos, "times": times,
            "frame_keys": frame_keys, "processing": processing, "cached_features": cached,
            "features_memo": features_memo,
        }

    def _decode_options(self, load_options: dict) -> dict:
        """`load_video`'s options; the exact (PIL) mode also tells the loader, which then decodes with PyAV."""
        if getattr(self.processor.video_processor, "resize_backend", "torch") == "pil":
            return {**load_options, "resize_backend": "pil"}
        return load_options

    def _processing_key(self, pixel_dtype) -> dict:
        """What besides the frames and the weights decides a video's vision features."""
        return {
            "video_processor": self.processor.video_processor.to_json_string(),
            "dtype": pixel_dtype,
            "chunk": self.model.config.compressor_batch_size,
        }

    def _cached_features(self, frame_keys, processing) -> dict:
        """The vision features the process's cache holds for these videos, by frame key."""
        cache, found = default_video_cache(), {}
        with torch.no_grad():
            for frame_key in frame_keys:
                if frame_key is None or frame_key[0] == "object" or frame_key in found:
                    continue
                features = cache.features.get(cache.features_key(frame_key, self.model, processing) or ())
                if features is not None:
                    found[frame_key] = features
        return found

    @staticmethod
    def _streams(chunk: list[dict], stream: bool) -> bool:
        """Whether to decode and compress this chunk together (see the class docstring)."""
        if not stream or len(chunk) != 1 or chunk[0].get("video") is None:
            return False
        return not isinstance(chunk[0]["video"], LoadedVideo)  # decoded already: nothing to overlap

    def preprocess_streaming(self, item, offset: int = 0, video_metadata=None, progress: bool = False, **load_options):
        """Decode one video and compress its segments as they arrive: what `preprocess` + the
        compressor in `_forward` do, overlapped. Times: `decode` is the whole decoding, `compress`
        the compression left after the last frame (the rest ran during decoding)."""
        times = StageTimes()
        t0 = time.perf_counter()
        try:
            streamed = compress_streaming(
                self.model,
                self.processor,
                item["video"],
                item.get("question") or "",
                video_metadata=item.get("video_metadata", video_metadata),
                **self._decode_options(load_options),
            )
        except ValueError as err:
            raise ValueError(f"video {offset}: {err}") from err
        times.decode = streamed.stats["decode_s"]
        times.compress = _sync(self.device) - t0 - times.decode
        return {"inputs": streamed.inputs, "videos": [streamed.video], "times": times, "compressed": streamed.compressed}

    def _forward(self, model_inputs, generate_kwargs=None, progress: bool = False, **ata_options):
        inputs, times = model_inputs["inputs"], model_inputs["times"]
        t0 = _sync(self.device)
        video_features = None
        if model_inputs.get("compressed") is None and inputs.get("video_grid_thw") is not None:
            with torch.inference_mode():
                video_features = self._video_features(inputs, model_inputs)
        vision_time = _sync(self.device) - t0
        model_keys = dict(inputs)
        # Only the tokens are needed (the relevance and allocation come from `prepared`): asking for
        # the output dict would hand back the call's static cache, and the graphed decoding loop
        # keeps its compiled, captured step for the next call only when the cache is not handed back.
        generate_kwargs = dict(generate_kwargs or {})
        if "generation_config" not in generate_kwargs and getattr(self, "generation_config", None) is not None:
            # One generation config holding the call's options: transformers deprecates passing a
            # config together with generation arguments.
            config = copy.deepcopy(self.generation_config)
            generate_kwargs = config.update(**generate_kwargs)  # returns what is not a generation option
            generate_kwargs["generation_config"] = config
        compressed = model_inputs.get("compressed")  # already done while decoding (preprocess_streaming)
        ata = resolve_ata_options(self.model, **{name: ata_options.get(name) for name in ATA_OPTION_NAMES})
        t0 = _sync(self.device)
        with torch.inference_mode():
            prepared = self.model.prepare_generation_inputs(
                **model_keys, compressed=compressed, progress=progress, video_features=video_features, **ata_options
            )
            t1 = _sync(self.device)
            output = self.model.generate(decoder_inputs=prepared, **generate_kwargs)
        t2 = _sync(self.device)
        times.compress += t1 - t0 + vision_time
        times.answer = t2 - t1
        return {"output": output, "prepared": prepared, **model_keys, "videos": model_inputs["videos"], "times": times, "ata": ata}

    def _video_features(self, inputs, model_inputs) -> VisionFeatures:
        """The vision tower's output for every video row of `inputs`: once per distinct video of the
        call, and taken from (and given to) the process's video cache for video files.

        Always per video (not over the whole batch's rows), so a video's features, and its answers,
        do not depend on what else is in the batch or whether the cache had them.
        """
        cache = default_video_cache()
        memo = model_inputs.get("features_memo", {})
        memo.update(model_inputs["cached_features"])

        def keep(frame_key, features):
            if frame_key[0] != "object":  # decoded videos handed in have no lasting identity
                key = cache.features_key(frame_key, self.model, model_inputs["processing"])
                if key is not None:
                    cache.features.put(key, features)

        return vision_features_per_video(self.model, inputs, model_inputs["frame_keys"], memo, on_new=keep)

    def postprocess(self, model_outputs):
        output, prepared, videos = model_outputs["output"], model_outputs["prepared"], model_outputs["videos"]
        sequences = output.sequences if isinstance(output, ModelOutput) else output
        answers = self.processor.batch_decode(sequences, skip_special_tokens=True)
        results = []
        sample_index = prepared.segment_sample_index
        for b, answer in enumerate(answers):
            result = {"answer": answer.strip()}
            video = videos[b]
            if video is not None:
                rows = (sample_index == b).nonzero().flatten()
                result.update(
                    segment_report(
                        video,
                        prepared.relevance_scores[rows].tolist(),
                        prepared.token_allocation[rows].tolist(),
                        frames_per_segment=self.processor.video_processor.frames_per_segment,
                    )
                )
                result["warnings"] = list(video.warnings)
                note = budget_note(model_outputs.get("ata"), result["segments"], result["visual_tokens"])
                if note:
                    result["warnings"].append(note)
            result["timings"] = model_outputs["times"].as_dict()
            results.append(result)
        return results


def vision_features_per_video(model, inputs, video_keys, memo: dict, on_new=None) -> VisionFeatures:
    """`VisionFeatures` for every video row of the processor's `inputs`, in row order.

    `video_keys` names each sample's video (None for a sample without one); samples with equal keys
    share one encoding. `memo` (key -> features) is read and filled, so a caller can keep it across
    calls; `on_new(key, features)` is told of each new encoding. Each video is encoded on its own,
    with the chunking of a single-question call, so its features do not depend on the batch.
    """
    counts = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()
    grid, pixels = inputs["video_grid_thw"], inputs.get("pixel_values_videos")
    offsets = [0] + grid.prod(-1).cumsum(0).tolist()
    features, row = VisionFeatures(), 0
    for count, key in zip(counts, video_keys):
        if not count:
            continue
        found = memo.get(key)
        if found is None:
            if pixels is None:
                raise ValueError("a video's vision features are neither known nor computable: its pixels are missing")
            found = model.encode_video_features(pixels[offsets[row] : offsets[row + count]], grid[row : row + count])
            memo[key] = found
            if on_new is not None:
                on_new(key, found)
        features = features + found
        row += count
    return features


def _layout_only(video):
    """A decoded video as the processor's `PendingVideo`: its prompts and grid, without pixels."""
    return None if video is None else PendingVideo.layout_of(video)


def _none_if_all_none(videos):
    return videos if any(v is not None for v in videos) else None


def budget_note(ata: dict | None, segments: int, kept: int) -> str | None:
    """The warning for a visual token budget too small for the video's segments, or None.

    ATA gives every segment at least `min_tokens_per_segment` tokens; when the budget cannot pay for
    that, the minimum is lowered to budget // segments, and to one token when the budget is below
    the number of segments, so that every segment is still seen: then more tokens than the budget
    are kept (one per segment).
    """
    if not ata or not ata["use_ata"] or not segments:
        return None
    budget, minimum = ata["visual_token_budget"], ata["min_tokens_per_segment"]
    if segments * minimum <= budget:
        return None
    if kept > budget:
        return (
            f"visual token budget {budget} is below the video's {segments} segments: every segment keeps at "
            f"least one token, so {kept} visual tokens were used, more than the budget"
        )
    return (
        f"visual token budget {budget} is below {segments} segments x {minimum} tokens: "
        f"the minimum per segment was lowered to {max(1, budget // segments)}"
    )


def _is_frame_list(video) -> bool:
    """A list of PIL images / arrays is one video, not a batch of videos."""
    if not video:
        return False
    first = video[0]
    is_pil_image = hasattr(first, "getpixel")
    is_frame_array = getattr(first, "ndim", None) == 3
    return is_pil_image or is_frame_array


def register_pipeline():
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(
        "video-question-answering",
        pipeline_class=VideoQuestionAnsweringPipeline,
        pt_model=AutoModel,
        type="multimodal",
    )
