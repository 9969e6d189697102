"""`kmax sweep --study S --until-decided`: seeds added one at a time where a comparison is still open.

    kmax sweep --study design --until-decided [--max-seeds 10] [--margin 0.5] [--alpha 0.05]
               [--budget 40gpu-h | 2.5cpu-h] [--resume] ...

Each round is one `pipeline.sweep.driver.run_sweep` call on the same sweep (its storage, its MLflow parent
run, its trials' resume bookkeeping), so an until-decided sweep runs wherever a fixed one runs:

1. run the study's seeds, at least 2 per variant (`initial_seeds`);
2. look (`take_look`): every variant against the study's reference on the seeds both ran, read from MLflow
   as the report reads them, under the t-mixture confidence sequence (pipeline.sweep.confidence_sequence)
   and the decision rule of pipeline.sweep.decision;
3. the seed-adding rule (`keeps_adding`): a comparison still undecided with fewer than ``--max-seeds``
   paired seeds gets the next seed of its variant, and the reference gets that seed too (seed k of every
   variant shares initial weights and data order: the pairs stay pairs); a decided comparison gets none;
4. stop when no comparison gets a seed (all decided, or the open ones at ``--max-seeds``) or when the next
   round would pass ``--budget``: its trials estimated at the mean cost of each variant's trials so far
   (the report's cost: wall seconds x the workers' GPUs or CPUs), else run that round and look again.

The first round is never cut by the budget (nothing is known of the cost before it). Each comparison errs
at most alpha; as in the fixed-seed report, there is no correction across the study's comparisons.

Each look is recorded (pipeline.sweep.looks) before the next round starts: ``--resume`` runs the missing
trials of the round under way and takes its look; ``--max-seeds`` and ``--budget`` may be raised on a
resume (the sequence is valid at any number of seeds), alpha, margin and the initial seeds may not. The
parent run gets the design (`pipeline.sweep.decision.Design.params`) and the tags of pipeline.sweep.looks;
at the end the report is written (pipeline.sweep.report: per comparison its decision, method, seeds, cost,
and for an undecided one its interval and an estimate of the seeds it would need).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ExperimentConfig
from pipeline.sweep.confidence_sequence import DEFAULT_ALPHA, DEFAULT_PRECISION
from pipeline.sweep.decision import DEFAULT_MARGIN, UNDECIDED, Design, compare_pair
from pipeline.sweep.looks import (
    BUDGET_TAG,
    LOOKS_FILE,
    LOOKS_TAG,
    MAX_SEEDS_TAG,
    STOP_BUDGET,
    STOP_DECIDED,
    STOP_MAX_SEEDS,
    STOP_TAG,
    STOP_TEXT,
    Look,
    LookBook,
)
from pipeline.sweep.seed_stats import MIN_SEEDS
from pipeline.sweep.study import Study, variant_name

DEFAULT_MAX_SEEDS = 10
"""Paired seeds per comparison at most (``--max-seeds``): at the demo's spread (std of a paired difference
~9 PQ) ten seeds decide a 15 PQ difference in ~85% of studies (tests/test_confidence_sequence.py)."""
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(gpu|cpu)[-_ ]?h(?:ours?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """Device-hours the sweep may spend (``--budget 40gpu-h``): ``unit`` "GPU" or "CPU", the unit of the
    report's cost of its trials (GPUs under ``scaling.use_gpu``, else CPUs, times wall hours)."""

    hours: float
    unit: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        match = _BUDGET.match(text)
        if not match:
            raise ValueError(f"--budget {text}: give hours and a unit, e.g. 40gpu-h or 2.5cpu-h")
        if float(match.group(1)) <= 0:
            raise ValueError(f"--budget {text}: must be more than 0 hours")
        return cls(float(match.group(1)), match.group(2).upper())

    def __str__(self) -> str:
        return f"{self.hours:g} {self.unit}-h"


