"""Build everything a run needs from its validated config (nothing starts until the cluster does).

Models (HF for the engines, Megatron for the trainer), tokenizer, prompt data (with the length
filter's counts printed), the reward source, the metric logger, and the Ray cluster of trainer
ranks and engines with the placement the config asks for.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from megatron_spin.ckpt import run_state
from megatron_spin.config.optim import ConfigError
from megatron_spin.config.run import RunConfig, to_dict
from megatron_spin.data.prompts import EncodedPrompt, PromptKeys, PromptLoader, encode_prompts, read_prompt_file


@dataclasses.dataclass
class RunParts:
    hf_dir: Path
    megatron_dir: Path
    tokenizer: Any
    loader: PromptLoader
    val: list[EncodedPrompt]
    reward: Any  # set once the cluster has started (reward-model workers are Ray actors)
    logger: Any
    cluster: Any
    pairs_multiple: int  # pairs per update must be a multiple of this (DP x micro-batch)


def _prompts(cfg: RunConfig, tokenizer) -> tuple[list[EncodedPrompt], list[EncodedPrompt]]:
    d = cfg.data
    keys = PromptKeys(d.prompt_key, d.response_key, d.answer_key)
    train_files, val_files = list(d.train_files), list(d.val_files)
    if not train_files:
        from megatron_spin.data.movie_reviews import materialize_movie_reviews

        root = materialize_movie_reviews()
        train_files, val_files = [root / "train.jsonl"], val_files or [root / "val.jsonl"]
    need_truth = cfg.algorithm.spin
    out = []
    for what, files in (("train", train_files), ("val", val_files)):
        records = [r for f in files for r in read_prompt_file(f, keys)]
        if need_truth and what == "train":
            missing = [r.where for r in records if r.response is None]
            if missing:
                raise ValueError(f"algorithm.spin=true needs a ground-truth '{d.response_key}' in every record; "
                                 f"{len(missing)} lack one, e.g. {missing[0]}")
        kept, report = encode_prompts(records, tokenizer, d.max_prompt_length,
                                      d.max_response_length if what == "train" else None)
        print(f"[data] {what}: {report}", flush=True)
        out.append(kept)
    train, val = out
    if d.val_size and len(val) > d.val_size:
        val = val[: d.val_size]
    return train, val


def build_run(cfg: RunConfig, run_dir: Path) -> RunParts:
    from transformers import AutoTokenizer

    from megatron_spin.ckpt.streaming import read_arch
    from megatron_spin.metrics.logger import MetricLogger
    from megatron_spin.models.prepare import prepare_model
    from megatron_spin.orchestrate.cluster import Placement, TrainerCluster
    from megatron_spin.orchestrate.engines import EngineSpec, engine_log_dir
    from megatron_spin.orchestrate.worker import WorkerSpec
    from megatron_spin.parallel.layout import LayoutError, ParallelLayout, validate_layout
    from megatron_spin.sync.push import SyncConfig
    import secrets

    a, r, t = cfg.actor, cfg.rollout, cfg.trainer
    hf_dir, megatron_dir = prepare_model(cfg.actor_rollout_ref.model.path, cfg.actor_rollout_ref.model.megatron_dir)
    arch = read_arch(megatron_dir)
    layout = ParallelLayout(tp=a.tp, pp=a.pp, vpp=a.vpp)
    placement = Placement.plan(tp=a.tp, pp=a.pp, nnodes=t.nnodes, gpus_per_node=t.n_gpus_per_node,
                               num_engines=r.num_engines, engine_tp=r.tp_size, colocated=r.placement == "colocated")
    try:
        validate_layout(arch, layout, world_size=placement.trainer_world)
    except LayoutError as exc:  # a start-up rule of the config, named as such
        raise ConfigError(f"actor_rollout_ref.actor (tp={a.tp}, pp={a.pp}, vpp={a.vpp}) for "
                          f"{cfg.actor_rollout_ref.model.path}: {exc}") from None
    dp = placement.trainer_world // layout.model_parallel_size
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train, val = _prompts(cfg, tokenizer)
    loader = PromptLoader(train, cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    api_key = secrets.token_urlsafe(24)  # engines accept weights only from this run
    sync = SyncConfig(transport=r.sync.transport, bucket_bytes=int(r.sync.bucket_mb * 1e6), dtype=r.sync.dtype,
                      engine_tp_size=r.tp_size, disk_dir=str(run_dir / "sync") if r.sync.transport == "disk" else None,
                      api_key=api_key)
    cpu_ranks = placement.trainer_world + placement.engines
    threads = max(1, (os.cpu_count() or 1) // cpu_ranks) if not t.n_gpus_per_node else 0
    resume_from = run_state.resolve_resume(t.resume, run_dir)
    resume_step = None if resume_from is None else run_state.read_state(resume_from)["step"]
    if resume_step is None:  # a fresh run: no rank files of an earlier attempt (or layout) linger
        shutil.rmtree(run_dir / "ranks", ignore_errors=True)
    spec = WorkerSpec(str(megatron_dir), layout, a.optim, cfg.algorithm.loss(), sync, micro_pairs=a.micro_pairs,
                      precision=a.model_precision(), recompute=a.recompute,
                      ref_offload=cfg.actor_rollout_ref.ref.offload, seed=t.seed, threads=threads,
                      timeout_s=t.timeout_s, metrics_dir=str(run_dir / "ranks"), resume_step=resume_step)
    engine = EngineSpec(str(hf_dir), kind=r.engine, host="127.0.0.1" if t.nnodes == 1 else "0.0.0.0",
                        api_key=api_key, log_dir=engine_log_dir(str(run_dir)), threads=r.threads or threads,
                        tp_size=r.tp_size, mem_fraction_static=r.mem_fraction_static,
                        enable_memory_saver=r.placement == "colocated" and r.engine == "sglang",
                        quantization=r.quantization)
    cluster = TrainerCluster(placement, spec, engine, sync, arch, reward_cfg=cfg.reward_model, ray_address=t.ray_address,
                             timeout_s=t.timeout_s)
    logger = MetricLogger(run_dir, t.logger, project=t.project_name, experiment=t.experiment_name, config=to_dict(cfg),
                          resume_step=resume_step)
    return RunParts(hf_dir, megatron_dir, tokenizer, loader, val, None, logger, cluster,
                    pairs_multiple=dp * a.micro_pairs)
