"""Changing the float options (temperature, alpha, jsd_beta, softcap) never recompiles a torch.compile(fullgraph=True)
caller (issue #30): the ops take them as one float64 tensor of scalars that the kernels read at run time.

Twenty values of each, every call compiled and compared with the eager loss and gradient (float64, rtol 1e-12):
* 0-d tensors: exactly one compile;
* Python floats with dynamic=True: one compile;
* Python floats by default: at most two (Dynamo specialises a float on the first call and makes it symbolic once
  it changes).
Compiles are Dynamo's unique graphs (counters["stats"]["unique_graphs"]: a cache entry each; the analysis that
Dynamo restarts once within a first compile, for a 0-d CPU float64 tensor input, is not one), under aot_eager (the
ops' fakes and autograd are traced, no code generated), for kd_loss (the native CPU kernel, the torch reference
and, in the Triton interpreter, the Triton kernels), kd_loss_linear and kd_loss_sparse; one case runs the default
inductor backend on the native kernel.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from fastkd.kernels import _kd_loss_triton as tk
from fastkd.kernels.kd_loss import kd_loss, kd_loss_linear, kd_loss_sparse

VALUES = 20
N, C, H, K = 4, 13, 5, 4


def values(i: int, beta_below_one: bool = False) -> dict:
    # β runs over [0, 1], both ends included: there JSD is forward and reverse KL, chosen at run time. (A top-k
    # teacher given as logits refuses β = 1, reverse KL: it stops short of it.)
    beta = i / VALUES if beta_below_one else i / (VALUES - 1)
    return dict(temperature=0.5 + 0.15 * i, alpha=0.05 + 0.045 * i, jsd_beta=beta, softcap=1.0 + 0.5 * i)


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = dict(s=torch.randn(N, C, generator=g, dtype=torch.float64) * 3,
             t=torch.randn(N, C, generator=g, dtype=torch.float64) * 3,
             y=torch.randint(0, C, (N,), generator=g),
             h=torch.randn(N, H, generator=g, dtype=torch.float64),
             w=torch.randn(C, H, generator=g, dtype=torch.float64))
    top = d["t"].topk(K, 1)
    d["topk"] = (top.values, top.indices)
    return d


# name -> (the loss of (differentiable input, the other inputs, the options), which options it takes)
CASES = {
    "kd_loss-native": (lambda x, d, o: kd_loss(x, d["t"], d["y"], divergence="jsd", backend="native",
                                               **o), ("temperature", "alpha", "jsd_beta", "softcap")),
    "kd_loss-torch": (lambda x, d, o: kd_loss(x, d["t"], d["y"], divergence="jsd", backend="torch",
                                              **o), ("temperature", "alpha", "jsd_beta", "softcap")),
    "kd_loss_linear": (lambda x, d, o: kd_loss_linear(x, d["w"], d["y"], teacher_logits=d["t"],
                                                      divergence="jsd", chunk_size=3, **o),
                       ("temperature", "alpha", "jsd_beta", "softcap")),
    "kd_loss_sparse-kernel": (lambda x, d, o: kd_loss_sparse(x, *d["topk"], d["y"], chunk_size=3, **o),
                              ("temperature", "alpha")),
    "kd_loss_sparse-jsd": (lambda x, d, o: kd_loss_sparse(x, *d["topk"], d["y"], divergence="jsd",
                                                          chunk_size=3, **o), ("temperature", "alpha", "jsd_beta")),
}
# Run only in the Triton interpreter (its own test below).
TRITON_CASE = (lambda x, d, o: kd_loss(x, d["t"], d["y"], divergence="jsd", backend="triton", **o),
               ("temperature", "alpha", "jsd_beta", "softcap"))
MODES = {"tensors": 1, "dynamic": 1, "floats": 2}  # the most compiles each may take


def differentiable(name: str, d: dict) -> torch.Tensor:
    return (d["h"] if name == "kd_loss_linear" else d["s"]).clone().requires_grad_()


def options(i: int, name: str, names, as_tensors: bool) -> dict:
    chosen = {k: v for k, v in values(i, name.startswith("kd_loss_sparse")).items() if k in names}
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in chosen.items()} if as_tensors else chosen


def run(name: str, mode: str, backend: str = "aot_eager") -> int:
    """Compiles made over the twenty values, each compiled loss and gradient checked against the eager ones."""
    loss_of, names = TRITON_CASE if name == "kd_loss-triton" else CASES[name]
    d = inputs()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda x, o: loss_of(x, d, o), backend=backend, fullgraph=True,
                             dynamic=True if mode == "dynamic" else None)
    for i in range(VALUES):
        x, x_eager = differentiable(name, d), differentiable(name, d)
        loss = compiled(x, options(i, name, names, mode == "tensors"))
        loss.backward()
        expected = loss_of(x_eager, d, options(i, name, names, False))
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0, msg=f"{name} {mode} value {i}")
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-12, atol=1e-15, msg=f"{name} {mode} value {i}")
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_twenty_values_compile_once(name, mode):
    compiles = run(name, mode)
    if mode == "floats":
        assert 1 <= compiles <= MODES[mode], compiles
    else:
        assert compiles == MODES[mode], compiles


@pytest.mark.skipif(not tk.INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", ["tensors", "floats"])
def test_twenty_values_compile_once_on_the_triton_kernels(mode):
    """backend="triton" in the interpreter: the compiled caller stays at one graph (that the kernels stay at one
    variant is test_kd_loss_divergences.py's test_triton_launches_for_twenty_values_share_one_compiled_variant)."""
    compiles = run("kd_loss-triton", mode)
    assert compiles == 1 if mode == "tensors" else 1 <= compiles <= MODES[mode], compiles


def test_the_inductor_backend_on_the_native_kernel_compiles_once_for_tensor_options():
    assert run("kd_loss-native", "tensors", backend="inductor") == 1


def test_tensor_options_are_checked_for_shape_dtype_and_device_only():
    d = inputs()
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(d["s"], d["t"], temperature=torch.ones(2))
    with pytest.raises(ValueError, match="jsd_beta"):
        kd_loss(d["s"], d["t"], divergence="jsd", jsd_beta=torch.tensor(1))
    with pytest.raises(ValueError, match="softcap"):
        kd_loss(d["s"], d["t"], softcap=torch.tensor(2.0, device="meta"))
    # A value out of range in a tensor is not read (that would be a host sync): the caller's responsibility.
    assert torch.isnan(kd_loss(d["s"], d["t"], temperature=torch.tensor(float("nan")))).item()
