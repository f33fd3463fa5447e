"""The graphed greedy loop (`graphed_decoding.graphed_greedy_search`) against transformers' own.

On the CPU the step runs eagerly, which checks everything but the capture: the buffers, positions,
the attention mask over the static cache's slots, end-of-sequence padding and the final cut.
"""

import contextlib
import copy
import operator

import pytest
import torch

from transformers_tempo import fused_projections, graphed_decoding
from transformers_tempo.graphed_decoding import (
    STOP_CHECK_EVERY,
    graphed_greedy_search,
    release_graphed_decoding,
    wants_graphed_decoding,
)

GREEDY = {"do_sample": False, "cache_implementation": "static"}


@pytest.fixture
def steppers(monkeypatch):
    """The `_GreedyStepper`s the graphed loop makes (none when it falls back to transformers' loop)."""
    made = []
    original = graphed_decoding._GreedyStepper.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(graphed_decoding._GreedyStepper, "__init__", record)
    return made


@pytest.fixture
def both(steppers):
    def run(model, inputs, **gen):
        release_graphed_decoding(model.plain_decoder())  # no stepper kept from an earlier test
        steppers.clear()
        reference = model.generate(**inputs, **GREEDY, **gen)
        assert not steppers  # the reference is transformers' own loop (on the CPU generate never picks ours)
        graphed = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, **gen)
        return reference, graphed, (steppers[-1] if steppers else None)

    return run


@pytest.mark.parametrize("samples", [[2], [2, 1], [1, 3, 0]])
def test_same_tokens_as_transformers_greedy(tiny_model, hand_inputs, both, samples):
    inputs = hand_inputs(samples).model_inputs()
    reference, graphed, stepper = both(tiny_model, inputs, max_new_tokens=STOP_CHECK_EVERY + 5, eos_token_id=None)
    assert stepper is not None  # the graphed loop ran (no silent fallback)
    assert graphed.shape == reference.shape == (len(samples), inputs["input_ids"].shape[1] + STOP_CHECK_EVERY + 5)
    assert torch.equal(graphed, reference)


