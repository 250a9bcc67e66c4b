#!/usr/bin/env bash
# Llama-3-8B-class online DPO on one node x 8 GPUs (preset megatron_spin/config/conf/spin_8b.yaml).
# Unverified on GPU.  Submit from the repository root (where tools/setup_venv.sh made .venv):
#
#   sbatch slurm/spin_8b.sh actor_rollout_ref.model.path=/models/Meta-Llama-3-8B-Instruct \
#       reward_model.path=/models/reward data.train_files=[/data/prompts.jsonl]
#
# Every key=value is a Hydra override on top of the preset.  Memory plan:
#   python tools/plan.py --preset spin_8b --gpu-mem-gb 80
#SBATCH --job-name=spin-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@900
set -euo pipefail
exec bash "${SPIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh" --preset spin_8b "$@"
