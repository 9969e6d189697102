"""PQ speed: in-memory path, file path and a baseline per image; the file path on 1 vs 2 processes; Ray.

    .venv/bin/python benchmarks/bench_pq.py [--cityscapes 8] [--coco 24] [--files-images 64]
        [--ray-images 200] [--repeats 3]

The baseline is what the official evaluator does per image (written here, not copied): decode both PNGs,
``rgb2id`` with uint32 arithmetic, ``np.unique(return_counts)`` of the prediction and of the combined
``gt * 2^24 + pred`` uint64 key, then Python loops for matching, false negatives and false positives.
Images are synthetic (random rectangles painted over stuff bands, the prediction shifted and partly
relabelled) at Cityscapes size (1024x2048, ~60 segments) and COCO size (480x640, ~20 segments).
Prints median per-image milliseconds and the ratios measured in this run; speed is never asserted.
The process comparison runs `pq_compute_files` on the same Cityscapes-size JSON + PNG folders with workers=1
(this process) and workers=2 (this process and one fork-server worker, one contiguous slice each), timed in
turn; the fork server is started once before timing, as it is once per calling process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.pq import VOID_LABEL, pq_image_stats  # noqa: E402
from pipeline.eval.pq_files import FilePair, file_pair_stats  # noqa: E402

SIZES = {"cityscapes": ((1024, 2048), 60), "coco": ((480, 640), 20)}
NUM_STUFF = 11
NUM_THING = 8
DIVISOR = 1000
CATEGORIES = [{"id": c, "isthing": int(c >= NUM_STUFF)} for c in range(NUM_STUFF + NUM_THING)]


def synth_pair(rng: np.random.Generator, size: tuple[int, int], num_segments: int):
    """(gt map, gt segments, pred map, pred segments) as contract label maps (void = VOID_LABEL)."""
    h, w = size
    gt = np.empty((h, w), dtype=np.int32)
    bands = np.linspace(0, h, 6).astype(int)
    for i, (a, b) in enumerate(zip(bands[:-1], bands[1:])):
        gt[a:b] = (i * 2 % NUM_STUFF) * DIVISOR
    for k in range(num_segments - 5):
        sh, sw = rng.integers(h // 20, h // 4), rng.integers(w // 20, w // 4)
        y, x = rng.integers(0, h - sh), rng.integers(0, w - sw)
        gt[y : y + sh, x : x + sw] = int(rng.integers(NUM_STUFF, NUM_STUFF + NUM_THING)) * DIVISOR + k + 1
    for _ in range(6):  # void: thin borders between regions and a few unlabelled patches
        vh, vw = rng.integers(2, h // 10), rng.integers(2, w // 10)
        y, x = rng.integers(0, h - vh), rng.integers(0, w - vw)
        gt[y : y + vh, x : x + vw] = VOID_LABEL
    gt[:, :: w // 8] = VOID_LABEL
    pred = np.roll(gt, (3, 5), axis=(0, 1))
    pred[pred == VOID_LABEL] = 0  # the prediction covers everything (stuff class 0 where GT is void)

    def segments(m: np.ndarray, with_area: bool) -> list[dict]:
        ids, counts = np.unique(m, return_counts=True)
        out = []
        for i, c in zip(ids.tolist(), counts.tolist()):
            if i == VOID_LABEL:
                continue
            cat = i // DIVISOR
            seg = {"id": i, "category_id": cat, "iscrowd": 0}
            if with_area:
                seg["area"] = c
            out.append(seg)
        return out

    psegs = segments(pred, False)
    for s in psegs[::7]:  # relabel some predictions to another class of the same kind
        s["category_id"] = (
            (s["category_id"] + 1) % NUM_STUFF if s["category_id"] < NUM_STUFF else s["category_id"]
        )
    return gt, segments(gt, True), pred, psegs


def to_png(label: np.ndarray, path: Path) -> None:
    """Contract map -> COCO panoptic PNG (id = value + 1, so void -1 becomes 0)."""
    ids = (label.astype(np.int64) + 1).astype(np.uint32)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def png_segments(segs: list[dict]) -> list[dict]:
    return [{**s, "id": s["id"] + 1} for s in segs]


def baseline_image(
    gt_png: Path, gt_segs: list[dict], pred_png: Path, pred_segs: list[dict], cats: dict
) -> tuple:
    """Straightforward per-image PQ as the official tool computes it (decode, rgb2id, np.unique, loops)."""
    offset, void = 256 * 256 * 256, 0

    def rgb2id(path: Path) -> np.ndarray:
        c = np.array(Image.open(path), dtype=np.uint32)
        return c[:, :, 0] + 256 * c[:, :, 1] + 256 * 256 * c[:, :, 2]

    gt, pred = rgb2id(gt_png), rgb2id(pred_png)
    gsegs = {s["id"]: dict(s) for s in gt_segs}
    psegs = {s["id"]: dict(s) for s in pred_segs}
    labels, counts = np.unique(pred, return_counts=True)
    for lab, cnt in zip(labels, counts):
        if lab == void:
            continue
        psegs[lab]["area"] = cnt
    key = gt.astype(np.uint64) * offset + pred.astype(np.uint64)
    labels, counts = np.unique(key, return_counts=True)
    table = {(int(k // offset), int(k % offset)): int(c) for k, c in zip(labels, counts)}
    tp, fp, fn, iou_sum = {}, {}, {}, {}
    gm, pm = set(), set()
    for (g, p), inter in table.items():
        if (
            g not in gsegs
            or p not in psegs
            or gsegs[g]["iscrowd"]
            or gsegs[g]["category_id"] != psegs[p]["category_id"]
        ):
            continue
        union = psegs[p]["area"] + gsegs[g]["area"] - inter - table.get((void, p), 0)
        if inter / union > 0.5:
            c = gsegs[g]["category_id"]
            tp[c] = tp.get(c, 0) + 1
            iou_sum[c] = iou_sum.get(c, 0.0) + inter / union
            gm.add(g)
            pm.add(p)
    crowd = {}
    for g, s in gsegs.items():
        if g in gm:
            continue
        if s["iscrowd"]:
            crowd[s["category_id"]] = g
            continue
        fn[s["category_id"]] = fn.get(s["category_id"], 0) + 1
    for p, s in psegs.items():
        if p in pm:
            continue
        inter = table.get((void, p), 0) + table.get((crowd.get(s["category_id"], -1), p), 0)
        if inter / s["area"] > 0.5:
            continue
        fp[s["category_id"]] = fp.get(s["category_id"], 0) + 1
    return tp, fp, fn, iou_sum


def interleaved_ms(paths: dict, items: list, repeats: int) -> dict[str, tuple[float, float, float]]:
    """{path: (median wall, min wall, median CPU) ms per image}; the paths are timed in turn on each image so
    that the load of the shared machine hits all of them alike. CPU time (time.process_time) excludes the
    time spent waiting for a core, the least noisy figure on a busy machine."""
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for item in items:
            for name, fn in paths.items():
                t, c = time.perf_counter(), time.process_time()
                fn(item)
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - t)
    return {
        k: (1e3 * statistics.median(wall[k]), 1e3 * min(wall[k]), 1e3 * statistics.median(cpu[k]))
        for k in paths
    }


def bench_size(name: str, count: int, repeats: int, tmp: Path, rng: np.random.Generator) -> None:
    (h, w), nseg = SIZES[name]
    cats = {c["id"]: c for c in CATEGORIES}
    items = []
    for i in range(count):
        gt, gsegs, pred, psegs = synth_pair(rng, (h, w), nseg)
        gp, pp = tmp / f"{name}_{i}_gt.png", tmp / f"{name}_{i}_pred.png"
        to_png(gt, gp)
        to_png(pred, pp)
        items.append(
            (gt, gsegs, pred, psegs, FilePair(i, i, gp, png_segments(gsegs), pp, png_segments(psegs)))
        )
    nsegs = statistics.mean(len(it[1]) for it in items)

    pq_cats = _cats()
    # The three paths must agree before they are timed.
    for gt, gsegs, pred, psegs, pair in items[:2]:
        a = pq_image_stats(gt, gsegs, pred, psegs, CATEGORIES)
        b = file_pair_stats(pair, pq_cats)
        tp, fp, fn, _ = baseline_image(pair.gt_png, pair.gt_segments, pair.pred_png, pair.pred_segments, cats)
        assert a.fp == b.fp == fp and a.fn == b.fn == fn
        assert np.array_equal(a.tp_union, b.tp_union) and len(a.tp_category) == sum(tp.values())

    res = interleaved_ms(
        {
            "baseline": lambda it: baseline_image(
                it[4].gt_png, it[4].gt_segments, it[4].pred_png, it[4].pred_segments, cats
            ),
            "files": lambda it: file_pair_stats(it[4], pq_cats),
            "memory": lambda it: pq_image_stats(it[0], it[1], it[2], it[3], pq_cats),
        },
        items,
        repeats,
    )
    base = res["baseline"]
    print(
        f"{name} {h}x{w}, {nsegs:.0f} GT segments/image, {count} images x {repeats} "
        "(ms per image: median wall / min wall / median CPU, and the speed-up of each vs the baseline):"
    )
    for key, label in (
        ("baseline", "baseline (decode + np.unique + loops)"),
        ("files", "file path (pq_files)"),
        ("memory", "in-memory (pq_image_stats)"),
    ):
        med, best, cpu = res[key]
        print(
            f"  {label:38s} {med:7.2f} / {best:7.2f} / {cpu:7.2f}   "
            f"{base[0] / med:5.1f}x / {base[1] / best:5.1f}x / {base[2] / cpu:5.1f}x"
        )


def _cats():
    from pipeline.eval.pq import normalize_categories

    return {c.id: c for c in normalize_categories(CATEGORIES)}


def write_files(root: Path, name: str, count: int, rng: np.random.Generator) -> tuple[Path, Path, Path, Path]:
    """``count`` synthetic pairs of size ``name`` as COCO panoptic files; returns pq_compute_files' args."""
    import json

    (h, w), nseg = SIZES[name]
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    gt_anns, pred_anns = [], []
    for i in range(count):
        gt, gsegs, pred, psegs = synth_pair(rng, (h, w), nseg)
        to_png(gt, root / "gt" / f"{i}.png")
        to_png(pred, root / "pred" / f"{i}.png")
        gt_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": png_segments(gsegs)})
        pred_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": png_segments(psegs)})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return root / "gt.json", root / "gt", root / "pred.json", root / "pred"


