"""The fleet protocol: typed records for SGLang's native HTTP API, shared by client and engines.

Every engine the trainer talks to — an SGLang server on GPUs or the embedded CPU engine —
speaks the same routes with the same JSON fields, so one client, one fleet and one weight
sync serve both.  These records are the only place that knows the JSON field names; the
client builds requests with ``to_json`` and the embedded server parses them with
``from_json``, which rejects a malformed field with an error that names it.

``weight_version`` is a string (SGLang's convention); the trainer uses the update step
number.  Every generation result carries the version of the weights that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Optional, Sequence

# Routes (SGLang's native HTTP API).  Control and weight routes require the API key when the
# engine has one; so does generation (SGLang guards every route but the health checks).
GENERATE = "/generate"
# OpenAI-compatible routes (SGLang serves them too); the embedded engine's are in embedded/openai_api.py.
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
HEALTH = "/health"
HEALTH_GENERATE = "/health_generate"
MODEL_INFO = "/model_info"  # answers while paused (no generation): the liveness probe
MODEL_INFO_OLD = "/get_model_info"  # deprecated alias (SGLang logs a warning on every call)
WEIGHT_VERSION = "/get_weight_version"  # SGLang <= 0.5.20; later ones report it in /get_model_info
FLUSH_CACHE = "/flush_cache"
UPDATE_FROM_TENSOR = "/update_weights_from_tensor"
UPDATE_FROM_DISK = "/update_weights_from_disk"
INIT_UPDATE_GROUP = "/init_weights_update_group"
DESTROY_UPDATE_GROUP = "/destroy_weights_update_group"
UPDATE_FROM_DISTRIBUTED = "/update_weights_from_distributed"
GET_WEIGHTS_BY_NAME = "/get_weights_by_name"
UPDATE_WEIGHT_VERSION = "/update_weight_version"
# SGLang >= 0.5.21 accepts tensor and distributed updates only inside such a session.
BEGIN_WEIGHT_UPDATE = "/begin_weight_update"
END_WEIGHT_UPDATE = "/end_weight_update"
PAUSE = "/pause_generation"
CONTINUE = "/continue_generation"
RELEASE_MEMORY = "/release_memory_occupation"
RESUME_MEMORY = "/resume_memory_occupation"

UNAUTHENTICATED_ROUTES = frozenset({HEALTH, HEALTH_GENERATE})  # as SGLang: /health* needs no key


class ProtocolError(ValueError):
    """A request or reply that does not follow the protocol; the message names the field."""


MAX_WEIGHT_VERSION_CHARS = 256  # a label (the trainer sends its step number), not a payload
SEED_RANGE = (-(2**63), 2**63 - 1)  # SGLang's: a seed is an int64
# Stop strings are matched on the decoded tail of every row at every step: bound their number and size.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; each one costs a (token, log-prob) per position in the reply


def check_weight_version(value: Any, where: str) -> Optional[str]:
    """A ``weight_version`` field as a string (None stays None): at most 256 printable characters.

    Every reply and every sample carries the version, so an unbounded one would be copied into
    each of them."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(f"{where}: the weight version must be a string, got {type(value).__name__}")
    value = str(value)
    if not 0 < len(value) <= MAX_WEIGHT_VERSION_CHARS or not value.isprintable():
        raise ProtocolError(f"{where}: the weight version must be 1 to {MAX_WEIGHT_VERSION_CHARS} printable "
                            f"characters, got {len(value)} characters starting {value[:40]!r}")
    return value


def _check_seed(seed: Optional[int], what: str) -> None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ProtocolError(f"{what} must be in [-2**63, 2**63 - 1], got {seed}")


