#!/usr/bin/env bash
# One GPU window of the paper runs (issue 16), from the repository root on a bare GPU machine:
#   continues bench/paper_runs/plan.json from the committed state under bench/results/paper_runs for ALLOWANCE
#   minutes (default 9: a 15-minute window less start-up and transfers) and writes the new state to $OUT/paper_runs,
#   which replaces bench/results/paper_runs here and is committed (checkpoints are a few MB: Conv-4 + Adam state).
# Needs torch, numpy and safetensors (all on the lent machines) and the Omniglot files in .devdata/omniglot
# (a transfer copy, ignored by git: bench/README.md "Paper runs"). Rehearse on a CPU:
#   DEVICE=cpu ALLOWANCE=0.5 OUT=/tmp/paper bash bench/paper_run.sh
# ONLY="name ..." limits it to runs of the plan; PAPER_ARGS passes more options to bench/paper_run.py.
set -uo pipefail
OUT=${OUT:-/tmp/paper-out}
mkdir -p "$OUT"
rm -rf "$OUT/paper_runs" && mkdir -p bench/results/paper_runs && cp -r bench/results/paper_runs "$OUT/paper_runs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 bench/paper_run.py --device "${DEVICE:-auto}" --data .devdata --runs-dir "$OUT/paper_runs" \
    --allowance-minutes "${ALLOWANCE:-9}" ${ONLY:+--only $ONLY} ${PAPER_ARGS:-}
  echo "paper_run exit $?"
} 2>&1 | tee -a "$OUT/paper_run.log"
