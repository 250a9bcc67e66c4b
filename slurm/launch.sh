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
#   5. tears everything down when the script exits — on success, on a failure, on Ctrl-C, or on
#      scancel / the time limit (Slurm then also signals every process of the job itself): the
#      driver first, then all Ray steps together (SIGTERM, SIGKILL after 15 s).
# SIGUSR1 is forwarded to the driver, which finishes its step, saves a checkpoint and stops:
# the wrappers ask Slurm for it 15 minutes before the time limit (#SBATCH --signal=B:USR1@900),
# and `scancel --batch --signal=USR1 JOB` does it by hand; re-submitting the same command (same
# job name or --run-dir: the run directory) resumes the run.
# Logs: <run dir>/logs/driver.log, ray-head-<node>.log, ray-worker-<node>.log (one per node).
#
# Options (flags win over the environment):
#   --preset NAME     Hydra config under megatron_spin/config/conf (spin_trainer, spin_8b, spin_70b)
#   --run-dir DIR     default: $SPIN_RUN_DIR, a trainer.default_local_dir=... given here, or
#                     <repo>/runs/<preset>/<job name> (stable across resubmissions: they resume)
#   --ray-port P      default: $SPIN_RAY_PORT or 6379 (the head's GCS port)
#   --python PY       default: $SPIN_PYTHON or <repo>/.venv/bin/python
#   --nodes-timeout S seconds to wait for all nodes to join (default 600)
# The repository is found from $SPIN_HOME, this script's location, or the submit directory.
# SPIN_HEAD_IP overrides the head's address (default: the one Ray picks on the first node);
# SPIN_RAY_TMPDIR Ray's temp dir on every node (default /tmp/ray-spin-<job id>; Ray's own logs).
# Unverified on GPU clusters: GRES binding of the Ray steps, NCCL between nodes, SGLang engines.
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
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
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
[[ -x "$ray_bin" ]] || die "no ray executable beside $py (is ray[default] installed in that environment?)"
[[ -f "$home/megatron_spin/config/conf/$preset.yaml" ]] || die "no preset $preset (megatron_spin/config/conf/$preset.yaml)"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nnodes=${#nodes[@]}
head_node="${nodes[0]}"
gpus="${SLURM_GPUS_ON_NODE:-0}"
cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
for kv in ${overrides[@]+"${overrides[@]}"}; do
  [[ "$kv" == trainer.default_local_dir=* && -z "$run_dir" ]] && run_dir="${kv#*=}"
done
run_dir="${run_dir:-$home/runs/$preset/${SLURM_JOB_NAME:-$SLURM_JOB_ID}}"
[[ "$run_dir" == /* ]] || run_dir="$home/$run_dir"
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
# Ray's SIGTERM handler first drains its node (for Ray Serve), for up to 30 s, through the GCS.  At
# teardown, and on scancel, Slurm signals every process of a step at once, the GCS among them, so
# that drain can only time out: the Ray steps outlive the job script until Slurm's KillWait SIGKILL.
# Nothing here needs draining: stop at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
say "job $SLURM_JOB_ID: $nnodes node(s) [${nodes[*]}], $gpus GPU(s) and $cpus CPU(s) per node, preset $preset"
say "run directory $run_dir"

head_pid="" driver_pid="" finished=0 worker_pids=()
stop_all() {  # stop_all NAME PID...: SIGTERM to all at once, up to 15 s, then SIGKILL
  local name="$1" pid alive; shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 30); do
    alive=0; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.5
  done
  if ((alive)); then say "$name did not stop within 15 s: killing"; kill -KILL "$@" 2>/dev/null || true; fi
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
teardown() {
  local rc=$?
  trap - EXIT INT TERM USR1
  [[ $finished == 1 ]] || say "stopping early (exit status $rc): tearing down"
  [[ -n "$driver_pid" ]] && stop_all "the driver" "$driver_pid"
  # (${a[@]+"${a[@]}"}: an empty array under set -u on bash < 4.4)
  stop_all "the Ray steps" ${worker_pids[@]+"${worker_pids[@]}"} ${head_pid:+"$head_pid"}
  say "teardown done; logs in $logs"
  exit "$rc"
}
trap teardown EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated (scancel or time limit)"; exit 143' TERM
# USR1 before the driver exists is remembered and delivered as soon as it starts.
usr1=0 interrupted=0
trap 'usr1=1 interrupted=1; say "SIGUSR1: the driver will save a checkpoint after its step and stop"
      [[ -n "$driver_pid" ]] && kill -USR1 "$driver_pid" 2>/dev/null || true' USR1

has_override() {
  local k
  for k in ${overrides[@]+"${overrides[@]}"}; do [[ "$k" == "$1="* ]] && return 0; done
  return 1
}
wait_nodes() {  # wait_nodes N: bounded even if Ray's client blocks (no Python signal runs then)
  timeout $((nodes_timeout + 60)) "$py" -m megatron_spin.orchestrate.ray_nodes --address "$address" --nodes "$1" \
    --timeout "$nodes_timeout" --alive-pid "$head_pid"
}
# Each step asks for the node's CPUs and GPUs explicitly: with task/cgroup a step is confined to
# what it requested, and Ray's worker processes must see the whole node.
step_res=(--cpus-per-task="$cpus")
((gpus > 0)) && step_res+=(--gres="gpu:$gpus")
step() { srun --overlap --nodes="$1" --ntasks="$1" --ntasks-per-node=1 "${step_res[@]}" "${@:2}"; }
# A Ray temp dir per job (sessions, logs, the "current cluster" file): jobs sharing a node, or a
# later plain ray.init() on it, never find this job's cluster.  Short: Ray's socket paths < 108 bytes.
ray_tmp="${SPIN_RAY_TMPDIR:-/tmp/ray-spin-$SLURM_JOB_ID}"
node_args=(--num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats --temp-dir="$ray_tmp")

# The head's address as Ray itself picks it (the interface of the default route), not
# `hostname --ip-address`, which is 127.0.1.1 on stock Debian/Ubuntu hosts.
head_ip="${SPIN_HEAD_IP:-$(step 1 -w "$head_node" "$py" -c 'import ray.util; print(ray.util.get_node_ip_address())')}"
[[ -n "$head_ip" ]] || die "could not find the head node's IP address (set SPIN_HEAD_IP)"
address="$head_ip:$port"
say "Ray head on $head_node ($address)"
step 1 -w "$head_node" --output="$logs/ray-head-$head_node.log" \
  "$ray_bin" start --head --block --node-ip-address="$head_ip" --port="$port" --include-dashboard=false \
  "${node_args[@]}" &
head_pid=$!
wait_nodes 1 || die "the Ray head did not come up; see $logs/ray-head-$head_node.log"
if ((nnodes > 1)); then
  # One step per worker node, so each node's log carries its Slurm name (srun's %N is the host
  # name, which simulated nodes share).
  say "Ray workers on ${nodes[*]:1}"
  for node in "${nodes[@]:1}"; do
    step 1 -w "$node" --output="$logs/ray-worker-$node.log" \
      "$ray_bin" start --block --address="$address" "${node_args[@]}" &
    worker_pids+=($!)
  done
  wait_nodes "$nnodes" || die "not every node joined the Ray cluster; see $logs/ray-worker-*.log"
fi

args=(--config-name "$preset" "trainer.ray_address=$address")
has_override trainer.default_local_dir || args+=("trainer.default_local_dir=$run_dir")
has_override trainer.nnodes || args+=("trainer.nnodes=$nnodes")
has_override trainer.n_gpus_per_node || args+=("trainer.n_gpus_per_node=$gpus")
args+=(${overrides[@]+"${overrides[@]}"})
if ((usr1)); then  # asked for before the driver started: nothing to save, nothing to start
  finished=1
  say "SIGUSR1 before training started: not starting the driver"
  exit 0
fi
say "driver: megatron-spin-train ${args[*]}"
cd "$home"
"$py" -m megatron_spin.main "${args[@]}" > >(tee "$logs/driver.log") 2>&1 &
driver_pid=$!
while :; do  # the USR1 trap interrupts `wait`; waiting again returns the driver's own status
  interrupted=0 rc=0
  wait "$driver_pid" || rc=$?
  ((interrupted)) && continue
  break
done
driver_pid=""
if ((rc != 0)); then
  say "the trainer failed (exit status $rc); see $logs/driver.log"
  exit "$rc"
fi
say "writing the report"
"$py" "$home/tools/report.py" "$run_dir" || say "the report failed (the run itself finished)"
finished=1
say "done: $run_dir"
