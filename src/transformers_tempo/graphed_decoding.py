"""Greedy decoding as one CUDA graph per step: a `custom_generate` loop for a static-cache decoder.

Why: after the prefill, a decoding step of the 4B decoder reads ~8 GB of weights, about 2 ms on an
H200, but transformers' `_sample` loop around a compiled step measured 7.1-7.7 ms per token there
(130-140 tokens/s): the step itself is replayed from a CUDA graph, while the Python around it
(preparing inputs, updating kwargs, the logits-processor and stopping-criteria calls, the compiled
call's guards) launches dozens of small kernels and runs longer than the GPU work. Here one graph
holds the whole step: decoder forward, head, argmax, the end-of-sequence bookkeeping and the
update of the next step's inputs (token, position, attention mask), so the loop only replays it
and looks at the device every `STOP_CHECK_EVERY` steps.

The step is compiled by inductor before it is captured (`_GreedyStepper._warm_up` says why;
`graphed_decoding = "eager"` captures the eager kernels instead). Measured on one NVIDIA H200
(Tempo-6B architecture, random bf16 weights, 8.3k-token prompt, 32 new tokens), in one run: a graph
of the compiled step 205 tokens/s, of the eager kernels 142, transformers' compiled static-cache
loop 141, the same greedy tokens. With the decoder's projections fused inside the compiled step
too (`fused_projections`), a later run measured 253 tokens/s (a 256-token answer in 1.17 s); with
`graphed_decoding = "max-autotune-no-cudagraphs"` (inductor's kernel search for the step) 260 against
252 for the default compile in one run, the same greedy tokens. With the split-KV attention and the
matrix-vector kernel for the products (`gemv_kernels`) the default compile gave 295 tokens/s (a
256-token answer in 0.98 s) against 254 with cuBLAS's products in one run. The
graph and the static cache it reads are kept on the decoder for the next call of the same batch
size and cache length (`_kept_stepper` says why and what that costs in memory).

It is a transformers `custom_generate` callable (`generate(..., custom_generate=graphed_greedy_search)`),
so `generate` prepares the cache, the prompt, the stopping criteria and the output as usual. It
handles greedy search with a `StaticCache` and nothing that needs per-step Python (no logits
processors, no streamer, no scores, attentions or hidden states returned, only max-length and
end-of-sequence stopping); anything else goes to transformers' own `_sample` unchanged.

The tokens are those of `_sample`'s greedy search: the same prefill, the same float32 argmax,
finished rows padded with `pad_token_id`, the output cut where every row has ended. On a device
without CUDA graphs the same step runs eagerly (the tests use that to check the bookkeeping).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref

import torch
from transformers import GenerationMixin, StaticCache
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .fused_projections import fused_products_in_trace
from .generation_tempo import is_callers_cache

__all__ = [
    "STOP_CHECK_EVERY",
    "graphed_greedy_search",
    "release_graphed_decoding",
    "release_stale_graphed_decoding",
    "wants_graphed_decoding",
]

logger = logging.get_logger(__name__)

# Replays between two looks at the device for "has every row ended?". A look costs a sync (the CPU
# waits for the GPU to drain); running past the end costs at most this many wasted steps, whose
# tokens are cut off (they are pad tokens).
STOP_CHECK_EVERY = 16
_ATTENTIONS_WITH_BOOL_MASKS = ("sdpa", "tempo_decode_sdpa")


def wants_graphed_decoding(decoder, generation_config, kwargs: dict) -> bool:
    """Whether `TempoForConditionalGeneration.generate` should hand `graphed_greedy_search` to
    transformers: a CUDA decoder with a static cache, greedy search, no custom loop or assistant
    of the caller's. (The loop itself checks the rest and falls back to `_sample`.) A setting of
    `graphed_decoding` that means nothing fails here, on any device, before decoding starts."""
    mode = getattr(decoder, "graphed_decoding", True)
    if mode not in (False, "eager"):
        _compile_mode(mode)
    if decoder.device.type != "cuda" or not mode:
        return False
    if any(kwargs.get(name) is not None for name in ("custom_generate", "assistant_model", "streamer")):
        return False
    config = kwargs.get("generation_config") or generation_config

    def setting(name, default=None):
        return kwargs[name] if name in kwargs else getattr(config, name, default)

    static = setting("cache_implementation") == "static" or isinstance(kwargs.get("cache"), StaticCache)
    greedy = not setting("do_sample", False) and (setting("num_beams", 1) or 1) == 1
    return static and greedy and (setting("num_return_sequences", 1) or 1) == 1


def graphed_greedy_search(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
):
    """Greedy search with the decoding step in a CUDA graph (see the module docstring)."""
    plan = _plan(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs)
    if plan is None:
        return GenerationMixin._sample(
            model, input_ids, logits_processor, stopping_criteria, generation_config,
            synced_gpus=synced_gpus, streamer=streamer, **model_kwargs,
        )
    max_length, eos = plan
    new_tokens = max_length - input_ids.shape[1]
    # A cache the caller gave (already filled) or asks back is the caller's: decode in it, keep nothing.
    cache = model_kwargs["cache"]
    asked_back = generation_config.return_dict_in_generate or is_callers_cache(cache)
    keep = not (asked_back or cache.is_initialized)
    with _kept_stepper(model, model_kwargs, input_ids.shape[0], eos, keep) as stepper:
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        first = outputs.logits[:, -1].to(dtype=torch.float32).argmax(-1)
        del outputs
        stepper.start(first, model_kwargs, eos, generation_config._pad_token_tensor)
        produced = _decode(stepper, new_tokens, eos)
        tokens = _cut_after_last_end(stepper.tokens(produced), eos).clone()
    sequences = torch.cat([input_ids, tokens.to(input_ids.device)], dim=-1)
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, cache=model_kwargs.get("cache"))
    return sequences


def _decode(stepper: _GreedyStepper, new_tokens: int, eos) -> int:
    """Replay steps until `new_tokens` are out or every row has ended; returns the steps taken + 1."""
    produced = 1
    while produced < new_tokens:
        looks = produced == 1 or produced % STOP_CHECK_EVERY == 0
        if eos is not None and looks and not bool(stepper.unfinished.any()):
            break
        stepper.step()
        produced += 1
    return produced


@contextlib.contextmanager
def _kept_stepper(model, model_kwargs: dict, batch_size: int, eos, keep: bool):
    """The stepper (buffers, static cache and CUDA graph) of `model`'s last call when it fits this
    call, else a new one, which is kept for the next call once this one succeeds.

    Why keep it: capturing the step runs the decoder's Python twice (a warm-up and the capture)
    and took 0.10-0.19 s per call on one H200, more than the graph saves over a 32-token answer. A
    kept stepper reuses its graph, and with it its static cache: transformers' fresh cache for this
    call is swapped for the kept one (reset) before the prefill, and, being allocated lazily, never
    takes memory. So the model holds one static cache between calls (about 1.3 GB for Tempo-6B at
    8k tokens) until a call with another batch size or cache length replaces it, or
    `graphed_decoding` is turned off (`release_graphed_decoding`); a stepper only fits while the
    decoder's weights stay where its graph reads them. A call from a second thread while one decodes,
    or one with `keep` False, gets a stepper of its own for that call only, which captures the eager
    kernels: compiling takes seconds, more than it saves on one answer.
    """
    cache = model_kwargs["cache"]
    lock = _LOCKS.setdefault(model, threading.Lock())
    if not keep or not lock.acquire(blocking=False):
        yield _GreedyStepper(model, cache, batch_size, kept=False)
        return
    try:
        kept = model.__dict__.get(_KEPT)
        if kept is not None and kept.fits(model, cache, batch_size, eos):
            kept.cache.reset()
            model_kwargs["cache"] = kept.cache
            yield kept
            return
        model.__dict__.pop(_KEPT, None)  # free the old graph and cache before this call's prefill
        stepper = _GreedyStepper(model, cache, batch_size)
        yield stepper
        model.__dict__[_KEPT] = stepper
    finally:
        lock.release()


def release_graphed_decoding(model) -> None:
    """Drop the decoding graph and static cache kept on `model` (the decoder `generate` runs)."""
    with _LOCKS.setdefault(model, threading.Lock()):
        model.__dict__.pop(_KEPT, None)


def release_stale_graphed_decoding(model) -> None:
    """Drop the stepper kept on `model` once no call can use it: graphed decoding turned off, or the
    decoder moved to another device (its static cache would hold GPU memory for nothing)."""
    kept = model.__dict__.get(_KEPT)
    if kept is not None and (not getattr(model, "graphed_decoding", True) or kept.token.device != model.device):
        release_graphed_decoding(model)


_KEPT = "_graphed_decoding_stepper"  # in the decoder's __dict__: not a submodule, not in state_dict
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> the lock of its kept stepper


def _addresses(model) -> tuple[int, ...]:
    """Where `model`'s weights and buffers live: a captured graph reads them there."""
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def _plan(model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs):
    """(max_length, end-of-sequence ids or None) when this loop computes what `_sample` would; else None."""
    if synced_gpus or streamer is not None or len(logits_processor) or generation_config.do_sample:
        return None
    if generation_config.return_dict_in_generate and any(
        getattr(generation_config, name, False)
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    ):
        return None
    if model.config._attn_implementation not in _ATTENTIONS_WITH_BOOL_MASKS or not model_kwargs.get("use_cache"):
        return None
    cache = model_kwargs.get("cache")
    if not isinstance(cache, StaticCache) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    max_length, eos = None, None
    for criterion in stopping_criteria:
        if isinstance(criterion, MaxLengthCriteria):
            max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
        elif isinstance(criterion, EosTokenCriteria):
            eos = criterion.eos_token_id
        else:
            return None  # a stop string, a time limit, a caller's criterion: per-step Python
    if max_length is None or (eos is not None and generation_config._pad_token_tensor is None):
        return None
    return max_length, eos


