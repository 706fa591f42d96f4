"""Statistics over replicates: one place for the numbers a comparison rests on and the words it earns.

A student and its own teacher are paired (replicate r of the student is distilled from replicate r of
the teacher), so a comparison reads the per-replicate differences: their mean and its t interval over
replicates (n - 1 degrees of freedom). The verdict follows from the interval alone:

  better / worse           the whole interval on one side of 0 (which side is better: `lower_is_better`)
  equal within T           a claim of equality with a stated tolerance T: the whole interval in [-T, T]
  no difference resolved   the interval holds 0 (and no tolerance, or it reaches past T)
  not resolved             fewer than 2 replicates: no interval

Memorization reads the same way with the words "less" and "more". A training curve has reached a
plateau when the least-squares slope of its last points (the last third of training by default) has
a t interval that holds 0; a curve whose slope interval lies wholly on one side is still moving. The
tables and the replication report call these functions, so the same comparison gets the same words: a
claim's verdict (REPRODUCED, DISAGREES, INCONCLUSIVE: `claim_verdict`) is read off the same interval
through `verdict`. numpy and scipy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
QUALITY_WORDS = ("better", "worse")
MEMORIZATION_WORDS = ("less", "more")
UNRESOLVED = "no difference resolved"


def _t(confidence: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t interval; low and high are None for fewer than 2 values."""

    mean: float
    low: float | None
    high: float | None
    n: int


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` and its t interval (sample standard deviation, n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x) or not np.all(np.isfinite(x)):
        raise ValueError(f"need a non-empty list of finite values, got {values!r}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, len(x))
    half = _t(confidence, len(x) - 1) * float(x.std(ddof=1)) / np.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def verdict(interval: Interval, lower_is_better: bool = True, tolerance: float | None = None,
            words: tuple[str, str] = QUALITY_WORDS) -> str:
    """The word an interval of differences (first minus second) earns; see the module docstring."""
    if interval.low is None:
        return f"not resolved ({interval.n} replicate{'s' if interval.n != 1 else ''})"
    if tolerance is not None and -tolerance <= interval.low and interval.high <= tolerance:
        return f"equal within {tolerance:g}"
    good, bad = words if lower_is_better else words[::-1]
    if interval.high < 0:
        return good
    if interval.low > 0:
        return bad
    return UNRESOLVED


@dataclass(frozen=True)
class PairedDifference:
    """Per-replicate differences (first minus second), their mean, interval and verdict."""

    differences: tuple[float, ...]
    interval: Interval
    verdict: str

    def cell(self, fmt=lambda v: f"{v:+.2f}") -> str:
        """'+8.60 [-5.90, +23.10] no difference resolved' (the interval's ends in the same format)."""
        i = self.interval
        span = "" if i.low is None else f" [{fmt(i.low)}, {fmt(i.high)}]"
        return f"{fmt(i.mean)}{span} {self.verdict}"


def paired_difference(first: Sequence[float], second: Sequence[float], lower_is_better: bool = True,
                      tolerance: float | None = None, words: tuple[str, str] = QUALITY_WORDS,
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """first[r] - second[r] for each replicate r, with the t interval of their mean and its verdict."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two lists of the same length, got {len(first)} and {len(second)}")
    d = a - b
    interval = t_interval(d, confidence)
    return PairedDifference(tuple(float(v) for v in d), interval, verdict(interval, lower_is_better, tolerance, words))


@dataclass(frozen=True)
class Plateau:
    """The slope of a curve's last points with its t interval, and whether it has levelled off."""

    slope: float
    low: float | None
    high: float | None
    points: int
    verdict: str  # "plateau", "still improving", "still worsening", or "not assessed (<why>)"

    @property
    def reached(self) -> bool:
        return self.verdict == "plateau"


def plateau(steps: Sequence[float], values: Sequence[float], fraction: float = 1 / 3, min_points: int = 4,
            lower_is_better: bool = True, confidence: float = CONFIDENCE) -> Plateau:
    """Whether a training curve (e.g. quality at each snapshot and the end) has levelled off: the
    least-squares slope over its last `fraction` of training (by step), with its t interval (n - 2
    degrees of freedom). A plateau when the interval holds 0; with fewer than `min_points` points in
    that stretch the curve is not assessed rather than called flat."""
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError("give one value per step")
    order = np.argsort(s)
    s, v = s[order], v[order]
    tail = s >= s[-1] - fraction * (s[-1] - s[0]) if len(s) else np.zeros(0, dtype=bool)
    s, v = s[tail], v[tail]
    if len(s) < max(min_points, 3):
        return Plateau(float("nan"), None, None, len(s), f"not assessed ({len(s)} points in the last "
                       f"{fraction:.2g} of training, {max(min_points, 3)} needed)")
    x = s - s.mean()
    slope = float((x * (v - v.mean())).sum() / (x ** 2).sum())
    residual = v - v.mean() - slope * x
    se = float(np.sqrt((residual ** 2).sum() / (len(s) - 2) / (x ** 2).sum()))
    half = _t(confidence, len(s) - 2) * se
    low, high = slope - half, slope + half
    if low <= 0 <= high:
        word = "plateau"
    else:
        improving = high < 0 if lower_is_better else low > 0
        word = "still improving" if improving else "still worsening"
    return Plateau(slope, low, high, len(s), word)


# The replication report's verdicts (pipeline.claims), read off the same interval and verdict words.
REPRODUCED, DISAGREES, INCONCLUSIVE, NOT_MEASURED = "REPRODUCED", "DISAGREES", "INCONCLUSIVE", "NOT MEASURED"
CLAIM_VERDICTS = (REPRODUCED, DISAGREES, INCONCLUSIVE, NOT_MEASURED)


@dataclass(frozen=True)
class ClaimVerdict:
    verdict: str  # one of CLAIM_VERDICTS
    why: str      # what the interval says, e.g. "interval holds 0, leans toward the claim"


def claim_verdict(interval: Interval, expect: str, tolerance: float | None = None) -> ClaimVerdict:
    """A claim's verdict from the interval of its differences (first minus second, or value minus threshold).

    `expect` "less" or "more": REPRODUCED when the whole interval lies on the claimed side of 0, DISAGREES
    when it lies wholly on the other, else INCONCLUSIVE, saying which way the mean leans. `expect`
    "equal" (with `tolerance` T): REPRODUCED when the whole interval lies in [-T, T], DISAGREES when it
    lies wholly outside it, else INCONCLUSIVE. One replicate gives no interval: INCONCLUSIVE. The words
    are `verdict`'s, so a table and the report never read one interval two ways."""
    if expect not in ("less", "more", "equal"):
        raise ValueError(f"expect is 'less', 'more' or 'equal', got {expect!r}")
    if expect == "equal" and (tolerance is None or tolerance < 0):
        raise ValueError("a claim of equality needs a non-negative tolerance")
    word = verdict(interval, lower_is_better=True, tolerance=tolerance if expect == "equal" else None,
                   words=MEMORIZATION_WORDS)
    if expect == "equal":
        lean = "toward the claim" if abs(interval.mean) <= tolerance else "against the claim"
        if word.startswith("equal within"):
            return ClaimVerdict(REPRODUCED, f"interval inside ±{tolerance:g}")
        if interval.low is not None and (interval.low > tolerance or interval.high < -tolerance):
            return ClaimVerdict(DISAGREES, f"interval wholly outside ±{tolerance:g}")
        if interval.low is None:
            return ClaimVerdict(INCONCLUSIVE, f"{word}; leans {lean}")
        return ClaimVerdict(INCONCLUSIVE, f"interval reaches past ±{tolerance:g}; leans {lean}")
    lean = "toward the claim" if (interval.mean < 0) == (expect == "less") and interval.mean != 0 else "against the claim"
    if word == expect:
        return ClaimVerdict(REPRODUCED, f"interval wholly {'below' if expect == 'less' else 'above'} 0")
    if word in MEMORIZATION_WORDS:
        return ClaimVerdict(DISAGREES, f"interval wholly {'above' if expect == 'less' else 'below'} 0")
    if interval.low is None:
        return ClaimVerdict(INCONCLUSIVE, f"{word}; leans {lean}")
    return ClaimVerdict(INCONCLUSIVE, f"interval holds 0; leans {lean}")


def combine_verdicts(verdicts: Sequence[ClaimVerdict]) -> ClaimVerdict:
    """A pattern claim ("every student copies less than its teacher") over its comparisons: REPRODUCED
    when every one reproduces, DISAGREES when any disagrees, else INCONCLUSIVE."""
    if not verdicts:
        raise ValueError("no comparison to combine")
    words = [v.verdict for v in verdicts]
    n = len(words)
    if all(w == REPRODUCED for w in words):
        return ClaimVerdict(REPRODUCED, verdicts[0].why if n == 1 else f"all {n} comparisons")
    if DISAGREES in words:
        k = words.count(DISAGREES)
        return ClaimVerdict(DISAGREES, verdicts[words.index(DISAGREES)].why if n == 1 else f"{k} of {n} comparisons disagree")
    if n == 1:
        return verdicts[0]
    return ClaimVerdict(INCONCLUSIVE, f"{words.count(REPRODUCED)} of {n} comparisons reproduce, none disagrees")
