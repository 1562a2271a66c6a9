"""The GPU tier: what only a CUDA machine can check. Every test is marked `gpu` and skipped, with its reason, where
no CUDA GPU is present; benchmarks/gpu_check.sh runs them first (`pytest -m gpu tests/ -rs`).

* The compiled Triton kernel, every autotune config of its streaming path, at LLM vocabulary sizes, against a
  float64 reference, with error bounds derived from the float32 arithmetic; and the public kd_loss (autotuned).
* A compiled, CUDA-graphed training step computes the eager step, and a changing lr never recompiles it.
* A 1-GPU torchrun run (DDP over NCCL) trains bit-identical weights to the plain run.
"""
import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastkd.config import Config
from fastkd.data.registry import load_synthetic
from fastkd.kernels import _kd_loss_triton as tk
from fastkd.kernels._kd_common import make_options
from fastkd.kernels._kd_launch import launch_kd_backward, launch_kd_kernel
from fastkd.kernels.kd_loss import kd_loss
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.step_functions import LossSettings, StepFunctions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")

# --------------------------------------------------------------------------------------------------------------------
# The fused KD kernel at vocabulary sizes: every streaming config, and the public op.
# --------------------------------------------------------------------------------------------------------------------

T, ALPHA, IGNORE = 3.0, 0.3, -100
N = 7
IGNORED_ROWS = [1, 4]
# One column past the single-block limit (the last block holds one column), a common vocabulary, Llama 3's.
CLASS_COUNTS = [tk.MAX_SINGLE_BLOCK + 1, 32000, 128256]
DTYPES = [torch.float32, torch.bfloat16]
STREAM_CONFIGS = list(tk.STREAM_CONFIGS)
# Masking this many leading classes makes the whole first block -inf for the narrowest config: the running max
# starts at -inf and must not turn into NaN.
MASKED_PREFIX = min(config.kwargs["BLOCK"] for config in STREAM_CONFIGS)

U32 = 2.0**-24  # float32 unit roundoff
# Relative rounding of a gradient stored in that dtype: the GPU rounds float32 to bfloat16 to nearest (8 significant
# bits, 2^-8); the interpreter truncates (2^-7), so these bounds hold for the compiled kernel only.
STORE_U = {torch.float32: U32, torch.bfloat16: 2.0**-8}
# Exponentials below float32's smallest normal (2^-126) may be flushed to zero: an absolute error far below this.
FLOOR = 2.0**-120


def config_id(config) -> str:
    return f"BLOCK{config.kwargs['BLOCK']}-warps{config.num_warps}"


