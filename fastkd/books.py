"""Deprecated: renamed fastkd.step_records (StepBooks is StepRecorder there). Kept for one release."""
import warnings

from .step_records import LabelGuard, LrSchedule, NonFiniteGuard, RunningMean, StepRecorder

StepBooks = StepRecorder
__all__ = ["LabelGuard", "LrSchedule", "NonFiniteGuard", "RunningMean", "StepBooks"]

warnings.warn("fastkd.books is deprecated; import from fastkd.step_records (StepBooks is named StepRecorder)",
              DeprecationWarning, stacklevel=2)
