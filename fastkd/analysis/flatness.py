"""How flat is a trained network's training loss? Hessian trace (Hutchinson), random-perturbation sharpness, and
1-D loss profiles.

Every measure uses one fixed loss: the mean cross-entropy of the model in eval mode (BatchNorm running statistics,
so the loss is a function of the weights alone) over a fixed list of batches. For a multi-exit network the loss is
that of its deepest head, the output it is evaluated by.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from .stats import mean_std

Batches = Sequence[tuple[Tensor, Tensor]]


@dataclass
class Estimate:
    mean: float
    stderr: float  # standard error of the mean over the random draws
    samples: list[float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "samples": self.samples}


def _estimate(samples: list[float]) -> Estimate:
    mean, std = mean_std(samples)
    return Estimate(mean, std / math.sqrt(len(samples)), samples)


def _logits(output) -> Tensor:
    return output[0][-1] if isinstance(output, tuple) else output  # multi-exit: (head logits, features)


def _weighted_losses(model: nn.Module, batches: Batches):
    """(loss of batch b × its share of all samples) for each batch: they sum to the mean loss over all samples."""
    total = sum(len(y) for _, y in batches)
    for x, y in batches:
        yield F.cross_entropy(_logits(model(x)), y, reduction="sum") / total


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def training_loss(model: nn.Module, batches: Batches) -> float:
    with torch.no_grad(), _eval_mode(model):
        return float(sum(_weighted_losses(model, batches)))


def hutchinson_trace(model: nn.Module, batches: Batches, probes: int = 32, seed: int = 0) -> Estimate:
    """tr(H) of the loss over the model's parameters, estimated as the mean of vᵀHv over Rademacher probes v.

    Each vᵀHv is a Hessian-vector product (torch.func: forward-mode jvp of the gradient), summed over the batches.
    Parameters the loss does not reach (a multi-exit net's shallow heads) have zero gradients. The standard error is
    over the probes.
    """
    if probes < 2:
        raise ValueError(f"probes must be >= 2 to report a standard error, got {probes}")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(seed)
    vs = [{name: (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.device, p.dtype)
           for name, p in params.items()} for _ in range(probes)]
    total = sum(len(y) for _, y in batches)
    samples = [0.0] * probes
    with _eval_mode(model):
        for x, y in batches:
            def loss(weights, x=x, y=y):  # this batch's share of the mean loss, as a function of the weights
                return F.cross_entropy(_logits(functional_call(model, weights, (x,))), y, reduction="sum") / total

            for i, v in enumerate(vs):
                _, hv = jvp(grad(loss), (params,), (v,))
                samples[i] += float(sum((hv[name] * v[name]).sum() for name in params))
    return _estimate(samples)


@contextmanager
def _perturbed(model: nn.Module, deltas: list[Tensor]):
    """The model's parameters shifted by `deltas` inside the block, restored exactly afterwards."""
    params = _params(model)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def random_direction(model: nn.Module, generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction scaled tensor by tensor to each parameter's norm (scale-invariant, as the weights of a
    BatchNorm network are): a step of t along it moves every tensor by t times its own size."""
    direction = []
    for p in _params(model):
        d = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        direction.append(d * (p.detach().norm() / d.norm().clamp_min(1e-12)))
    return direction


def sharpness(model: nn.Module, batches: Batches, radius: float = 0.05, draws: int = 10, seed: int = 0) -> Estimate:
    """Mean loss increase when every parameter tensor p moves by `radius`·‖p‖ in a random direction."""
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    base = training_loss(model, batches)
    g = torch.Generator().manual_seed(seed)
    increases = []
    for _ in range(draws):
        with _perturbed(model, [radius * d for d in random_direction(model, g)]):
            increases.append(training_loss(model, batches) - base)
    return _estimate(increases)


def loss_profile(model: nn.Module, batches: Batches, steps: Sequence[float],
                 direction: Optional[list[Tensor]] = None, towards: Optional[nn.Module] = None) -> list[float]:
    """The loss at w + t·d for each t in `steps`: d is `direction`, or (θ_towards − w) to walk the straight line to
    another network's weights (t=0 is this model, t=1 the other; BatchNorm statistics stay this model's)."""
    if (direction is None) == (towards is None):
        raise ValueError("give exactly one of direction= or towards=")
    if towards is not None:
        direction = [q.detach() - p.detach() for p, q in zip(_params(model), _params(towards), strict=True)]
    losses = []
    for t in steps:
        with _perturbed(model, [t * d for d in direction]):
            losses.append(training_loss(model, batches))
    return losses


def save_profile(stem, steps: Sequence[float], curves: dict[str, Sequence[float]], title: str,
                 xlabel: str = "step t along the direction") -> None:
    """Write a profile as `stem`.json (the numbers) and `stem`.png (the plot)."""
    import json
    from pathlib import Path

    from .plot import Line, LineChart, save_figure

    stem = Path(stem)
    record = {"title": title, "steps": list(steps), "losses": {k: list(v) for k, v in curves.items()}}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [Line(label, list(steps), list(losses)) for label, losses in curves.items()]
    save_figure(stem.with_suffix(".png"), [LineChart(title, xlabel, "training loss", lines)])
