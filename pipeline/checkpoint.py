"""The checkpoint file: one ``state.pt``, written atomically, loadable with ``weights_only=True``.

A contract between rooms: training writes and resumes it (pipeline.train), evaluation and prediction read
it (pipeline.eval.predictor). Whether a checkpoint may be resumed under a changed config is training's
business (pipeline.train.resume).

Contents (all tensors or plain Python types so that ``torch.load(weights_only=True)`` accepts them):

    {"format": CHECKPOINT_FORMAT, "step": int (optimiser steps done), "model": state dict (unwrapped,
     no ``module.`` prefix), "optimizer": ..., "scheduler": ..., "scaler": ... or None,
     "rng": {"torch": uint8 tensor, "numpy": {...}, "python": [...]}, "config": nested plain dict
     (ExperimentConfig via config_to_dict), "mlflow_run_id": str | None, "metrics": {name: float}}

Written through pipeline.storage (a path or a storage URI): atomically on a file system, and followed by a
record ``state.json`` with the file's size and sha256, so that a truncated or damaged checkpoint is told
apart from a good one when a run resumes (pipeline.train.resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage

CHECKPOINT_FILE = "state.pt"
RECORD_FILE = "state.json"
CHECKPOINT_FORMAT = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read back as it was written (truncated, overwritten, garbage)."""


def rng_state() -> dict[str, Any]:
    """The torch, numpy (legacy global) and python RNG states as tensors/plain types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(py_version), [int(v) for v in py_state], py_gauss],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def build_state(
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    config: Mapping[str, Any],
    mlflow_run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (see module docstring). ``model`` may be DDP-wrapped."""
    module = model.module if hasattr(model, "module") else model
    return {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
        "config": dict(config),
        "mlflow_run_id": mlflow_run_id,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }


def save_checkpoint(directory: str | Path, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``directory/state.pt`` (a path or a storage URI) and then its record
    ``state.json`` {"format", "step", "bytes", "sha256"}: a checkpoint whose record is missing or disagrees
    with the file is incomplete or damaged. Returns the location of ``state.pt``."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    location = storage.join(str(directory), CHECKPOINT_FILE)
    storage.write_bytes(location, data)
    record = {"format": CHECKPOINT_FORMAT, "step": int(state["step"]), "bytes": len(data)}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    storage.write_text(storage.join(str(directory), RECORD_FILE), json.dumps(record))
    return location


def _checkpoint_file(location: str) -> str:
    """``state.pt`` of a checkpoint given as the file or its folder."""
    return location if location.endswith(CHECKPOINT_FILE) else storage.join(location, CHECKPOINT_FILE)


def load_checkpoint(location: str | Path) -> dict[str, Any]:
    """Load a checkpoint (``state.pt`` or its folder; a path or a storage URI) with ``weights_only=True``.

    Checked against its record (``state.json``) when it has one (checkpoints written before the record
    existed have none): a size or sha256 that differs raises `CorruptCheckpointError` naming the file.
    FileNotFoundError when there is no checkpoint; ValueError for a file that is not a kmax checkpoint."""
    path = _checkpoint_file(str(location))
    if not storage.is_file(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = storage.read_bytes(path)
    record_path = storage.join(posixpath.dirname(path), RECORD_FILE)
    if storage.is_file(record_path):
        record = json.loads(storage.read_text(record_path))
        if record.get("bytes") != len(data) or record.get("sha256") != hashlib.sha256(data).hexdigest():
            raise CorruptCheckpointError(
                f"{path} does not match its record ({len(data)} bytes, {record.get('bytes')} recorded)"
            )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which one
        raise CorruptCheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kmax checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def restore(
    state: Mapping[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> int:
    """Load the given parts from a checkpoint dict; returns the step to continue from."""
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["step"])
