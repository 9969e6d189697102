"""`kmax prepare` on a synthetic set: shards independent of parallelism, atomic output, clear errors."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main as kmax_main
from pipeline.data.prepare import PrepareOptions, block_sizes, prepare
from pipeline.data.records import decode_record, iter_records, read_manifest
from pipeline.data.scene import SceneConfig
from pipeline.data.synthetic import generate

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("prep") / "raw",
        "coco",
        train=20,
        val=4,
        seed=11,
        cfg=SceneConfig(height=64, width=80),
    )


def _hashes(manifest):
    return [(s["file"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def test_identical_shards_for_any_worker_count(raw, ray_session, tmp_path):
    runs = [
        prepare(
            PrepareOptions(
                "coco",
                str(raw),
                "train",
                str(tmp_path / f"o{w}_{b}"),
                shard_mb=0.02,
                num_workers=w,
                block_rows=b,
                progress=False,
            )
        )
        for w, b in ((1, 1), (3, 4), (1, 1))
    ]
    assert len(runs[0]["shards"]) >= 3 and sum(s["rows"] for s in runs[0]["shards"]) == 20
    assert _hashes(runs[0]) == _hashes(runs[1]) == _hashes(runs[2])
    manifests = [
        (tmp_path / f"o{w}_{b}" / "train" / "manifest.json").read_text() for w, b in ((1, 1), (3, 4))
    ]
    assert manifests[0] == manifests[1]  # parallelism knobs are not part of the recorded options
    m = read_manifest(tmp_path / "o1_1", "train")
    assert m["num_classes"] == 6 and m["thing_class_ids"] == [0, 1, 2] and m["label_divisor"] == 256
    assert [c["category_id"] for c in m["categories"]] == [1, 2, 3, 10, 11, 12]
    assert m["options"] == {
        "dataset": "coco",
        "root": str(raw),
        "split": "train",
        "max_size": None,
        "label_divisor": None,
        "shard_mb": 0.02,
        "panoptic_json": None,
        "strict": False,
    }
    ids = [r["record_id"] for r in iter_records(tmp_path / "o1_1", "train", columns=["record_id"])]
    assert ids == [str(i) for i in range(1, 21)]


def test_cli_progress_divisor_and_replacement(raw, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--root", str(raw), "--split", "val", "--out", str(out)]
    assert kmax_main(args + ["--label-divisor", "1000"]) == 0
    err = capsys.readouterr().err
    assert "prepare coco/val: 4/4 records, 0 quarantined" in err
    rec = decode_record(next(iter_records(out, "val")))
    assert all(s["id"] == s["class_id"] * 1000 + s["id"] % 1000 for s in rec["segments"])
    assert read_manifest(out, "val")["label_divisor"] == 1000
    assert kmax_main(args + ["--quiet"]) == 0  # re-running replaces the split atomically
    assert read_manifest(out, "val")["label_divisor"] == 256 and sorted(p.name for p in out.iterdir()) == [
        "val"
    ]


def test_bad_input_names_the_problem_and_keeps_output(raw, tmp_path, capsys):
    out = tmp_path / "keep"
    (out / "val").mkdir(parents=True)
    (out / "val" / "manifest.json").write_text(json.dumps({"precious": 1}))
    assert kmax_main(["prepare", "--root", str(tmp_path / "nope"), "--split", "val", "--out", str(out)]) == 2
    assert "panoptic_val2017.json" in capsys.readouterr().err
    assert json.loads((out / "val" / "manifest.json").read_text()) == {"precious": 1}
    assert sorted(p.name for p in out.iterdir()) == ["val"]
    with pytest.raises(ValueError, match="prepare.max_size"):
        PrepareOptions("coco", str(raw), "val", str(out), max_size=2)
    with pytest.raises(ValueError, match="prepare.dataset"):
        PrepareOptions("voc", str(raw), "val", str(out))


def test_block_sizes_shrink_towards_the_end():
    # 200 rows on 2 workers: 50-row blocks while left / 4 >= 50, then left / 4 rounded up, at least 10
    assert block_sizes(200, 2, 50) == [50, 38, 28, 21, 16, 12, 10, 10, 10, 5]
    big = block_sizes(1000, 2, 50)
    assert sum(big) == 1000 and big[:17] == [50] * 17 and max(big[17:]) == 38
    assert block_sizes(20, 2, 50) == [10, 10]  # a small split still gives every worker a task
    assert block_sizes(7, 2, 50) == [7] and block_sizes(5, 3, 1) == [1] * 5 and block_sizes(0, 2, 50) == []
