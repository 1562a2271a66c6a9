import os
import random
import zlib

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; it must be switched on before any kernel is defined,
# i.e. before fastkd is imported by the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_per_test(request):
    """Every test draws its own random inputs, the same ones on every run: the global generators are seeded from
    the test's id, so a failure reproduces and no test depends on the ones that ran before it."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The CPU kernel's loader with its own empty cache folder and no install-time library; the process's kernel is
    loaded again afterwards."""
    from fastkd.kernels import _kd_loss_cpu  # here, not at the top: TRITON_INTERPRET must be set before fastkd loads

    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_kd_loss_cpu, "installed_library", lambda: tmp_path / "not-installed.so")
    _kd_loss_cpu.kernel.cache_clear()
    yield tmp_path / "cache"
    _kd_loss_cpu.kernel.cache_clear()