@dataclass(frozen=True)
class UntilDecidedConfig:
    """The settings of an until-decided sweep (the flags of the module docstring)."""

    max_seeds: int = DEFAULT_MAX_SEEDS
    margin: float = DEFAULT_MARGIN
    alpha: float = DEFAULT_ALPHA
    precision: float = DEFAULT_PRECISION
    budget: Budget | None = None

    def __post_init__(self) -> None:
        if self.max_seeds < MIN_SEEDS:
            raise ValueError(
                f"--max-seeds must be >= {MIN_SEEDS} (a paired interval needs 2), got {self.max_seeds}"
            )
        if not self.margin >= 0.0:
            raise ValueError(f"--margin must be >= 0 PQ, got {self.margin}")
        self.design()  # alpha and precision are checked by the sequence

    def design(self) -> Design:
        return Design.until_decided(self.alpha, self.margin, self.precision)


def initial_seeds(study: Study) -> int:
    """The seeds every variant runs before the first look: the study's, at least `MIN_SEEDS`."""
    return max(MIN_SEEDS, study.seeds)


def keeps_adding(decisions, seeds, max_seeds: int):
    """The seed-adding rule: whether a comparison gets one more seed (arrays or numbers): while it is
    undecided and has fewer than ``max_seeds`` paired seeds."""
    return (np.asarray(decisions) == UNDECIDED) & (np.asarray(seeds) < max_seeds)


def next_step(
    look: Look, reference: str, cfg: UntilDecidedConfig
) -> tuple[dict[str, int] | None, str | None]:
    """(the seeds of every variant at the next look, None) or (None, why the study stops), after ``look``
    under ``cfg``'s caps (module docstring, steps 3 and 4)."""
    grow = [c.variant for c in look.comparisons if keeps_adding(c.decision, c.n, cfg.max_seeds)]
    if not grow:
        undecided = any(c.decision == UNDECIDED for c in look.comparisons)
        return None, STOP_MAX_SEEDS if undecided else STOP_DECIDED
    grow.append(reference)
    if cfg.budget is not None:
        cost = sum(look.trial_h.get(v, math.nan) for v in grow)
        if not look.spent_h + cost <= cfg.budget.hours:  # an unknown cost stops too
            return None, STOP_BUDGET
    return {v: n + (v in grow) for v, n in look.seeds.items()}, None


def take_look(runs, seeds: dict[str, int], cfg: UntilDecidedConfig, index: int) -> Look:
    """Look ``index`` at the sweep's finished trials (``runs``: pipeline.sweep.report.SweepRuns), which
    must be exactly ``seeds`` (variant -> seeds 0..k-1); its `next_step` filled in."""
    from pipeline.sweep.report import COST_KEY, SECONDS_PER_HOUR

    have = {r.variant: sorted(int(t.seed) for t in r.trials) for r in runs.rows}
    for variant, count in seeds.items():
        if have.get(variant, []) != list(range(count)):
            raise ValueError(
                f"look {index}: {variant} has seeds {have.get(variant, [])} finished, not 0..{count - 1}"
            )
    design = cfg.design()
    comparisons = [compare_pair(d, design.kind, design.margin) for d in runs.differences()]
    trial_h = {r.variant: r.interval(COST_KEY).mean / SECONDS_PER_HOUR for r in runs.rows}
    spent_h = sum(r.cost_h() for r in runs.rows)
    budget = str(cfg.budget) if cfg.budget else None
    look = Look(index, dict(seeds), comparisons, spent_h, runs.device, trial_h, cfg.max_seeds, budget)
    look.next, look.stop = next_step(look, runs.reference, cfg)
    return look


def look_line(look: Look, reference: str) -> str:
    """One line per look: each comparison's decision and interval, then what comes next."""
    parts = [f"{c.variant} {c.decision} {c.interval_text()} ({c.n} seeds)" for c in look.comparisons]
    if look.next is None:
        then = f"stop: {STOP_TEXT[look.stop or STOP_DECIDED]}"
    else:
        grown = [v for v, n in look.next.items() if n > look.seeds[v] and v != reference]
        then = f"next: one more seed for {', '.join(grown)} and the reference {reference}"
    spent = f"; {look.spent_h:.3g} {look.unit}-h spent" if look.unit else ""
    return f"until decided, look {look.index}: {'; '.join(parts)}{spent} -> {then}"


