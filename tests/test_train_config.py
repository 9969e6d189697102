"""ExperimentConfig: presets, YAML + dotted overrides, validation naming the field, manifest binding."""

from __future__ import annotations

import pytest

from kmax_model.config_utils import ConfigError, save_yaml
from pipeline.config import ExperimentConfig, bind_manifest, load_experiment


def test_preset_overrides_and_round_trip(tmp_path):
    cfg = load_experiment(
        "tiny", ["train.lr=1e-3", "model.decoder.assignment=cluster_softmax", "data.batch_size=4"]
    )
    assert (
        cfg.train.lr == 1e-3
        and cfg.model.decoder.assignment == "cluster_softmax"
        and cfg.data.batch_size == 4
    )
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    path = save_yaml(cfg, tmp_path / "exp.yaml")
    again = load_experiment(str(path), ["train.steps=70"])
    assert again.train.steps == 70 and again.model == cfg.model and again.data.augment == cfg.data.augment


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.warmup_steps=5000", "train.warmup_steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("train.precision=fp16", "train.precision=fp16 needs scaling.use_gpu"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("train.nope=1", "train.nope"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_experiment("tiny", [override])


def test_bind_manifest_takes_classes_from_data():
    cfg = bind_manifest(load_experiment("tiny"), {"num_classes": 3, "thing_class_ids": [0, 2]})
    assert cfg.model.num_classes == 3 and cfg.data.thing_class_ids == (0, 2)


def test_resources_per_worker():
    cfg = load_experiment("tiny", ["scaling.cpus_per_worker=0.5", "scaling.use_gpu=true"])
    assert cfg.scaling.resources_per_worker() == {"CPU": 0.5, "GPU": 1.0}
