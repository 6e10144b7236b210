"""Multi-process training through ``torchrun`` (DistributedDataParallel), same entry point.

``torchrun --standalone --nproc_per_node=N -m training train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on
CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``. Without those variables (or with a world
of one) everything stays single-process and nothing here does any communication.

Each rank draws its own batches (per-rank seeds), so ``--batch`` is per process and the
global batch is ``batch * world_size``. Only the master (rank 0) logs, evaluates and writes
checkpoints. Decisions that depend on wall-clock time (the ``--minutes`` budget and the
time-based learning-rate schedule) use rank 0's clock, broadcast every few steps
(:class:`Clock`), so all ranks stop at the same step with the same learning rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "Clock"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _env_info() -> DistInfo:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    return DistInfo()


def setup(device: str = "auto", timeout_min: float = 60.0) -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment, pick the device and (world > 1) init the process group.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:K``. Under
    torchrun with CUDA, rank r uses ``cuda:LOCAL_RANK``. The timeout is long because the
    other ranks wait in the next all-reduce while the master evaluates.
    """
    info = _env_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if info.enabled:
            dev = torch.device("cuda", info.local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
    return info, dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Clock:
    """Seconds since ``t0``, the same on every rank.

    Single process: ``time.time() - t0`` at every call. Under DDP: rank 0's reading,
    broadcast at steps that are multiples of ``every`` (one small collective and sync per
    ``every`` steps) and held in between, so every rank sees the same number at the same
    step.
    """

    def __init__(self, t0: float, info: DistInfo, device: torch.device, every: int = 16):
        self.t0, self.info, self.device, self.every = t0, info, device, every
        self._value: float | None = None
        self._step: int | None = None

    def __call__(self, step: int) -> float:
        if not self.info.enabled:
            return time.time() - self.t0
        if self._value is None or (step % self.every == 0 and step != self._step):
            t = torch.tensor([time.time() - self.t0], dtype=torch.float64, device=self.device)
            dist.broadcast(t, 0)
            self._value, self._step = float(t.item()), step
        return self._value
