"""Frames -> Qwen3-VL patches: resize chain, segments, timestamps, patch layout, save/load."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_tempo.synthetic import make_frames
from transformers_tempo.video_processing_tempo import (
    upload_and_resize,
    TempoVideoProcessor,
    longer_edge_size,
    resize_frames,
    segment_frames,
    video_frame_sizes,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def natural_image(height, width, seed=0):
    """Smooth shading, hard edges and sensor-like noise: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0),
            128 + 90 * np.cos((x + y) / 51.0),
            255 * (x / width) * (y / height),
        ],
        axis=-1,
    )
    image[(x // 40 + y // 40) % 5 == 0] = (250, 240, 30)  # edges
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def processor():
    return TempoVideoProcessor()


@pytest.fixture
def qwen3vl_video_processor(monkeypatch):
    """transformers' Qwen3-VL video processor, usable without torchvision.

    Its normalisation calls torchvision's `normalize`; the stand-in does the same arithmetic
    (subtract the mean tensor, divide by the std tensor, per channel).
    """
    import transformers.image_processing_backends as backends
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    def normalize(tensor, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub(mean).div_(std)

    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize), raising=False)
    return Qwen3VLVideoProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


# ---------------------------------------------------------------------------- sizes

# width x height at each step: source -> (a) longer edge 512 -> (b) multiples of 64 -> (c) smart_resize
SIZE_CHAIN = [
    ((1280, 720), (512, 288), (512, 256), (512, 256)),
    ((700, 500), (512, 368), (512, 384), (512, 384)),
    ((160, 96), (160, 96), (128, 128), (384, 384)),
    ((720, 1280), (288, 512), (256, 512), (256, 512)),
    ((640, 480), (512, 384), (512, 384), (512, 384)),
    ((320, 240), (320, 240), (320, 256), (416, 352)),
    ((3840, 2160), (512, 288), (512, 256), (512, 256)),
]


@pytest.mark.parametrize("source, after_a, after_b, after_c", SIZE_CHAIN)
def test_resize_chain(source, after_a, after_b, after_c):
    width, height = source
    sizes = video_frame_sizes(height, width)
    assert [(w, h) for h, w in sizes] == [after_a, after_b, after_c]


@pytest.mark.parametrize("source, after_c", [(s, c) for s, _, _, c in SIZE_CHAIN])
def test_frame_size_reaching_the_compressor(processor, source, after_c):
    width, height = source
    frames = torch.from_numpy(make_frames(2, width=width, height=height))
    out = processor.process_video(frames, real_fps=2.0)
    assert out["frame_size"] == (after_c[1], after_c[0])
    assert out["video_grid_thw"].tolist() == [[1, after_c[1] // 16, after_c[0] // 16]]
    assert out["pixel_values_videos"].shape == (after_c[1] // 16 * after_c[0] // 16, 1536)
    assert out["pixel_values_videos"].dtype == torch.float32


def test_longer_edge_rounding_is_half_to_even():
    # 1000x700 -> 512 x 358.4 -> 358.4/16 = 22.4 -> 352; 1280x840 -> 336 exactly
    assert longer_edge_size(700, 1000) == (352, 512)
    assert longer_edge_size(840, 1280) == (336, 512)
    # 720x1000: 368.64/16 = 23.04 -> 368; tiny sides stay >= 16
    assert longer_edge_size(1000, 720) == (512, 368)
    assert longer_edge_size(5, 1000) == (16, 512)
    assert longer_edge_size(300, 400) == (300, 400)


def test_extreme_aspect_ratio_is_refused(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.frame_sizes(2, 500)


# ---------------------------------------------------------------------------- resize kernels


def test_cpu_resize_matches_pil_bicubic():
    image = natural_image(720, 1280)
    for width, height in [(512, 288), (512, 256), (300, 169)]:
        pil = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC)).astype(int)
        ours = resize_frames(torch.from_numpy(image).permute(2, 0, 1)[None], (height, width))[0]
        diff = np.abs(pil - ours.permute(1, 2, 0).numpy().astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_float_resize_is_torchvision_v1_semantics():
    image = torch.from_numpy(natural_image(96, 128)).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(
        image.float(), size=(384, 512), mode="bicubic", align_corners=False, antialias=True
    )
    expected = expected.clamp(0, 255).round().to(torch.uint8)
    assert torch.equal(resize_frames(image, (384, 512), like_pil=False), expected)


# ---------------------------------------------------------------------------- segments and timestamps


@pytest.mark.parametrize(
    "num_frames, lengths",
    [(1, [2]), (2, [2]), (7, [8]), (8, [8]), (9, [8, 2]), (11, [8, 4]), (16, [8, 8]), (17, [8, 8, 2])],
)
def test_segments(num_frames, lengths):
    segments = segment_frames(num_frames)
    assert [len(s.frames) for s in segments] == lengths
    assert [s.start for s in segments] == list(range(0, num_frames, 8))
    for s in segments:
        real = list(range(s.start, min(s.start + 8, num_frames)))
        assert list(s.frames[: len(real)]) == real
        assert all(f == real[-1] for f in s.frames[len(real) :])  # padding repeats the last frame
        # padding frames take the next index for timestamps
        assert list(s.timestamp_indices) == list(range(s.start, s.start + len(s.frames)))


def test_timestamps_and_grid(processor):
    frames = torch.from_numpy(make_frames(11, width=64, height=64))
    out = processor.process_video(frames, real_fps=2.0)
    assert out["video_grid_thw"].tolist() == [[4, 24, 24], [2, 24, 24]]
    assert out["segment_frame_timestamps"] == [[0.25, 1.25, 2.25, 3.25], [4.25, 5.25]]
    assert out["segment_centers"] == [2.0, 6.0]
    assert f"<{0.25:.1f} seconds>" == "<0.2 seconds>"  # how the prompt renders it

    one = processor.process_video(frames[:1], real_fps=0.5)
    assert one["video_grid_thw"].tolist() == [[1, 24, 24]]
    assert one["segment_frame_timestamps"] == [[1.0]]  # frames 0 and (padding) 1 at 0.5 fps


def test_segments_of_different_sizes():
    """With a small total pixel budget, an 8-frame segment is shrunk more than a 2-frame one."""
    processor = TempoVideoProcessor(video_total_pixels=4 * 131072)
    frames = torch.from_numpy(make_frames(10, width=640, height=480))
    out = processor.process_video(frames, real_fps=2.0)
    assert out["video_grid_thw"].tolist() == [[4, 20, 26], [1, 24, 32]]
    first = processor.process_video(frames[:8], real_fps=2.0)["pixel_values_videos"]
    last = processor.process_video(frames[8:], real_fps=2.0)["pixel_values_videos"]
    assert torch.equal(out["pixel_values_videos"], torch.cat([first, last]))
    assert out["frame_size"] == (320, 416)


def test_padding_repeats_pixels(processor):
    frames = torch.from_numpy(make_frames(9, width=64, height=64))
    out = processor.process_video(frames, real_fps=2.0)
    last = out["pixel_values_videos"][-576:].view(576, 3, 2, 256)
    assert torch.equal(last[:, :, 0], last[:, :, 1])  # both frames of the padded patch are frame 8


# ---------------------------------------------------------------------------- layout vs transformers


@pytest.mark.parametrize("num_frames, width, height", [(10, 512, 256), (3, 384, 384), (16, 256, 512)])
def test_patch_layout_matches_qwen3vl(processor, qwen3vl_video_processor, num_frames, width, height):
    """Frames already at the compressor size: our output == Qwen3-VL's per segment, concatenated."""
    frames = torch.from_numpy(make_frames(num_frames, width=width, height=height, color_fn=_noisy))
    out = processor.process_video(frames, real_fps=2.0)
    expected_pixels, expected_grid = [], []
    for segment in segment_frames(num_frames):
        clip = frames[list(segment.frames)].permute(0, 3, 1, 2).float()
        ref = qwen3vl_video_processor(
            videos=[clip],
            do_resize=False,
            do_sample_frames=False,
            do_convert_rgb=False,
            cap_pixels_per_frame=True,
            return_tensors="pt",
        )
        expected_pixels.append(ref["pixel_values_videos"])
        expected_grid.append(ref["video_grid_thw"])
    assert torch.equal(out["video_grid_thw"], torch.cat(expected_grid))
    assert torch.equal(out["pixel_values_videos"], torch.cat(expected_pixels))


def test_resized_clip_matches_qwen3vl(processor, qwen3vl_video_processor):
    """A 1280x720 clip of 3 frames: steps (a), (b) by hand, then Qwen3-VL on the padded segment."""
    frames = torch.from_numpy(np.stack([natural_image(720, 1280, seed=s) for s in range(3)]))
    out = processor.process_video(frames, real_fps=2.0)
    clip = resize_frames(frames.permute(0, 3, 1, 2), (288, 512))
    clip = resize_frames(clip, (256, 512))
    clip = clip[[0, 1, 2, 2]].float()  # odd segment padded with its last frame
    ref = qwen3vl_video_processor(
        videos=[clip], do_resize=False, do_sample_frames=False, do_convert_rgb=False, return_tensors="pt",
        cap_pixels_per_frame=True,
    )
    assert out["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == [[2, 16, 32]]
    assert torch.equal(out["pixel_values_videos"], ref["pixel_values_videos"])


def test_normalisation_values(processor):
    frames = torch.full((2, 64, 64, 3), 0, dtype=torch.uint8)
    frames[..., 1] = 255
    frames[..., 2] = 51
    pixels = processor.process_video(frames, real_fps=2.0)["pixel_values_videos"].view(-1, 3, 512)
    assert torch.all(pixels[:, 0] == -1.0) and torch.all(pixels[:, 1] == 1.0)
    assert torch.allclose(pixels[:, 2], torch.tensor((51 - 127.5) / 127.5))


def test_accepts_loaded_video_and_rejects_bad_input(processor):
    from transformers_tempo.video_loading import load_video

    video = load_video(make_frames(4, width=64, height=64), video_metadata={"fps": 3.0})
    out = processor.process_video(video)
    assert out["segment_centers"] == [4 / 3.0]
    with pytest.raises(ValueError, match="real_fps"):
        processor.process_video(video.frames, real_fps=0)
    with pytest.raises(ValueError, match="uint8"):
        processor.process_video(video.frames.float(), real_fps=2.0)


# ---------------------------------------------------------------------------- images


def test_process_image_matches_qwen2vl_image_processor(processor):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image = Image.fromarray(natural_image(200, 300))
    ours = processor.process_image(image)
    ref = reference(images=[image], return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # the reference resizes with PIL here; our kernel is within one grey level of it
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1 / 127.5 + 1e-6

    shrunk = processor.process_image(np.asarray(natural_image(720, 1280)), resize_longer_edge=True)
    assert shrunk["image_grid_thw"].tolist() == [[1, 18, 32]]  # 512x288 -> smart_resize(32) -> 512x288


# ---------------------------------------------------------------------------- save / load


def test_save_and_load(tmp_path):
    custom = TempoVideoProcessor(longest_edge=448, max_frames=256, frames_per_segment=4)
    custom.save_pretrained(tmp_path / "vp")
    loaded = TempoVideoProcessor.from_pretrained(tmp_path / "vp")
    assert loaded.to_dict() == custom.to_dict()
    assert loaded.longest_edge == 448 and loaded.max_frames == 256 and loaded.frames_per_segment == 4
    overridden = TempoVideoProcessor.from_pretrained(tmp_path / "vp", fps=1.0)
    assert overridden.fps == 1.0


def test_round_trip_inside_a_processor(tmp_path):
    from transformers import ProcessorMixin

    class VideoOnlyProcessor(ProcessorMixin):
        def __init__(self, video_processor=None, **kwargs):
            super().__init__(video_processor, **kwargs)

        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

        @classmethod
        def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
            return [TempoVideoProcessor.from_pretrained(path, **kwargs)]

    VideoOnlyProcessor(TempoVideoProcessor(min_frames=4)).save_pretrained(tmp_path / "p")
    loaded = VideoOnlyProcessor.from_pretrained(tmp_path / "p")
    assert isinstance(loaded.video_processor, TempoVideoProcessor)
    assert loaded.video_processor.min_frames == 4


def test_chunked_upload_and_resize_equals_whole_clip_resize():
    frames = torch.from_numpy(np.stack([natural_image(120, 200, seed=s) for s in range(7)]))
    sizes = [(90, 150), (64, 96)]
    whole = frames.permute(0, 3, 1, 2)
    for size in sizes:
        whole = resize_frames(whole, size)
    streamed = upload_and_resize(frames, "cpu", sizes, chunk=3)
    assert streamed.shape == (7, 3, 64, 96) and streamed.dtype == torch.uint8
    assert torch.equal(streamed, whole)


def test_pixel_dtype_is_the_cast_of_the_float32_result(processor):
    frames = torch.from_numpy(np.stack([natural_image(120, 200, seed=s) for s in range(10)]))
    full = processor.process_video(frames, real_fps=2.0)
    half = processor.process_video(frames, real_fps=2.0, dtype=torch.bfloat16, output_device="cpu")
    assert half["pixel_values_videos"].dtype == torch.bfloat16
    assert torch.equal(half["pixel_values_videos"], full["pixel_values_videos"].to(torch.bfloat16))
    assert torch.equal(half["video_grid_thw"], full["video_grid_thw"])


# ---------------------------------------------------------------------------- GPU


@needs_cuda
def test_cuda_matches_cpu(processor):
    frames = torch.from_numpy(np.stack([natural_image(720, 1280, seed=s) for s in range(9)]))
    cpu = processor.process_video(frames, real_fps=2.0)
    gpu = processor.process_video(frames, real_fps=2.0, device="cuda")
    assert gpu["pixel_values_videos"].is_cuda
    assert torch.equal(gpu["video_grid_thw"].cpu(), cpu["video_grid_thw"])
    diff = (gpu["pixel_values_videos"].cpu() - cpu["pixel_values_videos"]).abs() * 127.5
    assert diff.max() <= 4 and diff.mean() < 0.5
    image = processor.process_image(natural_image(300, 500), device="cuda")
    assert image["pixel_values"].is_cuda
    # made on the GPU, handed back in pinned host memory in bf16: the same values
    host = processor.process_video(frames, real_fps=2.0, device="cuda", dtype=torch.bfloat16, output_device="cpu")
    assert host["pixel_values_videos"].device.type == "cpu" and host["pixel_values_videos"].is_pinned()
    assert torch.equal(host["pixel_values_videos"], gpu["pixel_values_videos"].to(torch.bfloat16).cpu())


def _noisy(index, width, height):
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
