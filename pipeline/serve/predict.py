"""`kmax predict`: panoptic predictions of a checkpoint on image files or a prepared split, on Ray Data.

    kmax predict --checkpoint runs/r/best/state.pt --input photos/ --out preds/ [--actors 2] [--gpu]
    kmax predict --checkpoint runs/r/best/state.pt --input data/coco_prepared --split val --out preds/

The driver checks everything it can before Ray starts (checkpoint, inputs, categories, output folder;
one-line refusals, exit 2), lists the inputs (paths only) and leaves out the images a previous run in the
same ``--out`` finished (pipeline.serve.outputs). The rest streams through Ray Data:

    from_items(index, name, source, shard, row)            the paths only
      -> map_batches(_decode_batch)                        read and decode each image (pipeline.serve.images);
                                                           a file that cannot be read keeps its reason
      -> map_batches(PredictActor, ActorPoolStrategy(size=--actors))
                                                           one model per actor: the evaluation's
                                                           `pipeline.eval.predictor.Predictor` (the
                                                           preprocessing of `kmax evaluate --checkpoint`);
                                                           writes the image's PNG, overlay and cluster maps
      -> iter_rows in the driver                           each small result appended to records.jsonl
                                                           (or skipped.jsonl) as it arrives

Ray Data fuses the decoding into the actors' stage (each actor decodes the images it predicts) and streams:
only the blocks in flight are in memory, whatever the number of inputs. predictions.json is assembled from
records.jsonl at the end. Category ids are those of the dataset the checkpoint was trained on: the
categories of its manifest (``data.prepared_dir`` of the checkpoint's config, or ``--data``), or of the
prepared split given as ``--input``. The actors write into ``--out``: on a cluster of several nodes it must
be a shared mount.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cli import fail
from pipeline.storage import absolute

if TYPE_CHECKING:
    from pipeline.serve.images import Item

DECODE_BATCH = 4
"""Image files one decoding call reads (a prepared split is decoded by Parquet row group)."""
PROGRESS_STEPS = 10
"""Progress lines per run (and one at the end)."""
OVERLAY_QUALITY = 90
"""Default JPEG quality of the overlays."""
SKIP_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)
"""The image column's value on a row whose file could not be read."""
PREDICTION_REFUSED = "prediction_refused"
"""skipped.jsonl code of an image the predictor refuses (larger than a fixed ``data.eval_size``)."""


class Refused(Exception):
    """Input the command refuses (printed as one line, exit 2)."""


@dataclass
class Plan:
    """What one run does, settled before Ray starts."""

    items: list[Item]  # every input, in order
    todo: list[Item]  # the inputs not finished by a previous run
    out: Path
    categories_source: tuple[str, str]  # (prepared dir, split) of the category list
    manifest: dict
    config: Any  # the checkpoint's ExperimentConfig
    identity: dict  # what run.json records
    prepared: bool


# --------------------------------------------------------------------------------------- Ray Data stages


