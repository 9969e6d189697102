"""The checkpoint file: one ``state.pt``, written atomically, loadable with ``weights_only=True``.

A contract between rooms: training writes and resumes it (pipeline.train), evaluation and prediction read
it (pipeline.eval.predictor). Whether a checkpoint may be resumed under a changed config is training's
business (pipeline.train.resume).

Contents (all tensors or plain Python types so that ``torch.load(weights_only=True)`` accepts them):

    {"format": CHECKPOINT_FORMAT, "step": int (optimiser steps done), "model": state dict (unwrapped,
     no ``module.`` prefix), "optimizer": ..., "scheduler": ..., "scaler": ... or None,
     "rng": {"torch": uint8 tensor, "numpy": {...}, "python": [...]}, "config": nested plain dict
     (ExperimentConfig via config_to_dict), "mlflow_run_id": str | None, "metrics": {name: float}}

Atomic write: the file is written under a temporary name in the same directory and moved into place
with ``os.replace``, so a crash mid-write never leaves a truncated ``state.pt``.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = 1


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


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path`` then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def save_checkpoint(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically; returns the file path."""
    return atomic_torch_save(dict(state), Path(directory) / CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a directory holding ``state.pt``) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot load checkpoint {path}: {exc}") from exc
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
