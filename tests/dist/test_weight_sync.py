"""Weight sync from a Megatron actor (TP=2, PP=2) into real embedded engines over HTTP.

One 2-rank launch runs every (layout, transport) job in turn against two engine processes.
Jobs alternate between two different checkpoints, so each push really changes the engines'
weights: before the push the engines' log-probs are far from the actor's, after it they
agree within 1e-4 (fp32) — for scored fixed sequences and for the engines' own samples,
which also carry the new ``weight_version``.  The engines hold simulated devices (``cpu:0``,
``cpu:1``), so the tensor jobs show the feed route delivers each engine rank from its own
device (with PP=2, stage 1's rank feeds an engine: stage 0's tensors reach it first).

Device locality on its own: an engine simulating two TP ranks is fed by both trainer ranks
(handles gathered to the leader); a route that feeds a rank from the wrong device is refused
by the engine, as SGLang refuses a CUDA handle from a GPU it cannot see; a feeder that fails on
its own (a simulated fault) fails the push on every rank without stranding its peer.

Faults: a skipped push leaves the engines on the old version (the staleness check refuses
their samples); a stage that leaves tensors out is a SyncError on every rank with the version
not advanced; a bucket lost after being reported sent (a simulated fault, named as such) is
caught by the log-prob probe; a push that fails half-way leaves the engines' weight-update
sessions closed (the engines behave like SGLang: a second ``begin`` is refused), so the next
push succeeds.
"""

from __future__ import annotations

import pickle
import re
import time

import pytest
import torch

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.rollout.launcher import launch_embedded
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


class Push:
    """The run's push path — :class:`PushCoordinator` beside the fleet, a :class:`StageSender` on
    every rank — with rank 0 playing the driver: the plan and the ranks' results travel over this
    launch's gloo group instead of Ray calls (``TrainerCluster.push`` does prepare → every rank
    sends → finish).  Every rank returns the same report or raises the same SyncError."""

    def __init__(self, cfg, target, arch, pctx, fleet, transport=None):
        from megatron_spin.sync.push import PushCoordinator, StageSender
        from megatron_spin.sync.transports import make_transport

        self.pctx = pctx
        self.sender = StageSender(cfg, target, arch, pctx, "127.0.0.1", transport=transport)
        self.coordinator = PushCoordinator(arch, fleet, make_transport(cfg, target)) if pctx.rank == 0 else None

    def push(self, modules, version):
        from megatron_spin.rollout.client import EngineError
        from megatron_spin.sync.push import SyncError

        plan: list = [None]
        if self.pctx.rank == 0:
            try:
                plan[0] = self.coordinator.prepare(version)
            except (SyncError, EngineError) as exc:
                plan[0] = str(exc)
        torch.distributed.broadcast_object_list(plan, src=0)
        if isinstance(plan[0], str):
            raise SyncError(plan[0])
        results: list = [None] * self.pctx.world_size
        torch.distributed.all_gather_object(results, self.sender.send(modules, plan[0]))
        outcome: list = [None]
        if self.pctx.rank == 0:
            try:
                outcome[0] = self.coordinator.finish(plan[0], results)
            except SyncError as exc:
                outcome[0] = str(exc)
        torch.distributed.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], str):
            raise SyncError(outcome[0])
        return outcome[0]

    def close(self):
        self.sender.close()


def trainer_logprobs(modules, pctx, sequences):
    """The actor's token log-probs of ``sequences`` on every rank (the forward is collective)."""
    from megatron_spin.sync.verify import trainer_token_logprobs

    gathered: list = [None] * pctx.world_size
    torch.distributed.all_gather_object(gathered, trainer_token_logprobs(modules, pctx, sequences))
    return next(g for g in gathered if g is not None)


def logprob_gap(modules, pctx, fleet, sequences):
    """Max |engine - trainer| token log-prob per serving engine, the same dict on every rank."""
    from megatron_spin.sync.verify import probe_gap

    ours = trainer_logprobs(modules, pctx, sequences)
    result: list = [None]
    if pctx.rank == 0:
        result[0] = probe_gap(ours, [s.client for s in fleet.serving], sequences).max_abs
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]

