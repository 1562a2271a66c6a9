"""--feature-loss auto, the default of the two-network methods: the paper's dist term where the teacher's and the
student's feature widths are equal, none where they differ or a classifier cannot be told, said in one line and
recorded in config.json; explicit terms, the official preset and resumed runs saved before auto as they were.
(An explicit dist with unequal widths still stops at start-up: test_feature_loss.py's width-mismatch test.)"""
import json

import pytest
import torch
from squares import Squares
from torch import nn

import fastkd
from fastkd import api
from fastkd.api import config_from_settings
from fastkd.train import main

AUTO_LINE = "fastkd: --feature-loss auto: "


def cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 4))


def fit_squares(out, teacher_width=8, student_width=8, **settings):
    data = Squares()
    settings = {"epochs": 1, "batch_size": 16, **settings}
    return fastkd.fit("spaced", teacher=cnn(teacher_width, 1), student=cnn(student_width, 2), train_data=data,
                      test_data=data, out=out, quiet=True, num_workers=0, **settings)


def auto_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(AUTO_LINE)]


def saved(out) -> dict:
    return json.loads((out / "config.json").read_text())


def student_loss(out) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["train_loss"] for r in records if r.get("role") == "student")


def test_a_wide_teacher_and_a_narrow_student_by_name_run_without_a_feature_term_and_say_so(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--method", "spaced", "--dataset", "synthetic", "--train-subset", "16", "--epochs", "1",
                 "--batch-size", "16", "--teacher", "torchvision:resnet18", "--student",
                 "torchvision:mobilenet_v3_small", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = auto_lines(captured.out)
    assert lines == [f"{AUTO_LINE}teacher width 512 and student width 1024 differ, no feature term"], captured.out
    record = saved(out)
    assert (record["feature_loss"], record["feature_term"]) == ("auto", "none")  # what was asked, what ran


def test_fit_with_modules_of_different_widths_runs_without_a_feature_term(tmp_path, capsys):
    summary = fit_squares(tmp_path / "run", teacher_width=16, student_width=8)
    assert summary["student_top1"] is not None
    assert auto_lines(capsys.readouterr().out) == [
        f"{AUTO_LINE}teacher width 16 and student width 8 differ, no feature term"]
    assert saved(tmp_path / "run")["feature_term"] == "none"


def test_equal_widths_get_the_dist_term_with_beta_as_given(tmp_path, capsys):
    fit_squares(tmp_path / "auto", beta=0.5)
    assert auto_lines(capsys.readouterr().out) == [f"{AUTO_LINE}equal widths 8: dist (β 0.5)"]
    assert (saved(tmp_path / "auto")["feature_loss"], saved(tmp_path / "auto")["feature_term"]) == ("auto", "dist")
    fit_squares(tmp_path / "dist", beta=0.5, feature_loss="dist")
    fit_squares(tmp_path / "none", beta=0.5, feature_loss="none")
    # The same models, batches and seed: the loss trained is the dist run's, not the run without the term.
    assert student_loss(tmp_path / "auto") == student_loss(tmp_path / "dist")
    assert student_loss(tmp_path / "auto") != student_loss(tmp_path / "none")


def test_the_default_is_auto_for_two_network_methods_and_the_official_preset_keeps_dist():
    for method in ("online", "spaced", "offline"):
        assert config_from_settings({"method": method}).feature_loss == "auto"
        assert config_from_settings({"method": method, "preset": "official"}).feature_loss == "dist"
    for method in ("baseline", "self", "spaced-self"):
        assert config_from_settings({"method": method}).feature_loss == "none"


class LastLinearUnused(nn.Module):
    """Its classifier is `fc`; a spare head registered after it never runs."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.fc, self.spare = nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), nn.Linear(8, 4), \
            nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(x))


class NoLinear(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 4)

    def forward(self, x):
        return self.conv(x).flatten(1)


@pytest.mark.parametrize("model,reason", [
    (LastLinearUnused, "the teacher python:LastLinearUnused's last nn.Linear did not run in its forward"),
    (NoLinear, "the teacher python:NoLinear has no nn.Linear"),
])
def test_an_undetectable_classifier_under_auto_is_no_term_said_in_one_line(tmp_path, capsys, model, reason):
    data = Squares()
    fastkd.fit("spaced", teacher=model(1), student=model(2), train_data=data, test_data=data, epochs=1,
               batch_size=16, out=tmp_path / "run", quiet=True, num_workers=0)
    assert auto_lines(capsys.readouterr().out) == [
        f"{AUTO_LINE}{reason} (its classifier is not detectable), no feature term"]
    assert saved(tmp_path / "run")["feature_term"] == "none"


def as_saved_before_auto(out) -> None:
    """Make `out` look as a run saved before auto: its config.json without the feature_term key."""
    record = saved(out)
    del record["feature_term"]
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def test_a_run_saved_with_dist_before_auto_resumes_from_python_and_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    fit_squares(out, feature_loss="dist")  # what the default ran before auto, and saved as "dist"
    as_saved_before_auto(out)
    fit_squares(out, resume=True, epochs=2)  # the original call (its default then), continued
    assert (saved(out)["feature_loss"], saved(out)["feature_term"]) == ("dist", "dist")  # as originally asked
    capsys.readouterr()

    cli = tmp_path / "cli"
    assert main(["--method", "spaced", "--dataset", "synthetic", "--train-subset", "32", "--epochs", "1",
                 "--batch-size", "32", "--feature-loss", "dist", "--out", str(cli), "--quiet"]) == 0
    as_saved_before_auto(cli)
    assert main(["--resume", str(cli), "--epochs", "2", "--quiet"]) == 0, capsys.readouterr().err
    assert saved(cli)["feature_term"] == "dist"


def test_auto_resuming_a_saved_run_whose_term_it_would_not_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    fit_squares(out, feature_loss="none")  # equal widths: auto would run dist
    as_saved_before_auto(out)
    with pytest.raises(ValueError, match=r"differ from the saved run: feature_loss \(auto runs dist here, the saved "
                                         r"run ran none\)"):
        fit_squares(out, resume=True, epochs=2)
    assert saved(out)["feature_loss"] == "none"  # nothing saved is lost


def test_the_resume_check_leaves_auto_against_a_saved_term_to_the_models():
    cfg = config_from_settings({"method": "spaced"})
    saved = {**cfg.to_dict(), "feature_loss": "dist"}
    api._check_resumable(cfg, saved)  # no error yet: the widths decide
    assert api._check_resumed_feature_term(cfg, saved, "dist").feature_loss == "dist"
    with pytest.raises(ValueError, match="feature_loss"):
        api._check_resumed_feature_term(cfg, saved, "none")


def test_a_study_folder_saved_before_auto_is_the_same_study_where_auto_runs_its_term(tmp_path):
    from fastkd.config import Config
    from fastkd.data.registry import load_synthetic
    from fastkd.study.runs import _check_same

    cfg = Config(method="spaced", dataset="synthetic").resolve_defaults()  # tiny and tiny: equal widths
    finished = {**cfg.to_dict(), "feature_loss": "dist", "dataset_info": load_synthetic().info.to_dict()}
    _check_same(tmp_path, finished, cfg)
    with pytest.raises(ValueError, match=r"other settings \(feature_loss\)"):
        _check_same(tmp_path, {**finished, "feature_loss": "none"}, cfg)
    # A checkpoint's settings (no dataset_info): fit(resume=True) compares the term once the models are built.
    _check_same(tmp_path, {**cfg.to_dict(), "feature_loss": "dist"}, cfg)
