"""Chaos: a spaced-KD run killed with SIGKILL at 9 seeded moments (3 after steps, 3 inside checkpoint saves before
their rename, 3 after it), resumed each time, ends bit for bit where the uninterrupted run ends."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.checkpoint import temporaries
from fastkd.train import main

# synthetic: 256 images in batches of 16 → I = 16; s = 0.7 → K = 11: 2 epochs are 64 steps with replay boundaries
# after 11 and 22 teacher steps and a leftover replay of 10 at the end. Eager, the tiny model. Three kills of each
# kind cover every kind of kill point; the former 20 kills over 4 epochs repeated them (121 s of CPU time, now 78).
RUN = ["--method", "spaced", "--interval", "0.7", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "16",
       "--teacher", "tiny", "--student", "tiny", "--quiet", "--tensorboard"]
STEPS, KILLS, SEED = 64, 9, 2027
KILL_AFTER = str(Path(__file__).with_name("kill_after.py"))
WALL_CLOCK = {"images_per_s", "wall_s"}


def records(run: Path) -> list:
    def without_wall_clock(record):
        if "summary" in record:
            return {"summary": without_wall_clock(record["summary"])}
        return {k: v for k, v in record.items() if k not in WALL_CLOCK}

    return [without_wall_clock(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def board(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.split("/")[-1] not in WALL_CLOCK}


@pytest.mark.slow
def test_nine_kills_and_resumes_end_bit_identical_to_the_uninterrupted_run(tmp_path):
    full, chaos = tmp_path / "full", tmp_path / "chaos"
    assert main([*RUN, "--out", str(full), "--trace", f"{full}.trace"]) == 0
    assert records(full)[-1]["summary"]["steps"] == STEPS

    proc = subprocess.run([sys.executable, KILL_AFTER, "--chaos", str(SEED), str(KILLS), str(STEPS), *RUN,
                           "--out", str(chaos), "--trace", f"{chaos}.trace"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kills = [line for line in proc.stdout.splitlines() if line.startswith("kill ")]
    assert len(kills) == KILLS, proc.stdout
    assert sum(": temporary at" in k for k in kills) == 3 and sum(": renamed at" in k for k in kills) == 3
    assert any(k.endswith("(--resume)") for k in kills)

    for name in ("student", "teacher"):
        a = torch.load(full / f"{name}.pt", weights_only=True)
        b = torch.load(chaos / f"{name}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert Path(f"{chaos}.trace").read_text() == Path(f"{full}.trace").read_text()
    assert records(chaos) == records(full)
    assert board(chaos) == board(full)
    assert temporaries(chaos) == []