API_KEY = "sync-test-key"
TP2, PP2 = ParallelLayout(tp=2), ParallelLayout(pp=2)
PROBE = [[5, 17, 33, 2, 90, 41, 7, 64, 128, 3, 11], [200, 4, 4, 9, 150, 77]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    hf = [make_tiny_hf(root / f"hf{s}", "llama", tied=False, layers=4, seed=s) for s in (0, 1)]
    mcore = []
    for s in (0, 1):
        convert_hf_to_megatron(hf[s], root / f"mcore{s}", log=lambda *_: None)
        mcore.append(root / f"mcore{s}")
    return root, hf, mcore


def _route(world: int, engines: int, engine_tp: int = 1):
    from megatron_spin.sync.routing import FeedRoute

    return FeedRoute.for_placement(trainer_world=world, engines=engines, engine_tp=engine_tp, gpus_per_node=0)


def _sync_jobs(rank, world_size, urls, jobs, disk_dir):
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.rollout.protocol import SamplingParams
    from megatron_spin.sync.config import PushTarget, SyncConfig

    fleet = RolloutFleet([EngineClient(url, API_KEY) for url in urls]) if rank == 0 else None
    results = []
    for version, (layout, transport, ckpt, bucket_bytes, *dtype) in enumerate(jobs, start=1):
        pctx = init_parallel(layout)
        arch = read_arch(ckpt)
        chunks = build_model(arch, pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        cfg = SyncConfig(transport=transport, bucket_mb=bucket_bytes / 1e6, dtype=dtype[0] if dtype else None)
        target = PushTarget(api_key=API_KEY, disk_dir=disk_dir, route=_route(world_size, len(urls)))
        sync = Push(cfg, target, arch, pctx, fleet)
        before = logprob_gap(chunks, pctx, fleet, PROBE)
        report = sync.push(chunks, version)
        after = logprob_gap(chunks, pctx, fleet, PROBE)
        # The engine's own samples: generated after the push, scored by the trainer.
        samples: list = [None]
        if rank == 0:
            replies = fleet.generate([p[:4] for p in PROBE], SamplingParams(max_new_tokens=6, n=2, seed=version))
            samples[0] = [(list(PROBE[c.prompt_index][:4]) + list(c.output_ids), c.output_logprobs, c.weight_version)
                          for r in replies for c in r]
        torch.distributed.broadcast_object_list(samples, src=0)
        ours = trainer_logprobs(chunks, pctx, [s for s, _, _ in samples[0]])
        sample_gap = None
        if rank == 0:
            sample_gap = max(float((o[-len(lp):] - torch.tensor(lp)).abs().max()) for o, (_, lp, _) in zip(ours, samples[0]))
        results.append(dict(layout=str(layout), transport=transport, before=before, after=after,
                            sample_gap=sample_gap, versions={v for _, _, v in samples[0]},
                            tensors=report.tensors, buckets=report.buckets, version=report.version))
        sync.close()
        destroy_parallel()
    return results


def test_push_matches_trainer_logprobs_tp2_pp2_all_transports(checkpoints, tmp_path):
    root, hf, mcore = checkpoints
    jobs = [
        (TP2, "tensor", mcore[1], 64 * 1024),
        (PP2, "tensor", mcore[0], 64 * 1024),
        (TP2, "disk", mcore[1], 128 * 1024),
        (PP2, "distributed", mcore[0], 64 * 1024),
        (TP2, "distributed", mcore[1], 0),  # bucket_bytes 0: one tensor per bucket
    ]
    # Two engines, holding the simulated devices of trainer ranks 0 and 1: every push reaches both.
    with launch_embedded(hf[0], api_key=API_KEY, log_path=tmp_path / "a.log", threads=1, device_ids=["cpu:0"]) as a, \
            launch_embedded(hf[0], api_key=API_KEY, log_path=tmp_path / "b.log", threads=1, device_ids=["cpu:1"]) as b:
        per_rank = launch(_sync_jobs, 2, ([a.url, b.url], jobs, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)
    results = per_rank[0]
    assert [r["version"] for r in results] == ["1", "2", "3", "4", "5"]
    for r in results:
        assert len(r["before"]) == len(r["after"]) == 2, r
        assert min(r["before"].values()) > 1e-2, r  # the push had something to change
        assert max(r["after"].values()) <= 1e-4, r
        assert r["sample_gap"] <= 1e-4, r
        assert r["versions"] == {r["version"]}, r
        assert r["tensors"] == 4 * 9 + 3  # per layer: norm, q, k, v, o, norm, gate, up, down; embed, norm, lm_head
    assert results[-1]["buckets"] == results[-1]["tensors"]
    assert results[0]["buckets"] < results[0]["tensors"]


def test_push_of_a_qwen3_actor_matches_trainer_logprobs(tmp_path):
    """Qwen3 (per-head q/k norms, head_dim 32 != hidden 64 / 4 heads, tied) through the same
    push path into an engine that loads it natively: q/k norms travel replicated, whole."""
    hf = [make_tiny_hf(tmp_path / f"hf{s}", "qwen3", tied=True, layers=2, seed=s) for s in (0, 1)]
    mcore = []
    for s in (0, 1):
        convert_hf_to_megatron(hf[s], tmp_path / f"mcore{s}", log=lambda *_: None)
        mcore.append(tmp_path / f"mcore{s}")
    jobs = [(TP2, "tensor", mcore[1], 64 * 1024), (PP2, "distributed", mcore[0], 64 * 1024)]
    with launch_embedded(hf[0], api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0"]) as engine:
        results = launch(_sync_jobs, 2, ([engine.url], jobs, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)[0]
    assert [r["version"] for r in results] == ["1", "2"]
    for r in results:
        assert min(r["before"].values()) > 1e-2, r  # the push had something to change
        assert max(r["after"].values()) <= 1e-4, r
        assert r["sample_gap"] <= 1e-4, r
        assert r["versions"] == {r["version"]}, r
        # per layer: norm, q, k, v, q_norm, k_norm, o, norm, gate, up, down; embed, final norm (tied: no lm_head)
        assert r["tensors"] == 2 * 11 + 2, r

def lose_second_bucket(feed):
    """SIMULATED FAULT: a feed that reports its second bucket delivered but never sends it."""
    original, seen = feed._feed_bucket, []

    def feed_bucket(engine, bucket, *args):
        seen.append(engine)
        return None if len(seen) == 2 else original(engine, bucket, *args)

    feed._feed_bucket = feed_bucket


class SkippingTransport:
    """SIMULATED FAULT: a disk transport that silently leaves bucket 1 out (a stage missing tensors)."""

    def __new__(cls, *args, **kw):
        from megatron_spin.sync.transports import DiskTransport

        class _Skipping(DiskTransport):
            def send(self, bucket):
                if self.receipt.buckets == 1 and not getattr(self, "_skipped", False):
                    self._skipped = True
                    return
                super().send(bucket)

        return _Skipping(*args, **kw)


class FailingTransport:
    """SIMULATED FAULT: the pusher's disk transport raises at bucket 2 (e.g. a disk full)."""

    def __new__(cls, *args, **kw):
        from megatron_spin.sync.transports import DiskTransport

        class _Failing(DiskTransport):
            def _send(self, bucket, engines):
                if self.receipt.buckets == 2:
                    raise OSError("simulated transport failure")
                super()._send(bucket, engines)

        return _Failing(*args, **kw)


class MisnamingTransport:
    """SIMULATED FAULT: a distributed transport that announces a name the engine does not have."""

    def __new__(cls, **kw):
        from megatron_spin.sync.transports import DistributedTransport

        class _Misnaming(DistributedTransport):
            def _send(self, bucket, engines):
                if self.receipt.buckets == 1:
                    bucket = [("model.no_such.weight", t) if i == 0 else (n, t) for i, (n, t) in enumerate(bucket)]
                super()._send(bucket, engines)

        return _Misnaming(**kw)


def _fault_jobs(rank, world_size, url, mcore, disk_dir):
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.rollout.protocol import SamplingParams
    from megatron_spin.rollout.staleness import StaleSamplesError, check_versions
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from megatron_spin.sync.push import SyncError

    fleet = RolloutFleet([EngineClient(url, API_KEY)]) if rank == 0 else None
    pctx = init_parallel(TP2)
    arch = read_arch(mcore[0])
    models = []
    for ckpt in mcore:
        chunks = build_model(arch, pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        models.append(chunks)
    cfg = SyncConfig(bucket_mb=64 * 1024 / 1e6)
    disk = SyncConfig(transport="disk", bucket_mb=64 * 1024 / 1e6)
    target = PushTarget(api_key=API_KEY, disk_dir=disk_dir, route=_route(world_size, 1))
    out = {}

    def push(modules, version, transport=None, config=cfg, fault=None):
        sync = Push(config, target, arch, pctx, fleet, transport if rank == 0 else None)
        if fault is not None:
            fault(sync.sender.feed)
        try:
            return sync.push(modules, version)
        finally:
            sync.close()

    push(models[1], 1)
    out["gap_v1"] = max(logprob_gap(models[1], pctx, fleet, PROBE).values())

    # 1. Skipped push: the trainer moved to version 2, the engines did not.
    if rank == 0:
        replies = fleet.generate(PROBE, SamplingParams(max_new_tokens=3))
        try:
            check_versions([c for r in replies for c in r], trainer_version=2)
            out["stale_refused"] = False
        except StaleSamplesError as exc:
            out["stale_refused"] = str(exc)
        check_versions([c for r in replies for c in r], trainer_version=2, max_lag=1)  # one step off: allowed

    # 2. A bucket lost after being reported sent: only the log-prob probe can see it.
    push(models[0], 2, fault=lose_second_bucket)
    out["gap_lost_bucket"] = max(logprob_gap(models[0], pctx, fleet, PROBE).values())

    # 3. A stage leaves tensors out: every rank raises, the version does not advance.
    try:
        push(models[1], 3, SkippingTransport(disk_dir), config=disk)
        out["partial_error"] = None
    except SyncError as exc:
        out["partial_error"] = str(exc)
    out["version_after_partial"] = EngineClient(url, API_KEY).weight_version() if rank == 0 else None

    # 4. Recovery: a complete push makes the engine serve again with the right weights.
    push(models[1], 4)
    out["gap_recovered"] = max(logprob_gap(models[1], pctx, fleet, PROBE).values())

    # 5. A pusher's transport fails midway: its TP peer keeps gathering with it, every rank
    #    raises the same error at once, and the engine serves nothing until the next push.
    started = time.monotonic()
    try:
        push(models[0], 5, FailingTransport(disk_dir), config=disk)
        out["failing_error"] = None
    except SyncError as exc:
        out["failing_error"] = str(exc)
    out["failing_seconds"] = time.monotonic() - started
    out["serving_after_failure"] = len(fleet.serving) if rank == 0 else None
    # The failed push closed the engine's weight-update session and let generation continue (an
    # SGLang engine refuses a second begin and fails /health while paused).
    out["engine_after_failure"] = fleet.slots[0].client.request("GET", "/get_server_info") if rank == 0 else None
    push(models[0], 6)
    out["gap_after_failure"] = max(logprob_gap(models[0], pctx, fleet, PROBE).values())

    # 6. Distributed: an engine refuses an announcement; the broadcast fails after the group
    #    timeout (no hang), the group is torn down, and the next push forms a new one.
    dcfg = SyncConfig(transport="distributed", bucket_mb=64 * 1024 / 1e6, group_timeout_s=5)
    try:
        push(models[1], 7, MisnamingTransport(timeout_s=5), config=dcfg)
        out["refused_error"] = None
    except SyncError as exc:
        out["refused_error"] = str(exc)
    push(models[1], 8, config=dcfg)
    out["gap_after_refusal"] = max(logprob_gap(models[1], pctx, fleet, PROBE).values())
    return out


def test_skipped_lost_and_partial_pushes_are_detected(checkpoints, tmp_path):
    root, hf, mcore = checkpoints
    with launch_embedded(hf[0], api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0"]) as server:
        per_rank = launch(_fault_jobs, 2, (server.url, mcore, str(tmp_path / "weights")), timeout=LAUNCH_TIMEOUT)
    out, other = per_rank
    assert out["gap_v1"] <= 1e-4
    assert out["stale_refused"] and "weight versions ['1']" in out["stale_refused"], out
    assert out["gap_lost_bucket"] > 1e-2, out
    assert out["partial_error"] and re.search(r"partial push to http://\S+: [1-9]\d* tensors missing", out["partial_error"]), out
    assert other["partial_error"] == out["partial_error"]  # every rank raises the same error
    assert out["version_after_partial"] == "2"
    assert out["gap_recovered"] <= 1e-4
    assert out["failing_error"] and "simulated transport failure" in out["failing_error"], out
    assert other["failing_error"] == out["failing_error"]
    assert out["failing_seconds"] < 60 and out["serving_after_failure"] == 0
    assert out["engine_after_failure"]["weight_update_session"] is False, out["engine_after_failure"]
    assert out["engine_after_failure"]["paused"] is False, out["engine_after_failure"]
    assert out["gap_after_failure"] <= 1e-4
    assert out["refused_error"] and "model.no_such.weight" in out["refused_error"], out
    assert other["refused_error"] == out["refused_error"]
    assert out["gap_after_refusal"] <= 1e-4


def _route_jobs(rank, world_size, url, mcore):
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from megatron_spin.sync.push import SyncError
    from megatron_spin.sync.routing import FeedRoute

    fleet = RolloutFleet([EngineClient(url, API_KEY)]) if rank == 0 else None
    cfg = SyncConfig(bucket_mb=64 * 1024 / 1e6)
    arch = read_arch(mcore[1])
    out = {}
    # The engine simulates two TP ranks on cpu:0 and cpu:1: each is fed by the trainer rank there.
    route = _route(world_size, engines=1, engine_tp=2)
    out["feeders"] = route.feeders
    for version, (layout, ckpt) in enumerate(((TP2, mcore[1]), (PP2, mcore[0])), start=1):
        pctx = init_parallel(layout)
        chunks = build_model(arch, pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        sync = Push(cfg, PushTarget(engine_tp_size=2, api_key=API_KEY, route=route), arch, pctx, fleet)
        report = sync.push(chunks, version)
        out[str(layout)] = (report.tensors, report.buckets, max(logprob_gap(chunks, pctx, fleet, PROBE).values()))
        sync.close()
        destroy_parallel()
    # A route that feeds engine rank 0 from rank 1's device (and rank 1 from rank 0's): refused.
    pctx = init_parallel(TP2)
    chunks = build_model(arch, pctx, init_weights=False)
    load_model_weights(chunks, mcore[1])
    wrong = FeedRoute(feeders=((1, 0),), rank_devices=("cpu:0", "cpu:1"))
    sync = Push(cfg, PushTarget(engine_tp_size=2, api_key=API_KEY, route=wrong), arch, pctx, fleet)
    try:
        sync.push(chunks, 3)
        out["wrong"] = None
    except SyncError as exc:
        out["wrong"] = str(exc)
    sync.close()
    # One feeder failing on its own at its second bucket (a payload that does not pickle: a
    # simulated fault on rank 1) fails the push on every rank and strands no peer in a collective;
    # the next push re-admits the engine (dropped by the failures) and goes through.
    sync = Push(cfg, PushTarget(engine_tp_size=2, api_key=API_KEY, route=route), arch, pctx, fleet)
    real, calls = sync.sender.feed._encode, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 2:
            raise pickle.PicklingError("simulated fault: a payload that does not pickle")
        return real(*args)

    if rank == 1:
        sync.sender.feed._encode = broken
    started = time.monotonic()
    try:
        sync.push(chunks, 4)
        out["local"] = None
    except SyncError as exc:
        out["local"] = str(exc)
    out["local_seconds"] = time.monotonic() - started
    sync.sender.feed._encode = real
    report = sync.push(chunks, 5)
    out["after_local"] = (report.tensors, max(logprob_gap(chunks, pctx, fleet, PROBE).values()))
    sync.close()
    return out


def test_colocated_feed_routes_each_engine_rank_from_its_own_device(checkpoints, tmp_path):
    root, hf, mcore = checkpoints
    with launch_embedded(hf[0], api_key=API_KEY, log_path=tmp_path / "engine.log", threads=1,
                         device_ids=["cpu:0", "cpu:1"]) as server:
        out, other = launch(_route_jobs, 2, (server.url, mcore), timeout=LAUNCH_TIMEOUT)
    assert out["feeders"] == ((0, 1),)  # engine TP rank k <- trainer rank k (the rank on its device)
    for layout in (str(TP2), str(PP2)):  # PP=2: rank 1 (stage 1) feeds TP rank 1 with stage 0's tensors too
        tensors, buckets, gap = out[layout]
        assert tensors == 4 * 9 + 3 and buckets > 1 and gap <= 1e-4, (layout, out[layout])
    assert out["wrong"] and "from device 'cpu:1', which this engine rank does not hold" in out["wrong"], out
    assert other["wrong"] == out["wrong"]
    assert out["local"] and "rank 1: PicklingError: simulated fault" in out["local"], out
    assert other["local"] == out["local"] and out["local_seconds"] < 60  # no rank waited for a timeout
    assert out["after_local"][0] == 4 * 9 + 3 and out["after_local"][1] <= 1e-4, out["after_local"]
