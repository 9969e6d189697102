"""The training batches of one Ray Train worker, read straight from the prepared split in its data order.

`MicroBatches` follows `pipeline.train.data_order.EpochOrder`: for each window of the worker's epoch it
reads the window's units (whole row groups, or slices of them, from a path or a storage URI), takes the
rows in the window's permuted order, and decodes, augments (pipeline.data.augment) and builds the targets
(pipeline.data.targets) of each micro-batch through `AugmentCollate`, in a background thread that keeps
`PREFETCH_BATCHES` ready while the step runs. It can start at any micro-batch: the windows consumed before
it are skipped without being read, and the consumed rows of the window it starts in without being decoded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import AugmentConfig
from pipeline.data.augment import augment_rows
from pipeline.data.records import PASS_COLUMN, RECORD_FIELDS, open_shard
from pipeline.data.targets import collate_augmented
from pipeline.train.data_order import EpochOrder, Unit, Window

PREFETCH_BATCHES = 2
"""Batches prepared ahead of the training step (augmentation overlaps the step)."""


class AugmentCollate:
    """Stored rows (a numpy batch of `RECORD_SCHEMA` columns, optionally with the pass column) ->
    ``{"images": float [B, 3, H, W], "targets": list[Target]}``. The augmentation is seeded by (seed, epoch,
    record) (``passes``: see augment_rows), so make one per epoch."""

    def __init__(self, cfg: AugmentConfig, epoch: int = 0, passes: int = 1, input_targets: bool = False):
        self.cfg, self.epoch, self.passes, self.input_targets = cfg, epoch, passes, input_targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = augment_rows(batch, self.cfg, self.epoch, self.passes, self.input_targets)
        return collate_augmented(rows, self.cfg.crowd_as_ignore)


class ShardReader:
    """Reads units of a split's shards, keeping each shard open and the last row group read (slices of one
    group are often consecutive)."""

    def __init__(self, shards: Sequence[str]):
        self.shards = list(shards)
        self._files: dict[int, object] = {}
        self._last: tuple[tuple[int, int], pa.Table] | None = None

    def read(self, unit: Unit) -> pa.Table:
        key = (unit.shard, unit.group)
        if self._last is None or self._last[0] != key:
            if unit.shard not in self._files:
                self._files[unit.shard] = open_shard(self.shards[unit.shard])
            table = self._files[unit.shard].read_row_group(unit.group, columns=list(RECORD_FIELDS))
            self._last = (key, table)
        table = self._last[1].slice(unit.start, unit.rows)
        return table.append_column(PASS_COLUMN, pa.array(np.full(unit.rows, unit.copy, np.int32)))


def window_rows(reader: ShardReader, window: Window, skip: int) -> pa.Table:
    """The window's rows in its order, without the first ``skip`` (never decoded)."""
    table = pa.concat_tables([reader.read(u) for u in window.units])
    return table.take(pa.array(window.order[skip:]))


class MicroBatches:
    """Endless micro-batches of one worker, epoch by epoch, starting at micro-batch ``start``.

    Args:
        shards: the split's shard locations; order: the run's `EpochOrder`; rank: this worker.
        augment: the augmentation; passes: copies of a small split per epoch; input_targets: targets at
            input resolution too (``loss.mask_loss_at = "input"``).
    Micro-batch ``m`` is batch ``m - first(e)`` of epoch ``e``, where ``first(e)`` counts the batches of
    the epochs before. ``wait_s`` accumulates the time the step waited for data; ``epoch`` is the current
    epoch. Call ``close()`` to stop the reading thread.
    """

    def __init__(self, shards, order: EpochOrder, rank: int, augment: AugmentConfig, start: int = 0,
                 passes: int = 1, input_targets: bool = False):  # fmt: skip
        self.order, self.rank, self.augment = order, rank, augment
        self.passes, self.input_targets = passes, input_targets
        self.reader = ShardReader(shards)
        self.epoch, skip = self._locate(start)
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self.epoch, skip), daemon=True)
        self._thread.start()

    def _locate(self, start: int) -> tuple[int, int]:
        """(epoch, batches of it already consumed) of micro-batch ``start``."""
        epoch = 0
        while start >= (per_epoch := self.order.batches_per_epoch(epoch)):
            if per_epoch == 0:
                raise ValueError("an epoch holds no batch: fewer training records than workers x batch size")
            start -= per_epoch
            epoch += 1
        return epoch, start

    def _epoch_batches(self, epoch: int, skip_batches: int) -> Iterator[dict]:
        """The rows of the worker's epoch after ``skip_batches`` batches, cut into numpy batches."""
        size = self.order.batch_size
        left = self.order.batches_per_epoch(epoch) - skip_batches
        pending: pa.Table | None = None
        for window, skip in self.order.windows(epoch, self.rank, skip_batches * size):
            rows = window_rows(self.reader, window, skip)
            pending = rows if pending is None else pa.concat_tables([pending, rows])
            while pending.num_rows >= size and left > 0:
                yield {k: np.asarray(v, dtype=object) for k, v in pending.slice(0, size).to_pydict().items()}
                pending, left = pending.slice(size), left - 1
            if left == 0:
                return

    def _fill(self, epoch: int, skip: int) -> None:
        """The reading thread: decode and augment batch after batch into the queue, epoch after epoch."""
        try:
            while not self._stop.is_set():
                collate = AugmentCollate(self.augment, epoch, self.passes, self.input_targets)
                for batch in self._epoch_batches(epoch, skip):
                    self._put((epoch, collate(batch)))
                    if self._stop.is_set():
                        return
                epoch, skip = epoch + 1, 0
        except BaseException as exc:  # surfaced on the training thread by __call__
            self._put((None, exc))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def __call__(self) -> dict:
        """The next micro-batch: {"images", "targets"}."""
        t0 = time.perf_counter()
        epoch, batch = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if epoch is None:
            raise batch
        self.epoch = epoch
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
