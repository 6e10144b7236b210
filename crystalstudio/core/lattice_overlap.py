"""The repeating lattice's vectors read off the field itself: where it overlaps its own translate.

A field of representation 2 (Hoffmann et al. 2019, Sec. 4.2) is periodic: for every lattice
vector ``t``, ``M(x + t) = M(x)`` wherever both points lie in the cube. A translation that is not
a lattice vector leaves a misfit however well the atoms nearly repeat. So the lattice is found
without any atom fit:

1. The normalised cross-correlation of the field with itself over every whole-voxel shift (one
   FFT) peaks near every lattice vector short enough to leave an overlap.
2. Each peak is refined to a fraction of a voxel by least squares on ``M(x) - M(x + t)``, ``M``
   between voxels a cubic spline (:func:`scipy.ndimage.map_coordinates`), over the voxels x
   whose translate x + t lies at least one sigma inside the cube (the spline, its edges
   mirrored, errs near a face: there the misfit of a lattice vector was 1e-5 instead of 1e-7).
   Its misfit is the residual energy over the overlap's energy.
3. Sorted by misfit, the vectors are cut where the misfit jumps threefold (``GAP``); the vectors
   below a cut that span space give a lattice, the strictest cut first
   (:func:`overlap_lattices`).

On the true fields of the val split (cubes of 10 Å, sigma 1 Å, 30 voxels) a lattice vector
leaves a misfit of 3e-9 to 5e-7 (the spline's error), any other translation at least 5e-6; a
pseudo-translation of a cell whose atoms repeat on a sub-cell to 0.01 Å (test Fe(OH)2) about
1.4e-6, against 1.5e-8 for its lattice vectors. The free fit's atoms give no such contrast: test
Li4V(TeO4)3, whose quick free fit leaves 1.6e-4 of the energy, gave three wrong lattices there,
and this finds the true one (docs/atom_fit.md).

:func:`crystalstudio.core.lattice_fit.tie_if_better` tries these lattices before those of the
free fit's atoms. A decoded field is not periodic to 1e-5: no lattice is found and the fit goes
on as before. Finding none costs about 0.05 s per decoded field of the shipped repeating-lattice
model (the encoder's fields of the first 64 cubes of val and of test); a true field's lattices
about 0.2 s.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize, signal

from .density import Grid
from .lattice_fit import basis_of, same_lattice

__all__ = ["overlap_lattices", "overlap_vectors"]

#: vectors of misfit (residual energy over the overlap's energy) at most ``LOOSE`` nearly repeat
#: the field. Sorted by misfit, a jump by ``GAP`` times or more (misfits below ``EXACT`` count as
#: ``EXACT``) separates the lattice's vectors from pseudo-translations. Chosen on val's true
#: fields: lattice vectors leave 3e-9 to 5.1e-7 (the spline's error), every other translation at
#: least 4.9e-6 (test Fe(OH)2, whose atoms repeat on a quarter cell to 0.01 Å: 1.4e-6 against
#: at most 1.5e-8 for its lattice vectors). A threefold jump still splits a pseudo-cell 0.01 Å
#: off from the true cell (``tests/core/test_lattice_overlap.py``, the pseudo-cell test)
LOOSE = 1e-5
GAP = 3.0
EXACT = 1e-8
#: whole-voxel shifts whose normalised cross-correlation is below this are not refined (a
#: lattice vector rounded to the grid scores above 0.994 on the test split's true fields)
MIN_NCC = 0.98
#: at most this many shifts are refined (the strongest first; each costs about 50 ms)
MAX_PEAKS = 32
#: a shift must leave an overlap at least this many voxels thick along each axis
MIN_THICKNESS = 4
#: shorter translations are not lattice vectors (the shortest of any crystal is over 2 Å; the
#: field's own peak at no shift is about 2 sigma wide)
MIN_LENGTH_A = 1.5


#: the misfit is taken over the voxels x whose translate x + t lies this many sigma inside the
#: cube, the deepest of these that leaves ``MIN_SAMPLES`` voxels (the spline errs near a face, its
#: error falling about 14-fold per voxel: a lattice vector's misfit 1e-5 at the face, 1e-7 one
#: sigma in, 1e-9 two sigma in), else the shallowest that leaves ``MIN_SAMPLES_THIN``
INTERIOR_SIGMAS = (2.0, 1.0)
MIN_SAMPLES = 256
MIN_SAMPLES_THIN = 64
SPLINE_ORDER = 3


def _margins(grid: Grid) -> list[int]:
    """Voxels to leave out at each face, deepest first (``INTERIOR_SIGMAS``), one voxel apart."""
    deep, shallow = (int(np.ceil(s * grid.sigma / grid.spacing - 1e-9)) for s in INTERIOR_SIGMAS)
    return list(range(deep, shallow - 1, -1))


def _peaks(X: np.ndarray, spacing: float, min_ncc: float = MIN_NCC) -> tuple[np.ndarray, np.ndarray]:
    """Whole-voxel shifts d (K, 3) int, one of each +-d, with their normalised cross-correlation
    (K,), strongest first: local maxima above ``min_ncc`` whose overlap is thick enough."""
    n = np.array(X.shape)
    ones = np.ones_like(X)
    flip = (slice(None, None, -1),) * 3
    num = signal.fftconvolve(X, X[flip], mode="full")
    a2 = signal.fftconvolve(X * X, ones, mode="full")
    b2 = signal.fftconvolve(ones, (X * X)[flip], mode="full")
    ncc = num / np.sqrt(np.maximum(a2 * b2, 1e-300))
    idx = np.indices(ncc.shape).reshape(3, -1).T.reshape(ncc.shape + (3,))
    shift = (n - 1) - idx  # entry j pairs voxel x with x + (n - 1 - j)
    thick = np.all(n - np.abs(shift) >= MIN_THICKNESS, axis=-1)
    ncc = np.where(thick, ncc, 0.0)
    short = np.linalg.norm(shift, axis=-1) * spacing < MIN_LENGTH_A  # the peak at no shift
    ncc = np.where(short, 0.0, ncc)
    top = (ncc == ndimage.maximum_filter(ncc, size=3, mode="constant")) & (ncc >= min_ncc)
    d, v = shift[top], ncc[top]
    # one of each +-d: the first non-zero component positive
    first = np.array([r[np.flatnonzero(r)[0]] for r in d]) if len(d) else np.zeros(0)
    d, v = d[first > 0], v[first > 0]
    order = np.argsort(-v, kind="stable")[:MAX_PEAKS]
    return d[order], v[order]


def _refined(X: np.ndarray, coef: np.ndarray, margins: list[int], d0: np.ndarray) -> tuple[np.ndarray, float]:
    """Shift (3,) in voxels near ``d0`` minimising ``sum (X(x) - X(x + t))^2`` over the voxels x
    whose translate lies ``m`` voxels inside the cube (``m`` the first of ``margins`` that leaves
    ``MIN_SAMPLES`` of them, else the last if it leaves ``MIN_SAMPLES_THIN``), and its misfit
    (residual energy over the overlap's energy); misfit inf when too few voxels overlap."""
    n = X.shape[0]
    g = np.arange(n)
    x = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    ok = None
    for k, m in enumerate(margins):
        lo, hi = m + 1, n - 2 - m  # x + d0 kept one voxel further in, so that t may move by a voxel
        ok = np.all((x + d0 >= lo) & (x + d0 <= hi), axis=1)
        if ok.sum() >= (MIN_SAMPLES if k < len(margins) - 1 else MIN_SAMPLES_THIN):
            break
    else:
        return d0.astype(float), np.inf
    x = x[ok].astype(float)
    a = X[tuple(x.astype(int).T)]

    def residual(t):
        return a - ndimage.map_coordinates(coef, (x + t).T, order=SPLINE_ORDER, prefilter=False, mode="mirror")

    res = optimize.least_squares(residual, d0.astype(float), bounds=(d0 - 1.0, d0 + 1.0), x_scale=1.0,
                                 xtol=1e-10, ftol=1e-12, gtol=1e-12, max_nfev=60)
    return res.x, float(2 * res.cost / max(float(a @ a), 1e-300))


def overlap_vectors(F: np.ndarray, grid: Grid, min_ncc: float = MIN_NCC) -> tuple[np.ndarray, np.ndarray]:
    """Translations under which the field nearly repeats, refined, with their misfits.

    Args:
        F: (n, n, n) float field (any scale) on ``grid``.
        grid: its :class:`~crystalstudio.core.density.Grid`.
        min_ncc: whole-voxel shifts of lower normalised cross-correlation are not refined
            (``MIN_NCC`` for true fields; lower for a decoded field,
            :func:`crystalstudio.core.lattice_fold.decoded_lattice`).

    Returns:
        ``(T, misfit)``: (K, 3) float64 translations in Å (cube frame, one of each +-t) and (K,)
        float64 misfits (residual energy over the overlap's energy), lowest misfit first; empty
        when the field does not overlap itself anywhere (a decoded field, a cell longer than
        the cube).
    """
    X = np.asarray(F, np.float64)
    if X.ndim != 3 or len(set(X.shape)) != 1 or not np.isfinite(X).all() or not X.any():
        return np.zeros((0, 3)), np.zeros(0)
    d, _ = _peaks(X, grid.spacing, min_ncc)
    margins = _margins(grid)
    coef = ndimage.spline_filter(X, order=SPLINE_ORDER, mode="mirror")
    T, mis = [], []
    for d0 in d:
        t, f = _refined(X, coef, margins, d0)
        if np.isfinite(f) and np.linalg.norm(t) * grid.spacing >= MIN_LENGTH_A:
            T.append(t * grid.spacing)
            mis.append(f)
    if not T:
        return np.zeros((0, 3)), np.zeros(0)
    order = np.argsort(mis, kind="stable")
    return np.array(T)[order], np.array(mis)[order]


def overlap_lattices(F: np.ndarray, grid: Grid, max_lattices: int = 3) -> list[np.ndarray]:
    """Lattices of a repeating-lattice field from its self-overlap (module docstring).

    The vectors of misfit at most ``LOOSE``, sorted by misfit, are cut wherever the next misfit
    is ``GAP`` times larger; each cut whose vectors span space gives a lattice (the smallest
    cell they generate), the strictest cut first. The strictest is the true lattice where the
    atoms nearly repeat on a sub-cell too (a pseudo-translation, whose lattice comes later), or
    a superlattice of it when a short vector's overlap was too thin to refine.

    Args:
        F: (n, n, n) float field on ``grid`` (a true or decoded M, any scale).
        grid: its grid. max_lattices: at most this many are returned.

    Returns:
        list of (3, 3) float64 lattices (rows the vectors, Å), each lattice once; empty when the
        vectors do not span space (a decoded field, a unit-cell field, a cell longer than the
        cube along some axis).
    """
    T, mis = overlap_vectors(F, grid)
    near = mis <= LOOSE
    T, mis = T[near], np.maximum(mis[near], EXACT)
    cuts = [i + 1 for i in range(len(mis) - 1) if mis[i + 1] >= GAP * mis[i]] + [len(mis)]
    out: list[np.ndarray] = []
    for c in cuts:
        L = basis_of(T[:c]) if c >= 3 else None
        if L is not None and not any(same_lattice(L, S) for S in out):
            out.append(L)
        if len(out) == max_lattices:
            break
    return out
