"""The t-mixture confidence sequence (pipeline.sweep.confidence_sequence) against its definition, the
decision rule (pipeline.sweep.decision), and a simulation of thousands of sequential studies run by the
sweep's own decision function and seed-adding rule (pipeline.sweep.until_decided.keeps_adding): under no
difference it decides "better" or "worse" at most alpha of the time, where fixed-n t intervals re-checked
after every seed do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from pipeline.sweep.confidence_sequence import DEFAULT_ALPHA, TMixtureSequence
from pipeline.sweep.decision import (
    BETTER,
    DEFAULT_MARGIN,
    EQUIVALENT,
    UNDECIDED,
    WORSE,
    Design,
    compare_pair,
    decide,
    seeds_needed,
)
from pipeline.sweep.seed_stats import MIN_SEEDS, StudentT, paired_difference, t_radius
from pipeline.sweep.until_decided import DEFAULT_MAX_SEEDS, keeps_adding

CS = TMixtureSequence()


def _mixture_by_quadrature(y: np.ndarray, c: float) -> float:
    """The mixture likelihood ratio by numerical integration (trapezoid on a grid), straight from its
    definition: the effect theta = delta * sigma with delta ~ N(0, 1/c), sigma under the right Haar measure
    d sigma / sigma, against theta = 0 under the same measure (both on a grid of log sigma)."""
    scale = math.log(float(np.sqrt(np.mean(y**2))))
    log_sigma = np.linspace(scale - 6.0, scale + 6.0, 801)[:, None]
    sigma = np.exp(log_sigma)
    theta = np.linspace(-40.0, 40.0, 2001)[None, :]
    squares = np.sum(y**2) - 2 * theta * np.sum(y) + y.size * theta**2
    likelihood = sigma ** (-y.size) * np.exp(-squares / (2 * sigma**2))
    prior = stats.norm.pdf(theta, 0.0, sigma / math.sqrt(c))
    num = integrate.trapezoid(integrate.trapezoid(likelihood * prior, theta[0], axis=1), log_sigma[:, 0])
    null = sigma[:, 0] ** (-y.size) * np.exp(-np.sum(y**2) / (2 * sigma[:, 0] ** 2))
    return float(num / integrate.trapezoid(null, log_sigma[:, 0]))


def test_closed_form_statistic_is_the_mixture_it_claims():
    y = np.array([1.3, -0.4, 2.2, 0.9])
    for c in (0.1, 1.0):
        closed = TMixtureSequence(precision=c).statistic(y, 0.0)
        assert closed == pytest.approx(_mixture_by_quadrature(y, c), rel=1e-6)
    assert CS.statistic([3.7], 0.0) == pytest.approx(1.0)  # one value: no evidence (M_1 = 1)


def test_the_interval_is_where_the_statistic_stays_below_one_over_alpha():
    d = np.array([4.0, 4.5, 3.0, 6.0, 5.1])
    mean, std = d.mean(), d.std(ddof=1)
    r = float(CS.radius(d.size, std))
    for edge in (mean - r, mean + r):
        assert CS.statistic(d, edge) == pytest.approx(1 / DEFAULT_ALPHA, rel=1e-9)
    assert CS.statistic(d, mean) < 1 / DEFAULT_ALPHA < CS.statistic(d, mean + 1.01 * r)
    # by hand for n = 5, c = 0.1: r_n = (0.05^2 * 0.1 / 5.1)^(1/5), b_n = 5.1 (1 - r_n)
    rn = (0.05**2 * 0.1 / 5.1) ** 0.2
    bn = 5.1 * (1 - rn)
    assert r == pytest.approx(math.sqrt(bn * 4 * std**2 / (5 * (5 - bn))))


def test_sequence_is_wider_than_the_t_interval_and_bounded_from_three_seeds():
    n = np.arange(2, 60)
    assert np.all(CS.radius(n, 1.0) > t_radius(n, 1.0))
    assert np.all(np.diff(CS.radius(n[1:], 1.0)) < 0)  # narrows with every seed
    assert CS.first_bounded_seeds() == 3 and math.isinf(CS.radius(2, 1.0))
    assert CS.smallest_alpha(2) == pytest.approx(math.sqrt(0.1 / 2.1))
    just_above = TMixtureSequence(alpha=float(CS.smallest_alpha(2)) * 1.001)
    assert just_above.first_bounded_seeds() == 2 and math.isfinite(just_above.radius(2, 1.0))
    assert math.isinf(CS.radius(1, 0.0)) and math.isinf(CS.radius(5, math.nan))
    with pytest.raises(ValueError, match="--alpha"):
        TMixtureSequence(alpha=1.5)


def test_decisions_by_hand():
    got = decide(np.array([3.0, -3.0, 0.1, 0.1, 0.3, 0.0]), np.array([1.0, 1.0, 0.3, 1.0, 0.2, np.inf]), 0.5)
    assert got.tolist() == [BETTER, WORSE, EQUIVALENT, UNDECIDED, BETTER, UNDECIDED]
    assert str(decide(1.0, 0.5, 0.5)) == BETTER
    # the t interval of 2 paired seeds +-1: mean 0, std sqrt 2, radius 12.71; equivalence inside +-0.5 needs
    # t_{N-1} sqrt(2) / sqrt(N) <= 0.5: N = 34 (33 gives 0.5014)
    assert seeds_needed(StudentT(), 2, 0.0, math.sqrt(2), 0.5) == 34
    assert seeds_needed(StudentT(), 1, 0.0, math.nan, 0.5) is None
    assert seeds_needed(CS, 3, 0.0, 9.0, 0.5) is None  # beyond SEEDS_NEEDED_CAP


def test_a_comparison_under_either_design():
    d = paired_difference("v", {"0": 44.0, "1": 45.5, "2": 45.0}, "r", {"0": 40.0, "1": 41.0, "2": 42.0})
    fixed = compare_pair(d, StudentT(), DEFAULT_MARGIN)
    assert (fixed.decision, fixed.method, fixed.n) == (BETTER, "student_t", 3)
    assert fixed.interval_text() == "[1.94, 5.73]" and fixed.needed_text() == "-"
    sequential = Design.until_decided(0.05, DEFAULT_MARGIN)
    cs = compare_pair(d, sequential.kind, sequential.margin)
    assert cs.decision == UNDECIDED and cs.method == "t_mixture_cs"
    assert (cs.low, cs.high) == pytest.approx(
        (23 / 6 - CS.radius(3, d.diff.std), 23 / 6 + CS.radius(3, d.diff.std))
    )
    assert cs.seeds_needed == 4 and cs.needed_text() == "~4 (1 more)"
    assert Design.from_params(sequential.params()) == sequential and Design.from_params({}) == Design.fixed()


# ---- the simulation ---------------------------------------------------------------------------------------

STUDIES = 4000
SIGMA = 9.0  # std of a paired difference in PQ: the demo's argmax seeds gave 57.8 and 72.4
EFFECTS = (0.0, DEFAULT_MARGIN, 10.0, 15.0, 20.0)  # true mean differences, PQ: none, the margin, clear ones
CLEAR = 20.0


def _sequential_studies(kind, effect: float, rng: np.random.Generator):
    """STUDIES sequential studies of one comparison with true mean ``effect``: MIN_SEEDS paired seeds, then
    one more while the sweep's rule (`keeps_adding`) says so, each look decided by the sweep's `decide` on
    ``kind``'s interval. Returns (final decision, seeds used) per study."""
    d = effect + SIGMA * rng.standard_normal((STUDIES, DEFAULT_MAX_SEEDS))
    n = np.arange(1, DEFAULT_MAX_SEEDS + 1)
    means = np.cumsum(d, axis=1) / n
    deviations = np.cumsum(d**2, axis=1) - n * means**2
    stds = np.sqrt(np.maximum(deviations, 0.0) / np.maximum(n - 1, 1))
    decision = np.full(STUDIES, UNDECIDED, dtype=object)
    seeds = np.full(STUDIES, MIN_SEEDS)
    going = np.ones(STUDIES, dtype=bool)
    for k in range(MIN_SEEDS, DEFAULT_MAX_SEEDS + 1):
        now = decide(means[:, k - 1], kind.radius(k, stds[:, k - 1]), DEFAULT_MARGIN)
        decision = np.where(going, now, decision)
        seeds = np.where(going, k, seeds)
        going &= keeps_adding(decision, seeds, DEFAULT_MAX_SEEDS)
    return decision, seeds