def test_end_of_sequence_pads_and_cuts_like_transformers(tiny_model, hand_inputs, both):
    inputs = hand_inputs([2, 1, 1]).model_inputs()
    prompt = inputs["input_ids"].shape[1]
    free = tiny_model.generate(**inputs, **GREEDY, max_new_tokens=24, eos_token_id=None)[:, prompt:]
    # an end token that row 0 produces early and the other rows later or never
    eos = int(free[0, 2])
    reference, graphed, stepper = both(tiny_model, inputs, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    assert stepper is not None
    assert torch.equal(graphed, reference)
    first_end = int((free[0] == eos).nonzero()[0, 0])
    assert int(graphed[0, prompt + first_end]) == eos
    assert bool((graphed[0, prompt + first_end + 1 :] == 0).all())  # row 0 padded after its end token


def test_every_row_ending_stops_early(tiny_model, hand_inputs, both):
    inputs = hand_inputs([2]).model_inputs()
    prompt = inputs["input_ids"].shape[1]
    free = tiny_model.generate(**inputs, **GREEDY, max_new_tokens=8, eos_token_id=None)[:, prompt:]
    eos = int(free[0, 3])
    first = int((free[0] == eos).nonzero()[0, 0])
    reference, graphed, _ = both(tiny_model, inputs, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
    assert graphed.shape[1] == prompt + first + 1 == reference.shape[1]
    assert torch.equal(graphed, reference)


def test_return_dict_carries_sequences_and_cache(tiny_model, hand_inputs, both):
    inputs = hand_inputs([1]).model_inputs()
    reference, graphed, _ = both(tiny_model, inputs, max_new_tokens=6, return_dict_in_generate=True, eos_token_id=None)
    assert torch.equal(graphed.sequences, reference.sequences)
    assert graphed.cache is not None
    assert torch.equal(graphed.token_allocation, reference.token_allocation)


def test_per_step_python_falls_back_to_transformers(tiny_model, hand_inputs, both):
    """Logits processors (here a repetition penalty) need Python per step: transformers' loop runs."""
    inputs = hand_inputs([2]).model_inputs()
    reference, graphed, stepper = both(tiny_model, inputs, max_new_tokens=6, repetition_penalty=1.5, eos_token_id=None)
    assert stepper is None
    assert torch.equal(graphed, reference)


class _Decoder:
    def __init__(self, device="cuda", graphed=True):
        self.device = torch.device(device)
        self.graphed_decoding = graphed


@pytest.mark.parametrize(
    "decoder, kwargs, expected",
    [
        (_Decoder(), {"cache_implementation": "static"}, True),
        (_Decoder(), {}, False),  # dynamic cache: nothing to capture
        (_Decoder("cpu"), {"cache_implementation": "static"}, False),
        (_Decoder(graphed=False), {"cache_implementation": "static"}, False),
        (_Decoder(), {"cache_implementation": "static", "do_sample": True}, False),
        (_Decoder(), {"cache_implementation": "static", "num_beams": 2}, False),
        (_Decoder(), {"cache_implementation": "static", "custom_generate": "someone/loop"}, False),
        (_Decoder(), {"cache_implementation": "static", "streamer": object()}, False),
    ],
)
def test_when_generate_picks_the_graphed_loop(tiny_model, decoder, kwargs, expected):
    assert wants_graphed_decoding(decoder, tiny_model.generation_config, kwargs) is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_transformers_loop(tokenizer, hand_inputs, steppers):
    from transformers_tempo.testing_utils import build_tiny_model

    model = build_tiny_model(tokenizer).to("cuda")
    inputs = {k: v.to("cuda") for k, v in hand_inputs([2, 1]).model_inputs().items()}
    model.graphed_decoding = False
    reference = model.generate(**inputs, **GREEDY, max_new_tokens=20)
    assert not steppers
    model.graphed_decoding = True
    for _ in range(2):  # the graph captured by the first call is replayed by the second
        graphed = model.generate(**inputs, **GREEDY, max_new_tokens=20)
        assert steppers[-1].graph is not None
        assert torch.equal(graphed, reference)
    assert len(steppers) == 1
    other = {k: v.to("cuda") for k, v in hand_inputs([1]).model_inputs().items()}  # another batch size
    model.graphed_decoding = False
    expected = model.generate(**other, **GREEDY, max_new_tokens=20)
    model.graphed_decoding = True
    assert torch.equal(model.generate(**other, **GREEDY, max_new_tokens=20), expected)
    assert len(steppers) == 2 and steppers[-1].graph is not None


def test_a_failed_capture_decodes_eagerly_with_one_warning(tiny_model, hand_inputs, monkeypatch, caplog):
    """If the step cannot be captured, the same steps run without a graph, and that is said once."""
    import logging

    original = graphed_decoding._GreedyStepper.__init__

    def pretend_cuda(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.use_graph = True

    def fail(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed_decoding._GreedyStepper, "__init__", pretend_cuda)
    monkeypatch.setattr(graphed_decoding._GreedyStepper, "_capture", fail)
    monkeypatch.setattr(graphed_decoding, "_WARNED", set())
    inputs = hand_inputs([2, 1]).model_inputs()
    reference = tiny_model.generate(**inputs, **GREEDY, max_new_tokens=9)
    with caplog.at_level(logging.WARNING, logger="transformers_tempo.graphed_decoding"):
        for _ in range(2):
            graphed = tiny_model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=9)
            assert torch.equal(graphed, reference)
    warnings = [r.getMessage() for r in caplog.records if "without a CUDA graph" in r.getMessage()]
    expected = "decoding without a CUDA graph: capturing the decoding step failed (operation not permitted when stream is capturing)"
    assert warnings == [expected]


def kept(model):
    return model.plain_decoder().__dict__.get(graphed_decoding._KEPT)


def test_the_stepper_and_its_cache_are_kept_for_the_next_call(tiny_model, hand_inputs, steppers):
    """The second call of the same shape reuses the first call's stepper and static cache (reset),
    gives transformers' tokens again, and does not change what the first call returned."""
    model = copy.deepcopy(tiny_model)
    inputs = hand_inputs([2, 1]).model_inputs()
    other = hand_inputs([1, 3]).model_inputs()
    expected = [model.generate(**x, **GREEDY, max_new_tokens=7) for x in (inputs, other)]
    first = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=7)
    stepper = kept(model)
    assert stepper is not None and steppers == [stepper]
    second = model.generate(**other, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=7)
    assert steppers == [stepper] and kept(model) is stepper  # same batch size and cache length
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])