def bench_processes(count: int, repeats: int, tmp: Path, rng: np.random.Generator) -> None:
    """pq_compute_files on 1 and 2 processes over the same Cityscapes-size files, timed in turn."""
    from pipeline.eval.pq_files import pq_compute_files

    args = write_files(tmp / "processes", "cityscapes", count, rng)
    t = time.perf_counter()
    first = pq_compute_files(*args, chunks=1, workers=2)  # starts the fork server (once per process)
    first_s = time.perf_counter() - t
    wall: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in wall:
            t = time.perf_counter()
            result = pq_compute_files(*args, chunks=1, workers=workers)
            wall[workers].append(time.perf_counter() - t)
            assert result == first  # bit-identical whatever the process count
    one, two = statistics.median(wall[1]), statistics.median(wall[2])
    print(
        f"file path (pq_compute_files) over {count} Cityscapes-size image pairs x {repeats} "
        "(s per call: median / min wall):"
    )
    print(f"  1 process  (workers=1)           {one:7.3f} / {min(wall[1]):7.3f}")
    print(f"  2 processes (workers=2)          {two:7.3f} / {min(wall[2]):7.3f}")
    print(f"  speed-up 2 vs 1 process          {one / two:7.2f}x / {min(wall[1]) / min(wall[2]):5.2f}x")
    print(f"  first 2-process call (fork server start included) {first_s:.3f} s")


