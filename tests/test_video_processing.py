"""Frames -> Qwen3-VL patches: resize chain, segments, timestamps, patch layout, save/load."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

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
    resize_frames_pil,
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


@needs_cuda
def test_processor_hands_back_complete_host_pixels_from_the_gpu(tokenizer):
    """Pixels made on the GPU and handed back in pinned host memory are the GPU pixels; the grid
    stays on the CPU, as transformers' processors return it."""
    from transformers_tempo import TempoProcessor

    frames = torch.from_numpy(np.stack([natural_image(720, 1280, seed=s) for s in range(48)])).pin_memory()
    processor = TempoProcessor(TempoVideoProcessor(), tokenizer)
    options = dict(text="q", videos=frames, video_metadata={"fps": 2.0}, device="cuda", pixel_dtype=torch.bfloat16)
    on_gpu = processor(**options)
    on_host = processor(**options, pixel_device="cpu")
    assert on_host["pixel_values_videos"].device.type == "cpu" and on_host["video_grid_thw"].device.type == "cpu"
    assert torch.equal(on_host["pixel_values_videos"], on_gpu["pixel_values_videos"].cpu())
    assert torch.equal(on_host["video_grid_thw"], on_gpu["video_grid_thw"].cpu())


def _noisy(index, width, height):
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- exact (PIL) resize mode


def released_pil_chain(frames: np.ndarray, qwen3vl_video_processor, segment_length: int = 8):
    """The released video chain, written out independently of the package: PIL for the longer-edge
    resize and qwen-vl-utils 0.0.14's `fetch_image`, torchvision v1's float bicubic for the clip
    resize, transformers' Qwen3-VL video processor for the rest. One segment at a time."""

    def longer_edge(image):  # the released resize_images(resolution=512)
        w, h = image.size
        if max(w, h) <= 512:
            return image
        ratio = 512 / max(w, h)
        size = (max(16, int(round(w * ratio / 16) * 16)), max(16, int(round(h * ratio / 16) * 16)))
        return image.resize(size, resample=Image.Resampling.BICUBIC)

    def qwen_smart_resize(height, width, factor, min_pixels, max_pixels):  # qwen-vl-utils 0.0.14
        h_bar = max(factor, round(height / factor) * factor)
        w_bar = max(factor, round(width / factor) * factor)
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h_bar = math.floor(height / beta / factor) * factor
            w_bar = math.floor(width / beta / factor) * factor
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def fetch_image(image):  # image_patch_size 32 (fetch_video's image factor) -> factor 64
        image = image.convert("RGB")
        width, height = image.size
        h, w = qwen_smart_resize(height, width, 64, 4 * 64 * 64, 16384 * 64 * 64)
        return image.resize((w, h))  # Pillow's default filter for RGB: bicubic

    images = [fetch_image(longer_edge(Image.fromarray(frame))) for frame in frames]
    pixels, grids = [], []
    for start in range(0, len(images), segment_length):
        segment = images[start : start + segment_length]
        if len(segment) % 2:
            segment = segment + [segment[-1]]
        clip = torch.stack([torch.from_numpy(np.array(image).transpose(2, 0, 1)) for image in segment])
        n, _, height, width = clip.shape
        min_pixels = 128 * 32 * 32
        max_pixels = max(min(768 * 32 * 32, 128000 * 32 * 32 * 0.9 / n * 2), int(min_pixels * 1.05))
        size = qwen_smart_resize(height, width, 32, min_pixels, max_pixels)
        if size != (height, width):  # torchvision.transforms.functional.resize, bicubic, antialias, uint8
            resized = torch.nn.functional.interpolate(
                clip.float(), size=size, mode="bicubic", align_corners=False, antialias=True
            )
            clip = resized.clamp(0, 255).round().to(torch.uint8)
        ref = qwen3vl_video_processor(
            videos=[clip.float()], do_resize=False, do_sample_frames=False, do_convert_rgb=False,
            cap_pixels_per_frame=True, return_tensors="pt",
        )
        pixels.append(ref["pixel_values_videos"])
        grids.append(ref["video_grid_thw"])
    return torch.cat(pixels), torch.cat(grids)


