"""Video loading: sampling rule, codecs, timestamps, rotation, damage and bad input."""

from __future__ import annotations

import io
import logging

import av
import numpy as np
import pytest
import torch

from transformers_tempo.synthetic import (
    decode_frame_index,
    encoder_available,
    make_frames,
    write_damaged_copy,
    write_long_video,
    write_test_video,
)
from transformers_tempo import video_decoding, video_loading
from transformers_tempo.video_loading import LoadedVideo, VideoLoadError, compute_sample_indices, load_video

X265_QUIET = {"x265-params": "log-level=error"}


def reference_indices(total, source_fps, fps=2.0, min_frames=8, max_frames=1024):
    """The released rule, written out again independently of the package."""
    if total <= 1:
        return [0]
    n = min(max(max(1, round(total / source_fps * fps)), min_frames), max_frames)
    if n == 1:
        return [total - 1]
    return [int(i) for i in np.round(np.linspace(0, total - 1, n))]


def codes(video: LoadedVideo) -> list[int]:
    return [decode_frame_index(frame.numpy()) for frame in video.frames]


def left_red_right_blue(index, width, height):
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[:, : width // 2] = (255, 0, 0)
    frame[:, width // 2 :] = (0, 0, 255)
    return frame


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory):
    # 95 frames at 30 fps: 3.17 s -> round(6.33) = 6 -> 8 frames (min_frames)
    return write_test_video(tmp_path_factory.mktemp("v") / "clip.mp4", num_frames=95, fps=30, width=96, height=64)


# ---------------------------------------------------------------------------- sampling rule


@pytest.mark.parametrize(
    "total, source_fps, min_frames, max_frames",
    [
        (1, 30, 8, 1024),
        (2, 30, 8, 1024),
        (95, 30, 8, 1024),
        (300, 30, 8, 1024),  # 10 s -> 20
        (301, 29.97, 8, 1024),
        (45, 30, 1, 1024),  # 1.5 s -> round(3.0) = 3
        (15, 30, 1, 1024),  # 0.5 s -> round(1.0) = 1 -> [last frame]
        (18000, 30, 8, 1024),  # 10 min -> 1200 -> 1024
        (37, 24, 8, 16),
        (3, 25, 8, 1024),  # fewer frames than min_frames: repeats
        (75, 30, 4, 1024),  # 2.5 s -> 5
        (45, 12, 4, 1024),  # 3.75 s -> 7.5 -> 8 (half to even)
        (27, 12, 4, 1024),  # 2.25 s -> 4.5 -> 4 (half to even)
    ],
)
def test_sample_indices_follow_the_released_rule(total, source_fps, min_frames, max_frames):
    got = compute_sample_indices(total, source_fps, 2.0, min_frames, max_frames)
    assert got == reference_indices(total, source_fps, 2.0, min_frames, max_frames)


def test_linspace_rounding_is_half_to_even():
    # linspace(0, 9, 7) = 0, 1.5, 3, 4.5, 6, 7.5, 9 -> numpy rounds halves to even
    assert compute_sample_indices(10, 10 / 3.5, 2.0, 7, 7) == [0, 2, 3, 4, 6, 8, 9]


# ---------------------------------------------------------------------------- decoding


def test_h264_sampling_timing_and_content(h264_clip):
    video = load_video(h264_clip)
    assert video.total_frames == 95 and video.source_fps == 30.0
    assert video.frame_indices == reference_indices(95, 30.0)
    assert video.duration == pytest.approx(95 / 30)
    assert video.real_fps == pytest.approx(8 / (95 / 30))
    assert video.frames.dtype == torch.uint8 and tuple(video.frames.shape) == (8, 64, 96, 3)
    assert codes(video) == video.frame_indices
    assert video.warnings == []


@pytest.mark.parametrize(
    "codec, suffix, options",
    [
        ("libx264", ".mp4", None),
        ("libx265", ".mp4", X265_QUIET),
        ("libvpx-vp9", ".webm", None),
        ("libsvtav1", ".mp4", None),
        ("mpeg4", ".avi", None),
    ],
)
def test_codecs(tmp_path, codec, suffix, options):
    if not encoder_available(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    path = write_test_video(
        tmp_path / f"clip{suffix}", num_frames=50, fps=10, width=96, height=64, codec=codec, codec_options=options
    )
    video = load_video(path)
    assert video.total_frames == 50
    assert video.frame_indices == reference_indices(50, 10.0)  # 5 s -> 10 frames
    assert codes(video) == video.frame_indices


@pytest.mark.parametrize(
    "codec, pix_fmt, suffix, width, height",
    [
        ("libx264", "yuv444p", ".mp4", 97, 61),  # odd size
        ("libx264", "yuv420p10le", ".mp4", 64, 48),  # 10-bit
        ("png", "gray", ".mov", 64, 48),  # grayscale
        ("mpeg4", "yuv420p", ".avi", 66, 50),
    ],
)
def test_pixel_formats_and_odd_sizes(tmp_path, codec, pix_fmt, suffix, width, height):
    if not encoder_available(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    path = write_test_video(
        tmp_path / f"clip{suffix}", num_frames=20, fps=10, width=width, height=height, codec=codec, pix_fmt=pix_fmt
    )
    video = load_video(path)
    assert tuple(video.frames.shape) == (8, height, width, 3)
    assert codes(video) == video.frame_indices
    if pix_fmt == "gray":
        frames = video.frames.int()
        assert torch.equal(frames[..., 0], frames[..., 1]) and torch.equal(frames[..., 1], frames[..., 2])


def test_channels_are_rgb(tmp_path):
    path = write_test_video(tmp_path / "rb.mp4", num_frames=4, width=64, height=32, color_fn=left_red_right_blue)
    frame = load_video(path, min_frames=1).frames[0].int()
    assert frame[16, 8, 0] > 200 and frame[16, 8, 2] < 50  # red on the left
    assert frame[16, 56, 2] > 200 and frame[16, 56, 0] < 50  # blue on the right


@pytest.mark.parametrize("rotate, red_at", [(-90, "top"), (90, "bottom"), (180, "right")])
def test_rotation_metadata_is_applied(tmp_path, rotate, red_at):
    path = write_test_video(
        tmp_path / "rot.mp4", num_frames=4, width=64, height=32, color_fn=left_red_right_blue, rotate=rotate
    )
    frame = load_video(path, min_frames=1).frames[0].int()
    height, width = frame.shape[:2]
    assert (height, width) == ((32, 64) if rotate == 180 else (64, 32))
    probe = {"top": (8, width // 2), "bottom": (height - 8, width // 2), "right": (height // 2, width - 8)}[red_at]
    assert frame[probe][0] > 200 and frame[probe][2] < 50


def test_variable_frame_rate_uses_presentation_order(tmp_path):
    path = write_test_video(tmp_path / "vfr.mp4", num_frames=40, fps=20, width=96, height=64, vfr=True)
    with av.open(str(path)) as container:
        average = float(container.streams.video[0].average_rate)
    video = load_video(path)
    assert video.total_frames == 40
    assert video.source_fps == pytest.approx(average)
    assert video.frame_indices == reference_indices(40, average)
    assert codes(video) == video.frame_indices

    times = [0.0, 0.1, 0.15, 0.5, 0.52, 0.9, 1.4, 1.45, 2.0, 2.9, 3.0, 3.7]
    path = write_test_video(tmp_path / "vfr2.mkv", num_frames=len(times), fps=4, width=96, height=64, vfr=times)
    video = load_video(path, min_frames=12)
    assert codes(video) == video.frame_indices == list(range(12))


def test_sparse_sampling_seeks_instead_of_decoding_everything(tmp_path):
    # 400 frames, keyframe every 10: 8 wanted frames 57 apart -> seek to each one's keyframe
    path = write_test_video(tmp_path / "long.mp4", num_frames=400, fps=40, width=96, height=64, gop=10)
    video = load_video(path, max_frames=8)
    assert video.frame_indices == reference_indices(400, 40.0, max_frames=8)
    assert codes(video) == video.frame_indices
    assert video.stats["seeks"] >= 6
    assert video.stats["decoded_frames"] < 120  # instead of 400


def test_dense_sampling_decodes_forward(tmp_path):
    path = write_test_video(tmp_path / "dense.mp4", num_frames=120, fps=30, width=96, height=64, gop=250)
    video = load_video(path)
    assert codes(video) == video.frame_indices
    assert video.stats["seeks"] == 0


def test_mpegts_seeking_lands_late_and_is_corrected(tmp_path):
    path = write_test_video(tmp_path / "long.ts", num_frames=200, fps=40, width=96, height=64, gop=10)
    video = load_video(path, max_frames=8)
    assert codes(video) == video.frame_indices
    assert not any("could not be decoded" in w for w in video.warnings)


def test_missing_frame_count_is_counted_and_logged_at_debug_level(tmp_path, caplog):
    # Matroska/WebM never store a frame count: counting the packets is normal, not worth a warning.
    path = write_test_video(tmp_path / "clip.mkv", num_frames=30, fps=10, width=96, height=64)
    with caplog.at_level(logging.DEBUG, logger="transformers_tempo.video_loading"):
        video = load_video(path)
    assert video.total_frames == 30
    assert not any("frame count" in w for w in video.warnings)
    debug = [r for r in caplog.records if "frame count" in r.getMessage()]
    assert debug and all(r.levelno == logging.DEBUG for r in debug)


@pytest.mark.parametrize("options", [{"max_frames": 0}, {"max_frames": -3}, {"fps": 0}, {"fps": float("nan")}])
def test_bad_sampling_options_are_refused_by_name(tmp_path, options):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=10, fps=10, width=64, height=64)
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"^{name} must be a positive"):
        load_video(path, **options)


def test_truncated_file_decodes_what_is_there(tmp_path):
    path = write_test_video(tmp_path / "clip.mkv", num_frames=60, fps=10, width=96, height=64)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    video = load_video(cut)
    assert 0 < video.total_frames < 60
    assert video.frame_indices == reference_indices(video.total_frames, 10.0)
    assert codes(video) == video.frame_indices
    assert any("truncated" in w for w in video.warnings)

    stub = tmp_path / "stub.mkv"
    stub.write_bytes(data[:400])
    with pytest.raises(VideoLoadError, match="stub.mkv"):
        load_video(stub)


def test_file_object_and_bytes(h264_clip):
    expected = load_video(h264_clip, progress=True)
    with open(h264_clip, "rb") as handle:
        from_handle = load_video(handle)
    from_bytes = load_video(h264_clip.read_bytes())
    from_stream = load_video(io.BytesIO(h264_clip.read_bytes()))
    for video in (from_handle, from_bytes, from_stream):
        assert video.frame_indices == expected.frame_indices
        assert torch.equal(video.frames, expected.frames)


def test_audio_track_is_ignored(tmp_path):
    path = write_test_video(tmp_path / "av.mp4", num_frames=30, fps=10, width=96, height=64, audio=True)
    video = load_video(path)
    assert codes(video) == video.frame_indices


def test_max_longer_edge_resizes_like_the_processor(tmp_path):
    from transformers_tempo.video_processing_tempo import TempoVideoProcessor

    frames = make_frames(2, width=1280, height=720)
    video = load_video(frames, video_metadata={"fps": 2.0}, max_longer_edge=512)
    assert tuple(video.frames.shape) == (2, 288, 512, 3)
    processor = TempoVideoProcessor()
    full = processor.process_video(torch.from_numpy(frames), 2.0)
    limited = processor.process_video(video.frames, 2.0)
    assert torch.equal(full["pixel_values_videos"], limited["pixel_values_videos"])


def test_max_longer_edge_while_decoding_a_file(tmp_path):
    from transformers_tempo.video_processing_tempo import longer_edge_size, resize_frames

    path = write_test_video(tmp_path / "wide.mp4", num_frames=40, fps=10, width=320, height=192)
    full = load_video(path)
    small = load_video(path, max_longer_edge=128)
    assert longer_edge_size(192, 320, 128) == (80, 128)
    assert tuple(small.frames.shape) == (8, 80, 128, 3)
    expected = resize_frames(full.frames.permute(0, 3, 1, 2), (80, 128)).permute(0, 2, 3, 1)
    assert torch.equal(small.frames, expected)
    assert codes(small) == small.frame_indices


# ---------------------------------------------------------------------------- frames given directly


def test_frames_given_directly():
    frames = make_frames(6, width=32, height=24)
    video = load_video(frames, video_metadata={"fps": 4.0})
    assert video.real_fps == 4.0 and video.frame_indices == list(range(6)) and video.duration == 1.5
    assert torch.equal(video.frames, torch.from_numpy(frames))
    assert torch.equal(load_video(torch.from_numpy(frames), video_metadata={"fps": 4.0}).frames, video.frames)

    from PIL import Image
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=6, fps=3.0)
    as_images = load_video([Image.fromarray(f) for f in frames], video_metadata=metadata)
    assert as_images.real_fps == 3.0 and torch.equal(as_images.frames, video.frames)
    assert torch.equal(load_video(list(frames), video_metadata={"fps": 4.0}).frames, video.frames)

    default = load_video(frames)
    assert default.real_fps == 2.0
    assert any("2.0 fps" in w for w in default.warnings)


# ---------------------------------------------------------------------------- bad input


def test_bad_paths(tmp_path):
    with pytest.raises(VideoLoadError, match="no such file"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoLoadError, match="directory"):
        load_video(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoLoadError, match="empty"):
        load_video(empty)
    with pytest.raises(VideoLoadError, match="empty"):
        load_video(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoLoadError, match="notes.mp4.*not a readable video"):
        load_video(text)
    with pytest.raises(VideoLoadError, match="unsupported video input"):
        load_video(42)


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as container:
        from transformers_tempo.synthetic import _write_silence

        _write_silence(container.add_stream("aac", rate=16000), container, 0.5)
    with pytest.raises(VideoLoadError, match="sound.m4a: audio-only"):
        load_video(path)


def test_zero_frames(tmp_path):
    path = tmp_path / "nothing.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoLoadError, match="nothing.avi.*zero frames"):
        load_video(path)


@pytest.mark.parametrize(
    "frames, metadata, match",
    [
        (np.zeros((4, 8, 8, 3), np.uint8), {"fps": 0}, "fps is 0"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"fps": -5}, "positive"),
        (np.zeros((4, 3, 8, 8), np.uint8), None, r"expected \(T, H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), None, "single frame"),
        (np.zeros((4, 8, 8, 3), np.float32), None, "uint8"),
        (torch.zeros((4, 8, 8, 3), dtype=torch.int16), None, "uint8"),
        (np.zeros((0, 8, 8, 3), np.uint8), None, "zero frames"),
        ([], None, "empty"),
        ([np.zeros((8, 8), np.uint8)], None, "frame 0"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], None, "one size"),
        (np.zeros((2, 2, 402, 3), np.uint8), None, "aspect ratio"),
    ],
)
def test_bad_frames(frames, metadata, match):
    with pytest.raises(VideoLoadError, match=match):
        load_video(frames, video_metadata=metadata)


def test_long_video_by_remuxing_a_clip(tmp_path):
    path = write_long_video(tmp_path / "long.mp4", duration=60, clip_seconds=2, fps=30, width=160, height=96, gop=30)
    video = load_video(path, max_frames=16)
    assert video.duration == pytest.approx(60.0, abs=0.05)
    assert video.frames.shape == (16, 96, 160, 3)
    # frame i of the file shows frame i mod 60 of the clip
    indices = compute_sample_indices(1800, 30.0, fps=2.0, max_frames=16)
    assert [decode_frame_index(f.numpy()) for f in video.frames] == [i % 60 for i in indices]


def test_pin_memory_gives_the_same_frames(tmp_path):
    path = write_test_video(tmp_path / "pin.mp4", num_frames=20, fps=10, width=64, height=48)
    plain = load_video(path)
    pinned = load_video(path, pin_memory=True)
    assert torch.equal(plain.frames, pinned.frames)
    # page-locked only where CUDA exists (pinning needs a driver); never an error without one
    assert pinned.frames.is_pinned() == torch.cuda.is_available()


# ---------------------------------------------------------------------------- parallel decoding


@pytest.fixture(scope="module", params=[".mp4", ".ts"])
def gop12_clip(request, tmp_path_factory):
    # 360 frames, a keyframe every 12 (30 keyframe intervals); 12 s -> 24 frames at 2 fps.
    # MPEG-TS seeks land late and are corrected by going back a keyframe.
    return write_test_video(
        tmp_path_factory.mktemp("p") / f"gop12{request.param}", num_frames=360, fps=30, width=64, height=48, gop=12
    )


def assert_same_video(video, reference):
    assert video.frame_indices == reference.frame_indices
    assert torch.equal(video.frames, reference.frames)
    assert video.warnings == reference.warnings
    assert (video.total_frames, video.source_fps, video.real_fps) == (
        reference.total_frames,
        reference.source_fps,
        reference.real_fps,
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"min_frames": 60, "max_frames": 60}, {"max_frames": 8}],
    ids=["2fps", "several-per-keyframe", "sparse-seeking"],
)
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_parallel_decoding_matches_one_worker(gop12_clip, workers, options):
    one = load_video(gop12_clip, num_workers=1, **options)
    assert one.stats["workers"] == 1
    video = load_video(gop12_clip, num_workers=workers, **options)
    assert video.stats["workers"] == workers
    assert_same_video(video, one)
    assert codes(video) == video.frame_indices


