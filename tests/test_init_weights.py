"""Initial weights of a training run: ``model.backbone.pretrained`` and ``model.init_from`` (fine-tuning).

Checked on the driver before Ray starts (one line naming the field, the file and the keys); loaded on every
worker before DDP; sha256 and load report in MLflow; a resumed run reads neither file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kmax_model.config import preset
from kmax_model.model import build_model
from pipeline.config import with_fields
from pipeline.train.init_weights import read_initial_weights
from tests.train_helpers import make_data, metric_steps, model_weights, tiny_config

TINY_LR = "train.lr=1e-12"  # AdamW moves a weight by ~lr per step: below fp32 resolution of the weights


def _backbone_file(path: Path, seed: int = 123) -> Path:
    """A tiny backbone's weights from another seed than any run's: a run that ignored the file differs."""
    torch.manual_seed(seed)
    torch.save(build_model(preset("tiny")).backbone.state_dict(), path)
    return path


def _parameters_equal(model_sd: dict, reference: dict, prefix: str = "") -> None:
    """Every parameter (BatchNorm running statistics excluded: they follow the batches, not the lr) of
    ``reference`` equals ``model_sd[prefix + key]`` within 1e-9."""
    for key, value in reference.items():
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        torch.testing.assert_close(model_sd[prefix + key], value, rtol=0, atol=1e-9, msg=key)


@pytest.mark.ray
def test_driver_refuses_bad_initial_weights_before_ray(ray_session, tmp_path, monkeypatch):
    import pipeline.ray_setup
    from pipeline.train.driver import fit

    data = make_data(tmp_path / "data")  # (writing the dataset uses Ray Data)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a run with bad initial weights")

    monkeypatch.setattr(pipeline.ray_setup, "init_ray", no_ray)
    missing = tiny_config(data, tmp_path / "run", f"model.backbone.pretrained={tmp_path / 'absent.pt'}")
    with pytest.raises(FileNotFoundError, match=r"model\.backbone\.pretrained=.*absent\.pt: no such file"):
        fit(missing)
    sd = build_model(preset("tiny")).backbone.state_dict()
    key = next(k for k, v in sd.items() if v.ndim == 4)
    sd[key] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, tmp_path / "wrong.pt")
    wrong = tiny_config(data, tmp_path / "run", f"model.backbone.pretrained={tmp_path / 'wrong.pt'}")
    with pytest.raises(ValueError, match=rf"model\.backbone\.pretrained: .*shape mismatch 1: {key}"):
        fit(wrong)


def test_init_from_is_matched_key_by_key(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run")
    sd = build_model(cfg.model).state_dict()
    dropped = "transformer_decoder.layers.0.predictor.class_head.weight"
    torch.save({"model": {k: v for k, v in sd.items() if k != dropped}, "step": 7}, tmp_path / "short.pt")
    with pytest.raises(
        ValueError, match=rf"model\.init_from=.*short\.pt does not match .*missing 1: {dropped}"
    ):
        read_initial_weights(with_fields(cfg, {"model.init_from": str(tmp_path / "short.pt")}))
    torch.save(sd, tmp_path / "bare.pt")  # a state dict, not a kmax checkpoint
    with pytest.raises(ValueError, match=r"bare\.pt: not a kmax checkpoint"):
        read_initial_weights(with_fields(cfg, {"model.init_from": str(tmp_path / "bare.pt")}))
    torch.save({"model": sd, "step": 7}, tmp_path / "ok.pt")
    weights = read_initial_weights(with_fields(cfg, {"model.init_from": str(tmp_path / "ok.pt")}))
    record = weights.records["model.init_from"]
    assert record["sha256"] == hashlib.sha256((tmp_path / "ok.pt").read_bytes()).hexdigest()
    assert record["loaded"] == len(sd) and record["step"] == 7


@pytest.mark.ray
@pytest.mark.slow
def test_pretrained_backbone_then_fine_tuning_then_resume(ray_session, tmp_path):
    """Run A: pretrained backbone at lr 1e-12 for 2 steps ends with the file's backbone; run B fine-tunes
    from A's checkpoint (init_from) and ends with A's weights, at its own step 2; A resumed to step 4 after
    the backbone file is deleted (a resumed run does not read it)."""
    from pipeline.train.driver import fit

    data = make_data(tmp_path / "data")
    backbone = _backbone_file(tmp_path / "backbone.pt")
    file_sd = torch.load(backbone, weights_only=True)
    a_cfg = tiny_config(
        data, tmp_path / "a", TINY_LR, "train.steps=2", f"model.backbone.pretrained={backbone}"
    )
    a = fit(a_cfg)
    a_sd = model_weights(Path(a.checkpoint) / "state.pt")
    _parameters_equal(a_sd, file_sd, prefix="backbone.")
    torch.manual_seed(a_cfg.train.seed)  # what the run would have started from without the file
    unloaded = build_model(a.config.model).backbone.state_dict()
    assert (
        max((unloaded[k] - v).abs().max().item() for k, v in file_sd.items() if v.is_floating_point()) > 0.01
    )

    client = MlflowClient(a.tracking_uri)
    params = client.get_run(a.mlflow_run_id).data.params
    assert params["model.backbone.pretrained.sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    report = json.loads(
        Path(client.download_artifacts(a.mlflow_run_id, "initial_weights.json", str(tmp_path))).read_text()
    )
    assert report["model.backbone.pretrained"]["loaded"] == len(file_sd)
    norms = metric_steps(a.tracking_uri, a.mlflow_run_id, "train/grad_norm")
    assert [s for s, _ in norms] == [1, 2] and all(math.isfinite(v) and v > 0 for _, v in norms)

    b = fit(
        tiny_config(
            data, tmp_path / "b", TINY_LR, "train.steps=2", f"model.init_from={a.checkpoint}/state.pt"
        )
    )
    _parameters_equal(model_weights(Path(b.checkpoint) / "state.pt"), a_sd)
    assert (
        b.steps == 2
        and "model.init_from.sha256" in MlflowClient(b.tracking_uri).get_run(b.mlflow_run_id).data.params
    )

    backbone.unlink()
    resumed = fit(with_fields(a_cfg, {"train.steps": 4}))
    assert resumed.steps == 4 and resumed.mlflow_run_id == a.mlflow_run_id
