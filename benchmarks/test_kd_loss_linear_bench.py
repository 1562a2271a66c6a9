"""Vocabulary-scale distillation, forward + backward: kd_loss_linear (chunked, logits never materialised) against
kd_loss on materialised logits and the plain torch reference, each in one run. The teacher is given as hidden
states and weight; the student gets gradients for its hidden states and weight.

Every case records the peak memory beyond its inputs: on CUDA from the allocator, on CPU as the peak resident set
of a fresh process that runs one warm call (`python benchmarks/test_kd_loss_linear_bench.py PROVIDER N H V`).
CPU runs an eighth of the issue's shape by default (N = 1024, H = 512, V = 32000, ~1.5 s a call on 2 cores);
FASTKD_BENCH_LARGE=1 runs N = 8192 (BENCHMARKS.md's figures), FASTKD_BENCH_REHEARSE=1 (the GPU check's rehearsal)
N × H × V = 64 × 32 × 1000. The GPU shape is N = 8192, H = 4096, V = 128256 in
bf16, with Liger-Kernel's chunked fused-linear distillation loss beside it when it imports (same objective there:
forward KL, T = 1, α = 0.5).
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from fastkd.kernels.kd_loss import kd_loss, kd_loss_linear, kd_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LARGE = os.environ.get("FASTKD_BENCH_LARGE") == "1"
if CUDA:
    SHAPE, DTYPE, T, ALPHA = (8192, 4096, 128256), torch.bfloat16, 1.0, 0.5
elif os.environ.get("FASTKD_BENCH_REHEARSE") == "1":
    SHAPE, DTYPE, T, ALPHA = (64, 32, 1000), torch.float32, 3.0, 0.3
else:
    SHAPE, DTYPE, T, ALPHA = ((8192 if LARGE else 1024), 512, 32000), torch.float32, 3.0, 0.3


def _materialised(loss_fn):
    def run(h, w, th, tw, y):
        logits = h @ w.T
        with torch.no_grad():
            teacher_logits = th @ tw.T
        return loss_fn(logits, teacher_logits, y, temperature=T, alpha=ALPHA)
    return run


def _liger():
    """Liger-Kernel's chunked fused-linear distillation loss at the same objective, or None where it is missing."""
    if not CUDA or T != 1.0:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    # beta = 0 is its forward KL; hard and soft weights 1 − α and α.
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=0.0, temperature=T)
    takes_bias = "student_bias" in inspect.signature(loss.forward).parameters
    return lambda h, w, th, tw, y: loss(h, w, th, tw, y, None, None) if takes_bias else loss(h, w, th, tw, y)


PROVIDERS = {
    "fastkd_linear": lambda h, w, th, tw, y: kd_loss_linear(h, w, y, teacher_hidden=th, teacher_weight=tw,
                                                            temperature=T, alpha=ALPHA),
    "fastkd_materialised": _materialised(kd_loss),
    "torch_reference": _materialised(kd_loss_reference),
}
if _liger() is not None:
    PROVIDERS["liger"] = _liger()


def make_inputs(n, hidden, vocabulary):
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device=DEVICE).to(DTYPE).requires_grad_()
    w = (torch.randn(vocabulary, hidden, device=DEVICE) * hidden**-0.5 * 3).to(DTYPE).requires_grad_()
    th = torch.randn(n, hidden, device=DEVICE).to(DTYPE)
    tw = (torch.randn(vocabulary, hidden, device=DEVICE) * hidden**-0.5 * 3).to(DTYPE)
    return h, w, th, tw, torch.randint(0, vocabulary, (n,), device=DEVICE)


def make_step(provider, inputs):
    h, w = inputs[:2]
    fn = PROVIDERS[provider]

    def step():
        h.grad = w.grad = None
        fn(*inputs).backward()
        if CUDA:
            torch.cuda.synchronize()

    return step


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0])


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def measure_cpu_peak(provider: str, n: int, hidden: int, vocabulary: int) -> int:
    """This process: one warm call, then the peak resident bytes of a second one beyond what was resident before."""
    step = make_step(provider, make_inputs(n, hidden, vocabulary))
    step()  # loads the CPU kernel and warms the allocator; its memory is freed again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _rss_kib()
    step()
    return (_peak_rss_kib() - before) * 1024


def _peak_extra_bytes(provider, step):
    if CUDA:
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, __file__, provider, *map(str, SHAPE)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kd_loss_linear_forward_backward(benchmark, provider):
    n, hidden, vocabulary = SHAPE
    step = make_step(provider, make_inputs(n, hidden, vocabulary))
    peak = _peak_extra_bytes(provider, step)  # an out-of-memory error fails the case: a finding, not a skip
    benchmark.extra_info.update(linear_provider=provider, shape=f"{n}x{hidden}x{vocabulary}",
                                dtype=str(DTYPE).split(".")[-1], peak_extra_bytes=peak,
                                device=torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)")
    benchmark.pedantic(step, rounds=3 if not CUDA else 10, warmup_rounds=1)


if __name__ == "__main__":
    provider, *shape = sys.argv[1:]
    print(json.dumps({"peak_extra_bytes": measure_cpu_peak(provider, *map(int, shape))}))
