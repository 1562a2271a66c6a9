"""The study runner: a 2-seed, 1-epoch smoke run of every method writes every output; running it again skips
finished runs, continues a killed one from its checkpoint, and refuses a folder made with other settings. The
aggregates (mean ± std, paired differences and their t-intervals) are checked against hand-computed values."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from fastkd import study
from fastkd.data import load_dataset

SMALL = ["--dataset", "digits", "--train-subset", "128", "--batch-size", "32", "--epochs", "1", "--teacher", "tiny",
         "--student", "tiny", "--hessian-probes", "3", "--sharpness-draws", "2", "--analysis-samples", "64",
         "--device", "cpu"]
METHODS = "baseline,online,spaced,self,spaced-self"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    args = ["--methods", METHODS, "--seeds", "2", *SMALL, "--out", str(out)]
    assert study.main(args) == 0
    return out, args


def test_smoke_run_writes_every_output(smoke, capsys):
    out, _ = smoke
    for name in ("results.md", "results.json", "curves.png", "flatness.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "flatness.png").size[0] > Image.open(out / "curves.png").size[0]  # three panels
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in METHODS.split(",") for s in (0, 1))
    for r in runs:
        assert 0 <= r["student_top1"] <= 100 and r["curve"] and r["curve"][-1][0] == 1 and r["train_loss"] > 0
        assert len(r["hessian_trace"]["samples"]) == 3 and len(r["profile"]["losses"]) == study.PROFILE_POINTS
        run_dir = out / "runs" / f"{r['method']}-seed{r['seed']}"
        assert (run_dir / "profile.png").is_file() and (run_dir / "profile.json").is_file()
    assert set(results["aggregate"]["paired"]) >= {"spaced − online", "spaced-self − self"}
    table = (out / "results.md").read_text()
    for method in METHODS.split(","):
        assert f"| {method} | 2 |" in table
    assert "spaced − online" in table and "95% CI" in table and "train loss" in table
    # The term each two-network run trained with (tiny and tiny: equal widths, so auto ran dist), not the setting.
    assert "feature term dist (two-network methods)" in table and "auto" not in table
    assert {r["feature_term"] for r in runs if r["method"] in ("online", "spaced")} == {"dist"}


def test_second_invocation_skips_finished_runs(smoke, capsys):
    out, args = smoke
    before = (out / "runs" / "spaced-seed1" / "result.json").read_text()
    (out / "runs" / "online-seed0" / "result.json").unlink()  # analysed again, not trained again
    assert study.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done earlier, skipped" in line for line in lines) == 9
    assert any(line.startswith("[2/10] online-seed0: trained earlier") for line in lines)
    assert (out / "runs" / "spaced-seed1" / "result.json").read_text() == before


# Fault injection from outside the engine: the study in a process that SIGKILLs itself right after its N-th
# optimizer step, before anything of that step is checkpointed (as a crash or an OOM kill would).
KILLED_STUDY = """
import os, signal, sys
from fastkd import engine, study
run_step, count = engine.run_step, 0
def counting_run_step(*args):
    global count
    result = run_step(*args)
    count += 1
    if count == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
