"""One trainer rank as a Ray actor: the actor model shard, its reference, and its part of a push.

The driver creates ``world_size`` of these (placed by :mod:`.cluster`), tells them where rank 0
listens, and from then on calls every rank with the same arguments:

    setup(master_addr, master_port)        # process group, Megatron parallel state, models
    train(pairs, iteration)                 # reference log-probs + one actor update
    send_weights(plan)                      # this rank's part of a weight push
    refresh_reference()                     # reference <- actor, in memory
    save(dir) / load(dir)                   # checkpoint shards (collective)

Each call is collective across the ranks (Megatron's TP/PP communication), so the driver
always calls all ranks together and waits for all of them, with a timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
from typing import Optional, Sequence

from megatron_spin.config.algorithm import LossConfig
from megatron_spin.config.optim import BatchConfig, OptimConfig
from megatron_spin.models.precision import Precision
from megatron_spin.parallel.launch import free_port
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.sync.push import PushPlan, SyncConfig


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    megatron_dir: str
    layout: ParallelLayout
    optim: OptimConfig
    loss: LossConfig
    sync: SyncConfig
    micro_pairs: int = 1
    precision: Precision = Precision()
    recompute: bool = False
    ref_offload: bool = False
    seed: int = 1234
    threads: int = 1  # torch CPU threads per rank
    timeout_s: float = 1800.0  # collectives
    metrics_dir: Optional[str] = None  # <run_dir>/ranks: one JSONL of timings per rank
    resume_step: Optional[int] = None  # resuming from this step's checkpoint (rank files keep steps <= it)


def node_name() -> str:
    """The Slurm node this process runs on (srun's tasks carry it; Ray workers inherit it from the
    raylet), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests): loopback
        return "127.0.0.1"


