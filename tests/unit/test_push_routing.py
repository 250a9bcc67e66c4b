"""Which trainer rank feeds which engine rank (device locality), and the start-up rules that keep
GPU pushes on routes NCCL and CUDA IPC allow."""

from __future__ import annotations

import pytest

from megatron_spin.config.run import ActorRolloutRefConfig, RolloutConfig, RunConfig, TrainerConfig
from megatron_spin.errors import ConfigError
from megatron_spin.orchestrate.placement import Placement
from megatron_spin.sync.config import PushTarget, SyncConfig
from megatron_spin.sync.routing import FeedRoute


def route_of(placement: Placement) -> FeedRoute:
    return FeedRoute.for_placement(trainer_world=placement.trainer_world, engines=placement.engines,
                                   engine_tp=placement.engine_tp, gpus_per_node=placement.gpus_per_node)


def test_spin_8b_layout_every_engine_is_fed_from_its_own_gpu():
    """TP2 x PP2 x DP2 on 8 GPUs with 8 colocated TP1 engines: engine e is fed by rank e, the rank on
    its GPU — not by a stage's pusher (two pushers for eight engines: six would see a GPU they
    cannot open)."""
    p = Placement.plan(tp=2, pp=2, nnodes=1, gpus_per_node=8, num_engines=8, engine_tp=1, colocated=True)
    route = route_of(p)
    assert route.feeders == tuple((e,) for e in range(8))
    assert route.feeds(3) == [(3, 0)] and route.leader(3) == 3
    # Ray gave the ranks GPUs in an order of its own (here reversed, on a node whose raylet sees
    # GPUs 8-15): each engine starts on its feeder's GPU, whichever it is.
    reported = [("node-a", [str(15 - r)]) for r in range(8)]
    assert route.engine_gpus(reported) == [(str(15 - e),) for e in range(8)]


def test_spin_70b_layout_each_engine_rank_from_the_trainer_rank_on_its_gpu():
    p = Placement.plan(tp=8, pp=4, nnodes=8, gpus_per_node=8, num_engines=8, engine_tp=8, colocated=True)
    route = route_of(p)
    assert len(route.feeders) == 8 and all(len(f) == 8 for f in route.feeders)
    for e in range(8):
        for k in range(8):
            rank = route.feeders[e][k]
            assert p.rank_node(rank) == p.engine_node(e)  # same node
    assert route.leader(5) == 40 and route.feeds(43) == [(5, 3)]
    assert route.feeder_ranks == frozenset(range(64))
    reported = [(f"node-{r // 8}", [str((r * 3) % 8)]) for r in range(64)]  # a shuffled GPU order per node
    gpus = route.engine_gpus(reported)
    assert gpus[5] == tuple(str(((40 + k) * 3) % 8) for k in range(8))  # engine 5's TP rank k: rank 40+k's GPU


def test_engine_gpus_refuse_what_cannot_be_fed():
    route = FeedRoute.for_placement(trainer_world=4, engines=2, engine_tp=2, gpus_per_node=2)
    ok = [("n0", ["0"]), ("n0", ["1"]), ("n1", ["1"]), ("n1", ["0"])]
    assert route.engine_gpus(ok) == [("0", "1"), ("1", "0")]
    with pytest.raises(ValueError, match=r"engine 1: its feeder ranks \(2, 3\) run on different nodes"):
        route.engine_gpus(ok[:3] + [("n2", ["0"])])
    with pytest.raises(ValueError, match="trainer rank 0 holds GPUs"):
        route.engine_gpus([("n0", [])] + ok[1:])
    with pytest.raises(ValueError, match="share GPUs"):
        route.engine_gpus([("n0", ["1"])] + ok[1:])
    with pytest.raises(ValueError, match="3 ranks reported"):
        route.engine_gpus(ok[:3])


def test_cpu_engines_are_fed_round_robin_from_simulated_devices():
    route = FeedRoute.for_placement(trainer_world=2, engines=3, engine_tp=1, gpus_per_node=0)
    assert route.feeders == ((0,), (1,), (0,)) and route.rank_devices == ("cpu:0", "cpu:1")
    assert route.engine_devices(2) == ("cpu:0",) and route.feeds(0) == [(0, 0), (2, 0)]


def test_routes_that_cannot_be_built_are_refused():
    with pytest.raises(ValueError, match="must cover the 8 trainer GPUs exactly"):
        FeedRoute.for_placement(trainer_world=8, engines=2, engine_tp=2, gpus_per_node=8)
    with pytest.raises(ValueError, match="engine 0: feeder ranks \\(2,\\) outside the 2 trainer ranks"):
        FeedRoute(feeders=((2,),), rank_devices=("cpu:0", "cpu:1"))
    with pytest.raises(ValueError, match="every engine needs 2 feeders"):
        PushTarget(engine_tp_size=2, route=FeedRoute(feeders=((0,),), rank_devices=("cpu:0",)))


def _gpu_run(transport: str, placement: str) -> RunConfig:
    rollout = RolloutConfig(engine="sglang", placement=placement, sync=SyncConfig(transport=transport))
    return RunConfig(actor_rollout_ref=ActorRolloutRefConfig(rollout=rollout),
                     trainer=TrainerConfig(n_gpus_per_node=8))


def test_gpu_tensor_push_needs_colocated_engines():
    with pytest.raises(ConfigError) as info:
        _gpu_run("tensor", "disaggregated")
    assert info.value.key == "actor_rollout_ref.rollout.sync.transport"
    assert "tensor needs colocated engines on GPUs" in str(info.value)
    _gpu_run("tensor", "colocated")
    _gpu_run("disk", "disaggregated")


def test_gpu_distributed_push_cannot_share_gpus_with_engines():
    with pytest.raises(ConfigError) as info:
        _gpu_run("distributed", "colocated")
    assert info.value.key == "actor_rollout_ref.rollout.sync.transport"
    assert "NCCL refuses (Duplicate GPU detected)" in str(info.value)
    _gpu_run("distributed", "disaggregated")


def test_cpu_runs_may_push_any_way():
    for transport in ("tensor", "disk", "distributed"):
        RunConfig(actor_rollout_ref=ActorRolloutRefConfig(rollout=RolloutConfig(sync=SyncConfig(transport=transport))))


def test_a_distributed_pusher_hosts_its_group_at_its_node_address():
    """Engines on other nodes dial the pusher's node, never 127.0.0.1 (the worker passes Ray's
    view of the node address)."""
    import types

    from megatron_spin.spec.arch import ModelArch
    from megatron_spin.sync.push import StageSender

    arch = ModelArch(family="llama", hf_architecture="LlamaForCausalLM", num_layers=2, hidden_size=8,
                     ffn_hidden_size=16, num_attention_heads=2, num_kv_heads=2, head_dim=4, vocab_size=16,
                     max_position_embeddings=8, rope_theta=1e4, rope_scaling_factor=None, norm_eps=1e-5,
                     tie_word_embeddings=False, qkv_bias=False)
    pusher = types.SimpleNamespace(rank=8, dp_rank=0, tp_rank=0, pp_rank=1)
    sender = StageSender(SyncConfig(transport="distributed"), PushTarget(engine_tp_size=8), arch, pusher, "10.1.2.3")
    assert sender.transport.master_address == "10.1.2.3"
    peer = types.SimpleNamespace(rank=9, dp_rank=0, tp_rank=1, pp_rank=1)
    assert StageSender(SyncConfig(transport="distributed"), PushTarget(), arch, peer, "10.1.2.3").transport is None

