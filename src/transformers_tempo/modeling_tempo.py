"""Tempo: a Qwen3-VL compressor, Adaptive Token Allocation, a projector and a Qwen3 decoder.

The file reads in the order data flows:
  1. compressor   segment rows -> (S, M, Dc) memory features + relevance score per segment
  2. allocation   scores -> kept count per segment (ATA, `token_allocation.py`)
  3. projector    Dc -> Dd
  4. splice       each decoder placeholder -> its kept features (labels, mask, truncation follow)
  5. decoder      Qwen3 -> logits, loss, KV cache; `generate()` continues from there
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, ModelOutput
from transformers.utils import can_return_tuple, logging

from .configuration_tempo import TempoConfig
from .fast_paths import (
    TempoDecoderAttention,
    equal_group_length,
    mrope_position_ids,
    set_fast_paths,
    set_split_decoder_attention,
    vision_cu_seqlens_cpu,
)
from .fused_projections import fuse_decoder_projections
from .generation_tempo import (
    decode_attention_while_generating,
    reject_prompt_positions,
    resolve_ata_options,
    size_static_cache,
)
from .graphed_decoding import graphed_greedy_search, release_stale_graphed_decoding, wants_graphed_decoding
from .token_allocation import ATA_OPTION_NAMES, ata_for_samples, select_tokens

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class TempoCompressorOutput(ModelOutput):
    """Per-segment outputs of the compressor.

    features: (S, num_memory_tokens, compressor_hidden) last hidden states at the memory positions.
    relevance_scores: (S,) float32 sigmoid(r . h) of the token just before the first memory token.
    """

    features: torch.FloatTensor | None = None
    relevance_scores: torch.FloatTensor | None = None


@dataclass
class VisionFeatures:
    """The compressor's vision-tower output for consecutive segments (rows) of one video.

    embeds: per segment, its merged visual tokens (tokens, Dc).
    deepstack: per segment, one (tokens, Dc) tensor per deepstack layer.
    """

    embeds: list[torch.Tensor] = field(default_factory=list)
    deepstack: list[list[torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.embeds)

    def rows(self, start: int, stop: int) -> VisionFeatures:
        return VisionFeatures(self.embeds[start:stop], self.deepstack[start:stop])

    def __add__(self, other: VisionFeatures) -> VisionFeatures:
        return VisionFeatures(self.embeds + other.embeds, self.deepstack + other.deepstack)



@dataclass
class TempoModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` over the spliced sequence, plus where the visual tokens went
    (see `TempoCausalLMOutputWithPast`) and the widened `labels`."""

    relevance_scores: torch.FloatTensor | None = None
    token_allocation: torch.LongTensor | None = None
    segment_sample_index: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None


