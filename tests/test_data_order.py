"""The training data order (pipeline.train.data_order) and the batches read in it (pipeline.train.batches):
a seeded permutation per epoch, every record once per epoch across the workers, and a resume that skips the
consumed records without reading or decoding them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.train import batches as batches_module
from pipeline.train.data_order import EpochOrder, Unit, split_units

LAYOUT = [[64, 64, 10], [64, 30]]  # rows of the row groups of two shards: 232 records


def _records(order: EpochOrder, epoch: int, rank: int) -> list[tuple]:
    """(shard, group, row, copy) of every row the worker reads in the epoch, in order."""
    out = []
    for window, skip in order.windows(epoch, rank):
        rows = [(u.shard, u.group, r, u.copy) for u in window.units for r in range(u.start, u.stop)]
        out += [rows[i] for i in window.order[skip:]]
    return out


def test_units_cover_every_row_once_and_small_splits_are_sliced():
    units = split_units(LAYOUT, passes=1, world=2)  # 5 groups < 4 per worker x 2 workers: sliced
    assert sum(u.rows for u in units) == 232 and len(units) == 10  # each group cut in 2
    assert units[0] == Unit(0, 0, 0, 32) and units[1] == Unit(0, 0, 32, 64)
    small = split_units([[8]], passes=3, world=2)  # 1 group x 3 passes: sliced 3-ways (ceil(8 / 3))
    assert [(u.start, u.stop, u.copy) for u in small] == [(0, 3, 0), (3, 5, 0), (5, 8, 0)] + [
        (a, b, c) for c in (1, 2) for a, b in ((0, 3), (3, 5), (5, 8))
    ]
    assert len(split_units([[64] * 20], passes=1, world=2)) == 20  # enough groups: not sliced
    with pytest.raises(ValueError, match="no records"):
        split_units([[0]], 1, 1)


def test_epochs_differ_seeds_repeat_and_every_record_is_read_once_per_epoch():
    order = EpochOrder(split_units(LAYOUT, 1, 2), world=2, batch_size=4, seed=7, window_rows=64)
    e0 = [_records(order, 0, r) for r in (0, 1)]
    e1 = [_records(order, 1, r) for r in (0, 1)]
    again = EpochOrder(split_units(LAYOUT, 1, 2), world=2, batch_size=4, seed=7, window_rows=64)
    other = EpochOrder(split_units(LAYOUT, 1, 2), world=2, batch_size=4, seed=8, window_rows=64)
    assert [_records(again, 0, r) for r in (0, 1)] == e0  # the same seed repeats
    assert e1 != e0 and [_records(other, 0, r) for r in (0, 1)] != e0  # epochs and seeds differ
    for epoch in (e0, e1):
        seen = Counter(rec for worker in epoch for rec in worker)
        assert len(seen) == 232 and max(seen.values()) == 1  # every record once across the workers
        per_worker = order.batches_per_epoch(0) * 4
        used = [worker[:per_worker] for worker in epoch]
        # what an epoch uses: equal batches per worker; the rest (the imbalance of one unit) waits a turn
        assert sum(map(len, used)) >= 232 - 32 - 2 * 4
    assert e0[0][:64] != sorted(e0[0][:64])  # rows are shuffled inside a window, not in stored order


def test_resuming_skips_whole_windows_without_reading_them():
    order = EpochOrder(split_units(LAYOUT, 1, 2), world=2, batch_size=4, seed=0, window_rows=64)
    full = _records(order, 0, 1)
    windows = list(order.windows(0, 1, skip_rows=70))
    first, skip = windows[0]
    assert first.index == 1 and skip == 70 - sum(u.rows for u in next(order.windows(0, 1))[0].units)
    resumed = []
    for window, skip in windows:
        rows = [(u.shard, u.group, r, u.copy) for u in window.units for r in range(u.start, u.stop)]
        resumed += [rows[i] for i in window.order[skip:]]
    assert resumed == full[70:]
    plain = EpochOrder(split_units(LAYOUT, 1, 2), 2, 4, 0, window_rows=0)  # no shuffle: stored order
    assert _records(plain, 0, 0)[:5] == [(0, 0, r, 0) for r in range(5)]


@pytest.fixture(scope="module")
def split(ray_session, tmp_path_factory):
    from pipeline.data.records import split_layout
    from pipeline.data.synthetic import make_prepared_synthetic

    data = make_prepared_synthetic(tmp_path_factory.mktemp("order"), train=12, val=2, height=48, width=48)
    return split_layout(data, "train")


def _micro_batches(split, start: int, passes: int = 1):
    shards, layout = split
    order = EpochOrder(split_units(layout, passes, 2), world=2, batch_size=2, seed=3, window_rows=8)
    augment = AugmentConfig(crop_size=33, min_scale=0.75, max_scale=1.25, seed=3)
    return batches_module.MicroBatches(shards, order, 1, augment, start=start, passes=passes), order


def test_a_resumed_worker_gets_the_same_batches_and_decodes_nothing_it_skips(split, monkeypatch):
    """Micro-batch 7 of a worker started at 0 == micro-batch 0 of a worker resumed at 7 (epoch 1, past
    whole windows), and the resumed one decodes only what it returns."""
    straight, order = _micro_batches(split, 0, passes=2)
    per_epoch = order.batches_per_epoch(0)
    expected = [straight() for _ in range(9)]
    straight.close()
    decoded: list[int] = []
    real = batches_module.augment_rows
    monkeypatch.setattr(
        batches_module, "augment_rows", lambda b, *a, **k: decoded.append(len(b["image"])) or real(b, *a, **k)
    )
    resumed, _ = _micro_batches(split, 7, passes=2)
    got = [resumed() for _ in range(2)]
    resumed.close()
    assert per_epoch < 7 and resumed.epoch == 1
    for a, b in zip(expected[7:], got, strict=True):
        assert torch.equal(a["images"], b["images"])
        assert all(torch.equal(ta[k], tb[k]) for ta, tb in zip(a["targets"], b["targets"]) for k in ta)
    assert sum(decoded) <= (2 + batches_module.PREFETCH_BATCHES + 1) * 2  # nothing of the 7 skipped
    assert not torch.equal(expected[0]["images"], expected[per_epoch]["images"])  # epochs differ
