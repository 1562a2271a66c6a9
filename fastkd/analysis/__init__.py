"""Flatness of trained networks (Hessian trace, sharpness, loss profiles), statistics over seeds, and plots."""
from .flatness import Estimate, hutchinson_trace, loss_profile, random_direction, save_profile, sharpness, training_loss
from .stats import PairedDifference, mean_std, paired_difference, t_quantile

__all__ = ["Estimate", "PairedDifference", "hutchinson_trace", "loss_profile", "mean_std", "paired_difference",
           "random_direction", "save_profile", "sharpness", "t_quantile", "training_loss"]