@pytest.mark.parametrize("width, height", [(1280, 720), (700, 500), (160, 96), (720, 1280)])
def test_pil_mode_equals_the_released_chain_bit_for_bit(processor, qwen3vl_video_processor, width, height):
    frames = np.stack([natural_image(height, width, seed=s) for s in range(9)])  # segments of 8 and 1 (+1)
    expected_pixels, expected_grid = released_pil_chain(frames, qwen3vl_video_processor)

    exact = processor.process_video(torch.from_numpy(frames), real_fps=2.0, resize_backend="pil")
    assert torch.equal(exact["video_grid_thw"], expected_grid)
    assert torch.equal(exact["pixel_values_videos"], expected_pixels)
    assert torch.equal(TempoVideoProcessor(resize_backend="pil").process_video(frames, 2.0)["pixel_values_videos"],
                       expected_pixels)

    # the default (torch kernels) stays within 2 grey levels of it
    fast = processor.process_video(torch.from_numpy(frames), real_fps=2.0)
    assert torch.equal(fast["video_grid_thw"], expected_grid)
    assert (fast["pixel_values_videos"] - expected_pixels).abs().max() * 127.5 <= 2 + 1e-4


def test_pil_resize_is_pillow_bicubic_frame_by_frame():
    frames = np.stack([natural_image(120, 200, seed=s) for s in range(5)])
    sizes = [(96, 160), (64, 128)]
    out = resize_frames_pil(frames, sizes, num_workers=2)
    assert out.shape == (5, 3, 64, 128) and out.dtype == torch.uint8
    for frame, ours in zip(frames, out):
        image = Image.fromarray(frame).resize((160, 96), Image.BICUBIC).resize((128, 64), Image.BICUBIC)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), np.asarray(image))
    assert torch.equal(resize_frames_pil(frames, sizes, num_workers=1), out)  # threads change nothing


def test_pil_mode_from_the_processor_call_and_saved(tmp_path, tokenizer):
    from transformers_tempo import TempoProcessor

    frames = np.stack([natural_image(300, 640, seed=s) for s in range(4)])
    pil_processor = TempoProcessor(TempoVideoProcessor(resize_backend="pil"), tokenizer)
    per_call = TempoProcessor(TempoVideoProcessor(), tokenizer)(
        text="q", videos=frames, video_metadata={"fps": 2.0}, resize_backend="pil"
    )
    by_attribute = pil_processor(text="q", videos=frames, video_metadata={"fps": 2.0})
    direct = TempoVideoProcessor().process_video(frames, 2.0, resize_backend="pil")
    assert torch.equal(per_call["pixel_values_videos"], direct["pixel_values_videos"])
    assert torch.equal(by_attribute["pixel_values_videos"], direct["pixel_values_videos"])
    assert not torch.equal(TempoVideoProcessor().process_video(frames, 2.0)["pixel_values_videos"],
                           direct["pixel_values_videos"])  # the two kernels do differ on this picture

    pil_processor.save_pretrained(tmp_path)
    assert TempoProcessor.from_pretrained(tmp_path).video_processor.resize_backend == "pil"
    with pytest.raises(ValueError, match="resize_backend must be one of"):
        pil_processor(text="q", videos=frames, video_metadata={"fps": 2.0}, resize_backend="cv2")
    with pytest.raises(ValueError, match="resize_backend must be one of"):
        TempoVideoProcessor(resize_backend="PIL")


def test_pil_mode_for_the_longer_edge_of_images():
    image = natural_image(720, 1280)
    exact = TempoVideoProcessor(resize_backend="pil").process_image(image, resize_longer_edge=True)
    shrunk = np.array(Image.fromarray(image).resize((512, 288), Image.BICUBIC))
    assert torch.equal(exact["pixel_values"], TempoVideoProcessor().process_image(shrunk)["pixel_values"])