def test_parallel_ranges_start_on_keyframes(tmp_path):
    # 361 frames, a keyframe every 12; 31 sampled frames: linspace(0, 360, 31) = 0, 12, 24, ...,
    # so every range starts exactly on a keyframe that is itself a wanted frame
    path = write_test_video(tmp_path / "keys.mp4", num_frames=361, fps=30, width=64, height=48, gop=12)
    one = load_video(path, num_workers=1, min_frames=31, max_frames=31)
    assert one.frame_indices == list(range(0, 361, 12))
    with av.open(str(path)) as container:
        index = video_loading._index_stream(container, container.streams.video[0])
    assert index.keyframes == list(range(0, 361, 12))
    for workers in (2, 3, 4):
        parts = video_loading._plan_parts(one.frame_indices, index, workers)
        assert [len(part.targets) > 0 for part in parts] == [True] * workers
        assert [t for part in parts for t in part.targets] == one.frame_indices
        assert all(part.targets[0] in index.keyframes for part in parts)
        video = load_video(path, num_workers=workers, min_frames=31, max_frames=31)
        assert_same_video(video, one)
        assert codes(video) == video.frame_indices

    # several wanted frames per keyframe interval: a part never starts inside another's interval
    targets = compute_sample_indices(361, 30.0, min_frames=90, max_frames=90)
    parts = video_loading._plan_parts(targets, index, 4)
    assert len(parts) == 4
    for before, after in zip(parts, parts[1:]):
        keyframe = max(k for k in index.keyframes if k <= after.targets[0])
        assert before.targets[-1] < keyframe


