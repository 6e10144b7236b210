"""Training throughput: samples/s of full training steps for the default model config.

    python benchmarks/bench_train.py [--batches 8,32] [--steps N] [--warmup N] [--data data/mp.npz]
                                     [--vae-only] [--cpu-bf16 auto|on|off]

A step is what ``training/train.py`` runs: draw a batch, voxelise it (random rotations),
VAE + U-Net forward, the Eq. 2 + Eq. 3 losses, backward, gradient clipping, Adam.

Rows:

* ``fp32 eager, voxelise``: the training loop as on the CPU (the baseline): float32,
  batches voxelised from per-crystal numpy arrays (:func:`training.data.voxelise`).
* ``fp32 eager, gpu batcher`` (CUDA): the same with the data set on the device
  (:class:`training.batcher.GPUCrystalBatcher`).
* ``bf16 autocast + channels-last, gpu batcher`` (CUDA): the CUDA default of ``train.py``.
* ``bf16 autocast, voxelise`` and ``bf16 autocast + channels-last, voxelise`` (CPU): run
  where the CPU has native bf16, AMX tile units or AVX-512 BF16
  (:func:`training.train.cpu_bf16_fast`, where ``train.py`` turns both on by default) or with
  ``--cpu-bf16 on``.

``--vae-only``: the step of ``train --vae-only`` (no U-Net forward and backward), the
CPU recipe's.

Columns: samples/s, ms/step, the model's achieved TFLOP/s (samples/s times the FLOPs of one
sample's forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``: convs
and matmuls, not elementwise work), the speed-up over the baseline row of the same batch
(same run) and, on CUDA, the TFLOP/s as a fraction of a bf16 matmul peak (an 8192^3 bf16
matmul timed in the same run). On an AVX2-only CPU bf16 convolutions are several times
slower than float32, so the CPU bf16 rows are skipped there unless asked for. On a shared
CPU a training job competes for the cores: the load average is printed.

Data: synthetic crystals (1-40 atoms, cells fitting the 10 Å cube under any rotation) on the
default 30^3 grid, or ``--data`` (a prepared ``.npz``; its grid is used).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crystalstudio.core.density import Grid, random_rotations  # noqa: E402
from crystalstudio.core.models import CrystalNet, ModelConfig, count_parameters  # noqa: E402
from training.batcher import GPUCrystalBatcher  # noqa: E402
from training.data import CrystalArrays, voxelise  # noqa: E402
from training.train import JointNet, TrainConfig, cpu_bf16_fast, forward_losses  # noqa: E402


def synthetic(n: int = 512, seed: int = 0) -> CrystalArrays:
    rng = np.random.default_rng(seed)
    lattices, fracs, Zs = [], [], []
    while len(lattices) < n:
        k = int(rng.integers(1, 41))
        edge = rng.uniform(3.0, 5.7)
        L = np.diag(rng.uniform(0.85, 1.0, 3) * edge)
        L[1, 0], L[2, 1] = rng.uniform(-0.5, 0.5, 2)
        if 0.5 * np.linalg.norm(L.sum(0)) + 0.5 > 5.0:  # keep every rotation inside the 10 Å cube
            continue
        lattices.append(L)
        fracs.append(rng.random((k, 3)))
        Zs.append(rng.integers(1, 84, k))
    offsets = np.concatenate([[0], np.cumsum([len(z) for z in Zs])]).astype(np.int64)
    return CrystalArrays(np.stack(lattices), offsets, np.concatenate(fracs), np.concatenate(Zs),
                         np.zeros(n, np.uint8), np.array([f"s{i}" for i in range(n)]),
                         np.array([f"S{i}" for i in range(n)]), np.array(["synthetic"] * n))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured TFLOP/s of an n^3 bf16 matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_sample(net: CrystalNet, data: CrystalArrays, grid: Grid, batch: int, device: torch.device,
                     vae_only: bool = False) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = TrainConfig(vae_only=vae_only)
    M, S, _, _ = voxelise(data, np.arange(batch) % len(data), grid, None, device)
    with FlopCounterMode(display=False) as fc:
        forward_losses(JointNet(net), M, S, cfg)["total"].backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops() / batch


def bench(data: CrystalArrays, grid: Grid, mcfg: ModelConfig, device: torch.device, batch: int, steps: int,
          warmup: int, amp: bool, channels_last: bool, gpu_batcher: bool, vae_only: bool = False) -> float:
    """Seconds per training step (mean over ``steps`` after ``warmup``)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = TrainConfig(batch=batch, vae_only=vae_only)
    net = CrystalNet(mcfg).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = JointNet(net).train()
    idx_all = np.arange(len(data))
    batcher = GPUCrystalBatcher(data, grid, device, pool=idx_all) if gpu_batcher else None
    gen = torch.Generator(device).manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t = time.perf_counter()
        if batcher is not None:
            M, S, _, _ = batcher(*batcher.sample(batch, gen))
        else:
            b = rng.choice(idx_all, size=batch, replace=False)
            M, S, _, _ = voxelise(data, b, grid, random_rotations(batch, rng), device)
        L = forward_losses(model, M, S, cfg, amp, channels_last)
        opt.zero_grad(set_to_none=True)
        L["total"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt.step()
    sync(device)
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--data", default="", help="prepared .npz (default: synthetic crystals on the 30^3 grid)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--vae-only", action="store_true", help="time the step of train --vae-only")
    p.add_argument("--cpu-bf16", choices=["auto", "on", "off"], default="auto",
                   help="CPU bf16 rows: auto = where the CPU has native bf16 (AMX or AVX-512 BF16)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    cuda = device.type == "cuda"
    steps = a.steps or (20 if cuda else 2)
    warmup = a.warmup if a.warmup >= 0 else (5 if cuda else 1)
    if a.data:
        data = CrystalArrays.load(a.data)
        grid = CrystalArrays.load_grid(a.data)
    else:
        data, grid = synthetic(), Grid()
    mcfg = ModelConfig(grid_n=grid.n, n_classes=max(95, int(data.Z.max()) + 1))
    batches = [int(x) for x in a.batches.split(",") if x]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; model: default ModelConfig (grid {grid.n}^3, "
          f"{count_parameters(CrystalNet(mcfg))} parameters); {steps} timed steps after {warmup} warm-up")
    if not cuda:
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other jobs compete for the CPU)")
    flops = flops_per_sample(CrystalNet(mcfg).to(device), data, grid, 2, device, a.vae_only)
    peak = matmul_peak(device) if cuda else None
    print(f"model FLOPs per sample (forward + backward{', VAE only' if a.vae_only else ''}, FlopCounterMode): "
          f"{flops / 1e9:.2f} GFLOP"
          + (f"; measured bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s" if peak else ""))
    configs = [("fp32 eager, voxelise (baseline)", False, False, False)]
    if cuda:
        configs += [("fp32 eager, gpu batcher", False, False, True),
                    ("bf16 autocast + channels-last, gpu batcher", True, True, True)]
    native = cpu_bf16_fast()
    cpu_bf16 = not cuda and (a.cpu_bf16 == "on" or (a.cpu_bf16 == "auto" and native))
    if cpu_bf16:
        configs += [("bf16 autocast, voxelise", True, False, False),
                    ("bf16 autocast + channels-last, voxelise", True, True, False)]
    print()
    print("| config | batch | samples/s | ms/step | x baseline | model TFLOP/s |" + (" % of bf16 peak |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    base: dict[int, float] = {}
    for label, amp, cl, gb in configs:
        for B in batches:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            dt = bench(data, grid, mcfg, device, B, steps, warmup, amp, cl, gb, a.vae_only)
            base.setdefault(B, dt)
            sps = B / dt
            tf = sps * flops / 1e12
            row = f"| {label} | {B} | {sps:.1f} | {1000 * dt:.1f} | {base[B] / dt:.2f} | {tf:.3f} |"
            if cuda:
                row += f" {100 * tf / peak:.1f}% |"
            print(row, flush=True)
    if not cuda and not cpu_bf16:
        print(f"\nCPU bf16 rows skipped: this CPU has {'' if native else 'no '}native bf16 (AMX or AVX-512 BF16; "
              "--cpu-bf16 on runs them).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
