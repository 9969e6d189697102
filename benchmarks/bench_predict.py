"""`kmax predict` throughput with 1 and 2 actors on copies of the two real COCO sample images.

A random-weight `tiny` checkpoint (the post-processing thresholds at 0, so that every image gets segments and
its PNG, overlay and record are written as for a trained model) predicts ``--images`` copies of the two
sample photos (640 x 427 and 640 x 360, at their own size) with ``--actors 1`` and ``--actors 2`` (one CPU
and one torch thread per actor), each in a fresh output folder, in one run. Two rates:

    wall    images / seconds of the whole command (Ray Data start, actor start-up and checkpoint loading
            included; Ray itself is already running)
    steady  images after the first `WARMUP_IMAGES` / seconds between their PNGs' modification times (the
            rate once every actor works)

and the ratio 2 actors / 1 actor of each. On a 2-core machine the ideal ratio is 2.

    .venv/bin/python benchmarks/bench_predict.py [--images 32] [--rounds 1] [--sample ../shared/fixtures/...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

WARMUP_IMAGES = 4
"""PNGs left out of the steady rate (written while the actors were still starting)."""
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "fixtures" / "coco_panoptic_sample"


def random_checkpoint(prepared: Path, out: Path) -> Path:
    """A random-weight tiny checkpoint on the prepared sample's 133 categories, thresholds at 0."""
    import torch

    from kmax_model import build_model
    from pipeline.checkpoint import build_state, save_checkpoint
    from pipeline.config import load_experiment

    zero = ("thing_threshold", "stuff_threshold", "thing_area_limit", "stuff_area_limit")
    cfg = load_experiment(
        "tiny",
        [f"data.prepared_dir={prepared}", "data.val_split=val", "model.num_classes=133"]
        + [f"model.postprocess.{name}=0" for name in zero],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = build_state(
        step=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, config=cfg.to_dict()
    )
    return Path(save_checkpoint(out, state))


def predict(checkpoint: Path, images: Path, out: Path, actors: int) -> dict[str, float]:
    """One `kmax predict` run; its wall and steady rates (images/s)."""
    from pipeline.cli import main

    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(out)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--actors", str(actors)]) == 0
    wall = time.perf_counter() - start
    times = sorted(p.stat().st_mtime for p in (out / "panoptic").iterdir())
    steady = (len(times) - 1 - WARMUP_IMAGES) / (times[-1] - times[WARMUP_IMAGES])
    return {"wall": len(times) / wall, "steady": steady}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="copies of the two sample images")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (medians printed)")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="the COCO panoptic sample")
    args = parser.parse_args()
    if args.images <= WARMUP_IMAGES + 1:
        parser.error(f"--images must be > {WARMUP_IMAGES + 1}")

    from pipeline.cli import main as kmax
    from pipeline.ray_setup import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=4))
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare = ["prepare", "--dataset", "coco", "--root", str(args.sample), "--split", "val"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert kmax([*prepare, "--out", str(root / "prepared"), "--quiet"]) == 0
        checkpoint = random_checkpoint(root / "prepared", root / "checkpoint")
        photos = sorted((args.sample / "val2017").glob("*.jpg"))
        (root / "images").mkdir()
        for i in range(args.images):
            shutil.copy(photos[i % len(photos)], root / "images" / f"image_{i:05d}.jpg")
        for r in range(args.rounds):  # interleaved, so that a slow spell of the machine hits both alike
            for actors in results:
                results[actors].append(
                    predict(checkpoint, root / "images", root / f"out_{actors}_{r}", actors)
                )

    print(
        f"kmax predict, tiny preset (random weights), {args.images} COCO images, "
        f"median of {args.rounds} round(s)"
    )
    print(f"{'actors':>6s} {'img/s (wall)':>13s} {'img/s (steady)':>15s}")
    medians = {
        a: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for a, runs in results.items()
    }
    for actors, m in medians.items():
        print(f"{actors:6d} {m['wall']:13.2f} {m['steady']:15.2f}")
    print(
        f"2 actors / 1 actor: {medians[2]['wall'] / medians[1]['wall']:.2f}x wall, "
        f"{medians[2]['steady'] / medians[1]['steady']:.2f}x steady"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
