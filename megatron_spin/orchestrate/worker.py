"""One trainer rank as a Ray actor: the actor model shard, its reference, and its part of a push.

The driver creates ``world_size`` of these (placed by :mod:`.placement`), tells them where rank 0
listens, and from then on calls every rank with the same arguments:

    setup(master_addr, master_port)        # process group, Megatron parallel state, models
    train(pairs, iteration, step)          # reference log-probs + one actor update
    send_weights(plan)                     # this rank's part of a weight push
    refresh_reference()                    # reference <- actor, in memory
    save_checkpoint(dir) / load_checkpoint(dir)   # checkpoint shards (collective)

With the ``shared`` transport the rank also serves the rollout engine, on a thread, from the
actor's own parameters (:mod:`megatron_spin.rollout.embedded.in_process`); ``setup`` reports its
URL and a push re-binds what the engine reads.  All the rank's tensor work then runs on the
engine's thread, and its set-up on a thread that ends with it: one OpenMP pool per process
(:func:`megatron_spin.platform.on_a_passing_thread` says why).

Each call is collective across the ranks (Megatron's TP/PP communication), so the driver
always calls all ranks together and waits for all of them, with a timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_spin import platform
from megatron_spin.ckpt.metadata import HF_SUBDIR, read_arch
from megatron_spin.lifetime import forked_children_die_with_this_process
from megatron_spin.loss.config import LossConfig
from megatron_spin.metrics.logger import open_jsonl
from megatron_spin.orchestrate.ray_nodes import node_address
from megatron_spin.pairs import collate_pairs
from megatron_spin.parallel.groups import destroy_parallel, init_parallel
from megatron_spin.parallel.launch import free_port
from megatron_spin.platform.peak import peak_flops
from megatron_spin.sync.config import PushTarget, SyncConfig, TransportKind
from megatron_spin.sync.gather import iter_hf_weights
from megatron_spin.sync.push import PushPlan, StageResult, StageSender
from megatron_spin.sync.transports import SharedTransport
from megatron_spin.sync.verify import trainer_token_logprobs
from megatron_spin.train.actor import (
    Actor,  # megatron-core: imported in the rank, not the driver
)
from megatron_spin.train.batching import rank_micro_batches
from megatron_spin.train.checkpoint import load_train_state, save_train_state
from megatron_spin.train.config import ActorConfig, BatchConfig, RefConfig
from megatron_spin.train.reference import Reference


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Everything a trainer rank is built from: the run's own config records, plus the facts of
    this run that are not configuration (paths, the engines' key, threads, the resume step)."""

    megatron_dir: str
    actor: ActorConfig
    ref: RefConfig
    loss: LossConfig
    sync: SyncConfig
    target: PushTarget
    seed: int = 1234
    threads: int = 1  # torch CPU threads per rank (0: torch's default)
    timeout_s: float = 1800.0  # collectives
    metrics_dir: Optional[str] = None  # <run_dir>/ranks: one JSONL of timings per rank
    resume_step: Optional[int] = None  # resuming from this step's checkpoint (rank files keep steps <= it)


@dataclasses.dataclass(frozen=True)
class RankTrainResult:
    """What one rank reports for an update; ``stats`` only on the rank whose metrics are the run's."""
    stats: Optional[dict[str, float]]  # loss, reward accuracy/margins, log-probs, grad norm, LR, tokens
    ref_seconds: float
    train_seconds: float
    padded_tokens: int  # tokens the update computed for the whole global batch (padding included)
    seq_len: int  # the padded sequence length


def pad_token_id(hf_dir: str) -> int:
    """The id right-padding uses: the config's pad token, else its EOS, else 0.  Which id it is
    changes nothing (padding sits after every real token and is masked out of the loss)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    for key in ("pad_token_id", "eos_token_id"):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < cfg.get("vocab_size", value + 1):
            return value
    return 0


def node_name() -> str:
    """The Slurm node this process runs on (srun's tasks carry it; Ray workers inherit it from the
    raylet), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _ray_node_id() -> Optional[str]:
    if "ray" not in sys.modules:  # a rank inside the driver (trainer.use_ray=false)
        return None
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (tests)
        return None


