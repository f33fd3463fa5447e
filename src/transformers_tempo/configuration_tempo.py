"""TempoConfig: a Qwen3-VL compressor config + a Qwen3 decoder config + Tempo's own settings."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Qwen vocabulary ids shared by Qwen3 and Qwen3-VL (the two tokenizers are the same vocabulary).
QWEN_PAD_TOKEN_ID = 151643  # <|endoftext|>
QWEN_IM_END_TOKEN_ID = 151645  # <|im_end|>
QWEN_IMAGE_TOKEN_ID = 151655  # <|image_pad|>
QWEN_VIDEO_TOKEN_ID = 151656  # <|video_pad|>

# The released architecture, without downloading anything.
# Values from the `config.json` files of `Qwen/Qwen3-VL-2B-Instruct` (compressor) and
# `Qwen/Qwen3-4B` (decoder) on the Hugging Face Hub, as published with those models.
QWEN3_VL_2B_INSTRUCT = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000,
            "mrope_interleaved": True,
            "mrope_section": [24, 20, 20],
        },
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "model_type": "qwen3_vl_vision",
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
    },
}

QWEN3_4B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000},
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


class TempoConfig(PreTrainedConfig):
    r"""
    Configuration of a Tempo model: a small VLM (Qwen3-VL) that compresses every video segment,
    query-aware, into `num_memory_tokens` features plus a relevance score, a projector, and a
    Qwen3 decoder that answers from the (ATA-allocated) features.

    Args:
        compressor_config (`Qwen3VLConfig` or `dict`):
            The local compressor (Qwen3-VL without LM head).
        text_config (`Qwen3Config` or `dict`):
            The global decoder (Qwen3 causal LM).
        num_memory_tokens (`int`, defaults to 128):
            Learned memory tokens appended to every segment's compressor prompt.
        projector_type (`str`, defaults to `"mlp2x_gelu"`):
            `"mlp2x_gelu"` (Linear, GELU, Linear) as released, or `"linear"`.
        video_token_id / image_token_id (`int`):
            Decoder-vocabulary placeholders: one per video segment / per image in the decoder prompt.
        max_context_length (`int`, defaults to 32768):
            Decoder context limit; the visual part is cut at its end when
            text + visual + `reserved_context_tokens` would exceed it.
        reserved_context_tokens (`int`, defaults to 16):
            Tokens kept free for the answer when truncating (the reference's 16).
        visual_token_budget, min_tokens_per_segment, token_selection, use_ata:
            Adaptive Token Allocation defaults (copied into the generation config, where they can be
            overridden per call).
        compressor_batch_size (`int`, defaults to 32):
            Segments per compressor forward pass; bounds peak memory independently of video length.
        relevance_vector_dtype (`str`, *optional*):
            The dtype in which the conversion subtracted the two LM-head rows of the relevance vector
            (`"bfloat16"`, `"float16"` or `"float32"`: the dtype the weights were converted to, as the
            released code does for a model run in that dtype). The vector itself is stored in float32.
            `None` for configs written before this was recorded (those subtracted in bfloat16).

    Example:
    ```python
    >>> from transformers_tempo import TempoConfig, TempoForConditionalGeneration
    >>> config = TempoConfig.tempo_6b()  # the released architecture, nothing downloaded
    >>> config.text_config.hidden_size, config.compressor_config.text_config.hidden_size
    (2560, 2048)
    ```
    """

    model_type = "tempo"
    sub_configs_defaults = {
        "compressor_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3_vl"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
    }

    compressor_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_memory_tokens: int = 128
    projector_type: str = "mlp2x_gelu"
    video_token_id: int = QWEN_VIDEO_TOKEN_ID
    image_token_id: int = QWEN_IMAGE_TOKEN_ID
    max_context_length: int = 32768
    reserved_context_tokens: int = 16
    visual_token_budget: int = 8192
    min_tokens_per_segment: int = 4
    token_selection: str = "head"
    use_ata: bool = True
    compressor_batch_size: int = 32
    relevance_vector_dtype: str | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type must be 'mlp2x_gelu' or 'linear', got {self.projector_type!r}")
        if self.num_memory_tokens < 1:
            raise ValueError(f"num_memory_tokens must be >= 1, got {self.num_memory_tokens}")
        if not 1 <= self.min_tokens_per_segment <= self.num_memory_tokens:
            raise ValueError(
                f"min_tokens_per_segment must be in [1, num_memory_tokens={self.num_memory_tokens}], "
                f"got {self.min_tokens_per_segment}"
            )
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", self.tie_word_embeddings))

    @property
    def compressor_hidden_size(self) -> int:
        return self.compressor_config.text_config.hidden_size

    @classmethod
    def tempo_6b(cls, **kwargs) -> "TempoConfig":
        """The released Tempo-6B architecture (Qwen3-VL-2B-Instruct compressor, Qwen3-4B decoder,
        128 memory tokens, mlp2x_gelu projector 2048 -> 2560), built offline for benchmarks."""
        import copy

        return cls(
            compressor_config=copy.deepcopy(QWEN3_VL_2B_INSTRUCT),
            text_config=copy.deepcopy(QWEN3_4B),
            **kwargs,
        )


__all__ = ["TempoConfig"]