def _field(d: dict, key: str, kind, default=None, *, where: str, required: bool = False):
    if key not in d or d[key] is None:
        if required:
            raise ProtocolError(f"{where}: missing required field {key!r}")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def stop_strings(value: Any, what: str) -> tuple[str, ...]:
    """A ``stop`` field (SGLang and OpenAI: a string or a list of strings; null: none) as a tuple."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ProtocolError(f"{what} must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in items):
        raise ProtocolError(f"{what}: at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_CHARS} "
                            "characters each")
    return tuple(items)


def _token_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ProtocolError(f"{what} must be a list of non-negative token ids")
    return value


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling.  ``top_k = -1`` and ``top_p = 1`` disable those filters;
    ``temperature = 0`` is greedy.  ``seed`` makes a request reproducible on the embedded
    engine (SGLang: ``sampling_seed``, honoured with deterministic inference).  ``stop``:
    strings that end a sample once its decoded text contains one (SGLang keeps the tokens
    generated up to the one that completed it; the OpenAI routes cut the text before it)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        where = "sampling_params"
        if self.max_new_tokens < 0:
            raise ProtocolError(f"{where}.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ProtocolError(f"{where}.temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ProtocolError(f"{where}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ProtocolError(f"{where}.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not (0 <= self.min_new_tokens <= max(self.max_new_tokens, 0)):
            raise ProtocolError(f"{where}.min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.n < 1:
            raise ProtocolError(f"{where}.n must be >= 1, got {self.n}")
        _check_seed(self.seed, f"{where}.sampling_seed")
        if not isinstance(self.stop, tuple):  # a bare string would be taken as one stop per character
            raise ProtocolError(f"{where}.stop must be a tuple of strings, got {type(self.stop).__name__}")
        stop_strings(list(self.stop), f"{where}.stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_json(self) -> dict:
        out = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_new_tokens": self.min_new_tokens,
            "ignore_eos": self.ignore_eos,
            "n": self.n,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    @classmethod
    def from_json(cls, d: Any) -> "SamplingParams":
        where = "sampling_params"
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ProtocolError(f"{where} must be an object")
        stop = d.get("stop_token_ids") or []
        return cls(
            max_new_tokens=_field(d, "max_new_tokens", int, 128, where=where),
            temperature=_field(d, "temperature", float, 1.0, where=where),
            top_p=_field(d, "top_p", float, 1.0, where=where),
            top_k=_field(d, "top_k", int, -1, where=where),
            min_new_tokens=_field(d, "min_new_tokens", int, 0, where=where),
            stop_token_ids=tuple(_token_list(stop, f"{where}.stop_token_ids")),
            ignore_eos=_field(d, "ignore_eos", bool, False, where=where),
            n=_field(d, "n", int, 1, where=where),
            seed=_field(d, "sampling_seed", int, None, where=where),
            stop=stop_strings(d.get("stop"), f"{where}.stop"),
        )


def sample_seed(seed: int, prompt: Sequence[int], sample: int) -> int:
    """The seed of sample ``sample`` of ``prompt`` in a request seeded ``seed``: reproducible whatever
    else the batch holds, and different for different prompts and samples."""
    digest = hashlib.blake2b(f"{seed}:{sample}:{','.join(map(str, prompt))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A batch of tokenised prompts, each sampled ``sampling.n`` times.

    ``logprob_start_len`` (with ``return_logprob``) asks for the log-probs of the prompt's own
    tokens from that position on; with ``max_new_tokens = 0`` this scores a fixed sequence,
    which is how trainer/engine log-prob parity is checked.  ``seeds``: one sampling seed per
    prompt, sent as SGLang's list of sampling params (see :meth:`per_sample_seeds`).
    ``top_logprobs_num`` (with ``return_logprob``): also the ``k`` most likely tokens and their
    log-probs at every scored position.
    """

    input_ids: tuple[tuple[int, ...], ...]
    sampling: SamplingParams = SamplingParams()
    return_logprob: bool = False
    logprob_start_len: int = -1
    seeds: Optional[tuple[int, ...]] = None
    top_logprobs_num: int = 0

    def __post_init__(self):
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise ProtocolError(f"{GENERATE}: top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {self.top_logprobs_num}")
        if self.seeds is not None and len(self.seeds) != len(self.input_ids):
            raise ProtocolError(f"{GENERATE}: {len(self.seeds)} seeds for {len(self.input_ids)} prompts")
        for i, seed in enumerate(self.seeds or ()):
            _check_seed(seed, f"{GENERATE}: sampling_params[{i}].sampling_seed")

    def to_json(self) -> dict:
        params = self.sampling.to_json()
        out = {
            "input_ids": [list(p) for p in self.input_ids],
            "sampling_params": params if self.seeds is None else [{**params, "sampling_seed": s} for s in self.seeds],
            "return_logprob": self.return_logprob,
            "logprob_start_len": self.logprob_start_len,
        }
        if self.top_logprobs_num:
            out["top_logprobs_num"] = self.top_logprobs_num
        return out

    def per_sample_seeds(self) -> "GenerateRequest":
        """The same samples asked as ``n`` copies of each prompt, each copy with its own seed.

        SGLang gives the ``n`` samples of a prompt one shared seed (identical samples under
        deterministic inference); a list of sampling params, one per copy, is how each sample
        gets its own.  Replies come back prompt-major: regroup with :func:`regroup_samples`."""
        n, seed = self.sampling.n, self.sampling.seed
        if seed is None:
            raise ProtocolError(f"{GENERATE}: per-sample seeds need sampling_params.sampling_seed")
        copies = tuple(p for p in self.input_ids for _ in range(n))
        seeds = tuple(sample_seed(seed, p, j) for p in self.input_ids for j in range(n))
        return dataclasses.replace(self, input_ids=copies, sampling=dataclasses.replace(self.sampling, n=1, seed=None),
                                   seeds=seeds)

    @classmethod
    def from_json(cls, d: Any) -> "GenerateRequest":
        where = GENERATE
        if not isinstance(d, dict):
            raise ProtocolError(f"{where}: the body must be a JSON object")
        if d.get("text") is not None:
            raise ProtocolError(f"{where}: send 'input_ids' (the trainer tokenises; 'text' is for /v1/completions)")
        ids = d.get("input_ids")
        if ids is None:
            raise ProtocolError(f"{where}: missing required field 'input_ids'")
        if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
            ids = [ids]  # one prompt
        if not isinstance(ids, list) or not ids:
            raise ProtocolError(f"{where}: 'input_ids' must be a non-empty list of token lists")
        prompts = tuple(tuple(_token_list(p, f"{where}: input_ids[{i}]")) for i, p in enumerate(ids))
        if any(not p for p in prompts):
            raise ProtocolError(f"{where}: every prompt needs at least one token")
        params, seeds = d.get("sampling_params"), None
        if isinstance(params, list):  # SGLang's one-per-prompt form: here they may differ in the seed only
            if len(params) != len(prompts) or not all(isinstance(x, dict) for x in params):
                raise ProtocolError(f"{where}: 'sampling_params' as a list needs one object per prompt")
            seeds = tuple(_field(x, "sampling_seed", int, where=f"{where}: sampling_params[{i}]", required=True)
                          for i, x in enumerate(params))
            rest = [{k: v for k, v in x.items() if k != "sampling_seed"} for x in params]
            if any(x != rest[0] for x in rest):
                raise ProtocolError(f"{where}: the embedded engine takes per-prompt sampling params that differ "
                                    "only in 'sampling_seed'")
            params = rest[0]
        return cls(
            input_ids=prompts,
            seeds=seeds,
            sampling=SamplingParams.from_json(params),
            return_logprob=_field(d, "return_logprob", bool, False, where=where),
            logprob_start_len=_field(d, "logprob_start_len", int, -1, where=where),
            top_logprobs_num=_field(d, "top_logprobs_num", int, 0, where=where),
        )


