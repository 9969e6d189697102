"""The one training step (pipeline.train.step): accumulation, averaging, schedule, DDP sync, loss weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pipeline.train.step import Trainee, train_step


class SquaredError:
    """A criterion in the kmax_model contract: a dict of unweighted losses, weighted by ``total``."""

    weights = {"loss_sq": 2.0, "loss_abs": 0.5}

    def __call__(self, outputs, targets, generator=None):
        diff = outputs - torch.stack(targets)
        return {"loss_sq": (diff**2).mean(), "loss_abs": diff.abs().mean()}

    def total(self, losses):
        return sum(self.weights[k] * v for k, v in losses.items())


class CountingSync(nn.Linear):
    """A linear model with DDP's ``no_sync`` context, counting the micro-batches run inside it."""

    def __init__(self):
        super().__init__(3, 2)
        self.unsynced = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield


def _data(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), list(torch.randn(n, 2, generator=g))


def _trainee(model, lr: float = 0.1, schedule: bool = False) -> Trainee:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)) if schedule else None
    return Trainee(model, SquaredError(), opt, sched)


def test_accumulating_two_halves_equals_one_full_batch_step():
    """Both losses are means over equal halves, so the accumulated gradient of total/2 per half is the
    full batch's gradient: the weights after one step agree (SGD makes the update the gradient itself)."""
    x, y = _data()
    torch.manual_seed(0)
    full, halves = CountingSync(), CountingSync()
    halves.load_state_dict(full.state_dict())
    with torch.no_grad():
        before = full(x) - torch.stack(y)
    one = train_step(_trainee(full), lambda: (x, y))
    parts = iter([(x[:2], y[:2]), (x[2:], y[2:])])
    two = train_step(_trainee(halves), lambda: next(parts), grad_accum=2)
    for a, b in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert halves.unsynced == 1 and full.unsynced == 0  # no_sync on all but the last micro-batch
    # the returned numbers: the losses before the update, per-term means over the micro-batches, and
    # "loss" = the weighted total
    assert one["loss_sq"] == pytest.approx(float((before**2).mean()), rel=1e-6)
    assert one["loss_abs"] == pytest.approx(float(before.abs().mean()), rel=1e-6)
    assert one["loss"] == pytest.approx(2.0 * one["loss_sq"] + 0.5 * one["loss_abs"], rel=1e-6)
    assert two["loss"] == pytest.approx(2.0 * two["loss_sq"] + 0.5 * two["loss_abs"], rel=1e-6)
    assert two["loss_sq"] == pytest.approx(one["loss_sq"], rel=1e-6)  # equal halves: mean of means


def test_the_schedule_steps_once_and_the_step_reports_the_lr_it_used():
    x, y = _data()
    trainee = _trainee(nn.Linear(3, 2), lr=0.4, schedule=True)
    lrs = [train_step(trainee, lambda: (x, y), grad_accum=2)["lr"] for _ in range(3)]
    assert lrs == pytest.approx([0.4, 0.2, 0.4 / 3])
    assert trainee.scheduler.last_epoch == 3


def test_a_scaler_scales_the_backward_and_unscales_the_update():
    """A (disabled on CPU) GradScaler goes through scale/step/update; the update equals the plain one."""
    x, y = _data()
    torch.manual_seed(0)
    plain, scaled = nn.Linear(3, 2), nn.Linear(3, 2)
    scaled.load_state_dict(plain.state_dict())
    train_step(_trainee(plain), lambda: (x, y))
    trainee = _trainee(scaled)
    trainee.scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(trainee, lambda: (x, y))
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


def test_grad_accum_is_validated():
    with pytest.raises(ValueError, match="train.grad_accum"):
        train_step(_trainee(nn.Linear(3, 2)), lambda: _data(), grad_accum=0)


class Linear34(nn.Module):
    """outputs = 3 * a + 4 * b summed: the gradient of the output is exactly (3, 4), norm 5."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return (3 * self.a + 4 * self.b).expand(len(images), 2)


class MeanOutput(SquaredError):
    weights = {"loss_out": 1.0}

    def __call__(self, outputs, targets, generator=None):
        return {"loss_out": outputs.mean()}


@pytest.mark.parametrize(("clip", "scaler"), [(0.0, False), (1.0, False), (1.0, True), (10.0, True)])
def test_gradient_clipping_by_global_norm(clip, scaler):
    """Gradient (3, 4), global norm 5: ``grad_norm`` is 5 whatever the clip; SGD at lr 1 moves the weights
    by the gradient scaled to min(1, clip / 5), also when an fp16-style scaler scales the loss by 2**10
    (the norm and the clip apply to the unscaled gradients)."""
    model = Linear34()
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainee = Trainee(model, MeanOutput(), opt, scaler=grad_scaler, grad_clip_norm=clip)
    metrics = train_step(trainee, lambda: (torch.zeros(2, 3), []))
    assert metrics["grad_norm"] == pytest.approx(5.0, rel=1e-6)
    factor = min(1.0, clip / 5.0) if clip > 0 else 1.0
    assert model.a.item() == pytest.approx(-3.0 * factor, rel=1e-5)
    assert model.b.item() == pytest.approx(-4.0 * factor, rel=1e-5)
