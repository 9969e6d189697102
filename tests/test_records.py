"""The record / shard schema: encodings round-trip, shards are byte-deterministic, manifests are checked."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import records
from tests.shard_helpers import source_id_map, write_shard


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
    a = write_shard(rows, tmp_path / "a.parquet")
    b = write_shard(rows, tmp_path / "b.parquet")
    assert a["sha256"] == b["sha256"] and a["rows"] == 3
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    # a split folder with a manifest is readable through the public API
    split = tmp_path / "data" / "val"
    split.mkdir(parents=True)
    entry = write_shard(rows, split / "shard-00000.parquet")
    (split / "manifest.json").write_text(
        json.dumps({"schema_version": records.SCHEMA_VERSION, "shards": [entry]})
    )
    got = [records.decode_record(r) for r in records.iter_records(tmp_path / "data", "val")]
    assert [g["record_id"] for g in got] == ["0", "1", "2"]
    assert np.array_equal(got[1]["label"], label)
    assert got[2]["image"].shape == (2, 3, 3) and int(got[2]["image"][0, 0, 0]) == 20
    assert got[0]["segments"][0]["source_id"] == 1234
    src = source_id_map(got[0]["label"], got[0]["segments"])
    assert src.tolist() == [[1234, 1234, 0], [1234, 0, 0]]


def test_shard_bytes_do_not_depend_on_how_rows_arrive(tmp_path):
    """Rows fed as tables of any split give the bytes of a one-shot write, and the manifest hash is the
    file's (computed while writing, not read back)."""
    import pyarrow as pa

    label = np.array([[1281, 1281, -1], [1281, 3, 3]], np.int32)
    rng = np.random.default_rng(0)
    # images of 100-400 kB (the writer stores them as they are): data pages (1 MiB) then end inside row
    # groups, where a writer fed chunked columns would cut them differently
    rows = [
        _row(0, label) | {"record_id": str(i), "image": rng.bytes(int(rng.integers(100_000, 400_000)))}
        for i in range(records.ROW_GROUP_SIZE + 9)
    ]
    one = write_shard(rows, tmp_path / "one.parquet")
    table = pa.Table.from_pylist(rows, schema=records.RECORD_SCHEMA)
    writer = records.ShardWriter(tmp_path / "pieces.parquet")
    for a, b in ((0, 1), (1, 40), (40, 40), (40, 70), (70, len(rows))):
        writer.add(table.slice(a, b - a))
    pieces = writer.close()
    data = (tmp_path / "pieces.parquet").read_bytes()
    assert data == (tmp_path / "one.parquet").read_bytes()
    assert pieces == {**one, "file": "pieces.parquet"}
    assert pieces["sha256"] == hashlib.sha256(data).hexdigest() and pieces["bytes"] == len(data)
    assert pieces["rows"] == len(rows) and writer.nbytes == int(records.payload_bytes(table).sum())


def test_shard_sequence_closes_a_shard_at_the_row_reaching_the_target(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    label = np.zeros((2, 3), np.int32)
    table = pa.Table.from_pylist([_row(i, label) for i in range(7)], schema=records.RECORD_SCHEMA)
    size = records.payload_bytes(table)
    expected_size = [len(r["image"]) + len(r["label"]) + len(r["segments"]) for r in table.to_pylist()]
    assert size.tolist() == expected_size
    # target = rows 0-1 plus half of row 2: shard 0 ends with row 2 (the row that reaches the target)
    target = size[0] + size[1] + size[2] / 2
    seq = records.ShardSequence(tmp_path, target)
    seq.add(table.slice(0, 1))
    seq.add(table.slice(1, 6))  # crosses the target inside this table
    seq.add(table.slice(7))  # empty
    entries = seq.close()
    # shard 1 closes at row 5 the same way; row 6 alone is the last shard, closed by close()
    assert [e["rows"] for e in entries] == [3, 3, 1]
    assert [e["file"] for e in entries] == [f"shard-0000{i}.parquet" for i in range(3)]
    got = [r["record_id"] for r in pq.read_table(tmp_path / "shard-00001.parquet").to_pylist()]
    assert got == ["3", "4", "5"]


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        records.read_manifest(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ValueError, match="schema_version 999"):
        records.read_manifest(tmp_path, "train")
