"""Statistics over seeds (pipeline.sweep.seed_stats), by hand; and the report's numbers, from hand-made runs
in a real MLflow store (SQLite, no Ray), equal in the terminal text, report.md, report.html, stats.json and
the parent run's metrics."""

from __future__ import annotations

import html
import json
import math
import re

import pytest

from pipeline.sweep.seed_stats import (
    CONFIDENCE,
    mean_interval,
    paired_difference,
    t_quantile,
    verdict,
)

T_975_2 = 4.302652729749464  # t_{0.975, 2}: scipy.stats.t.ppf(0.975, 2), as printed in t tables (4.303)
T_975_1 = 12.706204736174698  # t_{0.975, 1}


def test_mean_std_and_t_interval_by_hand():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert CONFIDENCE == 0.95 and t_quantile(3) == pytest.approx(T_975_2)
    assert (iv.n, iv.mean, iv.std) == (3, 2.0, 1.0)  # sample std: sqrt((1 + 0 + 1) / (3 - 1))
    assert iv.half_width == pytest.approx(T_975_2 / math.sqrt(3)) == pytest.approx(2.4841377)
    assert (iv.low, iv.high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377))
    assert iv.format(".2f") == "[-0.48, 4.48]" and not iv.excludes_zero()
    two = mean_interval([10.0, 12.0])  # std sqrt(2), half width t_{0.975,1} * sqrt(2) / sqrt(2)
    assert two.std == pytest.approx(math.sqrt(2)) and two.half_width == pytest.approx(T_975_1)
    assert mean_interval([1.0, 2.0, 3.0], confidence=0.9).half_width < iv.half_width


def test_one_value_has_no_interval_and_none_has_no_mean():
    one = mean_interval([7.0])
    assert one.n == 1 and one.mean == 7.0 and not one.defined
    assert math.isnan(one.std) and math.isnan(one.half_width)  # undefined, never +-0
    assert one.format() == "undefined (n = 1)" and not one.excludes_zero()
    none = mean_interval([])
    assert none.n == 0 and math.isnan(none.mean) and none.format() == "n/a"
    with pytest.raises(ValueError, match="needs >= 2 values"):
        t_quantile(1)
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, math.nan])


def test_paired_difference_by_hand_excludes_zero_where_the_variants_intervals_overlap():
    ref = {"0": 40.0, "1": 41.0, "2": 42.0}
    var = {"0": 44.0, "1": 45.5, "2": 45.0}
    # alone, the two variants' intervals overlap: [38.52, 43.48] and [42.94, 46.73] ...
    assert mean_interval(ref.values()).format() == "[38.52, 43.48]"
    assert mean_interval(var.values()).format() == "[42.94, 46.73]"
    # ... seed by seed the differences are 4, 4.5, 3: mean 23/6, std sqrt(7/12), interval excludes 0
    d = paired_difference("argmax", var, "spatial_softmax", ref)
    assert d.seeds == ("0", "1", "2") and d.only_variant == d.only_reference == ()
    assert d.diff.mean == pytest.approx(23 / 6) and d.diff.std == pytest.approx(math.sqrt(7 / 12))
    assert d.diff.half_width == pytest.approx(T_975_2 * math.sqrt(7 / 12) / math.sqrt(3))
    assert d.diff.format() == "[1.94, 5.73]" and d.diff.excludes_zero()
    assert verdict(d) == "argmax beats spatial_softmax by 3.83 PQ, 95% CI [1.94, 5.73] (3 paired seeds)"


def test_reference_ahead_reads_as_the_reference_beating_the_variant():
    d = paired_difference(
        "argmax", {"0": 40.0, "1": 41.0, "2": 42.0}, "ss", {"0": 44.0, "1": 45.5, "2": 45.0}
    )
    assert d.diff.format() == "[-5.73, -1.94]"
    assert verdict(d) == "ss beats argmax by 3.83 PQ, 95% CI [1.94, 5.73] (3 paired seeds)"


