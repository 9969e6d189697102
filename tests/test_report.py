"""The comparison report: its table equals the metrics stored in MLflow; artifacts land on the parent run."""

from __future__ import annotations

import pytest

from pipeline.sweep.report import COLUMNS, REPORT_ARTIFACT_DIR, VariantRow, compare, load_sweep, table_lines
from tests.sweep_helpers import STUDY, shared_sweep


def test_mean_std_over_seeds_by_hand():
    row = VariantRow("v", ["a", "b", "c"], {"eval/pq_all": [10.0, 20.0, 30.0]})
    mean, std = row.mean_std("eval/pq_all")
    assert mean == pytest.approx(20.0) and std == pytest.approx((200 / 3) ** 0.5)  # population std
    assert VariantRow("v", ["a"], {"eval/pq_all": [7.0]}).mean_std("eval/pq_all") == (7.0, 0.0)


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
    md = (report.parent / "report.md").read_text().splitlines()
    md_rows = {
        line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in md if "assignment=" in line
    }
    for row in runs.rows:
        (run_id,) = row.run_ids  # one seed
        stored = client.get_run(run_id).data.metrics
        cells = md_rows[row.variant]
        assert cells[1].strip() == "1"
        for i, (_, key, fmt) in enumerate(COLUMNS):
            assert row.mean_std(key) == (stored[key], 0.0)
            assert cells[2 + i].strip() == f"{stored[key]:{fmt}} ± {0.0:{fmt}}"
    assert lines[: len(runs.rows) + 2] == table_lines(runs, markdown=False)  # the terminal table is the same
    logged = {a.path for a in client.list_artifacts(runs.parent_run_id, REPORT_ARTIFACT_DIR)}
    expected = {"report.md", "report.html", "pq_per_variant.png", "pq_vs_step.png", "cluster_maps.png"}
    assert logged == {f"{REPORT_ARTIFACT_DIR}/{n}" for n in expected}
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 3 and "assignment=cluster_softmax" in html
    (artifacts_dir / "sweep_report.html").write_text(html)
