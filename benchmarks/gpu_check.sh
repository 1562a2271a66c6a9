#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what each step does and its time limit):
#   OUT=dir bash benchmarks/gpu_check.sh [--rehearse] [--only STEP[,STEP]] [--from STEP]
# On the GPU machine, one device call of at most 600 s; the step limits add up to 540 s. --rehearse runs the same
# steps on a machine without a GPU (CI does). Results land in $OUT (the device tool's output folder) or
# /tmp/fastkd-gpu-check: steps.jsonl (one line per finished step) and summary.md (rewritten after every step).
#
# Liger-Kernel, the peer provider of the kd_loss benchmarks, comes from a wheel the device call carries (the machine
# has no network). Fetch it here first, kept out of git by .gitignore's /.whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# and name .whl in the call's carry. Without it the provider is missing and listed under "Could not run".
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/liger .whl/liger_kernel-*.whl \
        && export PYTHONPATH=/tmp/liger${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$python" benchmarks/gpu_check.py "$@"
