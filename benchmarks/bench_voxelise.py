"""Voxelisation speed: density fields M and species matrices S of a training batch.

    python benchmarks/bench_voxelise.py [--data data/mp.npz] [--batch 16] [--repeats 3] [--threads 1]

Rows: both representations of Sec. 3.1 (the unit cell; the repeating lattice with every
periodic image within 4 sigma of the cube, several hundred per cube), for

* ``M only``: the separable Eq. 1 sum (:func:`crystalstudio.core.density.density_fields`,
  ``species=False``);
* ``M + S``: what training draws per step (S by the local scatter over the K^3 voxels around
  each atom);
* ``M + S, dense baseline``: S as it was built before 2026-12-05 (and as a GPU would without
  the scatter): every atom's distance to every voxel, (B, chunk, n^3) at a time, nearest
  within the species radius, in this script.

Columns: ms per batch (median of ``--repeats``), the ratio to the dense baseline, and
whether S is the same voxel for voxel. Crystals: ``--data`` (a prepared ``.npz``; its
training split) or, without it, synthetic cells of 1-40 atoms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crystalstudio.core.density import (Crystal, Grid, cell_positions, density_fields, lattice_positions,  # noqa: E402
                                        pad_batch, random_rotations)


def dense_species(pos: torch.Tensor, Z: torch.Tensor, grid: Grid, chunk: int = 64) -> torch.Tensor:
    """The baseline: S from every atom-voxel distance, ``chunk`` atoms at a time."""
    B, N, _ = pos.shape
    n = grid.n
    c = ((torch.arange(n, dtype=torch.float64) + 0.5) * grid.spacing).to(torch.float32)
    pos = pos.to(torch.float32)
    S = torch.zeros((B, n, n, n), dtype=torch.int64)
    best = torch.full((B, n, n, n), float("inf"))
    r2 = grid.species_radius ** 2
    for s in range(0, N, chunk):
        p, z = pos[:, s:s + chunk], Z[:, s:s + chunk]
        d = c.view(1, 1, n, 1) - p.unsqueeze(2)
        d2 = d * d
        dist2 = d2[..., 0][:, :, :, None, None] + d2[..., 1][:, :, None, :, None] + d2[..., 2][:, :, None, None, :]
        dist2 = torch.where((z > 0).view(B, -1, 1, 1, 1), dist2, torch.full_like(dist2, float("inf")))
        dmin, arg = dist2.min(dim=1)
        zsel = torch.gather(z, 1, arg.view(B, -1)).view(B, n, n, n)
        upd = (dmin <= r2) & (dmin < best)
        S = torch.where(upd, zsel, S)
        best = torch.where(upd, dmin, best)
    return S


def _synthetic(k: int, rng: np.random.Generator) -> Crystal:
    n_at = int(rng.integers(1, 41))
    a = rng.uniform(3.0, 5.5, 3)
    return Crystal(np.diag(a), rng.uniform(0, 1, (n_at, 3)), rng.integers(1, 90, n_at))


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    if a.data:
        from training.data import CrystalArrays

        data = CrystalArrays.load(a.data)
        grid = CrystalArrays.load_grid(a.data)
        pick = rng.choice(data.indices("train"), a.batch, replace=False)
        crystals = [data.crystal(int(i)) for i in pick]
        where = f"{a.data}, training split"
    else:
        grid = Grid()
        crystals = [_synthetic(k, rng) for k in range(a.batch)]
        where = "synthetic cells of 1-40 atoms"
    rots = random_rotations(a.batch, a.seed)
    print(f"batch {a.batch} ({where}), grid {grid.n}^3 over {grid.length} Å, {a.threads} torch thread(s)\n")
    print("| representation | atoms with images (mean) | step | ms per batch | x dense baseline | S identical |")
    print("|---|---|---|---|---|---|")
    for rep in ("unit_cell", "repeating_lattice"):
        pos, zs = [], []
        for c, R in zip(crystals, rots):
            if rep == "unit_cell":
                pos.append(cell_positions(c, grid, R))
                zs.append(c.Z)
            else:
                p, z = lattice_positions(c, grid, R)
                pos.append(p)
                zs.append(z)
        P, Zp = pad_batch(pos, zs)
        P, Zp = torch.as_tensor(P), torch.as_tensor(Zp)
        mean_atoms = float((Zp > 0).sum(1).float().mean())
        t_dense, S_ref = _timed(lambda: (density_fields(P, Zp, grid, species=False)[0], dense_species(P, Zp, grid)),
                                a.repeats)
        t_m, _ = _timed(lambda: density_fields(P, Zp, grid, species=False), a.repeats)
        t_ms, (_, S) = _timed(lambda: density_fields(P, Zp, grid), a.repeats)
        same = bool(torch.equal(S, S_ref[1]))
        print(f"| {rep} | {mean_atoms:.0f} | M + S, dense baseline | {t_dense:.1f} | 1.00 | - |")
        print(f"| {rep} | {mean_atoms:.0f} | M only | {t_m:.1f} | {t_dense / t_m:.1f} | - |")
        print(f"| {rep} | {mean_atoms:.0f} | M + S | {t_ms:.1f} | {t_dense / t_ms:.1f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
