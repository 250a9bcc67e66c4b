"""Where trainer ranks and engines go: one node packed, several nodes one bundle per node."""

from __future__ import annotations

import re

import pytest

from megatron_spin.errors import ConfigError
from megatron_spin.orchestrate.placement import Placement


def plan(**kw):
    args = dict(tp=1, pp=1, nnodes=1, gpus_per_node=0, num_engines=1, engine_tp=1, colocated=True)
    return Placement.plan(**{**args, **kw})


def test_one_cpu_node_packs_one_bundle_per_actor():
    p = plan(tp=2, num_engines=2)
    assert (p.trainer_world, p.engines, p.strategy) == (2, 2, "PACK")
    assert p.bundles() == [{"CPU": 1}] * 4
    assert [p.rank_resources(r)[0] for r in range(2)] == [0, 1]
    assert [p.engine_resources(i)[0] for i in range(2)] == [2, 3]


def test_two_cpu_nodes_split_the_ranks_and_keep_engines_on_the_first():
    p = plan(tp=2, nnodes=2)
    assert p.strategy == "STRICT_SPREAD"
    assert p.bundles() == [{"CPU": 2}, {"CPU": 1}]  # node 0: rank 0 + the engine; node 1: rank 1
    assert [p.rank_resources(r)[0] for r in range(2)] == [0, 1]
    assert p.engine_resources(0) == (0, {"num_cpus": 1})


def raises(key: str, message: str):
    """pytest.raises(ConfigError) keyed ``key`` whose message is ``"<key>: ..."`` containing ``message``."""
    return pytest.raises(ConfigError, match=re.escape(f"{key}: ") + ".*" + re.escape(message))


def test_cpu_ranks_must_divide_over_the_nodes():
    with raises("trainer.nnodes", "rule trainer ranks % nnodes == 0 violated on CPU nodes: 3 ranks, nnodes=2") as info:
        plan(tp=3, nnodes=2)
    assert info.value.key == "trainer.nnodes"
    with raises("trainer.nnodes", "rule trainer ranks % nnodes == 0 violated on CPU nodes: 3 ranks, nnodes=2"):
        plan(cpu_ranks=3, nnodes=2)


def test_cpu_ranks_add_data_parallel_ranks():
    p = plan(tp=2, cpu_ranks=4, nnodes=2)
    assert (p.trainer_world, p.strategy) == (4, "STRICT_SPREAD")
    assert [p.rank_node(r) for r in range(4)] == [0, 0, 1, 1]
    assert p.bundles() == [{"CPU": 3}, {"CPU": 2}]  # node 0: ranks 0-1 + the engine; node 1: ranks 2-3
    assert plan(tp=2).trainer_world == 2  # 0: one model replica
    with raises("trainer.cpu_ranks", "rule cpu_ranks % (TP*PP) == 0 violated: 3 ranks, TP*PP=2") as info:
        plan(tp=2, cpu_ranks=3)
    assert info.value.key == "trainer.cpu_ranks"


def test_gpu_colocated_many_nodes_rank_order_fills_nodes():
    p = plan(tp=8, pp=4, nnodes=8, gpus_per_node=8, engine_tp=8)
    assert (p.trainer_world, p.engines) == (64, 8)
    assert p.bundles() == [{"CPU": 8, "GPU": 8}] * 8
    # A TP group (8 consecutive ranks) sits on one node; engine i shares node i's GPUs.
    assert {p.rank_node(r) for r in range(8, 16)} == {1}
    assert p.rank_resources(63) == (7, {"num_cpus": 1, "num_gpus": 1})
    assert p.engine_resources(5) == (5, {"num_cpus": 0, "num_gpus": 0})


def test_gpu_disaggregated_engines_take_the_nodes_after_the_trainer():
    p = plan(tp=8, pp=2, nnodes=4, gpus_per_node=8, num_engines=2, engine_tp=8, colocated=False)
    assert (p.trainer_world, p.engines) == (16, 2)
    assert [p.engine_resources(i) for i in range(2)] == [(2, {"num_cpus": 1, "num_gpus": 8}),
                                                         (3, {"num_cpus": 1, "num_gpus": 8})]
    assert p.bundles()[2] == {"CPU": 1, "GPU": 8}


def test_an_engine_never_spans_nodes():
    with raises("actor_rollout_ref.rollout.tp_size", "rule n_gpus_per_node % rollout.tp_size == 0 violated: "
                "8 GPUs per node, tp_size=16"):
        plan(nnodes=2, gpus_per_node=8, engine_tp=16)
    with raises("actor_rollout_ref.rollout.tp_size", "rule n_gpus_per_node % rollout.tp_size == 0 violated: "
                "6 GPUs per node, tp_size=4"):
        plan(nnodes=1, gpus_per_node=6, engine_tp=4)


