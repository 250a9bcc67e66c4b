"""Where a run's prompts come from and how they are cut and batched (the ``data`` section)."""

from __future__ import annotations

import dataclasses
import enum

from megatron_spin.errors import coerce_enums, require


class PromptFormat(enum.StrEnum):
    CHAT = "chat"  # one user turn through the tokenizer's chat template (chat messages as given)
    PLAIN = "plain"  # the text's own tokens, no template and no special tokens (base models)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # JSONL or Parquet prompt files, or packaged sets (``packaged:movie_reviews/train``)
    train_files: tuple[str, ...] = ("packaged:movie_reviews/train",)
    val_files: tuple[str, ...] = ("packaged:movie_reviews/val",)  # held-out prompts (may be empty)
    prompt_key: str = "prompt"
    response_key: str = "response"  # ground-truth response (SPIN's chosen side)
    answer_key: str = "answer"  # reference answer (rule rewards)
    prompt_format: PromptFormat = PromptFormat.CHAT
    max_prompt_length: int = 256  # tokens; longer prompts are dropped (and counted)
    max_response_length: int = 64  # new tokens per sample
    train_batch_size: int = 8  # prompts per step
    val_size: int = 32  # held-out prompts scored at every test step (0: all)
    shuffle: bool = True
    seed: int = 1

    def __post_init__(self) -> None:
        coerce_enums(self, prompt_format=PromptFormat)
        require(bool(self.train_files), "train_files", "give prompt files (JSONL or Parquet) or a packaged set, "
                "e.g. [packaged:movie_reviews/train]")
        for key in ("max_prompt_length", "max_response_length", "train_batch_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.val_size >= 0, "val_size", f"must be >= 0, got {self.val_size}")