def make_inputs(c: int, dtype: torch.dtype, with_target: bool, seed: int):
    """Logits of scale 4 (a peaked softmax at T=1), the masked prefix and 16 scattered classes -inf in both
    (vocabulary padding), and targets on unmasked classes with IGNORED_ROWS set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, c, generator=g, dtype=torch.float64) * 4
    t = torch.randn(N, c, generator=g, dtype=torch.float64) * 4
    masked = torch.zeros(c, dtype=torch.bool)
    masked[:MASKED_PREFIX] = True
    masked[torch.randperm(c, generator=g)[:16]] = True
    s[:, masked] = -math.inf
    t[:, masked] = -math.inf
    y = None
    if with_target:
        allowed = (~masked).nonzero().squeeze(1)
        y = allowed[torch.randint(len(allowed), (N,), generator=g)]
        y[IGNORED_ROWS] = IGNORE
        y = y.to(CUDA)
    return s.to(dtype).to(CUDA), t.to(dtype).to(CUDA), y, masked.to(CUDA)


@dataclass
class Reference:
    rows: torch.Tensor  # (N,) float64 losses
    grad: torch.Tensor  # (N, C) float64 ∂(Σ w·rows)/∂s
    terms: torch.Tensor  # (N, C) magnitude of the probability terms each gradient element is made of, times w
    spread: torch.Tensor  # (N,) Σ p_t·|t − s|/T: the magnitude of the terms of the KL numerator
    keep: torch.Tensor  # (N,) rows that count


def reference(s, t, y, weights=None) -> Reference:
    """Per-row loss and gradient in float64 by autograd through the textbook formula (as in test_kd_loss)."""
    n, c = s.shape
    w = torch.ones(n, dtype=torch.float64, device=s.device) if weights is None else weights.double()
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double()
    log_p_s = F.log_softmax(s64 / T, 1)
    log_p_t = F.log_softmax(t64 / T, 1)
    p_t = log_p_t.exp()
    rows = ALPHA * T**2 * torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(1)
    keep = torch.ones(n, dtype=torch.bool, device=s.device)
    p_1 = onehot = torch.zeros_like(t64)
    if y is not None:
        keep = y != IGNORE
        safe_y = torch.where(keep, y, 0)
        log_p = F.log_softmax(s64, 1)
        ce = -log_p.gather(1, safe_y[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - ALPHA) * ce, 0.0)
        p_1, onehot = log_p.detach().exp(), F.one_hot(safe_y, c).double()
    (rows * w).sum().backward()
    with torch.no_grad():
        p_s = log_p_s.exp()
        terms = ALPHA * T * (p_s + p_t) + (1 - ALPHA) * (p_1 + onehot)
        terms = torch.where(keep[:, None], terms, 0.0) * w[:, None]
        spread = torch.where(p_t > 0, p_t * (t64 - s64).abs() / T, 0.0).sum(1)
    return Reference(rows.detach(), s64.grad, terms, spread, keep)


def relative_error(c: int, block: int, big: float) -> float:
    """Worst-case relative error of the kernel's float32 sums of exponentials, and of each probability it forms.

    A sum adds ceil(C/BLOCK) block partials in sequence, each rescaled once by exp(m_old − m_new) and each a tree
    of log2(BLOCK) additions: ≤ (2·ceil(C/BLOCK) + log2 BLOCK)·u. Each exponential's argument x/T − m (|x/T|, |m|
    ≤ big) picks up ≤ 8·big·u from rounding x·(1/T), the subtraction and the scaling by log2(e) inside exp; the
    fast exp2/log2 add a few u, and log(sum) ≤ 4·ln(C)·u more (counted once for all: 4·ln C + 8). This is a bound
    for errors that all have one sign; rounding errors of random sign come out far smaller.
    """
    return U32 * (2 * math.ceil(c / block) + math.log2(block) + 8 * big + 4 * math.log(c) + 8)


def largest_logit(s, t) -> float:
    finite = torch.cat([s[torch.isfinite(s)], t[torch.isfinite(t)]]).abs()
    return float(finite.max()) * max(1.0, 1.0 / T)  # the CE's softmax runs at temperature 1


def assert_rows_close(rows, ref: Reference, e: float, with_target: bool):
    # KL = a/d_t − (m_t − m_s) − log d_t + log d_s: both logs off by ≤ e, and the numerator a (terms of total
    # magnitude `spread`) and its divisor d_t by ≤ e relative each. CE = lse_1 − s_y: ≤ 2e. Then a few roundings.
    bound = ALPHA * T**2 * e * (2 + 2 * ref.spread) + (2 * e * (1 - ALPHA) if with_target else 0.0)
    bound = bound + 4 * U32 * ref.rows.abs()
    err = (rows.double() - ref.rows).abs()
    assert torch.all(err <= bound), f"row errors {err.tolist()} exceed bounds {bound.tolist()}"


def assert_grad_close(grad, ref: Reference, e: float, store_u: float, roundings: int):
    # Each element is a weighted sum of probabilities, each off by ≤ e relative (the terms' magnitude is known
    # from the reference), then stored `roundings` times in the gradient's dtype (kernel, then the backward's
    # per-row scaling for the public op).
    growth = (1 + store_u) ** roundings
    bound = e * ref.terms * growth + (growth - 1) * ref.grad.abs() + FLOOR
    err = (grad.double() - ref.grad).abs()
    worst = int((err - bound).argmax())
    assert torch.all(err <= bound), (f"gradient error {err.flatten()[worst]:.3g} at flat index {worst} exceeds its "
                                     f"bound {bound.flatten()[worst]:.3g} (reference {ref.grad.flatten()[worst]:.3g})")


class OneConfig:
    """Stands in for an autotuned streaming kernel: the launcher builds its argument list as always, and the plain
    kernel runs with one config's meta-parameters, as the autotuner would launch it."""

    def __init__(self, kernel, config):
        self.kernel, self.config, self.launches = kernel, config, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            return self.kernel[grid](*args, **meta, **self.config.all_kwargs())
        return launch


