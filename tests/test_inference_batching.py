"""A split's predictions do not depend on how its images are batched (the real COCO sample, two sizes).

The decoder's k-means updates pool over every pixel of the padded input, so padding an image to the
largest image of its batch changes its prediction; pipeline.inference pads each image by its own size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmax_model import build_model, preset
from pipeline.cli import main as kmax_main
from pipeline.inference import Predictor, eval_batch, iter_decoded, pad_size
from pipeline.records import read_manifest

pytestmark = pytest.mark.ray


class _Recorder(torch.nn.Module):
    """The model, recording the input size of every forward pass."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, images, **kwargs):
        self.sizes.append(tuple(images.shape[-2:]))
        return self.inner(images, **kwargs)


def test_predictions_are_the_same_in_a_batch_and_one_by_one(coco_sample_dir, ray_session, tmp_path):
    out = tmp_path / "prep"
    args = ["prepare", "--dataset", "coco", "--root", str(coco_sample_dir), "--split", "val"]
    assert kmax_main([*args, "--out", str(out), "--max-size", "161", "--quiet"]) == 0
    manifest = read_manifest(out, "val")
    records = [r for _, r in iter_decoded(out, "val")]
    own = [pad_size([(r["height"], r["width"])]) for r in records]
    assert own[0] != own[1]  # 107x161 and 91x161: a shared batch would pad one of them

    cfg = preset("tiny")
    cfg.num_classes = int(manifest["num_classes"])
    torch.manual_seed(0)
    model = _Recorder(build_model(cfg).eval())
    predictor = Predictor(model, manifest, cfg.postprocess)
    together = predictor(records)
    assert sorted(model.sizes) == sorted(own)  # every image went through the model at its own padded size
    alone = [predictor([r])[0] for r in records]
    for a, b in zip(together, alone):
        assert np.array_equal(a["label_map"], b["label_map"]) and a["segments"] == b["segments"]

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
