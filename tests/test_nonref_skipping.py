"""PyAV decoding drops the non-reference pictures the sampler does not want: the sampled frames stay
the same bit for bit, and fewer frames are decoded."""

from __future__ import annotations

import av
import pytest
import torch

from transformers_tempo import video_decoding
from transformers_tempo.synthetic import (
    decode_frame_index,
    encoder_available,
    write_test_video,
)
from transformers_tempo.video_decoding import _decode_wanted
from transformers_tempo.video_loading import load_video
from transformers_tempo.video_probing import _probe_stream, _Reader

B_FRAME = 3  # PyAV's pict_type of a bidirectionally predicted picture (AV_PICTURE_TYPE_B)
X264_B_PYRAMID = {"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"}


def write_b_frame_video(path, **options):
    """300 frames, a keyframe every 30; with X264_B_PYRAMID, 3 B-frames between references
    (b-adapt=0), the middle one a reference itself (b-pyramid)."""
    return write_test_video(path, num_frames=300, fps=30, width=96, height=64, gop=30, **options)


def frame_kinds(path):
    """Per presentation index: its picture type, and whether it is a reference picture.

    A picture is a reference when it survives decoding the whole file with FFmpeg dropping every
    non-reference picture (computed here without the package)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        order = {frame.pts: int(frame.pict_type) for frame in container.decode(stream)}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        references = {frame.pts for frame in container.decode(stream)}
    pts = sorted(order)
    return [order[p] for p in pts], [p in references for p in pts]


@pytest.fixture(scope="module")
def b_frame_video(tmp_path_factory):
    path = write_b_frame_video(tmp_path_factory.mktemp("nonref") / "b.mp4", codec_options=X264_B_PYRAMID)
    kinds, is_reference = frame_kinds(path)
    return path, kinds, is_reference


def decode(path, wanted, monkeypatch, *, skip, num_workers=1, num_threads=None):
    """The package's decoding of presentation indices `wanted`, with skipping on or off."""
    monkeypatch.setattr(video_decoding, "SKIP_UNWANTED_NONREF", skip)
    notes: list[str] = []
    reader = _Reader(str(path), path.name)
    facts = _probe_stream(reader, notes)
    frames, stats = _decode_wanted(
        reader, stream_number=facts.number, index=facts.index, wanted=wanted, num_workers=num_workers,
        num_threads=num_threads, notes=notes, progress=False, max_longer_edge=None, rotation=facts.rotation,
        pin_memory=False,
    )
    return frames, stats, notes


def assert_same_with_and_without_skipping(path, wanted, monkeypatch, **options):
    """Returns the statistics with skipping on and off."""
    on, on_stats, on_notes = decode(path, wanted, monkeypatch, skip=True, **options)
    off, off_stats, off_notes = decode(path, wanted, monkeypatch, skip=False, **options)
    assert torch.equal(on, off)
    assert on_notes == off_notes
    assert [decode_frame_index(frame.numpy()) for frame in on] == list(wanted)  # the frames asked for
    assert on_stats["workers"] == off_stats["workers"] and on_stats["seeks"] == off_stats["seeks"]
    assert off_stats["nonref_marked_packets"] == 0
    return on_stats, off_stats


def test_the_test_file_has_wanted_kinds_of_pictures(b_frame_video):
    # what the other tests rely on: non-reference B-frames, and B-frames that are references (b-pyramid)
    _, kinds, is_reference = b_frame_video
    assert len(kinds) == 300 and kinds[0] == 1  # an I-frame first
    assert sum(k == B_FRAME and not r for k, r in zip(kinds, is_reference)) > 100
    assert any(k == B_FRAME and r for k, r in zip(kinds, is_reference))
    assert all(r for k, r in zip(kinds, is_reference) if k != B_FRAME)


@pytest.mark.parametrize("num_workers", [1, 3])
@pytest.mark.parametrize("num_threads", [1, 4], ids=["one-thread", "frame-threads"])
def test_dense_samples_with_b_frames_are_equal_and_cost_fewer_frames(b_frame_video, monkeypatch, num_workers, num_threads):
    path, kinds, is_reference = b_frame_video
    wanted = list(range(0, 300, 3))  # gaps of 2: decoded forward, no seeks
    # and every non-reference B-frame among the first 60 (so the wanted frames include many)
    wanted = sorted(set(wanted) | {i for i in range(60) if kinds[i] == B_FRAME and not is_reference[i]})
    on, off = assert_same_with_and_without_skipping(
        path, wanted, monkeypatch, num_workers=num_workers, num_threads=num_threads
    )
    assert on["workers"] == off["workers"] == num_workers
    if num_workers == 1:
        # one decoder walks frames 0..297 (the last wanted) in order: it returns every one of them
        # without skipping, and with it only the references and the wanted frames
        assert wanted[-1] == 297
        assert off["decoded_frames"] == 298 and off["seeks"] == 0
        assert on["decoded_frames"] == sum(1 for i in range(298) if is_reference[i] or i in set(wanted))
        assert on["decoded_frames"] < off["decoded_frames"]
    else:
        assert on["decoded_frames"] < off["decoded_frames"]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_sparse_samples_that_are_non_reference_b_frames_are_equal(b_frame_video, monkeypatch, num_workers):
    path, kinds, is_reference = b_frame_video
    # one non-reference B-frame late in each of a few keyframe intervals: seeks, then decodes forward
    wanted = []
    for start in (30, 120, 210, 270):
        wanted.append(max(i for i in range(start, start + 30) if kinds[i] == B_FRAME and not is_reference[i]))
    on, off = assert_same_with_and_without_skipping(path, wanted, monkeypatch, num_workers=num_workers, num_threads=2)
    assert on["seeks"] >= 3
    assert on["decoded_frames"] < off["decoded_frames"]
    assert on["nonref_marked_packets"] > 0