@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("config", STREAM_CONFIGS, ids=config_id)
def test_every_streaming_config_writes_reference_loss_and_gradient_over_poisoned_outputs(
        monkeypatch, config, c, dtype, with_target):
    assert not tk.INTERPRETED, "TRITON_INTERPRET=1 is set: this tier checks the compiled kernel"
    assert c > tk.MAX_SINGLE_BLOCK
    s, t, y, masked = make_inputs(c, dtype, with_target, seed=c + 2 * DTYPES.index(dtype) + with_target)
    rows = torch.full((N,), math.nan, device=CUDA)
    grad = torch.full((N, c), math.nan, dtype=dtype, device=CUDA)
    ref = reference(s, t, y)
    e = relative_error(c, config.kwargs["BLOCK"], largest_logit(s, t))
    forward = OneConfig(tk.kd_loss_fwd_kernel, config)
    backward = OneConfig(tk.kd_loss_bwd_kernel, config)
    monkeypatch.setattr(tk, "kd_loss_fwd_stream_kernel", forward)
    monkeypatch.setattr(tk, "kd_loss_bwd_stream_kernel", backward)
    # the engine's path: loss and gradient in the forward
    launch_kd_kernel(s, t, y, make_options(CUDA, T, ALPHA, IGNORE), rows, grad)
    assert forward.launches == 1
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), "an output element was never written"
    assert_rows_close(rows, ref, e, with_target)
    assert_grad_close(grad, ref, e, STORE_U[dtype], roundings=1)
    # The generic path's pair: the forward's statistics, then the backward kernel (incoming gradient of 1 a row).
    stats = torch.full((N, tk.STATS_PER_ROW), math.nan, device=CUDA)
    launch_kd_kernel(s, t, y, make_options(CUDA, T, ALPHA, IGNORE), rows, stats=stats)
    assert_rows_close(rows, ref, e, with_target)
    recomputed = torch.full((N, c), math.nan, dtype=dtype, device=CUDA)
    launch_kd_backward(s, t, y, stats, torch.ones(N, device=CUDA), make_options(CUDA, T, ALPHA, IGNORE), recomputed)
    assert backward.launches == 1 and torch.isfinite(recomputed).all()
    assert_grad_close(recomputed, ref, e, STORE_U[dtype], roundings=1)
    # Exact zeros where nothing contributes: masked classes, and the rows whose target is ignored.
    assert torch.all(grad[:, masked] == 0) and torch.all(recomputed[:, masked] == 0)
    if with_target:
        assert torch.all(rows[IGNORED_ROWS] == 0) and torch.all(grad[IGNORED_ROWS] == 0)


@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_public_kd_loss_autotuned_forward_and_backward_match_float64_reference(c, dtype, with_target):
    s, t, y, masked = make_inputs(c, dtype, with_target, seed=7 * c + 2 * DTYPES.index(dtype) + with_target)
    weights = torch.linspace(0.5, 2.0, N, device=CUDA)  # a grad_output that is not all ones
    s_in = s.clone().requires_grad_()
    rows = kd_loss(s_in, t, y, temperature=T, alpha=ALPHA, ignore_index=IGNORE, reduction="none")
    (rows * weights).sum().backward()
    assert rows.dtype == torch.float32 and s_in.grad.dtype == dtype
    ref = reference(s, t, y, weights)
    # The autotuner may pick any config: the bound of the one that adds the most block partials.
    e = max(relative_error(c, config.kwargs["BLOCK"], largest_logit(s, t)) for config in STREAM_CONFIGS)
    assert_rows_close(rows.detach(), ref, e, with_target)
    assert_grad_close(s_in.grad, ref, e, STORE_U[dtype], roundings=2)
    assert torch.all(s_in.grad[:, masked] == 0)


