"""``kmax import-weights``: an official kMaX-DeepLab checkpoint (bytedance/kmax-deeplab) as a kmax checkpoint.

    kmax import-weights --weights kmax_r50.pth --preset resnet50_coco --out runs/official/r50_coco

reads the released file (a ``.pth`` written by detectron2's checkpointer, ``{"model": state_dict, ...}``,
with ``torch.load(weights_only=True)``; or a ``.pkl`` from their ``convert-tf-weights-to-d2.py``,
``{"model": {key: numpy array}}``, read by an unpickler that admits numpy arrays and nothing else),
converts its ``"model"`` dict with `kmax_model.convert_kmax_deeplab` into the preset's model and writes
``OUT/state.pt`` in the checkpoint format of pipeline.checkpoint (``step`` 0, no optimiser state), which
``kmax evaluate --checkpoint``, ``kmax predict --checkpoint`` and training with ``model.init_from`` read.

The stored config is the preset's experiment with the reference evaluation of bytedance/kmax-deeplab @
f8e1d046 (`REFERENCE_EVAL`: long side resized to the training crop and zero-padded to it; their
panoptic merge has no area limits and resizes the logits back with align_corners=True), then the
``--set`` overrides. ``source`` records the file, its sha256 and the code its layout follows.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_KEY = "model"
DDP_PREFIX = "module."
CHECKPOINT_NAME = "state.pt"
HASH_CHUNK = 1 << 20
MAX_REASON_CHARS = 300
"""A reader's error is cut to this many characters in the one-line message."""
OFFICIAL_PRESETS = ("resnet50_coco", "resnet50_cityscapes") + tuple(
    f"convnext_{s}_coco" for s in ("tiny", "small", "base", "large")
)
"""Presets an official checkpoint converts into (`kmax_model.preset` names)."""
REFERENCE_EVAL: dict[str, dict[str, Any]] = {
    "coco": {"data.eval_long_side": 1281, "data.eval_size": (1281, 1281)},
    "cityscapes": {"data.eval_long_side": 2049, "data.eval_size": (1025, 2049)},
}
"""bytedance's test resize (detectron2 ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``) and fixed padding
(``INPUT.IMAGE_SIZE``), per dataset of the preset (configs/*/panoptic_segmentation/kmax_*.yaml)."""
REFERENCE_POSTPROCESS = {
    "model.postprocess.thing_area_limit": 0,
    "model.postprocess.stuff_area_limit": 0,
    "model.postprocess.resize_align_corners": True,
}
"""bytedance's ``panoptic_inference`` (kmax_model.py @ f8e1d046): no area limits; logits resized back to the
image with align_corners=True."""
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}
"""What a detectron2 ``.pkl`` of numpy arrays may reference (protocol 2 stores bytes through
``_codecs.encode``, protocol 5 arrays through ``_frombuffer``); any other global is refused."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays (dtypes included), refusing every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NUMPY_GLOBALS or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are accepted)")


def read_official(path: Path) -> Any:
    """The object stored in ``path``: ``torch.load(weights_only=True)``, or the numpy-only unpickler for a
    ``.pkl``. Raises ValueError naming the file when it cannot be read that way."""
    import torch

    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe files raise many types
        reader = "the numpy-only unpickler" if path.suffix == ".pkl" else "torch.load(weights_only=True)"
        reason = " ".join(str(exc).split())  # one line: torch's messages span several
        raise ValueError(f"{path} cannot be read with {reader}: {reason[:MAX_REASON_CHARS]}") from exc


def official_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The model state dict in a loaded official checkpoint: its ``"model"`` entry (or the object itself when
    it is already a flat dict of arrays), numpy arrays as tensors, a DDP ``module.`` prefix stripped."""
    import numpy as np
    import torch

    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    state = obj.get(MODEL_KEY, obj)
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: {MODEL_KEY!r} is not a non-empty state dict (keys: {sorted(obj)[:10]})")
    out = {}
    for key, value in state.items():
        if isinstance(value, (np.ndarray, np.generic)):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} of {MODEL_KEY!r} is a {type(value).__name__}, not a tensor"
            )
        out[key] = value
    if all(k.startswith(DDP_PREFIX) for k in out):
        out = {k[len(DDP_PREFIX) :]: v for k, v in out.items()}
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imported_config(preset: str, overrides: list[str]):
    """The experiment config stored with the weights: `preset`'s, its dataset's reference evaluation
    (`REFERENCE_EVAL`, `REFERENCE_POSTPROCESS`), then ``overrides`` (``dotted.path=value``)."""
    from kmax_model.config_utils import apply_overrides
    from pipeline.config import experiment_preset

    cfg = experiment_preset(preset)
    dataset = "cityscapes" if preset.endswith("_cityscapes") else "coco"
    cfg = apply_overrides(cfg, {**REFERENCE_EVAL[dataset], **REFERENCE_POSTPROCESS})
    return apply_overrides(cfg, overrides)


