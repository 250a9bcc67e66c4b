"""OpenAI-shaped replies from the engine's completions: text, stop-string cuts, log-probs, usage.

Text.  A choice's text is its output decoded with special tokens skipped, cut before the first
occurrence of any stop string (finish reason ``"stop"``).  The engine stops a row at the token
that completes a stop string, so the tokens lying wholly inside the string are generated but not
part of the text: the log-probs list only the tokens whose text starts before the cut (a token
straddling the cut is kept), while ``usage.completion_tokens`` counts every generated token (the
work done, as SGLang reports it).

Log-probs.  Completions: OpenAI's legacy object — ``tokens`` (each token decoded alone),
``token_logprobs``, ``top_logprobs`` (per position a ``{token: logprob}`` dict of the ``k`` best,
``{}`` for ``k = 0``) and ``text_offset`` (where each token starts in the returned text).  With
``echo`` the prompt's tokens come first, the first one with ``null`` log-prob and top log-probs
(it has no context), as OpenAI answers; this is what lm-eval slices with ``[ctxlen:-1]``.  Chat:
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

Offsets and streaming both use :class:`TextPieces`, the incremental detokenisation of TGI and
vLLM: each new token's text is the growth of a short decoded window, so a character split over
several byte tokens appears once it is complete.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Optional, Sequence

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.embedded.openai_requests import OpenAIRequest

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class TextPieces:
    """The text of a growing token sequence, one piece per token (special tokens skipped).

    A token's piece is what decoding a short window ending at it adds to decoding the window
    without it; a token that leaves an incomplete character adds nothing until the one that
    completes it.  ``text`` is the concatenation of the pieces so far."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here ...
        self.read = 0  # ... and the text of ids[prefix:read] has been emitted
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += piece
        return piece


def token_offsets(tokenizer, ids: Sequence[int], limit: int) -> list[int]:
    """Where each token's text starts (at most ``limit``, the length of the text they form)."""
    pieces, offsets = TextPieces(tokenizer), []
    for t in ids:
        offsets.append(min(len(pieces.text), limit))
        pieces.push(t)
    return offsets


@dataclasses.dataclass(frozen=True)
class ChoiceText:
    """One sample's returned text, its finish reason, and its tokens that start inside the text."""

    text: str
    finish_reason: str
    kept: int  # output tokens listed in the log-probs
    offsets: tuple[int, ...]  # their start offsets in ``text``


def choice_text(tokenizer, c: P.Completion, stop: Sequence[str]) -> ChoiceText:
    full = tokenizer.decode(c.output_ids, skip_special_tokens=True)
    text, stopped = cut_at_stop(full, stop)
    offsets = token_offsets(tokenizer, c.output_ids, len(full))
    kept = sum(1 for o in offsets if o < len(text)) if stopped else len(offsets)
    return ChoiceText(text, "stop" if stopped else c.finish_reason, kept, tuple(offsets[:kept]))


class _TokenText:
    """Each token decoded alone (special tokens shown), memoised over one reply."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


def _completion_logprobs(tokenizer, req: OpenAIRequest, c: P.Completion, ct: ChoiceText,
                         echo_text: Optional[str]) -> dict:
    name = _TokenText(tokenizer)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token: int, logprob: Optional[float], top: Optional[P.TopLogprobs], offset: int, first: bool) -> None:
        out["tokens"].append(name(token))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if first else {name(t): lp for t, lp in (top or ())})
        out["text_offset"].append(offset)

    base = 0
    if echo_text is not None:
        prompt = req.generate.input_ids[c.prompt_index]
        tops = c.input_top_logprobs or (None,) * len(prompt)
        for p, (token, offset) in enumerate(zip(prompt, token_offsets(tokenizer, prompt, len(echo_text)))):
            add(token, c.input_logprobs[p], tops[p], offset, first=p == 0)
        base = len(echo_text)
    tops = c.output_top_logprobs or (None,) * len(c.output_ids)
    for i in range(ct.kept):
        add(c.output_ids[i], c.output_logprobs[i], tops[i], base + ct.offsets[i], first=False)
    return out


def _chat_logprobs(tokenizer, c: P.Completion, ct: ChoiceText) -> dict:
    name = _TokenText(tokenizer)

    def entry(token: int, logprob: float) -> dict:
        text = name(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    tops = c.output_top_logprobs or ((),) * len(c.output_ids)
    return {"content": [{**entry(c.output_ids[i], c.output_logprobs[i]),
                         "top_logprobs": [entry(t, lp) for t, lp in tops[i]]} for i in range(ct.kept)]}


def usage(req: OpenAIRequest, replies: list[list[P.Completion]]) -> dict:
    """Prompt tokens once per prompt (not per sample, as SGLang counts), every generated token."""
    prompt = sum(len(p) for p in req.generate.input_ids)
    completion = sum(len(c.output_ids) for per_prompt in replies for c in per_prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def reply_id(req: OpenAIRequest) -> str:
    return ("chatcmpl-" if req.route == P.CHAT_COMPLETIONS else "cmpl-") + uuid.uuid4().hex


def completion_reply(tokenizer, req: OpenAIRequest, replies: list[list[P.Completion]], model: str) -> dict:
    """``/v1/completions``: the reply (choices prompt-major, as SGLang orders them)."""
    choices = []
    for per_prompt in replies:
        for c in per_prompt:
            ct = choice_text(tokenizer, c, req.stop)
            echo = req.echo_texts[c.prompt_index] if req.echo_texts is not None else None
            choices.append({
                "index": len(choices), "text": (echo or "") + ct.text, "finish_reason": ct.finish_reason,
                "logprobs": None if req.logprobs is None else _completion_logprobs(tokenizer, req, c, ct, echo),
            })
    return {"id": reply_id(req), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(req, replies),
            "metadata": {"weight_version": replies[0][0].weight_version}}  # SGLang's place for it


def chat_reply(tokenizer, req: OpenAIRequest, replies: list[list[P.Completion]], model: str) -> dict:
    """``/v1/chat/completions``: the reply."""
    choices = []
    for c in replies[0]:
        ct = choice_text(tokenizer, c, req.stop)
        choices.append({
            "index": len(choices), "message": {"role": "assistant", "content": ct.text},
            "finish_reason": ct.finish_reason,
            "logprobs": None if req.logprobs is None else _chat_logprobs(tokenizer, c, ct),
        })
    return {"id": reply_id(req), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(req, replies),
            "metadata": {"weight_version": replies[0][0].weight_version}}


class StreamedText:
    """One choice's text as it streams: every delta keeps the text sent so far a prefix of the
    final text — an incomplete character, and a tail that may be the start of a stop string, are
    held back until the next token settles them."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.pieces = TextPieces(tokenizer)
        self.stop = tuple(stop)
        self.sent = ""

    def push(self, token: int) -> str:
        self.pieces.push(token)
        text, stopped = cut_at_stop(self.pieces.text, self.stop)
        if not stopped:
            text = text[:len(text) - _stop_prefix_len(text, self.stop)]
        return self._advance(text)

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the reply's text, cut); empty if the stream went astray."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""  # a tokenizer that rewrites earlier text (space clean-up): wait for the end
        delta, self.sent = text[len(self.sent):], text
        return delta


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