def test_parallel_decoding_with_repeated_frames(tmp_path):
    # 40 frames (4 keyframe intervals) sampled to min_frames=64: indices repeat
    path = write_test_video(tmp_path / "short.mp4", num_frames=40, fps=10, width=64, height=48, gop=10)
    one = load_video(path, num_workers=1, min_frames=64)
    assert len(one.frame_indices) == 64 and len(set(one.frame_indices)) == 40
    for workers in (2, 4):
        video = load_video(path, num_workers=workers, min_frames=64)
        assert video.stats["workers"] == workers
        assert_same_video(video, one)
        assert codes(video) == video.frame_indices


def test_parallel_decoding_with_resize_progress_and_pinned_memory(tmp_path, capsys):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12)
    one = load_video(path, num_workers=1, max_longer_edge=32)
    capsys.readouterr()
    video = load_video(path, num_workers=3, max_longer_edge=32, progress=True, pin_memory=True)
    assert "24/24" in capsys.readouterr().err  # every worker's frames counted once
    assert video.stats["workers"] == 3 and max(video.frames.shape[1:3]) == 32
    assert_same_video(video, one)
    assert video.frames.is_pinned() == torch.cuda.is_available()


def test_automatic_number_of_workers(tmp_path, monkeypatch):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12)
    one = load_video(path, num_workers=1)
    assert load_video(path).stats["workers"] == 1  # 360 frames to decode: a short job

    monkeypatch.setattr(video_decoding, "_cpu_count", lambda: 4)
    monkeypatch.setattr(video_decoding, "MIN_FRAMES_PER_WORKER", 100)
    auto = load_video(path)
    assert auto.stats["workers"] == 3  # 360 frames // 100
    assert_same_video(auto, one)
    monkeypatch.setattr(video_decoding, "MIN_FRAMES_PER_WORKER", 10)
    assert load_video(path).stats["workers"] == 4  # no more than the cores
    # bytes and file objects cannot be opened once per worker: always one
    data = path.read_bytes()
    for workers in (None, 4):
        for source in (data, io.BytesIO(data)):
            video = load_video(source, num_workers=workers)
            assert video.stats["workers"] == 1
            assert torch.equal(video.frames, one.frames)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_num_workers_must_be_a_positive_integer(h264_clip, bad):
    with pytest.raises(ValueError, match="num_workers must be a positive integer"):
        load_video(h264_clip, num_workers=bad)