# ---------------------------------------------------------------------------- transformers video-processor contract

FIXTURES = Path(__file__).parent / "fixtures" / "saved_2026_12_01"


def test_is_a_transformers_video_processor_without_torchvision():
    from transformers.video_processing_utils import BaseVideoProcessor

    assert isinstance(TempoVideoProcessor(), BaseVideoProcessor)
    # whether or not torchvision is installed, nothing above needed it


def test_save_writes_video_preprocessor_config_and_loads_back_identically(tmp_path):
    custom = TempoVideoProcessor(resize_backend="pil", num_frames=32, do_sample_frames=False, longest_edge=448)
    custom.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["video_preprocessor_config.json"]
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["resize_backend"] == "pil" and saved["num_frames"] == 32 and saved["do_sample_frames"] is False
    loaded = TempoVideoProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == custom.to_dict()
    assert (loaded.resize_backend, loaded.num_frames, loaded.do_sample_frames) == ("pil", 32, False)


def test_a_video_processor_saved_before_this_change_still_loads():
    # video_preprocessor_config.json written by the code of 2026-12-01 (before resize_backend,
    # num_frames, do_sample_frames existed) for TempoVideoProcessor(longest_edge=448, max_frames=256)
    loaded = TempoVideoProcessor.from_pretrained(FIXTURES / "video_preprocessor_config.json")
    assert loaded.to_dict() == TempoVideoProcessor(longest_edge=448, max_frames=256).to_dict()
    assert (loaded.resize_backend, loaded.num_frames, loaded.do_sample_frames) == ("torch", None, True)


def _auto_video_processor_round_trip(auto_class, tmp_path):
    custom = TempoVideoProcessor(resize_backend="pil", min_frames=4)
    custom.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is TempoVideoProcessor
    assert loaded.to_dict() == custom.to_dict()


def test_auto_video_processor_round_trip(tmp_path):
    import transformers_tempo  # noqa: F401  (registers Tempo with the auto classes)

    try:
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor

        _auto_video_processor_round_trip(AutoVideoProcessor, tmp_path)
    except ImportError as error:
        pytest.skip(f"AutoVideoProcessor cannot be used here: {error}")


def test_top_level_auto_video_processor_round_trip(tmp_path):
    import transformers

    import transformers_tempo  # noqa: F401

    try:
        transformers.AutoVideoProcessor.register
    except ImportError as error:  # transformers' placeholder without torchvision
        pytest.skip(f"transformers.AutoVideoProcessor needs torchvision here: {str(error).strip()[:60]}")
    _auto_video_processor_round_trip(transformers.AutoVideoProcessor, tmp_path)


def test_auto_video_processor_reads_a_saved_tempo_processor(tmp_path, tokenizer):
    from transformers_tempo import TempoProcessor

    try:
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    except ImportError as error:
        pytest.skip(f"AutoVideoProcessor cannot be used here: {error}")
    TempoProcessor(TempoVideoProcessor(longest_edge=384), tokenizer).save_pretrained(tmp_path)
    loaded = AutoVideoProcessor.from_pretrained(tmp_path)  # the "video_processor" entry of processor_config.json
    assert type(loaded) is TempoVideoProcessor and loaded.longest_edge == 384


# ---------------------------------------------------------------------------- metadata and sampling


@pytest.fixture(scope="module")
def clip_95_frames(tmp_path_factory):
    from transformers_tempo.synthetic import write_test_video

    return write_test_video(tmp_path_factory.mktemp("v") / "clip.mp4", num_frames=95, fps=30, width=96, height=64)


