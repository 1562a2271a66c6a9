"""Training precision: which dtype autocast runs the forward passes in, and what each device supports.

Master weights, gradients and the SGD state stay float32 in every precision; only the forward's matmuls and
convolutions run in the autocast dtype, and kd_loss receives its logits in that dtype (accumulating in float32).
"""
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def default_precision(device: str) -> str:
    """bf16 on a CUDA device that supports it, fp32 elsewhere (`device` as the --device flag gives it)."""
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "bf16" if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_precision(precision: str, device: str) -> None:
    """Raise ValueError naming --precision for a value that cannot run here."""
    if precision == "fp16":
        # float16 needs loss scaling against gradient underflow; bf16 has float32's range and needs none.
        raise ValueError("--precision fp16 is refused: float16 training needs loss scaling, which fastkd does not "
                         "do; use --precision bf16 (float32's range, no scaling, the same tensor-core speed)")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and device.startswith("cuda") and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support; "
                         f"use --precision fp32")


def autocast(dtype: Optional[torch.dtype], device_type: str):
    """The forward's autocast context (a no-op for fp32); traced into a compiled step like any other op."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
