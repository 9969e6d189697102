"""Per-image evaluation statistics (PQ, semantic confusion, instances for AP) and their exact reduction.

Pure numpy (no Ray, no torch): `image_eval_stats` runs wherever an image is predicted (a Ray task, a training
worker); `reduce_eval_stats` runs once on the gathered results, sorted by image index, so the numbers do not
depend on how the images were spread; `eval_metrics` names them. Training validation
(pipeline.train.validation) and ``kmax evaluate`` (pipeline.eval.evaluate) both go through these three, and
predictions of records through `stats_of_records`.

A prediction is a dict:
- ``label_map``: int [H, W], ``class_id * divisor + instance`` with VOID_LABEL on void (any ids work as long
  as ``segments`` lists them);
- ``segments``: [{"id", "category_id" or "class_id", optional "score"}];
- ``semantic`` (optional): int [H, W] class ids for mIoU; else derived from the panoptic map, void counting
  as a miss (lower than a dedicated semantic prediction, reference §5);
- ``instances`` (optional): [{"category_id" or "class_id", "mask" bool [H, W], "score"}] or the dict of
  ``kmax_model.postprocess.instance_inference`` ("masks" [n, H, W], "scores" [n], "class_ids" [n]) for AP,
  as a model's predictions carry (pipeline.eval.predictor); else (prediction files) the thing segments of
  the panoptic map with score ``segments[i]["score"]`` or 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.eval.metrics import ImageInstances, confusion_matrix, encode_mask, mask_ap, miou_from_confusion
from pipeline.eval.pq import (
    VOID_LABEL,
    Category,
    ImagePQStats,
    PQInputError,
    normalize_categories,
    pq_image_stats,
    reduce_pq_stats,
)
from pipeline.eval.pq_table import compact_ids

METRIC_GROUPS = (("All", "all"), ("Things", "things"), ("Stuff", "stuff"))
"""PQ result groups and their names in `eval_metrics`."""


@dataclass
class EvalSpec:
    """What to compute and how category ids map to contiguous classes.

    Attributes:
        categories: GT categories in dataset order: [{"id" or "category_id", "isthing", optional "class_id"}];
            the contiguous class of a category is its "class_id", else its position in the list.
        chunks: the official PQ process count to emulate (None: os.cpu_count()).
        miou: compute the semantic confusion matrix and mIoU.
        ap: compute mask AP of the thing classes (pycocotools segm).
    """

    categories: list[dict[str, Any]]
    chunks: int | None = None
    miou: bool = True
    ap: bool = True
    class_of: dict[int, int] = field(init=False)
    cat_of_class: dict[int, int] = field(init=False)
    pq_categories: dict[int, Category] = field(init=False)

    def __post_init__(self) -> None:
        cats = normalize_categories(self.categories)
        self.pq_categories = {c.id: c for c in cats}
        if self.chunks is not None and self.chunks < 1:
            raise ValueError(f"evaluate.chunks must be >= 1, got {self.chunks}")
        self.class_of = {
            c.id: int(raw.get("class_id", i)) for i, (c, raw) in enumerate(zip(cats, self.categories))
        }
        self.cat_of_class = {k: c for c, k in self.class_of.items()}
        if sorted(self.cat_of_class) != list(range(len(cats))):
            raise ValueError("evaluate.categories: class ids must be 0..K-1, one per category")

    @property
    def num_classes(self) -> int:
        return len(self.class_of)

    def thing_categories(self) -> list[dict[str, int]]:
        return [{"id": c.id} for c in self.pq_categories.values() if c.isthing]


@dataclass
class ImageEvalStats:
    """Integer statistics of one image: PQ, sparse confusion (flat index into [K, K+1], count), instances."""

    index: int
    pq: ImagePQStats
    confusion: tuple[np.ndarray, np.ndarray] | None = None
    instances: ImageInstances | None = None


def _category(seg: Mapping[str, Any], spec: EvalSpec) -> int:
    if "category_id" in seg:
        return int(seg["category_id"])
    if "class_id" in seg and int(seg["class_id"]) in spec.cat_of_class:
        return spec.cat_of_class[int(seg["class_id"])]
    raise PQInputError(f"segment {dict(seg)} has neither 'category_id' nor a known 'class_id'")


def _with_categories(segments: Sequence[Mapping[str, Any]], spec: EvalSpec) -> list[dict[str, Any]]:
    return [s if "category_id" in s else {**s, "category_id": _category(s, spec)} for s in segments]


def _semantic(label_map: np.ndarray, segments: list[dict], spec: EvalSpec, void_label: int) -> np.ndarray:
    """Class id per pixel from a panoptic map and its segments; void and unlisted ids -> -1."""
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    lut = np.array(
        [spec.class_of.get(int(s["category_id"]), -1) for s in segments] + [-1, -1], dtype=np.int64
    )
    return np.take(lut, compact_ids(label_map, ids, void_label))


def image_eval_stats(
    spec: EvalSpec,
    index: int,
    image_id: Any,
    gt_map: Any,
    gt_segments: Sequence[Mapping[str, Any]],
    prediction: Mapping[str, Any],
    *,
    void_label: int = VOID_LABEL,
    name: str | None = None,
) -> ImageEvalStats:
    """All statistics of one image (``prediction``: see the module docstring); pure numpy, runs anywhere."""
    gt = np.asarray(gt_map)
    pred = np.asarray(prediction["label_map"])
    gsegs = _with_categories(gt_segments, spec)
    psegs = _with_categories(prediction["segments"], spec)
    pq = pq_image_stats(
        gt, gsegs, pred, psegs, spec.pq_categories,
        index=index, image_id=image_id, void_label=void_label, name=name,
    )  # fmt: skip
    out = ImageEvalStats(index=int(index), pq=pq)
    if spec.miou:
        gsem = _semantic(gt, gsegs, spec, void_label)
        psem = prediction.get("semantic")
        psem = _semantic(pred, psegs, spec, void_label) if psem is None else np.asarray(psem)
        cm = confusion_matrix(gsem, psem, spec.num_classes, ignore_label=-1).ravel()
        nz = np.nonzero(cm)[0]
        out.confusion = (nz.astype(np.int32), cm[nz])
    if spec.ap:
        out.instances = _image_instances(spec, index, gt, gsegs, pred, psegs, prediction.get("instances"))
    return out


def _image_instances(spec: EvalSpec, index: int, gt, gsegs: list, pred, psegs: list, given) -> ImageInstances:
    """Run-length encoded ground-truth thing instances and predicted instances of one image (for AP)."""
    things = {c["id"] for c in spec.thing_categories()}
    inst = ImageInstances(int(index) + 1, int(gt.shape[0]), int(gt.shape[1]))
    for s in gsegs:
        if int(s["category_id"]) in things:
            rle = encode_mask(gt == int(s["id"]))
            inst.gt.append(
                {"category_id": int(s["category_id"]), "rle": rle, "iscrowd": int(s.get("iscrowd", 0))}
            )
    if isinstance(given, Mapping):  # kmax_model.postprocess.instance_inference: masks, scores, class_ids
        given = [
            {"class_id": int(k), "mask": np.asarray(m), "score": float(v)}
            for m, v, k in zip(given["masks"], given["scores"], given["class_ids"])
        ]
    if given is None:  # prediction files: the thing segments of the panoptic map
        given = [
            {"category_id": s["category_id"], "mask": pred == int(s["id"]), "score": s.get("score", 1.0)}
            for s in psegs
        ]
    for p in given:
        cat = _category(p, spec)
        if cat in things:
            inst.pred.append({"category_id": cat, "rle": encode_mask(p["mask"]), "score": float(p["score"])})
    return inst


def reduce_eval_stats(spec: EvalSpec, stats: Sequence[ImageEvalStats]) -> dict[str, Any]:
    """Reduce per-image statistics (any order) to {"pq": official PQ dict, "miou", "ap", "num_images"}."""
    ordered = sorted(stats, key=lambda s: s.index)
    result: dict[str, Any] = {
        "pq": reduce_pq_stats([s.pq for s in ordered], spec.categories, chunks=spec.chunks),
        "num_images": len(ordered),
    }
    if spec.miou:
        k = spec.num_classes
        flat = np.zeros(k * (k + 1), dtype=np.int64)
        for s in ordered:
            if s.confusion is not None:
                np.add.at(flat, s.confusion[0], s.confusion[1])
        result["miou"] = miou_from_confusion(flat.reshape(k, k + 1))
    if spec.ap:
        result["ap"] = mask_ap(
            [s.instances for s in ordered if s.instances is not None], spec.thing_categories()
        )
    return result


def eval_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The one naming of evaluation numbers, in percent, for MLflow, progress lines, reports and ``kmax
    evaluate --out``: ``eval/{pq,sq,rq}_{all,things,stuff}``, ``eval/miou`` and ``eval/{ap,ap50,ap75,aps,apm,
    apl}``. Values that do not exist (a group without classes, AP without ground-truth instances) are left
    out."""
    out: dict[str, float] = {}
    for group, name in METRIC_GROUPS:
        for key in ("pq", "sq", "rq"):
            value = result["pq"][group][key]
            if value is not None:
                out[f"eval/{key}_{name}"] = 100.0 * value
    if result.get("miou", {}).get("miou") is not None:
        out["eval/miou"] = 100.0 * result["miou"]["miou"]
    for key, value in result.get("ap", {}).items():
        if value is not None:
            out[f"eval/{key.lower()}"] = 100.0 * value
    return out


def stats_of_records(
    spec: EvalSpec,
    predict: Callable[[list[dict]], list[dict]],
    records: Iterable[tuple[int, dict]],
    batch_size: int,
    where: str = "",
) -> list[ImageEvalStats]:
    """Predict ``(index, decoded record)`` pairs ``batch_size`` at a time and return their statistics.

    The one path from records to statistics: training validation runs it on each worker's share of the
    split, ``kmax evaluate --checkpoint`` in a Ray task per Parquet row group. Predictions are dropped batch
    by batch (instance masks are large), so memory does not grow with the split. ``where`` names the
    source in error messages."""
    out: list[ImageEvalStats] = []
    for chunk in batched(records, batch_size):
        preds = predict([r for _, r in chunk])
        if len(preds) != len(chunk):
            raise ValueError(f"predict returned {len(preds)} predictions for {len(chunk)} records {where}")
        for (index, r), p in zip(chunk, preds):
            name = f"record {r['record_id']!r} ({where}index {index})"
            out.append(image_eval_stats(spec, index, r["record_id"], r["label"], r["segments"], p, name=name))
    return out


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
