"""`kmax demo` ends with one line on why its 2-seed verdicts are undecided (the seeds the estimate says each
comparison would need), read from the report's stats.json; the sweep and the report are stubbed here (the
real ones are tests/test_sweep.py's and tests/test_seed_stats.py's)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pipeline.sweep import demo, driver, report


def test_demo_explains_its_undecided_verdicts_in_one_line(tmp_path, monkeypatch, capsys):
    line = "2 of 2 comparisons undecided: ... (paired seeds, rough estimate): a ~9 (7 more), b > 1000"
    plans = []

    def fake_sweep(study, run_dir, base, resume, echo):
        plans.append((study.name, study.seeds, base.train.steps))
        return SimpleNamespace(failed=[])

    def fake_compare(sweep, run_dir, echo):
        out = tmp_path / "report"
        out.mkdir()
        (out / report.STATS_FILE).write_text(json.dumps({"design": {"undecided": line}}))
        return out / "report.html"

    monkeypatch.setattr(driver, "run_sweep", fake_sweep)
    monkeypatch.setattr(report, "compare", fake_compare)
    assert demo.run(SimpleNamespace(run_dir=str(tmp_path), overrides=[])) == 0
    assert plans == [(demo.STUDY, demo.DEMO_SEEDS, demo.DEMO_STEPS)]  # the fixed design, unchanged
    out = capsys.readouterr().out.splitlines()
    why = [x for x in out if x.startswith("why undecided: ")]
    assert why == [
        f"why undecided: {line}; `kmax sweep --study assignment --until-decided` adds seeds only where needed"
    ]
