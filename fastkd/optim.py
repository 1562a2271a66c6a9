"""SGD whose update compiles into the training step's graph, with its learning rate held in a device tensor.

torch.optim.SGD.step() deliberately graph-breaks under torch.compile, so the update here is written with foreach
ops on the optimizer's own param_groups and state: the same arithmetic as torch.optim.SGD (momentum, dampening 0,
weight decay, no Nesterov, parameters without a gradient skipped), and a regular SGD state_dict. Writing the lr into
its tensor in place means an lr schedule never triggers a recompile or a host sync.
"""
import math
import warnings

import torch
from torch import nn


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    device = next(model.parameters()).device
    return torch.optim.SGD(model.parameters(), lr=torch.tensor(lr, device=device), momentum=momentum,
                           weight_decay=weight_decay)


def sgd_update(optimizer: torch.optim.SGD) -> None:
    """One SGD step over the parameters that have a gradient, then their gradients are set to None."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                buffers = [_momentum_buffer(optimizer, p) for p in params]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
                grads = buffers
            torch._foreach_add_(params, torch._foreach_mul(grads, -group["lr"]))
            for p in params:
                p.grad = None


def _momentum_buffer(optimizer, p):
    # A zero buffer makes the first step buf = grad, exactly torch.optim.SGD's first step (dampening 0).
    state = optimizer.state[p]
    if state.get("momentum_buffer") is None:
        state["momentum_buffer"] = torch.zeros_like(p)
    return state["momentum_buffer"]


def init_momentum(optimizer: torch.optim.SGD) -> None:
    """Create every momentum buffer up front, so the first compiled step does not see the state change."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            _momentum_buffer(optimizer, p)


def lr_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Deprecated (nothing in fastkd uses it; the lr is set inside each step by fastkd.step_records.LrSchedule)."""
    warnings.warn("fastkd.optim.lr_at is deprecated: the engine's lr is fastkd.step_records.LrSchedule's",
                  DeprecationWarning, stacklevel=2)
    if schedule == "constant":
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def set_lr(optimizer: torch.optim.SGD, lr: float) -> None:
    """Deprecated (nothing in fastkd uses it; the lr is set inside each step by fastkd.step_records.LrSchedule)."""
    warnings.warn("fastkd.optim.set_lr is deprecated: the engine's lr is fastkd.step_records.LrSchedule's",
                  DeprecationWarning, stacklevel=2)
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)
