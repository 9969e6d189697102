"""Model speed benchmark: forward+backward throughput, peak memory and achieved FLOP/s per assignment mode.

For each (preset, resolution, batch) and each ``decoder.assignment`` mode it prints images/s of a
training step (forward + backward of a sum over all outputs; no optimizer), the peak memory, the FLOPs
of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` and the achieved FLOP/s as a
fraction of this machine's fp32 matmul FLOP/s, measured in the same run.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); on CPU each configuration runs in a
fresh child process and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus its value just
before the model is built (peak resident-set growth: weights, gradients and step activations;
tracemalloc does not see torch buffers). The matmul peak is the best of two measurements, one before
and one after the model runs, because a shared machine makes a single measurement noisy.

    python benchmarks/bench_model.py                     # tiny 128x128 b8 + resnet50_coco 257x257 b1, CPU
    python benchmarks/bench_model.py --device cuda --configs resnet50_coco:513:4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without relying on the editable install (`python benchmarks/bench_model.py`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmax_model import apply_overrides, build_model, preset
from kmax_model.config import ASSIGNMENT_MODES

MODES = ASSIGNMENT_MODES
DEFAULT_CONFIGS = ("tiny:128:8", "resnet50_coco:257:1")
MATMUL_SIZE = 1024


def matmul_flops_per_s(device: str, repeats: int = 20) -> float:
    """Measured fp32 dense matmul FLOP/s (2 n^3 per n x n product), best of ``repeats``."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * MATMUL_SIZE**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model: torch.nn.Module, images: torch.Tensor) -> None:
    out = model(images)
    loss = out["class_logits"].mean() + out["mask_logits"].mean() + out["pixel_feature"].mean()
    for aux in out["aux_outputs"]:
        loss = loss + aux["class_logits"].mean() + aux["mask_logits"].mean() + aux["pixel_feature"].mean()
    if "semantic_logits" in out:
        loss = loss + out["semantic_logits"].mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_one(name: str, size: int, batch: int, mode: str, device: str, steps: int) -> dict:
    """Measure one configuration (in the current process)."""
    torch.manual_seed(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = apply_overrides(preset(name), {"decoder.assignment": mode})
    model = build_model(cfg).to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    _step(model, images)  # warm-up (allocator, kernels)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, images)
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    if device.startswith("cuda"):
        peak_mb, mem_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux.
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        mem_kind = "CPU maxrss growth from before model build (weights + grads + activations)"
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, images)
    return {
        "preset": name,
        "size": size,
        "batch": batch,
        "mode": mode,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "peak_mb": peak_mb,
        "mem_kind": mem_kind,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _child(args: tuple, queue: mp.Queue) -> None:
    torch.set_num_threads(args[-1])
    queue.put(run_one(*args[:-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="PRESET:SIZE:BATCH ...")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_flops_per_s(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} threads={args.threads} load_avg_1min={load:.1f} "
        f"fp32 matmul {MATMUL_SIZE}^3: {peak / 1e9:.1f} GFLOP/s (measured now)",
        flush=True,
    )
    rows = []
    ctx = mp.get_context("spawn")
    for spec in args.configs:
        name, size, batch = spec.split(":")
        for mode in args.modes:
            job = (name, int(size), int(batch), mode, args.device, args.steps)
            if args.device == "cpu":  # fresh process: ru_maxrss is a per-process high-water mark
                queue = ctx.Queue()
                proc = ctx.Process(target=_child, args=(job + (args.threads,), queue))
                proc.start()
                row = queue.get()
                proc.join()
            else:
                row = run_one(*job)
            rows.append(row)
            row["achieved_gflop_s"] = row["gflop_per_step"] / row["step_s"]
            print(
                f"{row['preset']:>15} {row['size']:>4}px b{row['batch']:<2} {row['mode']:>15}: "
                f"{row['images_per_s']:7.2f} img/s  step {row['step_s']:6.3f}s  "
                f"peak {row['peak_mb']:8.1f} MB  {row['gflop_per_step']:8.2f} GFLOP/step  "
                f"{row['achieved_gflop_s']:6.1f} GFLOP/s",
                flush=True,
            )
    peak = max(peak, matmul_flops_per_s(args.device))
    print(f"fp32 matmul peak (best of before/after): {peak / 1e9:.1f} GFLOP/s; achieved fraction per row:")
    for row in rows:
        row["achieved_fraction"] = row["achieved_gflop_s"] * 1e9 / peak
        frac = row["achieved_fraction"] * 100
        print(f"  {row['preset']:>15} {row['mode']:>15}: {frac:5.1f}% of matmul peak")
    print(f"memory column: {rows[0]['mem_kind'] if rows else '-'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"matmul_flops_per_s": peak, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
