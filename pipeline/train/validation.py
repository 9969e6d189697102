"""Distributed validation inside the Ray Train workers, plus the figures logged with it.

Each worker predicts the validation records ``index % world == rank`` (pipeline.eval.predictor), computes
per-image integer PQ stats (pipeline.eval.pq.pq_image_stats) and a semantic confusion matrix
(pipeline.eval.metrics);
both are gathered to every rank with ``all_gather_object`` and rank 0 reduces the PQ stats in image order
(pipeline.eval.pq.reduce_pq_stats sorts by index), so the result does not depend on the worker count.

Rank 0 logs ``eval/{pq,sq,rq}_{all,things,stuff}`` and ``eval/miou`` at the step, the per-layer
cluster-assignment figure of validation image 0 and a prediction grid of the first ``data.num_vis_images``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kmax_model.targets import VOID_LABEL
from pipeline.data.records import read_manifest
from pipeline.eval.predictor import Predictor, batched, iter_decoded, stats_of

GROUPS = (("All", "all"), ("Things", "things"), ("Stuff", "stuff"))


def semantic_of(label_map: np.ndarray, divisor: int) -> np.ndarray:
    """Panoptic label map -> class ids; VOID_LABEL kept (ignored in GT, a miss in predictions)."""
    label_map = np.asarray(label_map, dtype=np.int64)
    return np.where(label_map == VOID_LABEL, VOID_LABEL, label_map // divisor)


def pq_metrics(result: dict[str, Any], miou: float | None) -> dict[str, float]:
    """Flatten a reduce_pq_stats result into MLflow metrics in percent (groups without segments left out)."""
    out = {}
    for group, name in GROUPS:
        for key in ("pq", "sq", "rq"):
            value = result[group][key]
            if value is not None:
                out[f"eval/{key}_{name}"] = 100.0 * float(value)
    if miou is not None:
        out["eval/miou"] = 100.0 * miou
    return out


class Evaluator:
    """Validation of one worker; ``run(model, step, logger)`` must be called by every rank together."""

    def __init__(self, cfg, val_dir: str, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.val_dir = val_dir
        self.manifest = read_manifest(val_dir, cfg.data.val_split)
        self.records = list(iter_decoded(val_dir, cfg.data.val_split, rank, world))
        self.vis_records: list[dict] = []
        if rank == 0:
            for i, record in iter_decoded(val_dir, cfg.data.val_split):
                if i >= max(1, cfg.data.num_vis_images):
                    break
                self.vis_records.append(record)

    def _predictor(self, model) -> Predictor:
        data = self.cfg.data
        return Predictor(
            model, self.manifest, self.cfg.model.postprocess, data.eval_size, self.device, data.eval_long_side
        )

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """All ranks: PQ / mIoU over the whole split (every rank returns the same numbers)."""
        from pipeline.eval.metrics import confusion_matrix, miou_from_confusion
        from pipeline.eval.pq import reduce_pq_stats

        model.eval()
        predictor = self._predictor(model)
        divisor = predictor.label_divisor
        k = self.cfg.model.num_classes
        stats, confusion = [], np.zeros((k, k + 1), dtype=np.int64)
        for chunk in batched(self.records, self.cfg.data.eval_batch_size):
            recs = [r for _, r in chunk]
            preds = predictor(recs)
            stats.extend(stats_of(predictor, recs, preds, [i for i, _ in chunk]))
            for r, p in zip(recs, preds):
                confusion += confusion_matrix(
                    semantic_of(r["label"], divisor),
                    semantic_of(p["label_map"], divisor),
                    k,
                    ignore_label=VOID_LABEL,
                )
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, (stats, confusion))
            stats = [s for part, _ in gathered for s in part]
            confusion = sum(c for _, c in gathered)
        result = reduce_pq_stats(stats, predictor.categories)
        return pq_metrics(result, miou_from_confusion(confusion)["miou"])

    def run(self, model, step: int, logger) -> dict[str, float]:
        metrics = self.evaluate(model)
        if self.rank == 0 and logger is not None:
            logger.log_metrics(metrics, step)
            self.log_figures(model, step, logger)
        return metrics

    def log_figures(self, model, step: int, logger) -> None:
        from pipeline.eval.visualize import close, cluster_assignment_figure, prediction_grid

        if not self.vis_records:
            return
        predictor = self._predictor(model)
        preds = predictor(self.vis_records, return_assignments=True)
        first = self.vis_records[0]
        fig = cluster_assignment_figure(
            first["image"], preds[0]["assignments"], title=f"{first['record_id']} step {step}"
        )
        logger.log_figure(fig, f"figures/clusters_step{step:07d}.png")
        close(fig)
        if self.cfg.data.num_vis_images > 0:
            fig = prediction_grid(
                [r["image"] for r in self.vis_records],
                [r["label"] for r in self.vis_records],
                [p["label_map"] for p in preds],
                predictor.categories,
                predictor.label_divisor,
                titles=[str(r["record_id"]) for r in self.vis_records],
            )
            logger.log_figure(fig, f"figures/predictions_step{step:07d}.png")
            close(fig)