def test_repeated_wanted_frames_are_equal(b_frame_video, monkeypatch):
    path, kinds, is_reference = b_frame_video
    nonref = [i for i in range(300) if kinds[i] == B_FRAME and not is_reference[i]]
    reference_b = [i for i in range(300) if kinds[i] == B_FRAME and is_reference[i]]
    wanted = sorted([nonref[3]] * 3 + [reference_b[2]] * 2 + [nonref[40]] * 2 + [0, 0, 299])
    for workers in (1, 2):
        on, off = assert_same_with_and_without_skipping(path, wanted, monkeypatch, num_workers=workers)
        assert on["decoded_frames"] < off["decoded_frames"]


def test_load_video_is_unchanged_by_skipping(b_frame_video, monkeypatch):
    path, _, _ = b_frame_video
    for options in ({"max_frames": 8, "num_workers": 1}, {"fps": 10.0, "num_workers": 2}):
        monkeypatch.setattr(video_decoding, "SKIP_UNWANTED_NONREF", True)
        on = load_video(path, **options)
        monkeypatch.setattr(video_decoding, "SKIP_UNWANTED_NONREF", False)
        off = load_video(path, **options)
        assert torch.equal(on.frames, off.frames) and on.frame_indices == off.frame_indices
        assert on.warnings == off.warnings
        assert on.stats["decoded_frames"] < off.stats["decoded_frames"]


def test_a_file_without_b_frames_is_equal_and_decodes_as_many_frames(tmp_path, monkeypatch):
    # ultrafast: no B-frames, and every P-frame is a reference, so nothing can be dropped
    path = write_b_frame_video(tmp_path / "ultrafast.mp4", codec_options={"preset": "ultrafast"})
    kinds, is_reference = frame_kinds(path)
    assert B_FRAME not in kinds and all(is_reference)
    wanted = list(range(0, 300, 7))
    on, off = assert_same_with_and_without_skipping(path, wanted, monkeypatch, num_threads=4)
    assert on["decoded_frames"] == off["decoded_frames"]
    assert on["nonref_marked_packets"] > 0  # asked, but there was nothing to drop


def test_files_without_timestamps_are_decoded_in_decoding_order_without_skipping(tmp_path, monkeypatch):
    # a raw H.264 stream: packets carry no timestamps, so frames are counted as they come out
    path = write_b_frame_video(tmp_path / "raw.h264", codec_options=X264_B_PYRAMID)
    wanted = list(range(0, 300, 10))
    on, off = assert_same_with_and_without_skipping(path, wanted, monkeypatch)
    assert on["nonref_marked_packets"] == 0 and on["decoded_frames"] == off["decoded_frames"]


@pytest.mark.skipif(not encoder_available("libx265"), reason="no libx265 encoder")
def test_hevc_skips_only_when_the_stream_has_one_temporal_sub_layer(tmp_path, monkeypatch):
    wanted = list(range(0, 300, 4))
    single = write_b_frame_video(
        tmp_path / "one-layer.mp4", codec="libx265", codec_options={"x265-params": "log-level=error:bframes=3"}
    )
    on, off = assert_same_with_and_without_skipping(single, wanted, monkeypatch, num_threads=4)
    assert on["decoded_frames"] < off["decoded_frames"]

    # sub-layer non-reference pictures of a lower layer may be used by higher layers: not dropped
    layered = write_b_frame_video(
        tmp_path / "layers.mp4", codec="libx265",
        codec_options={"x265-params": "log-level=error:bframes=3:temporal-layers=3"},
    )
    with av.open(str(layered)) as container:
        assert not video_decoding._nonref_skipping_is_exact(container.streams.video[0].codec_context)
    on, off = assert_same_with_and_without_skipping(layered, wanted, monkeypatch)
    assert on["nonref_marked_packets"] == 0 and on["decoded_frames"] == off["decoded_frames"]


def test_only_h264_and_single_layer_hevc_are_skipped():
    class Context:
        def __init__(self, name, extradata=None):
            self.name, self.extradata = name, extradata

    def hvcc(layers):
        record = bytearray(23)
        record[0] = 1  # configurationVersion
        record[21] = (layers << 3) | 3  # numTemporalLayers in bits 3-5, lengthSizeMinusOne = 3
        return bytes(record)

    assert video_decoding._nonref_skipping_is_exact(Context("h264"))
    assert video_decoding._nonref_skipping_is_exact(Context("hevc", hvcc(1)))
    for layers in (0, 2, 7):  # 0: unknown
        assert not video_decoding._nonref_skipping_is_exact(Context("hevc", hvcc(layers)))
    assert not video_decoding._nonref_skipping_is_exact(Context("hevc", None))  # Annex B: no record
    for name in ("vp9", "av1", "mpeg4", "mpeg2video"):
        assert not video_decoding._nonref_skipping_is_exact(Context(name))
