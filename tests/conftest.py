import os

import torch

# Without a GPU the Triton kernels run in the interpreter; it must be switched on before any kernel is defined,
# i.e. before fastkd is imported by the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
