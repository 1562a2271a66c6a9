#!/usr/bin/env bash
# The prepared GPU check: one device call (about 7 minutes) on a CUDA machine that has torch, triton, pytest and
# pytest-benchmark and no network. It installs fastkd offline, runs the kernel tests on the GPU (compiled Triton, not
# the interpreter), benchmarks kd_loss at the small and the LLM-vocabulary shapes, benchmarks the spaced-KD training
# step (eager, compiled, compiled + CUDA graphs) and the training loader, runs a few steps under a 1-GPU torchrun
# (DDP over NCCL, eager and compiled), and prints the tables last.
# Results land in $OUT (the device tool's output folder) or /tmp/fastkd-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fastkd-gpu-check}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/fastkd-inductor-cache
status=0

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

echo "== kd_loss kernel tests on the GPU"
timeout 150 python3 -m pytest tests/test_kd_loss.py -q -x 2>&1 | tee "$out/kernel_tests.log" || status=1

echo "== kd_loss benchmarks"
FASTKD_BENCH_LARGE=1 timeout 170 python3 -m pytest benchmarks/test_kd_loss_bench.py --benchmark-only -q \
    --benchmark-json="$out/kd_loss_bench.json" 2>&1 | tail -n 5 || status=1

echo "== training-step benchmark (eager, compiled, compiled + CUDA graphs)"
timeout 150 python3 -m pytest benchmarks/test_step_bench.py --benchmark-only -q \
    --benchmark-json="$out/step_bench.json" 2>&1 | tail -n 5 || status=1

echo "== training-loader benchmark (torch DataLoader; DALI where installed)"
timeout 60 python3 -m pytest benchmarks/test_loader_bench.py --benchmark-only -q \
    --benchmark-json="$out/loader_bench.json" 2>&1 | tail -n 5 || status=1

echo "== 1-GPU torchrun smoke (DDP over NCCL: eager steps, then compiled steps with in-graph all-reduce)"
for flag in "" "--compile"; do
    timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m fastkd.train --method spaced \
        $flag --dataset synthetic --epochs 2 --batch-size 64 --quiet --out "$out/torchrun-smoke$flag" 2>&1 \
        | tail -n 3 || status=1
done

echo "== tables"
for f in "$out/kd_loss_bench.json" "$out/step_bench.json" "$out/loader_bench.json"; do
    [ -f "$f" ] && python3 benchmarks/report.py "$f" | tee -a "$out/tables.md"
done
exit $status
