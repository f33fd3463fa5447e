import pytest
import torch

from transformers_tempo.testing_utils import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def demo_cache_of_its_own(tmp_path_factory):
    """The `tempo` command's demo model and video go to a folder of the test session's, never to the
    user's ~/.cache (and every session starts without them, as on a fresh machine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEMPO_CACHE", str(tmp_path_factory.mktemp("tempo-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Shared read-only tiny model; tests that change weights or modes build their own."""
    return build_tiny_model(tokenizer)


class HandBuiltInputs:
    """Model inputs built by hand, independently of TempoProcessor.

    Each sample is a number of video segments (or the string "image", or 0 for text only). A
    compressor row: a short prompt, per temporal patch a timestamp + vision tokens, a query that
    varies in length per row (so rows need right padding), and the generation prompt.
    """

    def __init__(self, tokenizer, samples, grid=(2, 4, 4), seed=0, padding_side="left", answer=None):
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        tid = tokenizer.convert_tokens_to_ids
        vs, ve, vp, ip = tid("<|vision_start|>"), tid("<|vision_end|>"), tid("<|video_pad|>"), tid("<|image_pad|>")
        gen = torch.Generator().manual_seed(seed)
        t, h, w = grid
        per_patch = (h // 2) * (w // 2)
        rows, video_grids, image_grids, video_pix, image_pix = [], [], [], [], []
        decoder_rows, ts_masks, label_rows = [], [], []
        for b, sample in enumerate(samples):
            dec = enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
            ts = [0] * len(dec)
            if sample == "image":
                row = enc("<|im_start|>user\n") + [vs] + [ip] * (per_patch) + [ve] + enc("\nQuery:\nred<|im_end|>\n")
                rows.append(row + enc("<|im_start|>assistant\n"))
                image_grids.append([1, h, w])
                image_pix.append(torch.randn(h * w, 1536, generator=gen))
                dec += [ip]
                ts += [0]
            else:
                for s in range(sample):
                    row = enc("<|im_start|>system\nYou are<|im_end|>\n<|im_start|>user\n")
                    for k in range(t):
                        row += enc(f"<{8 * s + 2 * k}.5 seconds>") + [vs] + [vp] * per_patch + [ve]
                    row += enc("\nQuery:\n" + "red " * (1 + (s + b) % 3) + "<|im_end|>\n<|im_start|>assistant\n")
                    rows.append(row)
                    video_grids.append([t, h, w])
                    video_pix.append(torch.randn(t * h * w, 1536, generator=gen))
                    stamp = enc(f"<{8 * s + 4}.0 seconds>")
                    dec += stamp + [vp]
                    ts += [1] * len(stamp) + [0]
            tail = enc("\nWhat colour is the video?<|im_end|>\n<|im_start|>assistant\n")
            dec += tail
            ts += [0] * len(tail)
            labels = [-100] * len(dec)
            if answer is not None:
                ans = enc(answer + "<|im_end|>")
                dec += ans
                ts += [0] * len(ans)
                labels += ans
            decoder_rows.append(dec)
            ts_masks.append(ts)
            label_rows.append(labels)

        pad = tokenizer.pad_token_id
        self.input_ids, self.attention_mask = _pad(decoder_rows, pad, padding_side)
        self.timestamp_mask, _ = _pad(ts_masks, 0, padding_side)
        self.labels, _ = _pad(label_rows, -100, padding_side)
        self.compressor_input_ids = self.compressor_attention_mask = None
        if rows:
            self.compressor_input_ids, self.compressor_attention_mask = _pad(rows, pad, "right")
        self.video_grid_thw = torch.tensor(video_grids) if video_grids else None
        self.pixel_values_videos = torch.cat(video_pix) if video_pix else None
        self.image_grid_thw = torch.tensor(image_grids) if image_grids else None
        self.pixel_values = torch.cat(image_pix) if image_pix else None

    def model_inputs(self, with_labels=False):
        keys = [
            "input_ids",
            "attention_mask",
            "timestamp_mask",
            "compressor_input_ids",
            "compressor_attention_mask",
            "pixel_values_videos",
            "video_grid_thw",
            "pixel_values",
            "image_grid_thw",
        ]
        if with_labels:
            keys.append("labels")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _pad(rows, value, side):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@pytest.fixture
def hand_inputs(tokenizer):
    def make(samples, **kwargs):
        return HandBuiltInputs(tokenizer, samples, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The shared tiny model saved with its processor (read-only: tests that change it save their own)."""
    from transformers_tempo import TempoProcessor, TempoVideoProcessor

    path = tmp_path_factory.mktemp("tiny-tempo")
    build_tiny_model(tokenizer).save_pretrained(path)
    TempoProcessor(video_processor=TempoVideoProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _restore_log_levels():
    """`tempo` (cli.main) quiets the package's loggers for its process; in-process tests put them back."""
    import logging

    names = ["transformers_tempo", "transformers_tempo.video_loading", "transformers_tempo.token_allocation"]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
