"""A confidence sequence for the mean of paired differences: valid at every number of seeds at once.

A fixed-n t interval covers the mean with probability 0.95 at the one n chosen in advance; re-checked after
every added seed, the chance that some look excludes a true mean of 0 grows with the looks
(tests/test_confidence_sequence.py measures it). A confidence sequence ``C_1, C_2, ...`` holds the mean at
every n simultaneously, ``P(exists n: mean not in C_n) <= alpha``, so seeds can be added while looking and a
study can stop at whatever look it likes.

Method: the t-mixture confidence sequence. Lai (1976), "On confidence sequences", Ann. Statist. 4(2),
265-280, built sequential t tests from the likelihood ratio of the scale-invariant statistic (mixing over
the unknown sigma with the right Haar measure d sigma / sigma); mixing the standardised effect over a
Gaussian, instead of Lai's flat mixture, gives a test martingale in the filtration of that statistic
(Wang and Ramdas (2023), "Anytime-valid t-tests and confidence sequences for Gaussian means with unknown
variance", arXiv:2310.03722); Ville's inequality turns it into a confidence sequence by the method of
mixtures (Howard, Ramdas, McAuliffe and Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic
confidence sequences", Ann. Statist. 49(2), 1055-1080). The formulas below are derived here.

Assumptions: the paired differences ``d_1, d_2, ...`` (variant minus reference, one per seed) are i.i.d.
Gaussian, ``N(mu, sigma^2)``, mu and sigma unknown. Seeds are independent draws, and seed k gives both sides
the same initial weights and data order (pipeline.train.data_order), so a difference cancels what the seed
does to both. The guarantee is exact under these assumptions; heavy-tailed differences weaken it.

The statistic, for a candidate mean ``m0`` (``y_i = d_i - m0``, ``S_n = sum y_i``, ``Q_n = sum y_i^2``, a
prior precision ``c > 0`` on the effect ``(mu - m0) / sigma ~ N(0, 1/c)``)::

    M_n(m0) = sqrt(c / (n + c)) * (1 - S_n^2 / ((n + c) Q_n)) ^ (-n / 2)

is the likelihood ratio of ``(y_1, ..., y_n) / |y_1|`` (alternative mixture against ``mu = m0``), a
nonnegative martingale with ``M_1 = 1`` when ``mu = m0``; Ville: ``P(exists n: M_n(mu) >= 1 / alpha) <=
alpha``. The sequence is ``C_n = {m0 : M_n(m0) < 1 / alpha}``; solved for m0 with the mean ``x_n`` and the
sum of squared deviations ``V_n = sum (d_i - x_n)^2 = (n - 1) s^2``::

    r_n = (alpha^2 c / (n + c)) ^ (1 / n)
    b_n = (n + c) (1 - r_n)
    C_n = x_n -+ sqrt(b_n V_n / (n (n - b_n)))        when n > b_n, else (-inf, inf)

``n > b_n`` holds exactly when ``alpha > (c / (n + c)) ^ ((n - 1) / 2)`` (`smallest_alpha`): below that,
no data of n seeds can exclude any mean. Pure numpy: every function takes arrays (the simulation in
tests/test_confidence_sequence.py runs thousands of studies at once) as well as numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

DEFAULT_ALPHA = 0.05
DEFAULT_PRECISION = 0.1
"""``c``, the prior precision of the standardised effect (its prior std is 1 / sqrt(c) = 3.2 sigma). Any
c > 0 keeps the guarantee; c trades width early against width late. At alpha = 0.05, c = 0.1 bounds the
sequence from 3 paired seeds (c < 0.158 does; from 2 seeds only c < 0.005, whose radius at 10 seeds is
5.1 s / sqrt(n) against 4.2 here); its radius in units of s / sqrt(n) is 13.2 at 3 seeds, 6.5 at 4, 5.4
at 5 and 4.2 at 10 (the t interval's: 4.3, 3.2, 2.8 and 2.3). In the simulation of
tests/test_confidence_sequence.py (sigma 9 PQ, at most 10 seeds) c between 0.05 and 0.15 decides a 15 PQ
difference in 81-86% of studies."""


@dataclass(frozen=True)
class TMixtureSequence:
    """The t-mixture confidence sequence at level ``1 - alpha`` with prior precision ``precision`` (c of
    the module's formulas)."""

    alpha: float = DEFAULT_ALPHA
    precision: float = DEFAULT_PRECISION
    method: ClassVar[str] = "t_mixture_cs"
    noun: ClassVar[str] = "confidence sequence (t-mixture)"
    abbreviation: ClassVar[str] = "CS"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")
        if not self.precision > 0.0:
            raise ValueError(f"the confidence sequence's precision must be > 0, got {self.precision}")

    @property
    def level(self) -> float:
        return 1.0 - self.alpha

    def radius(self, n, std):
        """Half width of ``C_n`` around the mean of n differences with sample std ``std`` (n - 1); inf where
        the sequence is unbounded (n < 2, too few seeds for this alpha, or std undefined)."""
        n = np.asarray(n, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        c = self.precision
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = np.exp((2.0 * math.log(self.alpha) + np.log(c / (n + c))) / n)
            b = (n + c) * (1.0 - r)
            radius = np.sqrt(b * (n - 1.0) * std**2 / (n * (n - b)))
        bounded = (n >= 2) & (n > b) & np.isfinite(radius)
        return np.where(bounded, radius, np.inf)

    def smallest_alpha(self, n):
        """The alpha above which n seeds can bound the sequence: ``(c / (n + c)) ^ ((n - 1) / 2)``."""
        n = np.asarray(n, dtype=np.float64)
        return (self.precision / (n + self.precision)) ** ((n - 1.0) / 2.0)

    def first_bounded_seeds(self) -> int:
        """The fewest paired seeds at which this sequence can be bounded (3 at the defaults)."""
        n = 2
        while self.smallest_alpha(n) >= self.alpha:
            n += 1
        return n

    def statistic(self, differences, mean0: float) -> float:
        """``M_n(mean0)`` of the module's formula for the differences seen so far (1 for none); the
        sequence holds exactly the ``mean0`` whose statistic is below 1 / alpha."""
        y = np.asarray(differences, dtype=np.float64) - mean0
        n, c = y.size, self.precision
        squares = float(np.sum(y**2))
        if n == 0:
            return 1.0
        # every difference equal to mean0: S_n = Q_n = 0, and no evidence against mean0 (ratio taken as 0)
        ratio = y.sum() ** 2 / ((n + c) * squares) if squares > 0 else 0.0
        return math.sqrt(c / (n + c)) * (1.0 - ratio) ** (-n / 2.0)
