"""Training targets and batches from augmented rows: the `kmax_model.targets.Target` contract.

`build_target` turns a label map at the output-stride grid (pipeline.data.augment) and the record's segments
into one mask per segment; `collate_augmented` makes the training batch ``{"images": float [B, 3, H, W]
normalised, "targets": list[Target]}``. torch and kmax_model are imported inside the functions, so that
importing the data room stays light (the prepare workers never pay for torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.records import VOID_LABEL, decode_segments

if TYPE_CHECKING:
    import torch

    from kmax_model.targets import Target


def build_target(
    label_grid: np.ndarray,
    segments: list[dict],
    label_input: np.ndarray | None = None,
    crowd_as_ignore: bool = True,
) -> Target:
    """Target (kmax_model.targets) from a label map at the output grid and the record's segments.

    One mask per segment present on the grid (things: one per instance; stuff: one per class, since a
    stuff class has a single segment), in the record's segment order; crowd segments are left out (their
    pixels invalid) unless ``crowd_as_ignore`` is False (see `AugmentConfig`). With ``label_input`` (the
    same crop at input resolution) the target also holds ``input_index``: each input pixel's mask index.
    """
    import torch

    from kmax_model.targets import IGNORE_INDEX, Target

    ids, counts = np.unique(label_grid, return_counts=True)
    present = dict(zip(ids.tolist(), counts.tolist()))
    known = {int(s["id"]) for s in segments}
    unknown = [v for v in present if v != VOID_LABEL and v not in known]
    if unknown:
        raise ValueError(f"label values {unknown[:5]} have no segment in the record")
    h, w = label_grid.shape
    semantic = np.full((h, w), IGNORE_INDEX, np.int64)
    valid = np.zeros((h, w), bool)
    area = np.zeros((h, w), np.float32)
    input_index = None if label_input is None else np.full(label_input.shape, -1, np.int64)
    masks, labels = [], []
    for seg in segments:
        sid = int(seg["id"])
        if sid not in present:
            continue
        m = label_grid == sid
        semantic[m] = seg["class_id"]
        if crowd_as_ignore and seg.get("iscrowd", 0):
            continue
        valid |= m
        area[m] = present[sid]
        if input_index is not None:
            input_index[label_input == sid] = len(masks)
        masks.append(m)
        labels.append(seg["class_id"])
    masks_arr = np.stack(masks).astype(np.float32) if masks else np.zeros((0, h, w), np.float32)
    target = Target(
        masks=torch.from_numpy(masks_arr),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        valid=torch.from_numpy(valid),
        semantic=torch.from_numpy(semantic),
        area=torch.from_numpy(area),
    )
    if input_index is not None:
        target["input_index"] = torch.from_numpy(input_index)
    return target


def normalised_batch(images: list[np.ndarray], valid: list[np.ndarray]) -> torch.Tensor:
    """uint8 images [H,W,3] and their real-pixel masks [H,W] -> float32 tensor [B,3,H,W], normalised as
    kmax_model.targets.normalize_images (``x / PIXEL_SCALE - 1``, the same float32 operations) with the
    padding exactly 0.

    Computed in numpy on purpose: the collate runs in Ray Data's prefetch threads of the train worker, and
    torch ops there start a second OpenMP team that competes with the training step's for the same cores
    (measured on 2 cores: the step took 1.33 s instead of 0.84 s)."""
    import torch

    from kmax_model.targets import PIXEL_SCALE

    x = np.stack(images).astype(np.float32) / np.float32(PIXEL_SCALE) - np.float32(1.0)
    x *= np.stack(valid).astype(bool)[..., None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def collate_augmented(batch: dict, crowd_as_ignore: bool = True) -> dict:
    """Augmented rows (numpy batch of pipeline.data.augment.augment_rows) -> {"images": float [B,3,Hc,Wc]
    normalised, "targets": list[Target]}. Targets get ``input_index`` when the rows have "label_input"."""
    inputs = batch.get("label_input")
    targets = [
        build_target(
            np.asarray(grid),
            decode_segments(str(segments)),
            None if inputs is None else np.asarray(inputs[i]),
            crowd_as_ignore,
        )
        for i, (grid, segments) in enumerate(zip(batch["label_grid"], batch["segments"]))
    ]
    return {"images": normalised_batch(list(batch["image"]), list(batch["pixel_valid"])), "targets": targets}
