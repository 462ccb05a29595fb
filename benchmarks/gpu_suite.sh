#!/usr/bin/env bash
# Every GPU measurement of the performance benchmarks in one call, sized to fit ~9 minutes on
# one H100/H200 (the device tool's per-command limit is 10 minutes). Run from the repository
# root with the package importable (see the device notes in docs/benchmarks.md); writes one
# table per benchmark under $OUT (default outputs/gpu) and prints them.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
#
# The digits rows need scikit-learn, which the device image lacks: add its wheels with the
# others (../shared/tools/gpu-wheels.sh scikit-learn==1.7.2 joblib threadpoolctl). Unmeasured
# rows come first, so a call cut short by the device's time still measures them.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import jax, sys; print('jax', jax.__version__, jax.devices(), 'python', sys.version)" \
  | tee -a "$OUT/device.txt"

run() {  # run NAME TIMEOUT_S COMMAND...: one benchmark, its table to $OUT/NAME.md
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.md"
}

# first the log Z tracker's cost per step as fit runs the steps, 8gaussians and digits (issue
# 18's last open point: at most 10% of a step; never measured on a GPU since the floor existed)
run log_z_overhead 150 $PY benchmarks/log_z_tracking.py overhead --steps 100 --repeats 5
# then what session 17 (the first GPU run, docs/benchmarks.md) could not measure:
# chains 256 → 65 536 × dims 2 → 784, MLP 512 × 2
run scaling 240 $PY benchmarks/scaling.py --min-seconds 1 --budget 5
run step_throughput_64d 120 $PY benchmarks/step_throughput.py --dim 64 --hidden 512 512 \
  --chains 16384 --steps 300 --repeats 3
# PyTorch eager, the same loop, if the image has torch
if $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  run torch_reference 120 $PY benchmarks/torch_reference.py --chains 1024 16384 --steps 30
  run torch_reference_64d 120 $PY benchmarks/torch_reference.py --dim 64 --hidden 512 512 \
    --chains 16384 --steps 10
else
  echo "torch with CUDA is not installed: PyTorch reference skipped" | tee "$OUT/torch_reference.md"
fi
# fit vs the hand-written JAX loop, 1024 chains on 8gaussians
run step_throughput 120 $PY benchmarks/step_throughput.py --steps 1000 --repeats 3
# the 2-D toy defaults (2000 steps) trained from a cold process, compile included
for toy in 8gaussians rings checkerboard; do
  run "demo_$toy" 90 $PY -m numpyro_ebm.cli demo --toy "$toy" --quiet --out "$OUT/demo"
done
