"""pq_compute_files in worker processes: bit-identical to one process for every chunk count, bad inputs
reach the caller as the serial PQInputError, any way of calling it works (serially, with one warning, where
workers cannot start safely), and the one PNG colour -> id decoder."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.panoptic import png_segment_ids, rgb2id
from pipeline.eval import pq_files
from pipeline.eval.pq import PQInputError
from pipeline.eval.pq_files import pq_compute_files, read_id_png

CASES = ("edges", "random_small", "coco_sample")
REPO = Path(__file__).resolve().parents[1]
IMAGES = 6
"""Images of the tiny case the ways of calling run on: a few, so that each way takes about a second."""


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


CALLER = """\
import json
from pipeline.eval import pq_files
here = []
def counting(pair, categories, inner=pq_files.file_pair_stats):
    here.append(pair.index)
    return inner(pair, categories)
pq_files.file_pair_stats = counting  # counts the images computed in this process
result = pq_files.pq_compute_files(ARGS)
print(json.dumps(result, sort_keys=True))
print(len(here))
"""
"""The caller's code: the default workers and chunks; prints the result's JSON and the images done here."""

KERNEL = """\
import code, sys, types
main = types.ModuleType("__main__")  # as a notebook kernel's user module: no __file__, no __spec__
sys.modules["__main__"] = main
code.InteractiveInterpreter(vars(main)).runcode(compile(sys.stdin.read(), "<cell>", "exec"))
"""

AT_EXIT = """\
import atexit
import pipeline.eval.pq_files  # imported before exit, as a script calling it at exit has it
def cell():
BODY
atexit.register(cell)
"""

# way: (what script.py holds, or None for no file; the interpreter's arguments; its stdin), where CODE is
# CALLER and BODY is CALLER indented one level
WAYS = {
    "script": ("CODE", ["script.py"], ""),
    "guarded script": ('if __name__ == "__main__":\nBODY', ["script.py"], ""),
    "stdin": (None, ["-"], "CODE"),
    "notebook": (KERNEL, ["script.py"], "CODE"),
    "command": (None, ["-c", "CODE"], ""),
    "atexit": (AT_EXIT, ["script.py"], ""),
}
SERIAL_WAYS = {
    "script": 'outside an `if __name__ == "__main__":` block',
    "stdin": "from <stdin>, which is not a readable Python file",
    "atexit": "cannot schedule new futures after interpreter shutdown",
}
"""The ways where workers cannot start (safely), with what their one warning says."""


def _tiny_case(src: Path, dst: Path) -> tuple:
    """The first IMAGES images of an oracle case, JSONs and PNGs written under ``dst``."""
    ids = {a["image_id"] for a in json.loads((src / "gt.json").read_text())["annotations"][:IMAGES]}
    for side in ("gt", "pred"):
        data = json.loads((src / f"{side}.json").read_text())
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        (dst / side).mkdir(parents=True)
        for ann in data["annotations"]:
            shutil.copy(src / side / ann["file_name"], dst / side)
        (dst / f"{side}.json").write_text(json.dumps(data))
    return _files(dst)


def _call_as(way: str, args: tuple, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run CALLER on ``args`` the given way in a fresh interpreter from the repository root."""
    code = CALLER.replace("ARGS", ", ".join(repr(str(a)) for a in args))
    body = textwrap.indent(code, "    ")
    file_text, argv, stdin = WAYS[way]

    def fill(text: str) -> str:
        return text.replace("CODE", code).replace("BODY", body)

    if file_text is not None:
        (tmp_path / "script.py").write_text(fill(file_text))
    argv = [str(tmp_path / a) if a == "script.py" else fill(a) for a in argv]
    return subprocess.run(
        [sys.executable, *argv], input=fill(stdin), capture_output=True, text=True, cwd=REPO, timeout=120
    )


def _first_slice(images: int, processes: int) -> int:
    """How many images this process computes itself when ``processes`` share ``images``."""
    return len(np.array_split(range(images), processes)[0])


@pytest.mark.parametrize("way", WAYS)
def test_every_way_of_calling_gives_the_serial_result(pq_oracle_dir: Path, tmp_path: Path, way: str) -> None:
    """Default workers from an unguarded script, stdin, a notebook-like kernel, ``-c``, a guarded script and
    an atexit handler: exit 0 and the serial result's JSON exactly; workers where they start safely, else
    every image here after exactly one warning that names why."""
    args = _tiny_case(pq_oracle_dir / "random_small", tmp_path / "case")
    serial = json.dumps(pq_compute_files(*args, workers=1), sort_keys=True)
    done = _call_as(way, args, tmp_path)
    assert done.returncode == 0, done.stderr
    result, here = done.stdout.splitlines()
    assert result == serial
    warned = [line for line in done.stderr.splitlines() if "RuntimeWarning" in line]
    processes = min(os.cpu_count() or 1, IMAGES)
    if way in SERIAL_WAYS and processes > 1:
        assert len(warned) == 1 and "pq_compute_files computes serially: " in warned[0], done.stderr
        assert SERIAL_WAYS[way] in warned[0] and int(here) == IMAGES
    else:
        assert warned == [], done.stderr
        assert int(here) == _first_slice(IMAGES, processes)


def _unguarded_main(monkeypatch, caller: Path) -> dict:
    """``__main__`` becomes the script ``caller``; returns the namespace its top-level code runs in."""
    main = types.ModuleType("__main__")
    main.__file__ = str(caller)
    monkeypatch.setitem(sys.modules, "__main__", main)
    return vars(main)


def _daemonic(monkeypatch, caller: Path) -> dict:
    """This process becomes daemonic, as a multiprocessing.Pool worker is; ``caller`` runs in a new dict."""
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    return {}


UNSAFE = [
    (_unguarded_main, "up to this call (line 1), which is outside"),
    (_daemonic, "this process is daemonic"),
]


@pytest.mark.parametrize(("unsafe", "why"), UNSAFE, ids=["unguarded main", "daemonic"])
def test_unsafe_workers_fall_back_to_serial_with_one_warning(
    pq_oracle_dir: Path, tmp_path: Path, monkeypatch, unsafe, why: str
) -> None:
    args = _tiny_case(pq_oracle_dir / "random_small", tmp_path / "case")
    serial = pq_compute_files(*args, workers=1)
    caller = tmp_path / "unguarded.py"
    caller.write_text("result = pq_compute_files(*args, workers=3)\n")
    namespace = unsafe(monkeypatch, caller)
    namespace.update(pq_compute_files=pq_compute_files, args=args)
    here = _Counting(pq_files.file_pair_stats)
    monkeypatch.setattr(pq_files, "file_pair_stats", here)
    with pytest.warns(RuntimeWarning) as warned:
        exec(compile(caller.read_text(), str(caller), "exec"), namespace)
    assert namespace["result"] == serial and here.calls == IMAGES
    assert len(warned) == 1 and why in str(warned[0].message), [str(w.message) for w in warned]


def test_workers_that_die_fall_back_to_serial_with_one_warning(
    pq_oracle_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Each worker exits in its initializer (as if killed at start): BrokenProcessPool becomes one warning
    and the serial result."""
    args = _tiny_case(pq_oracle_dir / "random_small", tmp_path / "case")
    serial = pq_compute_files(*args, workers=1)
    monkeypatch.setattr(pq_files, "_tune_worker_malloc", functools.partial(os._exit, 3))
    with pytest.warns(RuntimeWarning) as warned:
        assert pq_compute_files(*args, workers=3) == serial
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert "its worker processes failed: A process in the process pool was terminated abruptly" in str(
        warned[0].message
    )


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