engine.run_step = counting_run_step
sys.exit(study.main(sys.argv[2:]))
"""


def test_a_killed_study_resumes_its_run_from_the_checkpoint(tmp_path):
    args = ["--methods", "spaced", "--seeds", "1", *SMALL, "--epochs", "2", "--out", str(tmp_path)]
    # 4 batches per epoch: the teacher's epoch 0 ends at step 4 (a checkpoint); killed after step 5.
    killed = subprocess.run([sys.executable, "-c", KILLED_STUDY, "5", *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "runs" / "spaced-seed0" / "checkpoint.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "fastkd.study", *args], capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "[1/1] spaced-seed0: resumed after step 4" in resumed.stdout
    assert (tmp_path / "results.md").is_file()


def test_bad_input_is_one_line(smoke, capsys):
    out, args = smoke
    assert study.main(["--methods", "spaced,warp", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("fastkd.study: error: --methods 'spaced,warp': unknown warp; choose "
                                               "from baseline, online, spaced, offline, self, spaced-self")
    # The same folder with another learning rate: refused, naming the run, nothing overwritten.
    changed = [*args, "--lr", "0.2"]
    assert study.main(changed) == 2
    err = capsys.readouterr().err
    assert "baseline-seed0 was trained with other settings (lr)" in err and err.count("\n") == 1
    assert study.main(["--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_aggregates_of_finished_runs_match_hand_computed_statistics(tmp_path, monkeypatch, capsys):
    """Runs whose result.json is current are not trained or analysed again: the study re-aggregates them. Here six
    such runs (online and spaced, seeds 0–2) with chosen numbers, and every aggregate checked against arithmetic
    done by hand."""
    args = ["--methods", "online,spaced", "--seeds", "3", "--dataset", "synthetic", "--teacher", "tiny",
            "--student", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    parsed = study.build_parser().parse_args(args)
    chosen = {  # (student top-1, teacher top-1, train loss, Hessian trace, sharpness) by seed 0, 1, 2
        "online": [(90.0, 95.0, 0.5, 10.0, 0.01), (92.0, 97.0, 0.3, 14.0, 0.03), (91.0, 99.0, 0.4, 12.0, 0.02)],
        "spaced": [(91.0, 96.0, 0.25, 8.0, 0.1), (95.0, 96.0, 0.25, 9.0, 0.1), (93.0, 96.0, 0.25, 13.0, 0.4)],
    }
    steps = [parsed.profile_radius * (2 * i / (study.PROFILE_POINTS - 1) - 1) for i in range(study.PROFILE_POINTS)]
    info = load_dataset("synthetic").info
    for run in study.run_configs(parsed):  # what a finished run's folder holds, in the format the study writes it
        cfg = run.cfg
        top1, teacher_top1, loss, trace, sharp = chosen[cfg.method][cfg.seed]
        run_dir = tmp_path / "runs" / run.name
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "dataset_info": info.to_dict()}, indent=2))
        result = {"version": study.RESULT_VERSION, "method": cfg.method, "seed": cfg.seed, "student_top1": top1,
                  "train_loss": loss, "teacher_top1": teacher_top1, "wall_s": 1.0, "curve": [[1, top1]],
                  "hessian_trace": {"mean": trace, "stderr": 0.5, "samples": [trace - 1, trace + 1]},
                  "sharpness": {"mean": sharp, "stderr": 0.001, "samples": [sharp, sharp]},
                  "profile": {"steps": steps, "losses": [1.0] * len(steps)},
                  "analysis": study.analysis_settings(parsed)}
        (run_dir / study.RESULT).write_text(json.dumps(result) + "\n")

    def must_not_run(*_args):
        raise AssertionError("a finished, analysed run was trained or analysed again")

    monkeypatch.setattr(study.runs, "train_run", must_not_run)
    monkeypatch.setattr(study.runs, "analyse_run", must_not_run)
    assert study.main(args) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 6
    agg = json.loads((tmp_path / "results.json").read_text())["aggregate"]

    # mean ± sample std (n − 1), by hand:
    #   online top-1 90, 92, 91: mean 91, deviations −1, 1, 0 → var (1 + 1 + 0)/2 = 1 → std 1
    #   spaced top-1 91, 95, 93: mean 93, deviations −2, 2, 0 → var (4 + 4 + 0)/2 = 4 → std 2
    #   online teacher 95, 97, 99: mean 97, std 2;    spaced teacher 96 ×3: mean 96, std 0
    #   online loss 0.5, 0.3, 0.4: mean 0.4, deviations 0.1, −0.1, 0 → std 0.1;  spaced 0.25 ×3: std 0
    #   online trace 10, 14, 12: mean 12, std 2;  spaced trace 8, 9, 13: mean 10, deviations −2, −1, 3 → var 14/2
    #       → std √7 = 2.6457513110645907
    #   online sharpness 0.01, 0.03, 0.02: mean 0.02, std 0.01;  spaced 0.1, 0.1, 0.4: mean 0.2, deviations −0.1,
    #       −0.1, 0.2 → var 0.06/2 = 0.03 → std √0.03 = 0.17320508075688773
    expected = {
        "online": {"student_top1": (91.0, 1.0), "teacher_top1": (97.0, 2.0), "train_loss": (0.4, 0.1),
                   "hessian_trace": (12.0, 2.0), "sharpness": (0.02, 0.01)},
        "spaced": {"student_top1": (93.0, 2.0), "teacher_top1": (96.0, 0.0), "train_loss": (0.25, 0.0),
                   "hessian_trace": (10.0, 2.6457513110645907), "sharpness": (0.2, 0.17320508075688773)},
    }
    for method, stats in expected.items():
        assert agg["methods"][method]["seeds"] == [0, 1, 2]
        for key, (mean, std) in stats.items():
            got = agg["methods"][method][key]
            # sums of three decimals: exact up to float64 rounding (a few ulps; 1e-12 relative, 1e-15 absolute)
            assert (got["mean"], got["std"]) == (pytest.approx(mean, rel=1e-12), pytest.approx(std, abs=1e-15,
                                                                                                 rel=1e-12)), key
            assert got["values"] == [chosen[method][s][list(stats).index(key)] for s in range(3)]

    # Paired differences spaced − online, with the 95% t-interval mean ± t(0.975, 2)·std/√3. For 2 degrees of
    # freedom the t quantile has a closed form: F(t) = 1/2 + t/(2√(2 + t²)), so t = 0.95·√(2/(1 − 0.95²))
    # = 4.302652729749463 (tables: 4.303).
    #   top-1: differences 1, 3, 2 → mean 2, std 1 → half-width 4.302652729749463/√3 = 2.4841377117503307
    #          → [−0.4841377117503307, 4.484137711750331]; spaced better on 3 seeds, worse on 0
    #   trace: differences −2, −5, 1 → mean −2, deviations 0, −3, 3 → var 18/2 = 9 → std 3 → half-width
    #          4.302652729749463·3/√3 = 7.452413135250991 → [−9.452413135250991, 5.452413135250991]; 1 / 2
    assert set(agg["paired"]) == {"spaced − online"}
    paired = agg["paired"]["spaced − online"]
    # The study's quantile comes from Simpson's rule and bisection (~1e-10); 1e-8 bounds its error in the interval.
    for key, (mean, low, high, wins, losses) in {
            "student_top1": (2.0, -0.4841377117503307, 4.484137711750331, 3, 0),
            "hessian_trace": (-2.0, -9.452413135250991, 5.452413135250991, 1, 2)}.items():
        d = paired[key]
        assert d["mean"] == pytest.approx(mean, rel=1e-12), key
        assert (d["low"], d["high"]) == (pytest.approx(low, abs=1e-8), pytest.approx(high, abs=1e-8)), key
        assert (d["n"], d["wins"], d["losses"]) == (3, wins, losses), key

    # The same numbers, rounded, in results.md.
    table = (tmp_path / "results.md").read_text()
    assert "| online | 3 | 91.00 ± 1.00 | 97.00 ± 2.00 | 0.400 ± 0.100 | 12.00 ± 2.00 | 0.020 ± 0.010 |" in table
    assert "| spaced | 3 | 93.00 ± 2.00 | 96.00 ± 0.00 | 0.250 ± 0.000 | 10.00 ± 2.65 | 0.200 ± 0.173 |" in table
    assert "| spaced − online | +2.00 | [-0.48, +4.48] | 3 / 0 of 3 | -2.00 | [-9.45, +5.45] |" in table


def test_interval_curve_runs_each_interval_paired_with_its_counterpart(tmp_path):
    # 2 seeds, 1 epoch: spaced at two intervals, spaced-self at two, the equal-steps control; online and self are
    # added as the counterparts.
    args = ["--methods", "spaced,spaced-self", "--intervals", "spaced=0.5,1", "spaced-self=1,2",
            "--equal-steps-control", "--seeds", "2", *SMALL, "--out", str(tmp_path)]
    assert study.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    labels = {"spaced@0.5", "spaced@1", "spaced-self@1", "spaced-self@2", "online", "self", "self-equal-steps"}
    assert sorted((r["label"], r["seed"]) for r in results["runs"]) == sorted((m, s) for m in labels for s in (0, 1))
    for r in results["runs"]:
        assert r["dataset"] == "digits" and r["train_subset"] == 128
        assert r["interval"] == (float(r["label"].split("@")[1]) if "@" in r["label"] else None)
        assert r["epochs"] == (2 if r["label"] == "self-equal-steps" else 1)
        assert (r["method"], r["label"].split("@")[0]) in {(m, m) for m in ("spaced", "spaced-self", "online",
                                                                           "self")} | {("self", "self-equal-steps")}
    curves = results["aggregate"]["curves"]
    assert curves["spaced"]["against"] == "online" and curves["spaced-self"]["against"] == "self"
    assert [p["interval"] for p in curves["spaced"]["points"]] == [0.5, 1.0]
    by = {(r["label"], r["seed"]): r["student_top1"] for r in results["runs"]}
    first = curves["spaced"]["points"][0]["student_top1"]
    diffs = [by[("spaced@0.5", s)] - by[("online", s)] for s in (0, 1)]
    assert first["mean"] == pytest.approx(sum(diffs) / 2) and first["n"] == 2
    paired = results["aggregate"]["paired"]
    assert {"spaced-self@2 − self", "spaced-self@2 − self-equal-steps", "spaced@1 − online"} <= set(paired)
    table = (tmp_path / "results.md").read_text()
    assert "Interval curve of spaced, paired by seed against online" in table and "2 intervals were tried" in table
    assert (tmp_path / "interval_curve.png").is_file()
    # the same spaced run at the two intervals trained differently (the interval reached the schedule)
    spaced_runs = [json.loads((tmp_path / "runs" / name / "config.json").read_text())["interval"]
                   for name in ("spaced-s0.5-seed0", "spaced-s1-seed0")]
    assert spaced_runs == [0.5, 1.0]


@pytest.mark.parametrize("intervals,message", [(["warp=1"], "only spaced methods"), (["0,1"], "distinct intervals > 0"),
                                               (["1,1"], "distinct"), (["a"], "numbers of epochs")])
def test_bad_intervals_are_one_clear_error(tmp_path, capsys, intervals, message):
    assert study.main(["--methods", "spaced", "--intervals", *intervals, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_official_point_pairs_the_preset_runs_at_the_study_budget(tmp_path):
    args = ["--methods", "spaced", "--official-point", "--seeds", "2", *SMALL, "--out", str(tmp_path)]
    runs = {(run.label, run.cfg.seed): run.cfg for run in study.run_configs(study.build_parser().parse_args(args))}
    assert sorted(runs) == sorted((m, s) for m in ("spaced", "spaced+official", "online+official") for s in (0, 1))
    official = runs[("spaced+official", 0)]
    assert official.preset == "official" and official.epochs == 1 and official.kl_on_probabilities
    assert (official.lr, official.lr_schedule, official.feature_loss) == (0.01, "constant", "dist")
    assert study.study_pairs(["spaced", "spaced+official", "online+official"]) == [
        ("spaced+official", "online+official")]


def test_results_md_names_the_feature_term_each_label_ran(tmp_path):
    from fastkd.config import Config
    from fastkd.study.report import write_markdown

    results = [{"label": label, "method": method, "feature_term": term} for label, method, term in (
        ("online", "online", "dist"), ("spaced", "spaced", "dist"), ("offline", "offline", "none"),
        ("self", "self", "none"))]
    write_markdown(tmp_path / "results.md", {"methods": {}, "paired": {}}, "python -m fastkd.study",
                   [Config(method="spaced").resolve_defaults()], results)
    text = (tmp_path / "results.md").read_text()
    assert ", feature term dist (online, spaced); none (offline)." in text and "auto" not in text
