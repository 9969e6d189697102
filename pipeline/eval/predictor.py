"""The predictor: a kMaX model (or a training checkpoint) turned into predictions of decoded records.

Used by the training loop's validation (pipeline.train.validation) and by ``kmax evaluate --checkpoint``
(pipeline.eval.evaluate); both score the predictions with pipeline.eval.stats. A prediction holds the
panoptic map and its segments (kmax_model.postprocess.panoptic_inference) and the scored instances of
kmax_model.postprocess.instance_inference (the references' mask AP: the best ``max_instances`` (slot,
thing class) pairs).

Evaluation input: the stored image (already at its prepared size), normalised and zero-padded at the
bottom/right to ``data.eval_size`` (or, when None, to the smallest ``4k + 1`` size holding the image,
the "SAME"/align-corners convention of deeplab2); mask logits are upsampled to the padded size and
cropped back to the image (kmax_model.postprocess.upsample_mask_logits). With ``data.eval_long_side`` the
image is first resized so its long side has that many pixels, as the references evaluate COCO at the train
resolution (long side resized to the 1281 crop, reference_kmax.md §1.7), and the cropped logits are resized
back to the stored size before the panoptic merge, so PQ is always scored at the stored resolution.

A prediction depends on the padding (the k-means updates of the decoder pool over every pixel, padded ones
too), so each image is padded by its own size only, never to the largest image of its batch: images of
equal padded size share a forward pass. The PQ of a split is then the same whatever the batch size and the
number of workers (measured on the 2 real COCO sample images before this rule: PQ 66.9 in batches of 2,
71.0 one by one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kmax_model.postprocess import instance_inference, panoptic_inference
from kmax_model.targets import normalize_images
from pipeline.config import ExperimentConfig
from pipeline.data.augment import resize_image
from pipeline.data.records import read_manifest

EVAL_PAD_MULTIPLE = 4
"""Dynamic eval sizes are ``EVAL_PAD_MULTIPLE * k + 1`` (output stride 4, align-corners resizing)."""


def pad_size(sizes: Iterable[tuple[int, int]], fixed: Sequence[int] | None = None) -> tuple[int, int]:
    """The padded (H, W) for a batch of image sizes: ``fixed`` when given (must hold every image), else the
    smallest ``4k + 1`` at least as large as every image."""
    sizes = list(sizes)
    max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    if fixed is not None:
        if max_h > fixed[0] or max_w > fixed[1]:
            raise ValueError(f"data.eval_size {tuple(fixed)} is smaller than an image of {max_h}x{max_w}")
        return int(fixed[0]), int(fixed[1])
    m = EVAL_PAD_MULTIPLE
    return (math.ceil((max_h - 1) / m) * m + 1, math.ceil((max_w - 1) / m) * m + 1)


def input_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """The (h, w) an image of ``height x width`` enters the model at: its own size, or resized (aspect ratio
    kept) so that its long side is ``long_side``."""
    if long_side is None:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def eval_batch(
    records: Sequence[dict], fixed: Sequence[int] | None = None, long_side: int | None = None
) -> tuple[torch.Tensor, list]:
    """Decoded records -> (normalised, zero-padded images [B, 3, H, W], list of (h, w) valid sizes).

    With ``long_side`` each image is first resized to `input_size` as the training scale resizes
    (`pipeline.data.augment.resize_image`), and the valid sizes are the resized ones."""
    sizes = [input_size(int(r["height"]), int(r["width"]), long_side) for r in records]
    H, W = pad_size(sizes, fixed)
    images = torch.zeros(len(records), 3, H, W)
    for i, (r, size) in enumerate(zip(records, sizes)):
        pixels = np.asarray(r["image"])
        if pixels.shape[:2] != size:
            pixels = resize_image(pixels, size)
        img = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # 3 x h x w (a writable copy)
        images[i, :, : size[0], : size[1]] = normalize_images(img[None])[0]
    return images, sizes


class Predictor:
    """Wraps a model (eval mode) with the dataset's class metadata.

    Args:
        model: a kMaX model (possibly DDP-wrapped); must be in eval mode when called.
        manifest: the prepared split's manifest (categories, label_divisor).
        postprocess: kmax_model PostProcessConfig.
        eval_size: fixed (H, W) padding or None (dynamic).
        eval_long_side: resize each image so its long side has this many pixels before padding (None = as
            stored); the mask logits are resized back, so label maps always have the stored size.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        manifest: dict,
        postprocess: Any,
        eval_size=None,
        device=None,
        eval_long_side: int | None = None,
    ):
        self.model = model
        cats = sorted(manifest["categories"], key=lambda c: c["class_id"])
        self.categories = cats
        self.is_thing = [bool(c["isthing"]) for c in cats]
        self.category_ids = [int(c["category_id"]) for c in cats]
        self.label_divisor = int(manifest["label_divisor"])
        self.postprocess = postprocess
        self.eval_size = eval_size
        self.eval_long_side = eval_long_side
        self.device = torch.device(device or "cpu")

    def to(self, device: str | torch.device) -> Predictor:
        """This predictor with its model on ``device`` (a Ray task moves a CPU-built predictor to its GPU)."""
        self.device = torch.device(device)
        self.model = self.model.to(self.device)
        return self

    @torch.no_grad()
    def __call__(
        self, records: Sequence[dict], return_assignments: bool = False, instances: bool = True
    ) -> list[dict]:
        """Decoded records -> per record {"label_map" int32 np [h, w], "segments", "instances" ({"masks" bool
        np [n, h, w], "scores" float32 np [n], "class_ids" int64 np [n]}; only with ``instances``: mask AP
        needs them, panoptic output does not, and they cost 2/3 of a prediction), optionally "assignments"
        (list over decoder layers of int64 np [h', w'] cluster indices, cropped to the image)}. Images of
        equal padded size share one forward pass."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(records):
            size = input_size(int(r["height"]), int(r["width"]), self.eval_long_side)
            groups.setdefault(pad_size([size], self.eval_size), []).append(i)
        results: list[dict] = [{}] * len(records)
        for members in groups.values():
            batch = [records[i] for i in members]
            for i, out in zip(members, self._predict(batch, return_assignments, instances)):
                results[i] = out
        return results

    def _predict(self, records: Sequence[dict], return_assignments: bool, instances: bool) -> list[dict]:
        """One forward pass over records of the same padded size."""
        images, sizes = eval_batch(records, self.eval_size, self.eval_long_side)
        images = images.to(self.device)
        module = self.model.module if hasattr(self.model, "module") else self.model
        outputs = module(images, return_assignments=True) if return_assignments else module(images)
        H, W = images.shape[-2:]
        results = []
        for b, (r, (h, w)) in enumerate(zip(records, sizes)):
            label, segments = panoptic_inference(
                outputs["class_logits"][b],
                outputs["mask_logits"][b],
                self.is_thing,
                self.label_divisor,
                self.postprocess,
                output_size=(H, W),
                valid_size=(h, w),
                category_ids=self.category_ids,
                image_size=(int(r["height"]), int(r["width"])),
            )
            out = {"label_map": label.cpu().numpy().astype(np.int32), "segments": segments}
            if instances:
                out["instances"] = self._instances(
                    outputs, b, (H, W), (h, w), (int(r["height"]), int(r["width"]))
                )
            if return_assignments:
                out["assignments"] = [_crop_assignment(a[b], (h, w), (H, W)) for a in outputs["assignments"]]
            results.append(out)
        return results

    def _instances(self, outputs: dict, b: int, padded, valid, image) -> dict[str, np.ndarray]:
        """The scored instances of image ``b`` for mask AP, at the stored image size."""
        inst = instance_inference(
            outputs["class_logits"][b], outputs["mask_logits"][b], self.is_thing, self.postprocess,
            output_size=padded, valid_size=valid, image_size=image,
        )  # fmt: skip
        return {k: inst[k].cpu().numpy() for k in ("masks", "scores", "class_ids")}


def _crop_assignment(a: torch.Tensor, valid: tuple[int, int], padded: tuple[int, int]) -> np.ndarray:
    """Crop a [h', w'] assignment map to the part covering the unpadded image."""
    gh, gw = a.shape
    ch = max(1, math.ceil(gh * valid[0] / padded[0]))
    cw = max(1, math.ceil(gw * valid[1] / padded[1]))
    return a[:ch, :cw].cpu().numpy()


def predictor_from_checkpoint(
    checkpoint: str | Path, data_dir: str | Path, split: str, device: str = "cpu"
) -> tuple[Predictor, ExperimentConfig]:
    """A training checkpoint (``state.pt`` or its directory) as a `Predictor` of the records of a prepared
    split, with the checkpoint's config; refuses a split whose class count differs from the model's."""
    from kmax_model.model import build_model
    from pipeline.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    cfg = ExperimentConfig.from_dict(state["config"])
    manifest = read_manifest(data_dir, split)
    if int(manifest["num_classes"]) != cfg.model.num_classes:
        raise ValueError(
            f"{checkpoint} was trained with {cfg.model.num_classes} classes, {data_dir}/{split} has "
            f"{manifest['num_classes']}"
        )
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.eval().to(device)
    data = cfg.data
    return Predictor(model, manifest, cfg.model.postprocess, data.eval_size, device, data.eval_long_side), cfg
