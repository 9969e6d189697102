"""`kmax compare`: the comparison report of a sweep, read back from MLflow.

    kmax compare --sweep assignment [--run-dir runs/sweeps/assignment] [--tracking-uri URI] [--reference V]

Finds the sweep's parent run (experiment ``sweep-<NAME>``, tag ``kind=sweep``) and its child runs (tag
``mlflow.parentRunId``), groups the children by their ``variant`` tag (seed: their ``seed`` tag) and writes,
under ``<run_dir>/report/``:

    report.md      four tables, the verdicts and the design:
                   - per variant PQ, PQ_th, PQ_st, SQ, RQ, mIoU (percent), parameters, images/s, each as
                     mean +- sample std over seeds (the mean alone for one seed);
                   - per variant the 95% t interval of the mean PQ, the best checkpoint's PQ, and the cost of
                     a trial (device-seconds) and of a PQ point;
                   - per variant its paired difference in PQ with the reference variant (seed by seed) and
                     its interval (pipeline.sweep.seed_stats has the formulas);
                   - per comparison its decision (better / worse / equivalent / undecided), the method of
                     its interval, its seeds, its cost, and for an undecided one a rough estimate of the
                     paired seeds that would decide it (pipeline.sweep.decision);
                   - a verdict line per comparison; the design: which kind of interval the reader sees
    report.html    the same, and the plots embedded as base64 PNG (renders alone in the MLflow UI)
    stats.json     every number of the tables at full precision, with the exact variant names
    pq_per_variant.png, pq_vs_step.png, cluster_maps.png

and logs all of them as artifacts under ``report/`` on the parent run, with the numbers as its metrics
(`report_metrics`; step = the number of child runs the report covers) and the tag ``report.reference``.
`compare` prints the same tables and verdicts.

Where the numbers come from, for each child run:

- PQ and the other columns: the latest logged value of the metric.
- best PQ: the ``pq`` of the run's ``best_checkpoint.json`` artifact (the training worker records it each
  time it writes the best checkpoint; no metric holds it). A run without that record: the max of its
  ``eval/pq_all`` history at its checkpoint steps (params ``train.checkpoint_interval``, ``train.steps``),
  which is the number the worker keeps: it compares PQ only when a validation falls on a checkpoint step,
  so the max over every validation can be higher when ``train.eval_interval`` does not divide it.
- cost: ``wall_s * workers * (GPUs per worker if scaling.use_gpu else CPUs per worker)`` from the run's
  ``scaling.*`` params, in GPU- or CPU-seconds; ``wall_s`` is from the run's start to the last metric it
  logged (an ASHA-stopped run is charged to where it stopped, not to when the sweep closed it; a run
  interrupted and resumed is charged the time between its attempts too). The Tune driver and the Ray Data
  CPUs are not counted. Cost of a PQ point: mean cost / mean PQ of the variant.

Which interval decides (pipeline.sweep.decision.Design, read from the parent run's params): a fixed-seed
sweep shows the 95% t interval of the mean difference, valid for its number of seeds fixed in advance; an
until-decided sweep (pipeline.sweep.until_decided) shows the t-mixture confidence sequence at its alpha,
valid at every number of seeds (pipeline.sweep.confidence_sequence), with its looks, why it stopped and its
budget (the parent's ``until_decided.*`` tags).

The reference variant: ``--reference``, else the parent run's ``reference`` param when the sweep logged
one, else the first variant of the study's grid (its ``space`` param: the default of
`pipeline.sweep.study.Study.reference`), else the first variant of the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.sweep.decision import UNDECIDED, Comparison, Design, compare_pair
from pipeline.sweep.looks import BUDGET_TAG, LOOKS_TAG, MAX_SEEDS_TAG, STOP_TAG, STOP_TEXT
from pipeline.sweep.seed_stats import (
    CONFIDENCE,
    MeanInterval,
    PairedDifference,
    mean_interval,
    paired_difference,
    verdict,
)
from pipeline.sweep.study import Study, default_sweep_dir, variant_name
from pipeline.sweep.trial import EARLY_STOPPED_TAG, PARAMETERS_METRIC

PQ_KEY = "eval/pq_all"
PQ_FMT = ".2f"
# (column header, MLflow metric key, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("PQ", PQ_KEY, PQ_FMT),
    ("PQ_th", "eval/pq_things", ".2f"),
    ("PQ_st", "eval/pq_stuff", ".2f"),
    ("SQ", "eval/sq_all", ".2f"),
    ("RQ", "eval/rq_all", ".2f"),
    ("mIoU", "eval/miou", ".2f"),
    ("params", PARAMETERS_METRIC, ".0f"),
    ("img/s", "train/images_per_s", ".1f"),
]
BEST_PQ_KEY = "eval/pq_all_best"
"""A run's best-checkpoint PQ in `TrialRecord.metrics` (read from its record, not a logged metric)."""
COST_KEY = "cost/device_s"
"""A run's cost in `TrialRecord.metrics`: its wall seconds times its workers' CPUs or GPUs."""
COST_FMT = ".0f"
COST_PER_POINT_FMT = ".1f"
STAT_KEYS = [key for _, key, _ in COLUMNS] + [BEST_PQ_KEY, COST_KEY]
BEST_RECORD = "best_checkpoint.json"
REFERENCE_PARAM = "reference"
SPACE_PARAM = "space"
SEED_TAG = "seed"
CLUSTER_FIGURE_PREFIX = "figures/clusters_step"
REPORT_ARTIFACT_DIR = "report"
METRIC_PREFIX = "report"
"""Parent-run metrics: ``report/<variant>/<key>/{mean,std,ci_low,ci_high}`` (see `report_metrics`)."""
REFERENCE_TAG = "report.reference"
METHOD_TAG = "report.method"
DECISION_TAG_PREFIX = "report.decision."
"""Parent-run tags ``report.decision.<variant>`` (`metric_name`): each comparison's decision."""
SECONDS_PER_HOUR = 3600.0
STATS_FILE = "stats.json"
LEVEL = f"{CONFIDENCE:.0%}"