def check_study(study: Study, cfg: UntilDecidedConfig, base: ExperimentConfig, ray_address) -> None:
    """ValueError in one line, before any trial: a study without a named reference or with one variant,
    initial seeds above ``--max-seeds``, a budget in a unit the trials do not use."""
    if study.reference is None:
        raise ValueError(
            f"--until-decided: study {study.name} names no reference variant (Study.reference); the seeds go "
            "where a variant's comparison with it is open"
        )
    if len(study.variants()) < 2:
        raise ValueError(f"--until-decided: study {study.name} has one variant, nothing to compare")
    if initial_seeds(study) > cfg.max_seeds:
        raise ValueError(
            f"--max-seeds {cfg.max_seeds} is below the study's {initial_seeds(study)} seeds per variant "
            "(lower --seeds)"
        )
    _check_budget_unit(cfg.budget, base, ray_address)


def _check_budget_unit(budget: Budget | None, base: ExperimentConfig, ray_address) -> None:
    """The budget's unit must be the one the trials' cost is counted in; GPU-hours on a local Ray need a
    GPU here (a joined cluster may add GPU nodes on demand: its trials' scaling.use_gpu decides)."""
    if budget is None:
        return
    device = "GPU" if base.scaling.use_gpu else "CPU"
    if budget.unit != device:
        raise ValueError(
            f"--budget {budget}: the trials train on {device}s (scaling.use_gpu="
            f"{str(base.scaling.use_gpu).lower()}), so their cost is counted in {device}-hours"
        )
    if device == "GPU" and ray_address in (None, "local"):
        import torch

        if torch.cuda.device_count() == 0:
            raise ValueError(
                f"--budget {budget}: this machine has no GPU (join a GPU cluster: --ray-address)"
            )


@dataclass(frozen=True)
class Rounds:
    """How a round runs: `pipeline.sweep.driver.run_sweep` and `setup_sweep` (where the sweep lives),
    handed in by the driver, whose ``kmax sweep`` calls this module (importing the driver from here would
    make an import cycle)."""

    run: Callable[..., Any]
    setup: Callable[..., Any]


@dataclass
class UntilDecidedSummary:
    """What the rounds of this call did, with the fields of `pipeline.sweep.driver.SweepSummary` (trials
    counted over every round: ``skipped`` are those finished before this call), every look of the sweep so
    far, and why it stopped (None: not stopped, e.g. a trial failed)."""

    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # never: --until-decided runs without ASHA
    results: Any = None  # the last round's Tune ResultGrid
    wall_s: float = 0.0
    looks: list[Look] = field(default_factory=list)
    stop: str | None = None


def _settings(study: Study, cfg: UntilDecidedConfig) -> dict[str, Any]:
    """What a resume must keep (pipeline.sweep.looks.LookBook.check)."""
    variants = [variant_name(v, study) for v in study.variants()]
    return {"alpha": cfg.alpha, "margin": cfg.margin, "precision": cfg.precision,
            "initial_seeds": initial_seeds(study), "variants": variants}  # fmt: skip


def _open_book(location: str, study: Study, cfg: UntilDecidedConfig, resume: bool) -> LookBook:
    reference = variant_name(study.reference_point(), study)
    book = LookBook.load(location)
    if book is None:
        return LookBook(study.name, reference, _settings(study, cfg))
    if not resume:
        raise ValueError(
            f"{location} already holds an until-decided sweep; pass --resume or another --run-dir"
        )
    book.check(study.name, reference, _settings(study, cfg))
    return book


def _resume_point(book: LookBook, study: Study, cfg: UntilDecidedConfig):
    """(seeds of the next look, None) or (None, stop): the initial seeds before any look, else what the last
    look leads to under this call's caps."""
    if not book.looks:
        return {variant_name(v, study): initial_seeds(study) for v in study.variants()}, None
    return next_step(book.looks[-1], book.reference, cfg)


def _record(book: LookBook, look: Look, location: str, round_, cfg: UntilDecidedConfig) -> None:
    """Keep the look in the sweep's location, then on the parent run: the design, the tags, the book."""
    from pipeline.tracking import RunLogger

    book.looks.append(look)
    book.save(location)
    parent = RunLogger(round_.tracking_uri, round_.parent_run_id)
    parent.log_params(cfg.design().params())
    parent.set_tags({LOOKS_TAG: len(book.looks), STOP_TAG: look.stop or "", MAX_SEEDS_TAG: cfg.max_seeds,
                     BUDGET_TAG: cfg.budget or ""})  # fmt: skip
    parent.log_dict(book.to_dict(), LOOKS_FILE)


