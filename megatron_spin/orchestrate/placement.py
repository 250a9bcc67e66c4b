"""Where every trainer rank and rollout engine runs: the Ray bundles and the GPUs they pin.

One actor per trainer rank (TP x PP x DP) and one per rollout engine, in one placement group.
On the CPU every actor takes one logical CPU.  On GPUs each trainer rank takes one GPU;
*disaggregated* engines take ``rollout.tp_size`` GPUs of their own, *colocated* engines share
the trainer ranks' GPUs (they release their memory while the actor trains).
"""

from __future__ import annotations

import dataclasses

from megatron_spin.errors import ConfigError


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
    engines_in_ranks: bool = False  # transport "shared": the engine runs inside the trainer rank (no actor of its own)

    @classmethod
    def plan(cls, *, tp: int, pp: int, nnodes: int, gpus_per_node: int, num_engines: int, engine_tp: int,
             colocated: bool, cpu_ranks: int = 0, engines_in_ranks: bool = False) -> "Placement":
        """``cpu_ranks``: trainer ranks of a CPU run (0: one model replica, TP*PP ranks);
        ``engines_in_ranks``: each engine lives in a trainer rank's process (CPU runs only)."""
        mp = tp * pp
        if gpus_per_node == 0:  # CPU: trainer ranks spread evenly over the nodes; engines beside them
            world = cpu_ranks or mp
            if world % mp:
                raise ConfigError("trainer.cpu_ranks", f"rule cpu_ranks % (TP*PP) == 0 violated: {world} ranks, "
                                                       f"TP*PP={mp}")
            if world % nnodes:
                raise ConfigError("trainer.nnodes", f"rule trainer ranks % nnodes == 0 violated on CPU nodes: "
                                                    f"{world} ranks, nnodes={nnodes} (each node hosts as many)")
            return cls(world, num_engines, 1, 0, colocated, nnodes, engines_in_ranks)
        total = nnodes * gpus_per_node
        if gpus_per_node % tp:
            raise ConfigError("actor_rollout_ref.actor.tp", f"rule n_gpus_per_node % TP == 0 violated: "
                              f"{gpus_per_node} GPUs per node, TP={tp} (a TP group never spans nodes)")
        if engine_tp > gpus_per_node or gpus_per_node % engine_tp:
            raise ConfigError("actor_rollout_ref.rollout.tp_size", f"rule n_gpus_per_node % rollout.tp_size == 0 "
                              f"violated: {gpus_per_node} GPUs per node, tp_size={engine_tp} (an engine never spans nodes)")
        if colocated:
            world, engines = total, total // engine_tp
        else:
            world, engines = total - num_engines * engine_tp, num_engines
            if world < 1:
                raise ConfigError("actor_rollout_ref.rollout.num_engines", f"{num_engines} engines x tp_size="
                                  f"{engine_tp} leave no GPU for training out of {total}")
        if world % mp:
            raise ConfigError("actor_rollout_ref.actor", f"rule trainer GPUs % (TP*PP) == 0 violated: {world} GPUs "
                                                         f"for training, TP*PP={mp}")
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
            return [{"CPU": 1}] * (self.trainer_world + (0 if self.engines_in_ranks else self.engines))
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

    def reward_resources(self, worker: int, workers: int) -> tuple[int, dict, tuple[int, ...]]:
        """GPU runs: (bundle, Ray resources, pinned GPU id) of reward-model worker ``worker`` of
        ``workers``.  Every GPU belongs to the trainer (and colocated engines), so reward workers
        share trainer GPUs, spread evenly and pinned by id like colocated engines."""
        if workers > self.trainer_world:
            raise ConfigError("reward_model.num_workers", f"{workers} workers is more than the {self.trainer_world} "
                              "trainer GPUs the reward workers share")
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
