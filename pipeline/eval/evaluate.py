"""Dataset-level evaluation on Ray: PQ / SQ / RQ (All, Things, Stuff), mIoU and mask AP, and `kmax evaluate`.

Every image becomes an `ImageEvalStats` of integers (PQ statistics, a sparse semantic confusion matrix, run-
length encoded instances) inside parallel Ray tasks; the driver reduces them sorted by image index, so the
numbers do not depend on how many tasks or workers ran (PQ floats follow the official summation order of
`pipeline.eval.pq.reduce_pq_stats`).

Two sources:
- files (COCO panoptic JSON + PNG folders): `evaluate_files`, tasks over slices of the image list;
- a prepared split (pipeline.data.records shards) and a ``predict`` callable (decoded records -> predictions):
  `evaluate_prepared`, one task per Parquet row group, through `pipeline.eval.stats.stats_of_records` as the
  training validation. ``kmax evaluate --checkpoint`` builds ``predict`` from a checkpoint through
  `pipeline.eval.predictor.predictor_from_checkpoint`. ``--out`` writes the result with its "metrics"
  named as training logs them (`pipeline.eval.stats.eval_metrics`).

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
from pipeline.eval.stats import (
    EvalSpec,
    ImageEvalStats,
    eval_metrics,
    image_eval_stats,
    reduce_eval_stats,
    stats_of_records,
)
from pipeline.storage import absolute

IMAGES_PER_TASK = 16
"""Default number of images one Ray task evaluates (files mode)."""
PREDICT_BATCH = 8
"""Records predicted together when no batch size is given (a checkpoint's own: ``data.eval_batch_size``)."""

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


def _prepared_task(
    spec: EvalSpec, path: str, row_group: int, offset: int, predict: Callable, batch: int, device: str | None
):
    from pipeline.data.records import decode_record, open_shard

    if device is not None:
        predict = predict.to(device)  # a pipeline.eval.predictor.Predictor, built on the driver's CPU

    rows = open_shard(path).read_row_group(row_group).to_pylist()
    records = ((offset + i, decode_record(r)) for i, r in enumerate(rows))
    return stats_of_records(spec, predict, records, batch, where=f"{path}, ")


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

    The PQ part equals `pipeline.eval.pq_files.pq_compute_files` bit for bit whatever ``images_per_task``."""
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
    batch_size: int = PREDICT_BATCH,
    chunks: int | None = None,
    miou: bool = True,
    ap: bool = True,
    ray_config=None,
    progress: bool = False,
    gpus_per_task: float = 0.0,
) -> dict[str, Any]:
    """A prepared split scored against ``predict`` (picklable; called in one Ray task per Parquet row group
    with ``batch_size`` decoded records at a time, see pipeline.data.records.decode_record). With
    ``gpus_per_task`` > 0, ``predict`` must be a `Predictor`: each task moves it to its GPU."""
    from pipeline.data.records import open_shard, read_manifest, shard_paths
    from pipeline.ray_setup import init_ray

    manifest = read_manifest(data_dir, split)
    spec = EvalSpec(manifest["categories"], chunks=chunks, miou=miou, ap=ap)
    ray = init_ray(ray_config)
    if gpus_per_task and not ray.cluster_resources().get("GPU"):
        raise ValueError("--gpu: this Ray cluster has no GPU")
    task = ray.remote(num_gpus=gpus_per_task)(_prepared_task)
    device = "cuda" if gpus_per_task else None
    spec_ref, predict_ref = ray.put(spec), ray.put(predict)
    refs, offset = [], 0
    for path in shard_paths(data_dir, split):
        meta = open_shard(path).metadata
        for g in range(meta.num_row_groups):
            refs.append(task.remote(spec_ref, str(path), g, offset, predict_ref, batch_size, device))
            offset += meta.row_group(g).num_rows
    return reduce_eval_stats(spec, _gather(ray, refs, offset, progress))


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    files = parser.add_argument_group("files (COCO panoptic format)")
    files.add_argument("--gt-json", type=absolute, help="ground-truth panoptic JSON")
    files.add_argument("--gt-folder", type=absolute, help="folder of the ground-truth PNGs")
    files.add_argument(
        "--pred-json", type=absolute, help="prediction panoptic JSON (segments_info may carry 'score')"
    )
    files.add_argument("--pred-folder", type=absolute, help="folder of the predicted PNGs")
    ckpt = parser.add_argument_group("a trained model")
    ckpt.add_argument("--checkpoint", type=absolute, help="training checkpoint")
    ckpt.add_argument("--data", type=absolute, help="prepared dataset directory (kmax prepare --out)")
    ckpt.add_argument("--split", default="val", help="prepared split (default: val)")
    ckpt.add_argument("--batch-size", type=int, help="records per forward pass (default: the checkpoint's)")
    ckpt.add_argument("--gpu", action="store_true", help="run the model on GPUs (one per Ray task)")
    parser.add_argument(
        "--chunks", type=int, default=None,
        help="official PQ process count to reproduce bit for bit (default: os.cpu_count())",
    )  # fmt: skip
    parser.add_argument("--no-miou", action="store_true", help="skip the semantic mIoU")
    parser.add_argument("--no-ap", action="store_true", help="skip mask AP")
    parser.add_argument("--images-per-task", type=int, default=IMAGES_PER_TASK)
    parser.add_argument("--out", type=absolute, help="write the full result as JSON here")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")


def summary(result: Mapping[str, Any]) -> str:
    """The official PQ table, then mIoU and mask AP (percent)."""
    lines = [format_result(result["pq"]), f"images: {result['num_images']}"]
    if "miou" in result:
        v = result["miou"]["miou"]
        lines.append("mIoU: -" if v is None else f"mIoU: {100 * v:.1f}")
    if "ap" in result:
        aps = "  ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in result["ap"].items())
        lines.append("mask AP: " + aps)
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


FILE_FLAGS = ("gt_json", "gt_folder", "pred_json", "pred_folder")


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of flags, or None."""
    given = [getattr(args, f) for f in FILE_FLAGS]
    if args.checkpoint:
        if any(given):
            return "give either the four file flags or --checkpoint/--data, not both"
        return None if args.data else "--checkpoint needs --data PREPARED_DIR (and --split)"
    missing = ["--" + f.replace("_", "-") for f, v in zip(FILE_FLAGS, given) if not v]
    return f"missing {' '.join(missing)} (or use --checkpoint)" if missing else None


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.ray_setup import RayConfig

    kw = dict(
        chunks=args.chunks, miou=not args.no_miou, ap=not args.no_ap, progress=True,
        ray_config=RayConfig(address=args.ray_address, num_cpus=args.num_cpus),
    )  # fmt: skip
    if not args.checkpoint:
        files = [getattr(args, f) for f in FILE_FLAGS]
        return evaluate_files(*files, images_per_task=args.images_per_task, **kw)
    from pipeline.eval.predictor import predictor_from_checkpoint

    predict, cfg = predictor_from_checkpoint(args.checkpoint, args.data, args.split)
    batch = args.batch_size or cfg.data.eval_batch_size
    gpus = 1.0 if args.gpu else 0.0
    return evaluate_prepared(args.data, args.split, predict, batch_size=batch, gpus_per_task=gpus, **kw)


def run(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem:
        print(f"kmax evaluate: {problem}", file=sys.stderr)
        return 2
    try:
        result = _evaluate(args)
    except (PQInputError, FileNotFoundError, ValueError) as exc:
        print(f"kmax evaluate: {exc}", file=sys.stderr)
        return 1
    result["metrics"] = eval_metrics(result)
    print(summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_jsonable(result), indent=1))
    return 0