def test_parallel_decoding_of_damaged_files_matches_one_worker(tmp_path):
    # truncated: the last range ends early
    path = write_test_video(tmp_path / "clip.mkv", num_frames=360, fps=30, width=64, height=48, gop=12)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    one = load_video(cut, num_workers=1)
    assert any("truncated" in w for w in one.warnings)
    for workers in (2, 3):
        video = load_video(cut, num_workers=workers)
        assert video.stats["workers"] == workers
        assert_same_video(video, one)

    # zeroed packet data a third of the way in: one decoder stops there for good, and so do
    # several (the ranges after the failing one are dropped and repaired like any missing frame)
    path = write_test_video(tmp_path / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12)
    broken = write_damaged_copy(path, tmp_path / "broken.mp4")
    data = broken.read_bytes()
    one = load_video(broken, num_workers=1)
    assert any("decoding stopped" in w for w in one.warnings)
    assert any("could not be decoded" in w for w in one.warnings)
    for workers in (2, 3, 4):
        video = load_video(broken, num_workers=workers)
        assert video.stats["workers"] == workers
        assert_same_video(video, one)

    # nothing readable: the same error
    stub = tmp_path / "stub.mkv"
    stub.write_bytes(data[:400])
    for workers in (1, 3):
        with pytest.raises(VideoLoadError, match="stub.mkv"):
            load_video(stub, num_workers=workers)


def test_an_error_while_decoding_is_the_one_met_first_in_the_file(tmp_path, monkeypatch):
    path = write_test_video(tmp_path / "clip.mp4", num_frames=360, fps=30, width=64, height=48, gop=12)
    put = video_loading._FrameStore.put

    def failing_put(self, index, frame, slots, part):
        if index >= 200:  # every part from the one holding frame 203 on fails
            raise VideoLoadError(f"{self.name}: frame {index} is bad")
        put(self, index, frame, slots, part)

    monkeypatch.setattr(video_loading._FrameStore, "put", failing_put)
    for workers in (1, 2, 3, 4):
        with pytest.raises(VideoLoadError, match="clip.mp4: frame 203 is bad"):
            load_video(path, num_workers=workers)
