"""megatron-spin-train: online DPO / SPIN with a Megatron actor and a rollout fleet, placed by Ray
(a run of one CPU rank runs it inside this process instead: `RunConfig.uses_ray`).

    megatron-spin-train [key=value ...]            # or: python -m megatron_spin.main
    megatron-spin-train actor_rollout_ref.actor.tp=3 trainer.total_training_steps=2

Each step: prompts → the fleet samples n responses each → the reward scores them → pairs
(best vs worst, or SPIN: ground truth vs sample) → reference log-probs and one actor update
on the Megatron ranks → the new weights are pushed to the fleet → (every ref_update_freq
steps) the reference becomes the actor.  Held-out prompts are answered greedily and scored
before the first step, every ``test_freq`` steps and after the last.  The config (Hydra,
``megatron_spin/config/conf/spin_trainer.yaml``) is validated before anything starts and
saved in the run directory with every metric (``metrics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from megatron_spin.ckpt import run_state
from megatron_spin.config.run import RunConfig, load_run_config, to_dict
from megatron_spin.data.validate import DataFileError
from megatron_spin.driver.stop import StopRequest
from megatron_spin.errors import ClusterError, ConfigError
from megatron_spin.rollout.protocol import SamplingParams


def run(cfg: RunConfig) -> dict:
    # The driver's modules import transformers, Ray and torch: kept out of `--help`.
    from megatron_spin.driver.build import build_run
    from megatron_spin.driver.checkpoint import resume, save_checkpoint
    from megatron_spin.driver.evaluate import Evaluator
    from megatron_spin.driver.score import score_completions
    from megatron_spin.driver.state import RunState
    from megatron_spin.driver.step import StepTimer, generate, make_pairs, step_metrics

    stop = StopRequest.install()  # SIGUSR1: checkpoint after the step under way and stop (Slurm time limit)
    t, rollout = cfg.trainer, cfg.rollout
    run_dir = Path(t.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    resume_from = run_state.resolve_resume(t.resume, run_dir)
    state = RunState.read(resume_from) if resume_from is not None else None
    parts = build_run(cfg, run_dir, state.step if state else None)  # models, data, logger, cluster (not started)
    sampling = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=rollout.temperature,
                              top_p=rollout.top_p, top_k=rollout.top_k, n=rollout.n)
    evaluate = Evaluator(parts.val, parts.tokenizer, parts.logger, cfg.data.max_response_length)
    probe = [p.input_ids for p in (parts.val or parts.loader.prompts)[:4]]  # fixed sequences for the push check
    version, iteration, first, last = 0, 0, 1, t.total_training_steps

    with parts.cluster as cluster:
        if state is not None:
            resume(cluster, parts.loader, resume_from, state)
            version, iteration, first = state.weight_version, state.spin_iteration, state.step + 1
            evaluate.results = dict(state.evals)
        else:
            cluster.announce_version(version)  # the engines start from the trainer's weights
            evaluate(0, cluster.fleet, cluster.reward)
        progress = tqdm(total=t.total_training_steps, initial=first - 1, desc="online DPO", unit="step", disable=None)
        for step in range(first, t.total_training_steps + 1):
            timer, update, gap = StepTimer(), {}, None
            prompts = parts.loader.next_batch()
            with timer("generate"):
                groups = generate(cluster.fleet, prompts, sampling, seed=t.seed * 1_000_003 + step, version=version,
                                  max_lag=rollout.max_off_policy_steps, recover=cluster.recover_engines)
            with timer("reward"):
                scored = score_completions(prompts, groups, parts.tokenizer, cluster.reward)
                pairs, stats = make_pairs(cfg.algorithm, prompts, scored)
            if pairs:
                with timer("train_total"):
                    update = cluster.train(pairs, iteration, step).as_metrics()
                with timer("sync"):
                    update.update(cluster.push(step).as_metrics())
                version = step
                if rollout.sync.verify_every and step % rollout.sync.verify_every == 0:
                    gap = cluster.verify_push(probe)  # checked once the step is logged
                    update.update(gap.as_metrics())
            if t.ref_update_freq and step % t.ref_update_freq == 0:
                cluster.refresh_reference()
                iteration += 1  # a SPIN iteration ends: the reference is the new policy
            metrics = step_metrics(scored, stats, update, timer.done(), iteration=iteration, version=version)
            parts.logger.log(step, metrics)
            if gap is not None:
                gap.check(rollout.sync.verify_tolerance, str(version))  # the engines do not hold our weights: stop
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", loss=f"{update.get('loss', float('nan')):.4f}")
            progress.update(1)
            if t.test_freq and step % t.test_freq == 0 and step != t.total_training_steps:
                evaluate(step, cluster.fleet, cluster.reward)
            stopping = stop.requested is not None and step < t.total_training_steps  # read once per step
            if t.saves_after(step, stopping):
                seconds = save_checkpoint(cluster, run_dir, RunState(step, version, iteration, parts.loader.state_dict(),
                                                                     evaluate.results))
                parts.logger.log(step, {"timing/checkpoint": seconds}, kind="checkpoint")
            if stopping:
                print(f"[stop] {stop.requested}: checkpoint at step {step} saved in {run_dir}; the same command "
                      "(same run directory) resumes", flush=True)
                last = step
                break
        progress.close()
        # Also when a run that had finished is started again: the final checkpoint is written
        # before this evaluation, so a crash during it leaves the last step unevaluated.
        if last == t.total_training_steps and last not in evaluate.results:
            evaluate(last, cluster.fleet, cluster.reward)
    parts.logger.close()
    return finish(run_dir, evaluate.results, last)


def finish(run_dir: Path, evals: dict, steps: int) -> dict:
    from megatron_spin.metrics.report import write_run_report

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
        try:
            run(load_run_config(hcfg))
        except ConfigError as exc:  # start-up rules, including those that need the model's config
            raise SystemExit(f"config error: {exc}") from None
        except DataFileError as exc:  # a prompt file or record: the message names file and line
            raise SystemExit(f"data error: {exc}") from None
        except ClusterError as exc:  # a rank or engine failed or hung; everything is torn down by now
            raise SystemExit(f"run failed: {exc}") from None

    _entry()


if __name__ == "__main__":
    main()
