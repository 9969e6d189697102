"""PQ on COCO panoptic files: ``gt.json`` + PNG folder against ``pred.json`` + PNG folder.

The file-format side of `pipeline.eval.pq`: reading the JSONs, pairing images by ``image_id`` in ground-truth
annotation order (as the official ``pq_compute``), decoding PNG ids (``R + 256 G + 256^2 B``, void = 0, with
`pipeline.data.panoptic.png_segment_ids`) and feeding `pq_image_stats`, in parallel processes (this one and
fork-server workers) that each take a contiguous slice of the images. Errors name the image id and the PNG
file.

`pq_compute_files` may be called any way Python runs code: a script with or without the
``if __name__ == "__main__":`` guard, ``python -c``, ``python -`` (stdin), a notebook, a daemonic process,
an atexit handler. Every worker process re-imports the caller's ``__main__`` module while it starts
(multiprocessing's spawn preparation, which forkserver workers go through too), so workers start only where
that re-import is harmless (`_serial_reason`); elsewhere, and when they fail to start or die, this process
computes every image itself and says why in one RuntimeWarning. The result is the same bit for bit either way.
"""

from __future__ import annotations

import ast
import ctypes
import json
import multiprocessing
import operator
import os
import sys
import tokenize
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.panoptic import png_segment_ids
from pipeline.eval.pq import (
    PNG_VOID_ID,
    Category,
    ImagePQStats,
    PQInputError,
    chunk_bounds,
    normalize_categories,
    pq_image_stats,
    reduce_pq_stats,
)
from pipeline.ray_setup import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

