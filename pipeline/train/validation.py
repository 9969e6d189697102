"""Validation inside the Ray Train workers, through the evaluation path of ``kmax evaluate``.

Each worker predicts the validation records ``index % world == rank`` (pipeline.eval.predictor) and turns
them into per-image statistics with `pipeline.eval.stats.stats_of_records`; rank 0 gathers them, reduces
them in image order (`reduce_eval_stats`, so the result does not depend on the worker count) and names
them (`eval_metrics`): the numbers ``kmax evaluate --checkpoint`` reports for the same checkpoint. Rank 0
also draws the per-layer cluster-assignment figure of validation image 0 and a prediction grid of the
first ``data.num_vis_images``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.config import ExperimentConfig
from pipeline.data.records import iter_decoded, read_manifest
from pipeline.eval.predictor import Predictor
from pipeline.eval.stats import EvalSpec, eval_metrics, reduce_eval_stats, stats_of_records


class Validator:
    """Validation of one worker; `run` must be called by every rank together (it gathers)."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int, device: torch.device):
        data = cfg.data
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.manifest = read_manifest(data.prepared_dir, data.val_split)
        self.spec = EvalSpec(self.manifest["categories"])
        self.records = list(iter_decoded(data.prepared_dir, data.val_split, rank, world))
        self.vis_records: list[dict] = []
        if rank == 0:
            for i, record in iter_decoded(data.prepared_dir, data.val_split):
                if i >= max(1, data.num_vis_images):
                    break
                self.vis_records.append(record)

    def _predictor(self, model) -> Predictor:
        data = self.cfg.data
        module = model.module if hasattr(model, "module") else model
        return Predictor(
            module,
            self.manifest,
            self.cfg.model.postprocess,
            data.eval_size,
            self.device,
            data.eval_long_side,
        )

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """All ranks: the split's metrics (`eval_metrics` names); every rank returns the same numbers."""
        model.eval()
        predictor = self._predictor(model)
        stats = stats_of_records(self.spec, predictor, self.records, self.cfg.data.eval_batch_size)
        if self.world == 1:
            return eval_metrics(reduce_eval_stats(self.spec, stats))
        gathered: list | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(stats, gathered, dst=0)
        metrics = [None]
        if self.rank == 0:  # only rank 0 reduces: mask AP (COCOeval) is the costly part
            metrics = [eval_metrics(reduce_eval_stats(self.spec, [s for part in gathered for s in part]))]
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]

    def run(self, model, step: int, log) -> dict[str, float]:
        """Evaluate, then (rank 0) log the metrics and the figures via ``log`` (pipeline.train.run_log)."""
        metrics = self.evaluate(model)
        log.validation(step, metrics)
        if log.active and self.vis_records:
            self._figures(model, step, log)
        return metrics

    def _figures(self, model, step: int, log) -> None:
        from pipeline.eval.visualize import cluster_assignment_figure, prediction_grid

        predictor = self._predictor(model)
        preds = predictor(self.vis_records, return_assignments=True)
        first = self.vis_records[0]
        title = f"{first['record_id']} step {step}"
        log.figure(cluster_assignment_figure(first["image"], preds[0]["assignments"], title=title),
                   f"figures/clusters_step{step:07d}.png")  # fmt: skip
        if self.cfg.data.num_vis_images > 0:
            fig = prediction_grid(
                [r["image"] for r in self.vis_records],
                [r["label"] for r in self.vis_records],
                [p["label_map"] for p in preds],
                predictor.categories,
                predictor.label_divisor,
                titles=[str(r["record_id"]) for r in self.vis_records],
            )
            log.figure(fig, f"figures/predictions_step{step:07d}.png")