def test_another_shape_replaces_the_kept_stepper_and_turning_off_releases_it(tiny_model, hand_inputs, steppers):
    model = copy.deepcopy(tiny_model)
    model.generate(**hand_inputs([2, 1]).model_inputs(), **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    single = hand_inputs([2]).model_inputs()
    expected = model.generate(**single, **GREEDY, max_new_tokens=5)
    assert torch.equal(model.generate(**single, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5), expected)
    assert len(steppers) == 2 and kept(model) is steppers[1]
    model.graphed_decoding = "eager"  # another kind of graph: not the kept one
    assert torch.equal(model.generate(**single, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5), expected)
    assert len(steppers) == 3 and kept(model) is steppers[2] and steppers[2].mode == "eager"
    model.graphed_decoding = False
    model.generate(**single, **GREEDY, max_new_tokens=5)
    assert kept(model) is None


def test_a_cache_asked_back_is_not_kept(tiny_model, hand_inputs, steppers):
    model = copy.deepcopy(tiny_model)
    inputs = hand_inputs([2]).model_inputs()
    out = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5, return_dict_in_generate=True)
    assert kept(model) is None and len(steppers) == 1
    again = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    assert kept(model) is not None and kept(model).cache is not out.cache  # the returned cache stays the caller's
    assert torch.equal(again, out.sequences)


@pytest.fixture
def cpu_stepper(tiny_model, hand_inputs):
    """A stepper after a prefill, on the CPU, and the state its warm-up must leave unchanged."""

    def make(mode=True, pretend_cuda=True, kept=True, batch=1, free_slots=4, model=tiny_model):
        decoder = model.plain_decoder()
        decoder.graphed_decoding = mode
        inputs = hand_inputs([2]).model_inputs()
        embeds = model.prepare_generation_inputs(**inputs).inputs_embeds.expand(batch, -1, -1)
        from transformers import StaticCache

        cache = StaticCache(config=decoder.config, max_cache_len=embeds.shape[1] + free_slots)
        with torch.no_grad():
            logits = decoder(inputs_embeds=embeds, cache=cache, use_cache=True).logits
        stepper = graphed_decoding._GreedyStepper(decoder, cache, batch, kept=kept)
        if pretend_cuda:  # what __init__ decides on a CUDA device
            stepper.compile_step = graphed_decoding._compiles_step(torch.device("cuda"), mode, kept)
        stepper.start(logits[:, -1].argmax(-1), {}, None, None)
        saved = [stepper._state(), [layer.cumulative_length.clone() for layer in cache.layers]]
        return stepper, saved

    return make


