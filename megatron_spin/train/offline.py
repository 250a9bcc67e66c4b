"""Offline preference training: the online step, fed from a preference file instead of rollouts.

    history = train_offline(OfflineConfig(megatron_dir=M, train_file=F, eval_file=E, ...), world_size=2)

Per step: the next ``global_pairs`` pairs of a deterministic per-epoch shuffle → collate →
this rank's micro-batches → reference log-probs → one actor update.  Held-out pairs (if
given) are evaluated before training and after every epoch.  Cheap to test, and a real
feature for users who already have pairs.  The reference can be refreshed from the actor
every ``ref_update_freq`` steps (0: never), as in iterative DPO / SPIN.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Optional

from megatron_spin.ckpt.metadata import HF_SUBDIR, read_arch
from megatron_spin.ckpt.model_io import publish_model_checkpoint
from megatron_spin.data.preference_file import read_preference_jsonl, tokenize_preferences
from megatron_spin.errors import ConfigError
from megatron_spin.loss.config import LossConfig
from megatron_spin.loss.types import REFERENCE_LOSS_TYPES
from megatron_spin.pairs import collate_pairs
from megatron_spin.parallel.groups import init_parallel
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout, validate_layout
from megatron_spin.spec.precision import Precision
from megatron_spin.train.actor import Actor
from megatron_spin.train.batching import rank_micro_batches
from megatron_spin.train.config import BatchConfig, OptimConfig
from megatron_spin.train.evaluate import preference_metrics
from megatron_spin.train.reference import Reference


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    megatron_dir: str  # converted checkpoint; its hf/ folder holds the tokenizer
    train_file: str
    eval_file: Optional[str] = None
    layout: ParallelLayout = ParallelLayout()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    epochs: int = 1
    max_length: Optional[int] = None
    ref_update_freq: int = 0  # refresh the reference every N steps; each refresh starts a SPIN iteration
    seed: int = 1234
    save_dir: Optional[str] = None  # where the trained actor is published (atomically) at the end


def _pairs(path, tokenizer, max_length):
    """(pairs, skipped too long, dropped because chosen == rejected)."""
    records, identical = read_preference_jsonl(path)
    return (*tokenize_preferences(records, tokenizer, max_length=max_length), identical)


def _offline_rank(rank, world_size, cfg: OfflineConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.megatron_dir) / HF_SUBDIR)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, skipped, identical = _pairs(cfg.train_file, tokenizer, cfg.max_length)
    steps_per_epoch = len(train) // cfg.batch.global_pairs
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.train_file}: {len(train)} usable pairs < batch.global_pairs={cfg.batch.global_pairs}")
    arch = read_arch(cfg.megatron_dir)
    pctx = init_parallel(cfg.layout, seed=cfg.seed)
    actor = Actor.build(arch, pctx, cfg.optim, cfg.loss, init_from=cfg.megatron_dir)
    multiple = actor.sequence_multiple(Precision())  # sequence parallelism (MoE at TP > 1) splits S over TP
    # SimPO is reference-free: no second model, no reference pass.
    ref = None
    if cfg.loss.loss_type in REFERENCE_LOSS_TYPES:
        ref = Reference.build(arch, pctx, init_from=cfg.megatron_dir)

    def ref_logps(mbs):
        return ref.logps(mbs) if ref is not None else None

    held = None
    if cfg.eval_file:
        eval_pairs, *_ = _pairs(cfg.eval_file, tokenizer, cfg.max_length)
        held = collate_pairs(eval_pairs, pad_id=pad, pad_to_multiple_of=multiple).split_micro_batches(1)
        held_ref = ref_logps(held)

    iteration = 0  # SPIN iteration = number of reference refreshes so far (selects β)

    def evaluate(step):
        metrics = preference_metrics(actor.logps(held), held_ref, held, cfg.loss, iteration)
        return {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}

    history = [evaluate(0)] if held else []
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)  # same on every rank: seeded by epoch
        for b in range(steps_per_epoch):
            chosen = [train[i] for i in order[b * cfg.batch.global_pairs:(b + 1) * cfg.batch.global_pairs]]
            batch = collate_pairs(chosen, pad_id=pad, pad_to_multiple_of=multiple)
            mbs = rank_micro_batches(batch, cfg.batch, pctx.dp_rank, pctx.dp_size)
            metrics = actor.train_step(mbs, ref_logps(mbs), iteration)
            step += 1
            history.append({"step": step, "epoch": epoch, "spin_iteration": iteration,
                            "pairs/dataset": len(train), "pairs/skipped_too_long": skipped,
                            "pairs/dropped_identical": identical, **metrics})
            if ref is not None and cfg.ref_update_freq and step % cfg.ref_update_freq == 0:
                ref.refresh_from(actor.modules)
                iteration += 1
                held_ref = ref_logps(held) if held else None
        if held:
            history.append(evaluate(step))
    if cfg.save_dir:
        publish_model_checkpoint(actor.modules, cfg.save_dir, source_dir=cfg.megatron_dir)
    reporter = pctx.is_last_stage and pctx.tp_rank == 0 and pctx.dp_rank == 0
    return history if reporter else None


def train_offline(cfg: OfflineConfig, timeout: float = 3600) -> list[dict]:
    """Run offline training on ``cfg.layout.model_parallel_size`` local ranks; returns metric records."""
    world = cfg.layout.model_parallel_size
    for path in filter(None, (cfg.train_file, cfg.eval_file)):  # data errors here, one line, not in a rank
        read_preference_jsonl(path)
    validate_layout(read_arch(cfg.megatron_dir), cfg.layout, world_size=world)
    micro = cfg.batch.micro_batches_per_rank(1)
    if (cfg.layout.vpp or 1) > 1 and micro % cfg.layout.pp:
        raise ConfigError("batch", f"rule micro-batches per step % PP == 0 with virtual PP violated: {micro} "
                                   f"micro-batches, PP={cfg.layout.pp}")
    (history,) = [h for h in launch(_offline_rank, world, (cfg,), timeout=timeout) if h is not None]
    return history
