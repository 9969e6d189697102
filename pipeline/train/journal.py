"""The metrics journal: every logged step of a run, under the run's storage, covered by its checkpoints.

Rank 0 keeps the rows of the steps since the last checkpoint and writes them as one segment
``<run location>/journal/steps-<first>-<last>.jsonl`` just before it writes the checkpoint at ``<last>``, so
a checkpoint at step s means that every step up to s is in the journal, whatever the tracking server did.
The driver sends the rows to MLflow as they come (pipeline.train.forwarder) and, on a resumed run, replays
the journal first: MLflow drops steps it already holds (pipeline.tracking.RunLogger), so every step ends up
there exactly once. A row: ``{"step": int, "group": "train" | "eval", "time_ms": int, "metrics": {name:
float}}`` (the per-step training metrics, or a validation's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipeline import storage

JOURNAL_DIR = "journal"
SEGMENT_PREFIX = "steps-"


def journal_location(run_location: str) -> str:
    return storage.join(run_location, JOURNAL_DIR)


def write_segment(run_location: str, rows: list[dict]) -> str | None:
    """Write the rows of consecutive steps as one segment; returns its location (None when no rows)."""
    if not rows:
        return None
    name = f"{SEGMENT_PREFIX}{rows[0]['step']:09d}-{rows[-1]['step']:09d}.jsonl"
    location = storage.join(journal_location(run_location), name)
    storage.write_text(location, "".join(json.dumps(r) + "\n" for r in rows))
    return location


def read_rows(run_location: str) -> Iterator[dict]:
    """Every journalled row in step order, one per (step, kind): segments of a resumed run may overlap
    (steps after the last checkpoint are recomputed and journalled again; resume is exact, so both are the
    same numbers), and the later segment's row is kept."""
    rows: dict[tuple[int, str], dict] = {}
    for name in storage.list_names(journal_location(run_location)):
        if not name.startswith(SEGMENT_PREFIX):
            continue
        for line in storage.read_text(storage.join(journal_location(run_location), name)).splitlines():
            row = json.loads(line)
            rows[(row["step"], row["group"])] = row
    yield from sorted(rows.values(), key=lambda r: r["step"])