def _merge(total: UntilDecidedSummary | None, round_) -> UntilDecidedSummary:
    """The rounds so far plus ``round_`` (a `pipeline.sweep.driver.SweepSummary`): trials kept before this
    call are the first round's skipped."""
    if total is None:
        total = UntilDecidedSummary(round_.sweep_dir, round_.tracking_uri, round_.parent_run_id)
        total.skipped = list(round_.skipped)
    total.finished += round_.finished
    total.failed += round_.failed
    total.results = round_.results
    return total


def _recorded_summary(location: str) -> UntilDecidedSummary:
    """The summary of a call that ran no round (the study had stopped): the sweep's recorded parent run."""
    from pipeline.tracking import read_run_record

    saved = read_run_record(location)
    return UntilDecidedSummary(location, saved["tracking_uri"], saved["run_id"])


def run_until_decided(
    study: Study,
    sweep_dir: str | Path,
    base: ExperimentConfig,
    cfg: UntilDecidedConfig,
    *,
    rounds: Rounds,
    tracking_uri: str | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    hooks: Sequence = (),
    echo=print,
    report: bool = True,
) -> UntilDecidedSummary:
    """Run (or with ``resume`` continue) ``study`` until decided (module docstring), each round by
    ``rounds``; ``report``: write the comparison report at the end. The other arguments are
    `pipeline.sweep.driver.run_sweep`'s."""
    from pipeline.sweep.report import compare, load_sweep

    t0 = time.time()
    check_study(study, cfg, base, ray_address)
    location = rounds.setup(base, sweep_dir, None, ray_address).location
    book = _open_book(location, study, cfg, resume)
    seeds, stop = _resume_point(book, study, cfg)
    total = None
    while seeds is not None:
        round_ = rounds.run(
            study.with_seed_counts(seeds), sweep_dir, base, tracking_uri=tracking_uri,
            resume=resume or total is not None, ray_address=ray_address, hooks=hooks, echo=echo,
        )  # fmt: skip
        total = _merge(total, round_)
        if round_.failed:
            break
        look = take_look(load_sweep(round_.tracking_uri, study.name), seeds, cfg, len(book.looks) + 1)
        _record(book, look, location, round_, cfg)
        echo(look_line(look, book.reference))
        seeds, stop = look.next, look.stop
    total = total or _recorded_summary(location)
    total.looks, total.stop = book.looks, None if total.failed else stop
    if total.stop is not None:
        echo(f"until decided: stopped after {len(book.looks)} look(s): {STOP_TEXT[total.stop]}")
    if report and total.stop is not None:
        compare(study.name, sweep_dir, tracking_uri, echo=echo)
    total.wall_s = time.time() - t0
    return total


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the module docstring (on `kmax sweep`)."""
    parser.add_argument(
        "--until-decided",
        action="store_true",
        help="add seeds where a comparison with the reference is undecided, until all are decided",
    )
    parser.add_argument(
        "--max-seeds", type=int, help=f"until decided: paired seeds at most (default {DEFAULT_MAX_SEEDS})"
    )
    parser.add_argument(
        "--margin", type=float, help=f"until decided: +-PQ that is equivalent (default {DEFAULT_MARGIN})"
    )
    parser.add_argument(
        "--alpha", type=float, help=f"until decided: error rate of the decisions (default {DEFAULT_ALPHA})"
    )
    parser.add_argument("--budget", help="until decided: device-hours at most, e.g. 40gpu-h or 2.5cpu-h")


def from_args(args: argparse.Namespace, study: Study, base: ExperimentConfig, ray_address):
    """The `UntilDecidedConfig` of the flags (None without ``--until-decided``), checked (`check_study`);
    ValueError in one line naming the flag for input that cannot run, before any trial."""
    given = {"max_seeds": args.max_seeds, "margin": args.margin, "alpha": args.alpha, "budget": args.budget}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.until_decided:
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} applies with --until-decided only")
        return None
    if args.asha:
        raise ValueError(
            "--until-decided cannot run with --asha: a trial stopped early is not its seed's full result, so "
            "it cannot be paired with the reference's"
        )
    if "budget" in given:
        given["budget"] = Budget.parse(given["budget"])
    cfg = UntilDecidedConfig(**given)
    check_study(study, cfg, base, ray_address)
    return cfg