def bench_ray(count: int, tmp: Path, rng: np.random.Generator, num_cpus: int | None) -> None:
    from pipeline.eval.evaluate import evaluate_files
    from pipeline.eval.pq_files import pq_compute_files
    from pipeline.ray_setup import RayConfig, init_ray

    args = write_files(tmp / "ray", "coco", count, rng)

    t = time.perf_counter()
    serial = pq_compute_files(*args, chunks=1, workers=1)
    serial_s = time.perf_counter() - t
    init_ray(RayConfig(num_cpus=num_cpus))
    evaluate_files(*args, chunks=1, miou=False, ap=False)  # warm the workers
    t = time.perf_counter()
    par = evaluate_files(*args, chunks=1, miou=False, ap=False)
    par_s = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_files(*args, chunks=1)
    full_s = time.perf_counter() - t
    assert par["pq"] == serial
    cpus = num_cpus or os.cpu_count()
    print(f"Ray over {count} COCO-size image pairs (files, {cpus} CPUs):")
    print(f"  serial pq_compute_files          {count / serial_s:7.1f} images/s")
    print(
        f"  Ray evaluate_files (PQ only)     {count / par_s:7.1f} images/s   {serial_s / par_s:4.1f}x serial"
    )
    print(f"  Ray evaluate_files (PQ+mIoU+AP)  {count / full_s:7.1f} images/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cityscapes", type=int, default=8, help="Cityscapes-size images")
    parser.add_argument("--coco", type=int, default=24, help="COCO-size images")
    parser.add_argument(
        "--files-images", type=int, default=64, help="Cityscapes-size images for 1 vs 2 processes (0: skip)"
    )
    parser.add_argument("--ray-images", type=int, default=200, help="images for the Ray throughput (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, {os.cpu_count()} cores (shared machine: timings are noisy)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_size("cityscapes", args.cityscapes, args.repeats, tmp, rng)
        bench_size("coco", args.coco, args.repeats, tmp, rng)
        if args.files_images:
            # Its own generator, so that the Ray images stay those of runs without this step.
            bench_processes(args.files_images, args.repeats, tmp, np.random.default_rng(1))
        if args.ray_images:
            bench_ray(args.ray_images, tmp, rng, args.num_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
