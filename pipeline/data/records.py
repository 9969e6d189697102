"""The canonical record and shard schema: the one contract between preprocessing, training and evaluation.

A prepared split lives in ``DIR/<split>/``::

    manifest.json        dataset, split, categories + contiguous ids, label divisor, counts, hashes, options
    quarantine.jsonl     one {"record_id", "file", "code", "reason"} per rejected input record
    shard-00000.parquet  rows of `RECORD_SCHEMA`, in the deterministic order of the source annotation file

Row fields (`RECORD_SCHEMA`):
    record_id     str    image id as a string (COCO int id, Cityscapes "city_seq_frame")
    file_name     str    source image path relative to the dataset root
    height/width  int32  size of the stored image and label (after an optional --max-size resize)
    orig_height/orig_width int32  size in the source dataset
    image         bytes  encoded image (the source bytes when not resized, PNG otherwise); decode_image
    label         bytes  zlib-compressed little-endian int32 [height, width] panoptic map
                         ``class_id * label_divisor + instance`` with VOID_LABEL (-1) on void; decode_label
    segments      str    JSON list of segment dicts (COMMON.md contract: id, category_id, class_id, isthing,
                         iscrowd, area) plus ``source_id`` (the segment's id in the source PNG)
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

VOID_LABEL = -1
"""Label-map value of void; equal to kmax_model.targets.VOID_LABEL (asserted in tests/test_records.py).
Defined here too so that preprocessing workers never import kmax_model and torch (seconds per worker)."""
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
SHARD_PATTERN = "shard-{:05d}.parquet"
LABEL_ZLIB_LEVEL = 6
"""Fixed so identical labels always give identical bytes."""

RECORD_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("image", pa.binary()),
        ("label", pa.binary()),
        ("segments", pa.string()),
    ]
)
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)

_ENCODED_COLUMNS = ("image", "label")
"""Already compressed (JPEG/PNG, zlib): zstd over them costs a tenth of prepare's time and saves nothing."""

# Fixed writer options: together with the fixed row order they make shards byte-identical across runs.
PARQUET_WRITE_OPTIONS = {
    "compression": {n: "none" if n in _ENCODED_COLUMNS else "zstd" for n in RECORD_FIELDS},
    "compression_level": {n: 3 for n in RECORD_FIELDS if n not in _ENCODED_COLUMNS},
    "use_dictionary": False,
    "write_statistics": False,
    "version": "2.6",
    "data_page_size": 1 << 20,
}
ROW_GROUP_SIZE = 64


def encode_label(label: np.ndarray) -> bytes:
    """int32 [H, W] panoptic map -> compressed bytes (see the module docstring)."""
    return zlib.compress(np.ascontiguousarray(label, dtype="<i4").tobytes(), LABEL_ZLIB_LEVEL)


def decode_label(data: bytes, height: int, width: int) -> np.ndarray:
    """Inverse of `encode_label`: int32 [height, width]."""
    arr = np.frombuffer(zlib.decompress(data), dtype="<i4")
    if arr.size != height * width:
        raise ValueError(f"label holds {arr.size} values, expected {height}x{width}")
    return arr.reshape(height, width).astype(np.int32)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 [H, W, 3] RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def encode_segments(segments: list[dict]) -> str:
    return json.dumps(segments, sort_keys=True, separators=(",", ":"))


def decode_segments(data: str) -> list[dict]:
    return json.loads(data)


def decode_record(row: dict) -> dict:
    """A stored row -> {"record_id", "image" uint8 [H,W,3], "label" int32 [H,W], "segments", ...}."""
    h, w = int(row["height"]), int(row["width"])
    out = {k: row[k] for k in ("record_id", "file_name", "orig_height", "orig_width") if k in row}
    out.update(
        height=h,
        width=w,
        image=decode_image(row["image"]),
        label=decode_label(row["label"], h, w),
        segments=decode_segments(row["segments"]),
    )
    return out


def iter_decoded(
    data_dir: str | Path, split: str, rank: int = 0, world: int = 1
) -> Iterator[tuple[int, dict]]:
    """(index, decoded record) of this rank's share of a split: records with ``index % world == rank``."""
    for i, row in enumerate(iter_records(data_dir, split)):
        if i % world == rank:
            yield i, decode_record(row)


def split_dir(data_dir: str | Path, split: str) -> str:
    """The location of a prepared split: a path or a storage URI (pipeline.storage)."""
    return storage.join(str(data_dir), split)


def read_manifest(data_dir: str | Path, split: str) -> dict:
    """The manifest of a prepared split; FileNotFoundError / ValueError naming the file when it is absent,
    not JSON or of another schema version."""
    path = storage.join(split_dir(data_dir, split), MANIFEST_NAME)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"no prepared split '{split}' here: {path} does not exist (run `kmax prepare`)"
        )
    try:
        manifest = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: schema_version {version} != {SCHEMA_VERSION}")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[str]:
    """Shard locations of a split, in record order."""
    manifest = read_manifest(data_dir, split)
    return [storage.join(split_dir(data_dir, split), s["file"]) for s in manifest["shards"]]