# --------------------------------------------------------------------------------------------------------------------
# The compiled, CUDA-graphed training step against the eager step.
# --------------------------------------------------------------------------------------------------------------------

CFG = Config()
KINDS = ("ce", "replay")  # the spaced method's two steps: the teacher advancing, the student replaying


def spaced_roles(device):
    """(teacher, its optimizer, student, its optimizer) built as the engine builds them, and the synthetic batches."""
    data = load_synthetic()
    torch.manual_seed(CFG.seed)
    roles = []
    for _ in range(2):
        model = build_model("tiny", data.info).to(device)
        optimizer = make_sgd(model, CFG.lr, CFG.momentum, CFG.weight_decay)
        init_momentum(optimizer)
        roles += [model, optimizer]
    batches = [(data.train_x[i:i + 64].to(device), data.train_y[i:i + 64].to(device))
               for i in range(0, len(data.train_y) - 63, 64)]
    return tuple(roles), batches


def run_step(fns, kind, roles, batch):
    """One step as the engine runs it; outputs copied out of the CUDA graph's memory at once."""
    teacher, t_opt, student, s_opt = roles
    x, y = batch
    if kind == "ce":
        loss, _, logits, _ = fns("ce", teacher, t_opt, x, y)
        return loss.clone(), logits.clone()
    teacher.eval()  # replay targets from the teacher in eval mode (the engine's default)
    loss, _ = fns("replay", student, teacher, s_opt, x, y)
    teacher.train()
    return loss.clone(), None


def momentum_buffers(optimizer):
    return [optimizer.state[p]["momentum_buffer"] for group in optimizer.param_groups for p in group["params"]]


def copy_state_in_place(dst_roles, src_roles):
    """src's weights, buffers and momentum into dst's own tensors: the addresses a CUDA graph reads stay valid."""
    with torch.no_grad():
        for dst, src in zip(dst_roles[::2], src_roles[::2]):
            for a, b in zip(dst.state_dict().values(), src.state_dict().values()):
                a.copy_(b)
        for dst, src in zip(dst_roles[1::2], src_roles[1::2]):
            for a, b in zip(momentum_buffers(dst), momentum_buffers(src)):
                a.copy_(b)


# float32 throughout (TF32 convolutions off, below), so compiled and eager differ only in the order of float32
# operations: Inductor fuses and reorders reductions and may run the convolutions channels-last. The longest sums
# are a convolution's weight gradient and BatchNorm's statistics over the batch, K = 64·8·8 = 4096 terms: a new
# order moves them by ≤ K·u ≈ 2.4e-4 of their terms' magnitude if every rounding had one sign, and by ~√K·u ≈
# 4e-6 of it for roundings of random sign, as they are; the first convolution's weight gradient cancels the most
# (Inductor on CPU, this test: ≤ 1.5e-5 of that tensor's scale). One step passes this on to the update, the
# momentum buffer and the BatchNorm statistics without amplifying it. 1e-4 of each tensor's scale leaves a
# margin of several times that, and lies far below what a wrong lr, momentum or loss term would change.
STEP_RTOL = 1e-4


def assert_close_on_scale(name, compiled, eager, rounding=0.0):
    scale = eager.abs().max().item()
    err = (compiled - eager).abs().max().item()
    assert err <= STEP_RTOL * scale + rounding, f"{name}: compiled differs by {err:.3g} on a scale of {scale:.3g}"


def assert_same_step(kind, before, compiled, eager):
    """The trained network's update, buffers and momentum after one step, compiled vs eager, from `before`."""
    index = 0 if kind == "ce" else 2  # the teacher advances; the student replays
    model_before, model_c, model_e = before[index], compiled[index], eager[index]
    for (key, b), c, e in zip(model_before.state_dict().items(), model_c.state_dict().values(),
                              model_e.state_dict().values()):
        if not b.dtype.is_floating_point:
            assert torch.equal(c, e), f"{kind} {key}"  # num_batches_tracked
            continue
        # The update itself (weights move by lr·buffer, small next to the weights), plus the rounding of storing
        # the new value next to an old one of magnitude |b|: u·|b| on each side.
        assert_close_on_scale(f"{kind} {key} update", c - b, e - b, rounding=2 * U32 * b.abs().max().item())
    for i, (c, e) in enumerate(zip(momentum_buffers(compiled[index + 1]), momentum_buffers(eager[index + 1]))):
        assert_close_on_scale(f"{kind} momentum buffer {i}", c, e)


