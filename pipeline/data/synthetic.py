"""`kmax synth`: a deterministic synthetic panoptic dataset in the real on-disk layouts.

COCO panoptic layout (the default)::

    ROOT/annotations/panoptic_{split}2017.json     images, annotations (segments_info), categories
    ROOT/annotations/panoptic_{split}2017/*.png    segment ids as R + 256 G + 256^2 B, 0 = void
    ROOT/{split}2017/*.jpg

Cityscapes gtFine layout (``--format cityscapes``)::

    ROOT/leftImg8bit/{split}/synth/synth_000000_{i:06d}_leftImg8bit.png
    ROOT/gtFine/{split}/synth/synth_000000_{i:06d}_gtFine_{labelIds,instanceIds}.png

Every image is drawn from ``numpy.random.default_rng([seed, split_index, image_index])``, so the same
options always give the same files. The scenes are described in `synth_draw`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.scene import Scene, SceneConfig, draw_scene

if TYPE_CHECKING:
    from pipeline.config import DataConfig

SPLITS = ("train", "val")
SEGMENT_ID_STRIDE = 1000
"""COCO PNG segment id = category_id * SEGMENT_ID_STRIDE + running index (never 0 = void)."""
JPEG_QUALITY = 95
CITY = "synth"
CITYSCAPES_VOID_LABELS = (0, 1, 29)
"""Label ids written on void patches: unlabeled, ego vehicle, caravan (an ignored class with instances)."""
CARAVAN_LABEL_ID = 29
IMAGE_ID_OFFSET = {"train": 1, "val": 100001}


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def coco_categories(cfg: SceneConfig) -> list[dict]:
    cats = [
        {"id": cid, "name": n, "supercategory": "thing", "isthing": 1, "color": list(c)}
        for n, cid, c, _ in cfg.things
    ]
    cats += [
        {"id": cid, "name": n, "supercategory": "stuff", "isthing": 0, "color": list(c)}
        for n, cid, c, _ in cfg.stuff
    ]
    return cats


def scene_segments(scene: Scene, cfg: SceneConfig) -> tuple[np.ndarray, list[dict]]:
    """COCO-style id map (0 = void) and segments_info of a scene."""
    n_things = len(cfg.things)
    classes = list(cfg.things) + list(cfg.stuff)
    ids = np.zeros(scene.cls.shape, np.int64)
    segments: list[dict] = []
    masks: list[tuple[np.ndarray, int, int]] = []
    for c in range(n_things, len(classes)):
        masks.append((scene.cls == c, c, 0))
    for c in range(n_things):
        masks.append((scene.crowd & (scene.cls == c), c, 1))
    for o in np.unique(scene.inst[scene.inst > 0]):
        m = scene.inst == o
        masks.append((m, int(scene.cls[m][0]), 0))
    for k, (m, c, iscrowd) in enumerate(masks):
        area = int(m.sum())
        if area == 0:
            continue
        seg_id = classes[c][1] * SEGMENT_ID_STRIDE + k + 1
        ids[m] = seg_id
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        segments.append(
            {"id": seg_id, "category_id": classes[c][1], "iscrowd": iscrowd, "area": area, "bbox": bbox}
        )
    return ids, segments


def _scene(cfg: SceneConfig, seed: int, split: str, i: int) -> Scene:
    return draw_scene(cfg, np.random.default_rng([seed, SPLITS.index(split), i]))


def write_coco(root: Path, split: str, count: int, cfg: SceneConfig, seed: int) -> None:
    img_dir, png_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        scene = _scene(cfg, seed, split, i)
        image_id = IMAGE_ID_OFFSET[split] + i
        stem = f"{image_id:012d}"
        Image.fromarray(scene.image).save(img_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        ids, segments = scene_segments(scene, cfg)
        Image.fromarray(id2rgb(ids)).save(png_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": cfg.height, "width": cfg.width})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
    doc = {
        "info": {"description": f"kmax-ray synthetic panoptic dataset (seed {seed})"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(cfg),
    }
    (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(doc))


def scene_cityscapes_maps(scene: Scene, cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(labelIds uint8, instanceIds uint16) of a scene, with Cityscapes' encoding (instance k from 0)."""
    classes = list(cfg.things) + list(cfg.stuff)
    label_ids = np.zeros(scene.cls.shape, np.int32)
    inst_ids = np.zeros(scene.cls.shape, np.int32)
    for c, (_, _, _, lid) in enumerate(classes):
        m = scene.cls == c
        label_ids[m] = lid
        inst_ids[m] = lid  # stuff and crowd ("group") regions hold the bare label id
    counters: dict[int, int] = {}
    for o in np.unique(scene.inst[scene.inst > 0]):
        m = scene.inst == o
        lid = classes[int(scene.cls[m][0])][3]
        inst_ids[m] = lid * 1000 + counters.get(lid, 0)
        counters[lid] = counters.get(lid, 0) + 1
    void = scene.cls < 0
    void_lid = CITYSCAPES_VOID_LABELS[scene.void_kind]
    label_ids[void] = void_lid
    # caravan has instances in Cityscapes (id*1000 + k) but is ignored in evaluation -> void after conversion
    inst_ids[void] = void_lid * 1000 if void_lid == CARAVAN_LABEL_ID else void_lid
    return label_ids.astype(np.uint8), inst_ids.astype(np.uint16)


