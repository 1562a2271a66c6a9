"""fastkd.analysis against exact answers: Hutchinson vs the full Hessian's trace, profiles vs direct losses, the
t-interval vs tabulated quantiles, and the PNG charts.

Every random draw is seeded, so a failure reproduces; tests that loop over seeds name the seed when they fail."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.func import functional_call

from fastkd.analysis import (
    hutchinson_trace,
    loss_profile,
    paired_difference,
    random_direction,
    save_profile,
    sharpness,
    t_quantile,
    training_loss,
)
from fastkd.analysis.plot import BarChart, Line, LineChart, save_figure
from fastkd.data import load_dataset
from fastkd.models import build_model

SEEDS = (0, 1, 2)


def small_net(seed: int) -> nn.Module:
    # Smooth (tanh) so the Hessian is dense, off-diagonal terms included; float64 keeps the reference exact.
    torch.manual_seed(seed)  # the layers draw their initial weights from the global generator
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batches(seed: int, n_batches=3, n=11, features=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, dtype=torch.float64, generator=g) * 2,
             torch.randint(0, classes, (n,), generator=g)) for _ in range(n_batches)]


def near_a_minimum(model: nn.Module, data, weight_decay=1e-2) -> nn.Module:
    """The model moved (L-BFGS, float64) to the minimum of its loss plus a small L2 term, which keeps the minimum
    finite: there the loss's gradient is small (2·weight_decay·w), so a random perturbation raises the loss by
    its curvature term instead of moving it up or down by a first-order term that 8 draws cannot average out."""
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    total = sum(len(y) for _, y in data)

    def closure():
        opt.zero_grad()
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data) / total
        loss = loss + weight_decay * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    return model


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


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_hutchinson_matches_the_exact_trace_within_its_standard_error(seed):
    # Several fixed seeds (model, data and probes) rather than one: the bound must hold for each, not for a seed
    # that happens to suit it. A 4-standard-error bound fails by chance with probability ~6e-5 per seed; 400
    # probes put the standard error at 3-6% of these traces (2 seeds: each costs ~20 s on 2 cores).
    model, data = small_net(seed), batches(seed)
    exact = exact_trace(model, data)
    estimate = hutchinson_trace(model, data, probes=400, seed=seed)
    # the probes vary, and the estimate is informative
    assert 0 < estimate.stderr < 0.2 * abs(exact), f"seed {seed}: stderr {estimate.stderr}, exact {exact}"
    assert abs(estimate.mean - exact) < 4 * estimate.stderr, \
        f"seed {seed}: estimate {estimate.mean} ± {estimate.stderr}, exact {exact}"
    assert len(estimate.samples) == 400


def test_hutchinson_on_a_multi_exit_net_measures_the_deepest_head_only():
    info = load_dataset("synthetic").info
    torch.manual_seed(0)
    net = build_model("tiny", info, multi_exit=True).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, info.channels, info.size, info.size, dtype=torch.float64, generator=g)
    data = [(x, torch.randint(0, info.num_classes, (6,), generator=g))]
    estimate = hutchinson_trace(net, data, probes=4)
    assert math.isfinite(estimate.mean) and estimate.stderr > 0
    with torch.no_grad():  # the shallow heads do not enter the loss: changing them changes nothing
        before = training_loss(net, data)
        net.heads[0].weight.add_(1.0)
        assert training_loss(net, data) == before


def test_profiles_are_the_losses_along_the_line():
    model, other, data = small_net(1), small_net(2), batches(3)  # two different networks
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


@pytest.mark.parametrize("seed", SEEDS)
def test_sharpness_grows_with_the_radius_and_leaves_the_weights_untouched(seed):
    # Measured where sharpness means something, near a minimum: at a random initialisation the first-order term
    # dominates 8 draws, and the mean increase at radius 0.5 comes out negative or lost in its noise for some seeds
    # (at initialisation, seed 3 of this net gives −0.008 ± 0.010 and seed 1 gives 0.002 ± 0.016).
    data = batches(seed)
    model = near_a_minimum(small_net(seed), data)
    weights = [p.detach().clone() for p in model.parameters()]
    small = sharpness(model, data, radius=0.01, draws=8, seed=seed)
    large = sharpness(model, data, radius=0.5, draws=8, seed=seed)
    # Curvature: the increase grows ~ radius², 2500× from 0.01 to 0.5; large is many standard errors above 0.
    assert large.mean > small.mean and large.mean > 4 * large.stderr, f"seed {seed}: {small} vs {large}"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), f"seed {seed}"
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


def test_paired_difference_equal_on_every_seed_is_that_difference_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = paired_difference([2.5, 3.5, 4.5], [1.0, 2.0, 3.0])
    assert (d.mean, d.low, d.high, d.wins, d.losses) == (1.5, 1.5, 1.5, 3, 0)


def test_figures_and_profiles_are_written(tmp_path):
    save_figure(tmp_path / "fig.png", [
        LineChart("curves", "epoch", "top-1", [Line("a", [1, 2, 3], [50.0, 60.0, 70.0], [1.0, 2.0, 1.0]),
                                               Line("b", [1, 2, 3], [40.0, 65.0, 72.0])]),
        BarChart("bars", "tr(H)", ["a", "b"], [3.0, -1.0], [0.5, 0.2])])
    image = Image.open(tmp_path / "fig.png")
    assert image.size == (2 * 560, 400)  # two panels of 5.6 × 4 inches at 100 dpi
    colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both series drawn (matplotlib's C0 and C1)
    steps, curves = [-1.0, 0.0, 1.0], {"student": [2.0, 0.5, 1.5], "teacher": [0.25, 0.125, 3.0]}
    save_profile(tmp_path / "profile", steps, curves, "profile")
    assert json.loads((tmp_path / "profile.json").read_text()) == {"title": "profile", "steps": steps,
                                                                   "losses": curves}
    colours = {colour for _, colour in Image.open(tmp_path / "profile.png").convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both curves drawn


def two_logit_model(a: float, b: float) -> nn.Module:
    """logits = (a·x, b·x): on x = 1 with label 0 the loss is log(1 + e^(b − a)), which a hand can compute."""
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[a], [b]], dtype=torch.float64))
    return model


def test_profiles_equal_a_hand_computation_on_a_two_logit_model():
    data = [(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]))]
    steps = [-1.0, 0.0, 0.5, 2.0]
    # Along d = (1, 0) from (a, b) = (0, 0): the loss at t is log(1 + e^(−t)).
    along = loss_profile(two_logit_model(0.0, 0.0), data, steps,
                         direction=[torch.tensor([[1.0], [0.0]], dtype=torch.float64)])
    assert along == pytest.approx([math.log(1 + math.e), math.log(2), math.log(1 + math.exp(-0.5)),
                                   math.log(1 + math.exp(-2))], rel=1e-12)
    # Towards (a, b) = (1, 3) from (0, 0): at t the weights are (t, 3t) and the loss log(1 + e^(2t)).
    towards = loss_profile(two_logit_model(0.0, 0.0), data, steps, towards=two_logit_model(1.0, 3.0))
    assert towards == pytest.approx([math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.e),
                                     math.log(1 + math.exp(4))], rel=1e-12)


def test_a_trained_models_profile_is_lowest_at_its_own_weights():
    # Near a minimum (of the loss plus a small L2 term, whose gradient 2·1e-2·w moves the minimum of the loss alone
    # by a step of about 1e-2 along a direction scaled to the weights), the profile along a random direction is
    # higher at t = ±0.1 and ±0.3 than at 0, and rises from 0.1 to 0.3 on both sides.
    data = batches(4)
    model = near_a_minimum(small_net(4), data)
    steps = [-0.3, -0.1, 0.0, 0.1, 0.3]
    profile = loss_profile(model, data, steps, direction=random_direction(model, torch.Generator().manual_seed(4)))
    assert profile[2] == pytest.approx(training_loss(model, data), rel=1e-12)
    assert min(profile) == profile[2] and profile[0] > profile[1] and profile[4] > profile[3], profile
