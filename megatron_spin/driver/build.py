"""Assemble a run from its validated config (nothing starts until the cluster does).

The model (an HF directory for the engines, a Megatron checkpoint for the trainer), the
layout checked against it, the tokenizer, the prompts, the metric logger and the Ray cluster
of trainer ranks and engines.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional

from transformers import AutoTokenizer

from megatron_spin.ckpt.metadata import read_arch
from megatron_spin.config.run import RunConfig, to_dict
from megatron_spin.convert.prepare import PreparedModel, prepare_model
from megatron_spin.data.prompts import EncodedPrompt, PromptLoader, load_prompts
from megatron_spin.errors import ConfigError
from megatron_spin.metrics.logger import MetricLogger
from megatron_spin.orchestrate.cluster import TrainerCluster
from megatron_spin.orchestrate.placement import Placement
from megatron_spin.parallel.layout import LayoutError, validate_layout


@dataclasses.dataclass
class RunParts:
    model: PreparedModel
    tokenizer: Any
    loader: PromptLoader
    val: list[EncodedPrompt]
    logger: MetricLogger
    cluster: TrainerCluster


def build_run(cfg: RunConfig, run_dir: Path, resume_step: Optional[int]) -> RunParts:
    """``resume_step``: the step of the checkpoint this run resumes from (None: a fresh run)."""
    a, t = cfg.actor, cfg.trainer
    model = prepare_model(cfg.actor_rollout_ref.model.path, cfg.actor_rollout_ref.model.megatron_dir)
    arch = read_arch(model.megatron_dir)
    placement = Placement.plan(tp=a.tp, pp=a.pp, nnodes=t.nnodes, gpus_per_node=t.n_gpus_per_node,
                               num_engines=cfg.rollout.num_engines, engine_tp=cfg.rollout.tp_size,
                               colocated=cfg.rollout.colocated, cpu_ranks=t.cpu_ranks)
    try:
        validate_layout(arch, a.layout, world_size=placement.trainer_world)
    except LayoutError as exc:  # a start-up rule of the config, named as such
        raise ConfigError("actor_rollout_ref.actor", f"tp={a.tp}, pp={a.pp}, vpp={a.vpp} for "
                                                     f"{cfg.actor_rollout_ref.model.path}: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    train, val = load_prompts(cfg.data, tokenizer, need_truth=cfg.algorithm.spin)
    loader = PromptLoader(train, cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    if resume_step is None:  # a fresh run: no rank files of an earlier attempt (or layout) linger
        shutil.rmtree(run_dir / "ranks", ignore_errors=True)
    cluster = TrainerCluster(cfg, arch, placement, model, run_dir, resume_step)
    logger = MetricLogger(run_dir, t.logger, project=t.project_name, experiment=t.experiment_name, config=to_dict(cfg),
                          resume_step=resume_step)
    return RunParts(model, tokenizer, loader, val, logger, cluster)
