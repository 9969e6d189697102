"""What rank 0 of a training run reports while it trains, without ever waiting on the tracking server.

Rank 0 runs on whichever node Ray placed it, which may share no disk and no network route to the MLflow
store with the driver (an embedded SQLite file on the head, say). So it talks to neither: it puts events
on the run's `RunChannel`, a Ray actor owned by the driver, fire and forget, and the driver prints and logs
them (pipeline.train.forwarder). Before each checkpoint it writes the steps since the last one to the
metrics journal under the run's storage (pipeline.train.journal) and waits for its events to be delivered,
so a checkpoint covers everything logged up to it. On other ranks every method does nothing, so the loop
calls them unconditionally.

Events (dicts with a "kind"): ``metrics`` {step, time_ms, metrics}, ``progress`` {record} (a line of
pipeline.train.progress), ``artifact`` {name, data: bytes} (figures, small JSON records).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from pipeline.train import journal

AUX_MARK = "_aux"
"""Loss keys of the per-decoder-layer outputs contain this (kmax_model.criterion: ``loss_pq_dice_aux0``)."""


class RunChannel:
    """The events of one run, from rank 0 to the driver (use as a Ray actor: ``ray.remote(RunChannel)``).
    ``put`` appends, ``take`` returns and forgets everything put so far, in order."""

    def __init__(self):
        self._events: list[dict] = []

    def put(self, events: list[dict]) -> int:
        self._events.extend(events)
        return len(self._events)

    def take(self) -> list[dict]:
        events, self._events = self._events, []
        return events


def open_channel():
    """A new `RunChannel` actor on this process's node (no CPU: it only holds events). Pinned here: a
    channel on another node would die with that node, and the driver would lose the run's reports."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunChannel).options(scheduling_strategy=here).remote()


class RunLog:
    """Rank 0's reports of a run; a no-op on other ranks.

    Args:
        channel: the run's `RunChannel` actor handle.
        run_location: the run's storage location (the journal goes under it).
        log_interval: every step reports the total, each final-layer loss, lr and throughput; the per-layer
            (``_aux``) terms, 30 of the tiny model's 45 series, and a progress line every this many steps.
        active: False on ranks other than 0.
    """

    def __init__(self, channel, run_location: str, log_interval: int, active: bool):
        self.channel, self.location = channel, run_location
        self.log_interval, self.active = log_interval, active
        self._rows: list[dict] = []  # journal rows since the last checkpoint
        self._last_put = None

    def _put(self, *events: dict) -> None:
        if self.active:
            self._last_put = self.channel.put.remote(list(events))

    def warning(self, message: str) -> None:
        """A warning for the user (the driver prints it: worker output is not shown)."""
        self._put({"kind": "progress", "record": {"warning": message}})

    def _metrics(self, step: int, group: str, metrics: dict[str, float]) -> None:
        row = {"step": step, "group": group, "time_ms": int(time.time() * 1000), "metrics": metrics}
        self._rows.append(row)
        self._put({"kind": "metrics", **row})

    def step(self, step: int, metrics: dict[str, float], final: bool) -> None:
        if not self.active:
            return
        full = final or step % self.log_interval == 0
        kept = {f"train/{k}": v for k, v in metrics.items() if full or AUX_MARK not in k}
        self._metrics(step, "train", kept)
        if full:
            self._put({"kind": "progress", "record": {"step": step, **metrics}})

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            self._metrics(step, "eval", metrics)
            self._put({"kind": "progress", "record": {"step": step, "eval": metrics}})

    def figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact; the figure is closed."""
        from pipeline.eval.visualize import close

        if self.active:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
            self._put({"kind": "artifact", "name": artifact_file, "data": buffer.getvalue()})
        close(figure)

    def record(self, data: dict[str, Any], artifact_file: str) -> None:
        """A small JSON artifact (e.g. where the best checkpoint went)."""
        self._put({"kind": "artifact", "name": artifact_file, "data": json.dumps(data, indent=1).encode()})

    def checkpoint(self) -> None:
        """Before a checkpoint: journal the steps since the last one and wait until the driver's channel
        holds every event put so far (so the checkpoint covers them)."""
        if not self.active:
            return
        import ray

        journal.write_segment(self.location, self._rows)
        self._rows = []
        if self._last_put is not None:
            ray.get(self._last_put)

    def close(self, step: int, last_eval: dict[str, float]) -> None:
        self._put({"kind": "progress", "record": {"done": True, "step": step, **last_eval}})
        self.checkpoint()
