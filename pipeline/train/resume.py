"""May a run resume from a checkpoint written under another configuration? Which fields may differ.

Resuming must never silently train a different experiment: every config field except the resume-safe ones
(run length, logging cadence, resources, where things live) must match the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking import flat_dict

RESUME_SAFE_PREFIXES = (
    "train.steps",
    "train.eval_interval",
    "train.checkpoint_interval",
    "train.log_interval",
    "train.num_to_keep",
    "scaling.",
    "fault.",
    "tracking.",
    "run_dir",
    "data.prepared_dir",
    "data.eval_batch_size",
    "data.num_vis_images",
)
"""Dotted config paths that may differ between the run that wrote a checkpoint and the run resuming
from it (run length, logging cadence, resources, where things live). Everything else (model, data
split, augmentation, optimiser, precision, seed) must match."""


class IncompatibleCheckpointError(ValueError):
    """Resuming would silently train a different experiment."""


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore: Iterable[str] = RESUME_SAFE_PREFIXES,
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Dotted paths whose values differ between two nested config dicts, except the resume-safe ones.

    Tuples and lists compare equal when their items do (YAML gives lists, dataclasses tuples). A field
    absent from ``saved`` (added to the code after the checkpoint was written) is no difference when its
    current value equals its value in ``defaults``: new fields default to the behaviour that came
    before them, so the checkpoint was trained with that value."""
    a, b = flat_dict(saved), flat_dict(current)
    d = flat_dict(defaults or {})
    ignore = tuple(ignore)

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignore):
            continue
        if key not in a and key in b and key in d and norm(b[key]) == norm(d[key]):
            continue
        if key not in a or key not in b or norm(a[key]) != norm(b[key]):
            diffs.append(f"{key}: checkpoint={a.get(key, '<absent>')!r} now={b.get(key, '<absent>')!r}")
    return diffs


def check_compatible(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    where: str | Path,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raise `IncompatibleCheckpointError` naming every differing field (see `config_differences`)."""
    diffs = config_differences(saved, current, defaults=defaults)
    if diffs:
        raise IncompatibleCheckpointError(
            f"refusing to resume from {where}: the configuration differs in "
            f"{len(diffs)} field(s):\n  " + "\n  ".join(diffs) + "\nuse a new --run-dir to start a fresh run"
        )