def test_a_tp_group_never_spans_gpu_nodes():
    with raises("actor_rollout_ref.actor.tp", "rule n_gpus_per_node % TP == 0 violated: 4 GPUs per node, TP=8"):
        plan(tp=8, nnodes=2, gpus_per_node=4, engine_tp=4)


def test_colocated_gpu_engines_sit_on_their_feeders_nodes():
    p = plan(nnodes=2, gpus_per_node=8, engine_tp=2)
    assert p.engines == 8
    assert [p.engine_node(i) for i in (3, 4)] == [0, 1]
    assert all(p.rank_node(2 * i + k) == p.engine_node(i) for i in range(8) for k in range(2))


def test_reward_workers_share_trainer_gpus_spread_evenly():
    p = plan(tp=8, pp=4, nnodes=8, gpus_per_node=8, engine_tp=8)
    assert [p.reward_resources(k, 4) for k in range(4)] == [
        (0, {"num_cpus": 0, "num_gpus": 0}, (0,)), (2, {"num_cpus": 0, "num_gpus": 0}, (0,)),
        (4, {"num_cpus": 0, "num_gpus": 0}, (0,)), (6, {"num_cpus": 0, "num_gpus": 0}, (0,))]
    one = plan(nnodes=1, gpus_per_node=8)
    assert [one.reward_resources(k, 2)[0::2] for k in range(2)] == [(0, (0,)), (4, (4,))]
    with raises("reward_model.num_workers", "9 workers is more than the 8 trainer GPUs") as info:
        one.reward_resources(0, 9)
    assert info.value.key == "reward_model.num_workers"


def test_engines_bound_to_every_interface_are_reached_at_their_node():
    from megatron_spin.orchestrate.engines import reachable_url

    assert reachable_url("http://0.0.0.0:30001", "0.0.0.0", "10.0.0.7") == "http://10.0.0.7:30001"
    assert reachable_url("http://127.0.0.1:5000", "127.0.0.1", "10.0.0.7") == "http://127.0.0.1:5000"


def test_pinned_gpu_indices_map_through_the_inherited_visible_devices():
    from megatron_spin.platform.devices import physical_gpu_ids

    assert physical_gpu_ids([0, 1], {}) == ["0", "1"]
    assert physical_gpu_ids([2, 3], {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ["6", "7"]  # Slurm gave GPUs 4-7
    with pytest.raises(ValueError, match="outside this process's CUDA_VISIBLE_DEVICES=4,5"):
        physical_gpu_ids([2], {"CUDA_VISIBLE_DEVICES": "4,5"})


def test_cpu_threads_let_each_phase_use_every_core_when_colocated(monkeypatch):
    """Colocated CPU runs take turns (engines sample, then ranks train): each side gets all cores,
    shared among its own processes; disaggregated ones run at once and split them; GPUs: torch's."""
    import os

    from megatron_spin.orchestrate.cluster import cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    plan = lambda **kw: Placement.plan(**{"tp": 1, "pp": 1, "nnodes": 1, "gpus_per_node": 0, "num_engines": 1,  # noqa: E731
                                          "engine_tp": 1, "colocated": True, **kw})
    assert cpu_threads(plan(), colocated=True) == (8, 8)
    assert cpu_threads(plan(tp=2, num_engines=2), colocated=True) == (4, 4)
    assert cpu_threads(plan(tp=2, num_engines=2, colocated=False), colocated=False) == (2, 2)
    assert cpu_threads(plan(gpus_per_node=8, num_engines=8), colocated=True) == (0, 0)


def test_a_cluster_without_ray_calls_its_rank_directly_and_names_a_failed_call():
    """``trainer.use_ray=false``: the cluster's calls are plain method calls on objects in this
    process; an exception in one becomes the ClusterError a Ray worker's would (the call named,
    the traceback included) and marks the cluster broken."""
    from megatron_spin.errors import ClusterError
    from megatron_spin.orchestrate.cluster import TrainerCluster

    class Rank:
        def __init__(self, k):
            self.k = k

        def twice(self, x):
            return 2 * x + self.k

        def fail(self):
            raise ValueError("the optimizer state does not fit")

    cluster = TrainerCluster.__new__(TrainerCluster)  # only the calling part: no model, no engine
    cluster.local, cluster._broken, cluster.timeout_s = True, False, 1.0
    ranks = [Rank(0), Rank(1)]
    assert cluster._ask(ranks, "twice", 5, what="double") == [10, 11]
    assert not cluster._broken
    with pytest.raises(ClusterError, match=r"(?s)actor update failed: Traceback.*in fail.*ValueError: the optimizer"):
        cluster._ask(ranks, "fail", what="actor update")
    assert cluster._broken