def test_decoded_metadata_is_a_video_metadata(clip_95_frames):
    from transformers.video_utils import VideoMetadata

    from transformers_tempo.video_loading import TempoVideoMetadata, load_video

    video = load_video(clip_95_frames)
    metadata = video.metadata
    assert isinstance(metadata, VideoMetadata) and isinstance(metadata, TempoVideoMetadata)
    # 95 frames at 30 fps: 3.1667 s -> round(6.33) = 6 -> 8 frames (min_frames); 8 / 3.1667 fps
    assert (metadata.total_num_frames, metadata.fps, metadata.video_backend) == (95, 30.0, "pyav")
    assert (metadata.height, metadata.width) == (64, 96)
    assert metadata.duration == pytest.approx(95 / 30)
    assert metadata.real_fps == pytest.approx(8 / (95 / 30))
    assert metadata.frames_indices == [0, 13, 27, 40, 54, 67, 81, 94]
    # transformers' own view of it: only VideoMetadata's fields
    plain = VideoMetadata(**metadata)
    assert plain.frames_indices == metadata.frames_indices and plain.fps == 30.0
    assert set(dict(metadata)) == {"total_num_frames", "fps", "width", "height", "duration", "video_backend",
                                   "frames_indices"}
    # the old names, on the video and on its metadata
    assert video.source_fps == metadata.source_fps == 30.0
    assert video.total_frames == metadata.total_frames == 95
    assert video.frame_indices == metadata.frame_indices == metadata.frames_indices
    assert video.real_fps == metadata.real_fps and video.duration == metadata.duration
    assert video.warnings == metadata.warnings == [] and video.stats["workers"] == 1
    # the sampled frames given back with their metadata keep their timing (real_fps, not the source's 30)
    again = load_video(video.frames, video_metadata=metadata)
    assert again.real_fps == video.real_fps and again.frame_indices == video.frame_indices


def _released_indices(total, source_fps, fps=2.0, min_frames=8, max_frames=1024):
    """The released sampling rule, written out independently: n = round(duration * fps) clamped,
    indices = round-half-even of linspace(0, total - 1, n)."""
    if total <= 1:
        return [0]
    n = min(max(max(1, round(total / source_fps * fps)), min_frames), max_frames)
    if n == 1:
        return [total - 1]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


@pytest.mark.parametrize("total, source_fps", [(1, 30), (7, 30), (95, 30), (300, 29.97), (3000, 25), (90000, 30)])
def test_sample_frames_gives_tempos_indices(processor, total, source_fps):
    from transformers.video_utils import VideoMetadata

    from transformers_tempo.video_loading import compute_sample_indices

    indices = processor.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps))
    assert indices.tolist() == _released_indices(total, source_fps)
    assert indices.tolist() == compute_sample_indices(total, source_fps)
    assert processor.sample_frames({"total_num_frames": total, "fps": source_fps}).tolist() == indices.tolist()


def test_sample_frames_fps_and_num_frames(processor):
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=300, fps=30.0)  # 10 s
    assert processor.sample_frames(metadata, fps=1.0).tolist() == _released_indices(300, 30.0, fps=1.0)
    # num_frames: exactly that many, spread as Tempo spreads them (no min_frames / max_frames)
    assert processor.sample_frames(metadata, num_frames=5).tolist() == [0, 75, 150, 224, 299]
    assert TempoVideoProcessor(num_frames=5).sample_frames(metadata).tolist() == [0, 75, 150, 224, 299]
    assert TempoVideoProcessor(num_frames=5).sample_frames(metadata, fps=1.0).tolist() == _released_indices(
        300, 30.0, fps=1.0
    )  # an explicit fps wins over the num_frames attribute
    with pytest.raises(ValueError, match="mutually exclusive"):
        processor.sample_frames(metadata, num_frames=5, fps=1.0)
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        processor.sample_frames(metadata, num_frames=0)


