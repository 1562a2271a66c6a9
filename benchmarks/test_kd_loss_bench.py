"""kd_loss forward+backward against the plain torch reference, eager and under torch.compile.

Every case records its useful bytes (read s + read t + write ∂s) and, on CUDA, the peak memory beyond its inputs,
so that `python benchmarks/report.py results.json` can print bandwidth and ratios from one run.
Set FASTKD_BENCH_LARGE=1 on a GPU for the LLM-vocabulary shapes (16384 × 32000 and 16384 × 128256 in bf16).
FASTKD_BENCH_REHEARSE=1 (the GPU check's rehearsal) runs one small CPU shape: the plumbing, not the numbers.
On a GPU where Liger-Kernel imports, it is a provider too (benchmarks/gpu_check.sh installs it from a carried wheel).
"""
import os

import pytest
import torch

from fastkd.kernels.kd_loss import kd_loss, kd_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
T, ALPHA = 3.0, 0.3

if CUDA:
    SHAPES = [(128, 200, torch.float32), (1024, 1000, torch.float32), (4096, 32000, torch.bfloat16)]
    if os.environ.get("FASTKD_BENCH_LARGE") == "1":
        SHAPES += [(16384, 32000, torch.bfloat16), (16384, 128256, torch.bfloat16)]
elif os.environ.get("FASTKD_BENCH_REHEARSE") == "1":
    SHAPES = [(128, 200, torch.float32)]
else:
    # CPU sizes chosen so the whole file finishes in a few minutes on 2 cores.
    SHAPES = [(128, 200, torch.float32), (1024, 1000, torch.float32), (256, 32000, torch.float32)]

_compiled_reference = torch.compile(kd_loss_reference)
PROVIDERS = {
    "fastkd": lambda s, t, y: kd_loss(s, t, y, temperature=T, alpha=ALPHA),
    "torch_eager": lambda s, t, y: kd_loss_reference(s, t, y, temperature=T, alpha=ALPHA),
    "torch_compile": lambda s, t, y: _compiled_reference(s, t, y, temperature=T, alpha=ALPHA),
}


def _liger_provider():
    """What a Liger-Kernel user writes for the same loss: (1 − α)·LigerCrossEntropyLoss + α·T²·LigerKLDIVLoss on the
    log-softmaxes at T (batchmean: the mean over rows of the row KL). None where Liger or a GPU is missing."""
    if not CUDA:
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    ce, kl = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger(s, t, y):
        log_p_s = torch.log_softmax(s.float() / T, dim=1)
        log_p_t = torch.log_softmax(t.float() / T, dim=1)
        return (1 - ALPHA) * ce(s, y) + ALPHA * T * T * kl(log_p_s, log_p_t)

    return liger


if _liger_provider() is not None:
    PROVIDERS["liger"] = _liger_provider()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2]).split('.')[-1]}")
def test_kd_loss_forward_backward(benchmark, shape, provider):
    n, c, dtype = shape
    torch.manual_seed(0)
    s = (torch.randn(n, c, device=DEVICE) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, c, device=DEVICE) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=DEVICE)
    fn = PROVIDERS[provider]

    def step():
        s.grad = None
        fn(s, t, y).backward()
        _sync()

    # No skip on torch.OutOfMemoryError: running out of memory on the GPU is a finding, and fails the case.
    step()  # warm-up: compiles, autotunes
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    elem = s.element_size()
    benchmark.extra_info.update(useful_bytes=3 * n * c * elem, device=_device_name(), shape=f"{n}x{c}",
                                dtype=str(dtype).split(".")[-1], provider=provider)
    rounds = max(3, min(50, int(2e8 // (n * c))))
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)


def _device_name():
    return torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


# Issue #30: each divergence against forward KL on the same kernel, and torch.compile of the same formula (the
# reference, whose JSD goes through a logaddexp of the two log-softmaxes). The CPU bar: at most 1.5× forward KL's
# time at 1024 × 1000 and 256 × 32000.
# The rehearsal's one small shape otherwise, so that the GPU check's rehearsal runs these cases too.
DIVERGENCE_SHAPES = [shape for shape in SHAPES if shape[0] * shape[1] >= 1024 * 1000] or SHAPES[-1:]
DIVERGENCES = {"forward_kl": dict(divergence="forward_kl"), "reverse_kl": dict(divergence="reverse_kl"),
               "jsd": dict(divergence="jsd", jsd_beta=0.5)}
_compiled_divergence = torch.compile(kd_loss_reference)
DIVERGENCE_PROVIDERS = {
    "fastkd": lambda s, t, y, kw: kd_loss(s, t, y, temperature=T, alpha=ALPHA, **kw),
    "torch_compile": lambda s, t, y, kw: _compiled_divergence(s, t, y, temperature=T, alpha=ALPHA, **kw),
}


@pytest.mark.parametrize("provider", list(DIVERGENCE_PROVIDERS))
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
@pytest.mark.parametrize("shape", DIVERGENCE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2]).split('.')[-1]}")
def test_kd_loss_divergence_forward_backward(benchmark, shape, divergence, provider):
    n, c, dtype = shape
    torch.manual_seed(0)
    s = (torch.randn(n, c, device=DEVICE) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, c, device=DEVICE) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=DEVICE)
    fn, kw = DIVERGENCE_PROVIDERS[provider], DIVERGENCES[divergence]

    def step():
        s.grad = None
        fn(s, t, y, kw).backward()
        _sync()

    step()  # warm-up: compiles, autotunes
    benchmark.extra_info.update(useful_bytes=3 * n * c * s.element_size(), device=_device_name(), shape=f"{n}x{c}",
                                dtype=str(dtype).split(".")[-1], provider=f"{provider}:{divergence}")
    rounds = max(3, min(50, int(2e8 // (n * c))))
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