def test_missing_seeds_on_one_side_are_left_out_and_named():
    var = {"0": 41.0, "1": 40.0, "3": 50.0, "10": 1.0}
    ref = {"0": 40.0, "1": 41.0, "2": 42.0, "10": 2.0}
    d = paired_difference("cs", var, "ss", ref)
    assert d.seeds == ("0", "1", "10")  # numeric order
    assert (d.only_variant, d.only_reference) == (("3",), ("2",))
    assert d.diff.mean == pytest.approx(-1 / 3)  # (1 - 1 - 1) / 3
    assert d.diff.std == pytest.approx(math.sqrt(((4 / 3) ** 2 + (2 / 3) ** 2 * 2) / 2))
    assert verdict(d) == (
        "no difference shown between cs and ss (cs - ss = -0.33 PQ, 95% CI [-3.20, 2.54]; 3 paired seeds)"
        "; left out: seed 3 only in cs; seed 2 only in ss"
    )


def test_fewer_than_two_paired_seeds_has_no_verdict():
    d = paired_difference("cs", {"0": 41.0, "3": 50.0, "4": 51.0}, "ss", {"0": 40.0, "1": 41.0})
    assert d.diff.n == 1 and not d.diff.defined
    assert verdict(d) == (
        "cs vs ss: needs >= 2 paired seeds (has 1); left out: seeds 3, 4 only in cs; seed 1 only in ss"
    )
    none = paired_difference("cs", {"5": 1.0}, "ss", {"0": 1.0})
    assert none.diff.n == 0 and verdict(none).startswith("cs vs ss: needs >= 2 paired seeds (has 0)")


# ---- the report on a real MLflow store ---------------------------------------------------------------------

SWEEP = "t_stats"
SPACE = {
    "model.decoder.assignment": ["spatial_softmax", "argmax", "cluster_softmax"],
    "model.decoder.coord_conv": [False, True],
}
REF = "assignment=spatial_softmax,coord_conv=False"  # the grid's first variant: the default reference
ARGMAX = "assignment=argmax,coord_conv=False"
CLUSTER = "assignment=cluster_softmax,coord_conv=False"
SINGLE = "assignment=argmax,coord_conv=True"  # one seed, on GPU workers
T0_MS = 1_700_000_000_000
WORKERS = 2
CPUS_PER_WORKER = 1.5
# (variant, seed, PQ at step 3, PQ at step 6 (the last), checkpoint interval, best_checkpoint.json?, GPU?)
RUNS = [
    (REF, 0, 30.0, 40.0, 3, True, False),
    (REF, 1, 31.0, 41.0, 3, True, False),
    (REF, 2, 32.0, 42.0, 3, True, False),
    (ARGMAX, 0, 46.0, 44.0, 3, True, False),  # best checkpoint at step 3: best PQ 46
    (ARGMAX, 1, 40.0, 45.5, 3, True, False),
    (ARGMAX, 2, 41.0, 45.0, 3, True, False),
    (CLUSTER, 0, 20.0, 41.0, 3, True, False),
    (CLUSTER, 1, 20.0, 40.0, 3, True, False),
    # no record: best = max of eval/pq_all at checkpoint steps (6 only) = 50, not the 99 of step 3
    (CLUSTER, 3, 99.0, 50.0, 6, False, False),
    (SINGLE, 0, 30.0, 43.0, 3, True, True),
]


def _wall_s(seed: int) -> float:
    return 100.0 + 10.0 * seed


