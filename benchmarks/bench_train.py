"""Training throughput: a plain single-process loop vs Ray Train with 1 and 2 workers (same model and data).

Every configuration trains the `tiny` preset on the same synthetic images with the same per-worker batch:

    plain loop, T threads          augment + the training step (pipeline.train.step) in this process, no Ray
    Ray Train 1 worker, T threads  `pipeline.train.driver.fit` (the worker reads its records in the run's
                                   shuffled data order; metrics to MLflow through the driver; no checkpoints)
    Ray Train 2 workers, 1 thread  DDP over gloo, one core each

for T = 1 and 2, and prints images/s two ways: the median of the per-step rates (the loop's own
``train/images_per_s``, excluding what happens between steps) and the wall-clock rate over the timed steps
(from the MLflow timestamps of consecutive steps: everything included, logging too). Ray overhead at 1
worker = 1 - ray / plain at the same thread count (aim <= 10 %); data wait = the fraction of the step
spent waiting for the next batch (aim <= 5 %).

    .venv/bin/python benchmarks/bench_train.py [--steps 40] [--batch 4] [--size 64] [--rounds 2]

Timings on a shared 2-core machine are noisy; the script measures every configuration in one run so that
the ratios compare.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WARMUP_STEPS = 5
"""Steps excluded from the rates (first-iteration allocations, epoch start, Ray Data start-up)."""


def plain_loop(cfg, steps: int, threads: int) -> dict[str, float]:
    """The same work as one Ray worker (augment, then pipeline.train.step.train_step with the run's
    optimiser and schedule) in this process; no Ray."""
    from kmax_model.criterion import build_criterion
    from kmax_model.model import build_model
    from pipeline.data.records import iter_records
    from pipeline.train.batches import AugmentCollate
    from pipeline.train.optim import build_optimization
    from pipeline.train.step import Trainee, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    trainee = Trainee(model, build_criterion(cfg.model), *build_optimization(model, cfg.train))
    rows = list(iter_records(cfg.data.prepared_dir, cfg.data.train_split))
    bs = cfg.data.batch_size
    rates, waits, ends = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        start = (step * bs) % (len(rows) - bs + 1)
        chunk = rows[start : start + bs]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        data = AugmentCollate(cfg.data.augment, step * bs // len(rows))(batch)
        t1 = time.perf_counter()
        train_step(trainee, lambda data=data: (data["images"], data["targets"]), cfg.train.grad_accum)
        t2 = time.perf_counter()
        ends.append(t2)
        if step >= WARMUP_STEPS:
            rates.append(bs / (t2 - t0))
            waits.append((t1 - t0) / (t2 - t0))
    wall = bs * (len(ends) - 1 - WARMUP_STEPS) / (ends[-1] - ends[WARMUP_STEPS])
    return {"step": statistics.median(rates), "wall": wall, "wait": statistics.mean(waits)}


def ray_run(cfg) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import fit

    summary = fit(cfg, echo=lambda s: None)
    client = MlflowClient(summary.tracking_uri)

    def history(key):
        hist = sorted(client.get_metric_history(summary.mlflow_run_id, key), key=lambda m: m.step)
        return [m for m in hist if m.step > WARMUP_STEPS]

    rate = history("train/images_per_s")
    per_step = cfg.data.batch_size * cfg.scaling.num_workers
    wall = per_step * (len(rate) - 1) / ((rate[-1].timestamp - rate[0].timestamp) / 1000)
    waits = [m.value for m in history("train/data_wait_fraction")]
    return {"step": statistics.median(m.value for m in rate), "wall": wall, "wait": statistics.mean(waits)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="images per worker per step")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (medians printed)")
    args = parser.parse_args()

    from pipeline.config import load_experiment
    from pipeline.data.synthetic import make_prepared_synthetic
    from pipeline.ray_setup import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=4))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_prepared_synthetic(
            Path(tmp) / "synth", train=32, val=2, height=args.size, width=args.size, progress=False
        )

        def cfg(workers: int, cpus: int, name: str):
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
                    f"scaling.cpus_per_worker={cpus}",
                ],
            )

        rounds: dict[str, list[dict[str, float]]] = {}
        for r in range(args.rounds):  # interleaved, so that a slow spell of the machine hits all alike
            for threads in (1, 2):
                rounds.setdefault(f"plain loop, {threads} thread(s)", []).append(
                    plain_loop(cfg(1, threads, "p"), args.steps, threads)
                )
                rounds.setdefault(f"Ray Train 1 worker, {threads} thread(s)", []).append(
                    ray_run(cfg(1, threads, f"r1_{threads}_{r}"))
                )
            rounds.setdefault("Ray Train 2 workers, 1 thread each", []).append(ray_run(cfg(2, 1, f"r2_{r}")))
        for name, runs in rounds.items():
            results[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}

    print(
        f"tiny preset, {args.size + 1} px crops, {args.batch} img per worker-step, {args.steps} steps, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(f"{'configuration':38s} {'img/s (step)':>13s} {'img/s (wall)':>13s} {'data wait':>10s}")
    for name, r in results.items():
        print(f"{name:38s} {r['step']:13.2f} {r['wall']:13.2f} {100 * r['wait']:9.1f}%")
    for threads in (1, 2):
        plain, ray1 = (
            results[f"plain loop, {threads} thread(s)"],
            results[f"Ray Train 1 worker, {threads} thread(s)"],
        )
        print(
            f"Ray overhead at 1 worker, {threads} thread(s): {100 * (1 - ray1['wall'] / plain['wall']):.1f}% "
            f"wall-clock, {100 * (1 - ray1['step'] / plain['step']):.1f}% per step (aim <= 10%)"
        )
    two = (
        results["Ray Train 2 workers, 1 thread each"]["wall"]
        / results["Ray Train 1 worker, 2 thread(s)"]["wall"]
    )
    print(f"2 workers x 1 thread / 1 worker x 2 threads (wall-clock): {two:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
