"""Tempo long-video question answering for Hugging Face transformers.

Importing this package registers Tempo with transformers' Auto classes (config, model, processor)
and the `video-question-answering` pipeline task.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor

from .configuration_tempo import TempoConfig
from .modeling_tempo import (
    TempoCausalLMOutputWithPast,
    TempoForConditionalGeneration,
    TempoModel,
    TempoPreTrainedModel,
)
from .pipeline_tempo import VideoQuestionAnsweringPipeline, register_pipeline
from .processing_tempo import PendingVideo, TempoProcessor
from .streaming import StreamedVideo, compress_streaming, generate_streaming
from .token_allocation import allocate_tokens, select_tokens
from .video_loading import LoadedVideo, VideoLoadError, load_video
from .video_processing_tempo import TempoVideoProcessor

__version__ = "0.1.0"

AutoConfig.register("tempo", TempoConfig, exist_ok=True)
# What users write is `AutoModel.from_pretrained(...)`: it returns the full generation model, and so
# do the auto classes transformers uses for image/video-text-to-text generation.
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    _auto.register(TempoConfig, TempoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(TempoConfig, TempoProcessor, exist_ok=True)
register_pipeline()

__all__ = [
    "TempoConfig",
    "TempoForConditionalGeneration",
    "TempoModel",
    "TempoPreTrainedModel",
    "TempoCausalLMOutputWithPast",
    "TempoProcessor",
    "TempoVideoProcessor",
    "VideoQuestionAnsweringPipeline",
    "LoadedVideo",
    "VideoLoadError",
    "load_video",
    "PendingVideo",
    "StreamedVideo",
    "compress_streaming",
    "generate_streaming",
    "allocate_tokens",
    "select_tokens",
]