TopLogprobs = tuple[tuple[int, float], ...]  # one position's (token_id, logprob) pairs, best first


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response.  ``output_logprobs[i]`` is log p(output_ids[i] | prefix) under the
    engine's weights at temperature 1 (the trainer's quantity); ``input_logprobs`` covers the
    prompt from ``logprob_start_len`` (the first prompt token has no log-prob: ``None``).
    ``output_top_logprobs`` / ``input_top_logprobs`` (with ``top_logprobs_num``): per position,
    the ``(token_id, logprob)`` pairs of the most likely tokens, best first (``None`` where the
    log-prob is)."""

    prompt_index: int
    sample_index: int
    output_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str
    prompt_tokens: int
    output_logprobs: Optional[tuple[float, ...]] = None
    input_logprobs: Optional[tuple[Optional[float], ...]] = None
    output_top_logprobs: Optional[tuple[TopLogprobs, ...]] = None
    input_top_logprobs: Optional[tuple[Optional[TopLogprobs], ...]] = None

    def to_json(self) -> dict:
        meta: dict[str, Any] = {
            "finish_reason": {"type": self.finish_reason},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "weight_version": self.weight_version,
        }
        if self.output_logprobs is not None:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.output_logprobs, self.output_ids)]
        if self.input_logprobs is not None:
            meta["input_token_logprobs"] = [[lp, None, None] for lp in self.input_logprobs]
        # SGLang's shape: per position a list of [logprob, token_id, text] triples (text: not asked).
        if self.output_top_logprobs is not None:
            meta["output_top_logprobs"] = [_top_json(top) for top in self.output_top_logprobs]
        if self.input_top_logprobs is not None:
            meta["input_top_logprobs"] = [_top_json(top) for top in self.input_top_logprobs]
        return {"output_ids": list(self.output_ids), "meta_info": meta}

    @classmethod
    def from_json(cls, d: Any, prompt_index: int, sample_index: int) -> "Completion":
        where = f"{GENERATE} reply [{prompt_index}, {sample_index}]"
        if not isinstance(d, dict) or not isinstance(d.get("meta_info"), dict):
            raise ProtocolError(f"{where}: expected an object with 'meta_info'")
        meta = d["meta_info"]
        output_ids = tuple(_token_list(d.get("output_ids", []), f"{where}: output_ids"))
        reason = meta.get("finish_reason")
        reason = reason.get("type") if isinstance(reason, dict) else (reason or "abort")
        out_lp = meta.get("output_token_logprobs")
        in_lp = meta.get("input_token_logprobs")
        if out_lp is not None and len(out_lp) != len(output_ids):
            raise ProtocolError(f"{where}: {len(out_lp)} output log-probs for {len(output_ids)} tokens")
        version = meta.get("weight_version")
        if version is None:
            raise ProtocolError(f"{where}: meta_info has no weight_version (engine too old?)")
        return cls(
            prompt_index=prompt_index,
            sample_index=sample_index,
            output_ids=output_ids,
            finish_reason=str(reason),
            weight_version=str(version),
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            output_logprobs=None if out_lp is None else tuple(float(e[0]) for e in out_lp),
            input_logprobs=None if in_lp is None else tuple(None if e[0] is None else float(e[0]) for e in in_lp),
            output_top_logprobs=_tops_from_json(meta.get("output_top_logprobs"), f"{where}: output_top_logprobs"),
            input_top_logprobs=_tops_from_json(meta.get("input_top_logprobs"), f"{where}: input_top_logprobs"),
        )


def _top_json(top: Optional[TopLogprobs]) -> Optional[list]:
    return None if top is None else [[lp, t, None] for t, lp in top]


def _tops_from_json(value: Any, what: str) -> Optional[tuple[Optional[TopLogprobs], ...]]:
    if value is None:
        return None
    try:
        return tuple(None if top is None else tuple((int(e[1]), float(e[0])) for e in top) for top in value)
    except (TypeError, ValueError, IndexError) as exc:
        raise ProtocolError(f"{what}: expected per position a list of [logprob, token_id, text] ({exc})") from None


def expand_order(num_prompts: int, n: int) -> list[tuple[int, int]]:
    """(prompt, sample) of each reply in a batched ``/generate`` with ``n`` samples per prompt.

    Replies are prompt-major: all samples of prompt 0, then of prompt 1, and so on.
    """
    return [(i, j) for i in range(num_prompts) for j in range(n)]


def regroup_samples(copies: Sequence[Sequence[Completion]], n: int) -> list[list[Completion]]:
    """Replies to :meth:`GenerateRequest.per_sample_seeds` as ``[prompt][sample]``."""
    out = []
    for i in range(0, len(copies), n):
        out.append([dataclasses.replace(group[0], prompt_index=i // n, sample_index=j)
                    for j, group in enumerate(copies[i:i + n])])
    return out


def parse_generate_reply(body: Any, request: GenerateRequest) -> list[list[Completion]]:
    """Group a ``/generate`` reply into ``[prompt][sample]`` completions, checking its size."""
    items = body if isinstance(body, list) else [body]
    order = expand_order(len(request.input_ids), request.sampling.n)
    if len(items) != len(order):
        raise ProtocolError(f"{GENERATE} reply: {len(items)} results for {len(order)} requested samples")
    grouped: list[list[Completion]] = [[] for _ in request.input_ids]
    for item, (i, j) in zip(items, order):
        grouped[i].append(Completion.from_json(item, i, j))
    return grouped


@dataclasses.dataclass(frozen=True)
class WeightUpdateResult:
    success: bool
    message: str
    weight_version: Optional[str] = None

    @classmethod
    def from_json(cls, d: Any, route: str) -> "WeightUpdateResult":
        if not isinstance(d, dict) or "success" not in d:
            raise ProtocolError(f"{route} reply: expected an object with 'success'")
        return cls(bool(d["success"]), str(d.get("message", "")), d.get("weight_version"))


def check_names(names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], where: str) -> None:
    """The three parallel lists of a distributed update must line up."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ProtocolError(f"{where}: names/dtypes/shapes have lengths {len(names)}/{len(dtypes)}/{len(shapes)}")
