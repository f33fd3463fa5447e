"""`load_video(..., clip=(start, end))`: sample part of a file as if it were the whole video."""

import numpy as np
import pytest

from transformers_tempo import VideoLoadError, load_video
from transformers_tempo.synthetic import decode_frame_index, write_test_video
from transformers_tempo.video_loading import clip_frame_range


@pytest.fixture(scope="module")
def ten_seconds(tmp_path_factory):
    """100 frames at 10 fps; frame i shows i (index_pattern), so decoded frames say where they came from."""
    return write_test_video(tmp_path_factory.mktemp("clip") / "ten.mp4", num_frames=100, fps=10)


def shown(video):
    return [decode_frame_index(frame.numpy()) for frame in video.frames]


def test_clip_is_sampled_as_a_whole_video(ten_seconds):
    # frames 20..40 (2.0 <= i/10 <= 4.0): 21 frames, 2.1 s -> round(4.2) = 4, raised to min_frames 8
    # -> 20 + round(linspace(0, 20, 8)) = 20 + [0, 3, 6, 9, 11, 14, 17, 20]
    video = load_video(ten_seconds, clip=(2.0, 4.0))
    assert video.frame_indices == [20, 23, 26, 29, 31, 34, 37, 40]
    assert shown(video) == video.frame_indices
    assert video.duration == pytest.approx(2.1)
    assert video.real_fps == pytest.approx(8 / 2.1)  # timestamps count from the clip's start


@pytest.mark.parametrize(
    "clip, expected",
    [
        # frames 0..10: 11 frames, 1.1 s -> round(2.2) = 2 -> round(linspace(0, 10, 2)) = [0, 10]
        ((None, 1.0), [0, 10]),
        # frames 75..99: 25 frames, 2.5 s -> 5 -> 75 + round(linspace(0, 24, 5)) = 75 + [0, 6, 12, 18, 24]
        ((7.5, None), [75, 81, 87, 93, 99]),
        # 2.03..2.07 s holds no frame start: the frame showing at 2.03 s, frame 20
        ((2.03, 2.07), [20]),
    ],
)
def test_open_ended_and_tiny_clips(ten_seconds, clip, expected):
    video = load_video(ten_seconds, clip=clip, fps=2, min_frames=1)
    assert video.frame_indices == expected
    assert shown(video) == expected


def test_clip_end_past_the_video_is_cut_with_a_note(ten_seconds):
    video = load_video(ten_seconds, clip=(8, 30), fps=2, min_frames=1)
    # frames 80..99: 20 frames, 2.0 s -> 4 -> 80 + round(linspace(0, 19, 4)) = 80 + [0, 6, 13, 19]
    assert video.frame_indices == [80, 86, 93, 99]
    assert any("clip end 30 s is past the end of the video (10.000 s)" in note for note in video.warnings)


@pytest.mark.parametrize(
    "clip, message",
    [
        ((12, None), "clip starts at 12.0 s, after the end of the video"),
        ((5, 3), r"clip ends \(3 s\) before it starts \(5.0 s\)"),
        ((-1, 2), "clip start must be a number of seconds >= 0, got -1"),
        (("a", 2), "clip start must be a number of seconds >= 0, got 'a'"),
        ((1,), r"clip must be \(start, end\) in seconds"),
    ],
)
def test_bad_clips_name_the_file_and_the_problem(ten_seconds, clip, message):
    with pytest.raises(VideoLoadError, match=message) as info:
        load_video(ten_seconds, clip=clip)
    assert str(ten_seconds) in str(info.value)


def test_clip_of_frames_given_directly_is_refused():
    with pytest.raises(ValueError, match="clip= selects part of a video file"):
        load_video(np.zeros((4, 16, 16, 3), np.uint8), clip=(0, 1))


def test_bounds_on_a_frame_survive_float_noise():
    # 0.1 s * 30 fps = 3.0000000000000004 and 0.2 * 30 = 6.000000000000001: frames 3..6, not 4..6
    assert clip_frame_range(100, 30.0, (0.1, 0.2)) == (3, 4)
    assert clip_frame_range(100, 30.0, None) == (0, 100)
