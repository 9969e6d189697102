"""`kmax prepare`: validate and convert a dataset into Parquet shards + manifest.json (Ray Data).

Flow: the reader builds the record index from the annotation files (driver, cheap) -> Ray Data
``from_arrow`` (blocks of `block_sizes`) + ``map_batches`` decodes, validates and converts every record
in parallel (order preserved) into Arrow tables -> the driver streams those tables back in order, assigns
the rows to shards by cumulative size and writes each shard itself, row group by row group, with pyarrow
and fixed writer options (pipeline.data.records.ShardSequence); the rows stay Arrow data from worker to file.
Shard contents therefore depend only on the inputs and options, never on the parallelism or on Ray's
own file naming. ``OUT`` is a folder or a storage URI (pipeline.storage). Everything is written to a
temporary folder that replaces ``OUT/<split>`` at the end (atomically on a file system, manifest last on an
object store), so a failed or ``--strict``-rejected run never touches an earlier output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import cityscapes, coco
from pipeline.data.coco import Index, category_lookup
from pipeline.data.panoptic import ConvertContext
from pipeline.data.quarantine import MALFORMED_ANNOTATION, RecordError
from pipeline.data.records import (
    MANIFEST_NAME,
    QUARANTINE_NAME,
    RECORD_FIELDS,
    RECORD_SCHEMA,
    SCHEMA_VERSION,
    ShardSequence,
)

DATASETS = ("coco", "cityscapes", "cityscapes-panoptic")
RESULT_SCHEMA = pa.schema(
    [
        *RECORD_SCHEMA,
        ("order", pa.int64()),
        ("ok", pa.bool_()),
        ("code", pa.string()),
        ("file", pa.string()),
        ("reason", pa.string()),
    ]
)
"""A converted record plus its index position and outcome (code/file/reason empty when ok)."""
QUARANTINE_FIELDS = ("record_id", "file", "code", "reason", "order")
MB = 1024 * 1024
ROWS_PER_BLOCK = 50
"""Most index rows per Ray Data input block (one conversion task each): large enough that task start-up is
amortised, small enough that the blocks held back by ``preserve_order`` stay a few MB per worker.
Measured (benchmarks/bench_preprocess.py, 200 records, 2 tasks): 10-row blocks throughout cost 0.5 s more
than 50-row blocks (ratio to the loop 1.22x against 1.44x in the same session)."""
MIN_BLOCK_ROWS = 10
"""Fewest rows of the shrinking blocks at the end of the job (`block_sizes`)."""


def block_sizes(n: int, workers: int, max_rows: int, min_rows: int = MIN_BLOCK_ROWS) -> list[int]:
    """Rows of each conversion task, in index order: ``max_rows`` while much work is left, then about
    ``left / (2 * workers)`` but not below ``min_rows``, so that the last tasks are short and the workers
    finish together (guided self-scheduling, Polychronopoulos & Kuck 1987). Equal blocks leave one worker
    idle for up to a whole block at the end."""
    sizes: list[int] = []
    left = n
    while left > 0:
        size = min(left, max_rows, max(min_rows, -(-left // (2 * workers))))
        sizes.append(size)
        left -= size
    return sizes


@dataclass
class PrepareOptions:
    """Options of one `kmax prepare` run (recorded in the manifest, except the parallelism knobs).

    dataset: "coco" (COCO panoptic layout), "cityscapes" (raw gtFine) or "cityscapes-panoptic"
    (createPanopticImgs JSON, ``panoptic_json`` overrides its default path). ``block_rows`` is the most
    rows per conversion task (one UDF call each, see `block_sizes`).
    """

    dataset: str
    root: str
    split: str
    out: str
    max_size: int | None = None
    label_divisor: int | None = None
    shard_mb: float = 64.0
    panoptic_json: str | None = None
    strict: bool = False
    num_workers: int = 2
    block_rows: int = ROWS_PER_BLOCK
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"prepare.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.max_size is not None and self.max_size < 8:
            raise ValueError(f"prepare.max_size must be >= 8 pixels, got {self.max_size}")
        if self.label_divisor is not None and self.label_divisor < 2:
            raise ValueError(f"prepare.label_divisor must be >= 2, got {self.label_divisor}")
        if self.shard_mb <= 0:
            raise ValueError(f"prepare.shard_mb must be > 0, got {self.shard_mb}")
        if self.num_workers < 1:
            raise ValueError(f"prepare.num_workers must be >= 1, got {self.num_workers}")
        if self.block_rows < 1:
            raise ValueError(f"prepare.block_rows must be >= 1, got {self.block_rows}")
        if not self.split or "/" in self.split or self.split.startswith("."):
            raise ValueError(f"prepare.split must be a plain folder name, got {self.split!r}")


def build_index(opts: PrepareOptions) -> Index:
    if opts.dataset == "coco":
        return coco.build_index(opts.root, opts.split, opts.label_divisor or coco.DEFAULT_LABEL_DIVISOR)
    divisor = opts.label_divisor or cityscapes.DEFAULT_LABEL_DIVISOR
    if opts.dataset == "cityscapes":
        return cityscapes.build_raw_index(opts.root, opts.split, divisor)
    return cityscapes.build_panoptic_index(opts.root, opts.split, opts.panoptic_json, divisor)


def convert_row(row: dict, ctx: ConvertContext) -> dict:
    """The per-record function (pure: same row -> same bytes). Raises RecordError on a bad record."""
    if row.get("labelids_file"):
        return cityscapes.convert_raw_row(row, ctx)
    return coco.convert_png_row(row, ctx)


def _empty_record(row: dict) -> dict:
    return {
        "record_id": row["record_id"],
        "file_name": row["file_name"],
        "height": 0,
        "width": 0,
        "orig_height": 0,
        "orig_width": 0,
        "image": b"",
        "label": b"",
        "segments": "",
    }


def convert_one(row: dict, ctx: ConvertContext) -> dict:
    """`convert_row` plus the result fields: bad records come back with ok=False and the reason."""
    try:
        rec = convert_row(row, ctx)
        return {**rec, "order": row["order"], "ok": True, "code": "", "file": "", "reason": ""}
    except (KeyError, TypeError, ValueError) as exc:  # a segments_info entry without "id", a non-int area...
        err = RecordError(
            MALFORMED_ANNOTATION, row["label_file"], f"malformed annotation ({type(exc).__name__}: {exc})"
        )
    except RecordError as caught:
        err = caught
    return {
        **_empty_record(row),
        "order": row["order"],
        "ok": False,
        "code": err.code,
        "file": err.file,
        "reason": err.message,
    }


def convert_batch(batch: pa.Table, ctx: ConvertContext) -> pa.Table:
    """Ray Data ``map_batches`` UDF (pyarrow batch format): index rows -> rows of `RESULT_SCHEMA`.

    Built straight into the fixed schema, so Ray Data infers nothing and the driver writes the columns as
    they come."""
    return pa.Table.from_pylist([convert_one(r, ctx) for r in batch.to_pylist()], schema=RESULT_SCHEMA)


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int, bad: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 1.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        end = "\n" if final or not sys.stderr.isatty() else "\r"
        print(
            f"prepare {self.label}: {done}/{self.total} records, {bad} quarantined, {rate:.1f} img/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def _ray_results(index: Index, ctx: ConvertContext, opts: PrepareOptions):
    """Yield `RESULT_SCHEMA` tables whose rows follow the index order (Ray Data map_batches, order
    preserved)."""
    import ray.data

    from pipeline.ray_setup import init_ray

    init_ray()
    # Ray Data logs an INFO line per execution and a WARNING about disabled progress bars: keep them out.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if not index.rows:
        return
    keys = list(dict.fromkeys(k for r in index.rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in index.rows])
    sizes = block_sizes(table.num_rows, opts.num_workers, opts.block_rows)
    # zero-copy slices; Ray's Arrow serializer ships only each slice's part of the buffers
    blocks = [table.slice(start, n) for start, n in zip(np.cumsum([0, *sizes[:-1]]), sizes)]
    with ray.data.DataContext.current(_data_context()):  # captured by the Dataset; the global one is kept
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            convert_batch,
            fn_kwargs={"ctx": ctx},
            batch_size=None,  # one call per block: a batch size would bundle small blocks into one task
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=min(opts.num_workers, len(blocks))),
            num_cpus=1,
        )
    # batch_size=None: the blocks as the tasks made them (re-batching would only copy)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _data_context():
    """The Ray Data context of a prepare job: order preserved, and only the downstream-capacity
    backpressure policy. Measured on 2 CPUs with 2 conversion tasks (benchmarks/bench_preprocess.py): the
    default resource-budget policy holds the second task back for ~1.1 s and the (deprecated) concurrency-cap
    policy leaves gaps between tasks, 4.7-5.0 s against 3.0-3.4 s without them for 200 records. Memory stays
    bounded without them: the only consumer is this driver, which writes each record as it arrives.
    (``backpressure_policies.enabled`` is read by ray.data._internal.execution.backpressure_policy in 2.60.)
    """
    import ray.data
    from ray.data._internal.execution.backpressure_policy import DownstreamCapacityBackpressurePolicy

    ctx = ray.data.DataContext.get_current().copy()
    ctx.execution_options.preserve_order = True
    ctx.set_config("backpressure_policies.enabled", [DownstreamCapacityBackpressurePolicy])
    return ctx


def prepare(opts: PrepareOptions) -> dict:
    """Run the job; returns the manifest. Raises SystemExit-free errors; see `run` for the CLI."""
    index = build_index(opts)
    ctx = ConvertContext(
        root=str(Path(opts.root).resolve()),
        categories=category_lookup(index.categories),
        label_divisor=index.label_divisor,
        max_size=opts.max_size,
    )
    out = storage.absolute(opts.out)
    tmp = storage.join(out, f".{opts.split}.tmp-{os.getpid()}")
    storage.delete_dir(tmp)
    storage.make_dirs(tmp)
    try:
        manifest = _write(index, ctx, opts, tmp)
        if opts.strict and manifest["num_quarantined"]:
            storage.delete_dir(tmp)
            return manifest
        storage.replace_dir(tmp, storage.join(out, opts.split))
    except BaseException:
        storage.delete_dir(tmp)
        raise
    return manifest


def _write(index: Index, ctx: ConvertContext, opts: PrepareOptions, tmp: str) -> dict:
    quarantine = [{k: q[k] for k in QUARANTINE_FIELDS} for q in index.quarantine]
    shard_set = ShardSequence(tmp, opts.shard_mb * MB)
    done = 0
    progress = _Progress(len(index.rows), f"{opts.dataset}/{opts.split}", opts.progress)
    expected_order = np.array([r["order"] for r in index.rows], dtype=np.int64)
    try:
        for table in _ray_results(index, ctx, opts):
            order = table["order"].to_numpy()
            # guards the determinism contract (preserve_order)
            if not np.array_equal(order, expected_order[done : done + len(order)]):
                raise RuntimeError("Ray Data returned records out of order; preserve_order must be on")
            done += len(order)
            ok = table["ok"]
            if not pc.all(ok).as_py():  # (filter copies the columns: only when something is bad)
                quarantine.extend(table.filter(pc.invert(ok)).select(QUARANTINE_FIELDS).to_pylist())
                table = table.filter(ok)
            shard_set.add(table.select(RECORD_FIELDS))
            progress.update(done, len(quarantine))
        shards = shard_set.close()
    finally:
        shard_set.abort()  # after an error mid-shard: close the file (the tmp folder is then removed)
    progress.update(done, len(quarantine), final=True)
    quarantine.sort(key=lambda q: q["order"])
    fields = ("record_id", "file", "code", "reason")
    lines = [json.dumps({k: q[k] for k in fields}) + "\n" for q in quarantine]
    storage.write_text(storage.join(tmp, QUARANTINE_NAME), "".join(lines))
    options = {
        k: v for k, v in asdict(opts).items() if k not in ("num_workers", "block_rows", "progress", "out")
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": opts.dataset,
        "split": opts.split,
        "root": str(Path(opts.root).resolve()),
        "label_divisor": index.label_divisor,
        "void_label": -1,
        "num_classes": len(index.categories),
        "categories": index.categories,
        "thing_class_ids": [c["class_id"] for c in index.categories if c["isthing"]],
        "num_records": sum(s["rows"] for s in shards),
        "num_quarantined": len(quarantine),
        "shards": shards,
        "options": options,
    }
    storage.write_text(storage.join(tmp, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True))
    manifest["quarantine"] = quarantine
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="coco")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument(
        "--split", required=True, help="split name, e.g. val (COCO: panoptic_{split}2017.json)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder or storage URI (s3://...); the split goes to OUT/<split>/"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 (writing nothing) if any record is bad")
    parser.add_argument("--max-size", type=int, default=None, metavar="PX", help="shrink the long side to PX")
    parser.add_argument("--label-divisor", type=int, default=None, help="default: coco 256, cityscapes 1000")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB")
    parser.add_argument(
        "--panoptic-json", default=None, help="cityscapes-panoptic: path of the panoptic JSON"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="parallel conversion tasks")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    try:
        opts = PrepareOptions(
            dataset=args.dataset,
            root=args.root,
            split=args.split,
            out=args.out,
            max_size=args.max_size,
            label_divisor=args.label_divisor,
            shard_mb=args.shard_mb,
            panoptic_json=args.panoptic_json,
            strict=args.strict,
            num_workers=args.num_workers,
            progress=not args.quiet,
        )
        manifest = prepare(opts)
    except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        print(f"kmax prepare: {exc}", file=sys.stderr)
        return 2
    bad = manifest["quarantine"]
    if bad:
        counts: dict[str, int] = {}
        for q in bad:
            counts[q["code"]] = counts.get(q["code"], 0) + 1
        print(
            f"{len(bad)} record(s) quarantined: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
            file=sys.stderr,
        )
        for q in bad[:10]:
            print(f"  {q['record_id']}: {q['file']}: {q['reason']}", file=sys.stderr)
        if opts.strict:
            print("kmax prepare --strict: nothing written", file=sys.stderr)
            return 1
    print(
        f"wrote {manifest['num_records']} records in {len(manifest['shards'])} shard(s) to "
        f"{storage.join(storage.absolute(opts.out), opts.split)}"
    )
    return 0
