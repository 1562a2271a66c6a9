"""--divergence and --jsd-beta (issue #30): the choice reaches the soft term of every KD step, config.json records
it, a resume with another one is refused, runs saved before it resume as forward KL, and bad values are one line."""
import json

import pytest
import torch
import torch.nn.functional as F
from squares import Squares
from torch import nn

import fastkd
from fastkd import checkpoint, step_functions
from fastkd.config import Config
from fastkd.step_functions import LossSettings, soft_loss
from fastkd.train import main

QUICK = ["--dataset", "synthetic", "--train-subset", "64", "--epochs", "1", "--batch-size", "32", "--quiet"]


@pytest.fixture
def received(monkeypatch):
    """The (divergence, jsd_beta) of every kd_loss call the steps make; the loss itself still runs."""
    calls, real = [], step_functions.kd_loss

    def recording(*args, **kwargs):
        calls.append((kwargs.get("divergence", "forward_kl"), kwargs.get("jsd_beta", 0.5)))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_functions, "kd_loss", recording)
    return calls


def saved(out) -> dict:
    return json.loads((out / "config.json").read_text())


def weights(out, name="student") -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


# ---- the loss ----------------------------------------------------------------------------------------------------

def _by_hand(s, t, y, temperature, alpha, divergence, beta=0.5):
    """α·T²·D + (1−α)·CE in float64, D from the softmaxes at temperature T."""
    s64, t64 = s.double(), t.double()
    p_s, p_t = F.softmax(s64 / temperature, 1), F.softmax(t64 / temperature, 1)

    def kl(p, q):  # KL(p ‖ q) per row
        return (p * (p.log() - q.log())).sum(1)

    if divergence == "forward_kl":
        d = kl(p_t, p_s)
    elif divergence == "reverse_kl":
        d = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        d = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    return alpha * temperature ** 2 * d.mean() + (1 - alpha) * F.cross_entropy(s64, y)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
def test_the_step_soft_term_is_the_divergence_computed_by_hand(divergence, beta):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 10, generator=g) * 2
    y = torch.randint(0, 10, (16,), generator=g)
    settings = LossSettings(3.0, 0.7, 0.0, divergence=divergence, jsd_beta=beta)
    loss = soft_loss(s.clone().requires_grad_(), t, y, settings)
    by_hand = float(_by_hand(s, t, y, 3.0, 0.7, divergence, beta))
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)


# ---- the command line --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["spaced", "online", "self"])  # replay, live and self-distillation steps
def test_the_flags_reach_every_soft_term_and_config_json_records_them(tmp_path, received, method):
    out = tmp_path / "run"
    assert main([*QUICK, "--method", method, "--divergence", "jsd", "--jsd-beta", "0.3", "--out", str(out)]) == 0
    assert received and set(received) == {("jsd", 0.3)}, received
    assert (saved(out)["divergence"], saved(out)["jsd_beta"]) == ("jsd", 0.3)


def test_reverse_kl_trains_other_weights_than_forward_kl_and_forward_kl_is_the_default(tmp_path, received):
    runs = {}
    for name, flags in (("default", []), ("forward", ["--divergence", "forward_kl"]),
                        ("reverse", ["--divergence", "reverse_kl"])):
        received.clear()
        assert main([*QUICK, "--method", "spaced", *flags, "--out", str(tmp_path / name)]) == 0
        runs[name] = (weights(tmp_path / name), set(received))
    assert runs["default"][1] == runs["forward"][1] == {("forward_kl", 0.5)}
    assert runs["reverse"][1] == {("reverse_kl", 0.5)}
    default, forward, reverse = (runs[k][0] for k in ("default", "forward", "reverse"))
    assert all(torch.equal(default[k], forward[k]) for k in default)
    assert not all(torch.equal(forward[k], reverse[k]) for k in forward)
    assert (saved(tmp_path / "default")["divergence"], saved(tmp_path / "default")["jsd_beta"]) == ("forward_kl", None)


