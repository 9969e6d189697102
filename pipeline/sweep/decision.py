"""The decision of a paired comparison (variant - reference, in PQ), from an interval of the mean difference.

    better       the interval lies above 0 (excludes 0: the variant is ahead)
    worse        the interval lies below 0
    equivalent   the interval lies inside [-margin, margin] and includes 0 (no difference that matters)
    undecided    otherwise

An interval that excludes 0 inside the margin reads "better" / "worse": the difference is shown, if small.
The interval comes from an interval kind: `pipeline.sweep.seed_stats.StudentT` (the fixed-seed study: valid
for a number of seeds fixed in advance) or `pipeline.sweep.confidence_sequence.TMixtureSequence` (the
until-decided study: valid at every number of seeds, so decisions can be taken while seeds are added).
A `Design` says which one a sweep used; it is recorded on the sweep's parent run (`Design.params`) so that
`kmax compare` decides as the sweep did. Every function takes numpy arrays as well as numbers: the
simulation of tests/test_confidence_sequence.py runs the sweep's own rule on thousands of studies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.sweep.confidence_sequence import DEFAULT_PRECISION, TMixtureSequence
from pipeline.sweep.seed_stats import MIN_SEEDS, PairedDifference, StudentT

BETTER, WORSE, EQUIVALENT, UNDECIDED = "better", "worse", "equivalent", "undecided"
DECISIONS = (BETTER, WORSE, EQUIVALENT, UNDECIDED)
DEFAULT_MARGIN = 0.5
"""PQ points: a difference inside +-this is one that does not matter (``--margin``)."""
SEEDS_NEEDED_CAP = 1000
"""Paired seeds beyond which the estimate of the seeds a decision needs is given as "more than this"."""
DESIGN_PARAM, ALPHA_PARAM, MARGIN_PARAM, PRECISION_PARAM = "design", "alpha", "margin", "cs_precision"
"""Parent-run params of an until-decided sweep (absent on a fixed-seed sweep)."""
UNTIL_DECIDED = "until_decided"


class IntervalKind(Protocol):
    """What a decision needs of an interval: its name for stats.json (``method``), for the reader (``noun``,
    ``abbreviation``: `Design.label`, `Design.header`), its level and its half width around the mean of n
    values with sample std ``std``."""

    method: str
    noun: str
    abbreviation: str

    @property
    def level(self) -> float: ...

    def radius(self, n, std): ...


def decide(mean, radius, margin: float):
    """The decision (module docstring) of the interval ``mean -+ radius``; an array of strings (a 0-d
    array for numbers: ``str()`` it). An infinite or nan radius, or a nan mean, is undecided."""
    low = np.asarray(mean, dtype=np.float64) - radius
    high = np.asarray(mean, dtype=np.float64) + radius
    with np.errstate(invalid="ignore"):
        inside = (low >= -margin) & (high <= margin)
        return np.select([low > 0, high < 0, inside], [BETTER, WORSE, EQUIVALENT], UNDECIDED)


def seeds_needed(kind: IntervalKind, n: int, mean: float, std: float, margin: float) -> int | None:
    """A rough estimate: the fewest paired seeds (> n) at which ``kind``'s interval would decide, if the
    mean and the std stayed as observed. None without a std (n < 2) or beyond `SEEDS_NEEDED_CAP`."""
    if n < MIN_SEEDS or not (math.isfinite(mean) and math.isfinite(std)):
        return None
    more = np.arange(n + 1, SEEDS_NEEDED_CAP + 1)
    decided = np.flatnonzero(decide(mean, kind.radius(more, std), margin) != UNDECIDED)
    return int(more[decided[0]]) if decided.size else None


@dataclass(frozen=True)
class Comparison:
    """One variant against the reference: the interval of the mean paired difference (``low``, ``high``:
    -inf / inf when unbounded, nan without values), its decision, the method that gave the interval, and
    for an undecided one the estimate of the paired seeds that would decide it (`seeds_needed`)."""

    variant: str
    reference: str
    n: int
    mean: float
    std: float
    low: float
    high: float
    decision: str
    method: str
    seeds_needed: int | None = None

    def interval_text(self, fmt: str = ".2f") -> str:
        """``[low, high]``; ``unbounded`` when too few seeds bound it; ``undefined (n = 1)``; ``n/a``."""
        if self.n == 0:
            return "n/a"
        if self.n < MIN_SEEDS:
            return f"undefined (n = {self.n})"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "unbounded"
        return f"[{self.low:{fmt}}, {self.high:{fmt}}]"

    def needed_text(self) -> str:
        """The estimate for the reader: ``~12 (9 more)``, ``> 1000``, ``-`` when decided."""
        if self.decision != UNDECIDED:
            return "-"
        if self.n < MIN_SEEDS:
            return f">= {MIN_SEEDS}"
        if self.seeds_needed is None:
            return f"> {SEEDS_NEEDED_CAP}"
        return f"~{self.seeds_needed} ({self.seeds_needed - self.n} more)"


def compare_pair(d: PairedDifference, kind: IntervalKind, margin: float) -> Comparison:
    """The `Comparison` of a paired difference under ``kind`` and ``margin``."""
    iv = d.diff
    radius = float(kind.radius(iv.n, iv.std)) if iv.n >= MIN_SEEDS else math.inf
    decision = str(decide(iv.mean, radius, margin)) if iv.n >= MIN_SEEDS else UNDECIDED
    needed = seeds_needed(kind, iv.n, iv.mean, iv.std, margin) if decision == UNDECIDED else None
    low, high = (iv.mean - radius, iv.mean + radius) if iv.n else (math.nan, math.nan)
    return Comparison(d.variant, d.reference, iv.n, iv.mean, iv.std, low, high, decision, kind.method, needed)


@dataclass(frozen=True)
class Design:
    """How a sweep's comparisons are decided: the interval kind and the margin; ``sequential``: seeds were
    added while looking (an until-decided sweep), so only an anytime-valid kind is sound."""

    kind: IntervalKind
    margin: float = DEFAULT_MARGIN
    sequential: bool = False

    @property
    def label(self) -> str:
        """How the report names its interval: ``95% t interval (fixed number of seeds)``."""
        return f"{self.kind.level:.0%} {self.kind.noun}"

    @property
    def header(self) -> str:
        """A table column's name for its interval: ``95% CI``, ``95% CS``."""
        return f"{self.kind.level:.0%} {self.kind.abbreviation}"

    @classmethod
    def fixed(cls, margin: float = DEFAULT_MARGIN) -> Design:
        """A fixed-seed study: the t interval of pipeline.sweep.seed_stats."""
        return cls(StudentT(), margin)

    @classmethod
    def until_decided(cls, alpha: float, margin: float, precision: float = DEFAULT_PRECISION) -> Design:
        return cls(TMixtureSequence(alpha, precision), margin, sequential=True)

    def params(self) -> dict[str, str]:
        """The parent-run params that record an until-decided design ({} for a fixed one)."""
        if not self.sequential:
            return {}
        kind = self.kind
        assert isinstance(kind, TMixtureSequence)
        return {DESIGN_PARAM: UNTIL_DECIDED, ALPHA_PARAM: str(kind.alpha), MARGIN_PARAM: str(self.margin),
                PRECISION_PARAM: str(kind.precision)}  # fmt: skip

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Design:
        """The design a sweep's parent-run params record (`params`); a fixed one when they record none."""
        if params.get(DESIGN_PARAM) != UNTIL_DECIDED:
            return cls.fixed()
        return cls.until_decided(
            float(params[ALPHA_PARAM]), float(params[MARGIN_PARAM]), float(params[PRECISION_PARAM])
        )