def test_sequential_decisions_keep_alpha_where_repeated_t_intervals_do_not(capsys):
    rng = np.random.default_rng(27)
    allowance = 3.0 * math.sqrt(DEFAULT_ALPHA * (1 - DEFAULT_ALPHA) / STUDIES)  # 3 binomial std
    rows = []
    for effect in EFFECTS:
        for name, kind in (("confidence sequence", CS), ("t re-checked", StudentT(1 - DEFAULT_ALPHA))):
            decision, seeds = _sequential_studies(kind, effect, rng)
            shares = {x: float(np.mean(decision == x)) for x in (BETTER, WORSE, EQUIVALENT, UNDECIDED)}
            rows.append((effect, name, shares, float(seeds.mean())))
    table = {(effect, name): (shares, seeds) for effect, name, shares, seeds in rows}
    with capsys.disabled():
        print(
            f"\n{STUDIES} sequential studies per row, paired-difference std {SIGMA} PQ, {MIN_SEEDS}.."
            f"{DEFAULT_MAX_SEEDS} seeds, alpha {DEFAULT_ALPHA}, margin {DEFAULT_MARGIN} PQ"
        )
        for effect, name, shares, seeds in rows:
            cells = "  ".join(f"{k} {v:.3f}" for k, v in shares.items())
            print(f"  true difference {effect:5.1f} PQ, {name:19s}: {cells}  mean seeds {seeds:.2f}")
    null_cs, _ = table[(0.0, "confidence sequence")]
    null_t, _ = table[(0.0, "t re-checked")]
    assert null_cs[BETTER] + null_cs[WORSE] <= DEFAULT_ALPHA + allowance
    assert null_t[BETTER] + null_t[WORSE] > 2 * DEFAULT_ALPHA + allowance  # the inflation this avoids
    clear, clear_seeds = table[(CLEAR, "confidence sequence")]
    assert clear[BETTER] > 0.95 and clear[WORSE] == 0.0 and clear_seeds < DEFAULT_MAX_SEEDS - 3
    margin, _ = table[(DEFAULT_MARGIN, "confidence sequence")]
    assert margin[WORSE] <= DEFAULT_ALPHA + allowance  # the wrong sign, at the margin