@dataclass
class TrialRecord:
    """One finished child run: its seed tag (its run id when untagged: it pairs with nothing) and its
    numbers (the latest value of each `COLUMNS` metric it has, `BEST_PQ_KEY` and `COST_KEY` when known)."""

    run_id: str
    seed: str
    metrics: dict[str, float]
    device: str = ""  # what COST_KEY counts: "CPU" or "GPU" ("" without the run's scaling params)
    best_from_history: bool = False  # BEST_PQ_KEY from the eval/pq_all history (no best_checkpoint.json)


@dataclass
class VariantRow:
    variant: str
    trials: list[TrialRecord] = field(default_factory=list)
    early_stopped: int = 0  # runs of the variant that ASHA stopped (their metrics are from that point)

    @property
    def run_ids(self) -> list[str]:
        return [t.run_id for t in self.trials]

    @property
    def device(self) -> str:
        return next((t.device for t in self.trials if t.device), "")

    def by_seed(self, key: str) -> dict[str, float]:
        """Seed -> the value of ``key`` of that seed's run (the runs that have it)."""
        return {t.seed: t.metrics[key] for t in self.trials if key in t.metrics}

    def interval(self, key: str) -> MeanInterval:
        """Mean, sample std and t interval of ``key`` over the variant's runs that have it."""
        return mean_interval([t.metrics[key] for t in self.trials if key in t.metrics])

    def cost_h(self, seeds: tuple[str, ...] | None = None) -> float:
        """Device-hours of the variant's runs (those of ``seeds`` only, when given) that know their cost."""
        costs = [t.metrics.get(COST_KEY, math.nan) for t in self.trials if seeds is None or t.seed in seeds]
        return sum(c for c in costs if math.isfinite(c)) / SECONDS_PER_HOUR

    def cost_per_point(self) -> float:
        """Mean cost of a trial / its mean PQ: device-seconds per PQ point (nan when either is missing)."""
        cost, pq = self.interval(COST_KEY).mean, self.interval(PQ_KEY).mean
        return cost / pq if pq > 0 else math.nan


@dataclass
class SweepRuns:
    tracking_uri: str
    parent_run_id: str
    rows: list[VariantRow]
    reference: str = ""
    design: Design = field(default_factory=Design.fixed)
    tags: dict[str, str] = field(default_factory=dict)  # the parent run's (an until-decided sweep's state)

    @property
    def num_runs(self) -> int:
        return sum(len(r.trials) for r in self.rows)

    def differences(self, key: str = PQ_KEY) -> list[PairedDifference]:
        """Every other variant against the reference on ``key``, seed by seed (none without the reference)."""
        ref = next((r for r in self.rows if r.variant == self.reference), None)
        if ref is None:
            return []
        return [
            paired_difference(r.variant, r.by_seed(key), ref.variant, ref.by_seed(key))
            for r in self.rows
            if r is not ref
        ]

    def comparisons(self) -> list[Comparison]:
        """`differences` decided under the sweep's design (pipeline.sweep.decision), in the same order."""
        return [compare_pair(d, self.design.kind, self.design.margin) for d in self.differences()]

    def comparison_cost_h(self, d: PairedDifference) -> float:
        """Device-hours of a comparison's runs: the variant's and the reference's on its paired seeds."""
        rows = {r.variant: r for r in self.rows}
        return rows[d.variant].cost_h(d.seeds) + rows[d.reference].cost_h(d.seeds)

    @property
    def device(self) -> str:
        return next((r.device for r in self.rows if r.device), "")


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow's download progress bar off meanwhile (restored: no env leaks to Ray)."""
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _best_record(client, run_id: str) -> dict | None:
    """The run's ``best_checkpoint.json`` ({path, step, pq}), None when it has none."""
    if BEST_RECORD not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with _quiet_downloads(), tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, BEST_RECORD, tmp)).read_text())


