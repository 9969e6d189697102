"""What only a CUDA machine can run: AMP steps under ``torch.autocast("cuda")``, DDP over NCCL with
SyncBatchNorm, as the Ray Train worker sets them up (pipeline.train.worker). Skipped without CUDA; the CPU
halves of the same paths are tests/test_mixed_precision.py."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from kmax_model.config import preset
from kmax_model.criterion import build_criterion
from kmax_model.model import build_model
from pipeline.train.step import Trainee, train_step
from tests.test_overfit import _samples, _target

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _batch(device: torch.device):
    samples, images = _samples()
    targets = [{k: v.to(device) for k, v in _target(label).items()} for _, label in samples[:2]]
    return images[:2].to(device), targets


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_steps_on_cuda(precision):
    """Four steps in the worker's precision set-up (fp16: an enabled scaler) give finite losses and a
    finite gradient norm once the scaler has settled; the mask logits really are in the AMP dtype."""
    from pipeline.train.worker import AMP_DTYPES

    device = torch.device("cuda")
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    trainee = Trainee(model, build_criterion(cfg), optimizer, None, scaler, AMP_DTYPES[precision])
    batch = _batch(device)
    with torch.autocast("cuda", dtype=AMP_DTYPES[precision]):
        assert model(batch[0])["mask_logits"].dtype == AMP_DTYPES[precision]
    norms = [train_step(trainee, lambda: batch)["grad_norm"] for _ in range(4)]
    assert math.isfinite(norms[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg)).to(device)
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    trainee = Trainee(model, build_criterion(cfg), torch.optim.AdamW(model.parameters(), lr=1e-3))
    metrics = train_step(trainee, lambda: _batch(device))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"synced": synced, "loss": metrics["loss"], "spread": max(
            (g - gathered[0]).abs().max().item() for g in gathered)}, out)  # fmt: skip
    dist.destroy_process_group()


def test_ddp_over_nccl_with_sync_batchnorm(tmp_path):
    """One step of DDP over NCCL on every visible GPU (world 1 on a single-GPU machine) with every
    BatchNorm converted to SyncBatchNorm: a finite loss and the same weights on every rank afterwards."""
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    result = torch.load(out, weights_only=True)
    bn = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(preset("tiny")).modules()
    )
    assert result["synced"] == bn > 0
    assert math.isfinite(result["loss"]) and result["spread"] == 0.0
