"""Which checkpoint a run resumes from, and whether it may: the newest one that is intact, under a
configuration that differs only in resume-safe fields.

Resuming must never silently train a different experiment: every config field except the resume-safe ones
(run length, logging cadence, resources, where things live) must match the checkpoint's. A damaged
checkpoint (truncated upload, overwritten file: pipeline.checkpoint's record disagrees) is skipped with a
warning naming it, and kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline import storage
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
    "storage",
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


RAY_RUN_NAME = "train"
"""Ray Train run name inside ``<run location>/ray_results``; fixed, so that a rerun resumes."""
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_root(location: str) -> str:
    """Where Ray Train keeps the run's checkpoints (``checkpoint_<step>[_<n>]`` folders)."""
    return storage.join(location, "ray_results", RAY_RUN_NAME)


def _step_and_copy(name: str) -> tuple[int, int]:
    """(step, copy) of ``checkpoint_0000004`` (copy 0) or ``checkpoint_0000004_1`` (a later copy)."""
    step, _, copy = name[len(CHECKPOINT_PREFIX) :].partition("_")
    return int(step), int(copy or 0)


def checkpoint_names(location: str) -> list[str]:
    """The run's checkpoint folders, newest first (highest step, then the later copy of a step)."""
    names = [n for n in storage.list_names(checkpoint_root(location)) if n.startswith(CHECKPOINT_PREFIX)]
    valid = [n for n in names if n[len(CHECKPOINT_PREFIX) :].replace("_", "").isdigit()]
    return sorted(valid, key=_step_and_copy, reverse=True)


def fresh_checkpoint_name(location: str, step: int) -> str:
    """A folder name for a new checkpoint at ``step`` that replaces nothing: a damaged checkpoint skipped
    on resume keeps its folder (it is evidence), so the step's second checkpoint gets ``_1``, and so on."""
    taken = set(checkpoint_names(location))
    name, copy = f"{CHECKPOINT_PREFIX}{step:07d}", 0
    while name in taken:
        copy += 1
        name = f"{CHECKPOINT_PREFIX}{step:07d}_{copy}"
    return name


def newest_valid_checkpoint(location: str, warn) -> tuple[dict, str] | None:
    """(state, folder) of the newest checkpoint that loads and matches its recorded size and sha256, or
    None when there is none. Each damaged newer one is skipped with ``warn(message naming it)``; none is
    deleted."""
    from pipeline.checkpoint import load_checkpoint

    for name in checkpoint_names(location):
        folder = storage.join(checkpoint_root(location), name)
        try:
            return load_checkpoint(folder), folder
        except (ValueError, FileNotFoundError) as exc:  # CorruptCheckpointError included
            warn(f"skipping damaged checkpoint {folder} (kept as it is): {exc}")
    return None
