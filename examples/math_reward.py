"""Online DPO with a rule reward: arithmetic answers checked by reasoning-gym.

Prompts are reasoning-gym ``basic_arithmetic`` questions (their answers travel with the
prompts); the fleet samples ``n`` answers per question, the math reward extracts each final
answer (``<answer>…</answer>`` or the last number) and scores it with reasoning-gym's checker,
and pairs are built from right-vs-wrong answers (questions where all answers tie give none).

    .venv/bin/python examples/math_reward.py [hydra overrides]
"""

from __future__ import annotations

from pathlib import Path

from _common import run_with
from spin_arithmetic import write_data

if __name__ == "__main__":
    root = Path("runs/examples/math_reward")
    train = write_data(root / "data" / "train.jsonl", 256, seed=3)
    val = write_data(root / "data" / "val.jsonl", 32, seed=4)
    run_with([f"data.train_files=[{train}]", f"data.val_files=[{val}]",
              "data.max_response_length=24", "reward_model.type=math", "actor_rollout_ref.rollout.n=4",
              "actor_rollout_ref.rollout.temperature=1.0", "actor_rollout_ref.actor.micro_pairs=1",
              "trainer.total_training_steps=8", "trainer.test_freq=4",
              "actor_rollout_ref.actor.optim.lr=5e-6", f"trainer.default_local_dir={root / 'run'}",
              "trainer.experiment_name=math_reward"])