def _child(client, uri: str, exp_id: str, parent_id: str, index: int, spec, status: str = "FINISHED") -> str:
    from pipeline.tracking import RunLogger

    variant, seed, pq3, pq6, ckpt_interval, record, gpu = spec
    tags = {"mlflow.parentRunId": parent_id, "variant": variant, "seed": str(seed), "study": SWEEP}
    start = T0_MS + 10_000_000 * index
    run_id = client.create_run(
        exp_id, start_time=start, tags=tags, run_name=f"{variant}__seed{seed}"
    ).info.run_id
    log = RunLogger(uri, run_id)
    log.log_params({
        "scaling.num_workers": WORKERS, "scaling.use_gpu": gpu, "scaling.cpus_per_worker": CPUS_PER_WORKER,
        "scaling.gpus_per_worker": 1.0, "train.checkpoint_interval": ckpt_interval, "train.steps": 6,
    })  # fmt: skip
    end = start + int(_wall_s(seed) * 1000)
    evals = {"eval/pq_things": pq6 - 1, "eval/pq_stuff": pq6 + 1, "eval/sq_all": 80.0 + seed,
             "eval/rq_all": 50.0 - seed, "eval/miou": 60.0 + 2 * seed}  # fmt: skip
    rows = [
        ({"train/loss": 3.0 - 0.1 * k, "train/images_per_s": 10.0 + k + seed}, k, start + k * 1000)
        for k in range(1, 7)
    ]
    rows += [({"eval/pq_all": pq3}, 3, start + 4000), ({"eval/pq_all": pq6, **evals}, 6, end - 1000)]
    rows += [({"model/parameters": 1_000_000.0}, 0, end)]  # logged by the trial after the fit: the last
    log.log_metric_rows(rows)
    if record:
        best = max(pq3, pq6) if ckpt_interval == 3 else pq6
        log.log_dict({"path": "/x/best", "step": 3 if best == pq3 else 6, "pq": best}, "best_checkpoint.json")
    log.finish(status)
    return run_id


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A sweep's store: parent run (tags kind/sweep, param space) and the hand-made child runs of RUNS, and
    one FAILED child (left out of the report)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import get_or_create_experiment, resolve_target

    run_dir = tmp_path_factory.mktemp("stats_sweep")
    target = resolve_target(None, run_dir)
    client = MlflowClient(target.tracking_uri)
    exp_id = get_or_create_experiment(target, f"sweep-{SWEEP}")
    tags = {"kind": "sweep", "sweep": SWEEP, "study": SWEEP}
    parent = client.create_run(exp_id, tags=tags, run_name=SWEEP).info.run_id
    client.log_param(parent, "space", json.dumps(SPACE))
    for i, spec in enumerate(RUNS):
        _child(client, target.tracking_uri, exp_id, parent, i, spec)
    failed = (ARGMAX, 3, 0.0, 0.0, 3, True, False)
    _child(client, target.tracking_uri, exp_id, parent, len(RUNS), failed, status="FAILED")
    return run_dir, target.tracking_uri, parent


def _split_terminal(lines: list[str]) -> dict[str, list[list[str]] | list[str]]:
    """Terminal text -> {section title: table rows (cells) or lines}; the first table has no title."""
    blocks, current = [["Metrics over seeds:"]], None
    for line in lines:
        if line.startswith("report: "):
            break
        if not line:
            blocks.append([])
            continue
        blocks[-1].append(line)
    out: dict = {}
    for title, *body in blocks:
        is_table = len(body) > 1 and set(body[1]) <= {"-", " "}
        current = [re.split(r" {2,}", row.rstrip()) for row in body[2:]] if is_table else body
        out[title.rstrip(":")] = current
    return out


def _split_markdown(text: str) -> dict[str, list[list[str]] | list[str]]:
    out: dict = {}
    for section in text.split("\n## ")[1:]:
        title, *body = [line for line in section.splitlines() if line]
        if body[0].startswith("|"):
            out[title] = [[c.strip() for c in line.strip("|").split(" | ")] for line in body[2:]]
        else:
            out[title] = [line[2:] for line in body if line.startswith("- ")]
    return out