@pytest.fixture
def float32_convolutions(monkeypatch):
    # TF32 convolutions (cuDNN's default) round their inputs to 10 mantissa bits inside algorithms that may differ
    # between the eager and the compiled layout: that would swamp the comparison with ~1e-3 noise.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_an_eager_kd_loss_without_a_target_never_syncs_the_host(divergence):
    """Eager kd_loss forward and backward with float options (their scalars copied to the device each call) under
    CUDA's sync debug mode: any host sync is an error. (With a target, the eager call reads its range once: a sync
    by design, skipped while compiling or capturing.)"""
    s = torch.randn(64, 32000, device=CUDA, requires_grad=True)
    t = torch.randn(64, 32000, device=CUDA)
    kd_loss(s, t, temperature=2.0, divergence=divergence, jsd_beta=0.3).backward()  # warm-up: compiles, autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for temperature in (1.5, 2.5, 4.0):
            kd_loss(s, t, temperature=temperature, divergence=divergence, jsd_beta=0.3).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad).all()


def test_kd_loss_linear_is_captured_in_a_cuda_graph_and_replays_the_eager_result():
    """Fused linear + KD at an LLM vocabulary, bf16, forward and backward captured in one CUDA graph: no host sync
    anywhere in the chunk loop (capture fails on one), and each replay reproduces the eager gradients."""
    from fastkd.kernels.kd_loss import kd_loss_linear

    g = torch.Generator(device=CUDA).manual_seed(0)
    n, hidden, vocabulary = 1024, 256, 128256
    h = torch.randn(n, hidden, device=CUDA, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocabulary, hidden, device=CUDA, generator=g) * 0.1).bfloat16().requires_grad_()
    th = torch.randn(n, hidden, device=CUDA, generator=g).bfloat16()
    tw = (torch.randn(vocabulary, hidden, device=CUDA, generator=g) * 0.1).bfloat16()
    y = torch.randint(0, vocabulary, (n,), device=CUDA, generator=g)
    y[::7] = IGNORE

    def step():
        h.grad = w.grad = None
        loss = kd_loss_linear(h, w, y, teacher_hidden=th, teacher_weight=tw, temperature=1.0, alpha=0.5,
                              chunk_size=384)  # three chunks, the last one partial
        loss.backward()
        return loss.detach()

    eager_loss = step()
    eager = (h.grad.clone(), w.grad.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    h.grad = w.grad = None
    with torch.cuda.graph(graph):
        loss = kd_loss_linear(h, w, y, teacher_hidden=th, teacher_weight=tw, temperature=1.0, alpha=0.5,
                              chunk_size=384)
        loss.backward()
    for _ in range(2):
        h.grad.zero_(), w.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, eager_loss)  # the same kernels on the same data: bit for bit
        assert torch.equal(h.grad, eager[0]) and torch.equal(w.grad, eager[1])