def _image_column(images: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of images of any sizes (np.array would stack equal sizes into one array)."""
    column = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        column[i] = image
    return column


def _decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Items -> the same rows with "image" (uint8 RGB [H, W, 3]) and "code"/"reason" ("" when decoded)."""
    from pipeline.serve.images import decode_file, read_prepared, skip_reason

    n = len(batch["index"])
    images, codes, reasons = [SKIP_PLACEHOLDER] * n, [""] * n, [""] * n
    shards: dict[str, list[int]] = {}
    for i in range(n):
        if str(batch["shard"][i]):
            shards.setdefault(str(batch["shard"][i]), []).append(i)
            continue
        try:
            images[i] = decode_file(str(batch["source"][i]))
        except Exception as exc:  # any file that cannot be decoded is skipped with its reason
            codes[i], reasons[i] = skip_reason(exc)
    for shard, members in shards.items():
        decoded = read_prepared(shard, [int(batch["row"][i]) for i in members])
        for i in members:
            images[i] = decoded[int(batch["row"][i])]
    return {
        "index": batch["index"], "name": batch["name"], "image": _image_column(images),
        "code": np.array(codes, dtype=object), "reason": np.array(reasons, dtype=object),
    }  # fmt: skip


class PredictActor:
    """One model in one Ray actor: predicts decoded rows and writes each image's files.

    Returns per row: "index", "height", "width", "segments" (JSON of the COCO segments_info), "code" and
    "reason" (a row that could not be decoded or predicted keeps its reason and writes nothing)."""

    def __init__(self, checkpoint: str, categories_source: tuple[str, str], out: str, options: dict):
        import torch

        from pipeline.eval.predictor import predictor_from_checkpoint

        torch.set_num_threads(options["threads"])
        self.predictor, cfg = predictor_from_checkpoint(checkpoint, *categories_source, options["device"])
        self.num_clusters = cfg.model.decoder.num_clusters
        self.out, self.options = Path(out), options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["index"])
        codes, reasons = list(batch["code"]), list(batch["reason"])
        sizes, infos = [(0, 0)] * n, [""] * n
        good = [i for i in range(n) if not codes[i]]
        records = [self._record(batch["image"][i]) for i in good]
        for i, record, prediction in zip(good, records, self._predict(records, codes, reasons, good)):
            if prediction is not None:
                sizes[i] = prediction["label_map"].shape
                infos[i] = json.dumps(self._write(str(batch["name"][i]), record, prediction))
        return {
            "index": batch["index"], "height": np.array([s[0] for s in sizes]),
            "width": np.array([s[1] for s in sizes]), "segments": np.array(infos, dtype=object),
            "code": np.array(codes, dtype=object), "reason": np.array(reasons, dtype=object),
        }  # fmt: skip

    @staticmethod
    def _record(image: np.ndarray) -> dict:
        """A decoded image as the predictor's record (fields of `pipeline.data.records.decode_record`)."""
        image = np.asarray(image)
        return {"image": image, "height": image.shape[0], "width": image.shape[1]}

    def _predict(self, records: list[dict], codes: list, reasons: list, rows: list[int]) -> list:
        """Predictions of ``records`` together; when the batch is refused (an image larger than the
        config's ``data.eval_size``), one by one, the refused ones as None with their reason set."""
        assignments = self.options["cluster_maps"]
        try:
            return self.predictor(records, return_assignments=assignments, instances=False)
        except ValueError:
            pass
        out = []
        for record, row in zip(records, rows):
            try:
                out.append(self.predictor([record], return_assignments=assignments, instances=False)[0])
            except ValueError as exc:
                codes[row], reasons[row] = PREDICTION_REFUSED, str(exc)
                out.append(None)
        return out

    def _write(self, name: str, record: dict, prediction: dict) -> list[dict]:
        """Write the image's PNG (last: it marks the image done), overlay and cluster maps; returns its
        COCO segments_info."""
        from pipeline.serve import outputs
        from pipeline.serve.overlay import cluster_maps, overlay

        label, segments = prediction["label_map"], prediction["segments"]
        ids = outputs.panoptic_ids(label, segments)
        if self.options["overlays"]:
            p = self.predictor
            picture = overlay(record["image"], label, segments, p.categories, p.label_divisor)
            outputs.save_atomic(
                picture, outputs.overlay_path(self.out, name), quality=self.options["quality"]
            )
        if self.options["cluster_maps"]:
            maps = cluster_maps(prediction["assignments"], label.shape, self.num_clusters)
            for layer, picture in enumerate(maps, start=1):
                outputs.save_atomic(picture, outputs.cluster_map_path(self.out, name, layer))
        outputs.save_atomic(outputs.id_png(ids), outputs.png_path(self.out, name))
        return outputs.segments_info(ids, segments)


# ---------------------------------------------------------------------------------------------- planning


