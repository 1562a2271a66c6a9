"""fastkd.analysis against exact answers: Hutchinson vs the full Hessian's trace, profiles vs direct losses, the
t-interval vs tabulated quantiles, and the PNG charts."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.func import functional_call

from fastkd.analysis import (hutchinson_trace, loss_profile, paired_difference, random_direction, save_profile,
                             sharpness, t_quantile, training_loss)
from fastkd.analysis.plot import BarChart, Line, LineChart, nice_ticks, save_figure
from fastkd.data import load_dataset
from fastkd.models import build_model


def small_net() -> nn.Module:
    # Smooth (tanh) so the Hessian is dense, off-diagonal terms included; float64 keeps the reference exact.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batches(n_batches=3, n=11, features=5, classes=3):
    return [(torch.randn(n, features, dtype=torch.float64) * 2, torch.randint(0, classes, (n,)))
            for _ in range(n_batches)]


def exact_trace(model: nn.Module, data) -> float:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = sum(len(y) for _, y in data)

    def loss(w):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum") for x, y in data) / total

    return float(torch.autograd.functional.hessian(loss, flat).diagonal().sum())


def test_hutchinson_matches_the_exact_trace_within_its_standard_error():
    model, data = small_net(), batches()
    exact = exact_trace(model, data)
    estimate = hutchinson_trace(model, data, probes=600, seed=int(torch.randint(0, 2**31, ())))
    assert 0 < estimate.stderr < 0.2 * abs(exact)  # the probes vary, and the estimate is informative
    assert abs(estimate.mean - exact) < 4 * estimate.stderr, (estimate.mean, exact, estimate.stderr)
    assert len(estimate.samples) == 600


def test_hutchinson_on_a_multi_exit_net_measures_the_deepest_head_only():
    info = load_dataset("synthetic").info
    net = build_model("tiny", info, multi_exit=True).double()
    x = torch.randn(6, info.channels, info.size, info.size, dtype=torch.float64)
    data = [(x, torch.randint(0, info.num_classes, (6,)))]
    estimate = hutchinson_trace(net, data, probes=4)
    assert math.isfinite(estimate.mean) and estimate.stderr > 0
    with torch.no_grad():  # the shallow heads do not enter the loss: changing them changes nothing
        before = training_loss(net, data)
        net.heads[0].weight.add_(1.0)
        assert training_loss(net, data) == before


def test_profiles_are_the_losses_along_the_line():
    model, other, data = small_net(), small_net(), batches()
    steps = [-0.5, 0.0, 0.5, 1.0]
    towards = loss_profile(model, data, steps, towards=other)
    assert towards[1] == pytest.approx(training_loss(model, data), rel=1e-12)
    assert towards[3] == pytest.approx(training_loss(other, data), rel=1e-12)
    direction = random_direction(model, torch.Generator().manual_seed(3))
    for p, d in zip(model.parameters(), direction):  # each tensor's step is scaled to that tensor's norm
        assert float(d.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-9)
    weights = [p.detach().clone() for p in model.parameters()]
    along = loss_profile(model, data, steps, direction=direction)
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.add_(0.5 * d)
    assert along[2] == pytest.approx(training_loss(model, data), rel=1e-12)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    with pytest.raises(ValueError, match="exactly one"):
        loss_profile(model, data, steps)


def test_sharpness_grows_with_the_radius_and_leaves_the_weights_untouched():
    model, data = small_net(), batches()
    weights = [p.detach().clone() for p in model.parameters()]
    small = sharpness(model, data, radius=0.01, draws=8)
    large = sharpness(model, data, radius=0.5, draws=8)
    assert large.mean > small.mean and large.mean > 0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    with pytest.raises(ValueError, match="radius"):
        sharpness(model, data, radius=0.0)


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantiles_match_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_paired_difference_interval():
    a, b = [3.0, 5.0, 4.0, 6.0], [1.0, 4.0, 4.0, 3.0]
    d = paired_difference(a, b)
    diffs = [2.0, 1.0, 0.0, 3.0]  # mean 1.5, sample std sqrt(5/3)
    half = 3.1824 * math.sqrt(5 / 3) / 2
    assert (d.mean, d.n, d.wins, d.losses) == (1.5, 4, 3, 0)
    assert d.low == pytest.approx(1.5 - half, abs=1e-3) and d.high == pytest.approx(1.5 + half, abs=1e-3)
    assert sum(diffs) / 4 == d.mean
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])


def test_nice_ticks_cover_the_range():
    for lo, hi in [(0.0, 1.0), (-3.7, 12.2), (96.1, 97.9), (5.0, 5.0), (1e-5, 3e-4)]:
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) >= 2
    with pytest.raises(ValueError):
        nice_ticks(0.0, float("nan"))


def test_figures_and_profiles_are_written(tmp_path):
    save_figure(tmp_path / "fig.png", [
        LineChart("curves", "epoch", "top-1", [Line("a", [1, 2, 3], [50.0, 60.0, 70.0], [1.0, 2.0, 1.0]),
                                               Line("b", [1, 2, 3], [40.0, 65.0, 72.0])]),
        BarChart("bars", "tr(H)", ["a", "b"], [3.0, -1.0], [0.5, 0.2])])
    image = Image.open(tmp_path / "fig.png")
    assert image.size == (2 * 560, 400)
    colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both series drawn
    save_profile(tmp_path / "profile", [-1.0, 0.0, 1.0], {"student": [2.0, 0.5, 1.5]}, "profile")
    assert (tmp_path / "profile.png").is_file()
    assert '"student"' in (tmp_path / "profile.json").read_text()