START_METHOD = "forkserver"
"""How worker processes start. Not fork: the caller may have Ray initialised (gRPC and raylet threads) or
torch / OpenMP thread pools running, and a forked child inherits every lock those threads held at the fork,
so it can deadlock (CPython warns about fork in a multi-threaded process from 3.12 and 3.14 makes
forkserver the Linux default). Not spawn: a fresh interpreter per worker re-imports numpy, PIL and this
module on every call. The fork server is one fresh single-threaded process, started on the first parallel
call with this module preloaded (`_start_context`), from which each worker forks in milliseconds with
everything imported."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""


def load_json(obj: Any, what: str) -> dict[str, Any]:
    """A COCO panoptic JSON given as a path or an already loaded dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    path = Path(obj)
    try:
        with path.open() as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PQInputError(f"{what} JSON {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PQInputError(f"{what} JSON {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise PQInputError(f"{what} JSON {path} has no 'annotations' list")
    return data


def read_id_png(path: Path) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG as int32 [H, W]: ``R + 256 G + 256^2 B`` (panopticapi rgb2id).

    Raises PQInputError for a missing or undecodable file and for a PNG that is not 8-bit RGB(A).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                raise PQInputError(
                    f"PNG {path} must be 8-bit RGB (ids as R + 256 G + 256^2 B), got mode {img.mode}"
                )
            return png_segment_ids(img)
    except FileNotFoundError:
        raise PQInputError(f"PNG {path} does not exist") from None
    except OSError as exc:
        raise PQInputError(f"PNG {path} cannot be decoded: {exc}") from None


@dataclass(frozen=True)
class FilePair:
    """One image to evaluate: its position, id and the two PNG paths with their segment lists."""

    index: int
    image_id: Any
    gt_png: Path
    gt_segments: list[dict[str, Any]]
    pred_png: Path
    pred_segments: list[dict[str, Any]]


def pair_annotations(
    gt: dict[str, Any], gt_folder: Any, pred: dict[str, Any], pred_folder: Any
) -> list[FilePair]:
    """Pair every GT annotation (in GT order) with the prediction of the same ``image_id``.

    Raises PQInputError for a GT image without prediction (the official ``Exception``) and for an
    ``image_id`` listed twice on either side (the official tool silently keeps the last prediction).
    Extra predicted images are ignored, as in the official tool.
    """
    preds: dict[Any, dict[str, Any]] = {}
    for ann in pred["annotations"]:
        if ann["image_id"] in preds:
            raise PQInputError(f"prediction JSON lists image id {ann['image_id']!r} twice")
        preds[ann["image_id"]] = ann
    pairs, seen = [], set()
    for i, ann in enumerate(gt["annotations"]):
        image_id = ann["image_id"]
        if image_id in seen:
            raise PQInputError(f"ground-truth JSON lists image id {image_id!r} twice")
        seen.add(image_id)
        if image_id not in preds:
            raise PQInputError(f"no prediction for the image with id {image_id!r} (gt {ann['file_name']})")
        p = preds[image_id]
        pairs.append(
            FilePair(
                index=i,
                image_id=image_id,
                gt_png=Path(gt_folder) / ann["file_name"],
                gt_segments=list(ann["segments_info"]),
                pred_png=Path(pred_folder) / p["file_name"],
                pred_segments=list(p["segments_info"]),
            )
        )
    return pairs


def file_pair_stats(pair: FilePair, categories: Mapping[int, Category]) -> ImagePQStats:
    """Decode both PNGs of one pair and compute its integer statistics."""
    return pq_image_stats(
        read_id_png(pair.gt_png),
        pair.gt_segments,
        read_id_png(pair.pred_png),
        pair.pred_segments,
        categories,
        index=pair.index,
        image_id=pair.image_id,
        void_label=PNG_VOID_ID,
        name=f"image {pair.image_id!r} (prediction {pair.pred_png})",
    )


def check_workers(workers: int | None) -> int:
    """``workers`` as a process count: None gives ``os.cpu_count()``; anything but an integer >= 1 raises."""
    if workers is None:
        return os.cpu_count() or 1
    try:
        count = operator.index(workers)
    except TypeError:
        raise TypeError(f"workers must be an integer >= 1 or None, got {workers!r}") from None
    if count < 1:
        raise ValueError(f"workers must be >= 1 (or None for os.cpu_count()), got {workers!r}")
    return count


def _slice_stats(
    pairs: Sequence[FilePair], categories: Mapping[int, Category]
) -> list[ImagePQStats] | PQInputError:
    """Worker body: the statistics of one contiguous slice of pairs, in order.

    A bad input is RETURNED (the slice's first PQInputError), not raised: the executor would re-raise it
    with a remote-traceback cause attached; returned, it reaches the caller as the very exception the
    serial path raises. Any other exception is a bug and keeps the executor's remote traceback.
    """
    try:
        return [file_pair_stats(p, categories) for p in pairs]
    except PQInputError as exc:
        return exc


def _tune_worker_malloc() -> None:
    """Worker initializer: glibc malloc keeps image-sized buffers in the heap (no-op without glibc mallopt).

    A fresh process starts at glibc's 128 KiB mmap threshold, so each multi-MB array of an image is mmapped,
    page-faulted and unmapped again: measured ~10k page faults and +50% time per Cityscapes-size image in a
    worker, and none in the benchmark's warmed-up caller, where glibc had already raised its thresholds. The
    values are those of the project's Ray workers (pipeline.ray_setup.ALLOCATOR_ENV), set here with mallopt
    (through the environment they would change the calling process's own environment).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def _start_context() -> multiprocessing.context.BaseContext:
    """The START_METHOD context, with this module preloaded into the fork server (kept: ``__main__``).

    The preload only takes effect if the process's (shared) fork server is not running yet; otherwise the
    workers import this module themselves, which is slower but gives the same results. Preloading
    ``__main__`` is safe because workers start only where `_serial_reason` found re-importing it harmless;
    it saves each worker that re-import where CPython has the gh-126631 fix (3.13 and 3.14 updates); older
    fork servers never receive main's path (measured on 3.11.7), so there each worker re-imports it.
    """
    ctx = multiprocessing.get_context(START_METHOD)
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def _main_file_workers_run(main: ModuleType | None) -> str | None:
    """The file every worker runs as ``__mp_main__`` while it starts (multiprocessing.spawn.prepare), or None.

    None where workers import nothing of ``__main__``: it has no ``__file__`` (``python -c``, a REPL, a
    notebook kernel's user module) or is a package's ``__main__`` (``python -m package``).
    """
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if name == "__main__" or name.endswith(".__main__"):
        return None
    return getattr(main, "__file__", None)


def _main_top_level_line(main: ModuleType, path: str) -> int | None:
    """The line of ``path`` that ``__main__``'s top-level code is executing, in any thread, or None.

    None once that code has finished (an atexit handler, a thread outliving it). Frames that run other code
    in main's namespace (``python -i`` input, ``exec`` of a cell) are passed over for the file's own frame.
    """
    for frame in sys._current_frames().values():
        while frame is not None:
            code = frame.f_code
            if code.co_name == "<module>" and code.co_filename == path and frame.f_globals is vars(main):
                return frame.f_lineno
            frame = frame.f_back
    return None


def _in_main_guard(tree: ast.Module, line: int) -> bool:
    """Whether ``line`` lies in the body of an ``if __name__ == "__main__":`` block of ``tree``."""
    guards = ('__name__ == "__main__"', '"__main__" == __name__')
    return any(
        isinstance(node, ast.If)
        and ast.unparse(node.test).replace("'", '"') in guards
        and any(stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno) for stmt in node.body)
        for node in ast.walk(tree)
    )


def _serial_reason() -> str | None:
    """Why worker processes cannot be started safely from the current call, or None when they can.

    Unsafe: a daemonic process (multiprocessing refuses it children); a ``__main__`` file workers would
    re-run but cannot read (``python -``: ``<stdin>``), as each worker would die starting; a call from
    ``__main__``'s top-level code outside the ``if __name__ == "__main__":`` guard, as each worker would
    re-run the caller's script up to this call and die there. A guarded call, and code of a ``__main__``
    without a file, are safe: workers re-run only main's unguarded top level, or nothing of it.
    """
    if multiprocessing.current_process().daemon:
        return "this process is daemonic (e.g. a multiprocessing.Pool worker) and may not start processes"
    main = sys.modules.get("__main__")
    path = _main_file_workers_run(main)
    if main is None or path is None:
        return None
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):  # ValueError: undecodable or NUL bytes (a .pyc)
        return f"worker processes would re-run __main__ from {path}, which is not a readable Python file"
    line = _main_top_level_line(main, path)
    if line is None or _in_main_guard(tree, line):
        return None
    return (
        f"worker processes would re-run {path} up to this call (line {line}), which is outside an"
        ' `if __name__ == "__main__":` block'
    )


def _serial_stats(
    pairs: Sequence[FilePair], categories: Mapping[int, Category], reason: str | None = None
) -> list[ImagePQStats]:
    """The statistics of every pair computed in this process; a ``reason`` is first warned about."""
    if reason is not None:
        # stacklevel 4: this function, pairs_stats, pq_compute_files, its caller
        warnings.warn(f"pq_compute_files computes serially: {reason}", RuntimeWarning, stacklevel=4)
    return [file_pair_stats(p, categories) for p in pairs]


def _submit_slices(
    executor: ProcessPoolExecutor, parts: Sequence[Sequence[FilePair]], categories: Mapping[int, Category]
) -> list[Future]:
    """One future per slice. Submitting starts the worker processes, so any failure to start them (an atexit
    handler: the executor refuses after interpreter shutdown; a fork server that cannot start) is raised as
    BrokenProcessPool, which pairs_stats answers by computing serially."""
    try:
        return [executor.submit(_slice_stats, part, categories) for part in parts]
    except (OSError, EOFError, RuntimeError) as exc:  # BrokenProcessPool is a RuntimeError
        message = " ".join(str(exc).split())  # one line: some of these messages span several
        raise BrokenProcessPool(f"they could not start ({type(exc).__name__}: {message})") from exc


def _parallel_stats(
    pairs: Sequence[FilePair], categories: Mapping[int, Category], processes: int
) -> list[ImagePQStats]:
    """The statistics of every pair by ``processes`` processes (this one and ``processes - 1`` workers).

    Raises BrokenProcessPool when a worker cannot start or dies, and the first bad image's PQInputError.
    """
    first, *rest = [pairs[a:b] for a, b in chunk_bounds(len(pairs), processes)]
    # An executor rather than multiprocessing.Pool: a worker killed (e.g. out of memory) raises
    # BrokenProcessPool here, where a Pool would wait for its result forever.
    executor = ProcessPoolExecutor(len(rest), mp_context=_start_context(), initializer=_tune_worker_malloc)
    try:
        futures = _submit_slices(executor, rest, categories)
        parts = [_slice_stats(first, categories), *(f.result() for f in futures)]
    except BaseException:
        # After an error, do not wait for the other slices (running ones finish in the background).
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    # Every slice is in, so waiting costs only the idle workers' exit. An executor still shutting down when
    # the interpreter exits races CPython 3.11's exit hook, which then prints "Exception ignored ... Bad file
    # descriptor" (seen once in about 40 runs of a script on 3.11.7).
    executor.shutdown(wait=True)
    stats: list[ImagePQStats] = []
    for part in parts:  # in slice order, so the first error met is the first bad image
        if isinstance(part, PQInputError):
            raise part
        stats.extend(part)
    return stats


def pairs_stats(
    pairs: Sequence[FilePair], categories: Mapping[int, Category], workers: int
) -> list[ImagePQStats]:
    """The statistics of every pair, in pair order, computed by ``min(workers, len(pairs))`` processes.

    Each process takes one contiguous slice (``np.array_split`` bounds, as the official tool); this process
    computes the first slice itself while ``workers - 1`` worker processes compute the others (one process
    start fewer, and its warm heap). Where workers cannot start safely (`_serial_reason`), cannot start at all
    or die, this process computes every pair itself after one RuntimeWarning naming why: the same result. A
    PQInputError is raised for the first bad image in pair order, i.e. the one the serial loop would stop
    at, with the serial message and no pool traceback attached.
    """
    processes = min(workers, len(pairs))
    if processes <= 1:
        return _serial_stats(pairs, categories)
    reason = _serial_reason()
    if reason is not None:
        return _serial_stats(pairs, categories, reason)
    try:
        return _parallel_stats(pairs, categories, processes)
    except BrokenProcessPool as exc:
        return _serial_stats(pairs, categories, f"its worker processes failed: {exc}")


def pq_compute_files(
    gt_json: Any,
    gt_folder: Any,
    pred_json: Any,
    pred_folder: Any,
    chunks: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """PQ of COCO panoptic files, equal bit for bit to panopticapi ``pq_compute`` run on ``chunks`` processes.

    Args:
        gt_json, pred_json: paths to (or loaded dicts of) COCO panoptic JSONs; categories come from the GT.
        gt_folder, pred_folder: folders of the PNGs named by each annotation's ``file_name``.
        chunks: the official tool's process count to emulate (None: ``os.cpu_count()``, what it would use
            on this machine). Only the last bits of pq/sq depend on it.
        workers: processes that decode and compute the per-image statistics (None: ``os.cpu_count()``;
            1: this process, no pool), each on a contiguous slice of the images. The result does not
            depend on it: the integer statistics are reduced in image order whatever computed them. Any
            caller works, guard or not: where worker processes cannot start safely (a script calling this
            outside its ``if __name__ == "__main__":`` block, ``python -`` on stdin, a daemonic process) or
            fail, this process computes every image, after one RuntimeWarning that names why. Worker
            processes never run the caller's code beyond what multiprocessing's guard idiom allows.

    Returns:
        The official result dict (see `pipeline.eval.pq.reduce_pq_stats`); per_class keys are int category
        ids.

    Raises:
        PQInputError: malformed JSONs or PNGs (the first bad image in GT order, as without workers).
        ValueError, TypeError: ``workers`` is not an integer >= 1 or None.
    """
    count = check_workers(workers)
    gt = load_json(gt_json, "ground-truth")
    pred = load_json(pred_json, "prediction")
    if "categories" not in gt:
        raise PQInputError("ground-truth JSON has no 'categories'")
    categories = normalize_categories(gt["categories"])
    by_id = {c.id: c for c in categories}
    pairs = pair_annotations(gt, gt_folder, pred, pred_folder)
    return reduce_pq_stats(pairs_stats(pairs, by_id, count), categories, chunks=chunks)
