"""Reading and checking data files: every error names the file and the line.

A JSONL file is read as bytes and decoded line by line, so a byte that is not UTF-8 is
reported at its line and column rather than as a bare ``UnicodeDecodeError`` from deep in
the reader.  Text fields (prompts, responses, chat messages) are checked here, before any
tokenizer sees them: a NUL character (JSON's ``\\u0000``) is refused because tokenizers and
engines treat it as a string end or drop it, so the model would train on text other than
the file's; a chat message needs a string ``role`` and a string ``content``, which every
chat template assumes (a template fails on anything else without naming the record).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class DataFileError(ValueError):
    """A data file (or one of its records) cannot be used; the message starts with ``file[:line]``."""


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a readable regular file, or a :class:`DataFileError` saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such {what} file")
    if path.is_dir():
        raise DataFileError(f"{path}: is a directory, not a {what} file")
    return path


def jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for each non-blank line of a JSONL file; ``where`` is ``file:line``."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{where}: invalid JSON ({e.msg})") from None


def check_text(value: Any, where: str, key: str, *, allow_empty: bool = False) -> str:
    """A string field: a string, non-blank unless ``allow_empty``, without NUL characters."""
    if not isinstance(value, str):
        raise DataFileError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFileError(f"{where}: '{key}' is empty")
    if "\x00" in value:
        raise DataFileError(f"{where}: '{key}' contains a NUL character (\\u0000) at position {value.index(chr(0))}")
    return value


def check_prompt(value: Any, where: str, key: str = "prompt") -> str | list:
    """A prompt: non-blank text, or a non-empty list of chat messages ``{"role": str, "content": str}``."""
    if isinstance(value, str):
        return check_text(value, where, key)
    if not isinstance(value, list) or not value:
        raise DataFileError(f"{where}: '{key}' must be a string or a list of chat messages")
    for i, m in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataFileError(f"{where}: '{at}' must be a chat message object, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise DataFileError(f"{where}: '{at}' has no '{field}'")
        check_text(m["role"], where, f"{at}.role")
        check_text(m["content"], where, f"{at}.content", allow_empty=True)
    return value
