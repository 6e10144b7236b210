"""Segmentation of a decoded density field into atoms (Hoffmann et al. 2019, Sec. 4.2.2).

argmax over the U-Net's classes -> connected components of the non-zero voxels
(scipy.ndimage.label) -> majority vote of species in each component -> centre of mass
(scipy.ndimage.center_of_mass) -> atoms in Cartesian Å of the cube frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .density import Grid

__all__ = ["Atoms", "segment", "species_map_to_atoms", "density_peaks"]


@dataclass
class Atoms:
    """Atoms found in a field.

    Attributes:
        positions: (K, 3) float64 Cartesian Å in the cube frame ``[0, length]^3``.
        Z: (K,) int64 atomic numbers (>= 1).
        voxels: (K,) int64 number of voxels in each atom's component (U-Net path), or None.
        amplitude: (K,) float64 fitted Gaussian amplitude in Z units (the Z estimate of the
            atom fit, :mod:`crystalstudio.core.fit`), or None for the U-Net path.
        amplitude_sigma: (K,) float64 standard error of ``amplitude``, or None.
    """

    positions: np.ndarray
    Z: np.ndarray
    voxels: np.ndarray | None = None
    amplitude: np.ndarray | None = None
    amplitude_sigma: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.Z))

    @classmethod
    def empty(cls) -> "Atoms":
        """No atoms: (0, 3) positions, (0,) Z."""
        return cls(np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, np.int64))


def species_map_to_atoms(species: np.ndarray, grid: Grid, weights: np.ndarray | None = None,
                         min_voxels: int = 1) -> Atoms:
    """Atoms from a per-voxel species map.

    Args:
        species: (n, n, n) integer map, 0 = no atom, else Z (e.g. argmax of U-Net logits).
        grid: the voxel grid (voxel (i, j, k) centred at ``((i + .5) h, ...)``).
        weights: optional (n, n, n) non-negative field (the decoded density M_hat) used to
            weight the centre of mass, for sub-voxel positions; uniform when None.
        min_voxels: components smaller than this are dropped as specks.

    Returns:
        :class:`Atoms`, one per 6-connected component, Z by majority vote (ties go to the
        smaller Z), position = (weighted) centre of mass.
    """
    species = np.asarray(species)
    labels, k = ndimage.label(species > 0)
    if k == 0:
        return Atoms.empty()
    idx = np.arange(1, k + 1)
    sizes = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    # majority vote: count (label, Z) pairs
    mask = labels > 0
    lab, zz = labels[mask], species[mask].astype(np.int64)
    zmax = int(zz.max()) + 1
    votes = np.bincount((lab - 1) * zmax + zz, minlength=k * zmax).reshape(k, zmax)
    Z = votes.argmax(axis=1).astype(np.int64)
    w = np.ones(species.shape) if weights is None else np.clip(np.asarray(weights, np.float64), 0, None)
    if weights is not None:
        # a component with zero density everywhere falls back to uniform weights
        wsum = ndimage.sum_labels(w, labels, idx)
        if np.any(wsum <= 0):
            w = w + (labels > 0) * 1e-12
    com = np.asarray(ndimage.center_of_mass(w, labels, idx), dtype=np.float64).reshape(-1, 3)
    pos = (com + 0.5) * grid.spacing
    keep = sizes >= min_voxels
    return Atoms(pos[keep], Z[keep], sizes[keep].astype(np.int64))


def segment(logits: np.ndarray, grid: Grid, density: np.ndarray | None = None,
            min_voxels: int = 1) -> Atoms:
    """Segment U-Net logits into atoms.

    Args:
        logits: (K, n, n, n) float class scores over Z = 0..K-1 (or probabilities).
        grid: the voxel grid.
        density: optional decoded density (n, n, n) to weight centres of mass.
        min_voxels: smallest component kept.

    Returns:
        :class:`Atoms`.
    """
    species = np.asarray(logits).argmax(axis=0)
    return species_map_to_atoms(species, grid, density, min_voxels)


def density_peaks(M: np.ndarray, grid: Grid, rel: float = 0.3) -> np.ndarray:
    """Local maxima of a density field, with sub-voxel positions: (P, 3) float64 Å.

    A voxel is a peak when it is the largest of its 3x3x3 neighbourhood and above
    ``rel`` times the field's maximum. Its position is refined per axis by a parabola
    through the logarithm of the three densities around it, exact for one Gaussian of
    Eq. 1 (offset clipped to half a voxel). Independent of the U-Net: used to compare the
    geometry of two fields (e.g. the conditional decoder at two target densities, Sec. 4.5).

    Args:
        M: (n, n, n) density field (Eq. 1 units).
        grid: its :class:`Grid` (voxel centres at (i + 0.5) h).
        rel: threshold as a fraction of ``M.max()``.

    Raises:
        ValueError: M is not (n, n, n) for the grid.
    """
    M = np.asarray(M, np.float64)
    if M.shape != (grid.n,) * 3:
        raise ValueError(f"field of shape {M.shape} is not ({grid.n}, {grid.n}, {grid.n})")
    top = M.max()
    if not top > 0:
        return np.zeros((0, 3))
    idx = np.argwhere((M == ndimage.maximum_filter(M, size=3, mode="constant", cval=-np.inf)) & (M > rel * top))
    logM = np.log(np.maximum(M, top * 1e-12))
    out = idx.astype(np.float64)
    n = grid.n
    for ax in range(3):
        lo, hi = idx.copy(), idx.copy()
        lo[:, ax] = np.maximum(idx[:, ax] - 1, 0)
        hi[:, ax] = np.minimum(idx[:, ax] + 1, n - 1)
        a, b, c = (logM[tuple(v.T)] for v in (lo, idx, hi))
        curv = a - 2.0 * b + c
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(curv < 0, 0.5 * (a - c) / curv, 0.0)
        out[:, ax] += np.clip(np.nan_to_num(off), -0.5, 0.5)
    return (out + 0.5) * grid.spacing
