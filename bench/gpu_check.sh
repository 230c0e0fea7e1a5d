#!/usr/bin/env bash
# fastelbo's GPU check: one command for a machine with an NVIDIA GPU and no network.
#
#   bash bench/gpu_check.sh OUT_DIR              every stage, about 8 minutes at most on one H100
#   bash bench/gpu_check.sh OUT_DIR --dry-run    the stages, their commands and time caps (runs anywhere)
#   bash bench/gpu_check.sh OUT_DIR --only bench  one stage or group again (install is cheap: keep it)
#
# Uses the machine's python3 (PYTHON=... to choose another) with the torch and
# triton it has; installs nothing from the network. Writes OUT_DIR/report.md,
# report.json, logs/, tests/, sanitizer/ and bench/ (JSON, PNG, table). The
# stages and what they run: bench/gpucheck/stages.py; README, "Running the GPU check".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/bench${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m gpucheck "$@"