def _split_html(page: str) -> dict[str, list[list[str]] | list[str]]:
    out: dict = {}
    for title, body in re.findall(r"<h2>(.*?)</h2>(<table>.*?</table>|<ul>.*?</ul>)", page):
        if body.startswith("<table>"):
            rows = re.findall(r"<tr>(.*?)</tr>", body)[1:]
            out[html.unescape(title)] = [
                [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in rows
            ]
        else:
            out[html.unescape(title)] = [html.unescape(li) for li in re.findall(r"<li>(.*?)</li>", body)]
    return out


def _cell(m: dict[str, float], key: str, fmt: str, unit: str = "") -> str:
    """A mean ± std cell rebuilt from the parent run's metrics (the std is absent for one seed)."""
    mean = f"{m[f'{key}/mean']:{fmt}}"
    return f"{mean} ± {m[f'{key}/std']:{fmt}}{unit}" if f"{key}/std" in m else f"{mean}{unit}"


def _ci(m: dict[str, float], key: str, n: int) -> str:
    if f"{key}/ci_low" not in m:
        return f"undefined (n = {n})"
    return f"[{m[f'{key}/ci_low']:.2f}, {m[f'{key}/ci_high']:.2f}]"


def _expected_from_mlflow(m: dict[str, float]) -> dict[str, list[list[str]]]:
    """The three tables as the parent run's metrics say they must read."""
    from pipeline.sweep.report import COLUMNS, metric_name

    metrics, seeds, diffs = [], [], []
    for variant in sorted([REF, ARGMAX, CLUSTER, SINGLE]):
        v = f"report/{metric_name(variant)}"
        n = int(m[f"{v}/seeds"])
        metrics.append([variant, str(n)] + [_cell(m, f"{v}/{key}", fmt) for _, key, fmt in COLUMNS])
        dev = "gpu" if variant == SINGLE else "cpu"
        cost, unit = f"{v}/cost/{dev}_s", f" {dev.upper()}-s"
        seeds.append([
            variant, str(n), _cell(m, f"{v}/eval/pq_all", ".2f"), _ci(m, f"{v}/eval/pq_all", n),
            _cell(m, f"{v}/eval/pq_all_best", ".2f"), _ci(m, f"{v}/eval/pq_all_best", n),
            _cell(m, cost, ".0f", unit), f"{m[f'{cost}_per_pq']:.1f}{unit}",
        ])  # fmt: skip
        if variant != REF:
            d = f"{v}/minus/{metric_name(REF)}/eval/pq_all"
            paired = {ARGMAX: "0, 1, 2", CLUSTER: "0, 1", SINGLE: "0"}[variant]
            diffs.append([variant, REF, paired, _cell(m, d, ".2f"), _ci(m, d, int(m[f"{d}/n"]))])
    return {
        "Metrics over seeds": metrics,
        "PQ intervals and cost": seeds,
        f"Paired differences against {REF}": diffs,
    }


def test_report_numbers_are_the_same_in_terminal_markdown_html_and_mlflow(sweep_store):
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.report import REFERENCE_TAG, compare, metric_name

    run_dir, uri, parent_id = sweep_store
    lines: list[str] = []
    report = compare(SWEEP, run_dir, echo=lines.append)
    parent = MlflowClient(uri).get_run(parent_id).data
    m = {k: v for k, v in parent.metrics.items() if k.startswith("report/")}
    assert parent.tags[REFERENCE_TAG] == REF

    # hand-computed numbers, as stored on the parent run
    ref, arg = f"report/{metric_name(REF)}", f"report/{metric_name(ARGMAX)}"
    assert (m[f"{ref}/eval/pq_all/mean"], m[f"{ref}/eval/pq_all/std"]) == pytest.approx((41.0, 1.0))
    assert m[f"{ref}/eval/pq_all/ci_high"] == pytest.approx(41 + T_975_2 / math.sqrt(3))
    assert m[f"{arg}/eval/pq_all_best/mean"] == pytest.approx(45.5)  # best checkpoints: 46, 45.5, 45
    assert m[f"report/{metric_name(CLUSTER)}/eval/pq_all_best/mean"] == pytest.approx(131 / 3)  # 41, 40, 50
    assert m[f"{ref}/cost/cpu_s/mean"] == pytest.approx(WORKERS * CPUS_PER_WORKER * 110.0)  # walls 100..120 s
    assert m[f"{ref}/cost/cpu_s_per_pq"] == pytest.approx(330.0 / 41.0)
    assert m[f"report/{metric_name(SINGLE)}/cost/gpu_s/mean"] == pytest.approx(WORKERS * 1.0 * 100.0)
    diff = f"{arg}/minus/{metric_name(REF)}/eval/pq_all"
    assert (m[f"{diff}/n"], m[f"{diff}/mean"], m[f"{diff}/ci_low"]) == pytest.approx(
        (3, 23 / 6, 23 / 6 - T_975_2 * math.sqrt(7 / 12) / math.sqrt(3))
    )
    assert f"report/{metric_name(SINGLE)}/eval/pq_all/std" not in m  # one seed: no std, no interval
    assert m[f"{arg}/seeds"] == 3  # the FAILED run is not counted

    # the same tables in every medium, and equal to the stored metrics
    terminal = _split_terminal(lines)
    markdown = _split_markdown((report.parent / "report.md").read_text())
    page = _split_html(report.read_text())
    assert terminal == markdown == page
    for title, rows in _expected_from_mlflow(m).items():
        assert terminal[title] == rows, title
    verdicts = terminal["Verdicts"]
    assert verdicts == [  # in the report's order: by variant name
        f"{ARGMAX} beats {REF} by 3.83 PQ, 95% CI [1.94, 5.73] (3 paired seeds)",
        f"{SINGLE} vs {REF}: needs >= 2 paired seeds (has 1); left out: seeds 1, 2 only in {REF}",
        f"no difference shown between {CLUSTER} and {REF} ({CLUSTER} - {REF} = +0.00 PQ, "
        f"95% CI [-12.71, 12.71]; 2 paired seeds); left out: seed 3 only in {CLUSTER}; seed 2 only in {REF}",
    ]
    assert any("1 run(s) without it" in note for note in terminal["Notes"])  # the run without a record

    # stats.json: the same numbers at full precision, logged beside the report
    stats = json.loads((report.parent / "stats.json").read_text())
    assert stats["variants"][REF]["metrics"]["eval/pq_all"]["mean"] == m[f"{ref}/eval/pq_all/mean"]
    assert [d["verdict"] for d in stats["differences"]] == verdicts
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent_id, "report")}
    assert {"report/report.md", "report/report.html", "report/stats.json"} <= logged


