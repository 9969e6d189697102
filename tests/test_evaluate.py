"""Dataset-level evaluation on Ray (files and prepared shards) and the `kmax evaluate` CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.records import MANIFEST_NAME, SCHEMA_VERSION, encode_label, encode_segments
from pipeline.eval.evaluate import evaluate_files, evaluate_prepared
from pipeline.eval.pq import VOID_LABEL
from pipeline.eval.pq_files import load_json, pair_annotations, pq_compute_files, read_id_png
from pipeline.eval.stats import EvalSpec, eval_metrics, image_eval_stats, reduce_eval_stats
from tests.shard_helpers import write_shard


def _case(pq_oracle_dir: Path, name: str = "random_small") -> tuple[Path, Path, Path, Path]:
    d = pq_oracle_dir / name
    return d / "gt.json", d / "gt", d / "pred.json", d / "pred"


def test_files_on_ray_equal_file_path_whatever_the_task_size(ray_session, pq_oracle_dir: Path) -> None:
    files = _case(pq_oracle_dir)
    expected = json.loads((pq_oracle_dir / "random_small" / "expected.json").read_text())["chunks_4"]
    reference = pq_compute_files(*files, chunks=4)
    one = evaluate_files(*files, chunks=4, images_per_task=1)
    seven = evaluate_files(*files, chunks=4, images_per_task=7)
    assert one["pq"] == seven["pq"] == reference
    assert one["pq"]["All"]["pq"] == expected["All"]["pq"] and one["num_images"] == 40
    assert one["miou"] == seven["miou"] and one["ap"] == seven["ap"]
    assert 0.0 < one["miou"]["miou"] < 1.0 and 0.0 < one["ap"]["AP"] < 1.0


def test_ground_truth_against_itself_on_real_coco(ray_session, coco_sample_dir: Path) -> None:
    ann = coco_sample_dir / "annotations"
    folder = ann / "panoptic_val2017"
    r = evaluate_files(ann / "panoptic_val2017.json", folder, ann / "panoptic_val2017.json", folder, chunks=1)
    m = eval_metrics(r)
    names = ("eval/pq_all", "eval/pq_things", "eval/pq_stuff", "eval/miou", "eval/ap")
    assert tuple(m[k] for k in names) == (100.0, 100.0, 100.0, 100.0, 100.0)


def _write_prepared(case: tuple[Path, Path, Path, Path], out: Path) -> Path:
    """A prepared split (pipeline.data.records format, two shards) holding the oracle case's ground truth,
    with the
    PNG ids kept as label-map values and void moved to VOID_LABEL."""
    gt = load_json(case[0], "gt")
    cats = [{**c, "category_id": c["id"], "class_id": i} for i, c in enumerate(gt["categories"])]
    rows = []
    for ann in gt["annotations"]:
        label = read_id_png(case[1] / ann["file_name"])
        label = np.where(label == 0, VOID_LABEL, label).astype(np.int32)
        buf = io.BytesIO()
        Image.fromarray(np.zeros(label.shape + (3,), np.uint8)).save(buf, format="PNG")
        rows.append(
            {
                "record_id": str(ann["image_id"]),
                "file_name": ann["file_name"],
                "height": label.shape[0],
                "width": label.shape[1],
                "orig_height": label.shape[0],
                "orig_width": label.shape[1],
                "image": buf.getvalue(),
                "label": encode_label(label),
                "segments": encode_segments(ann["segments_info"]),
            }
        )
    split = out / "val"
    split.mkdir(parents=True)
    shards = [
        write_shard(rows[:15], split / "shard-00000.parquet"),
        write_shard(rows[15:], split / "shard-00001.parquet"),
    ]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": "coco",
        "split": "val",
        "categories": cats,
        "num_classes": len(cats),
        "label_divisor": 1 << 24,
        "void_label": VOID_LABEL,
        "num_records": len(rows),
        "shards": shards,
    }
    (split / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


class PngPredictor:
    """A picklable ``predict``: reads each record's predicted PNG of the oracle case."""

    def __init__(self, pred_json: Path, pred_folder: Path):
        self.anns = {str(a["image_id"]): a for a in load_json(pred_json, "pred")["annotations"]}
        self.folder = pred_folder

    def __call__(self, records: list[dict]) -> list[dict]:
        out = []
        for r in records:
            ann = self.anns[r["record_id"]]
            ids = read_id_png(self.folder / ann["file_name"])
            out.append({"label_map": np.where(ids == 0, VOID_LABEL, ids), "segments": ann["segments_info"]})
        return out


def test_prepared_split_on_ray_reproduces_the_oracle(
    ray_session, pq_oracle_dir: Path, tmp_path: Path
) -> None:
    case = _case(pq_oracle_dir)
    data = _write_prepared(case, tmp_path / "prepared")
    expected = json.loads((pq_oracle_dir / "random_small" / "expected.json").read_text())["chunks_2"]
    r = evaluate_prepared(data, "val", PngPredictor(case[2], case[3]), chunks=2)
    files = evaluate_files(*case, chunks=2)
    assert r["pq"]["All"] == expected["All"] and r["pq"]["Things"] == expected["Things"]
    assert r["pq"] == files["pq"] and r["miou"] == files["miou"] and r["ap"] == files["ap"]
    if not ray_session.cluster_resources().get("GPU"):  # --gpu on a cluster without one: refused, no wait
        with pytest.raises(ValueError, match="--gpu: this Ray cluster has no GPU"):
            evaluate_prepared(data, "val", PngPredictor(case[2], case[3]), gpus_per_task=1.0)


