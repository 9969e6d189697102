"""Dataset-level evaluation on Ray: PQ / SQ / RQ (All, Things, Stuff), mIoU and mask AP, and `kmax evaluate`.

Every image becomes an `ImageEvalStats` of integers (PQ statistics, a sparse semantic confusion matrix, run-
length encoded instances) inside parallel Ray tasks; the driver reduces them sorted by image index, so the
numbers do not depend on how many tasks or workers ran (PQ floats follow the official summation order of
`pipeline.eval.pq.reduce_pq_stats`).

Two sources:
- files (COCO panoptic JSON + PNG folders): `evaluate_files`, tasks over slices of the image list;
- a prepared split (pipeline.data.records shards) and a ``predict`` callable (decoded records -> predictions):
  `evaluate_prepared`, one task per Parquet row group. ``kmax evaluate --checkpoint`` builds ``predict`` from
  a checkpoint through ``pipeline.eval.predictor.predictor_from_checkpoint``.

Predictions are dicts as described in `pipeline.eval.stats` (``label_map``, ``segments``, optional
``semantic`` and ``instances``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.eval.pq import PNG_VOID_ID, PQInputError, format_result
from pipeline.eval.stats import EvalSpec, ImageEvalStats, image_eval_stats, reduce_eval_stats

IMAGES_PER_TASK = 16
"""Default number of images one Ray task evaluates (files mode)."""

# ----------------------------------------------------------------------------------------------- Ray drivers


def _files_task(spec: EvalSpec, pairs: list) -> list[ImageEvalStats]:
    from pipeline.eval.pq_files import read_id_png

    out = []
    for p in pairs:
        pred = {"label_map": read_id_png(p.pred_png), "segments": p.pred_segments}
        out.append(
            image_eval_stats(
                spec,
                p.index,
                p.image_id,
                read_id_png(p.gt_png),
                p.gt_segments,
                pred,
                void_label=PNG_VOID_ID,
                name=f"image {p.image_id!r} (prediction {p.pred_png})",
            )
        )
    return out


def _prepared_task(spec: EvalSpec, path: str, row_group: int, offset: int, predict: Callable) -> list:
    import pyarrow.parquet as pq_io

    from pipeline.data.records import decode_record

    rows = pq_io.ParquetFile(path).read_row_group(row_group).to_pylist()
    records = [decode_record(r) for r in rows]
    preds = predict(records)
    if len(preds) != len(records):
        raise ValueError(f"predict returned {len(preds)} predictions for {len(records)} records of {path}")
    return [
        image_eval_stats(
            spec,
            offset + i,
            r["record_id"],
            r["label"],
            r["segments"],
            p,
            name=f"record {r['record_id']!r} ({path}, row {offset + i})",
        )
        for i, (r, p) in enumerate(zip(records, preds))
    ]


def _gather(ray, refs: list, total: int, progress: bool) -> list[ImageEvalStats]:
    """Wait for every task, reporting progress on stderr; a failed task re-raises its own error (the bad-input
    message naming the image, without Ray's wrapper), after cancelling the others."""
    from ray.exceptions import RayTaskError

    done: list[ImageEvalStats] = []
    pending, step = list(refs), max(1, total // 10)
    last = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            done.extend(ray.get(ready[0]))
        except RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (PQInputError, ValueError, FileNotFoundError)):
                raise cause from None
            raise
        if progress and (len(done) - last >= step or not pending):
            last = len(done)
            print(f"evaluate: {len(done)}/{total} images", file=sys.stderr, flush=True)
    return done


def evaluate_files(
    gt_json: Any,
    gt_folder: Any,
    pred_json: Any,
    pred_folder: Any,
    *,
    chunks: int | None = None,
    miou: bool = True,
    ap: bool = True,
    images_per_task: int = IMAGES_PER_TASK,
    ray_config=None,
    progress: bool = False,
) -> dict[str, Any]:
    """COCO panoptic files evaluated in Ray tasks of ``images_per_task`` images (Ray started if needed).

    The PQ part equals `pipeline.eval.pq.pq_compute_files` bit for bit whatever ``images_per_task``."""
    from pipeline.eval.pq_files import load_json, pair_annotations
    from pipeline.ray_setup import init_ray

    if images_per_task < 1:
        raise ValueError(f"images_per_task must be >= 1, got {images_per_task}")
    gt, pred = load_json(gt_json, "ground-truth"), load_json(pred_json, "prediction")
    if "categories" not in gt:
        raise PQInputError("ground-truth JSON has no 'categories'")
    spec = EvalSpec(gt["categories"], chunks=chunks, miou=miou, ap=ap)
    pairs = pair_annotations(gt, gt_folder, pred, pred_folder)
    ray = init_ray(ray_config)
    task = ray.remote(_files_task)
    spec_ref = ray.put(spec)
    refs = [
        task.remote(spec_ref, pairs[i : i + images_per_task]) for i in range(0, len(pairs), images_per_task)
    ]
    return reduce_eval_stats(spec, _gather(ray, refs, len(pairs), progress))


def evaluate_prepared(
    data_dir: Any,
    split: str,
    predict: Callable[[list[dict]], list[dict]],
    *,
    chunks: int | None = None,
    miou: bool = True,
    ap: bool = True,
    ray_config=None,
    progress: bool = False,
) -> dict[str, Any]:
    """A prepared split scored against ``predict`` (picklable; called once per Parquet row group inside a Ray
    task with the decoded records of that group, see pipeline.data.records.decode_record)."""
    import pyarrow.parquet as pq_io

    from pipeline.data.records import read_manifest, shard_paths
    from pipeline.ray_setup import init_ray

    manifest = read_manifest(data_dir, split)
    spec = EvalSpec(manifest["categories"], chunks=chunks, miou=miou, ap=ap)
    ray = init_ray(ray_config)
    task = ray.remote(_prepared_task)
    spec_ref, predict_ref = ray.put(spec), ray.put(predict)
    refs, offset = [], 0
    for path in shard_paths(data_dir, split):
        meta = pq_io.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            refs.append(task.remote(spec_ref, str(path), g, offset, predict_ref))
            offset += meta.row_group(g).num_rows
    return reduce_eval_stats(spec, _gather(ray, refs, offset, progress))


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    files = parser.add_argument_group("files (COCO panoptic format)")
    files.add_argument("--gt-json", help="ground-truth panoptic JSON")
    files.add_argument("--gt-folder", help="folder of the ground-truth PNGs")
    files.add_argument("--pred-json", help="prediction panoptic JSON (segments_info may carry 'score')")
    files.add_argument("--pred-folder", help="folder of the predicted PNGs")
    ckpt = parser.add_argument_group("a trained model")
    ckpt.add_argument("--checkpoint", help="training checkpoint")
    ckpt.add_argument("--data", help="prepared dataset directory (kmax prepare --out)")
    ckpt.add_argument("--split", default="val", help="prepared split (default: val)")
    parser.add_argument(
        "--chunks",
        type=int,
        default=None,
        help="official PQ process count to reproduce bit for bit (default: os.cpu_count())",
    )
    parser.add_argument("--no-miou", action="store_true", help="skip the semantic mIoU")
    parser.add_argument("--no-ap", action="store_true", help="skip mask AP")
    parser.add_argument("--images-per-task", type=int, default=IMAGES_PER_TASK)
    parser.add_argument("--out", help="write the full result as JSON here")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")


def _summary(result: Mapping[str, Any]) -> str:
    lines = [format_result(result["pq"]), f"images: {result['num_images']}"]
    if "miou" in result:
        v = result["miou"]["miou"]
        lines.append("mIoU: -" if v is None else f"mIoU: {100 * v:.1f}")
    if "ap" in result:
        lines.append(
            "mask AP: "
            + "  ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in result["ap"].items())
        )
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from pipeline.ray_setup import RayConfig

    file_flags = [args.gt_json, args.gt_folder, args.pred_json, args.pred_folder]
    if args.checkpoint and any(file_flags):
        print(
            "kmax evaluate: give either the four file flags or --checkpoint/--data, not both", file=sys.stderr
        )
        return 2
    try:
        ray_cfg = RayConfig(address=args.ray_address, num_cpus=args.num_cpus)
        kw = dict(
            chunks=args.chunks, miou=not args.no_miou, ap=not args.no_ap, ray_config=ray_cfg, progress=True
        )
        if args.checkpoint:
            if not args.data:
                print("kmax evaluate: --checkpoint needs --data PREPARED_DIR (and --split)", file=sys.stderr)
                return 2
            from pipeline.eval.predictor import predictor_from_checkpoint

            predict = predictor_from_checkpoint(args.checkpoint, args.data, args.split)
            result = evaluate_prepared(args.data, args.split, predict, **kw)
        else:
            missing = [
                f
                for f, v in zip(("--gt-json", "--gt-folder", "--pred-json", "--pred-folder"), file_flags)
                if not v
            ]
            if missing:
                print(f"kmax evaluate: missing {' '.join(missing)} (or use --checkpoint)", file=sys.stderr)
                return 2
            result = evaluate_files(*file_flags, images_per_task=args.images_per_task, **kw)
    except (PQInputError, FileNotFoundError, ValueError) as exc:
        print(f"kmax evaluate: {exc}", file=sys.stderr)
        return 1
    print(_summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_jsonable(result), indent=1))
    return 0
