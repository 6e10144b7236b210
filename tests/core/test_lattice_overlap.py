"""crystalstudio.core.lattice_overlap: the repeating lattice read off the field's overlap with its
own translate, checked against lattices built in the test (images from lattice_positions, fields
as a direct float64 sum over atoms and voxels)."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core import lattice_fit
from crystalstudio.core.fit import fit_atoms
from crystalstudio.core.lattice_overlap import overlap_lattices, overlap_vectors
from crystalstudio.core.metrics import match_atoms

from .test_fit import direct_field
from .test_lattice_fit import GRID, cube, same_lattice


def _is_lattice_vector(t: np.ndarray, L: np.ndarray, tol_A: float) -> bool:
    f = np.linalg.solve(L.T, t)
    return float(np.linalg.norm(t - np.rint(f) @ L)) <= tol_A


@pytest.mark.parametrize("seed", range(3))
def test_the_cells_lattice_comes_first_and_its_vectors_repeat_the_field(seed):
    P, Zi, L = cube(seed)
    F = direct_field(P, Zi, GRID)
    lattices = overlap_lattices(F, GRID)
    assert lattices and same_lattice(lattices[0], L)
    assert abs(abs(np.linalg.det(lattices[0])) - abs(np.linalg.det(L))) < 0.05
    T, misfit = overlap_vectors(F, GRID)
    exact = misfit < 1e-6
    assert exact.sum() >= 3
    # each of them is a lattice vector to a thousandth of an angstrom, and only they fit that well
    assert all(_is_lattice_vector(t, L, 1e-3) for t in T[exact])
    assert not any(_is_lattice_vector(t, L, 0.05) for t in T[~exact])


def test_the_true_cell_comes_before_a_pseudo_cell():
    # the true cell doubles a along x, and its second Ba sits 0.01 Å off the half translation:
    # the atoms repeat on the half cell to 0.01 Å (test Fe(OH)2's pseudo-cell, built here)
    half = np.array([[4.0, 0.0, 0.0], [0.3, 4.5, 0.0], [0.4, 0.5, 5.0]])
    cell = half * np.array([[2.0], [1.0], [1.0]])
    frac = np.array([[0, 0, 0], [0.5 + 0.01 / 8.0, 0, 0], [0.25, 0.5, 0.5], [0.75, 0.5, 0.5]])
    P, Zi, L = cube(2, cell, frac, np.array([56, 56, 8, 8]))
    F = direct_field(P, Zi, GRID)
    lattices = overlap_lattices(F, GRID)
    assert same_lattice(lattices[0], L)
    # the pseudo-translations come later, in a smaller cell (the tie tries it only if the true
    # cell's fails)
    assert len(lattices) >= 2
    assert abs(np.linalg.det(lattices[-1])) < abs(np.linalg.det(L)) - 1.0


def test_a_field_that_does_not_repeat_has_no_lattice():
    rng = np.random.default_rng(3)
    P = rng.uniform(0.5, 9.5, (12, 3))
    F = direct_field(P, rng.integers(1, 90, 12), GRID)
    assert overlap_lattices(F, GRID) == []
    assert overlap_lattices(np.zeros((GRID.n,) * 3), GRID) == []
    assert overlap_lattices(np.full((GRID.n,) * 3, np.nan), GRID) == []


def test_fit_atoms_ties_to_the_fields_lattice_when_the_atoms_give_none(monkeypatch):
    # no lattice from the free fit's atoms: the field's own lattice alone makes the tie exact
    monkeypatch.setattr(lattice_fit, "lattice_candidates", lambda *a, **k: iter(()))
    P, Zi, L = cube(1)
    M = direct_field(P, Zi, GRID).astype(np.float32)
    atoms = fit_atoms(M, GRID, "repeating_lattice")
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    m = match_atoms(P[inside], Zi[inside], atoms.positions, atoms.Z, tol=0.01)
    assert m["n_pred"] == inside.sum() and m["true_matched"] == inside.sum()
    assert m["species_correct"] == inside.sum()
