"""Deprecated: renamed fastkd.step_functions (Updates is StepFunctions there, UPDATES is STEP_FUNCTIONS, and the term
names are in fastkd.step_terms). Kept for one release."""
import warnings

from .step_functions import (
                             FEATURE_LOSSES,
                             SOFT_TARGET_KINDS,
                             STEP_FUNCTIONS,
                             LossSettings,
                             StepFunctions,
                             advance_step,
                             ce_step,
                             distill_step,
                             feature_loss,
                             replay_step,
                             self_distill_step,
                             soft_loss,
)
from .step_terms import MAX_TERMS, TERM_NAMES

Updates = StepFunctions
UPDATES = STEP_FUNCTIONS
__all__ = ["FEATURE_LOSSES", "MAX_TERMS", "SOFT_TARGET_KINDS", "TERM_NAMES", "UPDATES", "LossSettings", "Updates",
           "advance_step", "ce_step", "distill_step", "feature_loss", "replay_step", "self_distill_step", "soft_loss"]

warnings.warn("fastkd.updates is deprecated; import from fastkd.step_functions (Updates is named StepFunctions)",
              DeprecationWarning, stacklevel=2)
