"""The divergences of the fused KD loss in plain torch: the `backend="torch"` path and, on float64 inputs, the
reference every kernel path is tested against (autograd gives its gradient).

With p = softmax(s/T), q = softmax(t/T) over the (soft-capped) logits:
* "forward_kl": KL(q ‖ p)         * "reverse_kl": KL(p ‖ q)
* "jsd": β·KL(q ‖ m) + (1 − β)·KL(p ‖ m), m = β·q + (1 − β)·p; β = 0 is forward KL and β = 1 reverse KL (the
  convention TRL and Liger share: the formula itself is 0 at both ends).
Every KL takes 0·log 0 = 0, with its gradient 0 there too (no NaN through the masked branch).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def soft_capped(x: Tensor, softcap: Optional[float]) -> Tensor:
    """c·tanh(x / c), or x for softcap None."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-row KL(a ‖ b) from log-probabilities, 0 where a is 0 (also in the gradient); NaN stays NaN."""
    a = log_a.exp()
    present = a != 0
    terms = a * (torch.where(present, log_a, 0.0) - torch.where(present, log_b, 0.0))
    return torch.where(present, terms, 0.0).sum(1)


def divergence_rows(s: Tensor, t: Tensor, temperature: float, divergence: str = "forward_kl",
                    jsd_beta: float = 0.5) -> Tensor:
    """Per-row divergence D between the temperature softmaxes of (already soft-capped) s and t, in their dtype."""
    log_p = F.log_softmax(s / temperature, dim=1)
    log_q = F.log_softmax(t / temperature, dim=1)
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        return _kl(log_q, log_p)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        return _kl(log_p, log_q)
    both_zero = (log_p == -math.inf) & (log_q == -math.inf)  # masked: keeps logaddexp's NaN out of the gradient
    log_m = torch.logaddexp(torch.where(both_zero, 0.0, log_q + math.log(jsd_beta)),
                            torch.where(both_zero, 0.0, log_p + math.log1p(-jsd_beta)))
    return jsd_beta * _kl(log_q, log_m) + (1 - jsd_beta) * _kl(log_p, log_m)


def validate_divergence(divergence, jsd_beta, softcap) -> None:
    """One ValueError naming the bad argument, before any kernel runs."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(jsd_beta, bool) or not isinstance(jsd_beta, (int, float)) or not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be a number in [0, 1], got {jsd_beta!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None (off) or a finite number > 0, got {softcap!r}")