def test_compiled_cuda_graph_step_matches_eager_step_and_never_recompiles(float32_convolutions):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    skips_before = counters["inductor"]["cudagraph_skips"]
    settings = LossSettings(CFG.temperature, CFG.alpha, CFG.beta)
    eager_fns = StepFunctions(settings, compile=False, device=CUDA)
    compiled_fns = StepFunctions(settings, compile=True, device=CUDA)
    assert compiled_fns.cuda_graphs
    base, batches = spaced_roles(CUDA)
    for kind in KINDS:  # one eager step of each, so that the momentum buffers are not zero
        run_step(eager_fns, kind, base, batches[0])
    compiled = copy.deepcopy(base)  # models and optimizers together: the optimizers hold the copies' parameters
    assert compiled[1].param_groups[0]["params"][0] is next(compiled[0].parameters())
    # Cudagraph trees run a function once to warm up, record it on the second call and replay it from the third:
    # three steps first, so that the compared step is a replay.
    for i in range(3):
        for kind in KINDS:
            run_step(compiled_fns, kind, compiled, batches[i % len(batches)])

    lr = 0.5 * CFG.lr
    for kind in KINDS:
        copy_state_in_place(compiled, base)
        eager = copy.deepcopy(base)
        for roles in (compiled, eager):
            set_lr(roles[1], lr)
            set_lr(roles[3], lr)
        loss_c, logits_c = run_step(compiled_fns, kind, compiled, batches[1])
        loss_e, logits_e = run_step(eager_fns, kind, eager, batches[1])
        assert abs(loss_c.item() - loss_e.item()) <= STEP_RTOL * abs(loss_e.item()), (kind, loss_c, loss_e)
        if logits_e is not None:
            assert_close_on_scale(f"{kind} logits", logits_c, logits_e)
        assert_same_step(kind, base, compiled, eager)

    # 50 more rounds with the lr written into its device tensor before every step: any recompile is an error.
    losses = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(50):
            lr = 0.5 * CFG.lr * (1.0 + math.cos(math.pi * i / 50))
            set_lr(compiled[1], lr)
            set_lr(compiled[3], lr)
            for kind in KINDS:
                losses.append(run_step(compiled_fns, kind, compiled, batches[i % len(batches)])[0])
    assert torch.isfinite(torch.stack(losses)).all()
    skipped = counters["inductor"]["cudagraph_skips"] - skips_before
    assert skipped == 0, (f"Inductor skipped CUDA graphs {skipped} time(s): the steps ran compiled but not graphed "
                          f"(TORCH_LOGS=perf_hints shows why)")


# --------------------------------------------------------------------------------------------------------------------
# torchrun with one GPU against the plain run.
# --------------------------------------------------------------------------------------------------------------------

# Both runs go through this launcher, which only asks cuDNN for deterministic convolution algorithms before
# running `python -m fastkd.train`'s main. Without it two plain runs may already differ in the last bits (some
# backward algorithms accumulate with atomics), and bit-equality below could not be asked for.
LAUNCHER = """import sys
import torch
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
from fastkd.train import main
sys.exit(main(sys.argv[1:]))
"""
RUN = ["--method", "spaced", "--dataset", "synthetic", "--teacher", "tiny", "--student", "tiny", "--epochs", "1",
       "--batch-size", "64", "--device", "cuda", "--quiet"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_gpu_torchrun_trains_bit_identical_weights_to_the_plain_run(tmp_path):
    # Why bit-identical: with one rank, DDP copies each gradient into a bucket, all-reduces it over NCCL (a sum
    # over one rank: a copy), divides it by the world size 1 (exact) and copies it back. Batches, crops and flips
    # come from the global batch identity, the same in both runs; BatchNorm buffers are broadcast from rank 0,
    # itself; the running losses are summed over one rank and divided by 1. Every float operation is the same.
    launcher = tmp_path / "train_deterministic.py"
    launcher.write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    commands = {
        "plain": [sys.executable, str(launcher), *RUN, "--out", str(tmp_path / "plain")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                     str(launcher), *RUN, "--out", str(tmp_path / "torchrun")],
    }
    for name, command in commands.items():
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name} run failed:\n{proc.stderr[-3000:]}"
    plain, ddp = records(tmp_path / "plain"), records(tmp_path / "torchrun")
    assert ddp[-1]["summary"]["ranks"] == 1 and "ranks" not in plain[-1]["summary"]  # DDP really ran
    for key in ("train_loss", "teacher_top1", "student_top1"):
        assert [r.get(key) for r in ddp[:-1]] == [r.get(key) for r in plain[:-1]], key
    for net in ("teacher", "student"):
        a = torch.load(tmp_path / "torchrun" / f"{net}.pt", weights_only=True)
        b = torch.load(tmp_path / "plain" / f"{net}.pt", weights_only=True)
        assert a.keys() == b.keys(), net
        differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in b if not torch.equal(a[k], b[k])}
        assert not differ, f"{net}: tensors differ (largest absolute difference each): {differ}"


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into the optimizer's device lr tensors, as the engine's LrSchedule does inside a step."""
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)
