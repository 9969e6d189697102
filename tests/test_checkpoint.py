"""Checkpoint format (atomic write, weights_only round trip, RNG restore) and the resume refusal of an
incompatible config."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.train import resume
from pipeline.train.optim import build_optimizer, build_scheduler


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, backbone_multiplier=0.1)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)
    return model, opt, sched, scaler


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 3)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


CONFIG = {"model": {"num_classes": 3, "decoder": {"num_clusters": 8}}, "train": {"steps": 10, "lr": 0.01}}


def test_round_trip_weights_only_and_rng(tmp_path):
    model, opt, sched, scaler = _parts()
    _train(model, opt, sched, 3)
    torch.manual_seed(123), np.random.seed(7), random.seed(9)
    state = ckpt.build_state(
        step=3, model=model, optimizer=opt, scheduler=sched, scaler=scaler, config=CONFIG, mlflow_run_id="abc"
    )
    path = ckpt.save_checkpoint(tmp_path / "c", state)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    # weights_only=True must accept the file (no pickled numpy objects or dataclasses)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["mlflow_run_id"] == "abc" and raw["config"] == CONFIG
    assert raw["scaler"]["scale"] == 128.0

    model2, opt2, sched2, scaler2 = _parts(seed=5)
    loaded = ckpt.load_checkpoint(tmp_path / "c")
    step = ckpt.restore(loaded, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert step == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    # continuing both gives identical weights (optimizer moments + scheduler restored)
    torch.manual_seed(0)
    _train(model, opt, sched, 2)
    torch.manual_seed(0)
    _train(model2, opt2, sched2, 2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    model, opt, sched, scaler = _parts()
    state = ckpt.build_state(step=1, model=model, optimizer=opt, scheduler=sched, scaler=None, config=CONFIG)
    path = Path(ckpt.save_checkpoint(tmp_path, state))
    before = path.read_bytes()

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, dict(state, step=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.pt"]  # no temp file left


def test_a_damaged_checkpoint_is_told_apart_by_its_record(tmp_path):
    """state.json records the file's size and sha256: a truncated or overwritten state.pt is refused as
    corrupt, naming the file; a checkpoint without a record (written before records existed) still loads."""
    model, opt, sched, _ = _parts()
    state = ckpt.build_state(step=4, model=model, optimizer=opt, scheduler=sched, scaler=None, config=CONFIG)
    path = Path(ckpt.save_checkpoint(tmp_path, state))
    record = json.loads((tmp_path / "state.json").read_text())
    data = path.read_bytes()
    assert record == {"format": 1, "step": 4, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"{path} does not match its record"):
        ckpt.load_checkpoint(tmp_path)
    path.write_bytes(bytes(len(data)))  # same size, other bytes
    with pytest.raises(ckpt.CorruptCheckpointError, match="does not match its record"):
        ckpt.load_checkpoint(tmp_path)
    path.write_bytes(data)
    (tmp_path / "state.json").unlink()
    assert ckpt.load_checkpoint(tmp_path)["step"] == 4


def test_incompatible_config_is_refused_naming_fields():
    current = {
        "model": {"num_classes": 3, "decoder": {"num_clusters": 16}},
        "train": {"steps": 50, "lr": 0.02},
    }
    with pytest.raises(resume.IncompatibleCheckpointError) as err:
        resume.check_compatible(CONFIG, current, "runs/x/checkpoint_000003")
    msg = str(err.value)
    assert "model.decoder.num_clusters: checkpoint=8 now=16" in msg
    assert "train.lr: checkpoint=0.01 now=0.02" in msg
    assert "train.steps" not in msg  # a longer run may resume
    assert "runs/x/checkpoint_000003" in msg
    # equal configs (tuples vs lists from YAML) pass
    resume.check_compatible({"a": {"b": (1, 2)}}, {"a": {"b": [1, 2]}}, "x")


def test_field_added_after_the_checkpoint_passes_only_at_its_default():
    saved = {"data": {"batch_size": 2}}  # written before data.eval_long_side existed
    defaults = {"data": {"batch_size": 16, "eval_long_side": None}}
    resume.check_compatible(saved, {"data": {"batch_size": 2, "eval_long_side": None}}, "x", defaults)
    refused = resume.IncompatibleCheckpointError
    with pytest.raises(refused, match="data.eval_long_side: checkpoint='<absent>' now=960"):
        resume.check_compatible(saved, {"data": {"batch_size": 2, "eval_long_side": 960}}, "x", defaults)
    with pytest.raises(refused, match="data.eval_long_side"):  # no defaults: refused
        resume.check_compatible(saved, {"data": {"batch_size": 2, "eval_long_side": None}}, "x")
    with pytest.raises(refused, match="data.batch_size: checkpoint=2 now='<absent>'"):
        resume.check_compatible(saved, {"data": {}}, "x", defaults)  # a removed field is still a difference


def test_foreign_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a kmax checkpoint"):
        ckpt.load_checkpoint(tmp_path)