class _GreedyStepper:
    """The static buffers of one decoding step and, on CUDA, the graph that replays it.

    Every input of the step lives in a buffer the step itself advances: the last token, its
    position, the attention mask over the cache's slots (the new slot is switched on before the
    forward), which rows are still going, and the output row it writes its token to.
    """

    def __init__(self, model, cache: StaticCache, batch_size: int, kept: bool = True):
        self.model, self.cache = model, cache
        device = model.device
        slots = cache.get_max_length()
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch_size, 1, 1, slots, dtype=torch.bool, device=device)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.output = torch.zeros(batch_size, slots + 1, dtype=torch.long, device=device)
        self.written = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.eos = torch.zeros(0, dtype=torch.long, device=device)
        self.graph = None
        self.use_graph = device.type == "cuda"
        # What the graph records: the step compiled by inductor (True), or its eager kernels ("eager").
        self.mode = getattr(model, "graphed_decoding", True)
        self.addresses = _addresses(model)
        self.compile_step = _compiles_step(device, self.mode, kept)
        self._run = self._step
        self.batch_size, self.has_eos = batch_size, None

    def __deepcopy__(self, memo):
        return None  # a copy of the model starts without a kept stepper (a CUDA graph cannot be copied)

    def fits(self, model, cache: StaticCache, batch_size: int, eos) -> bool:
        """Whether this stepper (captured or not) can decode a call with these settings."""
        return (
            self.model is model
            and self.mode == getattr(model, "graphed_decoding", True)
            and self.addresses == _addresses(model)  # not moved, cast, reloaded or fused since
            and self.token.device == model.device
            and self.batch_size == batch_size
            and self.cache.get_max_length() == cache.get_max_length()
            and self.cache.is_initialized
            and self.has_eos == (eos is not None)
            and (eos is None or self.eos.numel() == eos.numel())
        )

    def start(self, first: torch.Tensor, model_kwargs: dict, eos: torch.Tensor | None, pad) -> None:
        """Load the buffers for a new prompt from the prefill (the cache holds the prompt)."""
        attention_mask = model_kwargs.get("attention_mask")
        prompt = self.cache.get_seq_length()
        prompt = int(prompt) if isinstance(prompt, torch.Tensor) else prompt
        self.mask.zero_()
        if attention_mask is None:
            self.mask[..., :prompt] = True
        else:
            self.mask[:, 0, 0, :prompt] = attention_mask[:, -prompt:].to(self.mask.device, torch.bool)
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            self.position.copy_(positions[:, -1:].to(self.position.device) + 1)
        else:
            self.position.fill_(prompt)
        if eos is not None:
            eos = eos.to(self.token.device).flatten()
            if self.graph is None:
                self.eos = eos
            else:
                self.eos.copy_(eos)  # the graph reads this buffer
            self.pad.fill_(int(pad))
        self.has_eos = eos is not None
        self.unfinished.fill_(True)
        self.written.zero_()
        self._take(first)

    def step(self) -> None:
        if self.use_graph and self.graph is None:
            try:
                self._capture()  # at the first step: a one-token answer needs no graph
            except RuntimeError as error:  # a kernel that cannot be captured: same steps, run eagerly
                self.use_graph = False
                _warn_once(f"decoding without a CUDA graph: capturing the decoding step failed ({error})")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()

    def tokens(self, count: int) -> torch.Tensor:
        return self.output[:, :count]

    # -- the step -------------------------------------------------------------------------
    def _take(self, token: torch.Tensor) -> None:
        """Record `token` (B,) as this step's output and the next step's input."""
        if self.has_eos:
            token = torch.where(self.unfinished, token, self.pad)
            self.unfinished &= ~torch.isin(token, self.eos)
        self.token.copy_(token[:, None])
        self.output.index_copy_(1, self.written, token[:, None])
        self.written += 1

    def _step(self) -> None:
        first_layer = self.cache.layers[0]
        self.mask.index_fill_(3, first_layer.cumulative_length.view(1).to(self.mask.device), True)
        decoder = self.model.model
        hidden = decoder(
            input_ids=self.token,
            attention_mask={"full_attention": self.mask},
            position_ids=self.position,
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])
        self._take(logits.to(torch.float32).argmax(-1))
        self.position += 1

    def _capture(self) -> None:
        """Warm the step up on a side stream, undo what it changed, then capture it."""
        saved = [self._state(), [layer.cumulative_length.clone() for layer in self.cache.layers]]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(saved)
        torch.cuda.current_stream().wait_stream(stream)
        # The calls `torch.cuda.graph(...)` makes, minus what it does on entry: it empties torch's GPU
        # and pinned-host memory caches (and older torch runs `gc.collect()`), so every later allocation
        # of the process would go back to the driver.
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            # A private memory pool, so that graphs of other threads cannot share it, and errors for
            # this thread only: another thread's sync or allocation must not break this capture.
            _clear_cublas_workspaces()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                with fused_products_in_trace(self.model):  # the compiled code is guarded on it
                    self._run()
            finally:
                graph.capture_end()
                _clear_cublas_workspaces()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(*saved)  # capturing records the kernels without running them; be sure anyway
        self.graph = graph

    def _warm_up(self, saved) -> None:
        """Run the step once as it will be captured (compiling it first, see `compile_step`), then
        undo what it changed.

        Why compile: replayed eagerly, a step of the 4B decoder is about 2.8 ms of matmuls and
        attention plus about 1,270 small element-wise kernels (RMSNorm in pieces, rotary, SiLU,
        residual adds, casts) that take about 4 ms more (profiled on one H200: 125 tokens/s unfused,
        139 with fused projections). Inductor fuses them: 205 tokens/s against 142 for the eager
        capture in one run on the same machine kind. The first call of each stepper pays the
        compilation; if it fails, the eager kernels are captured instead, with one warning.
        """
        if self.compile_step:
            # torch's automatic dynamic shapes (not `dynamic=False`): the first batch size and cache
            # length compile static; a size that changes later recompiles once, made symbolic, and
            # later values reuse that. Static-only, every new shape compiled again, which `tempo
            # batch` paid on each odd-sized last batch: 0.89 videos/s at batch 4 on one H200.
            self._run = torch.compile(self._step, mode=_compile_mode(self.mode))
            try:
                with fused_products_in_trace(self.model):
                    self._run()
            except Exception as error:  # noqa: BLE001 - any compiler failure: capture the eager step
                self._run = self._step
                self._restore(*saved)
                _warn_once(f"capturing the decoding step without compiling it: compiling failed ({error})")
        if self._run == self._step:  # not compiled, or compiling failed
            self._run()
        self._restore(*saved)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        """What a step changes besides the cache."""
        return self.token, self.position, self.mask, self.unfinished, self.output, self.written

    def _state(self):
        return [buffer.clone() for buffer in self._buffers()]

    def _restore(self, state, lengths) -> None:
        for buffer, value in zip(self._buffers(), state):
            buffer.copy_(value)
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS's per-stream workspaces, around a capture (as torch's own CUDA-graph trees do).

    cuBLAS allocates one workspace per stream on first use and keeps it. The warm-up runs on the
    capture stream outside the capture, so without this the graph would record products that write
    to a workspace from the ordinary memory pool, which it does not own: torch's CUDA-graph trees
    (transformers' compiled static-cache loop uses them) free every workspace whenever they record,
    and a later replay would write to freed memory. A GPU test that ran that loop between our capture
    and replay failed so (a CUDA illegal memory access on one H200) and passes with this. Cleared
    before the capture, the products get a workspace from the graph's private pool, which lives as
    long as the graph; cleared after, later work on the stream gets one of its own."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # absent from CPU-only builds
    if clear is not None:
        clear()


def _compiles_step(device: torch.device, mode, kept: bool) -> bool:
    """Whether a stepper compiles its step before capturing it: on CUDA (the only device it
    captures on), unless asked for the eager kernels or used for one call only (compiling takes
    seconds, more than it saves on one answer)."""
    return device.type == "cuda" and mode != "eager" and kept


def _compile_mode(mode) -> str | None:
    """The `torch.compile` mode for the step: `graphed_decoding = True` is inductor's default, a
    string names a mode (e.g. "max-autotune-no-cudagraphs": inductor benchmarks kernel choices for
    the step's fused kernels; the products in the matrix-vector kernel are outside its choice).
    Modes that capture CUDA graphs themselves cannot be nested in this graph."""
    if mode is True:
        return None
    if mode not in ("default", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"graphed_decoding={mode!r}: expected True, 'eager', 'default' or a torch.compile mode without "
            "CUDA graphs such as 'max-autotune-no-cudagraphs' (the step is captured as a CUDA graph already)"
        )
    return mode


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _cut_after_last_end(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """Drop the steps after every row has ended, as `_sample` stops there (finished rows hold pads)."""
    if eos is None or tokens.shape[1] == 0:
        return tokens
    ended = torch.isin(tokens, eos.to(tokens.device)).cumsum(1) > 0  # (B, T): ended at or before t
    all_ended = ended.all(0)
    if not bool(all_ended.any()):
        return tokens
    return tokens[:, : int(all_ended.nonzero()[0, 0]) + 1]
