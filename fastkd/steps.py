"""The training steps: plain functions of (model, optimizer, batch) with the optimizer update inside.

`StepFunctions` holds the forward+loss functions, compiled with torch.compile when asked. Every soft-target loss
goes through `fastkd.kernels.kd_loss`, except the official code's KL-on-probabilities quirk, which is reproduced
as written there.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.kernels.kd_loss import kd_loss


@dataclass(frozen=True)
class LossSettings:
    temperature: float
    alpha: float  # weight of the soft (KL) term; 1 − α weighs the hard-label cross-entropy
    beta: float  # weight of the self-distillation feature loss
    kl_on_probabilities: bool = False  # official-code quirk: KLDivLoss(softmax(s/T), softmax(t/T)), no T²


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, cfg: LossSettings) -> Tensor:
    """α·T²·KL(p_t ‖ p_s) + (1−α)·CE, from the fused kernel; or the official code's variant under its quirk."""
    if cfg.kl_on_probabilities:
        t = cfg.temperature
        # Probabilities passed where log-probabilities belong, no T², and KLDivLoss's default elementwise mean
        # (over N·C, written out to avoid its deprecation warning): as the official code does.
        soft = F.kl_div(F.softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="sum")
        soft = soft / student_logits.numel()
        return cfg.alpha * soft + (1 - cfg.alpha) * F.cross_entropy(student_logits, y)
    return kd_loss(student_logits, teacher_logits, y, temperature=cfg.temperature, alpha=cfg.alpha)


def ce_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits.detach()


def distill_loss(student: nn.Module, x: Tensor, y: Tensor, teacher_logits: Tensor, cfg: LossSettings) -> Tensor:
    return soft_loss(student(x), teacher_logits, y, cfg)


def soft_targets(teacher: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return teacher(x)


def deepest_ce_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The spaced-self advance: only the deepest head's cross-entropy trains."""
    logits, _ = net(x)
    return F.cross_entropy(logits[-1], y)


def self_distill_loss(net: nn.Module, x: Tensor, y: Tensor, cfg: LossSettings) -> Tensor:
    """CE(deepest) + Σ_shallow [α·kd(shallow, deepest detached) + (1−α)·CE] + β·Σ_shallow ‖adapter(f) − f_deep‖₂."""
    logits, features = net(x)
    deep_logits, deep_features = logits[-1].detach(), features[-1].detach()
    loss = F.cross_entropy(logits[-1], y)
    for shallow_logits, shallow_features, adapter in zip(logits[:-1], features[:-1], net.adapters):
        loss = loss + soft_loss(shallow_logits, deep_logits, y, cfg)
        loss = loss + cfg.beta * (adapter(shallow_features) - deep_features).norm(dim=1).mean()
    return loss


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


class StepFunctions:
    """The forward+loss functions of every step kind, compiled by torch.compile when `compile` is set."""

    def __init__(self, cfg: LossSettings, compile: bool):
        wrap = torch.compile if compile else (lambda f: f)
        self.cfg = cfg
        self._ce = wrap(ce_loss)
        self._distill = wrap(distill_loss)
        self._soft_targets = wrap(soft_targets)
        self._deepest_ce = wrap(deepest_ce_loss)
        self._self_distill = wrap(self_distill_loss)

    def ce(self, model, optimizer, scheduler, x, y) -> tuple[Tensor, Tensor]:
        loss, logits = self._ce(model, x, y)
        optimizer_step(optimizer, scheduler, loss)
        return loss.detach(), logits

    def soft_targets(self, teacher, x) -> Tensor:
        return self._soft_targets(teacher, x)

    def distill(self, student, optimizer, scheduler, x, y, teacher_logits) -> Tensor:
        loss = self._distill(student, x, y, teacher_logits, self.cfg)
        optimizer_step(optimizer, scheduler, loss)
        return loss.detach()

    def advance(self, net, optimizer, scheduler, x, y) -> Tensor:
        loss = self._deepest_ce(net, x, y)
        optimizer_step(optimizer, scheduler, loss)
        return loss.detach()

    def self_distill(self, net, optimizer, scheduler, x, y) -> Tensor:
        loss = self._self_distill(net, x, y, self.cfg)
        optimizer_step(optimizer, scheduler, loss)
        return loss.detach()
