"""Shared pieces of the training tests: a tiny prepared synthetic dataset and a tiny run config."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ExperimentConfig, load_experiment

TINY_STEPS = 4


def tiny_config(data_dir: Path, run_dir: Path, *extra: str, workers: int = 1) -> ExperimentConfig:
    """4 steps of the tiny model on 48 px images, eval + checkpoint every 2 steps, 2 images per batch."""
    return load_experiment(
        "tiny",
        [
            f"data.prepared_dir={data_dir}",
            f"run_dir={run_dir}",
            f"train.steps={TINY_STEPS}",
            "train.warmup_steps=1",
            "train.eval_interval=2",
            "train.checkpoint_interval=2",
            "train.log_interval=1",
            "train.num_to_keep=1",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.num_vis_images=2",
            "data.augment.crop_size=49",
            f"scaling.num_workers={workers}",
            "scaling.cpus_per_worker=0.5",
            "fault.max_failures=0",
            *extra,
        ],
    )


def make_data(root: Path) -> Path:
    from pipeline.data.synthetic import make_prepared_synthetic

    return Path(make_prepared_synthetic(root, train=8, val=4, height=48, width=48, seed=0))


def model_weights(checkpoint_file: str | Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_file)["model"]


def metric_steps(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))
