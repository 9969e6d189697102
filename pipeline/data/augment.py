"""Training-time augmentation (evaluation input: `pipeline.eval.predictor`; targets: `pipeline.data.targets`).

Training (`augment_record`): random scale in [min_scale, max_scale] (image bilinear, label nearest),
random crop to ``crop_size`` with void padding at the bottom/right (padded image pixels are zero after
normalisation, as bytedance/kmax-deeplab does with ``is_real_pixels``), horizontal flip. The randomness
is drawn from ``default_rng([seed, epoch, crc32(record_id)])``, so an epoch is reproducible whatever the
batching, the worker count or the order, and every epoch differs.

The label is subsampled to the output-stride grid here (``label[::stride, ::stride]``, reference_kmax.md
§9.4; deeplab2 and the kMaX-PyTorch mapper's ``[::4, ::4]``): a crop of ``k * stride + 1`` pixels gives a
``k + 1`` grid, i.e. the grid size is ``ceil(crop / stride)``, the model's "SAME" output size. With
``input_targets=True`` the crop's label at input resolution is kept too (for ``LossConfig.mask_loss_at =
"input"``). pipeline.data.targets turns augmented rows into the criterion's targets; the train worker runs
both through pipeline.train.batches.AugmentCollate. No Ray, no torch here: the config imports this module.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data.records import PASS_COLUMN, VOID_LABEL, decode_image, decode_label


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


def augment_rows(
    batch: dict, cfg: AugmentConfig, epoch: int, passes: int = 1, input_targets: bool = False
) -> dict:
    """Stored rows (numpy batch of RECORD_SCHEMA columns) -> augmented rows (numpy batch).

    Rows of a repeated split (pipeline.train.data_order: ``passes`` copies per epoch, told
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
