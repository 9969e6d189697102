"""The order in which training workers see the records: a seeded permutation per epoch, computed before
anything is read or decoded.

A split's rows are cut into *units*: a Parquet row group (`pipeline.data.records.ROW_GROUP_SIZE` rows), or an
equal slice of one when a small split has too few groups for every worker to get several (a split smaller
than ``data.min_epoch_rows`` is repeated ``passes`` times per epoch; each copy is a unit of its own, augmented
as its own epoch). Epoch ``e``:

1. the units are permuted with ``default_rng([seed, e])`` and dealt out round-robin: worker ``r`` of ``W``
   takes permuted positions ``r, r + W, ...``, so every unit (every record of every pass) goes to exactly
   one worker;
2. each worker cuts its units into windows of about ``window_rows`` rows and permutes the rows inside each
   window with ``default_rng([seed, e, r, window])`` (a unit is read whole, so rows only mix within a
   window: the reads stay row-group sized);
3. every worker stops after the same number of batches (the fewest any worker has), as ``drop_last``: the
   few rows past it are not seen that epoch (at most one unit's imbalance plus a batch per worker).

Everything is a function of (seed, epoch, rank, world, split layout), so the same seed repeats the same
order, two epochs differ, and a worker resuming at micro-batch ``m`` knows which windows it has consumed
without reading them (`EpochOrder.windows` after `skip`). Pure: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MIN_UNITS_PER_WORKER = 4
"""A small split is sliced finer until every worker gets at least this many units per epoch."""


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of row group ``group`` of shard ``shard``, in pass ``copy`` of the epoch."""

    shard: int
    group: int
    start: int
    stop: int
    copy: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_units(group_rows: Sequence[Sequence[int]], passes: int, world: int) -> list[Unit]:
    """The units of a split: ``group_rows[s][g]`` rows in row group ``g`` of shard ``s``, ``passes`` copies;
    row groups are sliced into equal parts when there are fewer than ``MIN_UNITS_PER_WORKER * world``."""
    groups = [(s, g, n) for s, sizes in enumerate(group_rows) for g, n in enumerate(sizes) if n > 0]
    if not groups:
        raise ValueError("the training split has no records")
    slices = max(1, -(-MIN_UNITS_PER_WORKER * world // (len(groups) * passes)))
    units = []
    for copy in range(passes):
        for s, g, n in groups:
            bounds = np.linspace(0, n, min(slices, n) + 1).round().astype(int)
            units += [Unit(s, g, int(a), int(b), copy) for a, b in zip(bounds[:-1], bounds[1:])]
    return units


@dataclass(frozen=True)
class Window:
    """One window of a worker's epoch: its units (read whole) and the order of their concatenated rows."""

    index: int
    units: tuple[Unit, ...]
    order: np.ndarray  # int64 [rows]: positions in the concatenation of the units' rows


class EpochOrder:
    """The data order of one run (see the module docstring).

    Args:
        units: `split_units` of the split.
        world: number of workers; batch_size: rows per micro-batch; seed: the data-order seed.
        window_rows: rows permuted together inside a worker's epoch (0: no shuffle at all, the stored order
            dealt out round-robin by unit).
    """

    def __init__(self, units: Sequence[Unit], world: int, batch_size: int, seed: int, window_rows: int):
        if batch_size < 1 or world < 1:
            raise ValueError(f"batch_size and world must be >= 1, got {batch_size}, {world}")
        self.units, self.world, self.batch_size = list(units), world, batch_size
        self.seed, self.window_rows = seed, window_rows

    def worker_units(self, epoch: int, rank: int) -> list[Unit]:
        """The units worker ``rank`` reads in epoch ``epoch``, in order."""
        if self.window_rows == 0:
            return self.units[rank :: self.world]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in perm[rank :: self.world]]

    def batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches every worker takes in ``epoch``: the fewest any worker's rows hold."""
        rows = min(sum(u.rows for u in self.worker_units(epoch, r)) for r in range(self.world))
        return rows // self.batch_size

    def windows(self, epoch: int, rank: int, skip_rows: int = 0) -> Iterator[tuple[Window, int]]:
        """The worker's windows of the epoch, each with how many of its first rows to skip: windows
        entirely within the first ``skip_rows`` rows are not produced at all (nothing of them is read)."""
        units = self.worker_units(epoch, rank)
        seen = 0
        for index, members in enumerate(self._cut(units)):
            rows = sum(u.rows for u in members)
            if seen + rows <= skip_rows:
                seen += rows
                continue
            yield self._window(epoch, rank, index, members, rows), max(0, skip_rows - seen)
            seen += rows

    def _cut(self, units: list[Unit]) -> list[tuple[Unit, ...]]:
        """Consecutive units grouped until each group holds at least ``window_rows`` rows (one unit each
        without shuffling)."""
        groups, current, rows = [], [], 0
        for unit in units:
            current.append(unit)
            rows += unit.rows
            if rows >= max(1, self.window_rows):
                groups.append(tuple(current))
                current, rows = [], 0
        if current:
            groups.append(tuple(current))
        return groups

    def _window(self, epoch: int, rank: int, index: int, members: tuple[Unit, ...], rows: int) -> Window:
        if self.window_rows == 0:
            return Window(index, members, np.arange(rows))
        order = np.random.default_rng([self.seed, epoch, rank, index]).permutation(rows)
        return Window(index, members, order)