def test_a_config_file_sets_the_divergence(tmp_path, received):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "spaced", "divergence": "jsd", "jsd_beta": 0.25}))
    assert main([*QUICK, "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert set(received) == {("jsd", 0.25)}


BAD = [  # (flags, what the one line says: the flag and the problem)
    (["--divergence", "kl"], "argument --divergence: invalid choice: 'kl'"),
    (["--divergence", "jsd", "--jsd-beta", "1.5"], "--jsd-beta must be in [0, 1], got 1.5"),
    (["--divergence", "jsd", "--jsd-beta", "-0.1"], "--jsd-beta must be in [0, 1], got -0.1"),
    (["--divergence", "jsd", "--jsd-beta", "nan"], "--jsd-beta must be in [0, 1], got nan"),
    # forward and reverse KL take no β: ignoring it silently would hide a mistake
    (["--jsd-beta", "0.3"], "--jsd-beta applies to --divergence jsd only, not forward_kl"),
    (["--divergence", "reverse_kl", "--jsd-beta", "0.3"],
     "--jsd-beta applies to --divergence jsd only, not reverse_kl"),
    # the official quirk is a soft term of its own
    (["--kl-on-probabilities", "--divergence", "reverse_kl"],
     "--divergence reverse_kl cannot go with --kl-on-probabilities"),
    (["--preset", "official", "--divergence", "jsd"], "--divergence jsd cannot go with --kl-on-probabilities"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_naming_the_flag_before_anything_is_written(tmp_path, capsys, received, args, message):
    try:
        code = main([*args, "--dataset", "synthetic", "--out", str(tmp_path / "out"), "--quiet"])
    except SystemExit as e:  # argparse refuses an unknown choice itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastkd.train: error: ") and message in err, err
    assert received == [] and list(tmp_path.iterdir()) == []


# ---- resume ------------------------------------------------------------------------------------------------------

def test_resume_with_another_divergence_or_jsd_beta_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*QUICK, "--method", "spaced", "--divergence", "jsd", "--jsd-beta", "0.3", "--out", str(out)]) == 0
    before = (out / checkpoint.CHECKPOINT).read_bytes()
    for flags, key in ((["--divergence", "reverse_kl"], "divergence"), (["--jsd-beta", "0.4"], "jsd_beta")):
        capsys.readouterr()
        assert main(["--resume", str(out), "--epochs", "2", *flags, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "differ from the saved run" in err and key in err, err
        assert (out / checkpoint.CHECKPOINT).read_bytes() == before
    assert main(["--resume", str(out), "--epochs", "2", "--divergence", "jsd", "--quiet"]) == 0  # the same: fine


def as_saved_before_divergences(out) -> None:
    """Make `out` look as a run saved before --divergence: config.json and the checkpoint without the two keys."""
    record = saved(out)
    del record["divergence"], record["jsd_beta"]
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    state = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)
    del state["config"]["divergence"], state["config"]["jsd_beta"]
    checkpoint.save_atomic(state, out / checkpoint.CHECKPOINT)


def test_a_run_saved_before_the_divergence_flags_resumes_as_forward_kl(tmp_path, capsys, received):
    out = tmp_path / "run"
    assert main([*QUICK, "--method", "spaced", "--out", str(out)]) == 0
    as_saved_before_divergences(out)
    received.clear()
    assert main(["--resume", str(out), "--epochs", "2", "--quiet"]) == 0, capsys.readouterr().err
    assert set(received) == {("forward_kl", 0.5)}
    assert (saved(out)["divergence"], saved(out)["jsd_beta"]) == ("forward_kl", None)
    # ... and is refused another divergence like any run
    as_saved_before_divergences(out)
    capsys.readouterr()
    assert main(["--resume", str(out), "--epochs", "3", "--divergence", "jsd", "--quiet"]) == 2
    assert "divergence" in capsys.readouterr().err


def test_a_study_folder_saved_before_the_divergence_flags_is_the_same_study(tmp_path):
    from fastkd.study.runs import _check_same

    cfg = Config(method="spaced", dataset="synthetic").resolve_defaults()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("divergence", "jsd_beta")}
    _check_same(tmp_path, old, cfg)
    with pytest.raises(ValueError, match=r"other settings \(divergence\)"):
        _check_same(tmp_path, {**old, "divergence": "reverse_kl"}, cfg)


# ---- fastkd.fit --------------------------------------------------------------------------------------------------


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 4))


def test_fit_takes_the_divergence_and_jsd_beta(tmp_path, received):
    data = Squares(32)
    summary = fastkd.fit("spaced", teacher=cnn(1), student=cnn(2), train_data=data, test_data=data, epochs=1,
                         batch_size=16, out=tmp_path / "run", quiet=True, num_workers=0, divergence="jsd",
                         jsd_beta=0.3)
    assert summary["student_top1"] is not None
    assert received and set(received) == {("jsd", 0.3)}
    assert (saved(tmp_path / "run")["divergence"], saved(tmp_path / "run")["jsd_beta"]) == ("jsd", 0.3)


@pytest.mark.parametrize("settings,message", [({"divergence": "kl"}, "--divergence 'kl' is unknown"),
                                              ({"divergence": "jsd", "jsd_beta": 2.0}, "--jsd-beta must be in"),
                                              ({"divergence": "jsd", "jsd_beta": "0.3"}, "jsd_beta must be")])
def test_fit_refuses_bad_values_naming_them(tmp_path, settings, message):
    data = Squares(32)
    with pytest.raises(ValueError, match=message):
        fastkd.fit("spaced", teacher=cnn(1), student=cnn(2), train_data=data, test_data=data, epochs=1,
                   batch_size=16, out=tmp_path / "run", quiet=True, num_workers=0, **settings)
    assert not (tmp_path / "run").exists()


# ---- --compile ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_jsd_beta_is_a_constant_of_the_compiled_step_as_the_temperature_is():
    """The LossSettings values are guarded constants of the compiled step: a run compiles each step once with its
    own (tests/test_compile.py), and another temperature or jsd_beta is another graph, the same rule for both."""
    import dataclasses

    from test_compile import _call, _step_inputs

    from fastkd.step_functions import StepFunctions

    def recompiles(**change) -> bool:
        torch._dynamo.reset()
        base = LossSettings(3.0, 0.3, 0.03, divergence="jsd", jsd_beta=0.5)
        fns = StepFunctions(base, True, torch.device("cpu"))
        inputs = _step_inputs("replay", seed=3)
        _call(fns, "replay", *inputs)  # compiles
        fns.cfg = dataclasses.replace(base, **change)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                _call(fns, "replay", *inputs)
        except RuntimeError as e:
            assert "recompile" in str(e)
            return True
        return False

    assert not recompiles()
    assert recompiles(jsd_beta=0.3) == recompiles(temperature=4.0)