def test_the_step_is_compiled_before_capture_unless_eager(cpu_stepper, monkeypatch):
    compiled, ran = [], []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)

        def run():
            ran.append(fn)
            assert fused_projections._TRACE_FUSED  # the trace may take the fused products
            return fn()

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    stepper, saved = cpu_stepper()
    with torch.no_grad():
        stepper._warm_up(saved)
    assert compiled == [{"mode": None}] and ran == [stepper._step]  # warmed up through the compiled step
    assert stepper._run is not stepper._step  # ... which is what the capture records
    for buffer, before in zip(stepper._buffers(), saved[0]):
        assert torch.equal(buffer, before)  # the warm-up leaves no trace
    eager, saved = cpu_stepper("eager")
    with torch.no_grad():
        eager._warm_up(saved)
    assert len(compiled) == 1 and eager._run == eager._step
    assert not cpu_stepper(pretend_cuda=False)[0].compile_step  # on the CPU nothing is compiled
    one_off, saved = cpu_stepper(kept=False)  # a stepper for one call captures the eager kernels
    with torch.no_grad():
        one_off._warm_up(saved)
    assert len(compiled) == 1 and one_off._run == one_off._step
    tuned, saved = cpu_stepper("max-autotune-no-cudagraphs")  # a torch.compile mode is passed on
    with torch.no_grad():
        tuned._warm_up(saved)
    assert compiled[-1] == {"mode": "max-autotune-no-cudagraphs"}


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "fast"])
def test_a_compile_mode_that_captures_graphs_itself_is_refused(cpu_stepper, mode):
    stepper, saved = cpu_stepper(mode)
    with pytest.raises(ValueError, match=f"graphed_decoding='{mode}'"), torch.no_grad():
        stepper._warm_up(saved)


@pytest.mark.parametrize("extra", [{}, {"return_dict_in_generate": True}])
def test_a_graphed_decoding_setting_that_means_nothing_fails_at_generate_on_any_device(tiny_model, hand_inputs, extra):
    """Also where no step would be captured (the CPU, a cache asked back): a typo is not ignored."""
    model = copy.deepcopy(tiny_model)
    model.graphed_decoding = "eagre"
    with pytest.raises(ValueError, match="graphed_decoding='eagre'"), torch.no_grad():
        model.generate(**hand_inputs([2]).model_inputs(), **GREEDY, max_new_tokens=2, **extra)


def test_new_batch_sizes_and_cache_lengths_recompile_the_step_once(cpu_stepper, monkeypatch):
    """`tempo batch` meets a new batch size at every odd-sized last batch: it must not compile each time."""
    from test_fast_paths import counting_backend

    graphs, real_compile = [], torch.compile
    backend = counting_backend(graphs)  # one backend object: compiled code is cached per backend
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=backend, **kwargs))
    torch._dynamo.reset()
    compiled = []
    for batch, free_slots in [(2, 4), (2, 4), (3, 4), (4, 4), (4, 12), (3, 20)]:
        stepper, saved = cpu_stepper(batch=batch, free_slots=free_slots)
        with torch.no_grad():
            stepper._warm_up(saved)
        compiled.append(len(graphs))
    # static first, then once per size that changes (batch, then cache length), made symbolic
    assert compiled == [1, 1, 2, 2, 3, 3]
    torch._dynamo.reset()


def test_only_a_kept_stepper_compiles(tiny_model, hand_inputs, monkeypatch):
    """A call that asks the cache back gets a stepper for itself: it must not compile."""
    made = []
    real_init = graphed_decoding._GreedyStepper.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(kwargs.get("kept", True))

    monkeypatch.setattr(graphed_decoding._GreedyStepper, "__init__", spy)
    inputs = hand_inputs([2]).model_inputs()
    decoder = tiny_model.plain_decoder()
    graphed_decoding.release_graphed_decoding(decoder)
    options = dict(GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=4, eos_token_id=None)
    tiny_model.generate(**inputs, **options, return_dict_in_generate=True)
    tiny_model.generate(**inputs, **options)
    assert made == [False, True]
    graphed_decoding.release_graphed_decoding(decoder)


def test_a_failed_compilation_captures_the_eager_step_with_one_warning(cpu_stepper, monkeypatch, caplog):
    import logging

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no triton")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    monkeypatch.setattr(graphed_decoding, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="transformers_tempo.graphed_decoding"), torch.no_grad():
        for _ in range(2):
            stepper, saved = cpu_stepper()
            stepper._warm_up(saved)
            assert stepper._run == stepper._step
            for buffer, before in zip(stepper._buffers(), saved[0]):
                assert torch.equal(buffer, before)
    warnings = [r.getMessage() for r in caplog.records if "without compiling" in r.getMessage()]
    assert warnings == ["capturing the decoding step without compiling it: compiling failed (inductor: no triton)"]


