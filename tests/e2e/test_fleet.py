"""A fleet of two real embedded engines: prompts spread, a dead engine routed around, re-admission.

An engine that comes back is re-admitted only as needing weights: it serves again once it
reports the fleet's weight version (the next push gives it that, and re-admits it first).
A request an engine refuses (4xx) is the caller's error and costs no engine; a failing one
(5xx, no reply) is dropped and its share re-sent — shown with small HTTP servers on 127.0.0.1
that answer a fixed status.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from megatron_spin.rollout.client import EngineClient, EngineError, EngineRequestError
from megatron_spin.rollout.fleet import FleetError, RolloutFleet
from megatron_spin.rollout.launcher import launch_embedded
from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams
from megatron_spin.sync.push import PushCoordinator, _close_session
from tests.conftest import make_tiny_hf, send_json

pytestmark = [pytest.mark.timeout(300)]

PROMPTS = [[i + 3, 2 * i + 5, 7] for i in range(6)]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, n=2)


def requests_served(server) -> int:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return requests.get(server.url + "/get_server_info", headers=headers, timeout=10).json()["requests"]


def test_fleet_spreads_reroutes_and_readmits(tmp_path):
    model = make_tiny_hf(tmp_path / "hf", "llama", layers=2)
    a = launch_embedded(model, log_path=tmp_path / "a.log", threads=1)
    b = launch_embedded(model, log_path=tmp_path / "b.log", threads=1)
    fleet = RolloutFleet([a.client(retries=1, backoff=0.1), b.client(retries=1, backoff=0.1)])
    try:
        replies = fleet.generate(PROMPTS, GREEDY)
        assert [[c.prompt_index for c in r] for r in replies] == [[i, i] for i in range(len(PROMPTS))]
        assert requests_served(a) == 1 and requests_served(b) == 1  # one share each
        reference = [[c.output_ids for c in r] for r in replies]

        port = int(b.url.rsplit(":", 1)[1])
        b.stop()
        again = fleet.generate(PROMPTS, GREEDY)  # b's share fails and is re-sent to a
        assert [[c.output_ids for c in r] for r in again] == reference
        assert [s.healthy for s in fleet.slots] == [True, False]
        assert "127.0.0.1" in fleet.slots[1].last_error

        b = launch_embedded(model, port=port, log_path=tmp_path / "b2.log", threads=1, weight_version="stale",
                            api_key=b.api_key)
        assert fleet.probe() == [b.url]
        assert [s.client.url for s in fleet.serving] == [a.url]  # back, but without the fleet's weights
        fleet.mark_synced("default")
        assert fleet.slots[1].needs_sync  # still reports "stale"
        fleet.slots[1].client.update_weight_version("default")  # what a push does last
        fleet.mark_synced("default")
        assert [s.client.url for s in fleet.serving] == [a.url, b.url]
        served = requests_served(a)
        assert [[c.output_ids for c in r] for r in fleet.generate(PROMPTS, GREEDY)] == reference
        assert requests_served(a) == served + 1 and requests_served(b) == 1

        # A request an engine refuses (4xx) is the caller's error: no engine is dropped for it,
        # and it is not re-sent to the other engine.
        with pytest.raises(EngineRequestError, match="exceed the model's context"):
            fleet.generate([list(range(120))], SamplingParams(max_new_tokens=50))
        served_b = requests_served(b)
        with pytest.raises(EngineRequestError, match=r"HTTP 400: input_ids\[0\]\[2\] = 999999 is outside the vocabulary"):
            fleet.generate([[1, 2, 999999]], SamplingParams(max_new_tokens=1))
        assert all(s.healthy for s in fleet.slots) and requests_served(b) == served_b

        # An engine whose call fails in a whole-fleet step is dropped, not the run (here: a KV
        # cache resumed that was never released, which the engines refuse as SGLang does)...
        fleet.each_or_drop(lambda c: c.resume_memory(["kv_cache"]), fleet.slots[1:])
        assert [s.healthy for s in fleet.slots] == [True, False]
        # ...and the next weight push re-admits it: it answers, so it takes the push and then serves.
        plan = PushCoordinator(None, fleet, None).prepare(7)
        assert plan.urls == (a.url, b.url) and plan.reform and fleet.slots[1].needs_sync
        for s in fleet.slots:
            _close_session(s.client)

        a.stop()
        b.stop()
        with pytest.raises(FleetError, match="no engine left"):
            fleet.generate(PROMPTS, GREEDY)
    finally:
        fleet.close()
        a.stop()
        b.stop()


class StatusEngine:
    """An HTTP server on 127.0.0.1 that answers every POST with ``status`` (200: one valid
    ``/generate`` sample per prompt) and counts the requests."""

    def __init__(self, status: int):
        self.status, self.requests = status, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.status == 200:
                    samples = [{"output_ids": [5], "meta_info": {"finish_reason": {"type": "length"},
                                                                 "weight_version": "v1"}}
                               for _ in body["input_ids"]]
                    reply = samples[0] if len(samples) == 1 else samples  # SGLang's shape
                else:
                    reply = {"error": {"message": f"status {outer.status} as asked"}}
                send_json(self, outer.status, reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
def test_a_4xx_is_a_request_error_and_no_engine_is_dropped(status):
    refusing, healthy = StatusEngine(status), StatusEngine(200)
    fleet = RolloutFleet([EngineClient(refusing.url, retries=2, backoff=0.01), EngineClient(healthy.url, retries=2)])
    try:
        with pytest.raises(EngineRequestError, match=f"HTTP {status}: status {status} as asked") as info:
            fleet.generate([[1], [2]], SamplingParams(max_new_tokens=1))
        assert info.value.status == status and not info.value.engine_failed
        assert refusing.requests == (3 if status == 429 else 1)  # only "too many requests" is worth a retry
        assert all(s.healthy for s in fleet.slots)
    finally:
        fleet.close()
        refusing.close()
        healthy.close()


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_is_an_engine_failure_the_engine_is_dropped_and_its_share_rerouted(status):
    failing, healthy = StatusEngine(status), StatusEngine(200)
    fleet = RolloutFleet([EngineClient(failing.url, retries=1, backoff=0.01), EngineClient(healthy.url, retries=1)])
    try:
        replies = fleet.generate([[1], [2]], SamplingParams(max_new_tokens=1))
        assert [[c.output_ids for c in r] for r in replies] == [[(5,)], [(5,)]]
        assert [s.healthy for s in fleet.slots] == [False, True]
        assert f"HTTP {status}" in fleet.slots[0].last_error
        assert failing.requests == (2 if status == 503 else 1)  # 503 is retried (the engine may be busy)
        with pytest.raises(EngineError) as info:
            EngineClient(failing.url, retries=0).generate(GenerateRequest(((1,),), SamplingParams(max_new_tokens=1)))
        assert info.value.engine_failed and not isinstance(info.value, EngineRequestError)
    finally:
        fleet.close()
        failing.close()
        healthy.close()
