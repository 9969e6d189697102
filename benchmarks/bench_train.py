"""Training throughput: a plain single-process loop vs Ray Train with 1 and 2 workers (same model and data).

Prints images/s of each (median over steps after warm-up), the Ray overhead at 1 worker
(1 - ray_1 / plain) and the data-wait fraction of the step time. Aims: overhead <= 10 %, data wait <= 5 %.

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--batch 4] [--size 64]

Timings on a shared 2-core machine are noisy; the script measures all three in one run so the ratios compare.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WARMUP_STEPS = 3
"""Steps excluded from the medians (first-iteration allocations, epoch start, Ray Data start-up)."""


def plain_loop(cfg, steps: int) -> tuple[float, float]:
    """The same work as the Ray worker (augment + forward/backward + AdamW) in one process; no Ray."""
    from kmax_model.criterion import build_criterion
    from kmax_model.model import build_model
    from pipeline.augment import augment_rows, collate_augmented
    from pipeline.optim import build_optimizer, build_scheduler
    from pipeline.records import iter_records

    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    crit = build_criterion(cfg.model)
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_multiplier)
    sched = build_scheduler(opt, cfg.train.steps, cfg.train.warmup_steps)
    rows = list(iter_records(cfg.data.prepared_dir, cfg.data.train_split))
    bs = cfg.data.batch_size
    rates, waits = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        start = (step * bs) % (len(rows) - bs + 1)
        chunk = rows[start : start + bs]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        data = collate_augmented(augment_rows(batch, cfg.data.augment, step * bs // len(rows)))
        t1 = time.perf_counter()
        losses = crit(model(data["images"]), data["targets"])
        opt.zero_grad()
        crit.total(losses).backward()
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        if step >= WARMUP_STEPS:
            rates.append(bs / dt)
            waits.append((t1 - t0) / dt)
    return statistics.median(rates), statistics.mean(waits)


def ray_run(cfg) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from pipeline.train import fit

    summary = fit(cfg, echo=lambda s: None)
    client = MlflowClient(summary.tracking_uri)

    def series(key):
        hist = sorted(client.get_metric_history(summary.mlflow_run_id, key), key=lambda m: m.step)
        return [m.value for m in hist if m.step > WARMUP_STEPS]

    return statistics.median(series("train/images_per_s")), statistics.mean(
        series("train/data_wait_fraction")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from pipeline.config import load_experiment
    from pipeline.datasets.synthetic import make_prepared_synthetic
    from pipeline.ray_utils import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=4))
    with tempfile.TemporaryDirectory() as tmp:
        data = make_prepared_synthetic(
            Path(tmp) / "synth", train=32, val=2, height=args.size, width=args.size
        )

        def cfg(workers: int, name: str):
            return load_experiment(
                "tiny",
                [
                    f"data.prepared_dir={data}",
                    f"run_dir={Path(tmp) / name}",
                    f"train.steps={args.steps}",
                    "train.warmup_steps=1",
                    "train.eval_interval=0",
                    "train.checkpoint_interval=0",
                    f"data.batch_size={args.batch}",
                    "data.num_vis_images=0",
                    f"data.augment.crop_size={args.size + 1}",
                    f"scaling.num_workers={workers}",
                    f"scaling.cpus_per_worker={2.0 / workers}",
                ],
            )

        plain, plain_wait = plain_loop(cfg(1, "plain"), args.steps)
        ray1, wait1 = ray_run(cfg(1, "ray1"))
        ray2, wait2 = ray_run(cfg(2, "ray2"))
    print(f"plain loop          {plain:7.2f} img/s   data wait {100 * plain_wait:5.1f}%")
    print(f"Ray Train 1 worker  {ray1:7.2f} img/s   data wait {100 * wait1:5.1f}%")
    print(f"Ray Train 2 workers {ray2:7.2f} img/s   data wait {100 * wait2:5.1f}%")
    print(f"Ray overhead at 1 worker: {100 * (1 - ray1 / plain):.1f}% (aim <= 10%)")
    print(f"2 workers / 1 worker: {ray2 / ray1:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
