#!/usr/bin/env bash
# Llama-3-70B-class online DPO on 8 nodes x 8 GPUs (preset megatron_spin/config/conf/spin_70b.yaml).
# Unverified on GPU.  Submit from the repository root (where tools/setup_venv.sh made .venv):
#
#   sbatch slurm/spin_70b.sh actor_rollout_ref.model.path=/models/Meta-Llama-3-70B-Instruct \
#       reward_model.path=/models/reward data.train_files=[/data/prompts.jsonl]
#   sbatch --nodes=16 slurm/spin_70b.sh ...        # more nodes: more DP replicas and engines
#
# Every key=value is a Hydra override on top of the preset.  Check the memory plan first:
#   python tools/plan.py --preset spin_70b --gpu-mem-gb 80
#SBATCH --job-name=spin-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@900
set -euo pipefail
exec bash "${SPIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh" --preset spin_70b "$@"
