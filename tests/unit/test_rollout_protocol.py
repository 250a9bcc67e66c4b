"""The rollout side's pure pieces: the fleet protocol records, the staleness check, the SGLang
command line, the fleet's work split, and the embedded engine's batching worker.

HTTP-level behaviour is tested elsewhere; here everything runs in-process.
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_spin.rollout.embedded.batching import BatchingWorker, WorkerStopped
from megatron_spin.rollout.fleet import _split
from megatron_spin.rollout.launcher import SGLANG_ENV, sglang_command
from megatron_spin.rollout.protocol import (
    Completion,
    GenerateRequest,
    ProtocolError,
    SamplingParams,
    WeightUpdateResult,
    expand_order,
    parse_generate_reply,
)
from megatron_spin.rollout.staleness import StaleSamplesError, check_versions

WAIT = 5.0  # generous bound on anything that should happen "soon"; never reached when correct
QUIET = 0.15  # how long a thing that must NOT happen is given to happen anyway


# --------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-2), "top_k"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
        (dict(n=0), "n"),
        (dict(seed=2**63), "sampling_seed"),
        (dict(seed=-(2**63) - 1), "sampling_seed"),
    ],
)
def test_sampling_params_rejects_bad_field(kwargs, field):
    with pytest.raises(ProtocolError, match=rf"sampling_params\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_edges_accepted():
    SamplingParams(max_new_tokens=0)  # scoring a fixed sequence
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_new_tokens=3, max_new_tokens=3, n=1)
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=-1).greedy


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_sampling_params_json_round_trip():
    sp = SamplingParams(max_new_tokens=17, temperature=0.5, top_p=0.9, top_k=40, min_new_tokens=2,
                        stop_token_ids=(2, 7), ignore_eos=True, n=4, seed=1234)
    d = sp.to_json()
    assert d["sampling_seed"] == 1234 and "seed" not in d
    assert d["stop_token_ids"] == [2, 7]
    assert d["n"] == 4 and d["top_k"] == 40 and d["ignore_eos"] is True
    assert SamplingParams.from_json(d) == sp


def test_sampling_params_defaults_omit_optional_fields():
    d = SamplingParams().to_json()
    assert "sampling_seed" not in d and "stop_token_ids" not in d
    assert SamplingParams.from_json(d) == SamplingParams()
    assert SamplingParams.from_json(None) == SamplingParams()
    assert SamplingParams.from_json({}) == SamplingParams()
    assert SamplingParams.from_json({"sampling_seed": None, "top_k": None}) == SamplingParams()


@pytest.mark.parametrize("field", ["max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed"])
def test_sampling_params_bool_is_not_an_int(field):
    with pytest.raises(ProtocolError, match=repr(field)):
        SamplingParams.from_json({field: True})


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_sampling_params_bool_is_not_a_float(field):
    with pytest.raises(ProtocolError, match=repr(field)):
        SamplingParams.from_json({field: True})


@pytest.mark.parametrize(
    "d, field",
    [
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": "8"}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"n": [2]}, "n"),
    ],
)
def test_sampling_params_wrong_types_name_the_field(d, field):
    with pytest.raises(ProtocolError, match=repr(field)):
        SamplingParams.from_json(d)


def test_sampling_params_int_accepted_for_float_fields():
    sp = SamplingParams.from_json({"temperature": 1, "top_p": 1})
    assert sp.temperature == 1.0 and isinstance(sp.temperature, float)
    assert isinstance(sp.top_p, float)
    assert SamplingParams.from_json({"temperature": 0}).greedy


def test_sampling_params_from_json_validates_values():
    with pytest.raises(ProtocolError, match="top_p"):
        SamplingParams.from_json({"top_p": 0})
    with pytest.raises(ProtocolError, match="must be an object"):
        SamplingParams.from_json([1, 2])


@pytest.mark.parametrize("stop", [[-1], [1.0], ["a"], [True], 3])
def test_sampling_params_bad_stop_token_ids(stop):
    with pytest.raises(ProtocolError, match="stop_token_ids"):
        SamplingParams.from_json({"stop_token_ids": stop})


def test_sampling_params_stop_strings_as_sglang_and_openai_send_them():
    assert SamplingParams.from_json({"stop": "\n\n"}).stop == ("\n\n",)
    sp = SamplingParams.from_json({"stop": ["User:", "###"]})
    assert sp.stop == ("User:", "###") and sp.to_json()["stop"] == ["User:", "###"]
    assert SamplingParams.from_json(sp.to_json()) == sp
    assert "stop" not in SamplingParams().to_json() and SamplingParams.from_json({"stop": None}).stop == ()


@pytest.mark.parametrize("stop", [3, [1], [""], ["a"] * 17, ["x" * 513], {"a": 1}])
def test_sampling_params_bad_stop_strings(stop):
    with pytest.raises(ProtocolError, match=r"sampling_params\.stop"):
        SamplingParams.from_json({"stop": stop})


def test_sampling_params_stop_must_be_a_tuple():
    with pytest.raises(ProtocolError, match="tuple of strings"):
        SamplingParams(stop="ab")  # would otherwise stop at "a" or "b"


# --------------------------------------------------------------------------- GenerateRequest


def test_generate_request_round_trip():
    req = GenerateRequest(input_ids=((1, 2, 3), (4,)), sampling=SamplingParams(n=2, seed=9, max_new_tokens=5),
                          return_logprob=True, logprob_start_len=1)
    d = req.to_json()
    assert d["input_ids"] == [[1, 2, 3], [4]]
    assert d["sampling_params"]["sampling_seed"] == 9
    assert d["return_logprob"] is True and d["logprob_start_len"] == 1
    back = GenerateRequest.from_json(d)
    assert back == req
    assert isinstance(back.input_ids, tuple) and all(isinstance(p, tuple) for p in back.input_ids)


def test_generate_request_top_logprobs_num():
    req = GenerateRequest(((1, 2),), return_logprob=True, top_logprobs_num=5)
    assert req.to_json()["top_logprobs_num"] == 5 and GenerateRequest.from_json(req.to_json()) == req
    assert "top_logprobs_num" not in GenerateRequest(((1,),)).to_json()
    for bad in (-1, 21):
        with pytest.raises(ProtocolError, match="top_logprobs_num"):
            GenerateRequest.from_json({"input_ids": [1], "top_logprobs_num": bad})


def test_generate_request_single_flat_prompt():
    req = GenerateRequest.from_json({"input_ids": [5, 6, 7]})
    assert req.input_ids == ((5, 6, 7),)
    assert req.sampling == SamplingParams() and req.return_logprob is False and req.logprob_start_len == -1


@pytest.mark.parametrize(
    "body, match",
    [
        ({"text": "hello"}, "input_ids"),
        ({"text": "hello", "input_ids": [1]}, "text"),
        ({}, "missing required field 'input_ids'"),
        ({"input_ids": []}, "non-empty"),
        ({"input_ids": [[]]}, "at least one token"),
        ({"input_ids": [[1, 2], []]}, "at least one token"),
        ({"input_ids": [1, -2]}, "non-negative"),
        ({"input_ids": [[1], [3, -1]]}, r"input_ids\[1\]"),
        ({"input_ids": [[1], [2.0]]}, r"input_ids\[1\]"),
        ({"input_ids": "1 2 3"}, "input_ids"),
        ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": [1], "logprob_start_len": 0.5}, "logprob_start_len"),
        ({"input_ids": [1], "sampling_params": {"n": 0}}, r"sampling_params\.n"),
    ],
)
def test_generate_request_rejects(body, match):
    with pytest.raises(ProtocolError, match=match):
        GenerateRequest.from_json(body)


def test_generate_request_body_must_be_object():
    with pytest.raises(ProtocolError, match="JSON object"):
        GenerateRequest.from_json([[1, 2]])


# --------------------------------------------------------------------------- Completion


def test_completion_round_trip_with_logprobs():
    c = Completion(prompt_index=3, sample_index=1, output_ids=(10, 11, 12), finish_reason="length",
                   weight_version="7", prompt_tokens=4, output_logprobs=(-0.5, -1.25, -3.0),
                   input_logprobs=(None, -2.0, -0.75))
    d = c.to_json()
    meta = d["meta_info"]
    assert d["output_ids"] == [10, 11, 12]
    assert meta["finish_reason"] == {"type": "length"}
    assert meta["completion_tokens"] == 3 and meta["prompt_tokens"] == 4 and meta["weight_version"] == "7"
    assert [e[1] for e in meta["output_token_logprobs"]] == [10, 11, 12]  # SGLang's [lp, token, text]
    assert meta["input_token_logprobs"][0][0] is None
    back = Completion.from_json(d, 3, 1)
    assert back == c
    assert back.input_logprobs[0] is None


def test_completion_round_trip_with_top_logprobs_in_sglang_shape():
    c = Completion(0, 0, (10, 11), "stop", "1", 2, output_logprobs=(-0.5, -1.0), input_logprobs=(None, -2.0),
                   output_top_logprobs=(((10, -0.5), (3, -1.5)), ((4, -0.25), (11, -1.0))),
                   input_top_logprobs=(None, ((7, -0.1), (8, -2.0))))
    meta = c.to_json()["meta_info"]
    assert meta["output_top_logprobs"][1] == [[-0.25, 4, None], [-1.0, 11, None]]
    assert meta["input_top_logprobs"][0] is None
    assert Completion.from_json(c.to_json(), 0, 0) == c
    meta["output_top_logprobs"] = [[["x"]]]
    with pytest.raises(ProtocolError, match="output_top_logprobs"):
        Completion.from_json({"output_ids": [10, 11], "meta_info": meta}, 0, 0)


def test_completion_round_trip_without_logprobs():
    c = Completion(0, 0, (1,), "stop", "default", 2)
    d = c.to_json()
    assert "output_token_logprobs" not in d["meta_info"] and "input_token_logprobs" not in d["meta_info"]
    assert Completion.from_json(d, 0, 0) == c


def test_completion_accepts_plain_finish_reason_and_numeric_version():
    d = {"output_ids": [1, 2], "meta_info": {"finish_reason": "stop", "weight_version": 5, "prompt_tokens": 3}}
    c = Completion.from_json(d, 0, 0)
    assert c.finish_reason == "stop" and c.weight_version == "5" and c.prompt_tokens == 3


def test_completion_logprob_count_mismatch():
    d = Completion(0, 0, (1, 2, 3), "stop", "1", 1, output_logprobs=(-1.0, -1.0, -1.0)).to_json()
    d["meta_info"]["output_token_logprobs"].pop()
    with pytest.raises(ProtocolError, match="2 output log-probs for 3 tokens"):
        Completion.from_json(d, 0, 2)


def test_completion_missing_weight_version():
    d = Completion(0, 0, (1,), "stop", "1", 1).to_json()
    del d["meta_info"]["weight_version"]
    with pytest.raises(ProtocolError, match="weight_version"):
        Completion.from_json(d, 1, 0)


@pytest.mark.parametrize("d", [None, [], {"output_ids": [1]}, {"meta_info": "x"}])
def test_completion_needs_meta_info(d):
    with pytest.raises(ProtocolError, match="meta_info"):
        Completion.from_json(d, 0, 0)


def test_completion_bad_output_ids():
    with pytest.raises(ProtocolError, match="output_ids"):
        Completion.from_json({"output_ids": [1, -1], "meta_info": {"weight_version": "1"}}, 0, 0)


# --------------------------------------------------------------------------- parse_generate_reply


def _reply_item(i: int, j: int) -> dict:
    # Token ids encode (prompt, sample) so that a misplaced reply is visible.
    return Completion(i, j, (100 * i + j,), "stop", "v", 1).to_json()


def test_expand_order_is_prompt_major():
    assert expand_order(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert expand_order(0, 3) == []


def test_parse_generate_reply_groups_prompt_major():
    p, n = 3, 2
    req = GenerateRequest(input_ids=((1,), (2,), (3,)), sampling=SamplingParams(n=n))
    body = [_reply_item(i, j) for i in range(p) for j in range(n)]  # reply k is (k // n, k % n)
    grouped = parse_generate_reply(body, req)
    assert len(grouped) == p
    for i in range(p):
        assert [c.sample_index for c in grouped[i]] == list(range(n))
        assert all(c.prompt_index == i for c in grouped[i])
        assert [c.output_ids for c in grouped[i]] == [(100 * i + j,) for j in range(n)]


def test_parse_generate_reply_single_object():
    req = GenerateRequest(input_ids=((1, 2),))
    grouped = parse_generate_reply(_reply_item(0, 0), req)
    assert len(grouped) == 1 and grouped[0][0].output_ids == (0,)


@pytest.mark.parametrize("count", [3, 5, 1])
def test_parse_generate_reply_wrong_count(count):
    req = GenerateRequest(input_ids=((1,), (2,)), sampling=SamplingParams(n=2))
    with pytest.raises(ProtocolError, match=f"{count} results for 4 requested samples"):
        parse_generate_reply([_reply_item(0, 0)] * count, req)


def test_weight_update_result_from_json():
    r = WeightUpdateResult.from_json({"success": True, "message": "ok", "weight_version": "3"}, "/x")
    assert r == WeightUpdateResult(True, "ok", "3")
    r = WeightUpdateResult.from_json({"success": False}, "/x")
    assert r.success is False and r.message == "" and r.weight_version is None
    with pytest.raises(ProtocolError, match="/update_weights_from_disk"):
        WeightUpdateResult.from_json({"message": "no success"}, "/update_weights_from_disk")
    with pytest.raises(ProtocolError, match="success"):
        WeightUpdateResult.from_json(["success"], "/x")


# --------------------------------------------------------------------------- staleness


def _completions(*versions: str) -> list[Completion]:
    return [Completion(0, k, (1,), "stop", v, 1) for k, v in enumerate(versions)]


def test_check_versions_accepts_current():
    check_versions(_completions("4", "4", "4"), 4)
    check_versions([], 4)


def test_check_versions_refuses_stale():
    with pytest.raises(StaleSamplesError) as info:
        check_versions(_completions("4", "3", "3", "2"), 4)
    msg = str(info.value)
    assert "3 samples" in msg and "['2', '3']" in msg and "at 4" in msg and "['4']" in msg


def test_check_versions_refuses_future_and_foreign_versions():
    with pytest.raises(StaleSamplesError, match="'5'"):
        check_versions(_completions("5"), 4)
    with pytest.raises(StaleSamplesError, match="'default'"):
        check_versions(_completions("default"), 0)


def test_check_versions_max_lag():
    check_versions(_completions("4", "3"), 4, max_lag=1)
    with pytest.raises(StaleSamplesError, match=r"\['2'\].*max_lag=1"):
        check_versions(_completions("4", "3", "2"), 4, max_lag=1)
    check_versions(_completions("2"), 4, max_lag=2)


def test_check_versions_negative_lag():
    with pytest.raises(ValueError, match="max_lag"):
        check_versions(_completions("4"), 4, max_lag=-1)


# --------------------------------------------------------------------------- launcher


def _flag(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} appears {cmd.count(name)} times in {cmd}"
    return cmd[cmd.index(name) + 1]


def test_sglang_command_flags():
    cmd = sglang_command("/models/x", tp_size=4, host="0.0.0.0", port=31000, mem_fraction_static=0.7,
                         api_key="secret", enable_memory_saver=True, weight_version="3", extra=["--foo", "1"])
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert _flag(cmd, "--model-path") == "/models/x"
    assert _flag(cmd, "--tp-size") == "4"
    assert _flag(cmd, "--port") == "31000"
    assert _flag(cmd, "--host") == "0.0.0.0"
    assert _flag(cmd, "--api-key") == "secret"
    assert float(_flag(cmd, "--mem-fraction-static")) == 0.7
    assert _flag(cmd, "--weight-version") == "3"
    assert "--enable-memory-saver" in cmd
    assert cmd[-2:] == ["--foo", "1"]


def test_sglang_command_optional_flags_absent():
    cmd = sglang_command("/m")
    assert "--api-key" not in cmd
    assert "--mem-fraction-static" not in cmd
    assert "--enable-memory-saver" not in cmd
    assert _flag(cmd, "--tp-size") == "1"
    assert "--api-key" not in sglang_command("/m", api_key="")


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.5, 1.5])
def test_sglang_command_mem_fraction_range(frac):
    with pytest.raises(ValueError, match="mem_fraction_static"):
        sglang_command("/m", mem_fraction_static=frac)


@pytest.mark.parametrize("tp", [0, -1])
def test_sglang_command_tp_size(tp):
    with pytest.raises(ValueError, match="tp_size"):
        sglang_command("/m", tp_size=tp)


def test_sglang_env_returns_original_logprobs():
    assert SGLANG_ENV["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"


# --------------------------------------------------------------------------- fleet split


@pytest.mark.parametrize("n_items", [0, 1, 2, 3, 5, 7, 10, 16])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_split_contiguous_near_equal(n_items, parts):
    items = [100 + k for k in range(n_items)]
    shares = _split(items, parts)
    assert len(shares) == parts
    assert [x for s in shares for x in s] == items  # all, in order, contiguous
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shares come first
    assert sizes[0] == -(-n_items // parts)


def test_split_fewer_items_than_parts():
    assert _split([7, 8], 4) == [[7], [8], [], []]


# --------------------------------------------------------------------------- BatchingWorker


class Recorder:
    """A run_batch that records its batches; ``gate`` (if set) holds each batch until released."""

    def __init__(self, sleep: float = 0.0, gated: bool = False):
        self.sizes: list[int] = []
        self.batches: list[list] = []
        self.sleep = sleep
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Semaphore(0)  # one release per batch started
        self.version = 0
        self.lock = threading.Lock()

    def __call__(self, jobs):
        with self.lock:
            self.sizes.append(len(jobs))
            self.batches.append(list(jobs))
        self.started.release()
        assert self.gate.wait(WAIT), "test gate never opened"
        if self.sleep:
            time.sleep(self.sleep)
        if any(j == "boom" for j in jobs):
            raise RuntimeError("boom in batch")
        return [f"out-{j}" for j in jobs], f"v{self.version}"

    def wait_started(self, timeout: float = WAIT) -> bool:
        return self.started.acquire(timeout=timeout)


@pytest.fixture
def make_worker():
    workers = []

    def make(run_batch, **kw):
        w = BatchingWorker(run_batch, **kw)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.resume()
        w.stop()


def test_calls_run_on_the_worker_thread_between_batches_also_while_paused(make_worker):
    """Tensor work (weight updates; a trainer rank's steps with the engine inside it) runs on
    the thread that generates: one OpenMP pool per process (batching.py's docstring)."""
    rec = Recorder(gated=True)
    w = make_worker(rec)
    first = w.submit(["a"])
    assert rec.wait_started()
    seen = []
    caller = threading.Thread(target=lambda: seen.append(w.call(lambda: (threading.current_thread(), len(rec.sizes)))))
    caller.start()
    time.sleep(0.05)
    assert not seen  # the running batch finishes first
    rec.gate.set()
    caller.join(WAIT)
    assert first.result(WAIT) == (["out-a"], "v0")
    assert seen == [(w.thread, 1)]
    w.pause()
    queued = w.submit(["b"])
    assert w.call(lambda: w.call(lambda: "nested")) == "nested"  # from the worker thread: at once, no deadlock
    with pytest.raises(ZeroDivisionError):
        w.call(lambda: 1 / 0)
    assert not queued.done()  # paused: calls ran, the batch waits
    w.resume()
    assert queued.result(WAIT) == (["out-b"], "v0")


def test_stop_fails_queued_calls(make_worker):
    rec = Recorder(gated=True)
    w = make_worker(rec)
    w.submit(["a"])
    assert rec.wait_started()
    errors = []

    def caller():
        try:
            w.call(lambda: None)
        except WorkerStopped as exc:
            errors.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    time.sleep(0.05)
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    time.sleep(0.05)
    rec.gate.set()
    t.join(WAIT)
    stopper.join(WAIT)
    assert len(errors) == 1
    with pytest.raises(WorkerStopped):
        w.call(lambda: None)


def test_outputs_return_to_their_futures(make_worker):
    rec = Recorder()
    w = make_worker(rec)
    fut = w.submit([1, 2, 3])
    outs, tag = fut.result(WAIT)
    assert outs == ["out-1", "out-2", "out-3"] and tag == "v0"


def test_concurrent_submits_are_merged(make_worker):
    rec = Recorder(sleep=0.01, gated=True)
    w = make_worker(rec)
    first = w.submit(["first"])
    assert rec.wait_started()  # the worker is now busy with batch 1; the rest queues
    futures: dict[int, object] = {}
    lock = threading.Lock()

    def client(k):
        jobs = [f"{k}.{m}" for m in range(1 + k % 3)]
        fut = w.submit(jobs)
        with lock:
            futures[k] = (jobs, fut)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    rec.gate.set()
    assert first.result(WAIT) == (["out-first"], "v0")
    for k, (jobs, fut) in futures.items():
        outs, tag = fut.result(WAIT)
        assert outs == [f"out-{j}" for j in jobs], k
    total_jobs = sum(len(j) for j, _ in futures.values())
    assert rec.sizes == [1, total_jobs]  # 12 requests, one batch
    assert w.batches_run == 2


def test_max_jobs_takes_whole_requests(make_worker):
    rec = Recorder(gated=True)
    w = make_worker(rec, max_jobs=4)
    w.submit(["x"])
    assert rec.wait_started()
    f3 = w.submit(["a1", "a2", "a3"])
    f2 = w.submit(["b1", "b2"])
    f1 = w.submit(["c1"])
    f5 = w.submit([f"d{k}" for k in range(5)])  # more than max_jobs: alone
    rec.gate.set()
    for f in (f3, f2, f1, f5):
        f.result(WAIT)
    # FIFO: [a*3] (b would exceed 4), [b*2 + c*1], [d*5]
    assert rec.sizes == [1, 3, 3, 5]
    assert rec.batches[2] == ["b1", "b2", "c1"]
    assert f1.result()[0] == ["out-c1"] and f2.result()[0] == ["out-b1", "out-b2"]


def test_pause_holds_batches_until_resume(make_worker):
    rec = Recorder()
    w = make_worker(rec)
    w.pause()
    assert w.paused
    fut = w.submit([1])
    assert not rec.wait_started(QUIET)
    assert not fut.done() and rec.sizes == []
    w.resume()
    assert not w.paused
    assert fut.result(WAIT) == (["out-1"], "v0")


def test_exclusive_waits_for_running_batch_and_blocks_new_ones(make_worker):
    rec = Recorder(gated=True)
    w = make_worker(rec)
    running = w.submit(["r"])
    assert rec.wait_started()

    inside, leave = threading.Event(), threading.Event()
    seen_running_done = []

    def updater():
        with w.exclusive():
            seen_running_done.append(running.done())
            inside.set()
            rec.version = 1  # "the weights change" while no batch runs
            assert leave.wait(WAIT)

    t = threading.Thread(target=updater)
    t.start()
    assert not inside.wait(QUIET), "exclusive() entered while a batch was running"
    rec.gate.set()  # let the running batch finish
    assert inside.wait(WAIT)
    assert seen_running_done == [True]
    assert running.result(WAIT) == (["out-r"], "v0")

    held = w.submit(["h"])
    assert not rec.wait_started(QUIET), "a batch started inside exclusive()"
    assert not held.done()
    leave.set()
    t.join(WAIT)
    assert held.result(WAIT) == (["out-h"], "v1")  # generated with the new version only
    assert rec.sizes == [1, 1]


def test_exclusive_nested_holders(make_worker):
    rec = Recorder()
    w = make_worker(rec)
    with w.exclusive():
        with w.exclusive():
            fut = w.submit([1])
        assert not rec.wait_started(QUIET)  # one holder left
    assert fut.result(WAIT)[0] == ["out-1"]


def test_failed_batch_fails_only_its_requests(make_worker):
    rec = Recorder(gated=True)
    w = make_worker(rec)
    w.submit(["warm"])
    assert rec.wait_started()
    bad1 = w.submit(["ok", "boom"])
    bad2 = w.submit(["fine"])  # same batch as the bad job: fails with it
    rec.gate.set()
    with pytest.raises(RuntimeError, match="boom in batch"):
        bad1.result(WAIT)
    with pytest.raises(RuntimeError, match="boom in batch"):
        bad2.result(WAIT)
    good = w.submit(["after"])
    assert good.result(WAIT) == (["out-after"], "v0")  # the worker still serves
    assert w.batches_run == 2  # warm + after; the failed batch does not count


def test_stop_fails_pending_futures(make_worker):
    rec = Recorder()
    w = make_worker(rec)
    w.pause()
    pending = [w.submit([k]) for k in range(3)]
    w.stop()
    for f in pending:
        with pytest.raises(WorkerStopped):
            f.result(WAIT)
    assert rec.sizes == []
    with pytest.raises(WorkerStopped):
        w.submit([9])
    assert not w._thread.is_alive()


def test_stop_lets_the_running_batch_finish(make_worker):
    rec = Recorder(gated=True)
    w = make_worker(rec)
    running = w.submit(["r"])
    assert rec.wait_started()
    queued = w.submit(["q"])
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    with pytest.raises(WorkerStopped):
        queued.result(WAIT)
    rec.gate.set()
    stopper.join(WAIT)
    assert running.result(WAIT) == (["out-r"], "v0")
    assert rec.sizes == [1]


def test_a_request_cancelled_while_queued_never_runs(make_worker):
    rec = Recorder()
    w = make_worker(rec)
    w.pause()
    kept, dropped = w.submit(["kept"]), w.submit(["dropped"])
    assert dropped.cancel()  # its caller gave up while it waited
    w.resume()
    assert kept.result(WAIT) == (["out-kept"], "v0")
    assert rec.batches == [["kept"]]
    only = w.submit(["x"])
    only.cancel()
    assert w.submit(["y"]).result(WAIT) == (["out-y"], "v0") and rec.batches[-1] == ["y"]


def test_run_batch_sees_which_of_its_jobs_were_abandoned(make_worker):
    seen = []
    gate = threading.Event()

    def run_batch(jobs):
        assert gate.wait(WAIT)
        seen.append([w.abandoned(i) for i in range(len(jobs))])
        return [f"out-{j}" for j in jobs], "v0"

    w = make_worker(run_batch)
    w.pause()
    gone, staying = w.submit(["a1", "a2"]), w.submit(["b1"])
    w.resume()
    time.sleep(QUIET)  # the batch is taken, waiting at the gate
    assert gone.cancel()  # cancelled while its batch runs: a cancelled future cannot fail the others
    gate.set()
    assert staying.result(WAIT) == (["out-b1"], "v0")
    assert seen == [[True, True, False]] and gone.cancelled()


def test_a_listener_hears_the_tokens_of_its_own_request_only(make_worker):
    heard = []

    def run_batch(jobs):  # the second job of each request reports a token
        for i, job in enumerate(jobs):
            w.heard(i, 100 + i)
        return [f"out-{j}" for j in jobs], "v0"

    w = make_worker(run_batch)
    w.pause()
    quiet = w.submit(["q1"])
    loud = w.submit(["l1", "l2"], listener=lambda j, tok: heard.append((j, tok)))
    w.resume()
    assert loud.result(WAIT) == (["out-l1", "out-l2"], "v0") and quiet.result(WAIT)[0] == ["out-q1"]
    assert heard == [(0, 101), (1, 102)]  # indices within its request; the other request's token unheard

    def broken(j, tok):
        raise RuntimeError("listener gone")

    assert w.submit(["b"], listener=broken).result(WAIT) == (["out-b"], "v0")  # a failing listener fails nothing


# --------------------------------------------------------------------------- per-sample seeds
def test_per_sample_seeds_ask_n_seeded_copies_of_each_prompt():
    """SGLang gives a prompt's n samples one shared seed; n copies with a seed each is how every
    sample gets its own (and a resumed run draws the same ones)."""
    from megatron_spin.rollout.protocol import sample_seed

    req = GenerateRequest(((1, 2), (3,)), SamplingParams(n=3, seed=7, max_new_tokens=4), return_logprob=True)
    out = req.per_sample_seeds()
    assert out.input_ids == ((1, 2),) * 3 + ((3,),) * 3 and out.sampling.n == 1 and out.sampling.seed is None
    assert out.seeds == tuple(sample_seed(7, p, j) for p in ((1, 2), (3,)) for j in range(3))
    assert len(set(out.seeds)) == 6  # every sample of every prompt its own seed
    body = out.to_json()
    assert [d["sampling_seed"] for d in body["sampling_params"]] == list(out.seeds)
    assert all(d["n"] == 1 and d["max_new_tokens"] == 4 for d in body["sampling_params"])
    assert GenerateRequest.from_json(body) == out  # the embedded engine reads SGLang's list form


def test_per_prompt_sampling_params_may_differ_only_in_the_seed():
    body = GenerateRequest(((1,), (2,)), SamplingParams(seed=1)).per_sample_seeds().to_json()
    body["sampling_params"][1]["temperature"] = 0.5
    with pytest.raises(ProtocolError, match="differ only in 'sampling_seed'"):
        GenerateRequest.from_json(body)
    with pytest.raises(ProtocolError, match="per-sample seeds need"):
        GenerateRequest(((1,),), SamplingParams(n=2)).per_sample_seeds()
    with pytest.raises(ProtocolError, match="2 seeds for 1 prompts"):
        GenerateRequest(((1,),), seeds=(1, 2))


def test_regroup_samples_restores_prompt_and_sample_indices():
    from megatron_spin.rollout.protocol import Completion, regroup_samples

    copies = [[Completion(i, 0, (i,), "stop", "1", 1)] for i in range(6)]
    grouped = regroup_samples(copies, 3)
    assert [[(c.prompt_index, c.sample_index, c.output_ids) for c in g] for g in grouped] == [
        [(0, 0, (0,)), (0, 1, (1,)), (0, 2, (2,))], [(1, 0, (3,)), (1, 1, (4,)), (1, 2, (5,))]]


def test_deterministic_sglang_is_launched_so_seeds_apply():
    from megatron_spin.rollout.launcher import sglang_command

    assert "--enable-deterministic-inference" in sglang_command("/m", deterministic=True)
    assert "--enable-deterministic-inference" not in sglang_command("/m")
