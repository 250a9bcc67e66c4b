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
rank on the device of engine ``e``'s TP rank ``k``.  On GPUs ranks fill GPUs in rank order and
colocated engines take consecutive GPUs, so it is ``e * tp + k``.  CPU runs have no devices;
there every trainer rank and engine rank is given a *simulated* device id (``cpu:<rank>``) and
the embedded engine refuses a payload from a device it does not hold, like SGLang, so the
same routing is exercised here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


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

    def device_of(self, rank: int) -> Optional[str]:
        return self.rank_devices[rank]
