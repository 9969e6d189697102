"""What `kmax predict` writes into its output folder, and how a rerun tells what is already done.

Layout of ``DIR``::

    run.json                 the checkpoint the folder's predictions come from (a rerun must use the same)
    panoptic/<name>.png      COCO panoptic PNG (8-bit RGB, id = R + 256 G + 256^2 B, void 0): the k-th
                             entry of the image's segments_info (k = 1, 2, ...) has id k
    overlays/<name>.jpg      the photo with its segments drawn (pipeline.serve.overlay)
    cluster_maps/<name>/layer_<l>.png   with --cluster-maps: each decoder layer's cluster assignment
    records.jsonl            one JSON record per predicted image, appended as results come back
    skipped.jsonl            one {"path", "code", "reason"} per input of the last run that could not be read
    predictions.json         COCO panoptic JSON (images, annotations, categories), assembled from the records

An image is finished when its record (with the same source) is in records.jsonl and its PNG exists; the
record is appended only after every file of the image was written (each one atomically), so an
interrupted run is resumed by running it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from pipeline.serve.images import Item

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
SKIPPED_FILE = "skipped.jsonl"
PREDICTIONS_FILE = "predictions.json"
PNG_DIR = "panoptic"
OVERLAY_DIR = "overlays"
CLUSTER_DIR = "cluster_maps"
OVERLAY_SUFFIX = ".jpg"
PNG_ID_BITS = 8
"""Bits of a PNG channel; ids are ``R + 2^8 G + 2^16 B``."""
PNG_MAX_SEGMENTS = (1 << (3 * PNG_ID_BITS)) - 1


def png_path(out: Path, name: str) -> Path:
    return out / PNG_DIR / f"{name}.png"


def overlay_path(out: Path, name: str) -> Path:
    return out / OVERLAY_DIR / f"{name}{OVERLAY_SUFFIX}"


def cluster_map_path(out: Path, name: str, layer: int) -> Path:
    """``layer`` counts from 1."""
    return out / CLUSTER_DIR / name / f"layer_{layer}.png"


def save_atomic(image: Image.Image, path: Path, **options: Any) -> None:
    """Save ``image`` at ``path`` (format from the suffix, parent folders made) through a temporary file and
    a rename, so that a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()], **options)
    os.replace(tmp, path)


def panoptic_ids(label_map: np.ndarray, segments: Sequence[Mapping]) -> np.ndarray:
    """int32 [H, W] PNG ids of a predictor label map: ``k + 1`` where the map holds ``segments[k]["id"]``,
    0 (void) elsewhere. ``segments`` must be sorted by id, as `kmax_model.postprocess` returns them."""
    if len(segments) > PNG_MAX_SEGMENTS:
        raise ValueError(f"{len(segments)} segments do not fit the 24-bit ids of a panoptic PNG")
    values = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
    if values.size == 0:
        return np.zeros(label_map.shape, np.int32)
    index = np.clip(np.searchsorted(values, label_map), 0, values.size - 1)
    return np.where(values[index] == label_map, index + 1, 0).astype(np.int32)


def id_png(ids: np.ndarray) -> Image.Image:
    """int [H, W] ids (< 2^24) -> the RGB image of panopticapi ``id2rgb``."""
    mask = (1 << PNG_ID_BITS) - 1
    rgb = np.stack([(ids >> (PNG_ID_BITS * c)) & mask for c in range(3)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def segments_info(ids: np.ndarray, segments: Sequence[Mapping]) -> list[dict[str, Any]]:
    """COCO ``segments_info`` of `panoptic_ids`' map: per segment its PNG id, dataset ``category_id``,
    ``iscrowd`` 0, ``area`` and ``bbox`` [x, y, w, h] (both from the map) and the predictor's ``score``."""
    areas = np.bincount(ids.ravel(), minlength=len(segments) + 1)
    out = []
    for k, seg in enumerate(segments, start=1):
        mask = ids == k
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [0, 0, 0, 0]
        if rows.size:
            bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        out.append(
            {
                "id": k, "category_id": int(seg["category_id"]), "iscrowd": 0, "area": int(areas[k]),
                "bbox": bbox, "score": float(seg["score"]),
            }
        )  # fmt: skip
    return out


def image_record(item: Item, height: int, width: int, infos: list[dict]) -> dict[str, Any]:
    """The records.jsonl line of one predicted image: its COCO ``image`` and ``annotation`` entries."""
    return {
        "name": item.name,
        "source": item.source,
        "image": {
            "id": item.image_id,
            "file_name": item.file_name,
            "height": int(height),
            "width": int(width),
        },
        "annotation": {"image_id": item.image_id, "file_name": f"{item.name}.png", "segments_info": infos},
    }


def open_log(path: Path) -> IO[str]:
    """A JSON-lines file opened for appending; a last line cut short by an interrupted run is ended first,
    so that the next record starts on a line of its own."""
    cut = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    log = path.open("a")
    if cut:
        log.write("\n")
    return log


def append_line(log: IO[str], obj: Mapping[str, Any]) -> None:
    """Append ``obj`` as one JSON line and flush it (a record on disk means its image is done)."""
    log.write(json.dumps(obj) + "\n")
    log.flush()


def read_records(out: Path) -> dict[str, dict]:
    """{name: record} of ``out``'s records.jsonl (the last record of a name wins; a line cut short by an
    interrupted run is ignored); {} when there is none."""
    path = out / RECORDS_FILE
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "name" in record:
                records[record["name"]] = record
    return records


def is_finished(out: Path, item: Item, records: Mapping[str, dict]) -> bool:
    """The item has a record of the same source and its PNG exists."""
    record = records.get(item.name)
    return record is not None and record.get("source") == item.source and png_path(out, item.name).is_file()


def coco_categories(manifest_categories: Iterable[Mapping]) -> list[dict[str, Any]]:
    """COCO panoptic ``categories`` (id, name, isthing, color) of a prepared split's manifest categories."""
    return [
        {
            "id": int(c["category_id"]),
            "name": c["name"],
            "isthing": int(bool(c["isthing"])),
            "color": c["color"],
        }
        for c in sorted(manifest_categories, key=lambda c: c["class_id"])
    ]


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename; nothing when the file already holds it."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_predictions(out: Path, items: Sequence[Item], categories: list[dict]) -> int:
    """Assemble ``out/predictions.json`` from records.jsonl: the finished items, in item order. Returns
    how many images it lists."""
    records = read_records(out)
    done = [records[i.name] for i in items if is_finished(out, i, records)]
    doc = {
        "images": [r["image"] for r in done],
        "annotations": [r["annotation"] for r in done],
        "categories": categories,
    }
    _write_text(out / PREDICTIONS_FILE, json.dumps(doc))
    return len(done)


def out_dir_problem(out: Path, identity: Mapping[str, Any]) -> str | None:
    """Why ``out`` cannot take this run's predictions, or None: it is a file, a non-empty folder that is
    no predict output, or the output of another checkpoint (``identity``: what `RUN_FILE` records)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    run_file = out / RUN_FILE
    if not run_file.is_file():
        return f"--out {out} is a non-empty folder that holds no kmax predict output ({RUN_FILE})"
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{run_file} is unreadable ({exc}); remove it or choose another --out"
    if previous != dict(identity):
        return (
            f"--out {out} holds predictions of another checkpoint ({previous.get('checkpoint')}, step "
            f"{previous.get('step')}); choose another --out"
        )
    return None


def write_run_file(out: Path, identity: Mapping[str, Any]) -> None:
    """Record the checkpoint of ``out``'s predictions (the folder is made)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / RUN_FILE, json.dumps(dict(identity), indent=1))
