"""Test-side helpers around the record contract (pipeline.data.records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.records import RECORD_SCHEMA, ShardWriter


def write_shard(rows: list[dict], path: str | Path) -> dict:
    """Rows (dicts of `RECORD_SCHEMA` fields) as one shard; returns its manifest entry."""
    writer = ShardWriter(path)
    writer.add(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
    return writer.close()


def source_id_map(label: np.ndarray, segments: list[dict]) -> np.ndarray:
    """The source dataset's id map (0 = void) rebuilt from a record's label map: a round-trip check."""
    out = np.zeros(label.shape, dtype=np.int64)
    for seg in segments:
        out[label == seg["id"]] = seg["source_id"]
    return out
