"""The study runner: a 2-seed, 1-epoch smoke run of every method writes every output; running it again skips
finished runs, continues a killed one from its checkpoint, and refuses a folder made with other settings."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from fastkd import study

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


def test_second_invocation_skips_finished_runs(smoke, capsys):
    out, args = smoke
    before = (out / "runs" / "spaced-seed1" / "result.json").read_text()
    (out / "runs" / "online-seed0" / "result.json").unlink()  # analysed again, not trained again
    assert study.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done earlier, skipped" in line for line in lines) == 9
    assert any(line.startswith("[2/10] online-seed0: trained earlier") for line in lines)
    assert (out / "runs" / "spaced-seed1" / "result.json").read_text() == before


def test_a_killed_study_resumes_its_run_from_the_checkpoint(tmp_path):
    args = [sys.executable, "-m", "fastkd.study", "--methods", "spaced", "--seeds", "1", *SMALL,
            "--epochs", "2", "--out", str(tmp_path)]
    # 4 batches per epoch: the teacher's epoch 0 ends at step 4 (a checkpoint); killed after step 5.
    killed = subprocess.run(args, env={**os.environ, "FASTKD_TEST_KILL_AFTER_STEP": "5"}, capture_output=True,
                            text=True)
    assert killed.returncode == -9
    assert (tmp_path / "runs" / "spaced-seed0" / "checkpoint.pt").is_file()
    env = {k: v for k, v in os.environ.items() if k != "FASTKD_TEST_KILL_AFTER_STEP"}
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
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
