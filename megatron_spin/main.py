"""megatron-spin-train: online DPO / SPIN with a Megatron actor and a rollout fleet, placed by Ray.

    megatron-spin-train [key=value ...]            # or: python -m megatron_spin.main
    megatron-spin-train actor_rollout_ref.actor.tp=2 trainer.total_training_steps=2

Each step: prompts → the fleet samples n responses each → the reward scores them → pairs
(best vs worst, or SPIN: ground truth vs sample) → reference log-probs and one actor update
on the Megatron ranks → the new weights are pushed to the fleet → (every ref_update_freq
steps) the reference becomes the actor.  Held-out prompts are answered greedily and scored
before the first step, every ``test_freq`` steps and after the last.  The config (Hydra,
``megatron_spin/config/conf/spin_trainer.yaml``) is validated before anything starts and
saved in the run directory with every metric (``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import time

from tqdm import tqdm
from pathlib import Path

from megatron_spin.ckpt import run_state
from megatron_spin.config.run import RunConfig, load_run_config, to_dict
from megatron_spin.metrics.report import write_run_report
from megatron_spin.rollout.protocol import SamplingParams
from megatron_spin.rollout.scoring import score_completions
from megatron_spin.rollout.staleness import check_versions
from megatron_spin.train.online import Evaluator, StopRequest, make_pairs, resume, save_checkpoint, step_metrics


def run(cfg: RunConfig) -> dict:
    from megatron_spin.orchestrate.setup import build_run  # heavy imports stay out of --help

    stop = StopRequest.install()  # SIGUSR1: checkpoint after the step under way and stop (Slurm time limit)
    t, rollout = cfg.trainer, cfg.rollout
    run_dir = Path(t.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    parts = build_run(cfg, run_dir)  # models, data, reward, logger, cluster (not started)
    sampling = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=rollout.temperature,
                              top_p=rollout.top_p, top_k=rollout.top_k, n=rollout.n)
    evaluate = Evaluator(parts, cfg.data.max_response_length)
    version, iteration, first = 0, 0, 1
    resume_from = run_state.resolve_resume(t.resume, run_dir)
    stopped = False

    with parts.cluster as cluster:
        parts.reward = cluster.reward
        if resume_from is not None:
            state = resume(cluster, parts.loader, resume_from)
            version, iteration, first = state["weight_version"], state["spin_iteration"], state["step"] + 1
            evaluate.results = {int(k): v for k, v in state["evals"].items()}
            print(f"[resume] from {resume_from} at step {state['step']}", flush=True)
        else:
            cluster.fleet.each(lambda c: c.update_weight_version(str(version)))  # engines hold these weights
            evaluate(0)
        progress = tqdm(total=t.total_training_steps, initial=first - 1, desc="online DPO", unit="step", disable=None)
        for step in range(first, t.total_training_steps + 1):
            timing, started = {}, time.monotonic()
            prompts = parts.loader.next_batch()
            # A seed per step: samples depend only on (seed, step, prompt, weights), so a resumed
            # run draws exactly what the uninterrupted one would have.
            step_sampling = dataclasses.replace(sampling, seed=t.seed * 1_000_003 + step)
            groups = cluster.fleet.generate([p.input_ids for p in prompts], step_sampling, return_logprob=False)
            check_versions([c for g in groups for c in g], version, rollout.max_off_policy_steps)
            timing["generate"] = time.monotonic() - started
            scored = score_completions(prompts, groups, parts.tokenizer, parts.reward)
            pairs, stats, cut = make_pairs(cfg.algorithm, prompts, scored, parts.pairs_multiple)
            timing["reward"] = time.monotonic() - started - timing["generate"]
            update = {}
            if pairs:
                t0 = time.monotonic()
                if rollout.placement == "colocated":
                    cluster.release_engines()  # the engines give their memory back while the actor trains
                update = cluster.train(pairs, iteration, step)
                if rollout.placement == "colocated":
                    cluster.resume_engines()  # empty until the push fills them
                timing["train_total"], t0 = time.monotonic() - t0, time.monotonic()
                update.update(cluster.push(step).as_metrics())
                version, timing["sync"] = step, time.monotonic() - t0
            if t.ref_update_freq and step % t.ref_update_freq == 0:
                cluster.refresh_reference()
                iteration += 1  # a SPIN iteration ends: the reference is the new policy
            timing["step"] = time.monotonic() - started
            metrics = step_metrics(scored, stats, update, timing, cut=cut, iteration=iteration, version=version)
            parts.logger.log(step, metrics)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{update.get('loss', float('nan')):.4f}")
            progress.update(1)
            if t.test_freq and step % t.test_freq == 0 and step != t.total_training_steps:
                evaluate(step)
            stopping = stop.requested is not None and step < t.total_training_steps  # read once per step
            if (t.save_freq and step % t.save_freq == 0) or step == t.total_training_steps or stopping:
                seconds = save_checkpoint(cluster, run_dir, step, {
                    "weight_version": version, "spin_iteration": iteration, "data": parts.loader.state_dict(),
                    "evals": evaluate.results})
                parts.logger.log(step, {"timing/checkpoint": seconds}, kind="checkpoint")
            if stopping:
                print(f"[stop] {stop.requested}: checkpoint at step {step} saved in {run_dir}; the same command "
                      "(same run directory) resumes", flush=True)
                last, stopped = step, True
                break
        else:
            last = t.total_training_steps
        progress.close()
        if not stopped and (first <= t.total_training_steps or not evaluate.results):
            evaluate(t.total_training_steps)
    parts.logger.close()
    return finish(run_dir, evaluate.results, last)


def finish(run_dir: Path, evals: dict, steps: int) -> dict:
    report = write_run_report(run_dir)
    if len(evals) >= 2:
        before, after = evals[min(evals)], evals[max(evals)]
        print(f"held-out reward {before:.4f} -> {after:.4f} ({after - before:+.4f}); report: {report}", flush=True)
    summary = {"run_dir": str(run_dir), "eval_reward": evals, "steps": steps}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    StopRequest.install()  # before Hydra and the heavy imports: a SIGUSR1 this early must not kill us
    import hydra

    @hydra.main(config_path="config/conf", config_name="spin_trainer", version_base=None)
    def _entry(hcfg) -> None:
        from megatron_spin.config.optim import ConfigError

        try:
            run(load_run_config(hcfg))
        except ConfigError as exc:  # start-up rules, including those that need the model's config
            raise SystemExit(f"config error: {exc}") from None

    _entry()


if __name__ == "__main__":
    main()
