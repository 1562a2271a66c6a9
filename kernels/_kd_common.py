"""What every kd_loss entry point shares, below all of them: the named options, the argument checks, the reduction
and the plain-torch reference. It imports nothing else of fastkd.kernels and never Triton."""
import dataclasses
import importlib.util
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
# "auto": Triton on CUDA, the native kernel on the CPU (plain torch, with a warning, where no C++ compiler is found);
# "native": the native CPU kernel or an error; "triton": the Triton kernels (CPU tensors under TRITON_INTERPRET=1);
# "torch": plain autograd through the reference.
BACKENDS = ("auto", "native", "triton", "torch")

# The Triton interpreter runs the kernels on CPU tensors (tests); it must be switched on before Triton is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# What the dense forward op makes besides the loss (its `gradient` field).
LOSS_ONLY = "loss_only"  # nothing: no gradient is needed
STATS = "stats"  # per-row log-sum-exps for the Triton backward kernel (the generic autograd path)
GRAD = "grad"  # the gradient of the reduced loss (of each row for "none"), times the incoming gradient in the backward
FUSED = "fused"  # the gradient already scaled by the reduction, returned as it is by the backward (fused_backward)
STATS_PER_ROW = 3  # lse(s/T), lse(t/T), lse(s): the Triton backward kernel's inputs (forward KL)
# With p = softmax(s/T), q = softmax(t/T): KL(q ‖ p), KL(p ‖ q), and β·KL(q ‖ m) + (1 − β)·KL(p ‖ m) with
# m = β·q + (1 − β)·p, β = jsd_beta; β = 0 is forward KL and β = 1 reverse KL (the convention TRL and Liger share:
# the formula itself is 0 at both ends). The order is the kernels' DIVERGENCE code.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def stats_per_row(divergence: str) -> int:
    """The Triton backward's statistics a row: reverse KL adds E_p[(s − t)/T], JSD that (or KL(p ‖ m)) and the gap
    lse(t/T) − lse(s/T)."""
    return STATS_PER_ROW + DIVERGENCES.index(divergence)


# The float options, in the order of KDOptions.scalars (the kernels read them by this index).
SCALARS = ("temperature", "alpha", "jsd_beta", "softcap")


@dataclasses.dataclass(frozen=True, eq=False)
class KDOptions:
    """The loss's named options. The float ones (SCALARS) travel as one float64 tensor `scalars` on the logits'
    device, which every op takes as a tensor argument and every kernel reads at run time: a new temperature, α, β or
    cap is a new value in it, never a new compile (of the caller under torch.compile, or of a Triton kernel). The
    others select code and are keyword fields of the ops' schemas (OPTIONS_SCHEMA is made from them): ignore_index,
    the divergence, and whether the logits are soft-capped (chosen by softcap being None or not, never by its
    value)."""
    scalars: Tensor  # (4,) float64: temperature, alpha, jsd_beta, softcap (1.0 when not capped)
    ignore_index: int
    divergence: str = "forward_kl"
    softcapped: bool = False  # c·tanh(z/c) on both logits before the temperature, c = softcap

    @property
    def temperature(self) -> Tensor:
        return self.scalars[0]

    @property
    def alpha(self) -> Tensor:
        return self.scalars[1]

    @property
    def jsd_beta(self) -> Tensor:
        return self.scalars[2]

    @property
    def softcap(self) -> Optional[Tensor]:
        """The cap c as a 0-d tensor, or None when off."""
        return self.scalars[3] if self.softcapped else None

    def fields(self) -> dict:
        """The schema's keyword fields (the scalars go as a tensor argument of their own)."""
        # Not dataclasses.asdict: torch 2.11's Dynamo cannot trace it (its deep copy), and kd_loss calls this while
        # being compiled.
        return {name: getattr(self, name) for name in _FIELD_NAMES}


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(KDOptions) if field.name != "scalars")
_SCHEMA_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}