def _on_checkpoint_step(params: Mapping[str, str]):
    """step -> whether the worker checkpoints there (a multiple of the interval, or the last step); every
    step counts when the params are absent."""
    try:
        interval, last = int(params["train.checkpoint_interval"]), int(params["train.steps"])
    except (KeyError, ValueError):
        return lambda step: True
    return lambda step: step == last or (interval > 0 and step % interval == 0)


def _best_pq(client, run) -> tuple[float | None, bool]:
    """(the run's best-checkpoint PQ or None, whether it came from the eval/pq_all history); see the
    module docstring."""
    record = _best_record(client, run.info.run_id)
    if record is not None and math.isfinite(float(record.get("pq", math.nan))):
        return float(record["pq"]), False
    on_checkpoint = _on_checkpoint_step(run.data.params)
    history = client.get_metric_history(run.info.run_id, PQ_KEY)
    values = [m.value for m in history if on_checkpoint(m.step) and math.isfinite(m.value)]
    return (max(values) if values else None), True


def _workers(params: Mapping[str, str]) -> tuple[str, float]:
    """("GPU", workers x GPUs per worker) under ``scaling.use_gpu``, else ("CPU", workers x CPUs per
    worker); ("", nan) without the params."""
    try:
        workers = float(params["scaling.num_workers"])
        if params["scaling.use_gpu"].lower() == "true":
            return "GPU", workers * float(params["scaling.gpus_per_worker"])
        return "CPU", workers * float(params["scaling.cpus_per_worker"])
    except (KeyError, ValueError):
        return "", math.nan


def _wall_s(run) -> float:
    """Seconds from the run's start to the last metric it logged (the latest timestamp of its metrics)."""
    stamps = [m.timestamp for m in run.data.to_proto().metrics]
    if not stamps or run.info.start_time is None:
        return math.nan
    return (max(stamps) - run.info.start_time) / 1000.0


def _trial(client, run) -> TrialRecord:
    metrics = {key: float(run.data.metrics[key]) for _, key, _ in COLUMNS if key in run.data.metrics}
    best, from_history = _best_pq(client, run)
    if best is not None:
        metrics[BEST_PQ_KEY] = best
    device, units = _workers(run.data.params)
    cost = _wall_s(run) * units
    if math.isfinite(cost):
        metrics[COST_KEY] = cost
    seed = run.data.tags.get(SEED_TAG, run.info.run_id)
    return TrialRecord(run.info.run_id, seed, metrics, device, from_history)


def _first_variant(params: Mapping[str, str]) -> str | None:
    """The default reference of the study whose grid is the parent's ``space`` param (None without it)."""
    try:
        study = Study("report", json.loads(params[SPACE_PARAM]))
    except (KeyError, ValueError, TypeError):
        return None
    return variant_name(study.reference_point(), study)


def _reference(params: Mapping[str, str], explicit: str | None, variants: list[str]) -> str:
    if explicit and explicit not in variants:
        raise ValueError(f"--reference {explicit}: not a variant of the sweep; known: {', '.join(variants)}")
    return explicit or params.get(REFERENCE_PARAM) or _first_variant(params) or variants[0]


def sweep_parent(client, sweep: str, tracking_uri: str):
    """(experiment id, the newest parent run) of sweep ``sweep``; ValueError naming the store if none."""
    exp = client.get_experiment_by_name(f"sweep-{sweep}")
    if exp is None:
        raise ValueError(f"--sweep {sweep}: no experiment 'sweep-{sweep}' in {tracking_uri}")
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.kind = 'sweep' and tags.sweep = '{sweep}'"
    )
    if not parents:
        raise ValueError(f"--sweep {sweep}: no sweep parent run in {tracking_uri}")
    return exp.experiment_id, parents[0]