def imported_state(model_state: dict, config: dict, source: dict) -> dict[str, Any]:
    """A pipeline.checkpoint state dict for weights that no run trained: step 0, no optimiser, scheduler or
    scaler state, the RNG state of this process; ``source`` says where the weights came from."""
    from pipeline.checkpoint import CHECKPOINT_FORMAT, rng_state

    return {
        "format": CHECKPOINT_FORMAT,
        "step": 0,
        "model": model_state,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "rng": rng_state(),
        "config": config,
        "mlflow_run_id": None,
        "metrics": {},
        "source": source,
    }


def checkpoint_directory(out: str) -> str:
    """The folder ``state.pt`` goes to: ``out`` itself, or its parent when ``out`` names ``state.pt``."""
    if out.endswith("/" + CHECKPOINT_NAME) or out == CHECKPOINT_NAME:
        return out[: -len(CHECKPOINT_NAME)].rstrip("/") or "."
    if out.endswith((".pt", ".pth", ".pkl")):
        raise ValueError(
            f"--out {out}: give a folder or a path ending in /{CHECKPOINT_NAME} (what --checkpoint reads)"
        )
    return out


def import_weights(weights: Path, preset: str, out: str, overrides: list[str]) -> tuple[str, dict]:
    """Convert ``weights`` into ``preset``'s model and write the checkpoint; returns (location, source)."""
    from kmax_model.convert import OFFICIAL_SOURCE, convert_kmax_deeplab
    from pipeline.checkpoint import save_checkpoint

    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist")
    directory = checkpoint_directory(out)
    cfg = imported_config(preset, overrides)
    state = official_state_dict(read_official(weights), weights)
    try:
        model_state = convert_kmax_deeplab(state, cfg.model)
    except ValueError as exc:
        raise ValueError(f"{weights}: {exc}") from exc
    source = {
        "file": str(weights),
        "sha256": file_sha256(weights),
        "layout": OFFICIAL_SOURCE,
        "preset": preset,
    }
    location = save_checkpoint(directory, imported_state(model_state, cfg.to_dict(), source))
    return location, source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments
    from pipeline.storage import absolute

    parser.add_argument(
        "--weights", type=absolute, required=True,
        help="official checkpoint: a released .pth ({'model': state_dict}) or a TF-ported .pkl",
    )  # fmt: skip
    parser.add_argument(
        "--preset", required=True, choices=OFFICIAL_PRESETS, help="the model preset the checkpoint matches"
    )
    parser.add_argument(
        "--out", type=absolute, required=True,
        help=f"checkpoint folder (or .../{CHECKPOINT_NAME}) to write; a path or a storage URI",
    )  # fmt: skip
    add_config_arguments(parser, "the stored config", preset=False)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import fail

    try:
        location, source = import_weights(Path(args.weights), args.preset, args.out, args.overrides)
    except (FileNotFoundError, ValueError) as exc:
        return fail("import-weights", exc)
    print(f"wrote {location}: {args.preset} from {source['file']} (sha256 {source['sha256'][:16]}...)")
    print(f"evaluate: kmax evaluate --checkpoint {location} --data PREPARED_DIR --split val", file=sys.stderr)
    return 0
