"""Summaries over seeds: mean ± std and paired differences with a Student-t 95% confidence interval."""
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import scipy.stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std is NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom (scipy.stats)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(scipy.stats.t.ppf(p, df))


@dataclass
class PairedDifference:
    mean: float  # mean of (a − b) over the paired seeds
    low: float  # 95% confidence interval of that mean
    high: float
    n: int
    wins: int  # seeds where a > b
    losses: int  # seeds where a < b

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """a − b paired by seed (same seed: same initialisation, data subset and batch order); the interval is
    scipy.stats.ttest_rel's."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of at least 2 paired values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    with warnings.catch_warnings():
        # Equal differences on every seed: scipy warns of precision loss, and the interval is that difference.
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = scipy.stats.ttest_rel(a, b).confidence_interval(confidence)
    return PairedDifference(mean_std(diffs)[0], float(interval.low), float(interval.high), len(diffs),
                            sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
