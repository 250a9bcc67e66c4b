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
from pathlib import Path

from megatron_spin.ckpt import run_state
from megatron_spin.config.run import RunConfig, load_run_config, to_dict
from megatron_spin.pairs import build_pairs, build_spin_pairs
from megatron_spin.rollout.protocol import SamplingParams
from megatron_spin.rollout.scoring import score_completions
from megatron_spin.rollout.staleness import check_versions


def run(cfg: RunConfig) -> dict:
    from megatron_spin.orchestrate.setup import build_run  # heavy imports stay out of --help

    t = cfg.trainer
    run_dir = Path(t.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    parts = build_run(cfg, run_dir)  # models, data, reward, logger, cluster (not started)
    rollout = cfg.rollout
    sampling = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=rollout.temperature,
                              top_p=rollout.top_p, top_k=rollout.top_k, n=rollout.n)
    greedy = SamplingParams(max_new_tokens=cfg.data.max_response_length, temperature=0.0)
    version, iteration, evals, first = 0, 0, {}, 1
    colocated = rollout.placement == "colocated"
    resume_from = run_state.resolve_resume(t.resume, run_dir)

    def evaluate(step: int) -> None:
        groups = parts.cluster.fleet.generate([p.input_ids for p in parts.val], greedy)
        scored = score_completions(parts.val, groups, parts.tokenizer, parts.reward, "val:")
        evals[step] = sum(s[0].reward for s in scored) / len(scored)
        parts.logger.log(step, {"reward/mean": evals[step], "prompts": len(scored)}, kind="eval")

    with parts.cluster as cluster:
        if resume_from is not None:  # weights, optimizer, reference, data position; engines get the weights
            state = run_state.read_state(resume_from)
            cluster.call("load_checkpoint", str(resume_from), what=f"resume from {resume_from}")
            parts.loader.load_state_dict(state["data"])
            version, iteration, first = state["weight_version"], state["spin_iteration"], state["step"] + 1
            evals = {int(k): v for k, v in state["evals"].items()}
            cluster.push(version)
            print(f"[resume] from {resume_from} at step {state['step']}", flush=True)
        else:
            cluster.fleet.each(lambda c: c.update_weight_version(str(version)))  # engines start with these weights
            evaluate(0)
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
            if cfg.algorithm.spin:
                truth = {s[0].prompt_id: p.response_ids for p, s in zip(prompts, scored)}
                pairs, stats = build_spin_pairs(scored, truth, per_prompt=cfg.algorithm.spin_selection)
            else:
                pairs, stats = build_pairs(scored, strategy=cfg.algorithm.pair_strategy, margin=cfg.algorithm.min_margin,
                                           unfinished_penalty=cfg.algorithm.unfinished_penalty)
            timing["reward"] = time.monotonic() - started - timing["generate"]
            pairs = pairs[: len(pairs) - len(pairs) % parts.pairs_multiple]  # whole micro-batches on every rank
            metrics = {}
            if pairs:
                t0 = time.monotonic()
                if colocated:  # the engines give their memory back while the actor trains
                    cluster.release_engines()
                metrics = cluster.train(pairs, iteration)
                timing["train_total"] = time.monotonic() - t0
                t0 = time.monotonic()
                if colocated:
                    cluster.resume_engines()  # empty until the push below fills them
                report = cluster.push(step)
                version = step
                timing["sync"] = time.monotonic() - t0
                metrics.update(report.as_metrics())
            if cfg.trainer.ref_update_freq and step % cfg.trainer.ref_update_freq == 0:
                cluster.refresh_reference()
                iteration += 1  # a SPIN iteration ends: the reference is the new policy
            rewards = [s.reward for g in scored for s in g]
            tokens = sum(len(s.response_ids) for g in scored for s in g)
            timing["step"] = time.monotonic() - started
            parts.logger.log(step, {**metrics, **stats.as_metrics(), "reward/mean": sum(rewards) / len(rewards),
                                    "reward/max": max(rewards), "reward/min": min(rewards), "spin_iteration": iteration,
                                    "weight_version": version, "rollout/tokens_per_s": tokens / timing["generate"],
                                    **{f"timing/{k}": v for k, v in timing.items()}})
            if t.test_freq and step % t.test_freq == 0 and step != t.total_training_steps:
                evaluate(step)
            if (t.save_freq and step % t.save_freq == 0) or step == t.total_training_steps:
                t0 = time.monotonic()
                staged = run_state.staging_dir(run_dir, step)
                cluster.call("save_checkpoint", str(staged), what=f"checkpoint {step}")
                run_state.publish(run_dir, step, staged, {"weight_version": version, "spin_iteration": iteration,
                                                          "data": parts.loader.state_dict(), "evals": evals})
                parts.logger.log(step, {"timing/checkpoint": time.monotonic() - t0}, kind="checkpoint")
        if first <= t.total_training_steps or not evals:
            evaluate(t.total_training_steps)
    parts.logger.close()
    summary = {"run_dir": str(run_dir), "eval_reward": evals, "steps": t.total_training_steps}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    import hydra

    @hydra.main(config_path="config/conf", config_name="spin_trainer", version_base=None)
    def _entry(hcfg) -> None:
        from megatron_spin.config.optim import ConfigError

        try:
            cfg = load_run_config(hcfg)
        except ConfigError as exc:
            raise SystemExit(f"config error: {exc}") from None
        run(cfg)

    _entry()


if __name__ == "__main__":
    main()