def load_sweep(tracking_uri: str, sweep: str, reference: str | None = None) -> SweepRuns:
    """The parent run of sweep ``sweep`` and its finished child runs grouped by variant (sorted by name);
    ``reference``: the variant to compare with (default: see the module docstring)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id, parent = sweep_parent(client, sweep, tracking_uri)
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    if not children:
        raise ValueError(f"--sweep {sweep}: the parent run {parent.info.run_id} has no finished trials")
    rows: dict[str, VariantRow] = {}
    for run in children:
        variant = run.data.tags.get("variant", run.info.run_name)
        row = rows.setdefault(variant, VariantRow(variant))
        row.trials.append(_trial(client, run))
        row.early_stopped += run.data.tags.get(EARLY_STOPPED_TAG) == "true"
    ordered = sorted(rows.values(), key=lambda r: r.variant)
    ref = _reference(parent.data.params, reference, [r.variant for r in ordered])
    design = Design.from_params(parent.data.params)
    return SweepRuns(tracking_uri, parent.info.run_id, ordered, ref, design, dict(parent.data.tags))


# ---- the tables: every medium renders these lines --------------------------------------------------------


def _cell(iv: MeanInterval, fmt: str, unit: str = "") -> str:
    """``mean ± sample std``; the mean alone for one value; ``n/a`` for none."""
    if iv.n == 0:
        return "n/a"
    if not iv.defined:
        return f"{iv.mean:{fmt}}{unit}"
    return f"{iv.mean:{fmt}} ± {iv.std:{fmt}}{unit}"


def _table(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(c) + " |" for c in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(c) for c in body]


def table_lines(runs: SweepRuns, markdown: bool) -> list[str]:
    """Per variant: the seeds, then every `COLUMNS` metric as mean ± sample std over seeds."""
    header = ["variant", "seeds"] + [c[0] for c in COLUMNS]
    body = []
    for row in runs.rows:
        stopped = f" ({row.early_stopped} stopped early)" if row.early_stopped else ""
        cells = [row.variant, f"{len(row.trials)}{stopped}"]
        body.append(cells + [_cell(row.interval(key), fmt) for _, key, fmt in COLUMNS])
    return _table(header, body, markdown)


def seed_table_lines(runs: SweepRuns, markdown: bool) -> list[str]:
    """Per variant: PQ (last validation) and best-checkpoint PQ with their intervals, cost per trial and
    per PQ point."""
    header = ["variant", "seeds", "PQ", f"PQ {LEVEL} CI", "best PQ", f"best PQ {LEVEL} CI", "cost/trial",
              "cost/PQ point"]  # fmt: skip
    body = []
    for row in runs.rows:
        pq, best, unit = row.interval(PQ_KEY), row.interval(BEST_PQ_KEY), f" {row.device}-s"
        per_point = row.cost_per_point()
        body.append([
            row.variant, str(len(row.trials)), _cell(pq, PQ_FMT), pq.format(PQ_FMT), _cell(best, PQ_FMT),
            best.format(PQ_FMT), _cell(row.interval(COST_KEY), COST_FMT, unit),
            f"{per_point:{COST_PER_POINT_FMT}}{unit}" if math.isfinite(per_point) else "n/a",
        ])  # fmt: skip
    return _table(header, body, markdown)


def difference_table_lines(runs: SweepRuns, markdown: bool) -> list[str]:
    """Per variant but the reference: its paired seeds, mean ± std of (variant - reference) PQ, and the
    interval of the sweep's design (the t interval, or the confidence sequence of an until-decided one)."""
    header = ["variant", "reference", "paired seeds", "PQ difference", runs.design.header]
    body = [
        [d.variant, d.reference, ", ".join(d.seeds) or "none", _cell(d.diff, PQ_FMT), c.interval_text(PQ_FMT)]
        for d, c in zip(runs.differences(), runs.comparisons())
    ]
    return _table(header, body, markdown)


def decision_table_lines(runs: SweepRuns, markdown: bool) -> list[str]:
    """Per comparison: its decision, the method of its interval, its paired seeds, the interval, the rough
    estimate of the paired seeds that would decide an undecided one, and the cost of its runs."""
    unit = f" {runs.device}-h" if runs.device else ""
    header = ["variant", "decision", "method", "paired seeds", runs.design.header,
              "seeds to decide (estimate)", "cost"]  # fmt: skip
    body = [
        [c.variant, c.decision, c.method, str(c.n), c.interval_text(PQ_FMT), c.needed_text(),
         f"{runs.comparison_cost_h(d):.3g}{unit}"]
        for d, c in zip(runs.differences(), runs.comparisons())
    ]  # fmt: skip
    return _table(header, body, markdown)


def decision_line(c: Comparison, design: Design) -> str:
    """The verdict of an until-decided comparison, in the words of pipeline.sweep.seed_stats.verdict, e.g.
    ``argmax is better than cmt by 3.10 PQ, 95% confidence sequence (t-mixture) [0.40, 5.80] (4 paired
    seeds)`` or ``undecided between cmt and argmax (cmt - argmax = -1.20 PQ, 95% confidence sequence
    (t-mixture) [-9.70, 7.30]; 4 paired seeds)``."""
    interval = f"{design.label} {c.interval_text(PQ_FMT)}"
    if c.decision in ("better", "worse"):
        lead = f"{abs(c.mean):{PQ_FMT}}"
        return f"{c.variant} is {c.decision} than {c.reference} by {lead} PQ, {interval} ({c.n} paired seeds)"
    detail = f"({c.variant} - {c.reference} = {c.mean:+{PQ_FMT}} PQ, {interval}; {c.n} paired seeds)"
    if c.decision == UNDECIDED:
        return f"undecided between {c.variant} and {c.reference} {detail}"
    return f"{c.variant} is equivalent to {c.reference} within ±{design.margin:g} PQ {detail}"