def test_reduction_is_independent_of_arrival_order(pq_oracle_dir: Path) -> None:
    gt_json, gt_dir, pred_json, pred_dir = _case(pq_oracle_dir, "edges")
    gt, pred = load_json(gt_json, "gt"), load_json(pred_json, "pred")
    spec = EvalSpec(gt["categories"], chunks=1)
    stats = [
        image_eval_stats(
            spec,
            p.index,
            p.image_id,
            read_id_png(p.gt_png),
            p.gt_segments,
            {"label_map": read_id_png(p.pred_png), "segments": p.pred_segments},
            void_label=0,
        )
        for p in pair_annotations(gt, gt_dir, pred, pred_dir)
    ]
    fwd, back = reduce_eval_stats(spec, stats), reduce_eval_stats(spec, stats[::-1])
    assert fwd == back and fwd["pq"] == pq_compute_files(gt_json, gt_dir, pred_json, pred_dir, chunks=1)
    # Edges case by hand: the banner (stuff, class 2) is only predicted, so its IoU is 0.
    assert fwd["miou"]["per_class"][2] == 0.0 and fwd["miou"]["per_class"][0] > 0.5


def test_cli_files_mode_and_errors(ray_session, pq_oracle_dir: Path, tmp_path: Path, capsys) -> None:
    case = [str(p) for p in _case(pq_oracle_dir, "edges")]
    out = tmp_path / "result.json"
    argv = [
        "evaluate",
        "--gt-json",
        case[0],
        "--gt-folder",
        case[1],
        "--pred-json",
        case[2],
        "--pred-folder",
        case[3],
        "--chunks",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "Things" in capsys.readouterr().out
    written = json.loads(out.read_text())
    expected = json.loads((pq_oracle_dir / "edges" / "expected.json").read_text())["chunks_2"]
    assert (
        written["pq"]["All"] == expected["All"]
        and written["pq"]["per_class"]["187"] == expected["per_class"]["187"]
    )

    assert main(["evaluate", "--gt-json", case[0]]) == 2
    assert "missing --gt-folder --pred-json --pred-folder" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", "x.pt"]) == 2
    assert "--checkpoint needs --data" in capsys.readouterr().err
    written_metrics = written["metrics"]  # named as training logs them
    assert written_metrics["eval/pq_all"] == 100 * expected["All"]["pq"]
    bad = tmp_path / "pred.json"
    data = json.loads(Path(case[2]).read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 999
    bad.write_text(json.dumps(data))
    assert main(argv[:5] + ["--pred-json", str(bad)] + argv[7:]) == 1
    assert "image 1" in (err := capsys.readouterr().err) and "unknown category_id 999" in err
    assert "Traceback" not in err  # the task's own error, not Ray's wrapper


def test_given_semantic_and_postprocess_instances_are_used() -> None:
    """8x8 image: stuff (category 10, class 0) around a 4x4 thing (category 1, class 1) at rows/cols 2-5.
    The semantic prediction misses the thing's first row: class 1 IoU 12/16, class 0 IoU 48/52. The
    instances come in the kmax_model.postprocess.instance_inference layout (torch tensors)."""
    import torch

    cats = [{"id": 1, "isthing": 1, "class_id": 1}, {"id": 10, "isthing": 0, "class_id": 0}]
    spec = EvalSpec(cats, chunks=1)
    label = np.zeros((8, 8), dtype=np.int32)
    label[2:6, 2:6] = 1 * 256 + 1
    segs = [
        {"id": 0, "class_id": 0, "iscrowd": 0, "area": 48},
        {"id": 257, "class_id": 1, "iscrowd": 0, "area": 16},
    ]
    semantic = (label > 0).astype(np.int64)
    semantic[2] = 0
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True  # the right instance, high score
    masks[1, 0:2, 0:2] = True  # a wrong one, low score
    instances = {"masks": masks, "scores": torch.tensor([0.9, 0.2]), "class_ids": torch.tensor([1, 1])}
    pred = {
        "label_map": label,
        "segments": [{"id": 0, "class_id": 0}, {"id": 257, "class_id": 1}],
        "semantic": semantic,
        "instances": instances,
    }
    r = reduce_eval_stats(spec, [image_eval_stats(spec, 0, "img", label, segs, pred)])
    assert r["pq"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert r["miou"]["per_class"] == {0: 48 / 52, 1: 0.75}
    assert r["ap"]["AP"] == pytest.approx(1.0)  # the wrong instance ranks below the only true positive
    assert eval_metrics(r)["eval/miou"] == pytest.approx(100 * (48 / 52 + 0.75) / 2)
