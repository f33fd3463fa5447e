"""TempoProcessor: every piece of text Tempo reads, built the way the released code builds it.

For each sample (a question, optionally one video or one image, optionally answers) the
processor makes two kinds of token sequences (docs/released-model.md, "Compressor prompt" and
"Decoder prompt"):

* the decoder prompt, one row per sample, ChatML::

      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
      VIDEO\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

  where VIDEO is, per segment i, the tokens of ``<{t:.1f} seconds>`` (t = segment centre,
  ``(8 i + 4) / real_fps``) and ONE ``<|video_pad|>`` that the model widens to the segment's
  kept features (an image is one ``<|image_pad|>``, no timestamp). As in the released
  `tokenizer_image_token` / `compute_segment_timestamp`, the text before the video, the text
  after it and every timestamp are tokenised separately;

* the compressor prompts, one row per video segment (or image), Qwen3-VL's chat template with
  Tempo's system prompt, the segment expanded per temporal patch as Qwen3-VL's processor does
  (``<{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>`` with absolute times),
  then ``\\nQuery:\\n{question}`` and the generation prompt. The 128 memory tokens are not
  part of the rows: the model appends them after each row's own prompt.

The text of both prompts comes from two Jinja templates, ``chat_template`` (the decoder's
ChatML) and ``compressor_chat_template`` (Qwen3-VL's), both saved with the processor.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .token_allocation import ATA_OPTION_NAMES
from .video_cache import default_video_cache
from .video_sampling import patch_times, segment_seconds
from .video_loading import LoadedVideo
from .video_processing_tempo import RESIZE_BACKENDS, TempoVideoProcessor

__all__ = [
    "COMPRESSOR_CHAT_TEMPLATE",
    "COMPRESSOR_SYSTEM_PROMPT",
    "DECODER_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "EMPTY_QUERY",
    "PendingVideo",
    "TempoProcessor",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PendingVideo:
    """A video whose sampled frames are still decoding: what its prompts need is already known.

    Given as a video, the processor builds every token (decoder prompt, timestamps, compressor
    rows) and `video_grid_thw`, but no `pixel_values_videos`; `streaming.generate_streaming`
    makes those segment by segment as the frames arrive.

    Attributes:
        num_frames: number of sampled frames.
        real_fps: their frame rate (timestamps are index / real_fps).
        height, width: size of the decoded frames.
    """

    num_frames: int
    real_fps: float
    height: int
    width: int

    @classmethod
    def layout_of(cls, video: LoadedVideo) -> PendingVideo:
        """A decoded video's layout only: its prompts and grid, without pixels (for a compressor
        that is given the video's vision features, `generate(video_features=...)`)."""
        height, width = video.frames.shape[1:3]
        return cls(num_frames=video.num_frames, real_fps=video.real_fps, height=int(height), width=int(width))

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
COMPRESSOR_SYSTEM_PROMPT = (
    "You are a query-conditioned visual compressor. "
    "Store in the provided memory tokens the minimal visual information needed to answer the Query. "
    "Ignore irrelevant details. "
    "Now, before compressing, answer exactly 'Yes' or 'No': is this segment relevant to the Query?"
)
EMPTY_QUERY = "Describe this content."  # the compressor's query when the question is empty
COMPRESSOR_QUERY_FORMAT = "\nQuery:\n{query}"

VIDEO_TOKEN = "<|video_pad|>"
IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# The decoder's ChatML (the released `qwen` conversation template). A visual item renders as
# its placeholder token followed by "\n" (the released prompt is "<image>\n{question}"); the
# processor replaces each placeholder by the timestamps + one placeholder per segment.
DECODER_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}"
    "{{- message.content }}"
    "{%- else %}"
    "{%- for item in message.content %}"
    "{%- if item.type == 'video' or 'video' in item %}"
    "{{- '<|video_pad|>\\n' }}"
    "{%- elif item.type == 'image' or 'image' in item or 'image_url' in item %}"
    "{{- '<|image_pad|>\\n' }}"
    "{%- elif 'text' in item %}"
    "{{- item.text }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen3-VL-2B-Instruct's chat template, restated for system / user / assistant messages with