@dataclass
class TempoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` over the spliced sequence, plus where the visual tokens went.

    loss: language-modelling loss over the spliced sequence (when `labels` are given).
    logits: (B, L, vocab) over the spliced sequence (visual features included), so L is longer
        than the prompt's `input_ids` when it holds visual placeholders.
    cache: the decoder KV cache.
    relevance_scores: (S,) one score per compressor row (segment or image), float32.
    token_allocation: (S,) features kept per row (ATA for video segments, all for images).
    segment_sample_index: (S,) which sample of the batch each row belongs to.
    """

    relevance_scores: torch.FloatTensor | None = None
    token_allocation: torch.LongTensor | None = None
    segment_sample_index: torch.LongTensor | None = None


@dataclass
class DecoderInputs:
    """What the splice hands to the decoder."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    relevance_scores: torch.Tensor | None
    token_allocation: torch.Tensor | None
    segment_sample_index: torch.Tensor | None


@dataclass
class SplicedSample:
    """One sample's decoder sequence after the splice: embeddings, labels (or None) and which
    positions are visual (features and their timestamp tokens)."""

    embeds: torch.Tensor
    labels: torch.Tensor | None
    visual: torch.Tensor

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    def select(self, index) -> SplicedSample:
        labels = self.labels[index] if self.labels is not None else None
        return SplicedSample(self.embeds[index], labels, self.visual[index])


def splice_sample(text_embeds, placeholder, kept_features, labels=None, timestamp_mask=None) -> SplicedSample:
    """Replace each placeholder of one (unpadded) sample by the next kept features from
    `kept_features`; labels are -100 over the features, timestamps count as visual."""
    device = text_embeds.device
    if timestamp_mask is None:
        timestamp_mask = torch.zeros(text_embeds.shape[0], dtype=torch.bool, device=device)
    embeds, label_pieces, visual = [], [], []
    start, length = 0, text_embeds.shape[0]
    for position in placeholder.nonzero().flatten().tolist() + [length]:
        if position > start:  # the text between two placeholders
            embeds.append(text_embeds[start:position])
            visual.append(timestamp_mask[start:position])
            if labels is not None:
                label_pieces.append(labels[start:position])
        if position < length:
            features = next(kept_features).to(device, text_embeds.dtype)
            embeds.append(features)
            visual.append(torch.ones(features.shape[0], dtype=torch.bool, device=device))
            if labels is not None:
                label_pieces.append(torch.full((features.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=device))
        start = position + 1
    if not embeds:
        return SplicedSample(text_embeds[:0], labels[:0] if labels is not None else None, timestamp_mask[:0])
    return SplicedSample(
        torch.cat(embeds), torch.cat(label_pieces) if labels is not None else None, torch.cat(visual)
    )


def pad_spliced(samples: list[SplicedSample], padding_side: str, mask_dtype):
    """Stack spliced samples into (inputs_embeds, attention_mask, labels or None), padded on one side."""
    batch, max_len = len(samples), max(sample.length for sample in samples)
    first = samples[0]
    inputs_embeds = first.embeds.new_zeros(batch, max_len, first.embeds.shape[-1])
    mask = torch.zeros(batch, max_len, dtype=mask_dtype, device=first.embeds.device)
    labels = None
    if first.labels is not None:
        labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=first.labels.dtype, device=first.embeds.device)
    for b, sample in enumerate(samples):
        where = slice(max_len - sample.length, max_len) if padding_side == "left" else slice(0, sample.length)
        inputs_embeds[b, where] = sample.embeds
        mask[b, where] = 1
        if labels is not None:
            labels[b, where] = sample.labels
    return inputs_embeds, mask, labels


class TempoProjector(nn.Module):
    """LLaVA's `mlp2x_gelu` (Linear, GELU, Linear) or `linear`, compressor width -> decoder width."""

    def __init__(self, config: TempoConfig):
        super().__init__()
        in_dim, out_dim = config.compressor_hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_dim, out_dim)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim)
        else:
            self.act = None
            self.linear_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


class TempoPreTrainedModel(PreTrainedModel):
    config: TempoConfig
    config_class = TempoConfig
    base_model_prefix = "model"
    input_modalities = ("video", "image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer", "Qwen3DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # The relevance vector is a difference of two LM-head rows; scoring is float32 as released.
    _keep_in_fp32_modules_strict = ["relevance_head"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TempoModel):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            module.memory_tokens.normal_(mean=0.0, std=std)


def compiled_decoder_modules(decoder: nn.Module) -> list[nn.Module]:
    """The modules of a decoder that `TempoModel.compile_decoder` compiles whole: its RMSNorms and MLPs.
    (It compiles the attention modules' `rotated_states` method only, see `TempoDecoderAttention`.)"""
    return [module for module in decoder.modules() if type(module).__name__.endswith(("RMSNorm", "MLP"))]


class TempoModel(TempoPreTrainedModel):
    """Compressor (Qwen3-VL body + memory tokens + relevance head), projector and Qwen3 decoder body."""

    def __init__(self, config: TempoConfig):
        super().__init__(config)
        self.compressor = AutoModel.from_config(config.compressor_config)
        hidden_c = config.compressor_hidden_size
        self.memory_tokens = nn.Parameter(torch.zeros(config.num_memory_tokens, hidden_c))
        # float32 whatever the load dtype (`_from_config(dtype=...)` included): the released scoring
        # is float32, and a bf16 head would round the vector before it is used.
        self.relevance_head = nn.Linear(hidden_c, 1, bias=False, dtype=torch.float32)
        self.projector = TempoProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.set_fast_paths(True)

    def set_fast_paths(self, enabled: bool = True) -> None:
        """Use the loop-free compressor steps of `fast_paths.py` (default) or the stock transformers ones."""
        set_fast_paths(self.compressor, enabled)
        self.fast_paths = enabled

    def compile_compressor(self, **compile_kwargs) -> None:
        """`torch.compile` every vision block and compressor language-model layer, in place.

        The compressor runs hundreds of same-shaped segments; compiling fuses the float32 norms,
        rotary embeddings and activations around its matmuls (most of its memory traffic). The
        first chunks pay the compilation. Same function, same weights.

        Compiled for any shape (`dynamic=True` unless given): a row's length changes with the
        question and with the digits of the video's timestamps, and code specialised to the first
        length recompiled for the next one, on the first answer about a new video. Measured on an
        H100 at 1024 frames: that first answer 7.0 -> 2.2 s, the compressor 1.00-1.02 -> 1.05 s.
        """
        compile_kwargs.setdefault("dynamic", True)
        for block in self.compressor.visual.blocks:
            block.compile(**compile_kwargs)
        for layer in self.compressor.language_model.layers:
            layer.compile(**compile_kwargs)

    def compile_decoder(self, **compile_kwargs) -> None:
        """`torch.compile` the decoder's element-wise work, in place: its RMSNorm modules (four per
        layer and the last one), its MLPs, and in each attention the steps between the q/k/v
        projections and the KV cache (per-head norms, transposes, rotary embedding).

        In a profile of one prefill on an H200 (Tempo-6B architecture, 8.3k spliced tokens), about
        100 ms of the 190 ms were small element-wise kernels around the matmuls (72 ms) and attention
        (32 ms); each RMSNorm ran as about seven of them (casts, square, mean, rsqrt, two products),
        and each MLP's SiLU and product were two more passes over its widest activation. Compiled,
        each norm is one kernel and each MLP one between its products. Only these parts: the whole
        decoder compiled for any prompt length took minutes to compile (a tiny 36-layer decoder on
        CPU had not answered after 110 s), and a decoder layer or its attention recompiles for every
        layer (torch.compile specialises on the layer's index into the cache), while the norms and
        MLPs, the same modules everywhere, compile a handful of times in seconds and are reused by
        every layer. The attention's part is compiled the same way: its modules become
        `TempoDecoderAttention` (the stock forward with that part in a method, `rotated_states`,
        that does not read the layer's index), and one compiled function serves every layer.
        Compiled for any shape (`dynamic=True` unless given): the prompt's length changes with every
        question. Measured on one H200 (8.3k-token prompt), each pair in one run: norms only
        0.210 -> 0.174 s; norms and MLPs 0.200 -> 0.156 s; norms, MLPs and the attention's part
        0.198 -> 0.131 s (0.206 -> 0.141 s on another machine). Same function, same weights.
        """
        compile_kwargs.setdefault("dynamic", True)
        for module in compiled_decoder_modules(self.language_model):
            module.compile(**compile_kwargs)
        set_split_decoder_attention(self.language_model)
        rotated_states = torch.compile(TempoDecoderAttention.rotated_states, **compile_kwargs)
        for module in self.language_model.modules():
            if isinstance(module, TempoDecoderAttention):
                module.compiled_rotated_states = rotated_states

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor, **kwargs):
        """The compressor's vision tower on video patches, as `Qwen3VLModel.get_video_features`: query-free,
        `pooler_output` one (tokens, Dc) tensor per video grid, `deepstack_features` per deepstack layer."""
        return self.compressor.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **kwargs):
        """The compressor's vision tower on image patches, as `Qwen3VLModel.get_image_features`."""
        return self.compressor.get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)

    # ------------------------------------------------------------------ 1. compressor
    def compress(
        self,
        compressor_input_ids: torch.LongTensor,
        compressor_attention_mask: torch.Tensor,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        compressor_batch_size: int | None = None,
        progress: bool = False,
        video_features: VisionFeatures | None = None,
    ) -> TempoCompressorOutput:
        """Run every compressor row (one per video segment or image), `compressor_batch_size` rows at a time.

        Rows are right-padded prompts; the memory tokens go right after each row's own prompt.
        Video rows and image rows are chunked separately (each chunk holds one kind), and the
        outputs come back in row order. `video_features` (from `encode_video_features`, one entry
        per video row) replaces the vision tower on the video rows: the tower does not read the
        question, so several questions about one video can share it.
        """
        cfg = self.config.compressor_config
        ids = compressor_input_ids
        num_rows = ids.shape[0]
        is_video = (ids == cfg.video_token_id).any(dim=1)
        is_image = (ids == cfg.image_token_id).any(dim=1)
        if bool((is_video & is_image).any()):
            raise ValueError("a compressor row holds both a video and an image; one visual input per row")

        chunk = compressor_batch_size or self.config.compressor_batch_size
        bar = None
        if progress:
            from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

            bar = tqdm(total=num_rows, desc="compressing segments", unit="seg", leave=False)
        features = None
        scores = torch.empty(num_rows, dtype=torch.float32, device=ids.device)
        if video_features is not None and len(video_features) != int(is_video.sum()):
            raise ValueError(
                f"video_features cover {len(video_features)} segments but the compressor rows hold "
                f"{int(is_video.sum())} video segments"
            )
        for kind_mask, pixels, grid, kind in (
            (is_video, pixel_values_videos, video_grid_thw, "video"),
            (is_image, pixel_values, image_grid_thw, "image"),
            (~(is_video | is_image), None, None, None),
        ):
            rows = kind_mask.nonzero().flatten()
            if rows.numel() == 0:
                continue
            given = video_features if kind_mask is is_video else None
            if kind is not None and given is None and (pixels is None or grid is None):
                names = {"video": ("pixel_values_videos", "video_grid_thw"), "image": ("pixel_values", "image_grid_thw")}[kind]
                missing = [name for name, value in zip(names, (pixels, grid)) if value is None]
                raise ValueError(
                    f"{rows.numel()} compressor rows hold {kind} placeholders, but {' and '.join(missing)} "
                    f"{'was' if len(missing) == 1 else 'were'} not given"
                )
            if grid is not None and grid.shape[0] != rows.numel():
                raise ValueError(
                    f"{grid.shape[0]} visual grids for {rows.numel()} compressor rows that hold that kind of input"
                )
            bounds = [(start, min(start + chunk, rows.numel())) for start in range(0, rows.numel(), chunk)]
            uploads = self._device_pixel_chunks(pixels, grid, bounds) if grid is not None and given is None else None
            for start, stop in bounds:
                sel = rows[start:stop]
                chunk_grid = grid[start:stop] if grid is not None else None
                vision = None
                if given is not None:
                    vision = given.rows(start, stop)
                elif uploads is not None:
                    vision = self._vision_features(next(uploads), chunk_grid, video=kind_mask is is_video)
                feats, rel = self._compress_rows(
                    ids[sel], compressor_attention_mask[sel], vision, chunk_grid, video=kind_mask is is_video
                )
                if features is None:
                    features = feats.new_empty(num_rows, *feats.shape[1:])
                features[sel] = feats
                scores[sel] = rel
                if bar is not None:
                    bar.update(sel.numel())
        if bar is not None:
            bar.close()
        return TempoCompressorOutput(features=features, relevance_scores=scores)

    def _device_pixel_chunks(self, pixels, grid, bounds: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """The patches of each (start, stop) range of `grid`'s rows, on the model's device, in turn.

        Pixels may stay on the CPU: each chunk moves on its own, so GPU memory does not grow with
        the video's length. Pinned host pixels go to a GPU on a side stream one chunk ahead, so the
        next chunk's copy overlaps this chunk's compute (one H200, 1024 frames: four copies of
        about 4 ms each ran between the chunks' kernels before).
        """
        offsets = F.pad(grid.prod(-1).cumsum(0), (1, 0)).tolist()  # one sync, not one per chunk
        device = self.memory_tokens.device
        if not (device.type == "cuda" and pixels.device.type == "cpu" and pixels.is_pinned()):
            for start, stop in bounds:
                yield pixels[offsets[start] : offsets[stop]].to(device, non_blocking=True)
            return
        copy_stream, compute_stream = torch.cuda.Stream(device), torch.cuda.current_stream(device)

        def upload(index: int) -> torch.Tensor | None:
            if index == len(bounds):
                return None
            start, stop = bounds[index]
            with torch.cuda.stream(copy_stream):
                return pixels[offsets[start] : offsets[stop]].to(device, non_blocking=True)

        ahead = upload(0)
        for index in range(len(bounds)):
            current = ahead
            compute_stream.wait_stream(copy_stream)
            current.record_stream(compute_stream)  # not reused before the compute that reads it is done
            ahead = upload(index + 1)
            yield current

    def _vision_features(self, chunk_pixels, chunk_grid, video: bool) -> VisionFeatures:
        """The vision tower on one chunk's patches (on the model's device) and their grid rows."""
        cfg = self.config.compressor_config
        vision_kwargs = {}
        if self.fast_paths and cfg.vision_config._attn_implementation == "sdpa":
            # equal frame groups (the usual video): one batched attention call per layer
            cu_seqlens = vision_cu_seqlens_cpu(chunk_grid)
            group = equal_group_length(cu_seqlens)
            if group is not None:
                vision_kwargs = {"cu_seqlens": cu_seqlens, "vision_group_size": group}
        get_features = self.get_video_features if video else self.get_image_features
        out = get_features(chunk_pixels, chunk_grid, **vision_kwargs)
        per_row = [[layer[r] for layer in out.deepstack_features] for r in range(len(out.pooler_output))]
        return VisionFeatures(list(out.pooler_output), per_row)

    def encode_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor,
        compressor_batch_size: int | None = None,
    ) -> VisionFeatures:
        """The vision tower on every segment of the given videos, chunked as `compress` chunks them.

        Pass the result to `compress` / `generate(video_features=...)` for each question about these
        videos (repeated per question, e.g. `features + features`): the answers are those of the plain
        path, without running the tower again.
        """
        chunk = compressor_batch_size or self.config.compressor_batch_size
        rows = video_grid_thw.shape[0]
        bounds = [(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]
        features = VisionFeatures()
        uploads = self._device_pixel_chunks(pixel_values_videos, video_grid_thw, bounds)
        for (start, stop), chunk_pixels in zip(bounds, uploads):
            features = features + self._vision_features(chunk_pixels, video_grid_thw[start:stop], video=True)
        return features

    def _compress_rows(self, ids, mask, vision: VisionFeatures | None, grid, video: bool):
        cfg = self.config.compressor_config
        num_memory = self.config.num_memory_tokens
        rows = ids.shape[0]
        lengths = mask.sum(dim=1)
        width = int(lengths.max()) + num_memory
        pad_id = cfg.text_config.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        # Room for the memory tokens: drop surplus right padding, append M columns.
        ids = ids[:, : int(lengths.max())]
        ids = F.pad(ids, (0, num_memory), value=pad_id)
        cols = torch.arange(width, device=ids.device)[None, :]
        memory_mask = (cols >= lengths[:, None]) & (cols < lengths[:, None] + num_memory)
        attention_mask = (cols < lengths[:, None] + num_memory).long()
        ids = ids.masked_fill(memory_mask, pad_id)  # memory positions count as text for M-RoPE

        embed = self.compressor.get_input_embeddings()
        inputs_embeds = embed(ids)
        visual_pos_masks = deepstack = None
        grid_kwargs = {}
        if vision is not None:
            token_id = cfg.video_token_id if video else cfg.image_token_id
            visual_embeds = torch.cat(vision.embeds, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            visual_pos_masks = ids == token_id
            if int(visual_pos_masks.sum()) != visual_embeds.shape[0]:
                raise ValueError(
                    f"compressor rows hold {int(visual_pos_masks.sum())} visual tokens but the pixels give "
                    f"{visual_embeds.shape[0]} features: the prompts and grid_thw do not match"
                )
            inputs_embeds = inputs_embeds.masked_scatter(visual_pos_masks[..., None], visual_embeds)
            num_layers = len(vision.deepstack[0])
            deepstack = [torch.cat([row[k] for row in vision.deepstack], dim=0) for k in range(num_layers)]
            grid_kwargs = {"video_grid_thw": grid} if video else {"image_grid_thw": grid}
        memory = self.memory_tokens.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(memory_mask[..., None], memory.expand(rows, -1, -1))

        mm_token_type_ids = torch.zeros_like(ids, dtype=torch.int)
        if vision is not None:
            mm_token_type_ids[visual_pos_masks] = 2 if video else 1
        if self.fast_paths:
            position_ids = mrope_position_ids(
                mm_token_type_ids, attention_mask, grid, cfg.vision_config.spatial_merge_size
            )
        else:
            position_ids, _ = self.compressor.get_rope_index(
                ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **grid_kwargs
            )
        out = self.compressor.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack,
        )
        hidden = out.last_hidden_state.to(ids.device)  # a device map may end the compressor on another device
        features = hidden[memory_mask].view(rows, num_memory, -1)
        before_memory = hidden[torch.arange(rows, device=hidden.device), lengths - 1]
        relevance = self.relevance_scores(before_memory)
        return features, relevance

    def relevance_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """sigmoid(r . h) in float32, one score per row of `hidden` (N, Dc)."""
        # float32 even under mixed-precision autocast (Trainer bf16/fp16), as released
        with torch.autocast(hidden.device.type, enabled=False):
            weight = self.relevance_head.weight.to(hidden.device, torch.float32)
            return torch.sigmoid(F.linear(hidden.float(), weight)).squeeze(-1)

    # ------------------------------------------------------------------ 2-4. allocation, projector, splice
    def prepare_decoder_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        compressor_input_ids: torch.LongTensor | None = None,
        compressor_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        timestamp_mask: torch.Tensor | None = None,
        visual_token_budget: int | None = None,
        min_tokens_per_segment: int | None = None,
        use_ata: bool | None = None,
        token_selection: str | None = None,
        padding_side: str | None = None,
        compressor_batch_size: int | None = None,
        compressed: TempoCompressorOutput | None = None,
        progress: bool = False,
        video_features: VisionFeatures | None = None,
    ) -> DecoderInputs:
        """Compress, allocate, project and splice: returns the decoder's `inputs_embeds` and friends.

        Each decoder placeholder (`video_token_id` per video segment, `image_token_id` per image) is
        replaced by the kept features of the compressor row with the same rank: placeholders are read
        row-major over the batch and match compressor rows in order. `compressed` reuses the output
        of an earlier `compress()` call on the same rows.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if padding_side is None:
            padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
        placeholder = self._placeholder_mask(input_ids, attention_mask, compressor_input_ids)
        relevance = allocation = sample_index = None
        kept = []
        if compressor_input_ids is not None and compressor_input_ids.shape[0]:
            if compressed is None:
                compressed = self.compress(
                    compressor_input_ids,
                    compressor_attention_mask,
                    pixel_values_videos=pixel_values_videos,
                    video_grid_thw=video_grid_thw,
                    pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw,
                    compressor_batch_size=compressor_batch_size,
                    progress=progress,
                    video_features=video_features,
                )
            relevance = compressed.relevance_scores
            sample_index = placeholder.nonzero()[:, 0]  # row-major order == compressor row order
            allocation = self.allocate(
                relevance, sample_index, input_ids[placeholder] == self.config.video_token_id, compressor_input_ids,
                use_ata=use_ata, visual_token_budget=visual_token_budget, min_tokens_per_segment=min_tokens_per_segment,
            )
            kept = select_tokens(self.projector(compressed.features), allocation, strategy=token_selection)

        text_embeds = self.get_input_embeddings()(input_ids)
        # With a device map the decoder may sit on another device than the compressor: splice there.
        device = text_embeds.device
        kept_features = iter(kept)
        spliced = []
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b].to(device).bool()
            sample = splice_sample(
                text_embeds[b, valid],
                placeholder[b].to(device)[valid],
                kept_features,
                labels=labels[b].to(device)[valid] if labels is not None else None,
                timestamp_mask=timestamp_mask[b].to(device)[valid].bool() if timestamp_mask is not None else None,
            )
            spliced.append(self._fit_context(sample, b))
        inputs_embeds, new_mask, new_labels = pad_spliced(spliced, padding_side, attention_mask.dtype)
        return DecoderInputs(
            inputs_embeds=inputs_embeds,
            attention_mask=new_mask,
            labels=new_labels,
            relevance_scores=relevance,
            token_allocation=allocation,
            segment_sample_index=sample_index,
        )

    def _placeholder_mask(self, input_ids, attention_mask, compressor_input_ids) -> torch.Tensor:
        """Where the visual placeholders are; one compressor row must exist per placeholder."""
        cfg = self.config
        placeholder = ((input_ids == cfg.video_token_id) | (input_ids == cfg.image_token_id)) & attention_mask.bool()
        num_placeholders = int(placeholder.sum())
        num_rows = 0 if compressor_input_ids is None else compressor_input_ids.shape[0]
        if num_placeholders != num_rows:
            raise ValueError(
                f"the decoder prompt holds {num_placeholders} visual placeholders but {num_rows} compressor rows "
                "were given; build both with TempoProcessor"
            )
        return placeholder

    def allocate(
        self, relevance, sample_index, is_video_row, compressor_input_ids, use_ata, visual_token_budget,
        min_tokens_per_segment,
    ) -> torch.LongTensor:
        """Features kept per compressor row: ATA over each sample's video segments (one budget per
        video), all memory tokens for images and when ATA is off."""
        cfg = self.config
        row_has_video = (compressor_input_ids == cfg.compressor_config.video_token_id).any(dim=1)
        if not torch.equal(is_video_row, row_has_video):
            raise ValueError("decoder placeholders and compressor rows disagree on which rows are video")
        allocation = torch.full(
            (relevance.shape[0],), cfg.num_memory_tokens, dtype=torch.long, device=compressor_input_ids.device
        )
        if use_ata and bool(is_video_row.any()):
            allocation[is_video_row] = ata_for_samples(
                relevance[is_video_row],
                sample_index[is_video_row],
                budget=int(visual_token_budget),
                min_tokens=int(min_tokens_per_segment),
                max_tokens=cfg.num_memory_tokens,
            ).to(allocation.device)
        return allocation

    def _fit_context(self, sample: SplicedSample, index: int) -> SplicedSample:
        """The released context limit: when text + visual exceed max_context_length - reserved tokens,
        the visual part (features and timestamps) is cut at its end; then the whole sequence is capped."""
        cfg = self.config
        num_visual = int(sample.visual.sum())
        max_visual = max(cfg.max_context_length - cfg.reserved_context_tokens - (sample.length - num_visual), 0)
        if num_visual > max_visual:
            cut = num_visual - max_visual
            keep = torch.ones_like(sample.visual)
            keep[sample.visual.nonzero().flatten()[max_visual:]] = False
            sample = sample.select(keep)
            logger.warning_once(
                f"sample {index}: text + visual tokens exceed the context limit ({cfg.max_context_length}); "
                f"the last {cut} visual positions were cut"
            )
        return sample.select(slice(0, cfg.max_context_length))

    # ------------------------------------------------------------------ 5. decoder
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        compressor_input_ids: torch.LongTensor | None = None,
        compressor_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        timestamp_mask: torch.Tensor | None = None,
        visual_token_budget: int | None = None,
        min_tokens_per_segment: int | None = None,
        use_ata: bool | None = None,
        token_selection: str | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> TempoModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        relevance = allocation = sample_index = None
        if input_ids is not None:
            # Decoding steps (no compressor rows) stay free of data-dependent checks so that a
            # static-cache decode step can be compiled; a prompt with placeholders but no rows is
            # caught by `prepare_decoder_inputs`'s count check.
            needs_splice = compressor_input_ids is not None
            if not needs_splice and not torch.compiler.is_compiling() and input_ids.shape[1] > 1:
                needs_splice = bool(
                    ((input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)).any()
                )
            if needs_splice:
                reject_prompt_positions(position_ids)
                prepared = self.prepare_decoder_inputs(
                    input_ids,
                    attention_mask=attention_mask,
                    labels=labels,
                    compressor_input_ids=compressor_input_ids,
                    compressor_attention_mask=compressor_attention_mask,
                    pixel_values_videos=pixel_values_videos,
                    video_grid_thw=video_grid_thw,
                    pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw,
                    timestamp_mask=timestamp_mask,
                    **resolve_ata_options(
                        self, visual_token_budget, min_tokens_per_segment, use_ata, token_selection
                    ),
                )
                inputs_embeds, attention_mask, labels = prepared.inputs_embeds, prepared.attention_mask, prepared.labels
                relevance, allocation = prepared.relevance_scores, prepared.token_allocation
                sample_index = prepared.segment_sample_index
                input_ids = None
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Positions count only real tokens, so left padding changes nothing.
            length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        outputs = self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return TempoModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            relevance_scores=relevance,
            token_allocation=allocation,
            segment_sample_index=sample_index,
            labels=labels,
        )


class TempoForConditionalGeneration(TempoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As Qwen3: the head is tied to the embeddings, which the decoder shards by vocabulary.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # Decoding steps are plain Qwen3 steps: `generate(cache_implementation="static")` compiles them.
    _can_compile_fullgraph = True
    # Greedy decoding with a static cache on CUDA replays each step from one CUDA graph
    # (`graphed_decoding.graphed_greedy_search`) of the inductor-compiled step; a torch.compile mode
    # without CUDA graphs ("max-autotune-no-cudagraphs") compiles it so; "eager": a graph of the
    # eager kernels; False: transformers' own loop.
    graphed_decoding = True

    def __init__(self, config: TempoConfig):
        super().__init__(config)
        self.model = TempoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._ensure_generation_defaults()

    def _ensure_generation_defaults(self):
        """ATA defaults live in the generation config so that they are saved with the model."""
        if self.generation_config is None:
            self.generation_config = GenerationConfig()
        for name in ATA_OPTION_NAMES:
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(self.config, name))
        # A generation config "from the model config" is rebuilt on load, which would drop the ATA keys.
        self.generation_config._from_model_config = False

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def compress(self, *args, **kwargs) -> TempoCompressorOutput:
        return self.model.compress(*args, **kwargs)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    def encode_video_features(self, *args, **kwargs) -> VisionFeatures:
        return self.model.encode_video_features(*args, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        compressor_input_ids: torch.LongTensor | None = None,
        compressor_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        timestamp_mask: torch.Tensor | None = None,
        visual_token_budget: int | None = None,
        min_tokens_per_segment: int | None = None,
        use_ata: bool | None = None,
        token_selection: str | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TempoCausalLMOutputWithPast:
        r"""
        The decoder prompt holds one placeholder per video segment (after its `<t seconds>` text) and
        per image; the compressor rows (one per placeholder, same order) are compressed, ATA decides
        how many features each video segment keeps, and the placeholders are widened to them.
        `labels` follow the decoder prompt and are widened with -100 over visual positions; the
        returned `logits` are over the widened sequence.
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        kwargs.pop("cache_position", None)
        kwargs.pop("segment_times", None)  # processor bookkeeping, not a model input
        # Resolve ATA options here: the generation config (saved defaults) belongs to this class.
        options = resolve_ata_options(self, visual_token_budget, min_tokens_per_segment, use_ata, token_selection)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            compressor_input_ids=compressor_input_ids,
            compressor_attention_mask=compressor_attention_mask,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            timestamp_mask=timestamp_mask,
            use_cache=use_cache,
            **options,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if outputs.labels is not None:
            loss = self.loss_function(
                logits=logits, labels=outputs.labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return TempoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            relevance_scores=outputs.relevance_scores,
            token_allocation=outputs.token_allocation,
            segment_sample_index=outputs.segment_sample_index,
        )

    @torch.no_grad()
    def prepare_generation_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        visual_token_budget: int | None = None,
        min_tokens_per_segment: int | None = None,
        use_ata: bool | None = None,
        token_selection: str | None = None,
        compressor_batch_size: int | None = None,
        **visual_inputs,
    ) -> DecoderInputs:
        """Compress, allocate (ATA), project and splice, left-padded for generation.

        `generate()` does this itself; call it separately to time the stages or to inspect the
        allocation before decoding, then pass the result as `generate(decoder_inputs=...)`.
        """
        for name in ("labels", "mm_token_type_ids", "segment_times"):
            visual_inputs.pop(name, None)
        options = resolve_ata_options(self, visual_token_budget, min_tokens_per_segment, use_ata, token_selection)
        return self.model.prepare_decoder_inputs(
            input_ids,
            attention_mask=attention_mask,
            padding_side="left",
            compressor_batch_size=compressor_batch_size,
            **visual_inputs,
            **options,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        compressor_input_ids: torch.LongTensor | None = None,
        compressor_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        timestamp_mask: torch.Tensor | None = None,
        visual_token_budget: int | None = None,
        min_tokens_per_segment: int | None = None,
        use_ata: bool | None = None,
        token_selection: str | None = None,
        compressor_batch_size: int | None = None,
        decoder_inputs: DecoderInputs | None = None,
        inputs_embeds: torch.Tensor | None = None,
        video_features: VisionFeatures | None = None,
        **kwargs,
    ):
        """Compress + allocate + splice once, then let `GenerationMixin.generate` decode from the
        spliced embeddings.

        As for every decoder-only model in transformers, given `input_ids` the result is `input_ids`
        followed by the new tokens, so `out[:, inputs["input_ids"].shape[1]:]` are the answers' tokens.
        Context penalties (`repetition_penalty`, `no_repeat_ngram_size`) see that text prompt and the
        new tokens; the visual features are not tokens and are not seen. Given only `decoder_inputs`
        (from `prepare_generation_inputs`) or only `inputs_embeds`, the result is the new tokens, as
        transformers does for embeddings. With `return_dict_in_generate=True` the output also carries
        `relevance_scores`, `token_allocation` and `segment_sample_index`. ATA options are per-call
        keyword arguments; the model's generation config holds their defaults. `video_features`
        (from `encode_video_features`) reuses the vision tower's output of earlier questions.
        """
        for name in ("labels", "mm_token_type_ids", "segment_times"):
            kwargs.pop(name, None)
        if decoder_inputs is None and input_ids is None:
            return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        if decoder_inputs is None:
            has_visual = compressor_input_ids is not None or bool(
                ((input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)).any()
            )
            if has_visual:
                reject_prompt_positions(kwargs.get("position_ids"))
                if inputs_embeds is not None:
                    raise ValueError(
                        "inputs_embeds cannot be given with visual inputs: Tempo builds the decoder's embeddings "
                        "by splicing the compressed video into the prompt; give input_ids and the visual inputs"
                    )
            if inputs_embeds is not None:  # a text-only prompt given as embeddings, as for any decoder
                decoder_inputs = DecoderInputs(
                    inputs_embeds, attention_mask, labels=None, relevance_scores=None, token_allocation=None,
                    segment_sample_index=None,
                )
            else:
                decoder_inputs = self.prepare_generation_inputs(
                    input_ids,
                    attention_mask=attention_mask,
                    compressor_input_ids=compressor_input_ids,
                    compressor_attention_mask=compressor_attention_mask,
                    pixel_values_videos=pixel_values_videos,
                    video_grid_thw=video_grid_thw,
                    pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw,
                    timestamp_mask=timestamp_mask,
                    visual_token_budget=visual_token_budget,
                    min_tokens_per_segment=min_tokens_per_segment,
                    use_ata=use_ata,
                    token_selection=token_selection,
                    compressor_batch_size=compressor_batch_size,
                    video_features=video_features,
                )
        decoder = self.plain_decoder()
        size_static_cache(decoder, kwargs, self.generation_config, decoder_inputs.inputs_embeds.shape[1])
        if input_ids is not None:
            # The text prompt leads the returned sequences; the decoder reads the spliced embeddings.
            kwargs["input_ids"] = input_ids.to(decoder_inputs.inputs_embeds.device)
        if wants_graphed_decoding(decoder, self.generation_config, kwargs):
            kwargs["custom_generate"] = graphed_greedy_search
        else:
            release_stale_graphed_decoding(decoder)  # a graph and static cache no call can use any more
        with decode_attention_while_generating(self.config.text_config):
            output = decoder.generate(
                inputs_embeds=decoder_inputs.inputs_embeds, attention_mask=decoder_inputs.attention_mask, **kwargs
            )
        if isinstance(output, ModelOutput):
            output["relevance_scores"] = decoder_inputs.relevance_scores
            output["token_allocation"] = decoder_inputs.token_allocation
            output["segment_sample_index"] = decoder_inputs.segment_sample_index
        return output

    def enable_compiled_inference(self, **compile_kwargs):
        """Compile the compressor layers and the decoder's norms, MLPs and attention element-wise
        steps (`TempoModel.compile_compressor`, `TempoModel.compile_decoder`), fuse the decoder's
        q/k/v and gate/up projections into one matmul each and give graphed decoding's step a
        matrix-vector kernel for its products at batch 1 on CUDA (`fuse_decoder_projections`; same
        weights and checkpoint, no extra memory, so call it once the model is on its device), and
        decode with a static cache. On CUDA, greedy decoding then replays the compiled step as one
        CUDA graph (`graphed_decoding`); elsewhere transformers keeps the step eager. The first
        calls pay the compilation; the cache length is bucketed (`size_static_cache`) so later
        videos reuse it. Measured on one H200 at 1024 frames: compressor 0.99 s compiled; prefill 0.14 s;
        decoding 278-300 tokens/s. Same function; greedy tokens can differ only by kernel rounding."""
        self.model.compile_compressor(**compile_kwargs)
        fuse_decoder_projections(self.model.language_model)
        self.model.compile_decoder(**compile_kwargs)
        self.generation_config.cache_implementation = "static"
        return self

    def plain_decoder(self):
        """The decoder as a stock `Qwen3ForCausalLM` sharing this model's modules (no weights copied).

        After the splice, decoding is plain Qwen3: `generate()` hands it the spliced embeddings, so
        every decoding step runs transformers' own Qwen3 code (and its compiled static-cache path),
        not Tempo's multimodal forward. Measured on an H100: 110 vs 89 tokens/s, identical tokens.
        """
        from transformers import Qwen3ForCausalLM

        lm = self.__dict__.get("_plain_decoder")  # not a submodule: kept out of state_dict and .to()
        if lm is None or lm.model is not self.model.language_model or lm.lm_head is not self.lm_head:
            with torch.device("meta"):
                lm = Qwen3ForCausalLM(self.config.text_config)
            lm.model, lm.lm_head = self.model.language_model, self.lm_head
            lm.eval()
            self.__dict__["_plain_decoder"] = lm
        lm.generation_config = self.generation_config
        lm.graphed_decoding = self.graphed_decoding
        lm.training = self.training  # the shared submodules keep their own modes
        return lm

    def apply_released_rotary_rounding(self):
        """Round every rotary inverse-frequency buffer through float16 then bfloat16, as the released
        scripts do by loading in float16 and casting the whole model to bfloat16. Call it to compute
        exactly the released bf16 function; without it the buffers stay float32 (transformers' default)."""
        for module in self.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor):
                rounded = inv_freq.to(torch.float16).to(torch.bfloat16).to(inv_freq.dtype)
                inv_freq.copy_(rounded)
                if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                    module.original_inv_freq = rounded.clone()
        return self


__all__ = ["TempoForConditionalGeneration", "TempoModel", "TempoPreTrainedModel", "TempoCausalLMOutputWithPast"]
