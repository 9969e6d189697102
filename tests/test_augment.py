"""Augmentation and target building: hand-computed targets, reproducible randomness, real Ray batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kmax_model.targets import IGNORE_INDEX, VOID_LABEL
from pipeline.config import AugmentConfig
from pipeline.data.augment import augment_record, augment_rows
from pipeline.data.targets import build_target, collate_augmented

D = 256
SEGS = [
    {"id": 3 * D, "category_id": 10, "class_id": 3, "isthing": False, "iscrowd": 0, "area": 0},
    {"id": 0 * D + 1, "category_id": 1, "class_id": 0, "isthing": True, "iscrowd": 0, "area": 0},
    {"id": 0 * D + 2, "category_id": 1, "class_id": 0, "isthing": True, "iscrowd": 1, "area": 0},
    {"id": 1 * D + 1, "category_id": 2, "class_id": 1, "isthing": True, "iscrowd": 0, "area": 0},
]


def test_config_validation_and_grid():
    assert AugmentConfig(crop_size=97).crop_size == (97, 97)
    assert AugmentConfig(crop_size=(65, 129), output_stride=4).grid_size == (17, 33)
    assert AugmentConfig(crop_size=96, output_stride=4).grid_size == (24, 24)
    for kw, field in (
        ({"crop_size": 0}, "augment.crop_size"),
        ({"min_scale": 2.0, "max_scale": 1.0}, "augment.min_scale"),
        ({"flip_prob": 1.5}, "augment.flip_prob"),
        ({"output_stride": 0}, "augment.output_stride"),
    ):
        with pytest.raises(ValueError, match=field):
            AugmentConfig(**kw)


def test_build_target_hand_computed():
    g = np.array(
        [
            [3 * D, 3 * D, 1, 1],
            [3 * D, 2, 2, 1],
            [VOID_LABEL, 3 * D, D + 1, D + 1],
        ],
        np.int32,
    )
    t = build_target(g, SEGS)
    assert t["labels"].tolist() == [3, 0, 1]  # stuff, thing instance, thing instance; crowd gets no mask
    assert t["masks"].shape == (3, 3, 4) and t["masks"].dtype == torch.float32
    assert t["masks"][0].int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert t["masks"][1].int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert t["valid"].tolist() == [
        [True, True, True, True],
        [True, False, False, True],
        [False, True, True, True],
    ]
    assert t["semantic"].tolist() == [[3, 3, 0, 0], [3, 0, 0, 0], [IGNORE_INDEX, 3, 1, 1]]
    assert t["area"].tolist() == [[4, 4, 3, 3], [4, 0, 0, 3], [0, 4, 2, 2]]
    with pytest.raises(ValueError, match="no segment"):
        build_target(np.array([[77]], np.int32), SEGS)
    empty = build_target(np.full((2, 2), VOID_LABEL, np.int32), SEGS)
    assert empty["masks"].shape == (0, 2, 2) and empty["labels"].shape == (0,)

    # crowd_as_ignore=False: the crowd region is one more mask of its class, in segment order, and valid
    crowd = build_target(g, SEGS, label_input=np.kron(g, np.ones((2, 2), np.int32)), crowd_as_ignore=False)
    assert crowd["labels"].tolist() == [3, 0, 0, 1]
    assert crowd["masks"][2].int().tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert crowd["valid"].tolist() == [[True] * 4, [True] * 4, [False, True, True, True]]
    assert crowd["area"][1].tolist() == [4, 2, 2, 3]
    assert crowd["input_index"][2:4, 2:6].tolist() == [[2, 2, 2, 2]] * 2
    rows = {  # the collate passes the choice on
        "label_grid": g[None],
        "segments": np.array([json.dumps(SEGS)]),
        "image": np.zeros((1, 3, 4, 3), np.uint8),
        "pixel_valid": np.ones((1, 3, 4), bool),
    }
    assert collate_augmented(rows)["targets"][0]["labels"].tolist() == [3, 0, 1]
    assert collate_augmented(rows, crowd_as_ignore=False)["targets"][0]["labels"].tolist() == [3, 0, 0, 1]


def _sample(h=30, w=40):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.full((h, w), 3 * D, np.int32)
    label[5:15, 8:20] = 1
    label[20:, 30:] = VOID_LABEL
    return image, label


def test_identity_crop_pad_and_flip():
    image, label = _sample()
    cfg = AugmentConfig(crop_size=(41, 45), min_scale=1.0, max_scale=1.0, flip_prob=0.0, output_stride=4)
    out = augment_record(image, label, "r1", cfg, epoch=0)
    assert out["label_grid"].shape == cfg.grid_size == (11, 12)
    assert np.array_equal(out["image"][:30, :40], image) and not out["image"][30:].any()
    assert out["pixel_valid"].sum() == 30 * 40 and out["pixel_valid"][:30, :40].all()
    full = np.full((41, 45), VOID_LABEL, np.int32)
    full[:30, :40] = label
    assert np.array_equal(out["label_grid"], full[::4, ::4])  # strided subsampling, padding is void
    flipped = augment_record(
        image,
        label,
        "r1",
        AugmentConfig(crop_size=(41, 45), min_scale=1.0, max_scale=1.0, flip_prob=1.0),
        epoch=0,
    )
    assert np.array_equal(flipped["image"], out["image"][:, ::-1])
    assert np.array_equal(flipped["label_grid"], full[:, ::-1][::4, ::4])


def test_random_scale_crop_is_reproducible_per_epoch_and_record():
    image, label = _sample(60, 80)
    cfg = AugmentConfig(crop_size=33, min_scale=0.5, max_scale=2.0, seed=7)
    a = augment_record(image, label, "rec", cfg, epoch=1)
    b = augment_record(image, label, "rec", cfg, epoch=1)
    c = augment_record(image, label, "rec", cfg, epoch=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (33, 33, 3) and a["label_grid"].shape == (9, 9)
    assert set(np.unique(a["label_grid"]).tolist()) <= {3 * D, 1, VOID_LABEL}  # nearest: no blended ids


@pytest.mark.ray
def test_copies_of_a_small_split_are_augmented_as_their_own_epochs(ray_session, tmp_path):
    """A split smaller than data.min_epoch_rows is repeated within an epoch (pipeline.train.data_order); the
    pass column tells the copies apart and copy k of epoch e is augmented as epoch e * passes + k, so copies
    differ and epochs too."""
    from pipeline.data.records import PASS_COLUMN, iter_records
    from pipeline.data.synthetic import make_prepared_synthetic

    data = make_prepared_synthetic(tmp_path, train=3, val=1, height=48, width=48, progress=False)
    stored = list(iter_records(data, "train"))
    rows = [{**r, PASS_COLUMN: k} for k in range(3) for r in stored]
    cfg = AugmentConfig(crop_size=33, min_scale=0.75, max_scale=1.25, seed=3)
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    epoch1 = augment_rows(batch, cfg, epoch=1, passes=3)
    for i in range(9):  # copy k of epoch 1 == the record augmented alone as epoch 1 * 3 + k
        alone = augment_rows({k: v[i : i + 1] for k, v in batch.items() if k != PASS_COLUMN}, cfg, 3 + i // 3)
        assert np.array_equal(epoch1["image"][i], alone["image"][0])
    assert not np.array_equal(epoch1["image"][0], epoch1["image"][3])  # two copies of one record differ


def test_normalised_batch_equals_the_model_normalisation_bit_for_bit():
    """The numpy normalisation of the collate == kmax_model.targets.normalize_images * valid (torch)."""
    import torch

    from kmax_model.targets import normalize_images
    from pipeline.data.targets import normalised_batch

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for _ in range(3)]
    valid = [rng.random((37, 53)) > 0.3 for _ in range(3)]
    got = normalised_batch(images, valid)
    nchw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    want = normalize_images(nchw) * torch.from_numpy(np.stack(valid))[:, None]
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)
    assert float(got[~torch.from_numpy(np.stack(valid))[:, None].expand_as(got)].abs().max()) == 0.0