def test_a_file_is_decoded_at_the_sample_frames_indices(processor, clip_95_frames):
    from transformers_tempo.video_loading import load_video

    out = processor(str(clip_95_frames), return_metadata=True)
    metadata = out["video_metadata"]
    assert metadata.frames_indices == processor.sample_frames(metadata).tolist() == load_video(clip_95_frames).frame_indices
    expected = processor.process_video(load_video(clip_95_frames))
    assert torch.equal(out["pixel_values_videos"], expected["pixel_values_videos"])
    assert out["segment_centers"] == expected["segment_centers"]

    four = processor(str(clip_95_frames), num_frames=4, return_metadata=True)["video_metadata"]
    assert four.frames_indices == [0, 31, 63, 94] and four.real_fps == pytest.approx(4 / (95 / 30))
    with pytest.raises(ValueError, match="do_sample_frames=False"):
        processor(str(clip_95_frames), do_sample_frames=False)


def test_frames_given_as_a_whole_video_are_sampled_like_a_file(processor):
    frames = torch.from_numpy(make_frames(40, width=64, height=64))  # 4 s at 10 fps -> 8 frames at 2 fps
    out = processor(frames, video_metadata={"fps": 10.0}, return_metadata=True)
    indices = _released_indices(40, 10.0)
    assert out["video_metadata"].frames_indices == indices
    assert out["video_metadata"].real_fps == 8 / 4.0
    assert torch.equal(out["pixel_values_videos"], processor.process_video(frames[indices], 2.0)["pixel_values_videos"])

    # do_sample_frames=False: the frames are the sampled ones, at the metadata's fps
    as_given = processor(frames, video_metadata={"fps": 10.0}, do_sample_frames=False, return_metadata=True)
    assert as_given["video_grid_thw"].shape[0] == 5  # 40 frames in segments of 8
    assert as_given["video_metadata"].real_fps == 10.0
    assert torch.equal(as_given["pixel_values_videos"], processor.process_video(frames, 10.0)["pixel_values_videos"])


def test_pil_mode_survives_the_longer_edge_resize_while_loading(tmp_path):
    from transformers_tempo.synthetic import write_test_video
    from transformers_tempo.video_loading import load_video

    exact = TempoVideoProcessor(resize_backend="pil")
    frames = np.stack([natural_image(720, 1280, seed=s) for s in range(3)])
    shrunk = load_video(frames, video_metadata={"fps": 2.0}, max_longer_edge=512, resize_backend="pil")
    assert shrunk.frames.shape == (3, 288, 512, 3)
    assert torch.equal(exact.process_video(shrunk)["pixel_values_videos"], exact.process_video(frames, 2.0)["pixel_values_videos"])

    path = write_test_video(tmp_path / "hd.mp4", num_frames=4, fps=2, width=1280, height=720, color_fn=_noisy)
    whole = load_video(path)
    for backend in ("pil", "torch"):
        small = load_video(path, max_longer_edge=512, resize_backend=backend)
        same = torch.equal(exact.process_video(small)["pixel_values_videos"], exact.process_video(whole)["pixel_values_videos"])
        assert same is (backend == "pil")
    via_preprocess = exact(str(path), max_longer_edge=512)  # the processor's backend reaches load_video
    assert torch.equal(via_preprocess["pixel_values_videos"], exact.process_video(whole)["pixel_values_videos"])
    with pytest.raises(ValueError, match="resize_backend must be"):
        load_video(frames, max_longer_edge=512, resize_backend="pillow")


@needs_cuda
def test_pil_mode_on_cuda_equals_pil_mode_on_cpu(processor):
    frames = torch.from_numpy(np.stack([natural_image(720, 1280, seed=s) for s in range(9)]))
    cpu = processor.process_video(frames, real_fps=2.0, resize_backend="pil")
    gpu = processor.process_video(frames, real_fps=2.0, device="cuda", resize_backend="pil")
    assert gpu["pixel_values_videos"].is_cuda
    assert torch.equal(gpu["pixel_values_videos"].cpu(), cpu["pixel_values_videos"])
