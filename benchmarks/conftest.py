import os

import torch

# Kernels must compile for the GPU when one is present; the interpreter is only for correctness tests on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