def _schema_field(field) -> str:
    # A field with a default (the options added after the first) keeps it in the schema, so that a call naming only
    # ignore_index still runs forward KL without a soft cap.
    text = f"{_SCHEMA_TYPES[field.type]} {field.name}"
    if field.default is dataclasses.MISSING:
        return text
    return text + (f'="{field.default}"' if isinstance(field.default, str) else f"={field.default!r}")


OPTIONS_SCHEMA = ", ".join(_schema_field(f) for f in dataclasses.fields(KDOptions) if f.name != "scalars")


def option_scalars(device, temperature, alpha, jsd_beta, softcap) -> Tensor:
    """The (4,) float64 tensor of KDOptions.scalars on `device`, from numbers or 0-d tensors (taken as they are,
    detached: no gradient reaches an option). softcap None: 1.0 (unused).

    Under torch.compile a number is added to a zero tensor: the one form that keeps a float Dynamo has made
    symbolic a graph input (torch.full or torch.tensor of it specialise on its value, a recompile per value). An
    eager call with numbers is one host tensor copied with non_blocking=True: torch.tensor(..., device="cuda")
    would wait for the whole stream after its copy (a host sync every call), while a non-blocking copy from pageable
    memory is staged by the driver and returns at once. While a CUDA graph is being captured (no such copy allowed)
    the compiled form's fills instead."""
    values = (temperature, alpha, jsd_beta, 1.0 if softcap is None else softcap)
    device = torch.device(device)
    if not torch.compiler.is_compiling() and all(type(v) in (float, int) for v in values) and not (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
    return torch.stack([v.detach().to(device=device, dtype=torch.float64).reshape(()) if isinstance(v, Tensor)
                        else torch.zeros((), dtype=torch.float64, device=device) + v for v in values])


def option_value(x):
    """A float option as a module keeps it: a 0-d tensor as it is, a number as a float."""
    return x if isinstance(x, Tensor) else float(x)


def make_options(device, temperature=1.0, alpha=0.5, ignore_index=-100, divergence="forward_kl", jsd_beta=0.5,
                 softcap=None) -> KDOptions:
    """KDOptions on `device`, unchecked (check_options checks, then calls this). softcap None or the number 0: off
    (a tensor always caps)."""
    capped = softcap is not None and (isinstance(softcap, Tensor) or softcap != 0)
    return KDOptions(option_scalars(device, temperature, alpha, jsd_beta, softcap if capped else None),
                     int(ignore_index), divergence, capped)


def result_dtype(s: Tensor) -> torch.dtype:
    # float32 whatever the input precision; float64 inputs (used for gradcheck) keep float64.
    return torch.float64 if s.dtype == torch.float64 else torch.float32


def kernel_scalars(temperature: float, alpha: float) -> tuple[float, float, float, float]:
    """1/T, the divergence's loss and gradient weights, and the cross-entropy weight (the native kernel's; the
    Triton kernels make the same from KDOptions.scalars on the device)."""
    return 1.0 / temperature, alpha * temperature * temperature, alpha * temperature, 1.0 - alpha


# --------------------------------------------------------------------------------------------------------------------
# Reductions.
# --------------------------------------------------------------------------------------------------------------------

def reduce_rows(rows: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / rows.shape[0]
    counted = (target != ignore_index).sum()
    return total / counted.clamp(min=1)


def reduction_scale(s: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    """∂(reduced loss)/∂(row loss), on the device: what reduce_rows' backward would send to every row."""
    one = torch.ones((), dtype=result_dtype(s), device=s.device)
    if reduction == "sum":
        return one
    if target is None:
        return one / s.shape[0]
    return one / (target != ignore_index).sum().clamp(min=1)


def scaled(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """A saved gradient (of the reduced loss, or of each row for "none") times the incoming gradient, multiplied in
    float32 (float64 for float64), in grad's dtype."""
    factor = grad_loss[:, None] if grad_loss.dim() == 1 else grad_loss
    return (grad.to(result_dtype(grad)) * factor).to(grad.dtype)


# --------------------------------------------------------------------------------------------------------------------
# The plain reference (autograd through log_softmax / cross_entropy).
# --------------------------------------------------------------------------------------------------------------------

def soft_capped(x: Tensor, softcap: Optional[Tensor]) -> Tensor:
    """c·tanh(x / c), or x where softcap is None (off)."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-row KL(a ‖ b) from log-probabilities, 0 where a is 0 (also in the gradient); NaN stays NaN."""
    a = log_a.exp()
    present = a != 0
    terms = a * (torch.where(present, log_a, 0.0) - torch.where(present, log_b, 0.0))
    return torch.where(present, terms, 0.0).sum(1)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: Tensor) -> Tensor:
    """log(β·q + (1 − β)·p), β a 0-d tensor. Where the mixture has no mass (both weighted terms -inf: a masked class,
    or at β = 0 a class only q has, at β = 1 one only p has), -inf without going through logaddexp(-inf, -inf),
    whose gradient is NaN."""
    from_q, from_p = log_q + torch.log(beta), log_p + torch.log1p(-beta)
    empty = (from_q == -math.inf) & (from_p == -math.inf)
    mixed = torch.logaddexp(torch.where(empty, 0.0, from_q), torch.where(empty, 0.0, from_p))
    return torch.where(empty, -math.inf, mixed)


def jsd_ends(beta: Tensor, forward: Tensor, reverse: Tensor, jsd: Tensor) -> Tensor:
    """JSD's ends are forward and reverse KL by convention (the formula degenerates there): chosen on the value of
    β at run time, exactly, with no host read of it."""
    return torch.where(beta == 0, forward, torch.where(beta == 1, reverse, jsd))


def jsd_from_parts(beta: Tensor, kl_q_m: Tensor, kl_p_m: Tensor) -> Tensor:
    """β·KL(q ‖ m) + (1 − β)·KL(p ‖ m), m = β·q + (1 − β)·p, with its ends by convention: at β = 0 the mixture is p
    and at β = 1 it is q (exactly, see _log_mixture), so the parts are then forward and reverse KL themselves. No
    branch holds a value the others avoid (a reverse KL that is infinite where q is 0, say), so autograd through it
    stays finite."""
    return jsd_ends(beta, kl_q_m, kl_p_m, beta * kl_q_m + (1 - beta) * kl_p_m)


def divergence_rows(s: Tensor, t: Tensor, temperature: Tensor, divergence: str = "forward_kl",
                    jsd_beta: Optional[Tensor] = None) -> Tensor:
    """Per-row divergence between the temperature softmaxes of (already soft-capped) s and t, in their dtype.
    temperature and jsd_beta: numbers or 0-d tensors."""
    log_p = F.log_softmax(s / temperature, dim=1)
    log_q = F.log_softmax(t / temperature, dim=1)
    if divergence == "forward_kl":
        return _kl(log_q, log_p)
    if divergence == "reverse_kl":
        return _kl(log_p, log_q)
    beta = torch.as_tensor(jsd_beta, dtype=torch.float64, device=s.device)
    log_m = _log_mixture(log_p, log_q, beta)
    return jsd_from_parts(beta, _kl(log_q, log_m), _kl(log_p, log_m))


def _log_ratio_grad(p: Tensor, log_p: Tensor, log_other: Tensor, kl: Optional[Tensor] = None) -> Tensor:
    """p·(log(p/o) − KL(p ‖ o)) per element, 0 where p is 0; kl None: summed over the classes given."""
    log_ratio = torch.where(p != 0, log_p - log_other, 0.0)
    if kl is None:
        kl = torch.where(p != 0, p * log_ratio, 0.0).sum(1, keepdim=True)
    return torch.where(p != 0, p * (log_ratio - kl), 0.0)


def divergence_grad(s: Tensor, t: Tensor, temperature: Tensor, divergence: str, jsd_beta: Tensor) -> Tensor:
    """∂D/∂(s/T) of divergence_rows in closed form (p = softmax(s/T), q = softmax(t/T)): p − q; reverse KL
    p·(log(p/q) − KL(p ‖ q)); JSD (1 − β)·p·(log(p/m) − KL(p ‖ m)). 0 where p is 0."""
    log_p = F.log_softmax(s / temperature, dim=1)
    log_q = F.log_softmax(t / temperature, dim=1)
    return divergence_grad_from_logs(log_p, log_q, divergence, jsd_beta)


def divergence_grad_from_logs(log_p: Tensor, log_q: Tensor, divergence: str, jsd_beta,
                              kl: Optional[Tensor] = None) -> Tensor:
    """divergence_grad from the log-probabilities. kl (rows, 1): the row's KL(p ‖ q) (reverse KL) or KL(p ‖ m)
    (JSD) when log_p and log_q hold only some of the classes (a vocabulary shard); None: summed here."""
    p = log_p.exp()
    if divergence == "forward_kl":
        return p - log_q.exp()
    if divergence == "reverse_kl":
        return _log_ratio_grad(p, log_p, log_q, kl)
    beta = torch.as_tensor(jsd_beta, dtype=torch.float64, device=log_p.device)
    jsd = (1 - beta) * _log_ratio_grad(p, log_p, _log_mixture(log_p, log_q, beta), kl)
    # At β = 1 the mixture is q, so a given kl (KL(p ‖ m)) is KL(p ‖ q) there too.
    return jsd_ends(beta, p - log_q.exp(), _log_ratio_grad(p, log_p, log_q, kl), jsd)


def reference_rows(s: Tensor, t: Tensor, target: Optional[Tensor], options: KDOptions) -> Tensor:
    temperature, alpha, ignore_index = options.temperature, options.alpha, options.ignore_index
    compute = result_dtype(s)
    s32 = soft_capped(s.to(compute), options.softcap)
    t32 = soft_capped(t.detach().to(compute), options.softcap)
    # 0·log 0 = 0 on masked (-inf) classes; a NaN logit is not masked and reaches the loss.
    rows = alpha * temperature**2 * divergence_rows(s32, t32, temperature, options.divergence, options.jsd_beta)
    if target is not None:
        keep = target != ignore_index
        ce = F.cross_entropy(s32, target, ignore_index=ignore_index, reduction="none")
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows.to(result_dtype(s))


def reference_grad(s: Tensor, t: Tensor, target: Optional[Tensor], options: KDOptions) -> Tensor:
    """∂ℓᵢ/∂sᵢ of reference_rows in closed form, α·T·∂D/∂(s/T) + (1−α)·(softmax(s) − onehot(y)), times the soft
    cap's slope 1 − tanh²(s/c), in float32 (float64 for float64): autograd cannot run inside an op's kernel, where
    the fallback needs it."""
    temperature, alpha, ignore_index = options.temperature, options.alpha, options.ignore_index
    compute = result_dtype(s)
    s_raw = s.detach().to(compute)
    s32, t32 = soft_capped(s_raw, options.softcap), soft_capped(t.detach().to(compute), options.softcap)
    grad = alpha * temperature * divergence_grad(s32, t32, temperature, options.divergence, options.jsd_beta)
    if target is not None:
        keep = target != ignore_index
        onehot = F.one_hot(torch.where(keep, target, 0), s.shape[1]).to(compute)
        grad = torch.where(keep[:, None], grad + (1 - alpha) * (torch.softmax(s32, dim=1) - onehot), 0.0)
    if options.softcapped:
        grad = grad * (1 - torch.tanh(s_raw / options.softcap) ** 2)
    return grad


def reference_loss(s: Tensor, t: Tensor, target: Optional[Tensor], options: KDOptions, reduction: str) -> Tensor:
    return reduce_rows(reference_rows(s, t, target, options), target, options.ignore_index, reduction)


def kd_loss_reference(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                      ignore_index=-100, reduction="mean", divergence="forward_kl", jsd_beta=0.5, softcap=None):
    """The plain torch reference with autograd: same contract as `kd_loss` (temperature, alpha, jsd_beta and
    softcap numbers or 0-d tensors), no validation of target values (softcap None or the number 0: off)."""
    options = make_options(student_logits.device, temperature, alpha, ignore_index, divergence, jsd_beta, softcap)
    return reference_loss(student_logits, teacher_logits, target, options, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks: one ValueError naming the argument.
# --------------------------------------------------------------------------------------------------------------------

def check_logits(s, t, target, ignore_index, check_target=True) -> None:
    if not isinstance(s, Tensor) or s.dim() != 2:
        raise ValueError(f"student_logits must be a 2-D (N, C) tensor, got shape {tuple(getattr(s, 'shape', ()))}")
    if not isinstance(t, Tensor) or t.shape != s.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(s.shape)}, "
                         f"got {tuple(getattr(t, 'shape', ()))}")
    if s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"student_logits must have N >= 1 rows and C >= 1 classes, got {tuple(s.shape)}")
    if s.dtype not in DTYPES:
        raise ValueError(f"student_logits must be float32, bfloat16, float16 or float64, got {s.dtype}")
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_logits dtype {t.dtype} does not match student_logits dtype {s.dtype}")
    if t.device != s.device:
        raise ValueError(f"teacher_logits is on {t.device} but student_logits is on {s.device}")
    validate_target(target, s.shape[0], s.shape[1], s.device, "student_logits", check_target, ignore_index)


def _finite(x) -> bool:
    # Not math.isfinite: under torch.compile a value that changed between calls is a symbolic float, which only
    # arithmetic and comparisons take (they become guards: no recompile per value). inf − inf and nan − nan are nan.
    return x - x == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_scalar_tensor(x, name: str, device) -> bool:
    """Whether x is a tensor option (then checked: 0-d, floating, on `device` if given). Its value is not read (a
    host sync on CUDA, a graph break under torch.compile): in range is the caller's responsibility."""
    if not isinstance(x, Tensor):
        return False
    if x.dim() != 0 or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a number or a 0-d floating tensor, got a tensor of shape {tuple(x.shape)} "
                         f"and dtype {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is a tensor on {x.device} but the logits are on {torch.device(device)}")
    return True


