"""A split's predictions do not depend on how its images are batched (the real COCO sample, two sizes),
and ``eval_long_side`` resizes the model input while the label maps keep the stored size.

The decoder's k-means updates pool over every pixel of the padded input, so padding an image to the
largest image of its batch changes its prediction; pipeline.eval.predictor pads each image by its own size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kmax_model import build_model, preset
from kmax_model.postprocess import upsample_mask_logits
from pipeline.cli import main as kmax_main
from pipeline.config import DataConfig
from pipeline.data.records import iter_decoded, read_manifest
from pipeline.eval.predictor import Predictor, eval_batch, input_size, pad_size

pytestmark = pytest.mark.ray


class _Recorder(torch.nn.Module):
    """The model, recording the input size of every forward pass."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, images, **kwargs):
        self.sizes.append(tuple(images.shape[-2:]))
        return self.inner(images, **kwargs)


@pytest.fixture(scope="module")
def sample_161(coco_sample_dir, ray_session, tmp_path_factory):
    """(manifest, decoded records, untrained tiny model config) of the COCO sample prepared at 161 px."""
    out = tmp_path_factory.mktemp("prep161")
    args = ["prepare", "--dataset", "coco", "--root", str(coco_sample_dir), "--split", "val"]
    assert kmax_main([*args, "--out", str(out), "--max-size", "161", "--quiet"]) == 0
    manifest = read_manifest(out, "val")
    cfg = preset("tiny")
    cfg.num_classes = int(manifest["num_classes"])
    return manifest, [r for _, r in iter_decoded(out, "val")], cfg


def test_predictions_are_the_same_in_a_batch_and_one_by_one(sample_161):
    manifest, records, cfg = sample_161
    own = [pad_size([(r["height"], r["width"])]) for r in records]
    assert own[0] != own[1]  # 107x161 and 91x161: a shared batch would pad one of them

    torch.manual_seed(0)
    model = _Recorder(build_model(cfg).eval())
    predictor = Predictor(model, manifest, cfg.postprocess)
    together = predictor(records)
    assert sorted(model.sizes) == sorted(own)  # every image went through the model at its own padded size
    alone = [predictor([r])[0] for r in records]
    for a, b in zip(together, alone):
        assert np.array_equal(a["label_map"], b["label_map"]) and a["segments"] == b["segments"]
        assert all(
            np.array_equal(a["instances"][k], b["instances"][k]) for k in ("masks", "scores", "class_ids")
        )

    # why it matters: the smaller image padded to the larger one's size gets other logits (4e-4 of their
    # scale for this untrained model, far above float noise; on a trained model it moved the PQ of these two
    # images from 71.0 one by one to 66.9 in one batch)
    with torch.no_grad():
        images, sizes = eval_batch(records)
        small = int(np.argmin([h * w for h, w in sizes]))
        padded = model.inner(images[small : small + 1])["mask_logits"]
        unpadded = model.inner(eval_batch([records[small]])[0])["mask_logits"]
    gh, gw = unpadded.shape[-2:]
    diff = (padded[..., :gh, :gw] - unpadded).abs().max() / unpadded.abs().max()
    assert diff > 1e-5, float(diff)


def test_eval_long_side_resizes_the_input_and_keeps_the_stored_size(sample_161):
    """The stored long side is a no-op; twice it runs the model on 2x images (each padded by its own
    size) and still returns label maps of the stored size whose segment areas are their pixel counts."""
    manifest, records, cfg = sample_161
    torch.manual_seed(0)
    model = _Recorder(build_model(cfg).eval())
    plain = Predictor(model, manifest, cfg.postprocess)(records)
    same = Predictor(model, manifest, cfg.postprocess, eval_long_side=161)(records)
    for a, b in zip(plain, same):
        assert np.array_equal(a["label_map"], b["label_map"]) and a["segments"] == b["segments"]
    model.sizes.clear()
    # An untrained model is unsure of everything: keep every slot and pixel so that segments exist.
    keep_all = dataclasses.replace(
        cfg.postprocess, thing_threshold=0.0, stuff_threshold=0.0, pixel_confidence_threshold=0.0
    )
    doubled = Predictor(model, manifest, keep_all, eval_long_side=322)(records)
    stored = [(r["height"], r["width"]) for r in records]
    assert [input_size(h, w, 322) for h, w in stored] == [(214, 322), (182, 322)]
    assert sorted(model.sizes) == sorted([(185, 325), (217, 325)])  # 4k + 1 around the 2x sizes
    for pred, size in zip(doubled, stored):
        assert pred["label_map"].shape == size
        assert pred["instances"]["masks"].shape[1:] == size  # mask AP is scored at the stored size too
        ids, counts = np.unique(pred["label_map"], return_counts=True)
        areas = dict(zip(ids.tolist(), counts.tolist()))
        assert pred["segments"] and all(areas[s["id"]] == s["area"] for s in pred["segments"])
    with pytest.raises(ValueError, match="data.eval_long_side must be > 0"):
        DataConfig(eval_long_side=0)


def test_logits_are_resized_back_to_the_image_with_pixel_centres_aligned() -> None:
    """A crop of ``2h x 2w`` resized to ``h x w`` (align_corners=False): output pixel j samples source
    position 2j + 0.5, so a ramp ``x`` becomes ``2x + 0.5`` exactly, and ``y`` likewise."""
    gy, gx = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing="ij")
    logits = torch.stack([gx, gy])  # 2 x 8 x 12, already at the padded input size
    back = upsample_mask_logits(logits, (8, 12), (8, 12), image_size=(4, 6))
    oy, ox = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    torch.testing.assert_close(back[0], 2 * ox + 0.5)
    torch.testing.assert_close(back[1], 2 * oy + 0.5)
    torch.testing.assert_close(upsample_mask_logits(logits, (8, 12), (8, 12), image_size=(8, 12)), logits)
