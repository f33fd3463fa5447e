"""Compressing segments while the file still decodes gives what the plain path gives."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from transformers_tempo import TempoProcessor, TempoVideoProcessor, streaming
from transformers_tempo.processing_tempo import PendingVideo
from transformers_tempo.synthetic import decode_frame_index, write_damaged_copy, write_test_video
from transformers_tempo.video_loading import FramesReady, VideoLoadError, load_video

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def processor(tokenizer):
    return TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 12 s at 30 fps, a keyframe every 12 frames: 24 sampled frames, 3 segments; several workers
    return write_test_video(
        tmp_path_factory.mktemp("s") / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12
    )


def plain(model, processor, video, **options):
    inputs = processor(text=QUESTION, videos=video, return_tensors="pt", **options)
    with torch.inference_mode():
        compressed = model.compress(
            inputs["compressor_input_ids"],
            inputs["compressor_attention_mask"],
            pixel_values_videos=inputs["pixel_values_videos"],
            video_grid_thw=inputs["video_grid_thw"],
        )
    return inputs, compressed


def assert_same_as_plain(streamed, inputs, compressed):
    assert set(streamed.inputs) == set(inputs) - {"pixel_values_videos"}
    for key, value in streamed.inputs.items():
        assert torch.equal(value, inputs[key]), key
    torch.testing.assert_close(streamed.compressed.features, compressed.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.compressed.relevance_scores, compressed.relevance_scores, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def plain_clip(tiny_model, processor, clip):
    """The plain path's inputs and compression of `clip` (the same for every streaming setting)."""
    return plain(tiny_model, processor, str(clip))


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("chunk", [1, 2, 32])
def test_streamed_compression_equals_the_plain_path(tiny_model, processor, clip, plain_clip, workers, chunk):
    inputs, compressed = plain_clip
    streamed = streaming.compress_streaming(
        tiny_model, processor, str(clip), QUESTION, compressor_batch_size=chunk, num_workers=workers
    )
    assert_same_as_plain(streamed, inputs, compressed)
    assert streamed.video.stats["workers"] == workers
    assert streamed.stats["segments"] == 3 and streamed.stats["recompressed"] == 0
    assert torch.equal(streamed.video.frames, load_video(str(clip)).frames)


def test_generate_streaming_gives_the_plain_answer_and_allocation(tiny_model, processor, clip):
    options = {"visual_token_budget": 20, "min_tokens_per_segment": 4, "max_new_tokens": 6, "do_sample": False}
    inputs = processor(text=QUESTION, videos=str(clip), return_tensors="pt")
    expected = tiny_model.generate(**inputs, return_dict_in_generate=True, **options)
    got = streaming.generate_streaming(
        tiny_model, processor, str(clip), QUESTION, compressor_batch_size=2, load_options={"num_workers": 2},
        return_dict_in_generate=True, **options,
    )
    # given input_ids, generate returns them first; streaming returns the new tokens only
    assert torch.equal(got.sequences, expected.sequences[:, inputs["input_ids"].shape[1] :])
    assert torch.equal(got.token_allocation, expected.token_allocation)
    assert got.token_allocation.sum() == 20  # the budget reached generate through the ATA options
    torch.testing.assert_close(got.relevance_scores, expected.relevance_scores)


def test_compression_starts_before_the_last_frame(tiny_model, processor, clip, monkeypatch):
    """Decoding is held after the first two segments until the compressor has run on them: the
    compressor must therefore work while the file is still decoding."""
    compressed_rows = []
    compressed_once = threading.Event()
    real_compress = type(tiny_model).compress

    def spy_compress(self, *args, **kwargs):
        out = real_compress(self, *args, **kwargs)
        compressed_rows.append(out.features.shape[0])
        compressed_once.set()
        return out

    real_load = streaming.load_video
    held = {"frames": 0, "waited": None}

    def slow_load(video, on_frames=None, **kwargs):
        def report(event):
            on_frames(event)
            held["frames"] += len(event.slots)
            if held["frames"] >= 16 and held["waited"] is None:
                held["waited"] = compressed_once.wait(timeout=60)

        return real_load(video, on_frames=report, **kwargs)

    monkeypatch.setattr(type(tiny_model), "compress", spy_compress)
    monkeypatch.setattr(streaming, "load_video", slow_load)
    streamed = streaming.compress_streaming(tiny_model, processor, str(clip), QUESTION, compressor_batch_size=2)
    assert held["waited"] is True
    assert streamed.stats["compressed_while_decoding"] == 2
    assert compressed_rows == [2, 1]  # always whole chunks, the last one excepted


def test_segments_whose_frames_change_after_compression_are_compressed_again(tiny_model, processor):
    frames = torch.zeros(20, 48, 64, 3, dtype=torch.uint8)
    segments = streaming._Segments(
        tiny_model, processor, QUESTION, FramesReady(frames, [], 2.0), chunk=2, per_segment=8, device=torch.device("cpu")
    )
    assert segments.num_segments == 3 and segments.missing == [8, 8, 4]
    segments.frames_written(list(range(8)) + [8, 8, 9])  # a repeated report counts once
    assert segments.ready == {0} and segments.missing[1] == 6
    segments.compress([0])
    before = segments.features[0].clone()
    frames[3] = 255  # frame 3 is replaced (a repair at the end of decoding) and reported again
    segments.frames_written([3])
    assert segments.stale == {0} and segments.ready == set()
    segments.frames_written(list(range(10, 20)))
    segments.finish()
    assert segments.recompressed == 1 and segments.done == {0, 1, 2}
    assert not torch.equal(segments.features[0], before)
    _, compressed = plain(tiny_model, processor, frames, video_metadata={"fps": 2.0})
    torch.testing.assert_close(segments.features, compressed.features, rtol=1e-5, atol=1e-5)


