"""A conversation about one video: `VideoChat` (Python) and `tempo chat` (the shell).

The video is decoded and its vision-tower output computed once. Each turn the decoder reads the
earlier questions and answers, then the video and the new question (the video sits in the current
turn); the compressor reads the new question, so every turn compresses the video for what is asked
now, as Tempo does for a single question.
"""

from __future__ import annotations

import torch

from .processing_tempo import PendingVideo
from .video_loading import LoadedVideo

__all__ = ["VideoChat"]


class VideoChat:
    """Ask about one decoded video, turn after turn.

    ```python
    chat = VideoChat(model, processor, load_video("match.mp4"), max_new_tokens=64)
    chat.ask("Who scores?")
    chat.ask("And what does he do after that?")   # sees the first question and answer
    ```

    Args:
        model: a `TempoForConditionalGeneration`.
        processor: its `TempoProcessor`.
        video: the decoded video (`load_video`).
        **generate_kwargs: options for every turn's `generate` (allocation options included).
    """

    def __init__(self, model, processor, video: LoadedVideo, **generate_kwargs):
        self.model, self.processor, self.video = model, processor, video
        self.generate_kwargs = generate_kwargs
        self.history: list[tuple[str, str]] = []  # (question, answer) per finished turn
        self._features = None  # the video's vision features, after the first turn

    def messages(self, question: str) -> list[dict]:
        """This turn's conversation: earlier turns as text, then the video and `question`."""
        messages = []
        for asked, answered in self.history:
            messages.append({"role": "user", "content": [{"type": "text", "text": asked}]})
            messages.append({"role": "assistant", "content": answered})
        # after the first turn the features are known: the processor builds the layout, no pixels
        video = self.video if self._features is None else PendingVideo.layout_of(self.video)
        messages.append({"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]})
        return messages

    @torch.inference_mode()
    def ask(self, question: str) -> str:
        inputs = self.processor.apply_chat_template(self.messages(question), add_generation_prompt=True)
        inputs.pop("segment_times", None)
        inputs = inputs.to(self.model.device)
        if self._features is None:
            self._features = self.model.encode_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        out = self.model.generate(**inputs, video_features=self._features, **self.generate_kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        answer = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        self.history.append((question, answer))
        return answer
