"""The weights a new training run starts from: a pretrained backbone and / or a whole kmax model.

``model.backbone.pretrained``: an ImageNet checkpoint of the backbone (torchvision ResNet-50, official
ConvNeXt; kmax_model.pretrained drops the classifier). ``model.init_from``: a kmax checkpoint (a trained
run's, or an official one converted by ``kmax import-weights``) whose model weights start a fine-tuning run:
weights only, with a fresh optimiser, schedule and step counter. Both are applied after the backbone
initialisation, ``init_from`` last (it covers the backbone too).

Read and checked on the driver, before Ray starts: a path or storage URI that is absent, unreadable, or
whose keys or shapes do not match the model fails there in one line naming the config field and the keys.
The checked tensors then travel to the workers through Ray's object store, so a worker on a node that does
not see the driver's disk still gets them. A run that resumes from a checkpoint reads neither file: its
weights are the checkpoint's (the driver does not call `read_initial_weights`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import storage
from pipeline.config import ExperimentConfig, field_value

MAX_KEYS_IN_ERROR = 10


@dataclass
class InitialWeights:
    """What the workers load before training a new run. ``backbone`` / ``model``: state dicts of the
    backbone and of the whole (unwrapped) model, or Ray object refs to them once `shipped`. ``records``:
    per config field, the file, its sha256 and the load report (what the driver logs to MLflow)."""

    backbone: Any = None
    model: Any = None
    records: dict[str, dict] = field(default_factory=dict)

    def shipped(self) -> InitialWeights:
        """The same weights with the tensors in Ray's object store (refs travel cheaply to every worker)."""
        import ray

        put = lambda sd: None if sd is None else ray.put(sd)  # noqa: E731
        return InitialWeights(put(self.backbone), put(self.model), self.records)

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into an unwrapped `KMaXDeepLab` (strict: the driver matched every key)."""
        import ray

        get = lambda v: ray.get(v) if isinstance(v, ray.ObjectRef) else v  # noqa: E731
        if self.backbone is not None:
            model.backbone.load_state_dict(get(self.backbone), strict=True)
        if self.model is not None:
            model.load_state_dict(get(self.model), strict=True)

    def params(self) -> dict[str, str]:
        """MLflow params: ``<field>.sha256`` for each file read."""
        return {f"{name}.sha256": record["sha256"] for name, record in self.records.items()}

    def report_json(self) -> str:
        return json.dumps(self.records, indent=1)


FIELDS = ("model.backbone.pretrained", "model.init_from")
"""The config fields that name initial weights."""


def _require(location: str, field_name: str) -> None:
    if not storage.is_file(location):
        raise FileNotFoundError(f"{field_name}={location}: no such file")


def require_files(cfg: ExperimentConfig) -> None:
    """FileNotFoundError naming the config field when a file it names is absent (a cheap check, before Ray
    starts; `read_initial_weights` reads and matches them)."""
    for name in FIELDS:
        location = field_value(cfg, name)
        if location is not None:
            _require(location, name)


def _read(location: str, field_name: str) -> tuple[bytes, str]:
    """The file's bytes and sha256; FileNotFoundError naming the config field when it is absent."""
    _require(location, field_name)
    data = storage.read_bytes(location)
    return data, hashlib.sha256(data).hexdigest()


def _names(keys: list[str]) -> str:
    more = len(keys) - MAX_KEYS_IN_ERROR
    return ", ".join(keys[:MAX_KEYS_IN_ERROR]) + (f" ... (+{more} more)" if more > 0 else "")


def _backbone(cfg: ExperimentConfig, model: torch.nn.Module) -> tuple[dict, dict]:
    from kmax_model.pretrained import CheckpointMismatchError, match_backbone_state, read_state_dict

    location = cfg.model.backbone.pretrained
    name = "model.backbone.pretrained"
    data, sha = _read(location, name)
    try:
        report, tensors = match_backbone_state(model, read_state_dict(data, location), location)
    except CheckpointMismatchError as err:
        raise ValueError(f"{name}: {err}") from err
    record = {"file": location, "sha256": sha, "summary": report.summary(), "loaded": len(report.loaded),
              "dropped": report.dropped}  # fmt: skip
    return tensors, record


def _whole_model(cfg: ExperimentConfig, model: torch.nn.Module) -> tuple[dict, dict]:
    """The model weights of a kmax checkpoint (pipeline.checkpoint), matched key by key and shape by shape."""
    import io

    location = cfg.model.init_from
    name = "model.init_from"
    data, sha = _read(location, name)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensors = state["model"]
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"{name}={location}: not a kmax checkpoint ({err})") from err
    own = model.state_dict()
    found = {
        "missing": [k for k in own if k not in tensors],
        "unexpected": [k for k in tensors if k not in own],
        "shape mismatch": [
            f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in tensors and tensors[k].shape != v.shape
        ],
    }
    problems = [f"{what} {len(keys)}: {_names(keys)}" for what, keys in found.items() if keys]
    if problems:
        raise ValueError(f"{name}={location} does not match the model of this config: {'; '.join(problems)}")
    record = {"file": location, "sha256": sha, "loaded": len(own), "step": state.get("step")}
    return tensors, record


def read_initial_weights(cfg: ExperimentConfig) -> InitialWeights | None:
    """Read and check the config's initial weights (None when it names none); see the module docstring.
    Raises FileNotFoundError or ValueError naming the config field, the file and the keys."""
    if cfg.model.backbone.pretrained is None and cfg.model.init_from is None:
        return None
    from kmax_model.model import build_model

    model = build_model(cfg.model)  # the shapes to match; its random weights are not used
    weights = InitialWeights()
    if cfg.model.backbone.pretrained is not None:
        weights.backbone, weights.records["model.backbone.pretrained"] = _backbone(cfg, model)
    if cfg.model.init_from is not None:
        weights.model, weights.records["model.init_from"] = _whole_model(cfg, model)
    return weights