def verdict_lines(runs: SweepRuns) -> list[str]:
    """One line per comparison: today's t verdicts for a fixed-seed sweep (pipeline.sweep.seed_stats),
    `decision_line` for an until-decided one."""
    if not any(r.variant == runs.reference for r in runs.rows):
        return [f"the reference {runs.reference} has no finished trial: nothing to compare with"]
    if runs.design.sequential:
        return [decision_line(c, runs.design) for c in runs.comparisons()]
    return [verdict(d, "PQ", PQ_FMT) for d in runs.differences()]


def undecided_line(runs: SweepRuns) -> str | None:
    """One line on the undecided comparisons: the paired seeds the sweep's interval would need to decide
    each, if the observed mean and spread held (a rough estimate); None when every one is decided."""
    comparisons = runs.comparisons()
    open_ = [c for c in comparisons if c.decision == UNDECIDED]
    if not open_:
        return None
    each = ", ".join(f"{c.variant} {c.needed_text()}" for c in open_)
    return (
        f"{len(open_)} of {len(comparisons)} comparisons undecided: if the observed mean and spread held, "
        f"the {runs.design.label} would decide them at (paired seeds, rough estimate): {each}"
    )


def _interval_kind_line(runs: SweepRuns) -> str:
    """Which kind of interval the reader sees, and when it is valid."""
    design = runs.design
    if design.sequential:
        return (
            f"intervals of the differences: {design.label}, valid at every number of seeds at once "
            "(Lai 1976; Wang and Ramdas 2023; pipeline/sweep/confidence_sequence.py), as seeds were added "
            f"while looking. Better / worse: it excludes 0; equivalent: inside ±{design.margin:g} PQ. The "
            "per-variant intervals above are descriptive t intervals."
        )
    seeds = "/".join(str(n) for n in sorted({len(r.trials) for r in runs.rows}))
    return (
        f"intervals of the differences: {design.label}, valid for a number of seeds fixed before "
        f"looking (here {seeds} per variant), not for seeds added while looking (kmax sweep "
        f"--until-decided). Equivalent: inside ±{design.margin:g} PQ."
    )


def design_lines(runs: SweepRuns) -> list[str]:
    """Which kind of interval the reader sees; an until-decided sweep's looks and why it stopped; the
    device-hours spent (and the budget); the undecided comparisons' estimate."""
    lines, tags = [_interval_kind_line(runs)], runs.tags
    if runs.design.sequential:
        stop = STOP_TEXT.get(tags.get(STOP_TAG, ""), "not stopped yet")
        looks, cap = tags.get(LOOKS_TAG, "0"), tags.get(MAX_SEEDS_TAG, "?")
        lines.append(f"until decided: {looks} look(s), at most {cap} paired seeds; {stop}.")
    spent = sum(r.cost_h() for r in runs.rows)
    lines.append(f"spent: {spent:.3g} {runs.device}-h (budget: {tags.get(BUDGET_TAG) or 'none'}).")
    return lines + [line for line in [undecided_line(runs)] if line]


def note_lines(runs: SweepRuns) -> list[str]:
    """What the numbers are (the same sentences in every medium)."""
    history = sum(t.best_from_history and BEST_PQ_KEY in t.metrics for r in runs.rows for t in r.trials)
    fallback = f"; {history} run(s) without it: the max of {PQ_KEY} at checkpoint steps" if history else ""
    return [
        f"values in percent; ± sample std over seeds (n - 1); {LEVEL} CI: Student t interval of the mean "
        "(undefined for one seed).",
        f"best PQ: the best checkpoint's validation PQ ({BEST_RECORD} of each run{fallback}).",
        "cost: seconds from a run's start to its last logged metric x its workers' CPUs (GPUs with "
        "scaling.use_gpu); cost/PQ point: mean cost / mean PQ.",
        f"PQ difference: variant - {runs.reference} over the seeds both ran (same seed = same initial "
        "weights and data order).",
    ]


