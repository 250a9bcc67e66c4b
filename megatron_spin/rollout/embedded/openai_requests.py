"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` bodies, parsed into the engine's records.

A body becomes one :class:`OpenAIRequest`: the engine's :class:`GenerateRequest` (prompt token
ids, sampling, log-prob options) plus what only the reply needs (echo texts, log-prob count,
streaming).  Every field is checked here, before anything is queued, and a field the engine
cannot honour is refused — a 400 that names it (:class:`OpenAIRequestError`), never silently
ignored, because a client that asked for a penalty, a tool call or a JSON schema and got plain
text back would not notice.

Completions (``prompt``: a string, a list of strings, a list of token ids, or a list of token-id
lists — lm-eval sends token ids)::

    max_tokens (16; 0 with echo scores the prompt only)  temperature (1)  top_p (1)  n (1)
    seed  stop (string or list)  logprobs (k <= 20: top-k per position)  echo  stream
    stream_options.include_usage  user  model (any name, as SGLang accepts any)
    SGLang's extensions the engine has: top_k, ignore_eos, stop_token_ids

Chat (``messages``: system/developer/user/assistant turns whose content is a string or a list
of text parts, rendered with the tokenizer's chat template and ``add_generation_prompt``)::

    max_completion_tokens or max_tokens (default: the rest of the context)  logprobs (bool)
    top_logprobs (k <= 20, needs logprobs)  and the sampling, stream and harmless fields above

Accepted only at their neutral value (anything else is a 400): ``presence_penalty`` and
``frequency_penalty`` 0, ``logit_bias``/``suffix``/``tools``/``functions`` empty, ``best_of`` equal
to ``n``, ``tool_choice``/``function_call`` "none" or "auto", ``response_format`` text, and
SGLang's ``repetition_penalty`` 1, ``min_p`` 0, ``min_tokens`` 0, ``regex``/``json_schema``/``ebnf``
null, ``skip_special_tokens`` true, ``no_stop_trim`` false.  An unknown field is a 400 too (as
OpenAI answers it).  Streaming with log-probs is refused (``logprobs``): deltas are cut on text,
not on tokens.  Text prompts are tokenised as SGLang does (the tokenizer's special tokens added);
``max_tokens: 0`` is accepted, as OpenAI's legacy API did (SGLang 0.5.23 refuses it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from megatron_spin.rollout import protocol as P

MAX_TOP_LOGPROBS = P.MAX_TOP_LOGPROBS
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields with no effect on what is generated.
HARMLESS = frozenset({"model", "user", "stream", "stream_options", "metadata", "store", "service_tier",
                      "parallel_tool_calls"})


def _neutral_number(value: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == value


# field -> (is the value neutral, what the neutral values are): anything else changes what is generated.
NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "presence_penalty": (_neutral_number(0), "0"),
    "frequency_penalty": (_neutral_number(0), "0"),
    "repetition_penalty": (_neutral_number(1), "1"),
    "min_p": (_neutral_number(0), "0"),
    "min_tokens": (_neutral_number(0), "0"),
    "logit_bias": (lambda v: v == {}, "{}"),
    "suffix": (lambda v: v == "", "empty"),
    "tools": (lambda v: v == [], "empty"),
    "functions": (lambda v: v == [], "empty"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "regex": (lambda v: False, "null"),
    "json_schema": (lambda v: False, "null"),
    "ebnf": (lambda v: False, "null"),
    "skip_special_tokens": (lambda v: v is True, "true"),
    "no_stop_trim": (lambda v: v is False, "false"),
}
SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "n", "seed", "stop", "top_k", "ignore_eos",
                      "stop_token_ids", "best_of"})
COMPLETION_FIELDS = SAMPLING | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


class OpenAIRequestError(P.ProtocolError):
    """A request the OpenAI routes refuse (400); ``param`` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """One parsed OpenAI request.  ``echo_texts``: the text each prompt's choices start with
    (completions with ``echo``); ``logprobs``: ``k`` best tokens per position (None: no log-probs)."""

    route: str  # P.COMPLETIONS or P.CHAT_COMPLETIONS
    generate: P.GenerateRequest
    echo_texts: Optional[tuple[str, ...]] = None
    logprobs: Optional[int] = None
    stream: bool = False
    include_usage: bool = False

    @property
    def stop(self) -> tuple[str, ...]:
        return self.generate.sampling.stop


class _Body:
    """Typed reads of a request body, each refusing a bad value with an error naming the field."""

    def __init__(self, d: Any, route: str, known: frozenset[str]):
        if not isinstance(d, dict):
            raise OpenAIRequestError(f"{route}: the body must be a JSON object")
        self.d, self.route = d, route
        for key, value in d.items():
            if key in known or key in HARMLESS or value is None:
                continue
            if key in NEUTRAL:
                neutral, allowed = NEUTRAL[key]
                if not neutral(value):
                    raise OpenAIRequestError(f"{route}: {key!r} is not supported by this engine (only {allowed} "
                                             f"is accepted, got {value!r})"[:300], key)
                continue
            raise OpenAIRequestError(f"{route}: unsupported field {key!r}", key)

    def get(self, key: str, default=None):
        value = self.d.get(key)
        return default if value is None else value

    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
            raise OpenAIRequestError(f"{self.route}: {key!r} must be {bound}, got {value!r}"[:300], key)
        return value

    def number(self, key: str, default: float, ok: Callable[[float], bool], rule: str) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise OpenAIRequestError(f"{self.route}: {key!r} must be {rule}, got {value!r}"[:300], key)
        return float(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise OpenAIRequestError(f"{self.route}: {key!r} must be true or false, got {value!r}"[:300], key)
        return value

    def stream(self) -> tuple[bool, bool]:
        """``stream`` and ``stream_options.include_usage``."""
        stream = self.boolean("stream")
        options = self.get("stream_options", {})
        if not isinstance(options, dict):
            raise OpenAIRequestError(f"{self.route}: 'stream_options' must be an object", "stream_options")
        for key, value in options.items():
            if key != "include_usage" and value not in (None, False):
                raise OpenAIRequestError(f"{self.route}: unsupported field 'stream_options.{key}'",
                                         f"stream_options.{key}")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise OpenAIRequestError(f"{self.route}: 'stream_options.include_usage' must be true or false",
                                     "stream_options.include_usage")
        return stream, include_usage

    def sampling(self, max_tokens: int) -> P.SamplingParams:
        n = self.integer("n", 1, 1)
        best_of = self.integer("best_of", n, 1)
        if best_of != n:  # best_of > n ranks samples by log-prob and returns the best n: not done here
            raise OpenAIRequestError(f"{self.route}: 'best_of' must equal n ({n}) on this engine, got {best_of}",
                                     "best_of")
        try:
            stop = P.stop_strings(self.d.get("stop"), "'stop'")
        except P.ProtocolError as exc:
            raise OpenAIRequestError(f"{self.route}: {exc}", "stop") from None
        stop_ids = self.get("stop_token_ids", [])
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in stop_ids):
            raise OpenAIRequestError(f"{self.route}: 'stop_token_ids' must be a list of token ids", "stop_token_ids")
        top_k = self.integer("top_k", -1, -1)
        if top_k == 0:
            raise OpenAIRequestError(f"{self.route}: 'top_k' must be -1 (off) or >= 1, got 0", "top_k")
        temperature = self.number("temperature", 1.0, lambda t: t >= 0, "a number >= 0")
        top_p = self.number("top_p", 1.0, lambda p: 0 < p <= 1, "a number in (0, 1]")
        seed = self.integer("seed", None, P.SEED_RANGE[0], P.SEED_RANGE[1])
        ignore_eos = self.boolean("ignore_eos")
        try:
            return P.SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    n=n, stop=stop, stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos, seed=seed)
        except P.ProtocolError as exc:  # a rule of the engine's own record not checked above
            raise OpenAIRequestError(f"{self.route}: {exc}") from None


def _check_context(route: str, ids: tuple[tuple[int, ...], ...], max_tokens: int, max_length: int,
                   max_param: str) -> None:
    for i, p in enumerate(ids):
        if len(p) + max_tokens > max_length:
            raise OpenAIRequestError(f"{route}: this model's context is {max_length} tokens; prompt {i} has "
                                     f"{len(p)} and {max_param} asks for {max_tokens} more", max_param)


def _need_tokenizer(tokenizer, route: str) -> None:
    if tokenizer is None:
        raise OpenAIRequestError(f"{route}: this model has no tokenizer; use /generate with input_ids")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(value: Any, tokenizer) -> tuple[tuple[tuple[int, ...], ...], tuple[Optional[str], ...]]:
    """The prompts' token ids, and their texts where they came as text (None for token ids)."""
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) or _is_ids(p) for p in value):
        raise OpenAIRequestError(f"{P.COMPLETIONS}: 'prompt' must be a string, a list of strings, a list of "
                                 "token ids or a list of token-id lists", "prompt")
    ids, texts = [], []
    for i, p in enumerate(value):
        if isinstance(p, str):
            tokens = tuple(tokenizer(p)["input_ids"])  # SGLang tokenises with the special tokens added
            texts.append(p)
        else:
            if any(t < 0 for t in p):
                raise OpenAIRequestError(f"{P.COMPLETIONS}: prompt {i} holds a negative token id", "prompt")
            tokens = tuple(p)
            texts.append(None)
        if not tokens:
            raise OpenAIRequestError(f"{P.COMPLETIONS}: prompt {i} is empty (no tokens)", "prompt")
        ids.append(tokens)
    return tuple(ids), tuple(texts)


