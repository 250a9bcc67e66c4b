"""SPIN on the packaged model: ground-truth answers (chosen) against the policy's own answers (rejected).

Self-play fine-tuning (Chen et al. 2024) needs prompts with reference responses.  This recipe
writes arithmetic questions from reasoning-gym with a one-sentence ground-truth answer each,
then trains SmolLM2-135M-Instruct with ``algorithm.spin=true``: one sample per prompt, the
reference refreshed every ``trainer.ref_update_freq`` steps (each refresh starts a new SPIN
iteration).  The held-out score is reasoning-gym's answer check on greedy answers.

    .venv/bin/python examples/spin_arithmetic.py [hydra overrides, e.g. trainer.total_training_steps=4]
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import run_with


def write_data(out: Path, n: int, seed: int) -> Path:
    import reasoning_gym

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for e in reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=seed):
            f.write(json.dumps({"prompt": f"{e['question']} Put the final answer in <answer></answer>.",
                                "response": f"The answer is <answer>{e['answer']}</answer>.",
                                "answer": e["answer"], **e["metadata"]}) + "\n")
    return out


if __name__ == "__main__":
    root = Path("runs/examples/spin_arithmetic")
    train = write_data(root / "data" / "train.jsonl", 256, seed=1)
    val = write_data(root / "data" / "val.jsonl", 32, seed=2)
    run_with([f"data.train_files=[{train}]", f"data.val_files=[{val}]",
              "data.max_response_length=24", "algorithm.spin=true", "actor_rollout_ref.rollout.n=1",
              "reward_model.type=math", "trainer.ref_update_freq=4", "trainer.total_training_steps=8",
              "trainer.test_freq=4", "actor_rollout_ref.actor.optim.lr=5e-6",
              f"trainer.default_local_dir={root / 'run'}", "trainer.experiment_name=spin_arithmetic"])
