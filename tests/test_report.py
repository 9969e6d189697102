"""The comparison report: its table equals the metrics stored in MLflow; artifacts land on the parent run.
(Its statistics, and the same numbers in every medium: tests/test_seed_stats.py.)"""

from __future__ import annotations

import pytest

from pipeline.sweep.report import (
    BEST_PQ_KEY,
    COLUMNS,
    COST_KEY,
    PQ_KEY,
    REPORT_ARTIFACT_DIR,
    SweepRuns,
    TrialRecord,
    VariantRow,
    compare,
    load_sweep,
    table_lines,
)
from pipeline.sweep.study import Study, variant_name
from tests.sweep_helpers import STUDY, shared_sweep


def test_mean_std_over_seeds_by_hand():
    trials = [TrialRecord(str(i), str(i), {PQ_KEY: pq}) for i, pq in enumerate([10.0, 20.0, 30.0])]
    iv = VariantRow("v", trials).interval(PQ_KEY)
    assert iv.mean == pytest.approx(20.0) and iv.std == pytest.approx(10.0)  # sample std (n - 1)
    assert VariantRow("v", trials).by_seed(PQ_KEY) == {"0": 10.0, "1": 20.0, "2": 30.0}
    one = VariantRow("v", [TrialRecord("a", "0", {PQ_KEY: 7.0})])
    assert one.interval(PQ_KEY).mean == 7.0 and not one.interval(PQ_KEY).defined  # no std, no interval
    line = table_lines(SweepRuns("uri", "parent", [one]), markdown=True)[2]
    assert line.split(" | ")[2] == "7.00"  # the mean alone, not "7.00 ± 0.00"


def test_study_reference_defaults_to_the_first_variant_and_is_checked():
    space = {
        "model.decoder.assignment": ["spatial_softmax", "argmax"],
        "model.decoder.coord_conv": [False, True],
    }
    study = Study("s", space)
    assert study.reference_point() == study.variants()[0]
    partial = Study("s", space, reference={"model.decoder.assignment": "argmax"})
    assert variant_name(partial.reference_point(), partial) == "assignment=argmax,coord_conv=False"
    depth = Study("d", {"model.decoder.blocks_per_stride": [(1, 1, 1), (2, 2, 2)]}, reference={
        "model.decoder.blocks_per_stride": [2, 2, 2]})  # fmt: skip
    assert variant_name(depth.reference_point(), depth) == "blocks_per_stride=2x2x2"
    with pytest.raises(ValueError, match="reference model.decoder.assignment='nope' is not a point"):
        Study("s", space, reference={"model.decoder.assignment": "nope"})
    with pytest.raises(ValueError, match="is not a point"):
        Study("s", space, reference={"model.decoder.depth": 1})


@pytest.mark.slow
@pytest.mark.ray
def test_report_table_equals_mlflow(ray_session, tmp_path_factory, artifacts_dir):
    from mlflow.tracking import MlflowClient

    s = shared_sweep(tmp_path_factory)
    lines: list[str] = []
    report = compare(STUDY.name, s.sweep_dir, echo=lines.append)
    client = MlflowClient(s.resumed.tracking_uri)
    runs = load_sweep(s.resumed.tracking_uri, STUDY.name)
    assert runs.parent_run_id == s.resumed.parent_run_id
    assert [r.variant for r in runs.rows] == ["assignment=argmax", "assignment=cluster_softmax"]
    md = (report.parent / "report.md").read_text().split("\n## ")[1].splitlines()  # its metrics table
    assert md[0] == "Metrics over seeds"
    md_rows = {
        line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in md if "assignment=" in line
    }
    for row in runs.rows:
        (run_id,) = row.run_ids  # one seed
        stored = client.get_run(run_id).data.metrics
        cells = md_rows[row.variant]
        assert cells[1].strip() == "1"
        for i, (_, key, fmt) in enumerate(COLUMNS):
            iv = row.interval(key)
            assert iv.mean == stored[key] and not iv.defined  # one seed: the mean alone, no std
            assert cells[2 + i].strip() == f"{stored[key]:{fmt}}"
        # eval at steps 3 and 6, a checkpoint at 6 only: the best checkpoint is the last one, recorded
        (trial,) = row.trials
        assert trial.metrics[BEST_PQ_KEY] == stored[PQ_KEY] and not trial.best_from_history
        assert trial.device == "CPU" and trial.metrics[COST_KEY] > 0  # wall s x 1 worker x 0.5 CPU
    assert runs.reference == "assignment=argmax"  # the study's first variant
    assert lines[: len(runs.rows) + 2] == table_lines(runs, markdown=False)  # the terminal table is the same
    assert any("needs >= 2 paired seeds (has 1)" in line for line in lines)  # one seed: no verdict
    logged = {a.path for a in client.list_artifacts(runs.parent_run_id, REPORT_ARTIFACT_DIR)}
    expected = {"report.md", "report.html", "stats.json", "pq_per_variant.png", "pq_vs_step.png",
                "cluster_maps.png"}  # fmt: skip
    assert logged == {f"{REPORT_ARTIFACT_DIR}/{n}" for n in expected}
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 3 and "assignment=cluster_softmax" in html
    (artifacts_dir / "sweep_report.html").write_text(html)