def parse_completion(d: Any, tokenizer, max_length: int) -> OpenAIRequest:
    """``/v1/completions``: the request (see the module docstring)."""
    route = P.COMPLETIONS
    body = _Body(d, route, COMPLETION_FIELDS)
    _need_tokenizer(tokenizer, route)
    if d.get("prompt") is None:
        raise OpenAIRequestError(f"{route}: missing required field 'prompt'", "prompt")
    stream, include_usage = body.stream()
    echo = body.boolean("echo")
    logprobs = body.integer("logprobs", None, 0, MAX_TOP_LOGPROBS)
    if stream and logprobs is not None:
        raise OpenAIRequestError(f"{route}: 'logprobs' cannot be streamed by this engine; ask without stream",
                                 "logprobs")
    max_tokens = body.integer("max_tokens", 16, 0)
    sampling = body.sampling(max_tokens)
    ids, texts = _prompts(d["prompt"], tokenizer)
    _check_context(route, ids, max_tokens, max_length, "max_tokens")
    scored = echo and logprobs is not None  # the prompt's own log-probs, from its first token
    generate = P.GenerateRequest(ids, sampling, return_logprob=logprobs is not None,
                                 logprob_start_len=0 if scored else -1, top_logprobs_num=logprobs or 0)
    echo_texts = None
    if echo:  # token-id prompts are echoed decoded, as SGLang does
        echo_texts = tuple(t if t is not None else tokenizer.decode(p, skip_special_tokens=True)
                           for t, p in zip(texts, ids))
    return OpenAIRequest(route, generate, echo_texts, logprobs, stream, include_usage)


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: messages[{i}].content[{k}]: only text parts are "
                                         f"supported, got {kind!r}"[:300], f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: messages[{i}].content must be a string or a list of text parts",
                             f"messages[{i}].content")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: 'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: messages[{i}] must be an object", f"messages[{i}]")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
        if extra:  # tool_calls, tool_call_id, audio, ...: the tool and audio features are not served
            raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: messages[{i}].{extra[0]} is not supported",
                                     f"messages[{i}].{extra[0]}")
        role = CHAT_ROLES.get(m.get("role"))
        if role is None:
            raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: messages[{i}].role must be one of {sorted(CHAT_ROLES)}, "
                                     f"got {m.get('role')!r}"[:300], f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def render_chat(tokenizer, messages: list[dict]) -> tuple[int, ...]:
    """The conversation as prompt token ids: the tokenizer's chat template, with the assistant's
    turn opened (the template adds the special tokens it wants; nothing else is added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: this model's tokenizer has no chat template; use "
                                 f"{P.COMPLETIONS} with a prompt", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError, raise_exception() in the template: the conversation's fault
        raise OpenAIRequestError(f"{P.CHAT_COMPLETIONS}: the chat template refused the messages: {exc}"[:500],
                                 "messages") from None
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_chat(d: Any, tokenizer, max_length: int) -> OpenAIRequest:
    """``/v1/chat/completions``: the request (see the module docstring)."""
    route = P.CHAT_COMPLETIONS
    body = _Body(d, route, CHAT_FIELDS)
    _need_tokenizer(tokenizer, route)
    if d.get("messages") is None:
        raise OpenAIRequestError(f"{route}: missing required field 'messages'", "messages")
    stream, include_usage = body.stream()
    logprobs = body.boolean("logprobs")
    top = body.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise OpenAIRequestError(f"{route}: 'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if stream and logprobs:
        raise OpenAIRequestError(f"{route}: 'logprobs' cannot be streamed by this engine; ask without stream",
                                 "logprobs")
    ids = render_chat(tokenizer, _messages(d["messages"]))
    param = "max_completion_tokens" if d.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.integer(param, None, 1)
    if max_tokens is None:  # OpenAI's default: up to the end of the context
        max_tokens = max_length - len(ids)
        if max_tokens < 1:
            raise OpenAIRequestError(f"{route}: the conversation fills the model's context of {max_length} tokens "
                                     f"({len(ids)} tokens)", "messages")
    sampling = body.sampling(max_tokens)
    _check_context(route, (ids,), max_tokens, max_length, param)
    generate = P.GenerateRequest((ids,), sampling, return_logprob=logprobs, top_logprobs_num=top or 0)
    return OpenAIRequest(route, generate, None, (top or 0) if logprobs else None, stream, include_usage)
