"""The bf16 and fp16 training paths, run on CPU: finite steps, fp32 islands, and an exact resume of the
gradient scaler (pipeline.train.step under ``torch.autocast("cpu")``, the CPU ``GradScaler``).

The GPU runs the same code under ``torch.autocast("cuda")``; tests/test_gpu.py covers what only a GPU has."""

from __future__ import annotations

import math

import pytest
import torch

import kmax_model.criterion
import kmax_model.transformer_decoder
from kmax_model.config import preset
from kmax_model.criterion import build_criterion
from kmax_model.model import build_model
from pipeline import checkpoint as ckpt
from pipeline.train.step import Trainee, train_step
from tests.test_overfit import _samples, _target

pytestmark = pytest.mark.usefixtures("single_torch_thread")

AMP_CASES = [
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float16, True, id="fp16+scaler"),
]


@pytest.fixture(scope="module")
def batch():
    samples, images = _samples()
    return images[:1], [_target(samples[0][1])]  # one 65 px image: fp16 on CPU is slow (no native kernels)


def _trainee(dtype: torch.dtype, scaled: bool, **scaler_args) -> Trainee:
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", **scaler_args) if scaled else None
    return Trainee(model, build_criterion(cfg), optimizer, schedule, scaler, dtype)


def _step(trainee: Trainee, batch, step: int) -> dict[str, float]:
    """One step seeded by its index, as the training worker seeds them (so a resumed run can repeat it)."""
    torch.manual_seed(step)
    return train_step(trainee, lambda: batch, generator=torch.Generator().manual_seed(step))


class DtypeProbe:
    """Wraps a function and records the dtypes of its tensor arguments and result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        result = out if isinstance(out, torch.Tensor) else getattr(out, "matched_dice", None)
        self.calls.append(([t.dtype for t in tensors], result.dtype if result is not None else None))
        return out


@pytest.mark.parametrize(("dtype", "scaled"), AMP_CASES)
def test_amp_steps_are_finite_and_the_islands_stay_fp32(batch, dtype, scaled, monkeypatch):
    """Two steps under CPU autocast: finite losses and gradient norms; the network's mask logits come out
    in the autocast dtype (autocast is really on), while the k-means assignment and centre update
    (kmax_model.clustering) and the Hungarian matcher compute in fp32 on those low-precision inputs."""
    probes = {
        "assign": DtypeProbe(kmax_model.transformer_decoder.assign_pixels),
        "update": DtypeProbe(kmax_model.transformer_decoder.cluster_update),
        "match": DtypeProbe(kmax_model.criterion.hungarian_match),
    }
    monkeypatch.setattr(kmax_model.transformer_decoder, "assign_pixels", probes["assign"])
    monkeypatch.setattr(kmax_model.transformer_decoder, "cluster_update", probes["update"])
    monkeypatch.setattr(kmax_model.criterion, "hungarian_match", probes["match"])
    trainee = _trainee(dtype, scaled, init_scale=2.0**8)
    with torch.autocast("cpu", dtype=dtype):
        mask_logits = trainee.model(batch[0])["mask_logits"]
    assert mask_logits.dtype == dtype
    for step in range(2):
        metrics = _step(trainee, batch, step)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]), (step, metrics)
    assign_in = {d for ins, _ in probes["assign"].calls for d in ins}
    update_in = {d for ins, _ in probes["update"].calls for d in ins}
    assert dtype in assign_in | update_in  # the islands receive low-precision tensors...
    for name in ("assign", "update", "match"):  # ...and answer in fp32
        assert probes[name].calls and {out for _, out in probes[name].calls} == {torch.float32}, name
    assert {d for ins, _ in probes["match"].calls for d in ins if d.is_floating_point} == {torch.float32}


def test_fp16_scaler_state_resumes_equal(batch, tmp_path):
    """fp16 with a scaler that starts at 2**16 (measured: the first two steps overflow, are skipped and halve
    the scale) and doubles it after every clean step: 3 straight steps equal 1 step, a checkpoint through
    pipeline.checkpoint, a fresh model / optimiser / schedule / scaler restored from it, and 2 more steps —
    weights and scaler state alike."""
    scaler_args = {"init_scale": 2.0**16, "growth_interval": 1}
    straight = _trainee(torch.float16, True, **scaler_args)
    scales = []
    for step in range(3):
        _step(straight, batch, step)
        scales.append(straight.scaler.get_scale())
    assert scales[0] < 2.0**16 and len(set(scales)) > 1, (
        scales
    )  # backed off, and moved again (2, 1, 2 x 2**14)

    first = _trainee(torch.float16, True, **scaler_args)
    _step(first, batch, 0)
    state = ckpt.build_state(step=1, model=first.model, optimizer=first.optimizer, scheduler=first.scheduler,
                             scaler=first.scaler, config={})  # fmt: skip
    resumed = _trainee(torch.float16, True)  # default scaler settings: all must come from the checkpoint
    restored = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "ckpt", state))
    start = ckpt.restore(restored, model=resumed.model, optimizer=resumed.optimizer,
                         scheduler=resumed.scheduler, scaler=resumed.scaler)  # fmt: skip
    assert start == 1 and resumed.scaler.get_scale() == scales[0]
    for step in range(start, 3):
        _step(resumed, batch, step)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
