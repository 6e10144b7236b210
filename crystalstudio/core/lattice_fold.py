"""A decoded repeating-lattice field made periodic: its lattice read off its own overlap, then
every voxel averaged over its periodic images in the cube.

A field of representation 2 (Hoffmann et al. 2019, Sec. 3.1 and 4.2) repeats with the lattice:
``M(x + t) = M(x)`` for every lattice vector ``t`` wherever both points lie in the cube. A
decoded field M_hat repeats only roughly; its errors differ from image to image. So:

1. :func:`decoded_lattice`: the shifts under which M_hat best overlaps itself (the whole-voxel
   normalised cross-correlation, one FFT, then refined below a voxel by least squares on a cubic
   spline, :func:`crystalstudio.core.lattice_overlap.overlap_vectors` with a looser threshold);
   the cell that most of the low-misfit shifts are whole-number combinations of, fitted to
   them by least squares (:func:`lattice_of_vectors`), is the lattice.
2. :func:`fold_field`: ``F(x) = mean over lattice vectors t with x + t in the cube of
   M_hat(x + t)``, M_hat between voxels a cubic spline. F is periodic with the lattice (to the
   spline's error), keeps a true field as it is, and averages the decoder's error over the
   images: with k images a voxel's independent noise falls by about sqrt(k).

The atoms are then fitted on F (:func:`crystalstudio.core.fit.fit_atoms`), where every image of
a site has the same position and amplitude, so Z is read from k images at once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .density import Grid
from .lattice_fit import distinct_translations, spanning_triples
from .lattice_overlap import SPLINE_ORDER, overlap_vectors

__all__ = ["decoded_lattice", "fold_field", "fold_decoded", "lattice_of_vectors", "MAX_MISFIT"]

#: a shift whose misfit (residual energy over the overlap's energy) exceeds this is not taken as
#: a lattice vector of a decoded field (a true field's lattice vectors leave under 1e-6)
MAX_MISFIT = 0.25
#: a decoded field's lattice vectors are refined to within this of the lattice (Å)
VECTOR_TOL_A = 0.4
#: at least this fraction of a decoded field's candidate vectors must agree on its lattice
MIN_INLIERS = 0.6
#: images whose spline value would be read within this many voxels of a face are left out
#: (the spline, its edges mirrored, errs there)
FACE_VOXELS = 1.0
#: whole-voxel shifts of normalised cross-correlation below this are not refined
MIN_NCC = 0.5


def decoded_lattice(F: np.ndarray, grid: Grid, max_misfit: float = MAX_MISFIT,
                    min_ncc: float = MIN_NCC) -> np.ndarray | None:
    """The lattice of a field that repeats only roughly (a decoded M_hat of representation 2).

    Args:
        F: (n, n, n) float field on ``grid`` (any scale).
        grid: its :class:`~crystalstudio.core.density.Grid`.
        max_misfit: shifts leaving more than this misfit are not lattice vectors.
        min_ncc: whole-voxel shifts with a lower normalised cross-correlation are not refined.

    Returns:
        (3, 3) float64 lattice, rows the vectors in Å (cube frame): :func:`lattice_of_vectors` of
        the shifts with misfit at most ``max_misfit``; None when they do not agree on one (a
        unit-cell field, a cell longer than the cube along an axis, a field that does not
        repeat).
    """
    T, mis = overlap_vectors(F, grid, min_ncc=min_ncc)
    return lattice_of_vectors(T[mis <= max_misfit])


def lattice_of_vectors(T: np.ndarray, tol_A: float = VECTOR_TOL_A) -> np.ndarray | None:
    """The cell that most of the translations repeat, fitted to them by least squares.

    Args:
        T: (K, 3) float translations in Å (either sign), most of them lattice vectors up to an
            error of ``tol_A``; the others (a decoded field's chance overlaps) are outvoted.
        tol_A: the largest error of a lattice vector (Å).

    Returns:
        (3, 3) float64 lattice, rows the vectors (Å). Of the triples of the 16 shortest distinct
        translations that are not near-coplanar, the one that leaves the most translations
        within ``tol_A`` of a whole-number combination (then the smallest volume, then the
        shortest), refined to the least-squares lattice of those translations given their
        combinations. None when fewer than three translations, or fewer than
        ``MIN_INLIERS`` of them (at least three), agree on one.
    """
    T = np.asarray(T, np.float64).reshape(-1, 3)
    if len(T) < 3:
        return None
    best, best_key, best_in = None, None, None
    for B, vol in spanning_triples(distinct_translations(T, tol_A)):
        inl = np.linalg.norm(T - np.rint(T @ np.linalg.inv(B)) @ B, axis=1) <= tol_A
        key = (-int(inl.sum()), vol, float(np.linalg.norm(B, axis=1).sum()))
        if best_key is None or key < best_key:
            best, best_key, best_in = B, key, inl
    if best is None or best_in.sum() < max(3, MIN_INLIERS * len(T)):
        return None
    n = np.rint(T[best_in] @ np.linalg.inv(best))
    refined = np.linalg.lstsq(n, T[best_in], rcond=None)[0]
    return refined if abs(np.linalg.det(refined)) > 0.5 * abs(np.linalg.det(best)) else best


def _shifts(lattice: np.ndarray, length: float) -> np.ndarray:
    """Lattice vectors (K, 3) Å with every Cartesian component in (-length, length)."""
    lattice = np.asarray(lattice, np.float64)
    corners = np.array([[x, y, z] for x in (-length, length) for y in (-length, length) for z in (-length, length)])
    f = corners @ np.linalg.inv(lattice)
    lo, hi = np.floor(f.min(0)).astype(int), np.ceil(f.max(0)).astype(int)
    if np.prod(hi - lo + 1) > 200_000:
        raise ValueError(f"lattice too small to fold: {np.prod(hi - lo + 1)} shifts")
    n = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    t = n @ lattice
    return t[np.all(np.abs(t) < length, axis=1)]


def fold_field(F: np.ndarray, grid: Grid, lattice: np.ndarray) -> np.ndarray:
    """Average each voxel of a repeating-lattice field over its periodic images in the cube.

    ``out(x) = mean of F(x + t)`` over the lattice vectors t (t = 0 included) for which
    x + t lies ``FACE_VOXELS`` inside the voxel centres' box ``[h / 2, L - h / 2]^3``; F between
    voxel centres is its cubic spline (edges mirrored).

    Args:
        F: (n, n, n) float field on ``grid``.
        grid: its grid (voxel centres at ``(i + 0.5) h``).
        lattice: (3, 3) lattice vectors (rows, Å, cube frame), e.g. from :func:`decoded_lattice`.

    Returns:
        (n, n, n) float32 field, periodic with ``lattice`` wherever images overlap; a field
        that already repeats with it comes back as it was (to the spline's error).

    Raises:
        ValueError: F is not a finite cube, ``lattice`` is degenerate or so small that
            over 200000 shifts would be summed.
    """
    X = np.asarray(F, np.float64)
    n = X.shape[0]
    if X.shape != (n, n, n) or not np.isfinite(X).all():
        raise ValueError(f"fold_field: a finite (n, n, n) field is needed, got shape {X.shape}")
    lattice = np.asarray(lattice, np.float64)
    if lattice.shape != (3, 3) or abs(np.linalg.det(lattice)) < 1e-6:
        raise ValueError("fold_field: degenerate lattice")
    h = grid.length / n
    coef = ndimage.spline_filter(X, order=SPLINE_ORDER, mode="mirror")
    g = np.arange(n, dtype=np.float64)
    idx = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)  # voxel index coordinates
    total = X.reshape(-1).copy()
    count = np.ones(len(idx))
    for t in _shifts(lattice, grid.length):
        if not t.any():
            continue
        y = idx + t / h
        ok = np.all((y >= FACE_VOXELS) & (y <= n - 1 - FACE_VOXELS), axis=1)
        if not ok.any():
            continue
        total[ok] += ndimage.map_coordinates(coef, y[ok].T, order=SPLINE_ORDER, prefilter=False, mode="mirror")
        count[ok] += 1
    return (total / count).reshape(n, n, n).astype(np.float32)


def fold_decoded(fields: np.ndarray, grid: Grid) -> np.ndarray:
    """Each decoded repeating-lattice field folded over its own lattice, where one is found.

    Args:
        fields: (B, n, n, n) float decoded fields M_hat of representation 2.
        grid: their grid.

    Returns:
        (B, n, n, n) float32: :func:`fold_field` of each field over :func:`decoded_lattice`,
        or the field as it was where no lattice is found.

    Raises:
        ValueError: a field is not a finite cube.
    """
    X = np.asarray(fields, np.float32)
    out = X.copy()
    for k, F in enumerate(X):
        lattice = decoded_lattice(F, grid)
        if lattice is not None:
            try:
                out[k] = fold_field(F, grid, lattice)
            except ValueError:  # a lattice too small to fold: keep the field
                pass
    return out
