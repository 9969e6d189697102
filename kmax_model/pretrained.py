"""Load a local pretrained backbone checkpoint (torchvision ResNet-50, official ConvNeXt) into a model.

Nothing is downloaded: ``path`` is a local file read with ``torch.load(weights_only=True)``. Accepted
layouts: a raw state_dict, ``{"model": state_dict}`` (official ConvNeXt) or ``{"state_dict": state_dict}``.
Classifier keys (the backbone's ``classifier_prefixes``: ``fc.*`` for ResNet, ``head.*`` and the final
``norm.*`` for ConvNeXt) are dropped before loading. Missing / unexpected keys and shape mismatches are
reported by name; with ``strict=True`` any of them raises `CheckpointMismatchError` naming the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_CONTAINER_KEYS = ("model", "state_dict")
MAX_NAMES_IN_ERROR = 20


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the module (the message lists them)."""


@dataclass
class LoadReport:
    """What `load_pretrained` did: keys loaded, dropped (classifier), missing, unexpected, bad shapes."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        def names(items: list) -> str:
            shown = ", ".join(str(i) for i in items[:MAX_NAMES_IN_ERROR])
            more = len(items) - MAX_NAMES_IN_ERROR
            return shown + (f" ... (+{more} more)" if more > 0 else "")

        parts = [f"loaded {len(self.loaded)} tensors, dropped {len(self.dropped)} classifier keys"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {names(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched]
            parts.append(f"shape mismatch {len(self.mismatched)}: {names(shown)}")
        return "; ".join(parts)


def extract_state_dict(obj: object, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint (raw, ``{"model": ...}`` or ``{"state_dict": ...}``)."""
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a state_dict (dict), got {type(obj).__name__}")
    for key in CHECKPOINT_CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointMismatchError(f"{path}: entries that are not tensors: {bad[:MAX_NAMES_IN_ERROR]}")
    return dict(obj)


def _target_module(model_or_backbone: nn.Module) -> nn.Module:
    backbone = getattr(model_or_backbone, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model_or_backbone


def match_backbone_state(
    model_or_backbone: nn.Module, state: dict[str, torch.Tensor], source: str | Path, strict: bool = True
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Match a backbone checkpoint's ``state`` against the backbone (of a `KMaXDeepLab`, or a bare one).

    Returns the `LoadReport` and the tensors to load (classifier keys dropped, mismatches left out); raises
    `CheckpointMismatchError` naming ``source`` when ``strict`` and anything mismatches. Copies nothing."""
    module = _target_module(model_or_backbone)
    prefixes = tuple(getattr(module, "classifier_prefixes", ()))
    report = LoadReport()
    kept = {}
    for key, value in state.items():
        if prefixes and key.startswith(prefixes):
            report.dropped.append(key)
        else:
            kept[key] = value
    own = module.state_dict()
    report.missing = [k for k in own if k not in kept]
    report.unexpected = [k for k in kept if k not in own]
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in kept.items()
        if k in own and v.shape != own[k].shape
    ]
    if strict and not report.ok:
        raise CheckpointMismatchError(f"{source} does not match {type(module).__name__}: {report.summary()}")
    bad = {k for k, _, _ in report.mismatched}
    loadable = {k: v for k, v in kept.items() if k in own and k not in bad}
    report.loaded = sorted(loadable)
    return report, loadable


def read_state_dict(data: bytes | str | Path, source: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint given as its bytes or a local path, read with
    ``torch.load(weights_only=True)`` (FileNotFoundError for an absent path, `CheckpointMismatchError` for
    a file torch cannot read that way)."""
    if not isinstance(data, bytes):
        source = data
        if not Path(data).is_file():
            raise FileNotFoundError(f"pretrained checkpoint {data} does not exist")
    try:
        raw = torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu",
                         weights_only=True)  # fmt: skip
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise CheckpointMismatchError(
            f"{source}: cannot be read with torch.load(weights_only=True): {err}"
        ) from err
    return extract_state_dict(raw, source)


def load_pretrained(model_or_backbone: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load the checkpoint at ``path`` into the backbone (of a `KMaXDeepLab`, or a bare backbone).

    Returns a `LoadReport`; raises `CheckpointMismatchError` when ``strict`` and anything mismatches
    (nothing is copied into the module in that case), FileNotFoundError when the file is absent.
    """
    report, loadable = match_backbone_state(model_or_backbone, read_state_dict(path), path, strict)
    _target_module(model_or_backbone).load_state_dict(loadable, strict=False)
    return report
