"""HTTP client for one engine (SGLang server or the embedded engine): typed calls, timeouts, retries.

    client = EngineClient("http://127.0.0.1:30000", api_key=KEY)
    completions = client.generate(GenerateRequest(input_ids, SamplingParams(n=4), return_logprob=True))

Every call has a timeout; connection failures and 429/502/503/504 replies are retried a
bounded number of times with exponential backoff, after which :class:`EngineError` names the
engine, the route and the last failure.  Any other 4xx reply raises :class:`EngineRequestError`
at once: the engine refused *this request* (it is malformed, or asks for more than the engine
allows) and is itself fine — callers surface it instead of dropping the engine or re-sending the
request to another one, which would refuse it too (a 429 that outlasts the retries is one too).
No reply, 5xx and a malformed reply are engine failures.
A timed-out request is retried only for reads: a generation or weight update that timed out
may still be running on the engine.  Weight updates and group calls are never retried — a
retried tensor payload would take its shared memory twice, a retried broadcast announcement
would post a second set of receives — the push fails instead and the next one starts clean.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import requests

from megatron_spin.rollout import protocol as P

_RETRY_STATUS = frozenset({429, 502, 503, 504})  # busy or in between: worth another try


class EngineError(RuntimeError):
    """A call to an engine failed; unless it is an :class:`EngineRequestError`, the engine did."""

    def __init__(self, url: str, route: str, message: str, status: Optional[int] = None):
        super().__init__(f"engine {url}{route}: {message}")
        self.url, self.route, self.status = url, route, status

    @property
    def engine_failed(self) -> bool:
        """The engine is unreachable or broken (no reply, 5xx) — not a refusal of this request."""
        return self.status is None or self.status >= 500


class EngineRequestError(EngineError):
    """The engine answered 4xx: it refused this request and keeps serving.  Not retried (a 429,
    "too many requests", only after the client's own retries)."""


class EngineClient:
    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 600.0,
                 connect_timeout: float = 5.0, retries: int = 3, backoff: float = 0.5, per_sample_seeds: bool = False):
        """``per_sample_seeds``: ask a seeded request's ``n`` samples as ``n`` copies, each with its own
        seed (SGLang shares one seed among a prompt's samples)."""
        self.url = url.rstrip("/")
        self.per_sample_seeds = per_sample_seeds
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.retries, self.backoff = retries, backoff
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.has_update_session: Optional[bool] = None  # learnt on first begin_weight_update

    def __repr__(self) -> str:
        return f"EngineClient({self.url})"

    def close(self) -> None:
        self._session.close()

    # -- transport --------------------------------------------------------------------------
    def request(self, method: str, route: str, body: Any = None, *, timeout: Optional[float] = None,
                retries: Optional[int] = None, retry_timeouts: Optional[bool] = None) -> Any:
        """JSON (or text) reply of ``route``; raises :class:`EngineError` after bounded retries."""
        attempts = 1 + (self.retries if retries is None else retries)
        retry_timeouts = method == "GET" if retry_timeouts is None else retry_timeouts
        last = ""
        status = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._session.request(method, self.url + route, json=body,
                                              timeout=(self.connect_timeout, timeout or self.timeout))
            except requests.ConnectionError as exc:
                last, status = f"cannot connect ({exc.__class__.__name__})", None
                continue
            except requests.Timeout:
                last, status = f"no reply within {timeout or self.timeout:.0f} s", None
                if not retry_timeouts:
                    break
                continue
            status = reply.status_code
            if status in _RETRY_STATUS:
                last = f"HTTP {status}: {_message(reply)}"
                continue
            if 400 <= status < 500:
                raise EngineRequestError(self.url, route, f"HTTP {status}: {_message(reply)}", status)
            if status >= 500:
                raise EngineError(self.url, route, f"HTTP {status}: {_message(reply)}", status)
            if not reply.content:
                return None
            try:
                return reply.json()
            except ValueError:
                return reply.text
        error = EngineRequestError if status is not None and 400 <= status < 500 else EngineError  # 429
        raise error(self.url, route, f"{last} (after {attempt + 1} attempts)", status)

    def _update(self, route: str, body: dict, timeout: Optional[float] = None) -> P.WeightUpdateResult:
        result = P.WeightUpdateResult.from_json(self.request("POST", route, body, timeout=timeout, retries=0), route)
        if not result.success:
            raise EngineError(self.url, route, result.message)
        return result

    # -- generation -------------------------------------------------------------------------
    def generate(self, request: P.GenerateRequest, timeout: Optional[float] = None) -> list[list[P.Completion]]:
        n = request.sampling.n
        expand = self.per_sample_seeds and request.sampling.seed is not None and n > 1
        sent = request.per_sample_seeds() if expand else request
        body = self.request("POST", P.GENERATE, sent.to_json(), timeout=timeout)
        try:
            replies = P.parse_generate_reply(body, sent)
        except P.ProtocolError as exc:
            raise EngineError(self.url, P.GENERATE, str(exc)) from None
        return P.regroup_samples(replies, n) if expand else replies

    # -- health and state -------------------------------------------------------------------
    def healthy(self, timeout: float = 5.0) -> bool:
        """Ready to generate (``/health``: SGLang generates a token for it, so it fails while paused)."""
        try:
            self.request("GET", P.HEALTH, timeout=timeout, retries=0)
            return True
        except EngineError:
            return False

    def alive(self, timeout: float = 5.0) -> bool:
        """The server answers (its model info), whether or not generation is paused: what a dropped
        engine must show to be re-admitted — it may have been left paused by a failed push."""
        try:
            self.model_info(timeout=timeout, retries=0)
            return True
        except EngineError:
            return False

    def model_info(self, timeout: Optional[float] = None, retries: Optional[int] = None) -> dict:
        try:
            info = self.request("GET", P.MODEL_INFO, timeout=timeout, retries=retries)
        except EngineError as exc:
            if exc.status != 404:
                raise
            info = self.request("GET", P.MODEL_INFO_OLD, timeout=timeout, retries=retries)  # SGLang < 0.5.21
        if not isinstance(info, dict):
            raise EngineError(self.url, P.MODEL_INFO, f"expected a JSON object, got {str(info)[:200]!r}")
        return info

    def weight_version(self) -> str:
        info = self.model_info()
        if info.get("weight_version") is not None:
            return str(info["weight_version"])
        return str(self.request("GET", P.WEIGHT_VERSION)["weight_version"])  # SGLang <= 0.5.20

    def flush_cache(self) -> None:
        self.request("POST", P.FLUSH_CACHE)

    def pause(self, mode: str = "in_place") -> None:
        """Stop scheduling new work; ``in_place`` keeps queued requests for after ``continue``."""
        self.request("POST", P.PAUSE, {"mode": mode})

    def continue_generation(self) -> None:
        self.request("POST", P.CONTINUE, {})

    def release_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        self.request("POST", P.RELEASE_MEMORY, {"tags": list(tags) if tags else None})

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        self.request("POST", P.RESUME_MEMORY, {"tags": list(tags) if tags else None})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self.request("POST", P.GET_WEIGHTS_BY_NAME, {"name": name, "truncate_size": truncate_size})

    # -- weights ----------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        """Open SGLang's (>= 0.5.21) weight-update session; a no-op for engines without one.  A
        session a failed push left open (400 "already open") is closed and opened afresh."""
        if self.has_update_session is False:
            return
        try:
            self.request("POST", P.BEGIN_WEIGHT_UPDATE, {"selector": "all"}, retries=0)
            self.has_update_session = True
        except EngineError as exc:
            if exc.status == 404:
                self.has_update_session = False
            elif exc.status == 400 and "already open" in str(exc):
                self.request("POST", P.END_WEIGHT_UPDATE, {}, retries=0)
                self.request("POST", P.BEGIN_WEIGHT_UPDATE, {"selector": "all"}, retries=0)
                self.has_update_session = True
            else:
                raise

    def end_weight_update(self) -> None:
        if self.has_update_session:
            self.request("POST", P.END_WEIGHT_UPDATE, {})

    def update_weights_from_tensor(self, serialized: list[str], load_format: Optional[str] = None,
                                   weight_version: Optional[str] = None, flush_cache: bool = False) -> P.WeightUpdateResult:
        return self._update(P.UPDATE_FROM_TENSOR, {
            "serialized_named_tensors": serialized, "load_format": load_format,
            "flush_cache": flush_cache, "weight_version": weight_version,
        })

    def update_weights_from_disk(self, model_path: str, weight_version: Optional[str] = None) -> P.WeightUpdateResult:
        # flush_cache defaults to true in SGLang, and a refused flush after the load kills 0.5.21's
        # scheduler; the coordinator flushed before the push.
        return self._update(P.UPDATE_FROM_DISK, {"model_path": model_path, "weight_version": weight_version,
                                                 "flush_cache": False})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str, timeout: Optional[float] = None) -> P.WeightUpdateResult:
        return self._update(P.INIT_UPDATE_GROUP, {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        }, timeout=timeout)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._update(P.DESTROY_UPDATE_GROUP, {"group_name": group_name})

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str,
                                        weight_version: Optional[str] = None) -> P.WeightUpdateResult:
        P.check_names(names, dtypes, shapes, P.UPDATE_FROM_DISTRIBUTED)
        return self._update(P.UPDATE_FROM_DISTRIBUTED, {
            "names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
            "group_name": group_name, "weight_version": weight_version, "flush_cache": False,
        })

    def update_weight_version(self, version: str) -> None:
        reply = self.request("POST", P.UPDATE_WEIGHT_VERSION, {"new_version": version, "abort_all_requests": False})
        if not (isinstance(reply, dict) and reply.get("success", True)):
            raise EngineError(self.url, P.UPDATE_WEIGHT_VERSION, str(reply))


def _message(reply: requests.Response) -> str:
    try:
        d = reply.json()
    except ValueError:
        return reply.text[:500]
    if isinstance(d, dict):
        err = d.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
        if "message" in d:
            return str(d["message"])
    return str(d)[:500]
