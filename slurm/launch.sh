#!/usr/bin/env bash
# The one Slurm launcher behind slurm/spin_70b.sh and slurm/spin_8b.sh (or sbatch it directly).
#
#   sbatch --nodes=2 slurm/launch.sh --preset spin_trainer [--run-dir DIR] [--ray-port P] [key=value ...]
#
# Inside an allocation of N nodes it:
#   1. starts a Ray head on the first node and a Ray worker on every other node, each as an srun
#      step running `ray start --block` (a step's end is its node's Ray end: no `ray stop`, which
#      would also kill other Ray instances on a shared host);
#   2. waits until the cluster has all N nodes (bounded; the per-node logs are named on failure);
#   3. runs `megatron-spin-train --config-name <preset>` against that cluster with
#      trainer.nnodes=N, trainer.n_gpus_per_node=<GPUs per node of the allocation> and the run
#      directory, plus every key=value given here (they win over the preset);
#   4. writes the benchmark report (tools/report.py) into the run directory;
#   5. tears everything down on exit, failure, scancel or Ctrl-C (trap): driver first, then the
#      Ray steps (SIGTERM, then SIGKILL after a grace period).
# Logs: <run dir>/logs/driver.log, ray-head-<node>.log, ray-worker-<node>.log (one per node).
#
# Options (flags win over the environment):
#   --preset NAME     Hydra config under megatron_spin/config/conf (spin_trainer, spin_8b, spin_70b)
#   --run-dir DIR     default: $SPIN_RUN_DIR or <repo>/runs/<preset>/<job id>
#   --ray-port P      default: $SPIN_RAY_PORT or 6379 (the head's GCS port)
#   --python PY       default: $SPIN_PYTHON or <repo>/.venv/bin/python
#   --nodes-timeout S seconds to wait for all nodes to join (default 600)
# The repository is found from $SPIN_HOME, this script's location, or the submit directory.
set -euo pipefail

die() { echo "[launch] error: $*" >&2; exit 2; }
say() { echo "[launch $(date +%H:%M:%S)] $*"; }

preset="" run_dir="${SPIN_RUN_DIR:-}" port="${SPIN_RAY_PORT:-6379}" py="${SPIN_PYTHON:-}" nodes_timeout=600
overrides=()
while (($#)); do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --ray-port) port="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --nodes-timeout) nodes_timeout="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    --*) die "unknown option $1 (see --help)" ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[[ -n "$preset" ]] || die "--preset is required (spin_trainer, spin_8b, spin_70b)"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm allocation: submit with sbatch (e.g. sbatch slurm/spin_8b.sh ...)"

# sbatch runs a copy of the script from its spool directory: find the repository explicitly.
home="${SPIN_HOME:-}"
if [[ -z "$home" ]]; then
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -d "$here/megatron_spin" ]]; then home="$here"; else home="${SLURM_SUBMIT_DIR:-$PWD}"; fi
fi
[[ -d "$home/megatron_spin" ]] || die "cannot find the megatron_spin repository (looked in $home); set SPIN_HOME"
py="${py:-$home/.venv/bin/python}"
[[ -x "$py" ]] || die "no Python at $py: run 'bash tools/setup_venv.sh' in $home, or pass --python"
ray_bin="$(dirname "$py")/ray"
[[ -f "$home/megatron_spin/config/conf/$preset.yaml" ]] || die "no preset $preset (megatron_spin/config/conf/$preset.yaml)"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nnodes=${#nodes[@]}
head_node="${nodes[0]}"
gpus="${SLURM_GPUS_ON_NODE:-0}"
cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
run_dir="${run_dir:-$home/runs/$preset/$SLURM_JOB_ID}"
logs="$run_dir/logs"
mkdir -p "$logs"
# Ray's token authentication: one token per job, passed to the head, the workers and the driver
# through the environment srun propagates (no shared home directory needed).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  RAY_AUTH_TOKEN="$("$py" -c 'import secrets; print(secrets.token_hex(32))')"
  export RAY_AUTH_TOKEN
fi
export PYTHONUNBUFFERED=1
say "job $SLURM_JOB_ID: $nnodes node(s) [${nodes[*]}], $gpus GPU(s) and $cpus CPU(s) per node, preset $preset"
say "run directory $run_dir"

head_pid="" driver_pid="" finished=0 worker_pids=()
stop_pid() {  # stop_pid PID NAME: SIGTERM, a grace period, then SIGKILL
  local pid="$1" name="$2"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }; sleep 0.5; done
  say "$name did not stop within 30 s: killing it"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  [[ $finished == 1 ]] || say "stopping early (exit status $rc): tearing down"
  stop_pid "$driver_pid" "the driver"
  local pid
  for pid in "${worker_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done  # in parallel, then each
  for pid in "${worker_pids[@]}"; do stop_pid "$pid" "a Ray worker"; done
  stop_pid "$head_pid" "the Ray head"
  say "teardown done; logs in $logs"
  exit "$rc"
}
trap teardown EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated (scancel or time limit)"; exit 143' TERM

has_override() { local k; for k in "${overrides[@]}"; do [[ "$k" == "$1="* ]] && return 0; done; return 1; }
step() { srun --overlap --nodes="$1" --ntasks="$1" --ntasks-per-node=1 "${@:2}"; }
node_args=(--num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats)

head_ip="${SPIN_HEAD_IP:-$(step 1 -w "$head_node" hostname --ip-address | awk '{print $1}')}"
address="$head_ip:$port"
say "Ray head on $head_node ($address)"
step 1 -w "$head_node" --output="$logs/ray-head-$head_node.log" \
  "$ray_bin" start --head --block --node-ip-address="$head_ip" --port="$port" --include-dashboard=false \
  "${node_args[@]}" &
head_pid=$!
"$py" -m megatron_spin.orchestrate.ray_nodes --address "$address" --nodes 1 --timeout "$nodes_timeout" \
  || die "the Ray head did not come up; see $logs/ray-head-$head_node.log"
if ((nnodes > 1)); then
  # One step per worker node, so each node's log carries its Slurm name (srun's %N is the host
  # name, which simulated nodes share).
  say "Ray workers on ${nodes[*]:1}"
  for node in "${nodes[@]:1}"; do
    step 1 -w "$node" --output="$logs/ray-worker-$node.log" \
      "$ray_bin" start --block --address="$address" "${node_args[@]}" &
    worker_pids+=($!)
  done
  "$py" -m megatron_spin.orchestrate.ray_nodes --address "$address" --nodes "$nnodes" --timeout "$nodes_timeout" \
    || die "not every node joined the Ray cluster; see $logs/ray-worker-*.log"
fi

args=(--config-name "$preset" "trainer.ray_address=$address" "trainer.default_local_dir=$run_dir")
has_override trainer.nnodes || args+=("trainer.nnodes=$nnodes")
has_override trainer.n_gpus_per_node || args+=("trainer.n_gpus_per_node=$gpus")
say "driver: megatron-spin-train ${args[*]} ${overrides[*]}"
cd "$home"
"$py" -m megatron_spin.main "${args[@]}" "${overrides[@]}" > >(tee "$logs/driver.log") 2>&1 &
driver_pid=$!
rc=0
wait "$driver_pid" || rc=$?
driver_pid=""
if ((rc != 0)); then
  say "the trainer failed (exit status $rc); see $logs/driver.log"
  exit "$rc"
fi
say "writing the report"
"$py" "$home/tools/report.py" "$run_dir" || say "the report failed (the run itself finished)"
finished=1
say "done: $run_dir"
