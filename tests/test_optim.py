"""AdamW parameter groups and the warmup + poly schedule (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.train.optim import build_optimizer, build_scheduler, param_groups, warmup_poly_factor


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.cluster_centers = nn.Parameter(torch.zeros(5, 4))
        self.rel_pos_table = nn.Parameter(torch.zeros(7, 4))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_param_groups_split_lr_and_decay():
    groups = {g["name"]: g for g in param_groups(_Toy(), lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert groups["backbone_decay"]["param_names"] == ["backbone.0.weight"]
    assert sorted(groups["backbone_no_decay"]["param_names"]) == [
        "backbone.0.bias",
        "backbone.1.bias",
        "backbone.1.weight",
    ]
    assert groups["head_decay"]["param_names"] == ["head.weight"]
    assert sorted(groups["head_no_decay"]["param_names"]) == ["cluster_centers", "head.bias", "rel_pos_table"]
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["head_decay"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["head_decay"]["weight_decay"] == 0.05
    # every trainable parameter exactly once, frozen ones never
    names = [n for g in groups.values() for n in g["param_names"]]
    assert len(names) == len(set(names)) == 8 and "frozen" not in names


def test_ddp_prefix_is_stripped():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = _Toy()

    groups = {
        g["name"]: g for g in param_groups(Wrapped(), lr=1.0, weight_decay=0.1, backbone_multiplier=0.5)
    }
    assert groups["backbone_decay"]["param_names"] == ["module.backbone.0.weight"]
    assert groups["backbone_decay"]["lr"] == 0.5


def test_warmup_poly_values():
    # warmup: linear from warmup_start to 1 over 10 steps
    assert warmup_poly_factor(0, 100, 10, 0.9, 0.0) == 0.0
    assert warmup_poly_factor(5, 100, 10, 0.9, 0.0) == pytest.approx(0.5)
    assert warmup_poly_factor(5, 100, 10, 0.9, 0.001) == pytest.approx(0.001 + 0.999 * 0.5)
    # poly: (1 - t/T)^p with warmup counted in T
    assert warmup_poly_factor(10, 100, 10, 0.9, 0.0) == pytest.approx(0.9**0.9)
    assert warmup_poly_factor(50, 100, 10, 0.9, 0.0) == pytest.approx(0.5**0.9)
    assert warmup_poly_factor(100, 100, 10, 0.9, 0.0) == 0.0


def test_scheduler_drives_every_group_and_resumes():
    model = _Toy()
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.05, backbone_multiplier=0.1)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, power=1.0)
    lrs = []
    for _ in range(8):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    names = [g["name"] for g in opt.param_groups]
    head = names.index("head_decay")
    bb = names.index("backbone_decay")
    assert lrs[2][head] == pytest.approx(2e-3 * 2 / 4)
    assert lrs[6][head] == pytest.approx(2e-3 * (1 - 6 / 20))
    assert lrs[6][bb] == pytest.approx(2e-4 * (1 - 6 / 20))
    # state round trip: a fresh scheduler loaded from the state dict continues identically
    opt2 = build_optimizer(model, lr=2e-3, weight_decay=0.05, backbone_multiplier=0.1)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4, power=1.0)
    opt2.load_state_dict(opt.state_dict())  # a resume loads both, as pipeline.checkpoint.restore does
    sched2.load_state_dict(sched.state_dict())
    assert opt.param_groups[head]["lr"] == pytest.approx(2e-3 * (1 - 8 / 20))
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert math.isclose(opt2.param_groups[head]["lr"], opt.param_groups[head]["lr"])
    assert opt2.param_groups[head]["lr"] == pytest.approx(2e-3 * (1 - 11 / 20))


def test_bad_schedule_is_named():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="train.warmup_steps"):
        build_scheduler(opt, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="train.steps"):
        build_scheduler(opt, total_steps=0, warmup_steps=0)
