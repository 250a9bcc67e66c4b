"""Device locality of a tensor push: which trainer rank feeds which engine rank.

An engine maps a tensor update from the memory of the process that sent it: on GPUs a CUDA
IPC handle, which the engine opens only on a GPU it can see (SGLang looks the sender's
device UUID up among its own GPUs; an unknown one kills the server).  A colocated engine's TP
rank ``k`` runs on one GPU, and one trainer rank runs on that same GPU — so that trainer rank
materialises every full HF tensor on its GPU and hands the engine rank a handle to it, the way
colocated systems do it (verl, slime, SGLang's own ``weight_sync``).  The trainer ranks of one
engine gather their handles to the first of them, which sends the engine one payload per TP
rank.

:class:`FeedRoute` is that map, built from the placement: ``feeders[e][k]`` is the trainer
rank on the device of engine ``e``'s TP rank ``k``: on GPUs ``e * tp + k`` (ranks fill nodes in
rank order), and each engine is started on the GPUs Ray gave its feeders
(:meth:`FeedRoute.engine_gpus`), whichever they are.  CPU runs have no devices;
there every trainer rank and engine rank is given a *simulated* device id (``cpu:<rank>``) and
the embedded engine refuses a payload from a device it does not hold, like SGLang, so the
same routing is exercised here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class FeedRoute:
    feeders: tuple[tuple[int, ...], ...]  # [engine][engine TP rank] -> trainer rank sharing its device
    rank_devices: tuple[str, ...]  # device id of every trainer rank ("cpu:r" simulated; "node:n/gpu:g")

    def __post_init__(self) -> None:
        world = len(self.rank_devices)
        for e, ranks in enumerate(self.feeders):
            bad = [r for r in ranks if not 0 <= r < world]
            if bad or not ranks:
                raise ValueError(f"engine {e}: feeder ranks {ranks} outside the {world} trainer ranks")

    @classmethod
    def for_placement(cls, *, trainer_world: int, engines: int, engine_tp: int, gpus_per_node: int) -> "FeedRoute":
        """GPUs (colocated engines): engine ``e``'s TP rank ``k`` shares its GPU with trainer rank
        ``e * tp + k``.  CPU: engine ``e``'s rank ``k`` is fed by trainer rank ``(e * tp + k) mod
        world``, every trainer rank a simulated device of its own."""
        if gpus_per_node:
            if engines * engine_tp != trainer_world:
                raise ValueError(f"colocated engines ({engines} x TP {engine_tp}) must cover the {trainer_world} "
                                 "trainer GPUs exactly")
            devices = tuple(f"node:{r // gpus_per_node}/gpu:{r % gpus_per_node}" for r in range(trainer_world))
            return cls(tuple(tuple(e * engine_tp + k for k in range(engine_tp)) for e in range(engines)), devices)
        devices = tuple(f"cpu:{r}" for r in range(trainer_world))
        return cls(tuple(tuple((e * engine_tp + k) % trainer_world for k in range(engine_tp))
                         for e in range(engines)), devices)

    def engine_gpus(self, rank_gpus: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, ...]]:
        """The GPUs each colocated engine must run on, as ``CUDA_VISIBLE_DEVICES`` values: those
        Ray gave the trainer ranks that feed it.  ``rank_gpus[r]`` is rank ``r``'s (node id,
        ``ray.get_gpu_ids()``).  Ray does not promise a node's ``b``-th bundle its GPU ``b``, so
        the engines follow the ranks, never an arithmetic guess (a rank feeding an engine rank on
        another GPU sends a CUDA handle that engine cannot open)."""
        if len(rank_gpus) != len(self.rank_devices):
            raise ValueError(f"{len(rank_gpus)} ranks reported GPUs; the route has {len(self.rank_devices)}")
        out = []
        for e, feeders in enumerate(self.feeders):
            nodes = {rank_gpus[r][0] for r in feeders}
            if len(nodes) != 1:
                raise ValueError(f"engine {e}: its feeder ranks {feeders} run on different nodes {sorted(nodes)}")
            gpus = []
            for r in feeders:
                ids = tuple(str(g) for g in rank_gpus[r][1])
                if len(ids) != 1:
                    raise ValueError(f"trainer rank {r} holds GPUs {list(ids)}; a feeder needs exactly one")
                gpus.append(ids[0])
            if len(set(gpus)) != len(gpus):
                raise ValueError(f"engine {e}: its feeder ranks {feeders} share GPUs {gpus}")
            out.append(tuple(gpus))
        return out

    def engine_devices(self, engine: int) -> tuple[str, ...]:
        """The devices engine ``engine``'s TP ranks hold (what it may be fed from)."""
        return tuple(self.rank_devices[r] for r in self.feeders[engine])

    def feeds(self, rank: int) -> list[tuple[int, int]]:
        """(engine, engine TP rank) pairs ``rank`` feeds, in engine order."""
        return [(e, k) for e, ranks in enumerate(self.feeders) for k, r in enumerate(ranks) if r == rank]

    def leader(self, engine: int) -> int:
        """The feeder that sends engine ``engine`` its payloads (the one of its TP rank 0)."""
        return self.feeders[engine][0]

    @property
    def feeder_ranks(self) -> frozenset[int]:
        return frozenset(r for ranks in self.feeders for r in ranks)

    def device_of(self, rank: int) -> str:
        return self.rank_devices[rank]
