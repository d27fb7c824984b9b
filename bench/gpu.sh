#!/usr/bin/env bash
# The one device check (issues 3 and 8), run from the repository root on a bare GPU machine:
#   - ours vs higher / torchopt (second-order MAML, 5w1s, meta-batch 32) and easyfsl (ProtoNet, 5- and 60-way),
#     and vs the minimal loop (bench/metaflowlib_bench/minimal.py: the same steps with nothing around them, eager and
#     torch.compile; its compile warm-up adds about a minute, est.), adaptation latency, torch.profiler summaries,
#     time to accuracy (ProtoNet, MAML) on Omniglot;
#   - memory and time per meta-step of MAML/FOMAML/Reptile/iMAML against inner steps, vmap vs loop at 1 step;
#   - ResNet-12 next to Conv-4 at 84x84 RGB (issue 19): ProtoNet and second-order MAML meta-steps/s, images/s, peak
#     memory (2 warm-up + 5 timed steps per row: well under a minute on an H100, est.).
# Needs torch and numpy only; the peers come as wheels in .whl/ and the Omniglot files in .devdata/omniglot
# (both ignored by git: see bench/README.md). Writes everything under $OUT (default /tmp/gpu-out).
# WINDOW_MINUTES=N: then continue the paper runs (bench/paper_run.sh) with what is left of N minutes, less one for
# the transfers back; their state lands in $OUT/paper_runs.
# Rehearse on a CPU: DEVICE=cpu QUICK=--quick bash bench/gpu.sh
set -uo pipefail
STARTED=$SECONDS
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"  # the library and the harness, uninstalled
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  python3 -m metaflowlib_bench --device "$DEVICE" --data .devdata --out "$OUT/bench" $QUICK \
    ${PROTONET_SECONDS:+--protonet-seconds $PROTONET_SECONDS} ${MAML_SECONDS:+--maml-seconds $MAML_SECONDS}
  echo "bench exit $?"
  python3 bench/maml_memory.py --device "$DEVICE" --out "$OUT/maml_memory" --ratio-steps 1 \
    ${QUICK:+--inner-steps 1 2 --repeats 1}
  echo "maml_memory exit $?"
  python3 bench/backbone_throughput.py --device "$DEVICE" --out "$OUT/backbone_throughput.json" --warmup 2 --steps 5 $QUICK
  echo "backbone_throughput exit $?"
} 2>&1 | tee "$OUT/log"
if [ -n "${WINDOW_MINUTES:-}" ]; then
  LEFT=$(python3 -c "print(round($WINDOW_MINUTES - ($SECONDS - $STARTED) / 60 - 1, 2))")
  if python3 -c "import sys; sys.exit(0 if $LEFT > 1 else 1)"; then
    echo "paper runs for $LEFT minutes" | tee -a "$OUT/log"
    ALLOWANCE=$LEFT OUT="$OUT" DEVICE="${DEVICE/cuda/auto}" bash bench/paper_run.sh
  else
    echo "no time left of WINDOW_MINUTES=$WINDOW_MINUTES for the paper runs" | tee -a "$OUT/log"
  fi
fi
