"""`kmax predict` (pipeline.serve.predict) on the real COCO sample: its files score as `kmax evaluate
--checkpoint` does, bad inputs are converted or skipped with a reason, and a rerun resumes.

The checkpoint is the tiny model trained here for `STEPS` steps of the project's training step on the two
sample images at 1/13 scale (crowd regions trained as masks, as `make overfit-coco`), with the
post-processing thresholds at 0 so that its segments are kept: measured PQ 19.8 (stuff 39.7, things 0) and
mIoU 23.5 on the two images, with 9 segments (3 of them persons).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.eval.pq_files import read_id_png
from pipeline.serve import outputs
from pipeline.serve.images import decode_file, file_items, find_images, output_names, to_rgb
from pipeline.serve.overlay import OUTLINE_COLOR, TEXT_BACKGROUND, cluster_maps, overlay

STEPS = 120
LONG_SIDE = 49
"""The images are trained and predicted at this long side (4k + 1)."""
CROP = (33, 49)
LEARNING_RATE = 1e-2
SEED = 0


def _train_tiny(prepared: Path, checkpoint_dir: Path) -> Path:
    """STEPS full-batch steps of the tiny model on the prepared split's two images; returns the state.pt."""
    from kmax_model import build_model
    from kmax_model.criterion import build_criterion
    from pipeline.checkpoint import build_state, save_checkpoint
    from pipeline.config import load_experiment
    from pipeline.data.augment import augment_rows
    from pipeline.data.records import iter_records
    from pipeline.data.targets import collate_augmented
    from pipeline.train.step import Trainee, train_step

    zero = ("thing_threshold", "stuff_threshold", "thing_area_limit", "stuff_area_limit")
    cfg = load_experiment(
        "tiny",
        [f"data.prepared_dir={prepared}", "data.val_split=val", "model.num_classes=133"]
        + ["data.augment.crowd_as_ignore=false"]
        + [f"data.eval_long_side={LONG_SIDE}", "data.eval_batch_size=2"]
        + [f"model.postprocess.{name}=0" for name in zero],
    )
    rows = list(iter_records(prepared, "val"))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    scale = LONG_SIDE / max(int(r["width"]) for r in rows)
    augment = dataclasses.replace(
        cfg.data.augment, crop_size=CROP, min_scale=scale, max_scale=scale, flip_prob=0
    )
    data = collate_augmented(augment_rows(batch, augment, epoch=0), crowd_as_ignore=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster on a busy 2-core machine, and deterministic
    try:
        torch.manual_seed(SEED)
        model = build_model(cfg.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        trainee = Trainee(model, build_criterion(cfg.model), optimizer)
        generator = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(STEPS):
            train_step(trainee, lambda: (data["images"], data["targets"]), generator=generator)
    finally:
        torch.set_num_threads(threads)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = build_state(
        step=STEPS, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, config=cfg.to_dict()
    )
    return Path(save_checkpoint(checkpoint_dir, state))


@pytest.fixture(scope="module")
def trained(ray_session, coco_sample_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The prepared COCO sample, the tiny checkpoint and `kmax predict`'s output on the two JPEG files."""
    root = tmp_path_factory.mktemp("predict")
    prepared = root / "prepared"
    argv = ["prepare", "--dataset", "coco", "--root", str(coco_sample_dir), "--split", "val"]
    assert main([*argv, "--out", str(prepared), "--quiet"]) == 0
    checkpoint = _train_tiny(prepared, root / "checkpoint")
    out = root / "files"
    images = coco_sample_dir / "val2017"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(out)]) == 0
    return {"prepared": prepared, "checkpoint": checkpoint, "out": out, "images": images, "root": root}


def _evaluate(argv: list[str], out: Path) -> dict:
    assert main(["evaluate", *argv, "--chunks", "1", "--no-ap", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_predicted_files_score_as_the_checkpoint_evaluation(trained, coco_sample_dir: Path) -> None:
    out, ann = trained["out"], coco_sample_dir / "annotations"
    files = _evaluate(
        ["--gt-json", str(ann / "panoptic_val2017.json"), "--gt-folder", str(ann / "panoptic_val2017")]
        + ["--pred-json", str(out / "predictions.json"), "--pred-folder", str(out / "panoptic")],
        trained["root"] / "files.json",
    )
    checkpoint = _evaluate(
        ["--checkpoint", str(trained["checkpoint"]), "--data", str(trained["prepared"]), "--split", "val"],
        trained["root"] / "checkpoint.json",
    )
    assert files["pq"] == checkpoint["pq"] and files["miou"] == checkpoint["miou"]
    assert files["pq"]["All"]["pq"] > 0 and files["miou"]["miou"] > 0, files["pq"]["All"]  # measured 0.198


def test_png_ids_are_the_segments_and_categories_the_datasets(trained, coco_sample_dir: Path) -> None:
    doc = json.loads((trained["out"] / "predictions.json").read_text())
    gt = json.loads((coco_sample_dir / "annotations" / "panoptic_val2017.json").read_text())
    assert doc["categories"] == [
        {k: c[k] for k in ("id", "name", "isthing", "color")} for c in gt["categories"]
    ]
    assert [a["image_id"] for a in doc["annotations"]] == [142238, 439180]  # the COCO ids of the file names
    assert [(i["height"], i["width"]) for i in doc["images"]] == [(427, 640), (360, 640)]
    dataset_ids = {c["id"] for c in gt["categories"]}
    for ann in doc["annotations"]:
        ids = read_id_png(trained["out"] / "panoptic" / ann["file_name"])
        segments = ann["segments_info"]
        assert segments and {s["category_id"] for s in segments} <= dataset_ids
        values, counts = np.unique(ids[ids != 0], return_counts=True)
        assert values.tolist() == [s["id"] for s in segments] and counts.tolist() == [
            s["area"] for s in segments
        ]
        for s in segments:
            ys, xs = np.nonzero(ids == s["id"])
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert sorted(p.name for p in (trained["out"] / "overlays").iterdir()) == [
        "000000142238.jpg",
        "000000439180.jpg",
    ]


def test_prepared_split_gives_the_same_predictions_and_a_rerun_skips_them(trained, capsys) -> None:
    out = trained["root"] / "split"
    argv = ["predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(trained["prepared"])]
    argv += ["--split", "val", "--out", str(out), "--no-overlays", "--cluster-maps"]
    assert main(argv) == 0
    split, files = (json.loads((d / "predictions.json").read_text()) for d in (out, trained["out"]))
    assert split["annotations"] == files["annotations"]
    for ann in split["annotations"]:
        png = ann["file_name"]
        assert np.array_equal(
            read_id_png(out / "panoptic" / png), read_id_png(trained["out"] / "panoptic" / png)
        )
    layers = sorted((out / "cluster_maps" / "000000142238").iterdir())
    assert len(layers) == 6 and Image.open(layers[0]).size == (640, 427)
    assert not (out / "overlays").exists()

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping 2 images finished before" in captured.err and "predicted 0 images" in captured.out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written  # nothing written
    assert json.loads((out / "predictions.json").read_text()) == split
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def _bad_inputs(folder: Path, photo: Path) -> dict[str, tuple[int, int]]:
    """Write one file of each kind into ``folder``; returns {file: expected output (H, W)} of those that
    must be predicted."""
    folder.mkdir()
    rgb = np.asarray(Image.open(photo).convert("RGB"))[100:160, 200:280]  # 60 x 80
    image = Image.fromarray(rgb)
    image.convert("L").save(folder / "grey.png")
    image.convert("CMYK").save(folder / "cmyk.jpg")
    image.convert("RGBA").save(folder / "rgba.png")
    deep = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(folder / "rotated.jpg", exif=exif)
    data = photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image\n")
    (folder / "readme.txt").write_text("no image suffix: not an input\n")
    return {"grey": (60, 80), "cmyk": (60, 80), "rgba": (60, 80), "deep": (60, 80), "rotated": (80, 60)}


def test_bad_files_are_converted_or_skipped_with_their_reason(trained, tmp_path: Path) -> None:
    folder, out = tmp_path / "inputs", tmp_path / "out"
    expected = _bad_inputs(folder, trained["images"] / "000000142238.jpg")
    argv = ["predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(folder), "--out", str(out)]
    assert main([*argv, "--actors", "2", "--batch-size", "2"]) == 0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(Path(s["path"]).name, s["code"]) for s in skipped} == {
        ("truncated.jpg", "truncated_file"),
        ("notes.jpg", "unreadable_file"),
    }
    assert all(s["reason"] for s in skipped)
    doc = json.loads((out / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in doc["annotations"]) == sorted(expected)
    for name, size in expected.items():
        assert read_id_png(out / "panoptic" / f"{name}.png").shape == size
        assert Image.open(out / "overlays" / f"{name}.jpg").size == size[::-1]


def test_decoding_converts_every_mode(coco_sample_dir: Path, tmp_path: Path) -> None:
    _bad_inputs(tmp_path / "in", coco_sample_dir / "val2017" / "000000142238.jpg")
    grey = np.asarray(Image.open(tmp_path / "in" / "grey.png"))
    assert np.array_equal(decode_file(str(tmp_path / "in" / "deep.png")), np.repeat(grey[..., None], 3, 2))
    rgb = decode_file(str(tmp_path / "in" / "rgba.png"))
    rotated = decode_file(str(tmp_path / "in" / "rotated.jpg"))
    assert rotated.shape == (80, 60, 3) and rgb.shape == (60, 80, 3)
    sixteen = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert to_rgb(sixteen)[0, :, 0].tolist() == [0, 1, 255]
    floats = Image.fromarray(np.array([[-3.0, 12.4, 300.0]], dtype=np.float32))
    assert to_rgb(floats)[0, :, 1].tolist() == [0, 12, 255]


def test_inputs_are_found_named_and_numbered(tmp_path: Path) -> None:
    for rel in ("a/000123.jpg", "a/x.JPG", "a/x.png", "b/.hidden.jpg", ".cache/y.jpg", "out/z.jpg", "c.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_images(str(tmp_path), exclude=tmp_path / "out")
    assert [rel for _, rel in found] == ["a/000123.jpg", "a/x.JPG", "a/x.png"]
    items = file_items(found)
    assert [(i.name, i.image_id) for i in items] == [
        ("a/000123", 123),
        ("a/x_JPG", "a/x_JPG"),
        ("a/x_png", "a/x_png"),
    ]
    assert [rel for _, rel in find_images(str(tmp_path / "**" / "*.jpg"))] == ["a/000123.jpg", "out/z.jpg"]
    assert find_images(str(tmp_path / "c.txt")) == [(str(tmp_path / "c.txt"), "c.txt")]  # named: tried
    assert output_names(["a/b.jpg", "a/b.png", "c.jpg"]) == ["a/b_jpg", "a/b_png", "c"]


def test_a_record_line_cut_short_is_ignored_and_ended(tmp_path: Path) -> None:
    (tmp_path / "records.jsonl").write_text('{"name": "a", "source": "s"}\n{"name": "b", "sou')
    assert list(outputs.read_records(tmp_path)) == ["a"]
    with outputs.open_log(tmp_path / "records.jsonl") as log:
        outputs.append_line(log, {"name": "c", "source": "s"})
    assert list(outputs.read_records(tmp_path)) == ["a", "c"]


def test_refusals_are_one_line_before_ray(trained, tmp_path: Path, capsys) -> None:
    ckpt, images = str(trained["checkpoint"]), str(trained["images"])

    def refused(*argv: str) -> str:
        assert main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kmax predict: ") and err.count("\n") == 1
        return err

    out = str(tmp_path / "o")
    assert "no checkpoint" in refused("--checkpoint", str(tmp_path / "x.pt"), "--input", images, "--out", out)
    assert "no images matched" in refused(
        "--checkpoint", ckpt, "--input", str(tmp_path / "*.jpg"), "--out", out
    )
    assert "add --split" in refused("--checkpoint", ckpt, "--input", str(trained["prepared"]), "--out", out)
    (tmp_path / "file").write_text("")
    assert "is a file" in refused("--checkpoint", ckpt, "--input", images, "--out", str(tmp_path / "file"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    assert "no kmax predict output" in refused("--checkpoint", ckpt, "--input", images, "--out", str(other))
    foreign = tmp_path / "foreign"
    outputs.write_run_file(foreign, {"checkpoint": "/elsewhere/state.pt", "step": 1})
    assert "another checkpoint" in refused("--checkpoint", ckpt, "--input", images, "--out", str(foreign))
    assert "must not hold the input" in refused("--checkpoint", ckpt, "--input", images, "--out", images)


def test_overlay_outlines_segments_and_names_things() -> None:
    image = np.full((40, 60, 3), 100, np.uint8)
    label = np.full((40, 60), 1 * 256, np.int32)  # stuff class 1 everywhere
    label[10:30, 15:45] = 0 * 256 + 1  # a thing of class 0
    label[:, :3] = -1  # void
    categories = [
        {"class_id": 0, "name": "person", "isthing": True, "color": [220, 20, 60]},
        {"class_id": 1, "name": "grass", "isthing": False, "color": [0, 200, 0]},
    ]
    segments = [{"id": 1, "class_id": 0, "isthing": True}, {"id": 256, "class_id": 1, "isthing": False}]
    pixels = np.asarray(overlay(image, label, segments, categories, 256))
    assert pixels.shape == (40, 60, 3) and np.array_equal(pixels[:, :2], image[:, :2])  # void: the photo
    assert tuple(pixels[9, 30]) == OUTLINE_COLOR  # the row above the thing's top edge
    assert tuple(pixels[39, 50]) == (50, 150, 50)  # grass blended half and half
    assert (pixels[12:28, 17:43] == TEXT_BACKGROUND).all(axis=-1).any()  # the name's box on the thing
    maps = cluster_maps([np.array([[0, 1], [2, 0]]), np.array([[3]])], (40, 60), num_clusters=4)
    assert [m.size for m in maps] == [(60, 40), (60, 40)]
    first = np.asarray(maps[0])
    assert np.array_equal(first[0, 0], first[39, 59]) and not np.array_equal(first[0, 0], first[0, 59])
