"""Offline preference data: a JSONL file of ``{"prompt", "chosen", "rejected"}`` records.

``prompt`` is a string (sent through the tokenizer's chat template as one user turn when the
tokenizer has one) or a list of chat messages; ``chosen`` and ``rejected`` are the response
strings.  Responses are tokenised without special tokens and end with the EOS token, which
is what the policy emits at the end of its own samples.  Every error names the file and line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from megatron_spin.data.validate import DataFileError, check_prompt, check_text, existing_file, jsonl_objects
from megatron_spin.pairs import PreferencePair

Prompt = Union[str, list]


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: Prompt
    chosen: str
    rejected: str
    where: str  # "file:line", for messages


def read_preference_jsonl(path: str | os.PathLike) -> tuple[list[PreferenceRecord], int]:
    """(records, identical): a record whose ``chosen`` equals its ``rejected`` teaches nothing (its
    DPO gradient is zero) and is dropped and counted rather than trained on."""
    path = existing_file(path, "preference")
    records, identical = [], 0
    for where, obj in jsonl_objects(path):
        if not isinstance(obj, dict):
            raise DataFileError(f"{where}: expected a JSON object")
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise DataFileError(f"{where}: missing key '{key}'")
        prompt = check_prompt(obj["prompt"], where)
        chosen, rejected = (check_text(obj[key], where, key) for key in ("chosen", "rejected"))
        if chosen == rejected:
            identical += 1
            continue
        records.append(PreferenceRecord(prompt, chosen, rejected, where))
    if not records:
        raise DataFileError(f"{path}: no records" + (f" ({identical} with chosen == rejected, dropped)"
                                                     if identical else ""))
    return records, identical


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Prompt token ids: through the chat template when there is one (and ``chat``), else the
    text's own tokens — ``chat=False`` adds no special token either (base models, plain text)."""
    if not chat:
        if not isinstance(prompt, str):
            raise DataFileError("prompt_format=plain needs string prompts, not chat messages")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # the template's own rules (jinja raises its own types): name the record
            raise DataFileError(f"the tokenizer's chat template refused the messages ({exc})") from None
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
        try:
            prompt = encode_prompt(tokenizer, r.prompt)
        except DataFileError as exc:
            raise DataFileError(f"{r.where}: {exc}") from None
        chosen, rejected = encode_response(tokenizer, r.chosen), encode_response(tokenizer, r.rejected)
        if max_length is not None and len(prompt) + max(len(chosen), len(rejected)) > max_length:
            skipped += 1
            continue
        pairs.append(PreferencePair(r.where, prompt, chosen, rejected, None, None, None))
    return pairs, skipped
