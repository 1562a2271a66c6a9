"""CIFAR-100 pickles are read by an unpickler that admits only what a CIFAR file holds: a hostile pickle is refused
with one line naming the file, and none of its code runs."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fastkd.data.folders import _unpickle, load_cifar100
from fastkd.data.synth import write


class _WritesMarker:
    """Pickled as a call of os.system that would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def cifar(tmp_path):
    return write(tmp_path / "cifar", "cifar100", num_classes=3, per_class=4, seed=0)


def _plant_hostile_train(root, marker):
    train = root / "cifar-100-python" / "train"
    with open(train, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"x": _WritesMarker(marker)}, f)
    return train


def test_the_synthetic_cifar_layout_still_loads(cifar):
    data = load_cifar100(cifar)
    assert data.info.num_classes == 3 and data.train_x.shape == (12, 3, 32, 32) and data.train_y.tolist() == [
        0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_bytes_and_lists_load_under_every_protocol_a_cifar_file_may_use(tmp_path, protocol):
    record = {b"data": np.arange(3072, dtype=np.uint16).astype(np.uint8).reshape(1, 3072), b"fine_labels": [7],
              b"batch_label": b"training batch 1 of 1", b"empty": b"", b"name": "str", b"scale": 0.5}
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps(record, protocol=protocol))
    loaded = _unpickle(path)
    assert np.array_equal(loaded.pop(b"data"), record.pop(b"data")) and loaded == record


def test_a_pickle_that_would_run_os_system_is_refused_and_nothing_runs(cifar, tmp_path):
    marker = tmp_path / "ran"
    train = _plant_hostile_train(cifar, marker)
    with pytest.raises(ValueError, match=f"{train}.*posix.system") as error:
        load_cifar100(cifar)
    assert len(str(error.value).splitlines()) == 1
    assert not marker.exists()


def test_the_cli_prints_one_line_naming_the_hostile_file_and_exits_2(cifar, tmp_path):
    marker = tmp_path / "ran"
    train = _plant_hostile_train(cifar, marker)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastkd.train", "--dataset", "cifar100", "--data-dir", str(cifar),
                           "--teacher", "tiny", "--student", "tiny", "--epochs", "1", "--quiet", "--loader", "torch",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fastkd.train: error: CIFAR-100 layout: ") and str(train) in line
    assert not marker.exists() and not out.exists()