def read_shard(location: str, columns: list[str] | None = None) -> pa.Table:
    """One shard as an Arrow table of `RECORD_SCHEMA` (a path or a storage URI)."""
    fs, path = storage.filesystem(location)
    return pq.read_table(path, columns=columns, schema=None if columns else RECORD_SCHEMA, filesystem=fs)


def open_shard(location: str) -> pq.ParquetFile:
    """A shard opened for reading row group by row group."""
    fs, path = storage.filesystem(location)
    return pq.ParquetFile(fs.open_input_file(path))


def iter_records(data_dir: str | Path, split: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Stored rows (undecoded) of a split in record order, read with plain pyarrow (no Ray)."""
    for location in shard_paths(data_dir, split):
        yield from read_shard(location, columns).to_pylist()


PASS_COLUMN = "pass"
"""Extra int32 column of training rows: which copy of a repeated small split the row is
(pipeline.train.data_order; pipeline.data.augment seeds each copy differently)."""


def split_layout(data_dir: str | Path, split: str) -> tuple[list[str], list[list[int]]]:
    """(shard locations, rows of each row group of each shard) of a split, read from the Parquet footers."""
    locations = shard_paths(data_dir, split)
    groups = []
    for location in locations:
        meta = open_shard(location).metadata
        groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return locations, groups


def payload_bytes(table: pa.Table) -> np.ndarray:
    """int64 [rows]: encoded bytes of each row's image, label and segments (the measure of shard sizing)."""
    sizes = [pc.binary_length(table[name]).to_numpy() for name in ("image", "label", "segments")]
    return np.sum(sizes, axis=0, dtype=np.int64)


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes as they pass, so a shard's sha256 needs no read-back. Writes
    to a path or a storage URI (an object store upload streams as the bytes come)."""

    def __init__(self, location: str):
        super().__init__()
        fs, path = storage.filesystem(location)
        self._file = fs.open_output_stream(path)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class ShardWriter:
    """Writes one Parquet shard in row groups of `ROW_GROUP_SIZE` rows as Arrow tables of `RECORD_SCHEMA`
    arrive (so a streaming job has no long write at its end), with the fixed writer options; the bytes equal
    a one-shot write of the same rows, however they were split into tables.

    ``add(table)``; ``close()`` returns the manifest entry {"file", "rows", "sha256", "bytes"}; ``nbytes`` is
    the `payload_bytes` added so far (for shard sizing).
    """

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.rows = 0
        self.nbytes = 0
        self._pending = RECORD_SCHEMA.empty_table()
        self._file = _HashingFile(self.location)
        self._writer = pq.ParquetWriter(self._file, RECORD_SCHEMA, **PARQUET_WRITE_OPTIONS)

    def add(self, table: pa.Table, nbytes: int | None = None) -> None:
        """Append rows; ``nbytes`` is their `payload_bytes` sum when the caller has it already."""
        self.rows += table.num_rows
        self.nbytes += int(payload_bytes(table).sum()) if nbytes is None else nbytes
        self._pending = pa.concat_tables([self._pending, table])
        while self._pending.num_rows >= ROW_GROUP_SIZE:
            self._write_group(self._pending.slice(0, ROW_GROUP_SIZE))
            self._pending = self._pending.slice(ROW_GROUP_SIZE)

    def _write_group(self, table: pa.Table) -> None:
        # one contiguous chunk per column: the writer ends data pages at chunk boundaries, so the bytes would
        # otherwise depend on how the rows arrived
        self._writer.write_table(table.combine_chunks())

    def close(self) -> dict:
        if self._pending.num_rows:
            self._write_group(self._pending)
        self._writer.close()
        self._file.close()
        return {
            "file": posixpath.basename(self.location),
            "rows": self.rows,
            "sha256": self._file.sha256.hexdigest(),
            "bytes": self._file.size,
        }


class ShardSequence:
    """The shards of one split in a folder (`SHARD_PATTERN` names): rows are appended in record order and a
    shard is closed after the row whose `payload_bytes` take it to ``target_bytes`` or more, so the layout
    depends only on the rows and the target.

    ``add(table)`` (rows of `RECORD_SCHEMA`), ``close()`` -> the manifest entries, ``abort()`` closes an open
    file after an error (its folder is then discarded by the caller).
    """

    def __init__(self, folder: str | Path, target_bytes: float):
        self.folder = str(folder)
        self.target = target_bytes
        self.entries: list[dict] = []
        self._writer: ShardWriter | None = None

    def add(self, table: pa.Table) -> None:
        sizes = payload_bytes(table)
        while table.num_rows:
            if self._writer is None:
                self._writer = ShardWriter(storage.join(self.folder, SHARD_PATTERN.format(len(self.entries))))
            full = np.flatnonzero(self._writer.nbytes + np.cumsum(sizes) >= self.target)
            n = int(full[0]) + 1 if full.size else table.num_rows
            self._writer.add(table.slice(0, n), int(sizes[:n].sum()))
            table, sizes = table.slice(n), sizes[n:]
            if full.size:
                self.entries.append(self._writer.close())
                self._writer = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self.entries.append(self._writer.close())
            self._writer = None
        return self.entries

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
