"""`kmax compare`: the comparison report of a sweep, read back from MLflow.

    kmax compare --sweep assignment [--run-dir runs/sweeps/assignment] [--tracking-uri URI]

Finds the sweep's parent run (experiment ``sweep-<NAME>``, tag ``kind=sweep``) and its child runs (tag
``mlflow.parentRunId``), groups the children by their ``variant`` tag and writes, under
``<run_dir>/report/``:

    report.md      the table: per variant PQ, PQ_th, PQ_st, SQ, RQ, mIoU (percent), parameters, images/s,
                   each as mean +- std over seeds (population std; 0 for one seed)
    report.html    the same table and the plots, embedded as base64 PNG (renders alone in the MLflow UI)
    pq_per_variant.png, pq_vs_step.png, cluster_maps.png

and logs all of them as artifacts under ``report/`` on the parent run. Values are the latest logged value
of each metric of each child run.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.sweep.trial import EARLY_STOPPED_TAG, PARAMETERS_METRIC

# (column header, MLflow metric key, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("PQ", "eval/pq_all", ".2f"),
    ("PQ_th", "eval/pq_things", ".2f"),
    ("PQ_st", "eval/pq_stuff", ".2f"),
    ("SQ", "eval/sq_all", ".2f"),
    ("RQ", "eval/rq_all", ".2f"),
    ("mIoU", "eval/miou", ".2f"),
    ("params", PARAMETERS_METRIC, ".0f"),
    ("img/s", "train/images_per_s", ".1f"),
]
PQ_KEY = "eval/pq_all"
CLUSTER_FIGURE_PREFIX = "figures/clusters_step"
REPORT_ARTIFACT_DIR = "report"


@dataclass
class VariantRow:
    variant: str
    run_ids: list[str]
    values: dict[str, list[float]]  # metric key -> one value per seed run
    early_stopped: int = 0  # runs of the variant that ASHA stopped (their metrics are from that point)

    def mean_std(self, key: str) -> tuple[float, float]:
        vals = self.values.get(key, [])
        if not vals:
            return float("nan"), float("nan")
        return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


@dataclass
class SweepRuns:
    tracking_uri: str
    parent_run_id: str
    rows: list[VariantRow]


def load_sweep(tracking_uri: str, sweep: str) -> SweepRuns:
    """The parent run of sweep ``sweep`` and its finished child runs grouped by variant (sweep order)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"sweep-{sweep}")
    if exp is None:
        raise ValueError(f"--sweep {sweep}: no experiment 'sweep-{sweep}' in {tracking_uri}")
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.kind = 'sweep' and tags.sweep = '{sweep}'"
    )
    if not parents:
        raise ValueError(f"--sweep {sweep}: no sweep parent run in {tracking_uri}")
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    if not children:
        raise ValueError(f"--sweep {sweep}: the parent run {parent.info.run_id} has no finished trials")
    rows: dict[str, VariantRow] = {}
    for run in children:
        variant = run.data.tags.get("variant", run.info.run_name)
        row = rows.setdefault(variant, VariantRow(variant, [], {}))
        row.run_ids.append(run.info.run_id)
        row.early_stopped += run.data.tags.get(EARLY_STOPPED_TAG) == "true"
        for _, key, _ in COLUMNS:
            if key in run.data.metrics:
                row.values.setdefault(key, []).append(float(run.data.metrics[key]))
    ordered = sorted(rows.values(), key=lambda r: r.variant)
    return SweepRuns(tracking_uri, parent.info.run_id, ordered)