def test_an_explicit_reference_is_checked_and_used(sweep_store):
    from pipeline.sweep.report import load_sweep

    _, uri, _ = sweep_store
    runs = load_sweep(uri, SWEEP, reference=ARGMAX)
    assert runs.reference == ARGMAX and {d.variant for d in runs.differences()} == {REF, CLUSTER, SINGLE}
    with pytest.raises(ValueError, match="--reference nope: not a variant"):
        load_sweep(uri, SWEEP, reference="nope")


def test_pq_curves_are_coloured_by_variant_with_the_mean_over_seeds(sweep_store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.report import _pq_vs_step, load_sweep, mean_curve, pq_curves

    _, uri, _ = sweep_store
    runs, client = load_sweep(uri, SWEEP), MlflowClient(uri)
    curves = dict(pq_curves(runs, client))
    assert curves[REF] == [[(3, 30.0), (6, 40.0)], [(3, 31.0), (6, 41.0)], [(3, 32.0), (6, 42.0)]]
    assert mean_curve(curves[REF]) == [(3, 31.0), (6, 41.0)]
    assert mean_curve([[(3, 1.0), (6, 2.0)], [(3, 3.0)]]) == [(3, 2.0)]  # a seed stopped at step 3
    fig = _pq_vs_step(plt, runs, client)
    lines = fig.axes[0].get_lines()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"{v} (mean of {len(curves[v])})" for v in sorted(curves)]
    for k, variant in enumerate(sorted(curves)):  # seeds thin, their mean thick, all one colour per variant
        mine = [line for line in lines if to_hex(line.get_color()) == to_hex(f"C{k}")]
        assert len(mine) == len(curves[variant]) + 1
        thick = [line for line in mine if line.get_label() == legend[k]]
        assert [tuple(xy) for xy in thick[0].get_xydata()] == mean_curve(curves[variant])
    plt.close(fig)