def report_sections(runs: SweepRuns, markdown: bool) -> list[tuple[str, list[str]]]:
    """(title, lines) of the report, in order: the terminal, report.md and report.html show these."""
    return [
        ("Metrics over seeds", table_lines(runs, markdown)),
        ("PQ intervals and cost", seed_table_lines(runs, markdown)),
        (f"Paired differences against {runs.reference}", difference_table_lines(runs, markdown)),
        ("Decisions", decision_table_lines(runs, markdown)),
        ("Verdicts", verdict_lines(runs)),
        ("Design", design_lines(runs)),
        ("Notes", note_lines(runs)),
    ]


def terminal_lines(runs: SweepRuns) -> list[str]:
    """What `compare` prints: the metrics table first, then the other sections under their titles."""
    (_, first), *rest = report_sections(runs, markdown=False)
    lines = list(first)
    for title, body in rest:
        lines += ["", f"{title}:", *body]
    return lines


# ---- the numbers on MLflow --------------------------------------------------------------------------------


def metric_name(variant: str) -> str:
    """A variant's name as an MLflow metric-key segment: what MLflow refuses (``=``, ``,``, ...) -> ``_``."""
    return re.sub(r"[^\w.\-]", "_", variant)


def _interval_metrics(prefix: str, iv: MeanInterval) -> dict[str, float]:
    return {f"{prefix}/mean": iv.mean, f"{prefix}/std": iv.std, f"{prefix}/ci_low": iv.low,
            f"{prefix}/ci_high": iv.high}  # fmt: skip


def report_metrics(runs: SweepRuns) -> dict[str, float]:
    """The report's numbers as parent-run metrics (finite ones only: an undefined interval is absent):

    ``report/<v>/seeds``; ``report/<v>/<key>/{mean,std,ci_low,ci_high}`` for every `COLUMNS` key and
    ``eval/pq_all_best``; ``report/<v>/cost/<cpu|gpu>_s/...`` and ``report/<v>/cost/<cpu|gpu>_s_per_pq``;
    ``report/<v>/minus/<reference>/eval/pq_all/{n,mean,std,ci_low,ci_high}`` (the interval of the sweep's
    design: `difference_table_lines`), ``.../seeds_needed`` (undecided, when estimated) and
    ``.../cost_<cpu|gpu>_h``; ``report/spent/<cpu|gpu>_h``; ``<v>`` = `metric_name`. The decisions are the
    tags of `_log_to_mlflow`."""
    names = {metric_name(r.variant): r.variant for r in runs.rows}
    if len(names) != len(runs.rows):
        raise ValueError(f"two variants share a metric name: {sorted(r.variant for r in runs.rows)}")
    out: dict[str, float] = {}
    for row in runs.rows:
        base = f"{METRIC_PREFIX}/{metric_name(row.variant)}"
        out[f"{base}/seeds"] = float(len(row.trials))
        for key in STAT_KEYS:
            name = f"cost/{row.device.lower()}_s" if key == COST_KEY else key
            out.update(_interval_metrics(f"{base}/{name}", row.interval(key)))
        out[f"{base}/cost/{row.device.lower()}_s_per_pq"] = row.cost_per_point()
    unit = runs.device.lower()
    for d, c in zip(runs.differences(), runs.comparisons()):
        base = f"{METRIC_PREFIX}/{metric_name(d.variant)}/minus/{metric_name(d.reference)}/{PQ_KEY}"
        out.update({f"{base}/n": float(d.diff.n), **_interval_metrics(base, d.diff)})
        out.update({f"{base}/ci_low": c.low, f"{base}/ci_high": c.high})  # the design's interval
        out[f"{base}/cost_{unit}_h"] = runs.comparison_cost_h(d)
        out[f"{base}/seeds_needed"] = float(c.seeds_needed or math.nan)
    out[f"{METRIC_PREFIX}/spent/{unit}_h"] = sum(r.cost_h() for r in runs.rows)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _interval_json(iv: MeanInterval) -> dict[str, Any]:
    return {"n": iv.n, "mean": _number(iv.mean), "std": _number(iv.std), "ci_low": _number(iv.low),
            "ci_high": _number(iv.high)}  # fmt: skip


def stats_record(runs: SweepRuns) -> dict[str, Any]:
    """stats.json: every number of the report at full precision (null: undefined), exact variant names."""
    variants = {
        row.variant: {
            "runs": {t.seed: t.run_id for t in row.trials},
            "cost_unit": f"{row.device}-s",
            "cost_per_pq": _number(row.cost_per_point()),
            "metrics": {key: _interval_json(row.interval(key)) for key in STAT_KEYS},
        }
        for row in runs.rows
    }
    verdicts = verdict_lines(runs)
    differences = [
        {"variant": d.variant, "reference": d.reference, "metric": PQ_KEY, "seeds": list(d.seeds),
         "only_variant": list(d.only_variant), "only_reference": list(d.only_reference),
         **_interval_json(d.diff), "ci_low": _number(c.low), "ci_high": _number(c.high),
         "decision": c.decision, "method": c.method, "interval": [_number(c.low), _number(c.high)],
         "seeds_needed": c.seeds_needed, "cost_h": runs.comparison_cost_h(d), "verdict": line}
        for d, c, line in zip(runs.differences(), runs.comparisons(), verdicts)
    ]  # fmt: skip
    return {"reference": runs.reference, "confidence": CONFIDENCE, "design": _design_json(runs),
            "variants": variants, "differences": differences}  # fmt: skip


