"""Offline preference data: a JSONL file of ``{"prompt", "chosen", "rejected"}`` records.

``prompt`` is a string (sent through the tokenizer's chat template as one user turn when the
tokenizer has one) or a list of chat messages; ``chosen`` and ``rejected`` are the response
strings.  Responses are tokenised without special tokens and end with the EOS token, which
is what the policy emits at the end of its own samples.  Every error names the file and line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Union

from megatron_spin.pairs import PreferencePair

Prompt = Union[str, list]


class DataFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: Prompt
    chosen: str
    rejected: str
    where: str  # "file:line", for messages


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferenceRecord]:
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such preference file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataFileError(f"{where}: expected a JSON object")
            for key in ("prompt", "chosen", "rejected"):
                if key not in obj:
                    raise DataFileError(f"{where}: missing key '{key}'")
            if not isinstance(obj["prompt"], (str, list)):
                raise DataFileError(f"{where}: 'prompt' must be a string or a list of chat messages")
            for key in ("chosen", "rejected"):
                if not isinstance(obj[key], str) or not obj[key].strip():
                    raise DataFileError(f"{where}: '{key}' must be a non-empty string")
            records.append(PreferenceRecord(obj["prompt"], obj["chosen"], obj["rejected"], where))
    if not records:
        raise DataFileError(f"{path}: no records")
    return records


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Prompt token ids: through the chat template when there is one (and ``chat``), else the
    text's own tokens — ``chat=False`` adds no special token either (base models, plain text)."""
    if not chat:
        if not isinstance(prompt, str):
            raise DataFileError("prompt_format=plain needs string prompts, not chat messages")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    if not isinstance(prompt, str):
        raise DataFileError("chat-message prompts need a tokenizer with a chat template")
    return tokenizer(prompt)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def tokenize_preferences(
    records: list[PreferenceRecord], tokenizer, *, max_length: Optional[int] = None
) -> tuple[list[PreferencePair], int]:
    """Pairs for the records that fit ``max_length`` (prompt + longer response); returns (pairs, skipped)."""
    pairs, skipped = [], 0
    for r in records:
        prompt = encode_prompt(tokenizer, r.prompt)
        chosen, rejected = encode_response(tokenizer, r.chosen), encode_response(tokenizer, r.rejected)
        if max_length is not None and len(prompt) + max(len(chosen), len(rejected)) > max_length:
            skipped += 1
            continue
        pairs.append(PreferencePair(r.where, prompt, chosen, rejected, None, None, None))
    return pairs, skipped