def test_a_fixed_seed_sweep_decides_on_its_t_intervals_and_says_so(sweep_store):
    """Decisions, method, seeds, estimates and costs of the fixed design, by hand, in the report, stats.json
    and on the parent run."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.report import compare, metric_name

    run_dir, uri, parent_id = sweep_store
    lines: list[str] = []
    report = compare(SWEEP, run_dir, echo=lines.append)
    sections = _split_markdown((report.parent / "report.md").read_text())
    # argmax: [1.94, 5.73] excludes 0; cluster (seeds 0, 1: +1, -1): t radius 12.71, equivalence inside
    # +-0.5 needs t_{N-1} sqrt(2) / sqrt(N) <= 0.5, N = 34; one paired seed: no interval
    cost = lambda seeds: 2 * sum(WORKERS * CPUS_PER_WORKER * _wall_s(k) for k in seeds) / 3600  # noqa: E731
    argmax_cost, cluster_cost = f"{cost([0, 1, 2]):.3g} CPU-h", f"{cost([0, 1]):.3g} CPU-h"
    assert sections["Decisions"][0] == [ARGMAX, "better", "student_t", "3", "[1.94, 5.73]", "-", argmax_cost]
    assert sections["Decisions"][2] == [
        CLUSTER,
        "undecided",
        "student_t",
        "2",
        "[-12.71, 12.71]",
        "~34 (32 more)",
        cluster_cost,
    ]
    assert sections["Decisions"][1][1:6] == ["undecided", "student_t", "1", "undefined (n = 1)", ">= 2"]
    design = sections["Design"]
    assert design[0].startswith("intervals of the differences: 95% t interval (fixed number of seeds), valid")
    assert design[-1] == (
        "2 of 3 comparisons undecided: if the observed mean and spread held, the 95% t interval (fixed "
        f"number of seeds) would decide them at (paired seeds, rough estimate): {SINGLE} >= 2, {CLUSTER} ~34 "
        "(32 more)"
    )
    stats = json.loads((report.parent / "stats.json").read_text())
    assert stats["design"]["kind"] == "fixed" and stats["design"]["undecided"] == design[-1]
    by_variant = {d["variant"]: d for d in stats["differences"]}
    cluster = {k: by_variant[CLUSTER][k] for k in ("decision", "method", "n", "seeds", "seeds_needed")}
    assert cluster == {
        "decision": "undecided",
        "method": "student_t",
        "n": 2,
        "seeds": ["0", "1"],
        "seeds_needed": 34,
    }
    radius = T_975_2 * math.sqrt(7 / 12) / math.sqrt(3)
    assert by_variant[ARGMAX]["interval"] == pytest.approx([23 / 6 - radius, 23 / 6 + radius])
    assert by_variant[SINGLE]["interval"] == [None, None] and by_variant[ARGMAX]["cost_h"] == pytest.approx(
        cost([0, 1, 2])
    )
    tags = MlflowClient(uri).get_run(parent_id).data.tags
    assert tags["report.method"] == "student_t" and tags[f"report.decision.{metric_name(ARGMAX)}"] == "better"


@pytest.fixture(scope="module")
def until_decided_store(tmp_path_factory):
    """A sweep's store as an until-decided sweep leaves it: the design's params and the looks' tags on the
    parent; A ahead of the reference by 10, 11, 12 on 3 seeds, B by +1, -1, +2, -2 on 4."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.decision import Design
    from pipeline.tracking import get_or_create_experiment, resolve_target

    run_dir = tmp_path_factory.mktemp("until_decided_store")
    target = resolve_target(None, run_dir)
    client = MlflowClient(target.tracking_uri)
    exp_id = get_or_create_experiment(target, f"sweep-{SWEEP}")
    looks = {"looks": "3", "stop": "max_seeds", "max_seeds": "4", "budget": "1 CPU-h"}
    tags = {
        "kind": "sweep",
        "sweep": SWEEP,
        "study": SWEEP,
        **{f"until_decided.{k}": v for k, v in looks.items()},
    }
    parent = client.create_run(exp_id, tags=tags, run_name=SWEEP).info.run_id
    space = {"model.decoder.assignment": ["spatial_softmax", "argmax", "cluster_softmax"]}
    params = {"space": json.dumps(space), "reference": "assignment=spatial_softmax"}
    params.update(Design.until_decided(0.05, 0.5).params())
    for k, v in params.items():
        client.log_param(parent, k, v)
    runs = [("assignment=spatial_softmax", k, 40.0) for k in range(4)]
    runs += [("assignment=argmax", k, 50.0 + k) for k in range(3)]
    runs += [("assignment=cluster_softmax", k, 40.0 + d) for k, d in enumerate([1.0, -1.0, 2.0, -2.0])]
    for i, (variant, seed, pq) in enumerate(runs):
        _child(client, target.tracking_uri, exp_id, parent, i, (variant, seed, pq, pq, 3, True, False))
    return run_dir, target.tracking_uri, parent