def _design_json(runs: SweepRuns) -> dict[str, Any]:
    """stats.json's ``design``: the interval kind the differences show, the margin, an until-decided
    sweep's state (its parent-run tags), the device-hours spent, the undecided comparisons' estimate."""
    design, tags = runs.design, runs.tags
    sequential = {"looks": int(tags.get(LOOKS_TAG, 0)), "stop": tags.get(STOP_TAG) or None,
                  "max_seeds": int(tags[MAX_SEEDS_TAG]) if MAX_SEEDS_TAG in tags else None}  # fmt: skip
    return {
        "kind": "until_decided" if design.sequential else "fixed", "method": design.kind.method,
        "interval": design.label, "margin": design.margin, **(sequential if design.sequential else {}),
        "budget": tags.get(BUDGET_TAG) or None, "spent_h": sum(r.cost_h() for r in runs.rows),
        "unit": runs.device, "undecided": undecided_line(runs),
    }  # fmt: skip


def _log_to_mlflow(runs: SweepRuns, files: list[Path]) -> None:
    from pipeline.tracking import RunLogger

    logger = RunLogger(runs.tracking_uri, runs.parent_run_id)
    logger.log_metrics(report_metrics(runs), step=runs.num_runs)
    decisions = {f"{DECISION_TAG_PREFIX}{metric_name(c.variant)}": c.decision for c in runs.comparisons()}
    logger.set_tags({REFERENCE_TAG: runs.reference, METHOD_TAG: runs.design.kind.method, **decisions})
    for f in files:
        logger.log_artifact(f, REPORT_ARTIFACT_DIR)


# ---- the plots and the files ------------------------------------------------------------------------------


def _plots(runs: SweepRuns, out: Path) -> list[Path]:
    """The report's figures, written under ``out``: PQ per variant, PQ against step, cluster maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking_uri)
    files = []
    for name, draw in (("pq_per_variant", _pq_per_variant), ("pq_vs_step", _pq_vs_step)):
        fig = draw(plt, runs, client)
        files.append(out / f"{name}.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    fig = _cluster_maps(plt, runs, client)
    if fig is not None:
        files.append(out / "cluster_maps.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def _pq_per_variant(plt, runs: SweepRuns, client):
    names = [r.variant for r in runs.rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.5))
    stats = [r.interval(PQ_KEY) for r in runs.rows]
    bars = [s.half_width if s.defined else 0.0 for s in stats]
    ax.bar(range(len(names)), [s.mean for s in stats], yerr=bars, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("PQ (%)")
    ax.set_title(f"PQ per variant (mean, {LEVEL} t interval over seeds; none for one seed)", fontsize=9)
    fig.tight_layout()
    return fig


def pq_curves(runs: SweepRuns, client) -> list[tuple[str, list[list[tuple[int, float]]]]]:
    """Per variant, each seed's validation PQ history [(step, PQ), ...] by step (runs without one omitted)."""
    curves = []
    for row in runs.rows:
        hists = [sorted((m.step, m.value) for m in client.get_metric_history(r, PQ_KEY)) for r in row.run_ids]
        curves.append((row.variant, [h for h in hists if h]))
    return curves


