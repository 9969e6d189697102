"""pq_compute_files against the official panopticapi answers kept in shared/fixtures/pq_oracle (compared
with ==, every field, for every chunk count the oracle was run with)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.pq import GROUPS
from pipeline.eval.pq_files import pq_compute_files

CASES = ("edges", "random_small", "coco_sample")


def _expected(case_dir: Path) -> dict:
    with (case_dir / "expected.json").open() as f:
        return json.load(f)


def _compare(result: dict, expected: dict) -> list:
    """Every field that differs (with ==), as (where, field, ours, official)."""
    bad = []
    for group, _ in GROUPS:
        for f in ("pq", "sq", "rq", "n"):
            if result[group][f] != expected[group][f]:
                bad.append((group, f, result[group][f], expected[group][f]))
    if set(result["per_class"]) != {int(c) for c in expected["per_class"]}:
        bad.append(("per_class", "keys", sorted(result["per_class"]), sorted(expected["per_class"])))
    for cat, vals in expected["per_class"].items():
        for f in ("pq", "sq", "rq"):
            ours = result["per_class"].get(int(cat), {}).get(f)
            if ours != vals[f]:
                bad.append((cat, f, ours, vals[f]))
    return bad


@pytest.mark.parametrize("case", CASES)
def test_file_path_equals_official_for_every_chunk_count(pq_oracle_dir: Path, case: str) -> None:
    d = pq_oracle_dir / case
    expected = _expected(d)
    assert expected, f"{case}: no oracle results"
    for key, exp in expected.items():
        chunks = int(key.removeprefix("chunks_"))
        result = pq_compute_files(d / "gt.json", d / "gt", d / "pred.json", d / "pred", chunks=chunks)
        assert _compare(result, exp) == [], f"{case} {key}"


def test_chunk_emulation_matters_on_random_small(pq_oracle_dir: Path) -> None:
    """The oracle's floats differ between 1 and 2 chunks on this case, so the == test above would catch a
    reduction that ignores the official summation order."""
    d = pq_oracle_dir / "random_small"
    expected = _expected(d)
    assert _compare(expected["chunks_2"], expected["chunks_1"]) != []
    one = pq_compute_files(d / "gt.json", d / "gt", d / "pred.json", d / "pred", chunks=1)
    assert _compare(one, expected["chunks_2"]) != []


def test_edges_case_reads_as_documented(pq_oracle_dir: Path) -> None:
    """Hand-checked numbers of the edges case (reference §3.3): IoU exactly 0.5 is no match (car PQ 0),
    the banner seen only in predictions counts with PQ 0, the sky IoU of image 1 is 2360 / 2640 (void out of
    the union) and 1 in image 2."""
    d = pq_oracle_dir / "edges"
    r = pq_compute_files(d / "gt.json", d / "gt", d / "pred.json", d / "pred", chunks=2)
    assert (r["All"]["n"], r["Things"]["n"], r["Stuff"]["n"]) == (5, 2, 3)
    assert r["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["per_class"][92]["pq"] == 0.0
    assert r["per_class"][187]["sq"] == pytest.approx((2360 / 2640 + 1.0) / 2, abs=1e-12)
    assert r["per_class"][1]["rq"] == pytest.approx(2 / 3)