def test_an_until_decided_sweep_shows_its_confidence_sequences(until_decided_store):
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.confidence_sequence import TMixtureSequence
    from pipeline.sweep.decision import seeds_needed
    from pipeline.sweep.report import compare

    run_dir, uri, parent_id = until_decided_store
    report = compare(SWEEP, run_dir, echo=lambda _: None)
    sections = _split_markdown((report.parent / "report.md").read_text())

    def radius(n: int, std: float) -> float:  # the module's formula, c = 0.1, alpha = 0.05
        rn = (0.05**2 * 0.1 / (n + 0.1)) ** (1 / n)
        bn = (n + 0.1) * (1 - rn)
        return math.sqrt(bn * (n - 1) * std**2 / (n * (n - bn)))

    a, b = radius(3, 1.0), radius(4, math.sqrt(10 / 3))
    ref, arg, cluster = "assignment=spatial_softmax", "assignment=argmax", "assignment=cluster_softmax"
    assert sections[f"Paired differences against {ref}"][0][4] == f"[{11 - a:.2f}, {11 + a:.2f}]"
    assert sections["Verdicts"] == [
        f"{arg} is better than {ref} by 11.00 PQ, 95% confidence sequence (t-mixture) "
        f"[{11 - a:.2f}, {11 + a:.2f}] (3 paired seeds)",
        f"undecided between {cluster} and {ref} ({cluster} - {ref} = +0.00 PQ, "
        f"95% confidence sequence (t-mixture) [{-b:.2f}, {b:.2f}]; 4 paired seeds)",
    ]
    assert sections["Decisions"][1][:4] == ["assignment=cluster_softmax", "undecided", "t_mixture_cs", "4"]
    needed = seeds_needed(TMixtureSequence(), 4, 0.0, math.sqrt(10 / 3), 0.5)
    assert (
        needed is not None
        and needed > 100
        and sections["Decisions"][1][5] == f"~{needed} ({needed - 4} more)"
    )
    assert sections["Design"][1] == (
        "until decided: 3 look(s), at most 4 paired seeds; the undecided comparisons reached --max-seeds."
    )
    assert sections["Design"][2].endswith("CPU-h (budget: 1 CPU-h).")
    stats = json.loads((report.parent / "stats.json").read_text())
    assert {k: stats["design"][k] for k in ("kind", "method", "looks", "stop", "max_seeds", "budget")} == {
        "kind": "until_decided", "method": "t_mixture_cs", "looks": 3, "stop": "max_seeds", "max_seeds": 4,
        "budget": "1 CPU-h"}  # fmt: skip
    (better, undecided) = stats["differences"]
    assert (better["decision"], better["n"], better["seeds_needed"]) == ("better", 3, None)
    assert undecided["interval"] == pytest.approx([-b, b]) and undecided["seeds_needed"] == needed
    metrics = MlflowClient(uri).get_run(parent_id).data.metrics
    base = "report/assignment_argmax/minus/assignment_spatial_softmax/eval/pq_all"
    assert metrics[f"{base}/ci_low"] == pytest.approx(11 - a)  # the sequence, not the t interval