def write_cityscapes(root: Path, split: str, count: int, cfg: SceneConfig, seed: int) -> None:
    img_dir, gt_dir = root / "leftImg8bit" / split / CITY, root / "gtFine" / split / CITY
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = _scene(cfg, seed, split, i)
        stem = f"{CITY}_000000_{i:06d}"
        Image.fromarray(scene.image).save(img_dir / f"{stem}_leftImg8bit.png")
        label_ids, inst_ids = scene_cityscapes_maps(scene, cfg)
        Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst_ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")  # mode I;16


def generate(
    out: str | Path,
    fmt: str = "coco",
    train: int = 96,
    val: int = 24,
    seed: int = 0,
    cfg: SceneConfig | None = None,
) -> Path:
    """Write the dataset under ``out`` and return the root. Deterministic in (options, seed)."""
    cfg = cfg or SceneConfig()
    if fmt not in ("coco", "cityscapes"):
        raise ValueError(f"synth.format must be 'coco' or 'cityscapes', got {fmt!r}")
    for name, n in (("train", train), ("val", val)):
        if n < 0:
            raise ValueError(f"synth.{name} must be >= 0, got {n}")
    root = Path(out)
    writer = write_coco if fmt == "coco" else write_cityscapes
    for split, n in (("train", train), ("val", val)):
        if n:
            writer(root, split, n, cfg, seed)
    return root


def make_prepared_synthetic(
    out: str | Path,
    train: int = 8,
    val: int = 4,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    **prepare_kw,
) -> str:
    """One call for tests and the demo: synth (COCO layout) and prepare both splits into ``out/prepared``
    (``out``: a folder or a storage URI; the raw files go to ``out/raw``, or to a local temporary folder
    when ``out`` is a URI). Needs Ray (started quietly through pipeline.ray_setup when not running).
    Returns the prepared location."""
    from pipeline.data.prepare import PrepareOptions, prepare

    out = storage.absolute(str(out))
    with tempfile.TemporaryDirectory(prefix="kmax-synth-") as scratch:
        raw_root = Path(scratch) if storage.is_uri(out) else Path(out) / "raw"
        raw = generate(raw_root, "coco", train, val, seed, SceneConfig(height=height, width=width))
        prepared = storage.join(out, "prepared")
        for split, n in (("train", train), ("val", val)):
            if n:
                prepare(
                    PrepareOptions(dataset="coco", root=str(raw), split=split, out=prepared, **prepare_kw)
                )
    return prepared


def ensure_synthetic(out: str, data: DataConfig, echo=print) -> str:
    """The synthetic dataset a data config describes (``data.synthetic_*``), prepared under ``out/prepared``
    (a folder or a storage URI); made on first use, reused after (a rerun, the other trials of a sweep).
    Returns the prepared location."""
    prepared = storage.join(out, "prepared")
    if not storage.is_file(storage.join(prepared, data.val_split, "manifest.json")):
        echo(f"making the synthetic dataset in {out} ...")
        size = data.synthetic_size
        make_prepared_synthetic(
            out, data.synthetic_train, data.synthetic_val, size, size, data.synthetic_seed, progress=False
        )
    return prepared


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--format", choices=("coco", "cityscapes"), default="coco")
    parser.add_argument("--train", type=int, default=96, help="number of train images")
    parser.add_argument("--val", type=int, default=24, help="number of val images")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-things", type=int, default=SceneConfig.max_things)
    parser.add_argument("--crowd-prob", type=float, default=SceneConfig.crowd_prob)
    parser.add_argument("--void-prob", type=float, default=SceneConfig.void_prob)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = SceneConfig(
            height=args.height,
            width=args.width,
            max_things=args.max_things,
            crowd_prob=args.crowd_prob,
            void_prob=args.void_prob,
        )
        root = generate(args.out, args.format, args.train, args.val, args.seed, cfg)
    except ValueError as exc:
        print(f"kmax synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} train + {args.val} val synthetic images ({args.format} layout) to {root}")
    return 0