class TrainerWorker:
    def __init__(self, rank: int, world_size: int, spec: RankSpec):
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.actor = self.ref = self.sender = self.pctx = self.engine = None
        self.pad_id = 0
        self._rank_log = None
        self._where: dict = {}
        self._trained_step: Optional[int] = None
        # Megatron's checkpoint writer forks helpers from this rank: a rank killed mid-save must
        # take them along, not leave them writing into a run that is over.
        forked_children_die_with_this_process()

    def gpus(self) -> tuple[Optional[str], list[str]]:
        """(Ray node id, the GPU ids Ray gave this rank): where its colocated engine rank must run."""
        import ray

        return _ray_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        host = node_address()
        return host, free_port(host)

    def _compute(self, fn):
        """``fn()`` where this rank's tensor work runs: on the engine's thread when the engine lives
        in the rank, else here."""
        return fn() if self.engine is None else self.engine.engine.run_on_engine_thread(fn)

    @property
    def _serves_engine(self) -> bool:
        return self.spec.sync.transport == TransportKind.SHARED

    def setup(self, master_addr: str, master_port: int) -> dict:
        if self._serves_engine:
            return platform.on_a_passing_thread(lambda: self._setup(master_addr, master_port))
        return self._setup(master_addr, master_port)

    def _setup(self, master_addr: str, master_port: int) -> dict:
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        plat = platform.current()
        plat.set_device(0)  # Ray gives each trainer rank its own GPU, seen as device 0
        dist.init_process_group(plat.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s))
        self.pctx = init_parallel(spec.actor.layout, seed=spec.seed)
        self.arch = read_arch(spec.megatron_dir)
        self.actor = Actor.build(self.arch, self.pctx, spec.actor.optim, spec.loss, precision=spec.actor.precision,
                                 init_from=spec.megatron_dir, recompute=spec.actor.recompute,
                                 moe_aux_loss_coeff=spec.actor.moe_aux_loss_coeff)
        if spec.loss.needs_reference:  # SimPO is reference-free
            self.ref = Reference.build(self.arch, self.pctx, precision=spec.actor.precision,
                                       init_from=spec.megatron_dir, offload=spec.ref.offload)
        side = os.path.join(spec.megatron_dir, HF_SUBDIR)
        shared = None
        if self._serves_engine:  # the engine serves this rank's actor in place
            from megatron_spin.rollout.embedded.in_process import InProcessEngine

            self.engine = InProcessEngine.start(side, iter_hf_weights(self.actor.modules, self.arch, self.pctx),
                                                api_key=spec.target.api_key)
            shared = SharedTransport(self.engine.engine)
        self.sender = StageSender(spec.sync, spec.target, self.arch, self.pctx, node_address(), transport=shared)
        self.pad_id = pad_token_id(side)
        self._where = {"rank": self.rank, "node": node_name(), "ray_node_id": _ray_node_id(), "tp": self.pctx.tp_rank,
                       "pp": self.pctx.pp_rank, "dp": self.pctx.dp_rank}
        if spec.metrics_dir:
            os.makedirs(spec.metrics_dir, exist_ok=True)
            self._rank_log = open_jsonl(Path(spec.metrics_dir) / f"rank_{self.rank:05d}.jsonl", spec.resume_step)
        info = {**self._where, "host": node_address(), "pid": os.getpid()}
        if self.engine is not None:
            info["engine_url"] = self.engine.url
        if self.rank == 0:
            info["peak_flops"], info["peak_source"] = peak_flops(spec.actor.precision.params_dtype,
                                                                 fp8=spec.actor.precision.fp8 is not None)
        return info

    def _log_rank(self, step: int, kind: str, record: dict) -> None:
        if self._rank_log is not None:
            self._rank_log.write(json.dumps({"step": step, "kind": kind, **self._where, "time": time.time(),
                                             **record}) + "\n")
            self._rank_log.flush()

    @property
    def reports(self) -> bool:
        """This rank's metrics are the run's (last stage, TP rank 0, DP replica 0)."""
        return self.pctx.is_last_stage and self.pctx.tp_rank == 0 and self.pctx.dp_rank == 0

    def train(self, pairs: Sequence, iteration: int, step: int = 0) -> RankTrainResult:
        """One update on ``pairs`` (the whole global batch; this rank takes its DP slice)."""
        return self._compute(lambda: self._train(pairs, iteration, step))

    def _train(self, pairs: Sequence, iteration: int, step: int) -> RankTrainResult:
        actor = self.spec.actor
        # Whole micro-batches on every DP rank (and a multiple of PP for the interleaved schedule):
        # padding pairs of weight 0, never a pair dropped.
        whole = actor.micro_pairs * self.pctx.dp_size * (actor.pp if (actor.vpp or 1) > 1 else 1)
        batch = collate_pairs(pairs, pad_id=self.pad_id,
                              pad_to_multiple_of=self.actor.sequence_multiple(actor.precision))
        batch = batch.padded_to(whole)
        mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, actor.micro_pairs), self.pctx.dp_rank,
                                 self.pctx.dp_size)
        t0 = time.monotonic()
        ref_logps = self.ref.logps(mbs) if self.ref is not None else None
        t1 = time.monotonic()
        stats = self.actor.train_step(mbs, ref_logps, iteration)
        t2 = time.monotonic()
        self._log_rank(step, "train", {"timing/ref_logps": t1 - t0, "timing/train": t2 - t1,
                                       "tokens": sum(mb.tokens.numel() for mb in mbs)})
        self._trained_step = step
        return RankTrainResult(stats if self.reports else None, t1 - t0, t2 - t1, batch.tokens.numel(),
                               batch.tokens.shape[1])

    def send_weights(self, plan: PushPlan) -> StageResult:
        return self._compute(lambda: self._send_weights(plan))

    def _send_weights(self, plan: PushPlan) -> StageResult:
        t0 = time.monotonic()
        result = self.sender.send(self.actor.modules, plan)
        if plan.version == str(self._trained_step):  # the push after an update (not a resume's re-push)
            self._log_rank(self._trained_step, "sync", {"timing/send": time.monotonic() - t0})
        return result

    def release_device_cache(self) -> None:
        """Give the device's cached free blocks back (colocated engines map their memory next)."""
        platform.current().release_ipc_memory()

    def probe_logprobs(self, sequences: Sequence[Sequence[int]]) -> Optional[list[torch.Tensor]]:
        """The actor's token log-probs of ``sequences`` (collective; returned by one rank)."""
        return self._compute(lambda: trainer_token_logprobs(self.actor.modules, self.pctx, sequences))

    def save_checkpoint(self, staged: str) -> None:
        """Collective: weights (layout-free), optimizer state (sharded), schedule, steps, RNG."""
        self._compute(lambda: save_train_state(self.actor, self.ref, staged))

    def load_checkpoint(self, path: str) -> None:
        self._compute(lambda: load_train_state(self.actor, self.ref, path))

    def refresh_reference(self) -> None:
        if self.ref is not None:
            self._compute(lambda: self.ref.refresh_from(self.actor.modules))

    def shutdown(self) -> None:
        try:
            if self.engine is not None:
                self.engine.stop()
        finally:
            if self.sender is not None:
                self.sender.close()
            if self._rank_log is not None:
                self._rank_log.close()
            destroy_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