def mean_curve(seeds: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean PQ over seeds at each step every seed validated at (an ASHA-stopped seed ends the curve)."""
    common = set.intersection(*(set(dict(h)) for h in seeds)) if seeds else set()
    return [(step, sum(dict(h)[step] for h in seeds) / len(seeds)) for step in sorted(common)]


def _pq_vs_step(plt, runs: SweepRuns, client):
    """One colour per variant: each seed a thin line, the mean over seeds a thick one (the legend's)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (variant, seeds) in enumerate(pq_curves(runs, client)):
        color = f"C{k}"
        for hist in seeds:
            ax.plot(*zip(*hist), color=color, linewidth=0.8, alpha=0.4)
        mean = mean_curve(seeds)
        if mean:
            ax.plot(
                *zip(*mean), color=color, linewidth=2.2, marker="o", label=f"{variant} (mean of {len(seeds)})"
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("PQ (%)")
    ax.set_title("validation PQ against training step (thin: one seed)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _latest_cluster_figures(plt, runs: SweepRuns, client) -> list[tuple[str, Any, str]]:
    """(variant, image, artifact path) of the latest cluster-assignment figure of each variant's first
    seed."""
    maps = []
    with _quiet_downloads(), tempfile.TemporaryDirectory() as tmp:
        for row in runs.rows:
            listed = client.list_artifacts(row.run_ids[0], "figures")
            figs = sorted(a.path for a in listed if a.path.startswith(CLUSTER_FIGURE_PREFIX))
            if figs:
                local = client.download_artifacts(row.run_ids[0], figs[-1], tmp)
                maps.append((row.variant, plt.imread(local), figs[-1]))
    return maps


def _cluster_maps(plt, runs: SweepRuns, client):
    """The variants' per-layer cluster-assignment strips, one row each (None when no run has one)."""
    maps = _latest_cluster_figures(plt, runs, client)
    if not maps:
        return None
    width = 14.0  # the per-run figures are wide strips (the image, then one map per layer)
    heights = [width * img.shape[0] / img.shape[1] + 0.5 for _, img, _ in maps]
    fig, axes = plt.subplots(
        len(maps),
        1,
        figsize=(width, sum(heights) + 0.6),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, (variant, img, path) in zip(axes[:, 0], maps):
        ax.imshow(img)
        ax.set_title(f"{variant}\n{Path(path).name}", fontsize=9)
        ax.axis("off")
    fig.suptitle("per-layer cluster-assignment maps")
    fig.tight_layout()
    return fig


def _html_table(md_lines: list[str]) -> str:
    cells = [line.strip("|").split(" | ") for line in md_lines]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in cells[0])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in cells[2:]
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _is_table(lines: list[str]) -> bool:
    """Whether a section's markdown lines are a table (else a list of sentences)."""
    return bool(lines) and lines[0].startswith("|")


def _markdown(runs: SweepRuns, sweep: str, plots: list[Path]) -> str:
    md = [f"# Sweep `{sweep}`", "", f"Parent run `{runs.parent_run_id}`.", ""]
    for title, lines in report_sections(runs, markdown=True):
        table = _is_table(lines)
        md += [f"## {title}", "", *(lines if table else [f"- {line}" for line in lines]), ""]
    return "\n".join(md + [f"![{p.stem}]({p.name})" for p in plots]) + "\n"


def _html(runs: SweepRuns, sweep: str, plots: list[Path]) -> str:
    parts = []
    for title, lines in report_sections(runs, markdown=True):
        table = _is_table(lines)
        body = _html_table(lines) if table else "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines)
        parts.append(f"<h2>{html.escape(title)}</h2>{body}{'' if table else '</ul>'}")
    imgs = "".join(
        f'<h2>{p.stem}</h2><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:3px 8px}</style></head>"
        f"<body><h1>Sweep {html.escape(sweep)}: comparison report</h1>"
        f"<p>Parent run {runs.parent_run_id}.</p>{''.join(parts)}{imgs}</body></html>"
    )


def write_report(runs: SweepRuns, sweep: str, out_dir: str | Path, log_to_mlflow: bool = True) -> Path:
    """Write report.md, report.html, stats.json and the plots into ``out_dir``; log them on the parent run
    with the numbers as its metrics (`report_metrics`); returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)
    (out / "report.md").write_text(_markdown(runs, sweep, plots))
    (out / "report.html").write_text(_html(runs, sweep, plots))
    (out / STATS_FILE).write_text(json.dumps(stats_record(runs), indent=1) + "\n")
    if log_to_mlflow:
        _log_to_mlflow(runs, [out / "report.md", out / "report.html", out / STATS_FILE, *plots])
    return out / "report.html"


def compare(
    sweep: str,
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    echo=print,
    reference: str | None = None,
) -> Path:
    """Load the sweep from MLflow, print the tables and verdicts, write and log the report; returns
    report.html. ``reference``: the variant to compare with (default: see the module docstring)."""
    from pipeline.tracking import existing_store

    run_dir = Path(run_dir or default_sweep_dir(sweep))
    runs = load_sweep(existing_store(tracking_uri, run_dir), sweep, reference)
    for line in terminal_lines(runs):
        echo(line)
    report = write_report(runs, sweep, run_dir / "report")
    echo(f"report: {report} (and {report.with_suffix('.md')}); logged on MLflow run {runs.parent_run_id}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="sweep (study) name, e.g. assignment")
    parser.add_argument("--run-dir", help="the sweep directory (default: runs/sweeps/<sweep>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store in the sweep dir)")
    parser.add_argument(
        "--reference", help="the variant the others are compared with (default: the study's reference)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        echo = lambda s: print(s, flush=True)  # noqa: E731
        compare(args.sweep, args.run_dir, args.tracking_uri, echo=echo, reference=args.reference)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kmax compare: {exc}", file=sys.stderr)
        return 2
    return 0