# text, image and video items (its tool-calling branches are left out: Tempo has no tools).
# Unlike Qwen2-VL's, it adds no default system message.
COMPRESSOR_CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].content is string %}
        {{- messages[0].content }}
    {%- else %}
        {%- for content in messages[0].content %}
            {%- if 'text' in content %}
                {{- content.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}
                    {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LABEL_SCOPES = ("answer", "reference")


def format_timestamp(seconds: float) -> str:
    """`<{t:.1f} seconds>`, Python's formatting (round half to even on the binary value)."""
    return f"<{seconds:.1f} seconds>"


# The patch-time rule's old name here (it lives with the other segment times in video_sampling).
qwen3vl_patch_times = patch_times


class TempoProcessor(ProcessorMixin):
    r"""Builds Tempo's inputs: the decoder prompt, one compressor prompt per video segment or
    image, the pixels, and labels when answers are given.

    Args:
        video_processor (`TempoVideoProcessor`): frames -> Qwen3-VL patches.
        tokenizer: the Qwen tokenizer (decoder and compressor share Qwen's vocabulary).
        chat_template (`str`, *optional*): the decoder's ChatML Jinja template.
        compressor_chat_template (`str`, *optional*): the compressor's (Qwen3-VL) Jinja template.

    Call it with a question and a video (or image), or a batch of them::

        inputs = processor(text="What happens after the goal?", videos="match.mp4")
        inputs = processor(text=["q1", "q2"], videos=["a.mp4", None])   # video + text-only
        inputs = processor(text="q", videos=frames, video_metadata={"fps": 2.0}, answers="a")

    or with chat messages through `apply_chat_template`. The result is a `BatchFeature` with
    ``input_ids``, ``attention_mask``, ``timestamp_mask`` (1 on timestamp tokens),
    ``compressor_input_ids``, ``compressor_attention_mask`` (right padded, one row per segment
    or image, in the order of their placeholders in ``input_ids``), ``segment_times`` (start
    and end second of each row; NaN for images), ``pixel_values_videos``/``video_grid_thw``
    and ``pixel_values``/``image_grid_thw`` when present, ``labels`` when answers are given,
    (allocation options such as `visual_token_budget` go to `model.generate`, not here).
    """

    def __init__(
        self, video_processor=None, tokenizer=None, chat_template=None, compressor_chat_template=None, **kwargs
    ):
        self.compressor_chat_template = compressor_chat_template or COMPRESSOR_CHAT_TEMPLATE
        super().__init__(video_processor, tokenizer, chat_template=chat_template or DECODER_CHAT_TEMPLATE, **kwargs)

    # -- transformers plumbing -----------------------------------------------------------

    def check_argument_for_proper_class(self, argument_name, argument):
        # Any transformers video processor would pass the generic check; Tempo's processor needs
        # its own (it calls process_video / segment_grids).
        if argument_name == "video_processor":
            if not isinstance(argument, TempoVideoProcessor):
                raise TypeError(f"video_processor must be a TempoVideoProcessor, got {type(argument).__name__}")
            return TempoVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Same files as transformers' default (the nested "video_processor" entry of
        # processor_config.json, else video_preprocessor_config.json), without transformers'
        # top-level AutoVideoProcessor, which refuses to run without torchvision.
        video_processor = TempoVideoProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [video_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "timestamp_mask",
            "labels",
            "compressor_input_ids",
            "compressor_attention_mask",
            "pixel_values_videos",
            "video_grid_thw",
            "pixel_values",
            "image_grid_thw",
        ]

    # -- entry points --------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str] | None = None,
        videos: Any = None,
        images: Any = None,
        answers: str | list[str | None] | None = None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        video_metadata: Any = None,
        fps: float | None = None,
        min_frames: int | None = None,
        max_frames: int | None = None,
        label_scope: str = "answer",
        device: str | torch.device | None = None,
        pixel_dtype: torch.dtype | None = None,
        pixel_device: str | torch.device | None = None,
        resize_backend: str | None = None,
        decode_backend: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Inputs for one sample or a batch.

        Args:
            text: the question (str), or one per sample (list). `None` means no question.
            videos: one video, or one per sample (`None` for samples without). A video is
                anything `load_video` accepts (path, bytes, file object, (T, H, W, 3) uint8
                frames, list of PIL images) or a `LoadedVideo`.
            images: one image (PIL or (H, W, 3) uint8 array), or one per sample.
            answers: the assistant's answer(s), for training: adds `labels`.
            padding_side: side of the decoder padding, "left" (default, for generation) or
                "right". Compressor rows are always right padded.
            video_metadata: for frames given directly, a dict with their `fps` (one for all
                samples or one per sample).
            fps, min_frames, max_frames: sampling of video files (default: the video
                processor's, 2 fps, 8..1024 frames).
            label_scope: "answer" (default) supervises each answer, its `<|im_end|>` and the
                newline after it; "reference" supervises what the released training code
                (`preprocess_qwen`) does: whole assistant turns plus every `<|im_start|>`,
                `<|im_end|>` and newline token of the text.
            device: where to run the video preprocessing (e.g. "cuda").
            pixel_dtype: dtype of the pixel values (default float32; the model's dtype is the same
                function with half the memory).
            pixel_device: where the pixel values end up (default: `device`). `device="cuda",
                pixel_device="cpu"`: made on the GPU, kept in pinned host memory; `compress` moves
                them a chunk at a time, so GPU memory stays flat in video length.
            resize_backend: "torch" (fast) or "pil" (the released pixels bit for bit); default:
                the video processor's `resize_backend`.
            decode_backend: the decoder of video files, `load_video`'s `backend`: "auto" (default),
                "pyav" or "nvdec" (the GPU's decoder; see `load_video`).
        """
        _refuse_unknown(kwargs, "TempoProcessor")
        samples = self._samples_from_call(text, videos, images, answers, video_metadata)
        conversations = []
        for sample in samples:  # the released single-turn prompt, as chat messages
            content = [{"type": kind} for kind in ("video", "image") if sample[kind] is not None]
            content.append({"type": "text", "text": sample["text"]})
            conversation = [{"role": "user", "content": content}]
            if sample["answer"] is not None:
                conversation.append({"role": "assistant", "content": sample["answer"]})
            conversations.append(conversation)
        with_labels = answers is not None and any(s["answer"] is not None for s in samples)
        # A sample with an answer is a finished conversation; one without gets the generation prompt.
        add_generation_prompt = [s["answer"] is None for s in samples]
        return self._encode(
            conversations,
            samples,
            add_generation_prompt=add_generation_prompt,
            with_labels=with_labels,
            label_scope=label_scope,
            return_tensors=return_tensors,
            padding_side=padding_side,
            load_options={"fps": fps, "min_frames": min_frames, "max_frames": max_frames, "backend": decode_backend},
            device=device,
            pixel_options={"dtype": pixel_dtype, "output_device": pixel_device, "resize_backend": resize_backend},
        )

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        return_labels: bool | None = None,
        label_scope: str = "answer",
        fps: float | None = None,
        min_frames: int | None = None,
        max_frames: int | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ):
        """Chat messages -> the same inputs as `__call__` (or the decoder prompt text).

        Messages follow transformers' format: ``{"role": "user", "content": [{"type": "video",
        "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}]}``; a video item may
        carry ``"video_metadata"`` (e.g. ``{"fps": 2.0}`` for frames). A conversation holds at
        most one video or image, in a user turn; the compressor's query is the text of that
        turn. Conversations may be multi-turn and start with a system message.

        With `tokenize=False` returns the decoder prompt text, each video/image shown as one
        placeholder token. Labels are returned when `return_labels` is true, by default when
        the conversation ends with an assistant turn and `add_generation_prompt` is false;
        they cover every assistant turn (see `__call__` for `label_scope`).
        """
        _refuse_unknown(kwargs, "apply_chat_template")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [list(c) for c in conversation] if batched else [list(conversation)]
        template = chat_template or self.chat_template
        if not tokenize:
            texts = [self._render(template, self._template_view(c), add_generation_prompt) for c in conversations]
            return texts if batched else texts[0]

        sources = [self._sample_from_conversation(c, i) for i, c in enumerate(conversations)]
        if return_labels is None:
            return_labels = not add_generation_prompt and all(
                c and c[-1].get("role") == "assistant" for c in conversations
            )
        out = self._encode(
            conversations,
            sources,
            add_generation_prompt=[add_generation_prompt] * len(conversations),
            with_labels=bool(return_labels),
            label_scope=label_scope,
            return_tensors=return_tensors,
            padding_side=padding_side,
            load_options={"fps": fps, "min_frames": min_frames, "max_frames": max_frames},
            device=device,
            chat_template=template,
        )
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Decode generated token ids to text, one string per row, as transformers' VLM processors do.

        `model.generate(input_ids=...)` returns the prompt followed by the answer; pass
        ``out[:, inputs["input_ids"].shape[1]:]`` to get only the answers.
        """
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- inputs -> samples ---------------------------------------------------------------

    def _samples_from_call(self, text, videos, images, answers, video_metadata) -> list[dict]:
        """One dict per sample from the call forms transformers processors accept.

        `text` is one question (str) or one per sample (list). `videos` / `images` are one visual
        input, a flat list with one per sample (None for none), or nested lists holding each
        sample's visuals (at most one per sample). A str `text` with a one-element list is one
        sample with that video, as in every transformers processor.
        """
        if text is None and videos is None and images is None:
            raise ValueError("TempoProcessor needs a text, a video or an image")
        if text is not None and not isinstance(text, (str, list, tuple)):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        per_kind = {
            "videos": _per_sample(videos, _is_single_video, "videos"),
            "images": _per_sample(images, _is_single_image, "images"),
            "answers": _per_sample(answers, lambda a: isinstance(a, str), "answers"),
        }
        given = [("texts", texts)] + [(name, values) for name, values in per_kind.items()]
        first_name, first = next((n, v) for n, v in given if v is not None)
        count = len(first)
        for name, values in given:
            if values is not None and len(values) != count:
                raise ValueError(
                    f"got {_count(count, first_name)} but {_count(len(values), name)}; "
                    "give one per sample (None for none)"
                )
        metadata = _metadata_per_sample(video_metadata, count)
        samples = []
        for i in range(count):
            sample_text = (texts[i] if texts is not None else None) or ""
            if not isinstance(sample_text, str):
                raise ValueError(f"sample {i}: text must be a string, got {type(sample_text).__name__}")
            samples.append(
                {
                    "text": sample_text,
                    "video": per_kind["videos"][i] if per_kind["videos"] is not None else None,
                    "image": per_kind["images"][i] if per_kind["images"] is not None else None,
                    "answer": per_kind["answers"][i] if per_kind["answers"] is not None else None,
                    "video_metadata": metadata[i],
                    "index": i,
                }
            )
        return samples

    def _sample_from_conversation(self, conversation: list[dict], index: int) -> dict:
        """The visual input of a conversation and the compressor's query (its turn's text)."""
        visuals = []
        for m, message in enumerate(conversation):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"conversation {index}: message {m} must be a dict with a 'role'")
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"conversation {index}: message {m} has role {message['role']!r}")
            if message["role"] == "system" and m != 0:
                raise ValueError(f"conversation {index}: the system message must come first")
            content = message.get("content")
            if isinstance(content, str) or content is None:
                continue
            for item in content:
                kind = _item_kind(item)
                if kind in ("video", "image"):
                    if message["role"] != "user":
                        raise ValueError(f"conversation {index}: a {kind} in a {message['role']} message")
                    visuals.append((kind, item, content))
        if len(visuals) > 1:
            raise ValueError(f"conversation {index}: holds {len(visuals)} videos/images; Tempo takes at most one")
        sample = {"text": "", "video": None, "image": None, "answer": None, "video_metadata": None, "index": index}
        if visuals:
            kind, item, content = visuals[0]
            payload = item.get(kind, item.get("path", item.get("url")))
            if payload is None:
                raise ValueError(f"conversation {index}: the {kind} item has no '{kind}' or 'path'")
            sample[kind] = payload
            sample["video_metadata"] = item.get("video_metadata")
            sample["text"] = "".join(i.get("text", "") for i in content if _item_kind(i) == "text")
        return sample

    # -- the core ------------------------------------------------------------------------

    def _encode(
        self,
        conversations,
        sources,
        add_generation_prompt,
        with_labels,
        label_scope,
        return_tensors,
        padding_side,
        load_options,
        device,
        chat_template=None,
        pixel_options=None,
    ) -> BatchFeature:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"TempoProcessor returns PyTorch tensors only; got return_tensors={return_tensors!r}")
        if label_scope not in LABEL_SCOPES:
            raise ValueError(f"label_scope must be one of {LABEL_SCOPES}, got {label_scope!r}")
        padding_side = padding_side or "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        backend = (pixel_options or {}).get("resize_backend")
        if backend is not None and backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {backend!r}")

        # 1. Pixels first (loading may fail; then nothing else has been done). A video or image given
        # to several samples (several questions about one video) is loaded and processed once.
        visuals, done = [], {}
        for sample in sources:
            identity = _visual_identity(sample)
            if identity is None or identity not in done:
                visual = self._prepare_visual(sample, load_options, device, pixel_options or {})
                if identity is not None:
                    done[identity] = visual
            visuals.append(done.get(identity, visual) if identity is not None else visual)

        # 2. Decoder rows and compressor rows, sample by sample, in placeholder order.
        template = chat_template or self.chat_template
        rows, compressor_rows, segment_times = [], [], []
        for conversation, sample, visual, generation in zip(conversations, sources, visuals, add_generation_prompt):
            view = self._template_view(conversation)
            rendered = self._render(template, view, generation)
            rows.append(self._decoder_row(rendered, visual, label_scope, sample["index"]))
            if visual is not None:
                rendered_compressor = self._render(
                    self.compressor_chat_template, self._compressor_view(visual["kind"], sample["text"]), True
                )
                compressor_rows.extend(self._compressor_rows(rendered_compressor, visual))
                segment_times.extend(visual["segment_times"])

        # 3. Padding and tensors.
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token")
        data = {}
        data["input_ids"], data["attention_mask"] = _pad([r["ids"] for r in rows], pad_id, padding_side)
        data["timestamp_mask"], _ = _pad([r["timestamp"] for r in rows], 0, padding_side)
        if with_labels:
            data["labels"], _ = _pad([r["labels"] for r in rows], IGNORE_INDEX, padding_side)
        if compressor_rows:
            encoded = self._encode_rows(compressor_rows)
            data["compressor_input_ids"], data["compressor_attention_mask"] = _pad(encoded, pad_id, "right")
            data["segment_times"] = torch.tensor(segment_times, dtype=torch.float32)
        for kind, pixel_key, grid_key in (
            ("video", "pixel_values_videos", "video_grid_thw"),
            ("image", "pixel_values", "image_grid_thw"),
        ):
            chosen = [v for v in visuals if v is not None and v["kind"] == kind]
            if chosen:
                pixels = [v["pixels"] for v in chosen]
                if any(p is None for p in pixels):  # PendingVideo: its pixels come later
                    if not all(p is None for p in pixels):
                        raise ValueError("a batch cannot mix PendingVideo inputs with decoded videos")
                else:
                    data[pixel_key] = _concat_rows(pixels)
                data[grid_key] = torch.cat([v["grid"] for v in chosen], dim=0)
        return BatchFeature(data=data)

    def _prepare_visual(self, sample: dict, load_options: dict, device, pixel_options: dict) -> dict | None:
        """Load and preprocess a sample's video or image; errors name the sample."""
        index = sample["index"]
        if sample["video"] is not None and sample["image"] is not None:
            raise ValueError(f"sample {index}: got both a video and an image; Tempo takes one visual input per sample")
        vp = self.video_processor
        if sample["video"] is not None:
            video = sample["video"]
            if isinstance(video, PendingVideo):
                grid = vp.segment_grids(video.num_frames, video.height, video.width)
                out = {"pixel_values_videos": None, "video_grid_thw": grid}
                return self._video_layout(out, video.real_fps, video.num_frames)
            try:
                if not isinstance(video, LoadedVideo):
                    options = {"fps": vp.fps, "min_frames": vp.min_frames, "max_frames": vp.max_frames}
                    options.update({k: v for k, v in load_options.items() if v is not None})
                    if (pixel_options.get("resize_backend") or vp.resize_backend) == "pil":
                        # the exact mode: `load_video` then decodes with PyAV, whose pixels it reproduces
                        options["resize_backend"] = "pil"
                    video = default_video_cache().load_video(
                        video, video_metadata=sample["video_metadata"], **options
                    )
                out = vp.process_video(
                    video.frames,
                    video.real_fps,
                    device=device,
                    frames_per_segment=vp.frames_per_segment,
                    dtype=pixel_options.get("dtype"),
                    output_device=pixel_options.get("output_device"),
                    resize_backend=pixel_options.get("resize_backend"),
                )
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"sample {index}: could not read its video: {error}") from error
            return self._video_layout(out, video.real_fps, video.num_frames)
        if sample["image"] is not None:
            try:
                out = vp.process_image(sample["image"], device=device)
                out["pixel_values"] = out["pixel_values"].to(
                    dtype=pixel_options.get("dtype") or torch.float32, device=pixel_options.get("output_device")
                )
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"sample {index}: could not read its image: {error}") from error
            return {
                "kind": "image",
                "pixels": out["pixel_values"],
                "grid": out["image_grid_thw"].cpu().long(),
                "segment_times": [(math.nan, math.nan)],
            }
        return None

    def _video_layout(self, out: dict, real_fps: float, num_frames: int) -> dict:
        """Timestamps of a processed video: per segment the decoder's centre stamp and the
        compressor's per-temporal-patch stamps (absolute, as the released code)."""
        per_segment = self.video_processor.frames_per_segment
        grid = out["video_grid_thw"].cpu().long()
        centers, patch_stamps, spans = [], [], []
        for i, (t, _, _) in enumerate(grid.tolist()):
            start_s, end_s, centre_s = segment_seconds(i, per_segment, num_frames, real_fps)
            centers.append(format_timestamp(centre_s))
            times = patch_times(i * per_segment, t, real_fps, self.video_processor.temporal_patch_size)
            patch_stamps.append([format_timestamp(x) for x in times])
            spans.append((start_s, end_s))
        return {
            "kind": "video",
            "pixels": out["pixel_values_videos"],
            "grid": grid,
            "decoder_stamps": centers,
            "patch_stamps": patch_stamps,
            "segment_times": spans,
        }

    # -- text ----------------------------------------------------------------------------

    def _render(self, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @staticmethod
    def _template_view(conversation: list[dict]) -> list[dict]:
        """The messages as the template sees them: visual items without their (heavy) payload."""
        view = []
        for message in conversation:
            content = message.get("content")
            if content is None:
                content = ""
            if not isinstance(content, str):
                items = []
                for item in content:
                    kind = _item_kind(item)
                    items.append({"type": kind} if kind != "text" else {"type": "text", "text": item.get("text", "")})
                content = items
            view.append({"role": message["role"], "content": content})
        return view

    @staticmethod
    def _compressor_view(kind: str, query: str) -> list[dict]:
        query = query if query.strip() else EMPTY_QUERY
        return [
            {"role": "system", "content": [{"type": "text", "text": COMPRESSOR_SYSTEM_PROMPT}]},
            {
                "role": "user",
                "content": [{"type": kind}, {"type": "text", "text": COMPRESSOR_QUERY_FORMAT.format(query=query)}],
            },
        ]

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _decoder_row(self, rendered: str, visual: dict | None, label_scope: str, index: int) -> dict:
        """Tokenise the rendered decoder prompt as the released code does.

        Turns are tokenised one by one (they are separated by special tokens, so this equals
        tokenising the text between visual placeholders, as `tokenizer_image_token` does);
        inside a turn the text before and after a placeholder, and each timestamp, are
        tokenised separately.
        """
        placeholders = rendered.count(VIDEO_TOKEN) + rendered.count(IMAGE_TOKEN)
        expected = 0 if visual is None else 1
        if placeholders != expected:
            raise ValueError(
                f"sample {index}: the decoder prompt holds {placeholders} video/image placeholders for "
                f"{expected} visual input(s); a placeholder token in the text?"
            )
        ids, timestamp, labels = [], [], []
        newline_ids = self._encode_text("\n")
        structural = {self.tokenizer.convert_tokens_to_ids(IM_START), self.tokenizer.convert_tokens_to_ids(IM_END)}
        if len(newline_ids) == 1:
            structural.add(newline_ids[0])
        for turn in re.split(f"(?={re.escape(IM_START)})", rendered):
            if not turn:
                continue
            role_match = re.match(f"{re.escape(IM_START)}(\\w+)\n", turn)
            finished_assistant = bool(role_match) and role_match.group(1) == "assistant" and IM_END in turn
            for k, piece in enumerate(re.split(f"({re.escape(VIDEO_TOKEN)}|{re.escape(IMAGE_TOKEN)})", turn)):
                if k % 2 == 1:  # a visual placeholder
                    video = visual["kind"] == "video"
                    stamps = visual["decoder_stamps"] if video else [None]
                    token = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN if video else IMAGE_TOKEN)
                    for stamp in stamps:
                        stamp_ids = self._encode_text(stamp) if stamp else []
                        ids += stamp_ids + [token]
                        timestamp += [1] * len(stamp_ids) + [0]
                        labels += [IGNORE_INDEX] * (len(stamp_ids) + 1)
                    continue
                piece_ids = self._encode_text(piece)
                ids += piece_ids
                timestamp += [0] * len(piece_ids)
                labels += self._piece_labels(piece_ids, finished_assistant, label_scope, structural)
        return {"ids": ids, "timestamp": timestamp, "labels": labels}

    def _encode_rows(self, rows: list[str]) -> list[list[int]]:
        """Token ids of the compressor rows, as `tokenizer(rows)` gives them, several times faster.

        A row is mostly runs of special tokens (hundreds of `<|video_pad|>` per segment) between short
        text pieces. HF tokenizers cut the text at every added token before anything else, so each
        distinct text piece is tokenised once, all in one batch, and the ids are put together. The
        first row is checked against tokenising it whole; should a tokenizer treat its added tokens
        otherwise, every row is tokenised whole.
        """
        specials = [VIDEO_TOKEN, IMAGE_TOKEN, VISION_START, VISION_END, IM_START, IM_END]
        special_ids = {token: self.tokenizer.convert_tokens_to_ids(token) for token in specials}
        runs = re.compile("(" + "|".join(f"(?:{re.escape(token)})+" for token in specials) + ")")
        split_rows = [runs.split(row) for row in rows]
        texts = sorted({piece for pieces in split_rows for piece in pieces[::2] if piece})
        text_ids = dict(zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        encoded = []
        for pieces in split_rows:
            ids = []
            for k, piece in enumerate(pieces):
                if k % 2 == 0:
                    ids.extend(text_ids.get(piece, ()))
                    continue
                token = next(t for t in specials if piece.startswith(t))
                ids.extend([special_ids[token]] * (len(piece) // len(token)))
            encoded.append(ids)
        if encoded[0] != self.tokenizer(rows[0], add_special_tokens=False)["input_ids"]:
            return self.tokenizer(rows, add_special_tokens=False)["input_ids"]
        return encoded

    def _piece_labels(self, piece_ids, finished_assistant, label_scope, structural) -> list[int]:
        if label_scope == "reference":
            # preprocess_qwen: whole assistant turns, plus <|im_start|>, <|im_end|> and "\n" anywhere.
            if finished_assistant:
                return list(piece_ids)
            return [i if i in structural else IGNORE_INDEX for i in piece_ids]
        if not finished_assistant:
            return [IGNORE_INDEX] * len(piece_ids)
        # The answer, its <|im_end|> and the newline after it; not the "<|im_start|>assistant\n" header.
        header = self._encode_text(f"{IM_START}assistant\n")
        start = 0
        while start < min(len(header), len(piece_ids)) and header[start] == piece_ids[start]:
            start += 1
        return [IGNORE_INDEX] * start + list(piece_ids[start:])

    def _compressor_rows(self, rendered: str, visual: dict) -> list[str]:
        """One string per segment (or the image): the rendered Qwen3-VL prompt with its visual
        placeholder expanded as Qwen3-VL's processor (transformers 4.57) does."""
        merge = self.video_processor.merge_size**2
        if visual["kind"] == "image":
            t, h, w = visual["grid"][0].tolist()
            return [rendered.replace(IMAGE_TOKEN, IMAGE_TOKEN * (t * h * w // merge), 1)]
        wrapped = VISION_START + VIDEO_TOKEN + VISION_END
        rows = []
        for (_, h, w), stamps in zip(visual["grid"].tolist(), visual["patch_stamps"]):
            per_patch = VISION_START + VIDEO_TOKEN * (h * w // merge) + VISION_END
            expansion = "".join(stamp + per_patch for stamp in stamps)
            rows.append(rendered.replace(wrapped, expansion, 1))
        return rows


# ----------------------------------------------------------------------------------------
# helpers


def _concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows, without the copy for a single tensor and keeping pinned memory pinned
    (a plain cat of hundreds of MB of patches costs as much as making them)."""
    if len(tensors) == 1:
        return tensors[0]
    first = tensors[0]
    # Only a process that initialised CUDA can hold pinned memory; asking anywhere else initialises
    # CUDA, which fails in a forked DataLoader worker.
    pinned = first.device.type == "cpu" and torch.cuda.is_initialized() and all(t.is_pinned() for t in tensors)
    out = torch.empty(
        (sum(t.shape[0] for t in tensors), *first.shape[1:]), dtype=first.dtype, device=first.device, pin_memory=pinned
    )
    return torch.cat(tensors, dim=0, out=out)


def _item_kind(item: Any) -> str:
    if not isinstance(item, dict):
        raise ValueError(f"message content items must be dicts, got {type(item).__name__}")
    kind = item.get("type")
    if kind in ("video", "image", "text"):
        return kind
    for key in ("video", "image", "text"):
        if key in item:
            return key
    if "image_url" in item:
        return "image"
    raise ValueError(f"unknown content item {sorted(item)}: expected a 'video', 'image' or 'text' item")


def _refuse_unknown(kwargs: dict, where: str) -> None:
    """Unknown keyword arguments are an error; allocation options get told where they belong (a
    processor turns inputs into tensors; generation options go to the model, as in transformers)."""
    allocation = sorted(name for name in kwargs if name in ATA_OPTION_NAMES)
    if allocation:
        raise TypeError(
            f"{where}: allocation options ({', '.join(allocation)}) belong to the model: pass them to "
            "model.generate(...), model(...) or the pipeline call, not to the processor"
        )
    if kwargs:
        raise TypeError(f"{where} got unexpected keyword arguments: {sorted(kwargs)}")


def _visual_identity(sample: dict) -> tuple | None:
    """What makes two samples' visual inputs the same within one call: the same path (and metadata),
    or the same object. None for samples without one."""
    for kind in ("video", "image"):
        value = sample[kind]
        if value is None:
            continue
        source = ("path", os.fspath(value)) if isinstance(value, (str, os.PathLike)) else ("object", id(value))
        return kind, source, id(sample.get("video_metadata"))
    return None


def _per_sample(values: Any, is_single, name: str) -> list | None:
    """`values` as one entry per sample: a single item is one sample; a list holds one entry per
    sample, each an item, None, or a list of at most one item (nested per-sample form)."""
    if values is None:
        return None
    if is_single(values) or not isinstance(values, (list, tuple)):
        return [values]
    entries = []
    for i, entry in enumerate(values):
        if isinstance(entry, (list, tuple)) and not is_single(entry):
            if len(entry) > 1:
                raise ValueError(
                    f"sample {i}: got {len(entry)} {name}; Tempo takes at most one video or image per sample"
                )
            entry = entry[0] if entry else None
        entries.append(entry)
    return entries


def _count(number: int, plural: str) -> str:
    """'1 text', '2 texts'."""
    return f"{number} {plural[:-1] if number == 1 else plural}"


def _metadata_per_sample(video_metadata: Any, count: int) -> list:
    """`video_metadata` as one entry per sample: a dict or `VideoMetadata` is shared by all samples;
    a list must have one entry per sample (nested one-element lists are unwrapped)."""
    if not isinstance(video_metadata, (list, tuple)):
        return [video_metadata] * count
    if len(video_metadata) != count:
        raise ValueError(f"got {count} samples but {len(video_metadata)} video_metadata entries; give one per sample")
    return [m[0] if isinstance(m, (list, tuple)) and len(m) == 1 else m for m in video_metadata]


def _is_single_image(value: Any) -> bool:
    """One image: a PIL image or an (H, W, C) array / tensor."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 3
    return not isinstance(value, (list, tuple, type(None)))


def _is_single_video(value: Any) -> bool:
    """One video (not a batch): a path, bytes, a file object, a (T, H, W, 3) array, a
    `LoadedVideo` or `PendingVideo`, or a list of frames (PIL images / (H, W, 3) arrays)."""
    single = (str, os.PathLike, bytes, bytearray, memoryview, LoadedVideo, PendingVideo)
    if isinstance(value, single) or hasattr(value, "read"):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 4
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, (np.ndarray, torch.Tensor)):
            return first.ndim == 3
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            return False
        return isinstance(first, Image.Image)
    return False


def _pad(rows: list[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), length), value, dtype=np.int64)  # numpy: a row copy costs less than a torch.tensor
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        if not row:
            continue
        where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        out[i, where] = row
        mask[i, where] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)