def validate_hyperparameters(temperature, alpha, reduction, backend, device=None) -> None:
    """Numbers are range-checked; 0-d tensors only for shape, dtype and device (their values are not read)."""
    if not _check_scalar_tensor(temperature, "temperature", device) and (
            not isinstance(temperature, (int, float)) or not _finite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not _check_scalar_tensor(alpha, "alpha", device) and (
            not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def validate_divergence(divergence, jsd_beta, softcap, device=None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not _check_scalar_tensor(jsd_beta, "jsd_beta", device) and (
            not _is_number(jsd_beta) or not 0.0 <= jsd_beta <= 1.0):
        raise ValueError(f"jsd_beta must be a number in [0, 1], got {jsd_beta!r}")
    if softcap is not None and not _check_scalar_tensor(softcap, "softcap", device) and (
            not _is_number(softcap) or not _finite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None (off) or a finite number > 0, got {softcap!r}")


def check_options(temperature, alpha, ignore_index, reduction, backend, divergence="forward_kl", jsd_beta=0.5,
                  softcap=None, device=None) -> KDOptions:
    """The checked options, their scalars on `device` (the logits'; None: the CPU, for a check alone).
    temperature, alpha, jsd_beta and softcap: numbers (range-checked here) or 0-d floating tensors on `device`
    (taken as they are: their values are the caller's responsibility, as reading them would be a host sync)."""
    validate_hyperparameters(temperature, alpha, reduction, backend, device)
    validate_divergence(divergence, jsd_beta, softcap, device)
    return make_options("cpu" if device is None else device, temperature, alpha, ignore_index, divergence, jsd_beta,
                        softcap)


def validate_target(target, n: int, num_classes: int, device, rows_name: str, check_values: bool,
                        ignore_index: int) -> None:
    """target: None or an (n,) integer tensor on `device` (that of `rows_name`), whose values (if check_values) are
    in [0, num_classes) or ignore_index."""
    if target is None:
        return
    if not isinstance(target, Tensor) or target.shape != (n,):
        raise ValueError(f"target must be an (N,) = ({n},) integer tensor, "
                         f"got shape {tuple(getattr(target, 'shape', ()))}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {rows_name} is on {device}")
    if check_values:
        _check_target_values(target, num_classes, ignore_index)



def _check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    # Reading target values is a host sync. It is skipped while compiling or capturing a CUDA graph; there, an
    # out-of-range target yields a NaN loss (never a silent wrong value).
    if torch.compiler.is_compiling():
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = (int(v) for v in torch.aminmax(target))  # one pass, one read; the common case ends here
    if 0 <= low and high < num_classes:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target holds {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")


def _triton_installed() -> bool:
    # Looked up, not imported: importing Triton costs a second, and only a launch needs it.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (imports of it blocked)
        return False


TRITON_INSTALLED = _triton_installed()


def check_backend_for_device(s: Tensor, backend: str) -> None:
    """The kernels' backends (all but "torch") need tensors on a device they run on."""
    if s.device.type not in ("cpu", "cuda"):  # the kernels read raw CPU or CUDA memory
        raise ValueError(f"backend={backend!r} takes CUDA or CPU tensors, got {s.device.type} tensors; "
                         "backend='torch' runs on any device")
    if backend == "native" and s.is_cuda:
        raise ValueError("backend='native' is the CPU kernel and takes CPU tensors; use backend='auto' on CUDA")
    if backend == "triton" and not (s.is_cuda or INTERPRETED):
        raise ValueError("backend='triton' needs CUDA tensors; on CPU tensors it runs only under TRITON_INTERPRET=1 "
                         "(set before fastkd is imported). Use backend='auto' for the CPU implementation.")
    if (backend == "triton" or s.is_cuda) and not TRITON_INSTALLED:
        raise ValueError(f"backend={backend!r} on {s.device.type} tensors runs Triton kernels, and Triton is not "
                         "installed (pip install triton); backend='torch' runs without it")


def common_vocabulary(vocab_size, widths: dict) -> Optional[int]:
    """The V every tensor is read over: vocab_size (checked against every width), or the one width they share.
    widths: name -> that tensor's vocabulary width. Different widths without vocab_size, or a vocab_size above a
    width, are one ValueError naming both; None when widths is empty (the shape checks report what is missing)."""
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
    if not widths:
        return vocab_size
    if vocab_size is None:
        (first, width), *others = widths.items()
        for name, other in others:
            if other != width:
                raise ValueError(f"{first} has {width} classes and {name} has {other}: pass vocab_size=V to read "
                                 f"both over their first V classes (a tokenizer padded to another multiple)")
        return width
    for name, width in widths.items():
        if vocab_size > width:
            raise ValueError(f"vocab_size={vocab_size} is larger than {name}'s {width} classes")
    return vocab_size


def first_columns(x, vocabulary: Optional[int]):
    """x[:, :V] for a 2-D tensor: a view (same storage, row stride unchanged), never a copy; anything else as is,
    for the shape checks to report."""
    if vocabulary is None or not isinstance(x, Tensor) or x.dim() != 2:
        return x
    return x[:, :vocabulary]


def first_rows(x, vocabulary: Optional[int]):
    """x[:V] (a weight's or a bias's first V classes): a view; anything else as is."""
    if vocabulary is None or not isinstance(x, Tensor) or x.dim() < 1:
        return x
    return x[:vocabulary]


def bad_topk_rows(indices: Tensor, vocabulary: int) -> Tensor:
    """(N,) bool: the row's indices repeat a class or leave [0, V). On the device, no host read."""
    out_of_range = ((indices < 0) | (indices >= vocabulary)).any(1)
    ordered = indices.sort(1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    return out_of_range | repeated
