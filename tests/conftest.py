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
