"""Settings as users write them: a --trace file in a folder that does not exist yet, and --config YAML numbers that
YAML 1.1 reads as strings (`lr: 1e-3`)."""
import json

import pytest

from fastkd.train import file_settings, main

QUICK = ["--dataset", "synthetic", "--train-subset", "32", "--epochs", "1", "--batch-size", "32", "--quiet"]


def test_a_trace_into_a_folder_that_does_not_exist_is_written_there(tmp_path):
    trace = tmp_path / "logs" / "deeper" / "run.trace"
    assert main([*QUICK, "--out", str(tmp_path / "run"), "--trace", str(trace)]) == 0
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [line["role"] for line in lines] == ["teacher", "student"]  # spaced, one batch: a step each


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_an_unwritable_trace_path_is_one_line_naming_trace_and_nothing_is_written(tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("")
    trace = tmp_path / "notes.txt" / "run.trace" if where == "under a file" else tmp_path
    out = tmp_path / "run"
    code = main([*QUICK, "--out", str(out), "--trace", str(trace)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"fastkd.train: error: --trace {trace} ") and "Traceback" not in err, err
    assert not out.exists()


def test_yaml_numbers_written_with_an_exponent_are_numbers(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 5e-4\nbatch_size: 3.2e1\ninterval: 1e0\ntrain_subset: 6.4e1\n")
    settings = file_settings(str(config))
    assert settings == {"lr": 0.001, "weight_decay": 0.0005, "batch_size": 32, "interval": 1.0, "train_subset": 64}
    assert type(settings["batch_size"]) is int and type(settings["train_subset"]) is int


def test_a_yaml_run_with_an_exponent_lr_trains_with_that_lr(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: online\nlr: 2e-3\nlr_schedule: constant\n")
    assert main([*QUICK, "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.002
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "role" in r] == [pytest.approx(0.002, rel=1e-6)] * 2  # float32 on the device


@pytest.mark.parametrize("line,key", [("lr: fast", "lr"), ("epochs: 1.5e0", "epochs"), ("seed: '7x'", "seed")])
def test_a_config_value_that_is_not_a_number_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, line, key):
    config = tmp_path / "bad.yaml"
    config.write_text(f"method: online\n{line}\n")
    out = tmp_path / "run"
    assert main([*QUICK, "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fastkd.train: error: --config {config}: {key} "), err
    assert not out.exists()
