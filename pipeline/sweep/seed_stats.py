"""Statistics over seeds: the mean of a variant with its t interval, and paired differences between variants.

A sweep replicates every variant over seeds (``train.seed`` = 0..seeds-1; the seed fixes the initial weights
and the data order, pipeline.train.data_order). Two runs with the same seed differ only in the variant, so
variants are compared seed by seed (a paired design): the per-seed differences cancel what the seed does to
both sides.

Formulas (``n`` values ``x_1..x_n``, confidence ``c``, `CONFIDENCE` = 0.95 unless given):

    mean        m = (x_1 + ... + x_n) / n
    sample std  s = sqrt(sum_i (x_i - m)^2 / (n - 1))                    (n >= 2; undefined for n = 1)
    interval    m -+ t_{(1 + c) / 2, n - 1} * s / sqrt(n)                (Student t, n - 1 degrees of freedom)

A paired difference is the same interval over ``d_k = v_k - r_k``, one per seed ``k`` that both the variant
(``v``) and the reference (``r``) have; a seed that only one side has is left out (and named). With fewer
than `MIN_SEEDS` values there is no interval: it is undefined, never +-0.

No bootstrap interval: with the 2-5 seeds a sweep affords, the percentile bootstrap of a mean has very few
distinct resamples (10 for n = 3) and its width is about ``z * s * sqrt((n - 1) / n) / sqrt(n)``, against
``t * s / sqrt(n)`` here: for n = 3, 1.96 * 0.82 = 1.6 against t = 4.30, an interval under half as wide
that would claim differences the seeds do not show. It only approaches the t interval from ~20 seeds on.

Pure Python (numpy, scipy): no MLflow, no Ray. Values must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
"""Two-sided confidence level of every interval of the report."""
MIN_SEEDS = 2
"""Values (seeds, or paired seeds) an interval needs: one value has no sample std."""


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """``t_{(1 + confidence) / 2, n - 1}``: the Student t quantile of a two-sided interval of n values."""
    if n < MIN_SEEDS:
        raise ValueError(f"a t interval needs >= {MIN_SEEDS} values, got {n}")
    return float(_two_sided_t(n, confidence))


def _two_sided_t(n, confidence: float):
    """``t_{(1 + confidence) / 2, n - 1}`` for a number or an array of n (nan where n < 2)."""
    return stats.t.ppf((1.0 + confidence) / 2.0, np.asarray(n, dtype=np.float64) - 1.0)


def t_radius(n, std, confidence: float = CONFIDENCE):
    """``t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)``, the half width of the t interval of a mean of n
    values with sample std ``std``; arrays or numbers; inf where n < `MIN_SEEDS` (no interval)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        radius = _two_sided_t(n, confidence) * np.asarray(std, np.float64) / np.sqrt(n)
    return np.where(n >= MIN_SEEDS, radius, np.inf)


@dataclass(frozen=True)
class StudentT:
    """The fixed-n t interval as an interval kind (pipeline.sweep.decision): valid for a number of seeds
    fixed before looking, not for one chosen by looking (pipeline.sweep.confidence_sequence is)."""

    confidence: float = CONFIDENCE
    method: ClassVar[str] = "student_t"
    noun: ClassVar[str] = "t interval (fixed number of seeds)"
    abbreviation: ClassVar[str] = "CI"

    @property
    def level(self) -> float:
        return self.confidence

    def radius(self, n, std):
        """`t_radius`: the half width of the interval of a mean of n values with sample std ``std``."""
        return t_radius(n, std, self.confidence)


