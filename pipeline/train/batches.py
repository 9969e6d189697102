"""The training batches of one Ray Train worker: its shard of the stored records, augmented in the worker.

`AugmentCollate` decodes, augments (pipeline.data.augment) and builds the targets (pipeline.data.targets) of
each batch inside ``iter_torch_batches``; `MicroBatches` turns the shard into an endless stream of
micro-batches that can start at any micro-batch index, which is what makes resuming exact.
"""

from __future__ import annotations

import time

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.config import AugmentConfig
from pipeline.data.augment import augment_rows
from pipeline.data.targets import collate_augmented

PREFETCH_BATCHES = 2
"""Batches Ray Data prepares ahead of the training step (augmentation overlaps the step)."""


class AugmentCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=AugmentCollate(cfg, epoch, passes, input_targets))`` over stored
    records -> ``{"images": float [B, 3, H, W], "targets": list[Target]}``. Make a new instance per epoch:
    the augmentation is seeded by (seed, epoch, record) (``passes``: see augment_rows)."""

    def __init__(self, cfg: AugmentConfig, epoch: int = 0, passes: int = 1, input_targets: bool = False):
        self.cfg, self.epoch, self.passes, self.input_targets = cfg, epoch, passes, input_targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = augment_rows(batch, self.cfg, self.epoch, self.passes, self.input_targets)
        return collate_augmented(rows, self.cfg.crowd_as_ignore)


class MicroBatches:
    """Endless micro-batches of a worker's dataset shard, epoch by epoch, starting at micro-batch ``start``.

    ``batches_per_epoch`` is fixed (rows per worker // batch size, drop_last), so micro-batch ``m`` is
    (epoch ``m // batches_per_epoch``, index ``m % batches_per_epoch``): a resumed run replays the part of
    its epoch consumed before the checkpoint and continues exactly. ``wait_s`` accumulates the time spent
    waiting for data (the loop reports it as a fraction of the step).
    """

    def __init__(
        self,
        shard,
        augment: AugmentConfig,
        batch_size: int,
        batches_per_epoch: int,
        start: int = 0,
        passes: int = 1,
        input_targets: bool = False,
    ):
        self.shard, self.augment, self.batch_size = shard, augment, batch_size
        self.passes, self.input_targets, self.per_epoch = passes, input_targets, batches_per_epoch
        self.epoch, skip = divmod(start, batches_per_epoch)
        self._iter = self._epoch_iter()
        for _ in range(skip):
            next(self._iter)
        self.wait_s = 0.0

    def _epoch_iter(self):
        collate = AugmentCollate(self.augment, self.epoch, self.passes, self.input_targets)
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=collate, drop_last=True, prefetch_batches=PREFETCH_BATCHES
        )
        for count, batch in enumerate(batches):
            if count < self.per_epoch:  # past it: drain, streaming_split needs every consumer to finish
                yield batch

    def __call__(self) -> dict:
        """The next micro-batch (a new epoch starts when this one is used up)."""
        t0 = time.perf_counter()
        while True:
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                self.epoch += 1
                self._iter = self._epoch_iter()
        self.wait_s += time.perf_counter() - t0
        return batch