def _load_config(checkpoint: str) -> tuple[Any, dict]:
    """(ExperimentConfig, run.json identity) of a checkpoint; `Refused` when it cannot be loaded."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.config import ExperimentConfig

    try:
        state = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise Refused(exc) from None
    identity = {"checkpoint": str(checkpoint), "step": int(state["step"])}
    return ExperimentConfig.from_dict(state["config"]), identity


def _categories_source(args: argparse.Namespace, cfg: Any) -> tuple[str, str]:
    """(prepared dir, split) whose manifest holds the model's categories: the input split, else a split of
    --data or of the checkpoint's training data (--split, the config's validation or training split)."""
    from pipeline.data.records import MANIFEST_NAME, split_dir
    from pipeline.storage import is_file, join

    if args.split and not args.data:
        return args.input, args.split
    data = args.data or cfg.data.prepared_dir
    if data is None:
        raise Refused("the checkpoint's config names no prepared dataset: give --data PREPARED_DIR")
    splits = tuple(dict.fromkeys(s for s in (args.split, cfg.data.val_split, cfg.data.train_split) if s))
    for split in splits:
        if is_file(join(split_dir(data, split), MANIFEST_NAME)):
            return str(data), split
    raise Refused(
        f"no prepared split {' or '.join(splits)} in {data} (the categories of the checkpoint's dataset): "
        "give --data PREPARED_DIR"
    )


def _items(args: argparse.Namespace, out: Path) -> list:
    """Every input item, in order; `Refused` when there is none."""
    from pipeline.serve.images import file_items, find_images, prepared_items

    if args.split:
        try:
            items = prepared_items(args.input, args.split)
        except (FileNotFoundError, ValueError) as exc:
            raise Refused(exc) from None
    else:
        if Path(args.input).is_dir() and any(Path(args.input).glob("*/manifest.json")):
            raise Refused(f"{args.input} is a prepared dataset: add --split NAME")
        try:
            items = file_items(find_images(args.input, exclude=out))
        except ValueError as exc:  # two inputs with one output name
            raise Refused(exc) from None
    if not items:
        raise Refused(f"no images matched --input {args.input}")
    return items


def _check_flags(args: argparse.Namespace, out: Path) -> None:
    if args.actors < 1 or (args.batch_size is not None and args.batch_size < 1) or args.cpus_per_actor <= 0:
        raise Refused("--actors and --batch-size must be >= 1, --cpus-per-actor > 0")
    if not 1 <= args.overlay_quality <= 100:
        raise Refused(f"--overlay-quality must be in 1..100, got {args.overlay_quality}")
    source = Path(args.input).resolve()
    if source.exists() and (source == out or source.is_relative_to(out)):
        raise Refused(f"--out {out} must not hold the input {source}")
    if args.gpu and args.ray_address is None:
        import torch

        if not torch.cuda.is_available():
            raise Refused("--gpu: this machine has no CUDA device (join a cluster with --ray-address)")


def plan(args: argparse.Namespace) -> Plan:
    """Everything decided before Ray starts; raises `Refused`."""
    from pipeline.data.records import read_manifest
    from pipeline.serve import outputs

    out = Path(args.out).resolve()
    _check_flags(args, out)
    cfg, identity = _load_config(args.checkpoint)
    problem = outputs.out_dir_problem(out, identity)
    if problem:
        raise Refused(problem)
    source = _categories_source(args, cfg)
    try:
        manifest = read_manifest(*source)
    except (FileNotFoundError, ValueError) as exc:
        raise Refused(exc) from None
    if int(manifest["num_classes"]) != cfg.model.num_classes:
        raise Refused(
            f"{args.checkpoint} was trained with {cfg.model.num_classes} classes, "
            f"{source[0]}/{source[1]} has {manifest['num_classes']}"
        )
    items = _items(args, out)
    records = outputs.read_records(out)
    todo = [item for item in items if not outputs.is_finished(out, item, records)]
    return Plan(items, todo, out, source, manifest, cfg, identity, bool(args.split))


# -------------------------------------------------------------------------------------------- execution


def _dataset(ray, plan_: Plan, args: argparse.Namespace):
    """The streaming Ray Data pipeline over the items still to do."""
    from pipeline.data.records import ROW_GROUP_SIZE

    rows = [
        {"index": i, "name": it.name, "source": it.source, "shard": it.shard, "row": it.row}
        for i, it in enumerate(plan_.todo)
    ]
    options = {
        "device": "cuda" if args.gpu else "cpu", "threads": max(1, int(args.cpus_per_actor)),
        "cluster_maps": args.cluster_maps, "overlays": not args.no_overlays, "quality": args.overlay_quality,
    }  # fmt: skip
    decode_batch = ROW_GROUP_SIZE if plan_.prepared else DECODE_BATCH
    return (
        ray.data.from_items(rows)
        .map_batches(_decode_batch, batch_size=decode_batch, batch_format="numpy")
        .map_batches(
            PredictActor,
            batch_size=args.batch_size or plan_.config.data.eval_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            num_cpus=args.cpus_per_actor,
            num_gpus=1 if args.gpu else 0,
            fn_constructor_kwargs={
                "checkpoint": args.checkpoint,
                "categories_source": plan_.categories_source,
                "out": str(plan_.out),
                "options": options,
            },
        )  # fmt: skip
    )


def _stream(ds, plan_: Plan) -> tuple[int, int]:
    """Append each result to records.jsonl or skipped.jsonl as it arrives (progress on stderr); returns
    (predicted, skipped)."""
    from pipeline.serve import outputs

    total, counts = len(plan_.todo), {"predicted": 0, "skipped": 0}
    step, start = max(1, total // PROGRESS_STEPS), time.perf_counter()
    with (
        outputs.open_log(plan_.out / outputs.RECORDS_FILE) as records,
        outputs.open_log(plan_.out / outputs.SKIPPED_FILE) as bad,
    ):
        for row in ds.iter_rows():
            item = plan_.todo[int(row["index"])]
            if row["code"]:
                outputs.append_line(bad, {"path": item.source, "code": row["code"], "reason": row["reason"]})
                counts["skipped"] += 1
            else:
                infos = json.loads(row["segments"])
                outputs.append_line(records, outputs.image_record(item, row["height"], row["width"], infos))
                counts["predicted"] += 1
            done = sum(counts.values())
            if done % step == 0 or done == total:
                rate = done / (time.perf_counter() - start)
                print(f"predict: {done}/{total} images, {rate:.1f} img/s", file=sys.stderr, flush=True)
    return counts["predicted"], counts["skipped"]


def execute(plan_: Plan, args: argparse.Namespace) -> int:
    """Run the pipeline over the items to do (no Ray when there is none), then assemble predictions.json;
    prints what was done."""
    from pipeline.ray_setup import DATA_CPU_RESERVE, RayConfig, init_ray, with_local_cpus
    from pipeline.serve import outputs

    outputs.write_run_file(plan_.out, plan_.identity)
    skipped_file = plan_.out / outputs.SKIPPED_FILE
    if not skipped_file.is_file() or skipped_file.stat().st_size:
        skipped_file.write_text("")  # it lists the unreadable inputs of this run only
    finished = len(plan_.items) - len(plan_.todo)
    if finished:
        print(f"predict: skipping {finished} images finished before in {plan_.out}", file=sys.stderr)
    predicted = skipped = 0
    if plan_.todo:
        need = args.actors * args.cpus_per_actor + DATA_CPU_RESERVE
        ray = init_ray(with_local_cpus(RayConfig(address=args.ray_address, num_cpus=args.num_cpus), need))
        # Ray Data logs an INFO line per execution and a WARNING about disabled progress bars: keep them out.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        predicted, skipped = _stream(_dataset(ray, plan_, args), plan_)
    categories = outputs.coco_categories(plan_.manifest["categories"])
    listed = outputs.write_predictions(plan_.out, plan_.items, categories)
    print(
        f"predicted {predicted} images, {finished} finished before, {skipped} unreadable"
        f"{f' (see {plan_.out / outputs.SKIPPED_FILE})' if skipped else ''}; "
        f"{plan_.out / outputs.PREDICTIONS_FILE} lists {listed} images"
    )
    return 0


# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=absolute,
        required=True,
        metavar="CKPT",
        help="training checkpoint (state.pt or its folder)",
    )
    parser.add_argument(
        "--input", type=absolute, required=True, metavar="PATH",
        help="an image file, a folder (searched recursively), a quoted glob ('photos/**/*.jpg'), or with "
        "--split a prepared dataset (kmax prepare --out)",
    )  # fmt: skip
    parser.add_argument("--split", metavar="NAME", help="predict this split of the prepared dataset --input")
    parser.add_argument(
        "--out", type=absolute, required=True, metavar="DIR", help="output folder (a rerun resumes in it)"
    )
    parser.add_argument(
        "--data", type=absolute, metavar="PREPARED_DIR",
        help="prepared dataset with the checkpoint's categories (default: the one it was trained on)",
    )  # fmt: skip
    parser.add_argument(
        "--actors", type=int, default=1, metavar="N", help="model replicas (Ray actors), default 1"
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) of each actor, default 1"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per forward pass (default: the checkpoint's data.eval_batch_size)",
    )
    parser.add_argument(
        "--cluster-maps", action="store_true", help="also draw each decoder layer's cluster assignment"
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    parser.add_argument(
        "--overlay-quality", type=int, default=OVERLAY_QUALITY,
        help=f"JPEG quality of the overlays, 1-100 (default {OVERLAY_QUALITY})",
    )  # fmt: skip
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")


def run(args: argparse.Namespace) -> int:
    try:
        plan_ = plan(args)
    except Refused as exc:
        return fail("predict", exc)
    return execute(plan_, args)
