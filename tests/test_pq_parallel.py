"""pq_compute_files in worker processes: bit-identical to one process for every chunk count, bad inputs
reach the caller as the serial PQInputError, and the one PNG colour -> id decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.panoptic import png_segment_ids, rgb2id
from pipeline.eval import pq_files
from pipeline.eval.pq import PQInputError
from pipeline.eval.pq_files import pq_compute_files, read_id_png

CASES = ("edges", "random_small", "coco_sample")


def _files(case_dir: Path) -> tuple:
    return case_dir / "gt.json", case_dir / "gt", case_dir / "pred.json", case_dir / "pred"


class _Counting:
    """Stands for file_pair_stats in this process: counts the images computed here."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_workers_equal_one_process_and_the_oracle(pq_oracle_dir: Path, case: str, monkeypatch) -> None:
    d = pq_oracle_dir / case
    expected = json.loads((d / "expected.json").read_text())
    assert expected, f"{case}: no oracle results"
    for key, exp in expected.items():
        chunks = int(key.removeprefix("chunks_"))
        one = pq_compute_files(*_files(d), chunks=chunks, workers=1)
        # The oracle's layout with int category keys; == compares every float bit for bit.
        assert one == {**exp, "per_class": {int(c): v for c, v in exp["per_class"].items()}}, key
        images = len(json.loads((d / "gt.json").read_text())["annotations"])
        for workers in (2, 3):
            with monkeypatch.context() as m:
                # Workers import this module afresh: only the first slice is computed in this process.
                here = _Counting(pq_files.file_pair_stats)
                m.setattr(pq_files, "file_pair_stats", here)
                assert pq_compute_files(*_files(d), chunks=chunks, workers=workers) == one, (key, workers)
            assert here.calls == len(np.array_split(range(images), min(workers, images))[0]), (key, workers)


def test_bad_prediction_in_a_worker_raises_the_serial_error(pq_oracle_dir: Path, tmp_path: Path) -> None:
    """random_small: prediction 0030.png (image id 31) is in the second of 2 slices; the error names it, as
    the serial path does, with no remote traceback attached."""
    d = tmp_path / "case"
    shutil.copytree(pq_oracle_dir / "random_small", d)
    pred = json.loads((d / "pred.json").read_text())
    ann = pred["annotations"][30]
    seg = ann["segments_info"][0]
    seg["category_id"] = 4242
    (d / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(PQInputError) as serial:
        pq_compute_files(*_files(d), chunks=1, workers=1)
    with pytest.raises(PQInputError) as parallel:
        pq_compute_files(*_files(d), chunks=1, workers=2)
    message = str(parallel.value)
    assert type(parallel.value) is PQInputError and message == str(serial.value)
    assert f"image {ann['image_id']!r}" in message and ann["file_name"] in message
    assert f"segment id {seg['id']} has unknown category_id 4242" in message
    assert parallel.value.__cause__ is None and "RemoteTraceback" not in str(parallel.getrepr())


def test_first_bad_image_wins_across_workers(pq_oracle_dir: Path, tmp_path: Path) -> None:
    """Two missing PNGs, in the first and the last of 3 slices: the earlier one in GT order is reported, as
    serially."""
    d = tmp_path / "case"
    shutil.copytree(pq_oracle_dir / "random_small", d)
    anns = json.loads((d / "pred.json").read_text())["annotations"]  # in GT order
    for i in (35, 5):
        (d / "pred" / anns[i]["file_name"]).unlink()
    with pytest.raises(PQInputError) as serial:
        pq_compute_files(*_files(d), chunks=1, workers=1)
    with pytest.raises(PQInputError) as parallel:
        pq_compute_files(*_files(d), chunks=1, workers=3)
    assert str(parallel.value) == str(serial.value)
    assert f"{anns[5]['file_name']} does not exist" in str(serial.value)


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_below_one_are_refused(pq_oracle_dir: Path, workers: int) -> None:
    with pytest.raises(ValueError, match=f"workers must be >= 1.*got {workers}"):
        pq_compute_files(*_files(pq_oracle_dir / "edges"), chunks=1, workers=workers)
    with pytest.raises(TypeError, match="workers must be an integer"):
        pq_compute_files(*_files(pq_oracle_dir / "edges"), chunks=1, workers=1.5)


def test_id_decoder_hand_computed(tmp_path: Path) -> None:
    """R=1, G=2, B=3 -> 1 + 2*256 + 3*65536; white is the largest 24-bit id; alpha never enters the id."""
    rgb = np.array([[[1, 2, 3], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    expected = np.array([[1 + 2 * 256 + 3 * 65536, 2**24 - 1, 0]], dtype=np.int32)
    for ids in (rgb2id(rgb), png_segment_ids(Image.fromarray(rgb))):
        assert ids.dtype == np.int32 and np.array_equal(ids, expected)
    rgba = np.concatenate([rgb, np.full((1, 3, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(png_segment_ids(Image.fromarray(rgba)), expected)
    Image.fromarray(rgb).save(tmp_path / "ids.png")
    assert np.array_equal(read_id_png(tmp_path / "ids.png"), expected)


def test_id_decoder_on_real_pngs(pq_oracle_dir: Path) -> None:
    """Every oracle PNG decodes to the int64 sum R + 256 G + 65536 B (the old per-channel formula)."""
    pngs = sorted(pq_oracle_dir.rglob("*.png"))
    assert pngs
    for png in pngs:
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
        reference = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert np.array_equal(read_id_png(png), reference), png