def table_lines(runs: SweepRuns, markdown: bool) -> list[str]:
    header = ["variant", "seeds"] + [c[0] for c in COLUMNS]
    body = []
    for row in runs.rows:
        seeds = str(len(row.run_ids)) + (f" ({row.early_stopped} stopped early)" if row.early_stopped else "")
        cells = [row.variant, seeds]
        for _, key, fmt in COLUMNS:
            mean, std = row.mean_std(key)
            cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(c) + " |" for c in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(c) for c in body]


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
    stats = [r.mean_std(PQ_KEY) for r in runs.rows]
    ax.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("PQ (%)")
    ax.set_title("PQ per variant (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def _pq_vs_step(plt, runs: SweepRuns, client):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row in runs.rows:
        for i, run_id in enumerate(row.run_ids):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, PQ_KEY))
            if hist:
                ax.plot(*zip(*hist), marker="o", label=row.variant if i == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("PQ (%)")
    ax.set_title("validation PQ against training step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _latest_cluster_figures(plt, runs: SweepRuns, client) -> list[tuple[str, Any, str]]:
    """(variant, image, artifact path) of the latest cluster-assignment figure of each variant's first
    seed. MLflow's download progress bar is switched off meanwhile (restored: no env leaks to Ray)."""
    maps = []
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for row in runs.rows:
                listed = client.list_artifacts(row.run_ids[0], "figures")
                figs = sorted(a.path for a in listed if a.path.startswith(CLUSTER_FIGURE_PREFIX))
                if figs:
                    local = client.download_artifacts(row.run_ids[0], figs[-1], tmp)
                    maps.append((row.variant, plt.imread(local), figs[-1]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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


def write_report(runs: SweepRuns, sweep: str, out_dir: str | Path, log_to_mlflow: bool = True) -> Path:
    """Write report.md, report.html and the plots into ``out_dir``, log them on the parent run; returns
    the HTML's path."""
    from pipeline.tracking import RunLogger

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)
    md = [
        f"# Sweep `{sweep}`",
        "",
        f"Parent run `{runs.parent_run_id}`; values in percent, mean ± std over seeds.",
        "",
    ]
    md += table_lines(runs, markdown=True) + [""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    header = ["variant", "seeds"] + [c[0] for c in COLUMNS]
    rows_html = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line.strip("|").split(" | ")) + "</tr>"
        for line in table_lines(runs, markdown=True)[2:]
    )
    imgs = "".join(
        f'<h2>{p.stem}</h2><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:3px 8px}</style></head>"
        f"<body><h1>Sweep {html.escape(sweep)}: comparison report</h1>"
        f"<p>Parent run {runs.parent_run_id}; values in percent, mean ± std over seeds.</p>"
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in header)
        + f"</tr>{rows_html}</table>{imgs}</body></html>"
    )
    (out / "report.html").write_text(page)
    if log_to_mlflow:
        logger = RunLogger(runs.tracking_uri, runs.parent_run_id)
        for f in [out / "report.md", out / "report.html", *plots]:
            logger.log_artifact(f, REPORT_ARTIFACT_DIR)
    return out / "report.html"


def compare(
    sweep: str, run_dir: str | Path | None = None, tracking_uri: str | None = None, echo=print
) -> Path:
    """Load the sweep from MLflow, print the table, write and log the report; returns report.html."""
    from pipeline.tracking import resolve_target

    run_dir = Path(run_dir or f"runs/sweeps/{sweep}")
    if not tracking_uri and not (run_dir / "mlflow.db").is_file():
        raise FileNotFoundError(
            f"no tracking store at {run_dir / 'mlflow.db'}; pass --run-dir or --tracking-uri"
        )
    uri = resolve_target(tracking_uri, run_dir).tracking_uri
    runs = load_sweep(uri, sweep)
    for line in table_lines(runs, markdown=False):
        echo(line)
    report = write_report(runs, sweep, run_dir / "report")
    echo(f"report: {report} (and {report.with_suffix('.md')}); logged on MLflow run {runs.parent_run_id}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="sweep (study) name, e.g. assignment")
    parser.add_argument("--run-dir", help="the sweep directory (default: runs/sweeps/<sweep>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store in the sweep dir)")


def run(args: argparse.Namespace) -> int:
    try:
        compare(args.sweep, args.run_dir, args.tracking_uri, echo=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"kmax compare: {exc}", file=sys.stderr)
        return 2
    return 0
