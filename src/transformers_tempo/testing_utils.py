"""Tiny, fully offline stand-ins for the real Tempo parts.

Tests, `tempo demo` and `benchmarks/bench_e2e.py --tiny` need a tokenizer and a model
without the Hugging Face Hub. This module builds a small byte-level BPE tokenizer with
the Qwen vocabulary's special tokens (same pre-tokenizer as Qwen2/Qwen3) and a tiny
`TempoConfig` whose two networks are the real transformers classes at toy sizes.
"""

from __future__ import annotations

import functools
import json

# Special tokens of the Qwen2/Qwen3/Qwen3-VL vocabulary that Tempo's prompts use.
# Their relative order follows the real vocabulary (<|endoftext|> first).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A small corpus that covers the words of both Tempo prompts, timestamps and the
# demo/test answers, so that they tokenise into a handful of tokens each.
_CORPUS = [
    "You are a helpful assistant.",
    "You are a query-conditioned visual compressor. Store in the provided memory tokens the minimal "
    "visual information needed to answer the Query. Ignore irrelevant details. Now, before compressing, "
    "answer exactly 'Yes' or 'No': is this segment relevant to the Query?",
    "Query:\nDescribe this content.",
    "system\nuser\nassistant\n",
    "<0.0 seconds> <1.5 seconds> <2.0 seconds> <12.3 seconds> <456.7 seconds> <89.0 seconds>",
    "Yes No Yes No yes no",
    "What colour is the video? The video is red. The video is green. The video is blue. "
    "What happens in the video? What is shown? Who scores after the goal? Describe the scene.",
    "red green blue white black yellow a the is in of and to what which when where who how",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 . , ? ! : ; ' \" ( ) - _ / \\ < > [ ] { }",
]


@functools.lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that every frequent word of it is merged into whole tokens.
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return vocab, merges


def build_tiny_tokenizer():
    """A ~520-token Qwen2-style tokenizer with Tempo's special tokens, built offline."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _tiny_vocab_and_merges()
    vocab = dict(vocab)
    # Special tokens go after the BPE vocabulary, as in the real Qwen vocabulary.
    next_id = max(vocab.values()) + 1
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in merges],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def tiny_tempo_config(tokenizer=None, **overrides):
    """A `TempoConfig` with toy-sized real Qwen3-VL and Qwen3 networks for this tokenizer's vocabulary.

    Memory tokens default to 16 (the released model has 128) so that ATA has room to act on tiny inputs.
    """
    from .configuration_tempo import TempoConfig

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    compressor = {
        "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000,
                "mrope_interleaved": True,
                "mrope_section": [4, 2, 2],
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
    }
    text = {
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    settings = {
        "num_memory_tokens": 16,
        "video_token_id": ids["<|video_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "max_context_length": 4096,
        "visual_token_budget": 64,
        "compressor_batch_size": 4,
    }
    settings.update(overrides)
    return TempoConfig(compressor_config=compressor, text_config=text, **settings)


def build_tiny_model(tokenizer=None, seed: int = 0, **overrides):
    """A randomly initialised tiny `TempoForConditionalGeneration` (float32, eval mode)."""
    import torch

    from .modeling_tempo import TempoForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_tempo_config(tokenizer, **overrides)
    model = TempoForConditionalGeneration(config)
    # A random relevance vector, so that segments get different scores and ATA has work to do.
    with torch.no_grad():
        model.model.relevance_head.weight.normal_(0.0, 1.0)
    return model.eval()
