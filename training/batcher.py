"""Whole-data-set voxelisation on the device: no Python loop per crystal, no host copies.

:func:`training.data.voxelise` builds each batch from per-crystal numpy arrays (a Python
loop, ``pad_batch``, a host-to-device copy). :class:`GPUCrystalBatcher` instead pads every
crystal of the set once (``(C, Nmax, 3)`` fractional coordinates, ``(C, Nmax)`` Z,
``(C, 3, 3)`` lattices) and keeps those tensors on the device, so a batch is a gather, a
batched matmul (centre + rotate, :func:`crystalstudio.core.density.cell_positions` in
torch) and :func:`crystalstudio.core.density.density_fields`. Indices and rotations can be
drawn on the device too (:meth:`GPUCrystalBatcher.sample`, :func:`random_rotations_torch`).

For the same crystals and rotation matrices it gives the fields of :func:`voxelise`
(identical S; M to float32 rounding, both build positions in float64 and the field in
float32). A whole MP-20-size set (45k crystals x 64 atoms) is ~70 MB of float64 on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from crystalstudio.core.density import Grid, density_fields

from .data import MAX_ROTATION_TRIES, CrystalArrays

__all__ = ["GPUCrystalBatcher", "random_rotations_torch"]


def random_rotations_torch(n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, 3, 3) rotation matrices uniform on SO(3), drawn on ``device`` (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, device=device, dtype=dtype)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], 1).view(n, 3, 3)


class GPUCrystalBatcher:
    """All crystals of ``data`` as padded tensors on ``device``; ``batcher(idx, R) -> (M, S, P, Z)``.

    Args:
        data: the crystals.
        grid: the voxel grid.
        device: where the tensors live and the fields are built.
        pool: optional crystal indices :meth:`sample` draws from (e.g. the train split).
    """

    def __init__(self, data: CrystalArrays, grid: Grid, device: str | torch.device = "cpu",
                 pool: np.ndarray | None = None):
        self.grid = grid
        self.device = torch.device(device)
        counts = np.diff(data.offsets).astype(np.int64)
        self.counts = counts
        self.nmax = max(1, int(counts.max(initial=0)))
        C = len(data)
        row = np.repeat(np.arange(C), counts)
        col = np.arange(len(data.Z)) - data.offsets[row]
        frac = np.zeros((C, self.nmax, 3), np.float64)
        Z = np.zeros((C, self.nmax), np.int64)
        frac[row, col] = np.mod(data.frac, 1.0)
        Z[row, col] = data.Z
        lat = np.asarray(data.lattice, np.float64)
        self.frac = torch.as_tensor(frac, device=self.device)
        self.Z = torch.as_tensor(Z, device=self.device)
        self.lattice = torch.as_tensor(lat, device=self.device)
        self.centre = torch.as_tensor(0.5 * lat.sum(axis=1), device=self.device)  # (C, 3) cell centres
        self.pool = None if pool is None else torch.as_tensor(np.asarray(pool, np.int64), device=self.device)
        # cells that fit the cube under some rotations only (prepare(fit="some")): sample() redraws theirs
        partial = data.partial_fit(np.arange(C))
        self.partial = torch.as_tensor(partial, device=self.device) if partial.any() else None

    def sample(self, batch: int, generator: torch.Generator | None = None):
        """``(idx, R)`` on the device: ``batch`` crystals of the pool (without replacement when the
        pool is large enough) and uniform random rotations; a cell that fits the cube under some
        rotations only gets its rotation drawn again until it fits (as
        :func:`training.data.cube_rotations`; one host sync per round, only for such data sets).

        Raises:
            ValueError: no pool, or a cell that fits none of ``MAX_ROTATION_TRIES`` rotations.
        """
        if self.pool is None:
            raise ValueError("GPUCrystalBatcher.sample needs a pool of indices")
        n = len(self.pool)
        if n >= batch:
            pick = torch.randperm(n, generator=generator, device=self.device)[:batch]
        else:
            pick = torch.randint(n, (batch,), generator=generator, device=self.device)
        idx, R = self.pool[pick], random_rotations_torch(batch, generator, self.device)
        if self.partial is not None:
            for _ in range(MAX_ROTATION_TRIES):
                bad = ~self.fits(idx, R)
                if not bool(bad.any()):
                    break
                R[bad] = random_rotations_torch(int(bad.sum()), generator, self.device)
            else:
                raise ValueError(f"a cell fits the cube under none of {MAX_ROTATION_TRIES} rotations")
        return idx, R

    def fits(self, idx, rotations) -> torch.Tensor:
        """(B,) bool on the device: whether every atom of each rotated cell lies in the cube
        (:func:`crystalstudio.core.density.fits_rotated`)."""
        P, Z = self.positions(idx, rotations)
        inside = ((P >= 0) & (P <= self.grid.length)).all(-1) | (Z == 0)
        return inside.all(-1)

    def positions(self, idx, rotations=None):
        """Representation 1 positions: ``(P (B, N, 3) float64 Å, Z (B, N) int64)`` on the device.

        ``idx`` as numpy trims the padding to the batch's largest crystal (the shapes of
        :func:`voxelise`, one host-side lookup); as a device tensor it keeps ``Nmax`` atoms
        per crystal so nothing waits for the device.
        """
        if isinstance(idx, torch.Tensor):
            n, idx_t = self.nmax, idx.to(self.device)
        else:
            idx = np.asarray(idx, np.int64)
            n, idx_t = max(1, int(self.counts[idx].max(initial=0))), torch.as_tensor(idx, device=self.device)
        f, Z = self.frac[idx_t, :n], self.Z[idx_t, :n]
        cart = torch.matmul(f, self.lattice[idx_t]) - self.centre[idx_t].unsqueeze(1)
        if rotations is not None:
            R = torch.as_tensor(rotations, dtype=torch.float64, device=self.device)
            cart = torch.matmul(cart, R.transpose(1, 2))
        P = torch.where((Z > 0).unsqueeze(-1), cart + 0.5 * self.grid.length, torch.zeros_like(cart))
        return P, Z

    def __call__(self, idx, rotations=None, species: bool = True):
        """``(M, S, P, Z)``: M (B, n, n, n) float32, S (B, n, n, n) int64, P (B, N, 3) float64 Å and
        Z (B, N) int64 (0 = padding), all on the device."""
        P, Z = self.positions(idx, rotations)
        M, S = density_fields(P, Z, self.grid, species=species)
        return M, S, P, Z