def test_the_capture_is_fenced_by_clearing_cublas_workspaces(cpu_stepper, monkeypatch):
    """The captured products must get their cuBLAS workspace inside the capture (the graph's own pool),
    not the one the warm-up left on the stream; and later work must not share the graph's."""
    events = []

    class Graph:
        def capture_begin(self, **kwargs):
            events.append("begin")

        def capture_end(self):
            events.append("end")

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(graphed_decoding, "_clear_cublas_workspaces", lambda: events.append("clear"))
    stepper, _ = cpu_stepper("eager")
    monkeypatch.setattr(stepper, "_warm_up", lambda saved: events.append("warm-up"))
    monkeypatch.setattr(stepper, "_run", lambda: events.append("step"))
    stepper._capture()
    assert events == ["warm-up", "clear", "begin", "step", "end", "clear"]
    assert isinstance(stepper.graph, Graph)


def step_both_and_compare(compiled, eager, saved):
    """Warm the compiled stepper up, take three steps with each, and check they advanced alike."""
    with torch.no_grad():
        compiled._warm_up(saved)
        for _ in range(3):
            compiled.step()
            eager.step()
    assert compiled._run is not compiled._step
    assert torch.equal(compiled.tokens(4), eager.tokens(4))
    assert torch.equal(compiled.position, eager.position) and torch.equal(compiled.mask, eager.mask)


def test_the_compiled_step_gives_the_eager_steps_tokens(cpu_stepper):
    """Inductor really compiles the step (on the CPU here) and it advances the buffers as the eager step does."""
    compiled, saved = cpu_stepper()
    eager, _ = cpu_stepper("eager")
    step_both_and_compare(compiled, eager, saved)


def test_the_step_traces_through_the_compiled_decoder(tiny_model, cpu_stepper, monkeypatch):
    """After `compile_decoder` (as `enable_compiled_inference` does), the step's trace runs through the
    compiled norms, MLPs and attention `rotated_states` in one graph and gives the eager step's tokens."""
    from test_fast_paths import counting_backend

    model = copy.deepcopy(tiny_model)
    fused_projections.fuse_projections(model.model.language_model, fused_projections.DECODER_GROUPS)
    graphs, real_compile = [], torch.compile
    backend = counting_backend(graphs)
    torch._dynamo.reset()
    model.model.compile_decoder(backend=backend)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=backend, **kwargs))
    compiled, saved = cpu_stepper(model=model)
    eager, _ = cpu_stepper("eager")
    before = len(graphs)
    step_both_and_compare(compiled, eager, saved)
    step_graph = graphs[before]  # the warm-up's trace of the whole step
    negations = [node for node in step_graph.graph.nodes if node.target in (torch.neg, operator.neg)]
    assert len(negations) == 2 * model.config.text_config.num_hidden_layers  # query and key rotary, every layer
    torch._dynamo.reset()


def test_a_cache_the_caller_passes_stays_the_callers(tiny_model, hand_inputs, steppers):
    from transformers import StaticCache

    model = copy.deepcopy(tiny_model)
    inputs = hand_inputs([2]).model_inputs()
    model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    before = kept(model)
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=5)
    decoder = model.plain_decoder()
    mine = StaticCache(config=decoder.config, max_cache_len=before.cache.get_max_length())
    out = model.generate(**inputs, do_sample=False, custom_generate=graphed_greedy_search, max_new_tokens=5, cache=mine)
    assert torch.equal(out, expected)
    assert mine.is_initialized and kept(model) is before and before.cache is not mine  # filled, not swapped, not kept


def test_moved_weights_get_a_new_stepper(tiny_model, hand_inputs, steppers):
    model = copy.deepcopy(tiny_model)
    inputs = hand_inputs([2]).model_inputs()
    first = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    model.to(torch.float64).to(torch.float32)  # same values, new storage: a captured graph would read freed memory
    again = model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    assert len(steppers) == 2 and kept(model) is steppers[1]
    assert torch.equal(first, again)