@dataclass(frozen=True)
class MeanInterval:
    """The mean of ``n`` values, their sample std and the half width of the t interval of the mean.

    ``mean`` is nan for n = 0; ``std`` and ``half_width`` are nan for n < `MIN_SEEDS` (undefined)."""

    n: int
    mean: float
    std: float
    half_width: float
    confidence: float = CONFIDENCE

    @property
    def defined(self) -> bool:
        """Whether the interval exists (n >= `MIN_SEEDS`)."""
        return self.n >= MIN_SEEDS

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """True when the interval exists and lies strictly on one side of 0."""
        return self.defined and (self.low > 0.0 or self.high < 0.0)

    def format(self, fmt: str = ".2f") -> str:
        """``[low, high]``; ``undefined (n = 1)`` without an interval; ``n/a`` without values."""
        if self.n == 0:
            return "n/a"
        if not self.defined:
            return f"undefined (n = {self.n})"
        return f"[{self.low:{fmt}}, {self.high:{fmt}}]"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean, sample std (n - 1) and the t interval of the mean of ``values`` (see the module's formulas)."""
    x = np.asarray(list(values), dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x.tolist()}")
    n = int(x.size)
    if n == 0:
        return MeanInterval(0, math.nan, math.nan, math.nan, confidence)
    mean = float(x.mean())
    if n < MIN_SEEDS:
        return MeanInterval(n, mean, math.nan, math.nan, confidence)
    std = float(x.std(ddof=1))
    return MeanInterval(n, mean, std, float(t_radius(n, std, confidence)), confidence)


@dataclass(frozen=True)
class PairedDifference:
    """``variant - reference`` over the seeds both have: ``diff`` is the interval of the mean difference.

    ``seeds``: the paired seeds (sorted); ``only_variant`` / ``only_reference``: seeds one side lacks."""

    variant: str
    reference: str
    seeds: tuple[str, ...]
    only_variant: tuple[str, ...]
    only_reference: tuple[str, ...]
    diff: MeanInterval


def _seed_order(seed: str) -> tuple[int, float, str]:
    """Numeric seeds in numeric order ("2" before "10"), then the others by name."""
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def paired_difference(
    variant: str,
    values: Mapping[str, float],
    reference: str,
    reference_values: Mapping[str, float],
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """The interval of the mean of ``values[k] - reference_values[k]`` over the seeds ``k`` in both mappings
    (seed -> value of that seed's run); seeds on one side only are left out and listed."""
    paired = tuple(sorted(set(values) & set(reference_values), key=_seed_order))
    diff = mean_interval([values[k] - reference_values[k] for k in paired], confidence)
    return PairedDifference(
        variant,
        reference,
        paired,
        tuple(sorted(set(values) - set(reference_values), key=_seed_order)),
        tuple(sorted(set(reference_values) - set(values), key=_seed_order)),
        diff,
    )


def _unpaired_note(d: PairedDifference) -> str:
    sides = ((d.only_variant, d.variant), (d.only_reference, d.reference))
    parts = [f"seed{'s' * (len(s) > 1)} {', '.join(s)} only in {name}" for s, name in sides if s]
    return f"; left out: {'; '.join(parts)}" if parts else ""


def verdict(d: PairedDifference, unit: str = "PQ", fmt: str = ".2f") -> str:
    """One plain-language line (higher ``unit`` is better), e.g.

    - ``argmax beats spatial_softmax by 3.80 PQ, 95% CI [2.10, 5.50] (3 paired seeds)``: the interval
      excludes 0 (the interval shown is of the winner's lead, so both bounds are positive);
    - ``no difference shown between argmax and spatial_softmax (argmax - spatial_softmax = +0.40 PQ,
      95% CI [-1.20, 2.00]; 3 paired seeds)``: it does not;
    - ``argmax vs spatial_softmax: needs >= 2 paired seeds (has 1)``: no interval.

    Seeds that only one side has are named at the end."""
    iv, level = d.diff, f"{d.diff.confidence:.0%}"
    if not iv.defined:
        text = f"{d.variant} vs {d.reference}: needs >= {MIN_SEEDS} paired seeds (has {iv.n})"
    elif iv.excludes_zero():
        win, lose, sign = (d.variant, d.reference, 1.0) if iv.mean > 0 else (d.reference, d.variant, -1.0)
        lo, hi = sorted((sign * iv.low, sign * iv.high))
        text = (
            f"{win} beats {lose} by {sign * iv.mean:{fmt}} {unit}, {level} CI [{lo:{fmt}}, {hi:{fmt}}] "
            f"({iv.n} paired seeds)"
        )
    else:
        text = (
            f"no difference shown between {d.variant} and {d.reference} ({d.variant} - {d.reference} = "
            f"{iv.mean:+{fmt}} {unit}, {level} CI {iv.format(fmt)}; {iv.n} paired seeds)"
        )
    return text + _unpaired_note(d)
