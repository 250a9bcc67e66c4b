"""Place trainer ranks and rollout engines with Ray, and drive them as one object.

    with TrainerCluster(plan, worker_spec, engine_spec, sync_cfg, arch) as cluster:
        samples = cluster.fleet.generate(prompts, sampling)
        metrics = cluster.train(pairs, iteration)
        report = cluster.push(version)

Placement (:class:`Placement`): one Ray actor per trainer rank (TP × PP × DP) and one per
rollout engine, in one placement group.  On the CPU every actor takes one logical CPU.  On
GPUs each trainer rank takes one GPU; *disaggregated* engines take ``rollout.tp_size`` GPUs
of their own, *colocated* engines share the trainer ranks' GPUs (they release their memory
while the actor trains).  Ray is started locally unless ``ray_address`` names a cluster.

Every call to the ranks is collective, so they are always called together, and each wait
is bounded (``timeout_s``): a hung collective surfaces as an error naming the call, not as
a run that never ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional, Sequence

from megatron_spin.config.optim import ConfigError
from megatron_spin.orchestrate.engines import EngineHost, EngineSpec
from megatron_spin.orchestrate.worker import TrainerWorker, WorkerSpec
from megatron_spin.rollout.client import EngineClient
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.sync.push import PushCoordinator, SyncConfig, SyncReport

log = logging.getLogger("megatron_spin.cluster")


class ClusterError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every trainer rank and engine runs.

    One node: one bundle per actor, packed.  Several nodes: one bundle per node (its GPUs, or on
    CPU nodes the CPUs of the actors it hosts), strictly spread: every bundle is a different node
    (which node is Ray's choice); trainer ranks fill bundles in rank order (TP groups, the
    fastest-varying rank index, stay inside a node: n_gpus_per_node % TP == 0), disaggregated
    engines take the GPUs after the trainer's, colocated engines share the trainer's GPUs, and
    CPU engines go into the first bundle.
    """

    trainer_world: int
    engines: int
    engine_tp: int
    gpus_per_node: int  # 0: CPU
    colocated: bool
    nnodes: int = 1

    @classmethod
    def plan(cls, *, tp: int, pp: int, nnodes: int, gpus_per_node: int, num_engines: int, engine_tp: int,
             colocated: bool) -> "Placement":
        mp = tp * pp
        if gpus_per_node == 0:  # CPU: one DP replica spread evenly over the nodes; engines beside it
            if mp % nnodes:
                raise ConfigError(f"rule (TP*PP) % trainer.nnodes == 0 violated on CPU nodes: TP*PP={mp}, "
                                  f"nnodes={nnodes} (each node hosts the same number of ranks)")
            return cls(mp, num_engines, 1, 0, colocated, nnodes)
        total = nnodes * gpus_per_node
        if gpus_per_node % tp:
            raise ConfigError(f"rule n_gpus_per_node % TP == 0 violated: {gpus_per_node} GPUs per node, "
                              f"actor_rollout_ref.actor.tp={tp} (a TP group never spans nodes)")
        if engine_tp > gpus_per_node or gpus_per_node % engine_tp:
            raise ConfigError(f"rule n_gpus_per_node % rollout.tp_size == 0 violated: {gpus_per_node} GPUs per node, "
                              f"actor_rollout_ref.rollout.tp_size={engine_tp} (an engine never spans nodes)")
        if colocated:
            world, engines = total, total // engine_tp
        else:
            world, engines = total - num_engines * engine_tp, num_engines
            if world < 1:
                raise ConfigError(f"actor_rollout_ref.rollout.num_engines={num_engines} x tp_size={engine_tp} "
                                  f"leaves no GPU for training out of {total}")
        if world % mp:
            raise ConfigError(f"rule trainer GPUs % (TP*PP) == 0 violated: {world} GPUs for training, TP*PP={mp}")
        return cls(world, engines, engine_tp, gpus_per_node, colocated, nnodes)

    # -- which node hosts what -----------------------------------------------------------------
    def rank_node(self, rank: int) -> int:
        per_node = self.gpus_per_node or self.trainer_world // self.nnodes
        return rank // per_node

    def engine_node(self, index: int) -> int:
        if not self.gpus_per_node:
            return 0
        first_gpu = index * self.engine_tp if self.colocated else self.trainer_world + index * self.engine_tp
        return first_gpu // self.gpus_per_node

    @property
    def strategy(self) -> str:
        return "PACK" if self.nnodes == 1 else "STRICT_SPREAD"

    def bundles(self) -> list[dict]:
        if self.nnodes > 1:
            return [self._node_bundle(n) for n in range(self.nnodes)]
        if self.gpus_per_node == 0:
            return [{"CPU": 1}] * (self.trainer_world + self.engines)
        trainer = [{"CPU": 1, "GPU": 1}] * self.trainer_world
        return trainer if self.colocated else trainer + [{"CPU": 1, "GPU": self.engine_tp}] * self.engines

    def _node_bundle(self, node: int) -> dict:
        ranks = sum(self.rank_node(r) == node for r in range(self.trainer_world))
        engines = sum(self.engine_node(i) == node for i in range(self.engines))
        if not self.gpus_per_node:
            return {"CPU": ranks + engines}
        cpus = ranks + (0 if self.colocated else engines)
        return {"CPU": max(cpus, 1), "GPU": self.gpus_per_node}

    def rank_resources(self, rank: int) -> tuple[int, dict]:
        """(bundle index, Ray resources) of trainer rank ``rank``."""
        gpu = 1 if self.gpus_per_node else 0
        return (self.rank_node(rank) if self.nnodes > 1 else rank), {"num_cpus": 1, "num_gpus": gpu}

    def engine_gpu_ids(self, index: int) -> Optional[tuple[int, ...]]:
        """Node-local GPU ids a colocated GPU engine runs on (Ray pins none for a zero-GPU actor,
        so without these every engine of a node would start on GPU 0); None otherwise."""
        if not (self.gpus_per_node and self.colocated):
            return None
        first = (index * self.engine_tp) % self.gpus_per_node
        return tuple(range(first, first + self.engine_tp))

    def reward_resources(self, worker: int, workers: int) -> tuple[int, dict, tuple[int, ...]]:
        """GPU runs: (bundle, Ray resources, pinned GPU id) of reward-model worker ``worker`` of
        ``workers``.  Every GPU belongs to the trainer (and colocated engines), so reward workers
        share trainer GPUs, spread evenly and pinned by id like colocated engines."""
        if workers > self.trainer_world:
            raise ConfigError(f"reward_model.num_workers={workers} is more than the {self.trainer_world} trainer GPUs "
                              "the reward workers share")
        slot = worker * (self.trainer_world // workers)
        node, gpu = divmod(slot, self.gpus_per_node)
        return (node if self.nnodes > 1 else slot), {"num_cpus": 0, "num_gpus": 0}, (gpu,)

    def engine_resources(self, index: int) -> tuple[int, dict]:
        """(bundle index, Ray resources) of engine ``index``; colocated GPU engines take no GPU of
        their own (they share the trainer ranks' GPUs and sleep while the actor trains)."""
        if self.gpus_per_node and self.colocated:
            res = {"num_cpus": 0, "num_gpus": 0}
            bundle = self.engine_node(index) if self.nnodes > 1 else index * self.engine_tp
        elif self.gpus_per_node:
            res = {"num_cpus": 1, "num_gpus": self.engine_tp}
            bundle = self.engine_node(index) if self.nnodes > 1 else self.trainer_world + index
        else:
            res = {"num_cpus": 1}
            bundle = 0 if self.nnodes > 1 else self.trainer_world + index
        return bundle, res


class TrainerCluster:
    def __init__(self, placement: Placement, worker_spec: WorkerSpec, engine_spec: EngineSpec, sync_cfg: SyncConfig,
                 arch, *, reward_cfg=None, ray_address: Optional[str] = None, timeout_s: float = 3600.0):
        self.placement, self.worker_spec, self.engine_spec = placement, worker_spec, engine_spec
        self.sync_cfg, self.arch, self.ray_address, self.timeout_s = sync_cfg, arch, ray_address, timeout_s
        self.workers: list = []
        self.engines: list = []
        self.fleet: Optional[RolloutFleet] = None
        self.coordinator: Optional[PushCoordinator] = None
        self.reward_cfg, self.reward = reward_cfg, None
        self._started_ray = False
        self._pg = None
        self.ranks: list[dict] = []  # what each rank reported at set-up (node, TP/PP/DP rank, peak FLOP/s)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "TrainerCluster":
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=True)
            else:
                cpus = max(len(self.placement.bundles()) + 1, os.cpu_count() or 1)
                # "local": never join a `ray start` cluster that happens to run on this machine.
                ray.init(address="local", num_cpus=cpus, num_gpus=self.placement.gpus_per_node or None,
                         include_dashboard=False, log_to_driver=True)
            self._started_ray = True
        bundles = self.placement.bundles()
        self._pg = placement_group(bundles, strategy=self.placement.strategy)
        if not self._pg.wait(timeout_seconds=min(self.timeout_s, 600)):
            raise ClusterError(f"Ray could not place {len(bundles)} bundles {bundles[:2]}... "
                               f"({self.placement.strategy}): not enough resources or nodes "
                               f"({len(ray.nodes())} node(s), {ray.cluster_resources()})")

        def at(bundle: int, resources: dict) -> dict:
            return dict(scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
                        **resources)

        p = self.placement
        worker_cls = ray.remote(TrainerWorker)
        self.workers = [worker_cls.options(**at(*p.rank_resources(r))).remote(r, p.trainer_world, self.worker_spec)
                        for r in range(p.trainer_world)]
        engine_cls = ray.remote(EngineHost)
        self.engines = [engine_cls.options(**at(*p.engine_resources(i))).remote(i, self.engine_spec,
                                                                                p.engine_gpu_ids(i))
                        for i in range(p.engines)]
        urls = self._get([e.url.remote() for e in self.engines], "start the rollout engines")
        master = self._get(self.workers[0].rendezvous.remote(), "rendezvous")
        self.ranks = self._get([w.setup.remote(*master) for w in self.workers], "set up the trainer ranks")
        log.info("trainer ranks: %s", self.ranks)
        self.fleet = RolloutFleet([EngineClient(u, api_key=self.engine_spec.api_key) for u in urls])
        side = os.path.join(self.worker_spec.megatron_dir, "hf")
        self.coordinator = PushCoordinator(self.sync_cfg, self.arch, self.fleet, self.sync_cfg.build_transport(side))
        if self.reward_cfg is not None:  # reward-model workers are Ray actors too
            from megatron_spin.orchestrate.rewards import build_reward_pool

            placements = None  # CPU runs: one CPU per worker, anywhere
            if p.gpus_per_node and self.reward_cfg.type == "hf":  # pragma: no cover - GPU tier, unverified
                workers = self.reward_cfg.num_workers
                placements = [(at(bundle, res), gpu_ids)
                              for bundle, res, gpu_ids in (p.reward_resources(k, workers) for k in range(workers))]
            self.reward = build_reward_pool(self.reward_cfg, self.timeout_s, placements)
        return self

    def stop(self) -> None:
        import ray

        if self.workers:
            try:
                self._get([w.shutdown.remote() for w in self.workers], "shut the trainer ranks down", timeout=120)
            except ClusterError as exc:
                log.warning("%s", exc)
        for e in self.engines:
            try:
                ray.get(e.stop.remote(), timeout=60)
            except Exception as exc:  # an engine that already died
                log.warning("engine stop: %s", exc)
        if self.fleet is not None:
            self.fleet.close()
        if self.reward is not None:
            self.reward.close()
        for a in self.workers + self.engines:
            ray.kill(a)
        self.workers, self.engines = [], []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "TrainerCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- collective calls -------------------------------------------------------------------
    def _get(self, refs, what: str, timeout: Optional[float] = None) -> Any:
        import ray

        try:
            return ray.get(refs, timeout=timeout or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"{what}: no answer within {timeout or self.timeout_s:.0f} s "
                               "(a collective may be hung; see the worker logs)") from None
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"{what} failed: {exc}") from None

    def call(self, method: str, *args, what: Optional[str] = None) -> list:
        return self._get([getattr(w, method).remote(*args) for w in self.workers], what or method)

    def train(self, pairs: Sequence, iteration: int, step: int = 0) -> dict:
        """One update on every rank; the reporting rank's metrics plus throughput and MFU."""
        from megatron_spin.loss.types import REFERENCE_LOSS_TYPES
        from megatron_spin.metrics.perf import train_perf

        started = time.monotonic()
        results = self.call("train", list(pairs), iteration, step, what="actor update")
        seconds = time.monotonic() - started
        metrics = next(r for r in results if r is not None)
        spec, p = self.worker_spec, self.placement
        real = sum(2 * len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs)
        metrics.update(train_perf(self.arch, tokens=real, padded_tokens=int(metrics.pop("perf/train_tokens")),
                                  seq_len=int(metrics.pop("perf/seq_len")), seconds=seconds, devices=p.trainer_world,
                                  peak_flops=self.ranks[0].get("peak_flops") if self.ranks else None,
                                  recompute=spec.recompute, reference=spec.loss.loss_type in REFERENCE_LOSS_TYPES))
        metrics["perf/rollout_devices"] = float(p.engines * (p.engine_tp if p.gpus_per_node else 1))
        return metrics

    def push(self, version: int) -> SyncReport:
        plan = self.coordinator.prepare(version)
        results = self.call("send_weights", plan, what=f"weight push {version}")
        return self.coordinator.finish(plan, results)

    def refresh_reference(self) -> None:
        self.call("refresh_reference", what="reference refresh")

    def release_engines(self) -> None:
        """Colocated mode: engines give their memory back while the actor trains."""
        self.fleet.each(lambda c: c.release_memory())

    def resume_engines(self) -> None:
        self.fleet.each(lambda c: c.resume_memory())
