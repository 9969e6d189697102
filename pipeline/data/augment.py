"""Training-time augmentation and target building (evaluation input is `pipeline.eval.predictor`).

Training (`augment_record`): random scale in [min_scale, max_scale] (image bilinear, label nearest),
random crop to ``crop_size`` with void padding at the bottom/right (padded image pixels are zero after
normalisation, as bytedance/kmax-deeplab does with ``is_real_pixels``), horizontal flip. The randomness
is drawn from ``default_rng([seed, epoch, crc32(record_id)])``, so an epoch is reproducible whatever the
batching, the worker count or the order, and every epoch differs.

Targets (`build_target`, the `kmax_model.targets.Target` contract) are built at the output-stride grid by
strided subsampling ``label[::stride, ::stride]`` (reference_kmax.md §9.4; deeplab2 and the kMaX-PyTorch
mapper's ``[::4, ::4]``): a crop of ``k * stride + 1`` pixels gives a ``k + 1`` grid, i.e. the grid size is
``ceil(crop / stride)``, the model's "SAME" output size. With ``input_targets=True`` the crop's label at input
resolution also goes into the target (``Target.input_index``) for ``LossConfig.mask_loss_at = "input"``.

Two ways to run it with Ray:
- `AugmentCollate(cfg, epoch)` passed to ``iter_torch_batches`` over the stored records (decodes and
  augments inside the train worker; build a new one per epoch), or
- `augment_dataset(ds, cfg, epoch)` (a Ray Data ``map_batches`` over a materialised dataset, lazily
  re-run each epoch) followed by ``iter_torch_batches(collate_fn=TargetCollate())``.
Both return ``{"images": float [B, 3, H, W] normalised, "targets": list[Target]}``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.data.records import PASS_COLUMN, VOID_LABEL, decode_image, decode_label, decode_segments

if TYPE_CHECKING:
    from kmax_model.targets import Target

# torch and kmax_model are imported inside the collate/target functions only: the Ray Data map workers of
# `augment_dataset` then never pay their import (several seconds per worker process).


@dataclass
class AugmentConfig:
    """Training augmentation and targets; crop_size is (height, width) (an int means a square).

    ``crowd_as_ignore`` (deeplab2's ``treat_crowd_as_ignore``, default True as both references train):
    crowd pixels are in no mask and ignored by the mask losses. False makes each crowd region one more
    mask of its class, so the model is told what covers those pixels. The official PQ does not remove a
    predicted segment's crowd pixels from its IoU, so a thing next to a crowd region is scored with
    whatever the unsupervised crowd pixels got (the COCO sample's ball beside a person crowd: IoU 0.45
    with crowd ignored); a segment predicted on the crowd region itself is ignored, not a false positive.
    """

    crop_size: tuple[int, int] | int = (97, 97)
    min_scale: float = 0.5
    max_scale: float = 1.5
    flip_prob: float = 0.5
    output_stride: int = 4
    seed: int = 0
    crowd_as_ignore: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.crop_size, int):
            self.crop_size = (self.crop_size, self.crop_size)
        self.crop_size = tuple(int(v) for v in self.crop_size)
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"augment.crop_size must be (height, width) > 0, got {self.crop_size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"augment.min_scale/max_scale must satisfy 0 < min_scale <= max_scale, got "
                f"{self.min_scale}, {self.max_scale}"
            )
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"augment.flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.output_stride < 1:
            raise ValueError(f"augment.output_stride must be >= 1, got {self.output_stride}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Target grid ``ceil(crop / stride)`` per side."""
        s = self.output_stride
        return (-(-self.crop_size[0] // s), -(-self.crop_size[1] // s))


def record_rng(seed: int, epoch: int, record_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(str(record_id).encode())])


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3], PIL bilinear: the training scale's resize, which evaluation at a
    resized input (pipeline.eval.predictor, ``data.eval_long_side``) reuses so both see the same pixels."""
    h, w = size_hw
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _resize(image: np.ndarray, label: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = size_hw
    lab = np.asarray(Image.fromarray(label.astype(np.int32)).resize((w, h), Image.NEAREST), dtype=np.int32)
    return resize_image(image, size_hw), lab


def augment_record(
    image: np.ndarray,
    label: np.ndarray,
    record_id: str,
    cfg: AugmentConfig,
    epoch: int,
    input_targets: bool = False,
) -> dict:
    """One image -> {"image" uint8 [Hc,Wc,3], "pixel_valid" bool [Hc,Wc], "label_grid" int32 [h,w]}, plus
    "label_input" int32 [Hc,Wc] (the crop's label at input resolution) when ``input_targets``."""
    rng = record_rng(cfg.seed, epoch, record_id)
    scale = rng.uniform(cfg.min_scale, cfg.max_scale)
    h, w = label.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image, label = _resize(image, label, (nh, nw))
    ch, cw = cfg.crop_size
    y0 = int(rng.integers(0, max(nh - ch, 0) + 1))
    x0 = int(rng.integers(0, max(nw - cw, 0) + 1))
    img = np.zeros((ch, cw, 3), np.uint8)
    lab = np.full((ch, cw), VOID_LABEL, np.int32)
    real = np.zeros((ch, cw), bool)
    ph, pw = min(ch, nh - y0), min(cw, nw - x0)
    img[:ph, :pw] = image[y0 : y0 + ph, x0 : x0 + pw]
    lab[:ph, :pw] = label[y0 : y0 + ph, x0 : x0 + pw]
    real[:ph, :pw] = True
    if rng.random() < cfg.flip_prob:
        img, lab, real = img[:, ::-1], lab[:, ::-1], real[:, ::-1]
    s = cfg.output_stride
    out = {
        "image": np.ascontiguousarray(img),
        "pixel_valid": np.ascontiguousarray(real),
        "label_grid": np.ascontiguousarray(lab[::s, ::s]),
    }
    if input_targets:
        out["label_input"] = np.ascontiguousarray(lab)
    return out


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

    info = {int(s["id"]): s for s in segments}
    ids, counts = np.unique(label_grid, return_counts=True)
    h, w = label_grid.shape
    semantic = np.full((h, w), IGNORE_INDEX, np.int64)
    valid = np.zeros((h, w), bool)
    area = np.zeros((h, w), np.float32)
    present = dict(zip(ids.tolist(), counts.tolist()))
    masks, labels = [], []
    input_index = None if label_input is None else np.full(label_input.shape, -1, np.int64)
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
    unknown = [v for v in present if v != VOID_LABEL and v not in info]
    if unknown:
        raise ValueError(f"label values {unknown[:5]} have no segment in the record")
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


def _segments_list(value) -> list[dict]:
    return value if isinstance(value, list) else decode_segments(str(value))


def normalised_batch(images: list[np.ndarray], valid: list[np.ndarray]):
    """uint8 images [H,W,3] and their real-pixel masks [H,W] -> float32 tensor [B,3,H,W], normalised as
    kmax_model.targets.normalize_images (``x / PIXEL_SCALE - 1``, the same float32 operations) with the
    padding exactly 0.

    Computed in numpy on purpose: the collates run in Ray Data's prefetch threads of the train worker, and
    torch ops there start a second OpenMP team that competes with the training step's for the same cores
    (measured on 2 cores: the step took 1.33 s instead of 0.84 s)."""
    import torch

    from kmax_model.targets import PIXEL_SCALE

    x = np.stack(images).astype(np.float32) / np.float32(PIXEL_SCALE) - np.float32(1.0)
    x *= np.stack(valid).astype(bool)[..., None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def collate_augmented(batch: dict, crowd_as_ignore: bool = True) -> dict:
    """Augmented rows (numpy batch) -> {"images": float [B,3,Hc,Wc] normalised, "targets": list[Target]}.
    Targets get ``input_index`` when the rows have a "label_input" column."""
    inputs = batch.get("label_input")
    targets = [
        build_target(
            np.asarray(g),
            _segments_list(s),
            None if inputs is None else np.asarray(inputs[i]),
            crowd_as_ignore,
        )
        for i, (g, s) in enumerate(zip(batch["label_grid"], batch["segments"]))
    ]
    return {"images": normalised_batch(list(batch["image"]), list(batch["pixel_valid"])), "targets": targets}


def augment_rows(
    batch: dict, cfg: AugmentConfig, epoch: int, passes: int = 1, input_targets: bool = False
) -> dict:
    """Stored rows (numpy batch of RECORD_SCHEMA columns) -> augmented rows (numpy batch).

    Rows of a repeated split (pipeline.data.records.training_dataset: ``passes`` copies per epoch, told
    apart by
    the ``pass`` column) are augmented as epoch ``epoch * passes + pass``, so every copy differs.
    ``input_targets`` adds the "label_input" column (see `augment_record`)."""
    arrays = ("image", "pixel_valid", "label_grid") + (("label_input",) if input_targets else ())
    out = {"record_id": [], "segments": [], **{k: [] for k in arrays}}
    copy = batch.get(PASS_COLUMN)
    for i in range(len(batch["record_id"])):
        h, w = int(batch["height"][i]), int(batch["width"][i])
        aug = augment_record(
            decode_image(batch["image"][i]),
            decode_label(batch["label"][i], h, w),
            str(batch["record_id"][i]),
            cfg,
            epoch if copy is None else epoch * passes + int(copy[i]),
            input_targets,
        )
        out["record_id"].append(str(batch["record_id"][i]))
        out["segments"].append(str(batch["segments"][i]))
        for k in arrays:
            out[k].append(aug[k])
    return {k: np.stack(v) if k in arrays else np.array(v) for k, v in out.items()}


class AugmentCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=AugmentCollate(cfg, epoch, passes, input_targets))`` over stored
    records (decode + augment + targets in the train worker). Make a new instance per epoch."""

    def __init__(self, cfg: AugmentConfig, epoch: int = 0, passes: int = 1, input_targets: bool = False):
        self.cfg, self.epoch, self.passes, self.input_targets = cfg, epoch, passes, input_targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = augment_rows(batch, self.cfg, self.epoch, self.passes, self.input_targets)
        return collate_augmented(rows, self.cfg.crowd_as_ignore)


class TargetCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=TargetCollate())`` over rows of `augment_dataset`."""

    def __init__(self, crowd_as_ignore: bool = True):
        self.crowd_as_ignore = crowd_as_ignore

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return collate_augmented(batch, self.crowd_as_ignore)


def augment_dataset(ds, cfg: AugmentConfig, epoch: int, input_targets: bool = False):
    """Ray Data: stored records -> augmented rows (image, pixel_valid, label_grid, segments, record_id, and
    label_input when ``input_targets``)."""
    return ds.map_batches(
        augment_rows,
        fn_kwargs={"cfg": cfg, "epoch": epoch, "input_targets": input_targets},
        batch_format="numpy",
        batch_size=8,
    )
