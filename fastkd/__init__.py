"""fastkd: a fast training engine for Spaced Knowledge Distillation."""

__version__ = "0.1.0"