class TrainerWorker:
    def __init__(self, rank: int, world_size: int, spec: WorkerSpec):
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.actor = self.ref = self.sender = self.pctx = None
        self.pad_id = 0
        self._rank_log = None
        self._where: dict = {}
        self._trained_step: Optional[int] = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        host = node_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int) -> dict:
        import torch
        import torch.distributed as dist
        from transformers import AutoTokenizer

        from megatron_spin import platform
        from megatron_spin.ckpt.streaming import HF_SUBDIR, read_arch
        from megatron_spin.loss.types import REFERENCE_LOSS_TYPES
        from megatron_spin.parallel.groups import init_parallel
        from megatron_spin.sync.push import StageSender
        from megatron_spin.train.actor import Actor
        from megatron_spin.train.reference import Reference

        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        plat = platform.current()
        if plat.is_cuda:  # pragma: no cover - GPU tier: Ray sets CUDA_VISIBLE_DEVICES per actor
            torch.cuda.set_device(0)
        dist.init_process_group(plat.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s))
        self.pctx = init_parallel(spec.layout, seed=spec.seed)
        self.arch = read_arch(spec.megatron_dir)
        self.actor = Actor.build(self.arch, self.pctx, spec.optim, spec.loss, precision=spec.precision,
                                 init_from=spec.megatron_dir, recompute=spec.recompute)
        if spec.loss.loss_type in REFERENCE_LOSS_TYPES:  # SimPO is reference-free
            self.ref = Reference.build(self.arch, self.pctx, precision=spec.precision, init_from=spec.megatron_dir,
                                       offload=spec.ref_offload)
        side = os.path.join(spec.megatron_dir, HF_SUBDIR)
        self.sender = StageSender(spec.sync, self.arch, self.pctx, side_files=side)
        tok = AutoTokenizer.from_pretrained(side)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._where = {"rank": self.rank, "node": node_name(), "ray_node_id": _ray_node_id(), "tp": self.pctx.tp_rank,
                       "pp": self.pctx.pp_rank, "dp": self.pctx.dp_rank}
        if spec.metrics_dir:
            from pathlib import Path

            from megatron_spin.metrics.logger import open_jsonl

            os.makedirs(spec.metrics_dir, exist_ok=True)
            self._rank_log = open_jsonl(Path(spec.metrics_dir) / f"rank_{self.rank:05d}.jsonl", spec.resume_step)
        info = {**self._where, "host": node_address(), "pid": os.getpid()}
        if self.rank == 0:
            from megatron_spin.platform.peak import peak_flops

            info["peak_flops"], info["peak_source"] = peak_flops(spec.precision.params_dtype,
                                                                 fp8=spec.precision.fp8 is not None)
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

    def train(self, pairs: Sequence, iteration: int, step: int = 0) -> Optional[dict]:
        """One update on ``pairs`` (the whole global batch; this rank takes its DP slice)."""
        from megatron_spin.pairs import collate_pairs
        from megatron_spin.train.batching import rank_micro_batches

        batch = collate_pairs(pairs, pad_id=self.pad_id)
        mbs = rank_micro_batches(batch, BatchConfig(len(pairs), self.spec.micro_pairs), self.pctx.dp_rank,
                                 self.pctx.dp_size)
        t0 = time.monotonic()
        ref_logps = self.ref.logps(mbs) if self.ref is not None else None
        t1 = time.monotonic()
        metrics = self.actor.train_step(mbs, ref_logps, iteration)
        t2 = time.monotonic()
        timing = {"timing/ref_logps": t1 - t0, "timing/train": t2 - t1}
        self._log_rank(step, "train", {**timing, "tokens": sum(mb.tokens.numel() for mb in mbs)})
        self._trained_step = step
        if not self.reports:
            return None
        # The whole batch's computed (padded) tokens: the driver turns them into model FLOPs.
        return {**metrics, **timing, "perf/train_tokens": batch.tokens.numel(), "perf/seq_len": batch.tokens.shape[1]}

    def send_weights(self, plan: PushPlan):
        t0 = time.monotonic()
        receipt = self.sender.send(self.actor.modules, plan)
        if plan.version == str(self._trained_step):  # the push after an update (not a resume's re-push)
            self._log_rank(self._trained_step, "sync", {"timing/send": time.monotonic() - t0})
        return receipt

    def save_checkpoint(self, staged: str) -> None:
        """Collective: weights (layout-free) and this rank's optimizer/schedule/RNG state."""
        import torch
        import torch.distributed as dist

        from megatron_spin.ckpt.model_io import save_model_weights

        save_model_weights(self.actor.modules, os.path.join(staged, "actor"))
        if self.ref is not None:
            save_model_weights(self.ref.chunks, os.path.join(staged, "reference"))
        os.makedirs(os.path.join(staged, "optimizer"), exist_ok=True)
        torch.save({"optimizer": self.actor.optimizer.state_dict(), "scheduler": self.actor.scheduler.state_dict(),
                    "steps": self.actor.steps, "torch_rng": torch.get_rng_state(), "layout": str(self.spec.layout),
                    "world_size": self.world_size},
                   os.path.join(staged, "optimizer", f"rank_{self.rank:05d}.pt"))
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        import torch

        from megatron_spin.ckpt.model_io import load_model_weights

        state = torch.load(os.path.join(path, "optimizer", f"rank_{self.rank:05d}.pt"), weights_only=False)
        if state["layout"] != str(self.spec.layout) or state["world_size"] != self.world_size:
            raise RuntimeError(f"{path} was saved at {state['layout']} on {state['world_size']} ranks; this run is "
                               f"{self.spec.layout} on {self.world_size}: optimizer state resumes at the same layout")
        load_model_weights(self.actor.modules, os.path.join(path, "actor"))
        if self.ref is not None:
            load_model_weights(self.ref.chunks, os.path.join(path, "reference"))
        self.actor.optimizer.load_state_dict(state["optimizer"])
        self.actor.scheduler.load_state_dict(state["scheduler"])
        self.actor.steps = state["steps"]
        torch.set_rng_state(state["torch_rng"])

    def refresh_reference(self) -> None:
        if self.ref is not None:
            self.ref.refresh_from(self.actor.modules)

    def shutdown(self) -> None:
        import torch.distributed as dist

        from megatron_spin.parallel.groups import destroy_parallel

        if self.sender is not None:
            self.sender.close()
        if self._rank_log is not None:
            self._rank_log.close()
        destroy_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _ray_node_id() -> Optional[str]:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (tests)
        return None
