"""Settings as users write them: a --trace file in a folder that does not exist yet."""
import json

import pytest

from fastkd.train import main

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
