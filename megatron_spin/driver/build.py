"""Assemble a run from its validated config (nothing starts until the cluster does).

The model's place (an HF directory for the engines, a Megatron checkpoint for the trainer),
the start-up rules checked against its config (:mod:`.preflight`), the tokenizer, the prompts,
then the checkpoint converted on first use, the metric logger and the Ray cluster of trainer
ranks and engines.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional

from transformers import AutoTokenizer

from megatron_spin.config.run import RunConfig, to_dict
from megatron_spin.convert.prepare import PreparedModel, ensure_converted, locate_model, model_arch
from megatron_spin.data.prompts import EncodedPrompt, PromptLoader, load_prompts
from megatron_spin.driver.preflight import check_run, plan_placement
from megatron_spin.metrics.logger import MetricLogger
from megatron_spin.platform import on_a_passing_thread
from megatron_spin.orchestrate.cluster import TrainerCluster


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
    t = cfg.trainer
    model = locate_model(cfg.actor_rollout_ref.model.path, cfg.actor_rollout_ref.model.megatron_dir)
    arch = model_arch(model)
    placement = plan_placement(cfg)
    check_run(cfg, arch, placement)
    tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    train, val = load_prompts(cfg.data, tokenizer, need_truth=cfg.algorithm.spin)
    loader = PromptLoader(train, cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    # Once every rule and the data passed: a first conversion takes minutes.  On a thread that ends:
    # a one-rank run computes in this process next, and a second OpenMP pool would slow it.
    on_a_passing_thread(lambda: ensure_converted(model))
    if resume_step is None:  # a fresh run: no rank files of an earlier attempt (or layout) linger
        shutil.rmtree(run_dir / "ranks", ignore_errors=True)
    cluster = TrainerCluster(cfg, arch, placement, model, run_dir, resume_step)
    logger = MetricLogger(run_dir, t.logger, project=t.project_name, experiment=t.experiment_name, config=to_dict(cfg),
                          resume_step=resume_step)
    return RunParts(model, tokenizer, loader, val, logger, cluster)
