#!/usr/bin/env bash
# The prepared GPU check: one device call (at most 9 minutes: the step timeouts below add up to 530 s) on a CUDA
# machine that has torch, triton, pytest and pytest-benchmark and no network. It installs fastkd offline, runs the
# GPU test tier (tests marked gpu: every streaming kernel config at vocabulary sizes, compiled CUDA-graphed steps
# against eager, a 1-GPU torchrun against the plain run), then the kernel tests on the GPU (compiled Triton, not the
# interpreter), benchmarks kd_loss at the small and the LLM-vocabulary shapes and kd_loss_linear at
# 8192 × 4096 × 128256 bf16 (beside Liger's chunked fused-linear distillation loss where it imports), benchmarks
# the spaced-KD training step (fp32 → bf16 → channels-last → compiled → + CUDA graphs, with measured ÷ the epoch
# model's floor), the engine's host overhead per step and the training loader, runs a compiled 1-GPU torchrun smoke
# (DDP over NCCL, in-graph all-reduce), prints the tables, and last the steps that could not run, with why.
# Results land in $OUT (the device tool's output folder) or /tmp/fastkd-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fastkd-gpu-check}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/fastkd-inductor-cache
status=0
could_not_run=()

# check NAME RC LIMIT: remember a step that timed out or failed (RC is its timeout's exit status).
check() {
    case $2 in
        0) ;;
        124) could_not_run+=("$1: timed out after ${3} s"); status=1 ;;
        *) could_not_run+=("$1: failed with exit status $2 (its log is in $out)"); status=1 ;;
    esac
}

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
# Liger-Kernel, the peer provider of the kd_loss benchmark, from a wheel the device call carries (the machine has no
# network). Fetch it here first, kept out of git by .gitignore's /.whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# and name .whl in the call's carry. Without it the provider is skipped and listed under "could not run".
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/liger .whl/liger_kernel-*.whl \
        && export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

echo "== GPU test tier (pytest -m gpu)"
timeout 140 python3 -m pytest -m gpu tests/ -rs -q 2>&1 | tee "$out/gpu_tests.log"
check "GPU test tier" "${PIPESTATUS[0]}" 140

echo "== kd_loss kernel tests on the GPU"
timeout 60 python3 -m pytest tests/test_kd_loss.py -rs -q -x 2>&1 | tee "$out/kernel_tests.log"
check "kd_loss kernel tests" "${PIPESTATUS[0]}" 60

echo "== kd_loss benchmarks"
FASTKD_BENCH_LARGE=1 timeout 70 python3 -m pytest benchmarks/test_kd_loss_bench.py --benchmark-only -rs -q \
    --benchmark-json="$out/kd_loss_bench.json" 2>&1 | tee "$out/kd_loss_bench.log" | tail -n 5
check "kd_loss benchmarks" "${PIPESTATUS[0]}" 70

echo "== kd_loss_linear / kd_loss_sparse tests on the GPU, then the vocabulary-scale benchmark"
timeout 30 python3 -m pytest tests/test_kd_loss_linear.py -rs -q -x 2>&1 | tee "$out/linear_tests.log" | tail -n 3
check "kd_loss_linear tests" "${PIPESTATUS[0]}" 30
timeout 50 python3 -m pytest benchmarks/test_kd_loss_linear_bench.py --benchmark-only -rs -q \
    --benchmark-json="$out/kd_loss_linear_bench.json" 2>&1 | tee "$out/kd_loss_linear_bench.log" | tail -n 5
check "kd_loss_linear benchmark" "${PIPESTATUS[0]}" 50

echo "== training-step benchmark (fp32, bf16, channels-last, compiled, compiled + CUDA graphs)"
timeout 110 python3 -m pytest benchmarks/test_step_bench.py --benchmark-only -rs -q \
    --benchmark-json="$out/step_bench.json" 2>&1 | tee "$out/step_bench.log" | tail -n 5
check "training-step benchmark" "${PIPESTATUS[0]}" 110

echo "== engine host overhead per step (engine.train vs a bare loop over the same compiled step)"
timeout 25 python3 -m pytest benchmarks/test_engine_overhead_bench.py --benchmark-only -rs -q \
    --benchmark-json="$out/overhead_bench.json" 2>&1 | tee "$out/overhead_bench.log" | tail -n 5
check "engine overhead benchmark" "${PIPESTATUS[0]}" 25

echo "== training-loader benchmark (torch DataLoader; DALI where installed)"
timeout 20 python3 -m pytest benchmarks/test_loader_bench.py --benchmark-only -rs -q \
    --benchmark-json="$out/loader_bench.json" 2>&1 | tee "$out/loader_bench.log" | tail -n 5
check "training-loader benchmark" "${PIPESTATUS[0]}" 20
python3 -c "import nvidia.dali" 2>/dev/null \
    || could_not_run+=("DALI loader benchmark: DALI is not installed (nvidia.dali does not import); torch DataLoader only")
if ! python3 -c "import liger_kernel" 2>/dev/null; then
    could_not_run+=("Liger kd_loss provider: liger_kernel does not import (carry .whl/liger_kernel-*.whl, see above)")
fi

# The eager 1-GPU torchrun run is in the GPU test tier (compared with the plain run); the compiled one runs here.
echo "== 1-GPU torchrun smoke (DDP over NCCL: compiled steps with in-graph all-reduce)"
timeout 25 python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m fastkd.train --method spaced --compile \
    --dataset synthetic --epochs 1 --batch-size 64 --quiet --out "$out/torchrun-smoke-compile" 2>&1 \
    | tee "$out/torchrun-smoke-compile.log" | tail -n 3
check "1-GPU torchrun smoke (compiled)" "${PIPESTATUS[0]}" 25

echo "== tables"
for f in "$out/kd_loss_bench.json" "$out/kd_loss_linear_bench.json" "$out/step_bench.json" "$out/overhead_bench.json" "$out/loader_bench.json"; do
    [ -f "$f" ] && python3 benchmarks/report.py "$f" | tee -a "$out/tables.md"
done

# pytest's own skip reasons (-rs), from every log, e.g. "SKIPPED [1] tests/x.py:12: reason".
while IFS= read -r line; do
    could_not_run+=("skipped: ${line#SKIPPED }")
done < <(grep -h '^SKIPPED' "$out"/*.log 2>/dev/null)

echo "== could not run"
if [ ${#could_not_run[@]} -eq 0 ]; then
    echo "(nothing: every step ran to completion)"
else
    printf -- '- %s\n' "${could_not_run[@]}" | tee "$out/could_not_run.txt"
fi
exit $status