def test_damaged_file_streams_to_the_plain_result(tiny_model, processor, tmp_path):
    # Zeroed packets a third of the way in: decoding stops there; later ranges are dropped and
    # their frames replaced by the last good one, after some may have been compressed.
    path = write_test_video(tmp_path / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12)
    broken = write_damaged_copy(path, tmp_path / "broken.mp4")
    inputs, compressed = plain(tiny_model, processor, str(broken))
    streamed = streaming.compress_streaming(
        tiny_model, processor, str(broken), QUESTION, compressor_batch_size=1, num_workers=3
    )
    assert_same_as_plain(streamed, inputs, compressed)
    assert any("could not be decoded" in w for w in streamed.video.warnings)


def test_frames_given_directly_stream_at_once(tiny_model, processor):
    frames = torch.randint(0, 256, (13, 40, 56, 3), dtype=torch.uint8)  # 2 segments, the last odd-length
    inputs, compressed = plain(tiny_model, processor, frames, video_metadata={"fps": 1.5})
    streamed = streaming.compress_streaming(
        tiny_model, processor, frames, QUESTION, video_metadata={"fps": 1.5}, compressor_batch_size=1
    )
    assert_same_as_plain(streamed, inputs, compressed)
    assert streamed.stats["compressed_while_decoding"] == 2  # both segments are complete at the first report


def test_unreadable_videos_raise_and_leave_no_thread(tiny_model, processor, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 100)
    for bad, match in ((tmp_path / "missing.mp4", "missing.mp4"), (corrupt, "corrupt.mp4")):
        before = threading.active_count()
        with pytest.raises(ValueError, match=match) as info:
            streaming.compress_streaming(tiny_model, processor, str(bad), QUESTION)
        assert isinstance(info.value.__cause__, VideoLoadError)
        assert threading.active_count() == before


def test_a_failure_while_compressing_stops_the_decoders(tiny_model, processor, clip, monkeypatch):
    failed = threading.Event()

    def failing_compress(self, *args, **kwargs):
        failed.set()
        raise RuntimeError("out of memory, say")

    real_load = streaming.load_video
    outcome = {"frames": 0}

    def held_load(video, on_frames=None, **kwargs):
        def report(event):  # after the first segment, wait until the compressor has failed
            on_frames(event)
            outcome["frames"] += len(event.slots)
            if outcome["frames"] == 8:
                failed.wait(timeout=60)
                for _ in range(600):  # until the caller's thread, as the error passes, cancels the stream
                    on_frames(FramesReady(event.frames, [], event.real_fps))  # raises _Cancelled then
                    time.sleep(0.05)

        try:
            return real_load(video, on_frames=report, **kwargs)
        except BaseException as error:
            outcome["error"] = error
            raise

    monkeypatch.setattr(type(tiny_model), "compress", failing_compress)
    monkeypatch.setattr(streaming, "load_video", held_load)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        streaming.compress_streaming(tiny_model, processor, str(clip), QUESTION, compressor_batch_size=1, num_workers=1)
    for thread in threading.enumerate():
        if thread.name == "tempo-stream-decode":
            thread.join(timeout=30)
    assert isinstance(outcome.get("error"), streaming._Cancelled)
    assert outcome["frames"] == 8  # the decoder stopped at the next frame of the 24


def test_other_errors_in_the_decoding_thread_reach_the_caller_unchanged(tiny_model, processor, clip, monkeypatch):
    def broken_load(*args, **kwargs):
        raise MemoryError("no room for the frames")

    monkeypatch.setattr(streaming, "load_video", broken_load)
    with pytest.raises(MemoryError, match="no room for the frames"):
        streaming.compress_streaming(tiny_model, processor, str(clip), QUESTION)


def test_on_frames_reports_every_slot_with_its_final_content(clip):
    seen = {}

    def record(event):
        assert isinstance(event, FramesReady) and event.real_fps == 2.0
        for slot in event.slots:
            seen[slot] = event.frames[slot].clone()

    video = load_video(str(clip), num_workers=3, on_frames=record)
    assert sorted(seen) == list(range(video.num_frames))
    for slot, frame in seen.items():
        assert torch.equal(frame, video.frames[slot])
    assert [decode_frame_index(seen[s].numpy()) for s in sorted(seen)] == video.frame_indices


@pytest.mark.parametrize("num_frames,height,width", [(24, 48, 64), (13, 40, 56), (1, 720, 1280), (1024, 720, 1280)])
def test_pending_video_gives_the_decoded_videos_prompts_and_grids(processor, num_frames, height, width):
    vp = processor.video_processor
    grid = vp.segment_grids(num_frames, height, width)
    if num_frames <= 24:
        frames = torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8)
        assert torch.equal(grid, vp.process_video(frames, 2.0)["video_grid_thw"])
        decoded = processor(text=QUESTION, videos=frames, video_metadata={"fps": 2.0}, return_tensors="pt")
        pending = processor(text=QUESTION, videos=PendingVideo(num_frames, 2.0, height, width), return_tensors="pt")
        assert set(pending) == set(decoded) - {"pixel_values_videos"}
        for key in pending:
            assert torch.equal(pending[key], decoded[key]), key
    else:  # docs/released-model.md, "Video in": 1280x720 -> 512x288 -> 512x256, patches of 16; 128 segments of 8 frames
        assert grid.shape == (128, 3) and grid.unique(dim=0).tolist() == [[4, 16, 32]]


def test_pending_and_decoded_videos_do_not_mix_in_a_batch(processor):
    frames = torch.zeros(8, 48, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot mix PendingVideo"):
        processor(text=["a", "b"], videos=[frames, PendingVideo(8, 2.0, 48, 64)], video_metadata={"fps": 2.0})
