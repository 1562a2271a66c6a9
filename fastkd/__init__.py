"""fastkd: a fast training engine for Spaced Knowledge Distillation.

`fastkd.fit(...)` trains (see fastkd.api); `fastkd.kernels.kd_loss` is the fused loss. `fit` is imported on first
use, so that `import fastkd.kernels.kd_loss` does not pull in the training engine.
"""

__version__ = "0.1.0"
__all__ = ["fit"]


def __getattr__(name):
    if name == "fit":
        from .api import fit

        return fit
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