def test_a_stepper_no_call_can_use_is_released(tiny_model, hand_inputs, steppers):
    model = copy.deepcopy(tiny_model)
    inputs = hand_inputs([2]).model_inputs()
    model.generate(**inputs, **GREEDY, custom_generate=graphed_greedy_search, max_new_tokens=5)
    model.generate(**inputs, do_sample=True, max_new_tokens=3)  # another kind of call keeps it
    stepper = kept(model)
    assert stepper is not None
    stepper.token = stepper.token.to("meta")  # as if the decoder had moved to another device since
    model.generate(**inputs, do_sample=True, max_new_tokens=3)
    assert kept(model) is None


def test_pipeline_questions_reuse_the_kept_stepper(tiny_model_dir, tmp_path, steppers, monkeypatch):
    """Questions through the pipeline keep one stepper (and on a GPU its compiled, captured step):
    the pipeline must not ask `generate` for the cache back. The loop is selected as on a GPU."""
    from transformers import pipeline

    from transformers_tempo import modeling_tempo
    from transformers_tempo.synthetic import write_test_video

    monkeypatch.setattr(modeling_tempo, "wants_graphed_decoding", lambda decoder, config, kwargs: True)
    video = write_test_video(tmp_path / "clip.mp4", num_frames=60, fps=10, width=128, height=96)
    vqa = pipeline("video-question-answering", model=str(tiny_model_dir))
    options = dict(max_new_tokens=4, cache_implementation="static", do_sample=False)
    answers = [vqa(video=str(video), question=q, **options)["answer"] for q in ("What happens?", "Who is there?")]
    assert len(steppers) == 1 and kept(vqa.model) is steppers[0]
    monkeypatch.setattr(modeling_tempo, "wants_graphed_decoding", lambda decoder, config, kwargs: False)
    assert answers == [vqa(video=str(video), question=q, **options)["answer"] for q in ("What happens?", "Who is there?")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kept_graph_survives_cublas_workspaces_being_freed(tokenizer, hand_inputs, steppers):
    """torch's CUDA-graph trees (transformers' compiled static-cache loop) free cuBLAS's workspaces
    each time they record: a kept decoding graph must not be writing to one of them."""
    from transformers_tempo.testing_utils import build_tiny_model

    model = build_tiny_model(tokenizer).to("cuda")
    model.graphed_decoding = "eager"  # the same products, without the compilation's time
    inputs = {k: v.to("cuda") for k, v in hand_inputs([2, 1]).model_inputs().items()}
    first = model.generate(**inputs, **GREEDY, max_new_tokens=12)
    assert len(steppers) == 1 and steppers[0].graph is not None
    torch._C._cuda_clearCublasWorkspaces()  # what a recording of CUDA-graph trees does
    torch.cuda.empty_cache()
    filler = torch.full((256 << 20,), 255, dtype=torch.uint8, device="cuda")  # take the freed memory
    again = model.generate(**inputs, **GREEDY, max_new_tokens=12)  # replays the kept graph
    torch.cuda.synchronize()
    assert len(steppers) == 1 and torch.equal(again, first)
    del filler


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_inference_on_gpu_gives_the_plain_tokens(tokenizer, hand_inputs, steppers):
    """`enable_compiled_inference` as `tempo --compile` uses it: compiled compressor and norms, fused
    projections traced into the compiled, captured step; the same greedy tokens as the plain model."""
    from transformers_tempo.testing_utils import build_tiny_model

    plain = build_tiny_model(tokenizer).to("cuda")
    plain.graphed_decoding = False
    model = copy.deepcopy(plain)
    model.graphed_decoding = True
    model.enable_compiled_inference()
    for samples in ([2, 1], [1, 3]):  # the second call reuses the first call's graph
        inputs = {k: v.to("cuda") for k, v in hand_inputs(samples).model_inputs().items()}
        expected = plain.generate(**inputs, **GREEDY, max_new_tokens=12)
        assert torch.equal(model.generate(**inputs, **GREEDY, max_new_tokens=12), expected)
    assert len(steppers) == 1 and steppers[0].graph is not None and steppers[0].compile_step
