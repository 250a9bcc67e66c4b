"""A Hugging Face sequence-classification reward model, scored in batches.

The reward is the model's logit for ``label`` (default: the last) on the chat-formatted
conversation (user prompt, assistant response) when the tokenizer has a chat template,
else on ``prompt + response``.  Batches of ``batch_size`` texts are padded together;
inference runs under ``torch.inference_mode`` on ``device`` (the platform's by default).
Several Ray reward workers each hold one instance (see ``orchestrate``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_spin import platform
from megatron_spin.reward.base import RewardInput, RewardSource


class HFRewardModel(RewardSource):
    name = "hf_reward_model"

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, label: int = -1,
                 device: Optional[str] = None, dtype: str = "float32"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device or platform.current().device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length, self.label = batch_size, max_length, label

    def _text(self, x: RewardInput) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": x.prompt}, {"role": "assistant", "content": x.response}], tokenize=False)
        return x.prompt + x.response

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(inputs), self.batch_size):
            texts = [self._text(x) for x in inputs[start:start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits  # [b, num_labels]
            out += logits[:, self.label].float().cpu().tolist()
        return out
