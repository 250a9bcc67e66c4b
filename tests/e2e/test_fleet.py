"""A fleet of two real embedded engines: prompts spread, a dead engine routed around, re-admission.

An engine that comes back is re-admitted only as needing weights: it serves again once it
reports the fleet's weight version (the next push gives it that, and re-admits it first).
"""

from __future__ import annotations

import pytest
import requests

from megatron_spin.rollout.client import EngineError
from megatron_spin.rollout.fleet import FleetError, RolloutFleet
from megatron_spin.rollout.launcher import launch_embedded
from megatron_spin.rollout.protocol import SamplingParams
from megatron_spin.sync.push import PushCoordinator, _close_session
from tests.conftest import make_tiny_hf

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

        # A request an engine refuses (4xx) is the caller's error: no engine is dropped for it.
        with pytest.raises(EngineError, match="exceed the model's context"):
            fleet.generate([list(range(120))], SamplingParams(max_new_tokens=50))
        assert all(s.healthy for s in fleet.slots)

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
