"""The record / shard schema: encodings round-trip, shards are byte-deterministic, manifests are checked."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import records


def _row(i: int, label: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.full((*label.shape, 3), i * 10, np.uint8)).save(buf, format="PNG")
    segs = [
        {
            "id": 5 * 256 + 1,
            "category_id": 7,
            "class_id": 5,
            "isthing": True,
            "iscrowd": 0,
            "area": 3,
            "source_id": 1234,
        }
    ]
    return {
        "record_id": str(i),
        "file_name": f"x/{i}.png",
        "height": label.shape[0],
        "width": label.shape[1],
        "orig_height": label.shape[0],
        "orig_width": label.shape[1],
        "image": buf.getvalue(),
        "label": records.encode_label(label),
        "segments": records.encode_segments(segs),
    }


def test_void_label_is_the_model_contract():
    from kmax_model.targets import VOID_LABEL

    assert records.VOID_LABEL == VOID_LABEL


def test_label_round_trip_keeps_void_and_large_ids():
    label = np.array([[-1, 0, 132 * 256 + 255], [1000 * 133, 7, -1]], np.int32)
    back = records.decode_label(records.encode_label(label), 2, 3)
    assert back.dtype == np.int32 and np.array_equal(back, label)
    with pytest.raises(ValueError, match="expected 3x3"):
        records.decode_label(records.encode_label(label), 3, 3)


def test_shards_are_byte_identical_and_decode(tmp_path):
    label = np.array([[1281, 1281, -1], [1281, 3, 3]], np.int32)
    rows = [_row(i, label) for i in range(3)]
    a = records.write_shard(rows, tmp_path / "a.parquet")
    b = records.write_shard(rows, tmp_path / "b.parquet")
    assert a["sha256"] == b["sha256"] and a["rows"] == 3
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    # a split folder with a manifest is readable through the public API
    split = tmp_path / "data" / "val"
    split.mkdir(parents=True)
    entry = records.write_shard(rows, split / "shard-00000.parquet")
    (split / "manifest.json").write_text(
        json.dumps({"schema_version": records.SCHEMA_VERSION, "shards": [entry]})
    )
    got = [records.decode_record(r) for r in records.iter_records(tmp_path / "data", "val")]
    assert [g["record_id"] for g in got] == ["0", "1", "2"]
    assert np.array_equal(got[1]["label"], label)
    assert got[2]["image"].shape == (2, 3, 3) and int(got[2]["image"][0, 0, 0]) == 20
    assert got[0]["segments"][0]["source_id"] == 1234
    src = records.source_id_map(got[0]["label"], got[0]["segments"])
    assert src.tolist() == [[1234, 1234, 0], [1234, 0, 0]]


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        records.read_manifest(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ValueError, match="schema_version 999"):
        records.read_manifest(tmp_path, "train")
