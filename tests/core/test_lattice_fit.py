"""crystalstudio.core.lattice_fit: the repeating lattice's atoms tied to their lattice, checked
against lattices built in the test (images from lattice_positions, fields as a direct float64
sum over atoms and voxels)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from crystalstudio.core.density import Crystal, Grid, lattice_positions
from crystalstudio.core.fit import DEFAULT_FIT, fit_atoms
from crystalstudio.core.lattice_fit import (FIELD_EXPLAINED, POLISH_WINDOW, TIED_EDGE_A, _polished, find_lattice,
                                            tie_if_better, tied_fit)
from crystalstudio.core.metrics import match_atoms

from .test_fit import direct_field

GRID = Grid()
# an oblique cell of four sites: Sr at the cell origin (the cube's corner), Ti, O and an H
# 0.73 Å from the O (closer than a hydroxide's 0.97 Å: the free fit reads the pair as junk)
LATTICE = np.array([[4.2, 0.0, 0.0], [0.3, 5.1, 0.0], [0.5, 0.7, 6.3]])
FRAC = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.1, 0.6], [0.4, 0.1, 0.65]])
Z = np.array([38, 22, 8, 1])


def cube(rotation_seed: int, lattice: np.ndarray = LATTICE, frac: np.ndarray = FRAC, Zs: np.ndarray = Z,
         grid: Grid = GRID):
    R = Rotation.random(random_state=rotation_seed).as_matrix()
    P, Zi = lattice_positions(Crystal(lattice, frac, Zs), grid, R)
    return P, Zi, lattice @ R.T


def same_lattice(A: np.ndarray, B: np.ndarray, tol: float = 1e-3) -> bool:
    """Do the rows of A and of B generate one lattice (each a whole-number combination of the other)?"""
    for X, Y in ((A, B), (B, A)):
        c = X @ np.linalg.inv(Y)
        if np.abs(c - np.rint(c)).max() > tol:
            return False
    return True


@pytest.mark.parametrize("seed", range(3))
def test_find_lattice_recovers_the_cells_lattice_from_exact_images(seed):
    P, Zi, L = cube(seed)
    found = find_lattice(P, Zi.astype(float), GRID.length, 3.5)
    assert found is not None and same_lattice(found, L)
    assert abs(abs(np.linalg.det(found)) - abs(np.linalg.det(L))) < 1e-6


def test_find_lattice_gives_none_for_atoms_that_do_not_repeat():
    rng = np.random.default_rng(0)
    P = rng.uniform(0, 10, (25, 3))
    assert find_lattice(P, rng.integers(1, 90, 25).astype(float), GRID.length, 3.5) is None


def test_find_lattice_tells_neighbours_in_the_table_apart():
    # Sm (62) on one site, Ho (67) on the other: reading them as one element halves the cell
    P, Zi, L = cube(4, np.eye(3) * 4.0, np.array([[0, 0, 0], [0.5, 0.5, 0.5]]), np.array([62, 67]))
    found = find_lattice(P, Zi.astype(float), GRID.length, 3.5)
    assert found is not None and abs(abs(np.linalg.det(found)) - 64.0) < 1e-6


def test_tied_fit_repairs_a_free_fit_that_misplaced_images_at_the_faces():
    # the free fit's atoms, with every image beyond a face moved 0.2 Å at random and one
    # outside image doubled: the tie puts every atom of the cube back within 1e-3 Å
    P, Zi, L = cube(1)
    F = direct_field(P, Zi, GRID) * GRID.peak_scale
    rng = np.random.default_rng(1)
    out = ~np.all((P >= 0) & (P <= GRID.length), axis=1)
    Pf = P.copy()
    Pf[out] += rng.normal(0, 0.2 / np.sqrt(3), (out.sum(), 3))
    k = np.flatnonzero(out)[0]
    Pf, Af = np.vstack([Pf, Pf[k] + 0.1]), np.append(Zi.astype(float) * 0.98, Zi[k] * 0.5)
    tf = tied_fit(F, GRID, Pf, Af, L, 3.5)
    assert tf is not None and len(tf.amplitudes) == len(FRAC)
    np.testing.assert_allclose(np.sort(tf.amplitudes), np.sort(Z), atol=1e-3)
    assert same_lattice(tf.lattice, L, 1e-4)
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    got = np.all((tf.positions >= -TIED_EDGE_A) & (tf.positions <= GRID.length + TIED_EDGE_A), axis=1)
    assert got.sum() == inside.sum()
    m = match_atoms(P[inside], Zi[inside], tf.positions[got], np.rint(tf.image_amplitudes[got]).astype(int), tol=1e-3)
    assert m["true_matched"] == inside.sum() and m["species_correct"] == inside.sum()


@pytest.mark.parametrize("seed", [2, 3])
def test_fit_atoms_returns_every_atom_of_a_lattice_cube_exactly(seed):
    P, Zi, _ = cube(seed)
    M = direct_field(P, Zi, GRID)
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    atoms = fit_atoms(M, GRID, "repeating_lattice")
    assert len(atoms) == inside.sum()
    m = match_atoms(P[inside], Zi[inside], atoms.positions, atoms.Z, tol=1e-3)
    assert m["true_matched"] == inside.sum() and m["species_correct"] == inside.sum()
    np.testing.assert_allclose(atoms.amplitude, np.rint(atoms.amplitude), atol=1e-3)


def _spy_free_fits(monkeypatch):
    """Record the max_rounds of every free fit fit_atoms runs."""
    import crystalstudio.core.fit as fit_module

    calls = []
    real = fit_module._free_fit

    def spy(F, grid, settings, *args):
        calls.append(settings.max_rounds)
        return real(F, grid, settings, *args)

    monkeypatch.setattr(fit_module, "_free_fit", spy)
    return calls


def test_fit_atoms_keeps_the_quick_seeds_tie_when_it_explains_the_field(monkeypatch):
    # the first quick free fit (tie_seed_rounds[0] rounds) finds the lattice; its tie explains
    # the field, so neither the longer seed nor the full free fit runs, and every atom is exact
    calls = _spy_free_fits(monkeypatch)
    P, Zi, _ = cube(2)
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    atoms = fit_atoms(direct_field(P, Zi, GRID), GRID, "repeating_lattice")
    assert calls == [DEFAULT_FIT.tie_seed_rounds[0]]
    m = match_atoms(P[inside], Zi[inside], atoms.positions, atoms.Z, tol=1e-3)
    assert len(atoms) == inside.sum() and m["true_matched"] == m["species_correct"] == inside.sum()


def test_fit_atoms_runs_the_full_free_fit_when_the_quick_tie_fails(monkeypatch):
    # random atoms repeat on no lattice: the quick seeds give no tie, the full free fit decides
    calls = _spy_free_fits(monkeypatch)
    rng = np.random.default_rng(3)
    P = rng.uniform(1, 9, (12, 3))
    Zs = rng.integers(1, 60, 12)
    atoms = fit_atoms(direct_field(P, Zs, GRID), GRID, "repeating_lattice")
    assert calls == [*DEFAULT_FIT.tie_seed_rounds, DEFAULT_FIT.max_rounds]
    m = match_atoms(P, Zs, atoms.positions, atoms.Z, tol=1e-3)
    assert len(atoms) == 12 and m["true_matched"] == m["species_correct"] == 12
    # and with the quick seed off, only the full free fit runs
    calls.clear()
    fit_atoms(direct_field(P, Zs, GRID), GRID, "repeating_lattice", replace(DEFAULT_FIT, tie_seed_rounds=()))
    assert calls == [DEFAULT_FIT.max_rounds]


def test_tie_if_better_keeps_the_free_fit_when_the_field_is_not_periodic():
    rng = np.random.default_rng(3)
    P = rng.uniform(1, 9, (12, 3))
    Zs = rng.integers(1, 60, 12)
    F = direct_field(P, Zs, GRID) * GRID.peak_scale
    assert tie_if_better(F, GRID, P, Zs.astype(float), 1e-9, 3.5) is None
    # and fit_atoms with the tie off is the free fit (same settings otherwise)
    free = fit_atoms(F / GRID.peak_scale, GRID, "repeating_lattice", replace(DEFAULT_FIT, tie_lattice=False))
    assert len(free) == 12


def test_lattice_candidates_put_the_exact_lattice_before_a_pseudo_translation():
    # Fe and Co alternate along a (cell 8 x 4 x 4 Å): by position alone the atoms repeat every
    # 4 Å, by amplitude only every 8 Å. The true cell comes first; the half cell (what a
    # positions-only search finds) later, for tie_if_better to try only if the first fails
    from crystalstudio.core.lattice_fit import lattice_candidates

    frac = np.array([[0, 0, 0], [0.5, 0, 0]])
    P, Zi, L = cube(5, np.diag([8.0, 4.0, 4.0]), frac, np.array([26, 27]))
    cands = list(lattice_candidates(P, Zi.astype(float), GRID.length, 3.5))
    assert same_lattice(cands[0], L)
    assert any(abs(abs(np.linalg.det(c)) - 64.0) < 1e-6 for c in cands[1:])
    F = direct_field(P, Zi, GRID) * GRID.peak_scale
    tf = tie_if_better(F, GRID, P, Zi.astype(float), 1.0, 3.5)
    assert tf is not None and same_lattice(tf.lattice, L, 1e-4)


def test_tied_fit_finds_the_sites_a_junk_free_fit_missed():
    # a dense cell (one Cr and four B in 3.9 Å, as val CrB4, whose free fit gave 28 "sites"
    # for 5): given only the Cr images and 12 junk atoms, the tie finds the four B sites from
    # its residual and returns every atom of the cube exactly (a 6 Å window)
    lattice = np.eye(3) * 3.9
    frac = np.array([[0, 0, 0], [0.5, 0.25, 0.3], [0.5, 0.75, 0.7], [0.2, 0.5, 0.75], [0.8, 0.5, 0.25]])
    Zs = np.array([24, 5, 5, 5, 5])
    grid = Grid(n=18, length=6.0)  # h = 1/3 Å as in the default grid, a smaller window
    P, Zi, L = cube(6, lattice, frac, Zs, grid)
    F = direct_field(P, Zi, grid) * grid.peak_scale
    rng = np.random.default_rng(6)
    cr = Zi == 24
    Pf = np.vstack([P[cr], rng.uniform(0, grid.length, (12, 3))])
    Af = np.concatenate([Zi[cr].astype(float), rng.uniform(5, 14, 12)])
    tf = tied_fit(F, grid, Pf, Af, L, 3.5)
    assert tf is not None and len(tf.amplitudes) == 5
    np.testing.assert_allclose(np.sort(tf.amplitudes), np.sort(Zs), atol=1e-3)
    inside = np.all((P >= 0) & (P <= grid.length), axis=1)
    got = np.all((tf.positions >= -TIED_EDGE_A) & (tf.positions <= grid.length + TIED_EDGE_A), axis=1)
    m = match_atoms(P[inside], Zi[inside], tf.positions[got], np.rint(tf.image_amplitudes[got]).astype(int), tol=1e-3)
    assert got.sum() == inside.sum() and m["true_matched"] == inside.sum() and m["species_correct"] == inside.sum()


def test_a_tie_that_is_not_exact_loses_its_junk_site(monkeypatch):
    """_without_one: the cell's four sites plus a junk site of amplitude 1.55 (the least
    integral), the O at 7.8: removing the junk site and regrowing gives the four true sites,
    exact to the float floor, in one try; a state whose amplitudes are all integers to within
    NON_INTEGRAL is returned as it is, with no try."""
    from crystalstudio.core import lattice_fit as lf

    P, Zi, L = cube(2)
    F = direct_field(P, Zi, GRID) * GRID.peak_scale
    energy = float(np.vdot(F, F))
    sites = np.array([P[Zi == z][0] for z in Z])
    junk = 0.5 * (sites[1] + sites[2]) + np.array([0.3, -0.2, 0.4])
    state = {"sites": np.vstack([sites, junk]), "amps": np.array([38.0, 22.0, 7.8, 1.0, 1.55]), "L": L,
             "rss": 1e-9 * energy}
    calls = []
    grown = lf._grown

    def spy(F_, grid, s, a, *rest):
        calls.append(sorted(np.round(a, 2).tolist()))
        return grown(F_, grid, s, a, *rest)

    monkeypatch.setattr(lf, "_grown", spy)
    out = lf._without_one(F, GRID, state, 0.5, 100, 4, lf.FIELD_EXACT * energy, L)
    assert calls == [[1.0, 7.8, 22.0, 38.0]]  # the junk site (0.45 from an integer) went first, and sufficed
    assert len(out["amps"]) == 4 and out["rss"] <= lf.FIELD_EXACT * energy
    np.testing.assert_allclose(np.sort(out["amps"]), np.sort(Z), atol=1e-3)
    d = np.linalg.norm(out["Pk"][:, None] - P[None], axis=2).min(axis=1)
    assert d.max() < 1e-3

    calls.clear()
    integral = {**state, "amps": np.array([38.0, 22.05, 8.0, 0.95, 2.0])}
    assert lf._without_one(F, GRID, integral, 0.5, 100, 4, lf.FIELD_EXACT * energy, L) is integral
    assert calls == []


def test_lattice_candidates_take_their_amplitude_scale_from_atoms_near_the_cube():
    """A free fit's atom far outside the cube, seen only through its tail, may take any
    amplitude: one of 200 there must not push the cell's heaviest site (Ba, 56) out of the
    heavy-atom tier. Here the lighter atoms are 0.6-1 Å off (a quick free fit), so only the Ba
    images give the lattice."""
    from crystalstudio.core.lattice_fit import lattice_candidates

    Zs = np.array([56, 22, 8, 1])
    P, Zi, L = cube(3, Zs=Zs)
    rng = np.random.default_rng(3)
    light = Zi < 56
    v = rng.normal(size=(light.sum(), 3))
    Pf = P.copy()
    Pf[light] += v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0.6, 1.0, (light.sum(), 1))
    Af = Zi.astype(float)
    found = [X for X in lattice_candidates(Pf, Af, GRID.length, 3.5)]
    assert any(same_lattice(X, L, 0.05) for X in found)
    junk = np.array([[5.0, GRID.length + 2.5, 5.0]])  # 2.5 Å beyond a face; checked within 0.875
    found = [X for X in lattice_candidates(np.vstack([Pf, junk]), np.append(Af, 200.0), GRID.length, 3.5)]
    assert any(same_lattice(X, L, 0.05) for X in found)


def test_a_tied_lattice_stays_within_trust_of_its_candidate():
    """_converge keeps every lattice vector within LATTICE_TRUST_A of the candidate (a step going
    further has the vector put back on the edge): started 0.5 Å from a candidate 1 Å off the true
    lattice, the lattice stays within trust of it (another candidate would be another lattice),
    while the same start with the trust centred on it reaches the true lattice; started 0.15 Å
    off a candidate that is the true lattice, it converges to it and explains the field to the
    float floor."""
    from crystalstudio.core import lattice_fit as lf

    P, Zi, L = cube(1)
    F = direct_field(P, Zi, GRID) * GRID.peak_scale
    energy = float(np.vdot(F, F))
    sites = np.array([P[Zi == z][0] for z in Z])
    near = L.copy()
    near[2] += np.array([0.1, -0.1, 0.05])
    st = lf._converge(F, GRID, sites, Z.astype(float), near, 0.5, 100, L_ref=L)
    assert st is not None and st["rss"] < 1e-12 * energy
    assert np.abs(st["L"] - L).max() < 1e-4
    wrong = L.copy()
    wrong[2] += np.array([0.0, 0.0, 1.0])
    start = wrong - np.array([0.0, 0.0, 0.5])  # 0.5 Å from the candidate, 0.5 Å from the truth
    st = lf._converge(F, GRID, sites, Z.astype(float), start, 0.5, 100, L_ref=wrong)
    assert st is None or np.linalg.norm(st["L"] - wrong, axis=1).max() <= lf.LATTICE_TRUST_A + 1e-9
    st = lf._converge(F, GRID, sites, Z.astype(float), start, 0.5, 100, L_ref=start)  # trust centred on it
    assert st is not None and np.abs(st["L"] - L).max() < 1e-4  # the same start reaches the truth


def test_a_pseudo_cells_tie_polished_untied_gives_every_atom():
    # the true cell doubles a along x, and its second Ba sits 0.005 Å off the half translation:
    # the atoms repeat on the half cell to 0.005 Å (test Fe(OH)2's pseudo-cell, built here)
    half = np.array([[4.0, 0.0, 0.0], [0.3, 4.5, 0.0], [0.4, 0.5, 5.0]])
    cell = half * np.array([[2.0], [1.0], [1.0]])
    frac = np.array([[0, 0, 0], [0.5 + 0.005 / 8.0, 0, 0], [0.25, 0.5, 0.5], [0.75, 0.5, 0.5]])
    P, Zi, L = cube(2, cell, frac, np.array([56, 56, 8, 8]))
    F = direct_field(P, Zi, GRID) * GRID.peak_scale
    energy = float(np.vdot(F, F))
    pseudo = half @ np.linalg.inv(cell) @ L  # the half cell, rotated as the cube was
    tf = tied_fit(F, GRID, P, Zi.astype(float), pseudo, 3.5)
    assert tf is not None and len(tf.sites) == 2  # one Ba and one O site
    assert FIELD_EXPLAINED * energy < tf.rss <= POLISH_WINDOW * energy  # close, not exact
    pol = _polished(F, GRID, tf, 3.5)
    assert pol is not None and pol.rss <= FIELD_EXPLAINED * energy
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    kept = np.all((pol.positions >= -pol.edge_A) & (pol.positions <= GRID.length + pol.edge_A), axis=1)
    m = match_atoms(P[inside], Zi[inside], pol.positions[kept], np.rint(pol.image_amplitudes[kept]), tol=0.01)
    assert m["n_pred"] == inside.sum() and m["true_matched"] == inside.sum()
    assert m["species_correct"] == inside.sum()


def _near_ties(monkeypatch, which):
    """tied_fit, its ties number ``which(i)`` (0-based) made near but not exact: the residual
    set to (1 + i / 10) 5e-9 of the field's energy and the images moved 0.05 + 0.01 i Å."""
    from crystalstudio.core import lattice_fit

    real, seen = lattice_fit.tied_fit, []

    def tied(F, grid, *a, **k):
        tf = real(F, grid, *a, **k)
        if tf is not None and which(len(seen)):
            tf.positions = tf.positions + 0.05 + 0.01 * len(seen)
            tf.rss = 5e-9 * (1 + len(seen) / 10) * float(np.vdot(F, F))
        seen.append(tf)
        return tf

    monkeypatch.setattr(lattice_fit, "tied_fit", tied)
    return seen


def test_a_quick_tie_that_is_not_exact_gives_way_to_an_exact_one(monkeypatch):
    # val SiH12C2(NF)6: the first tie explained the field (6.9e-9 < 1e-8) with nine H off; a
    # later lattice's tie is exact, and it is the one returned
    seen = _near_ties(monkeypatch, lambda i: i == 0)
    P, Zi, _ = cube(2)
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    atoms = fit_atoms(direct_field(P, Zi, GRID), GRID, "repeating_lattice")
    assert len(seen) >= 2
    m = match_atoms(P[inside], Zi[inside], atoms.positions, atoms.Z, tol=1e-3)
    assert len(atoms) == inside.sum() and m["true_matched"] == m["species_correct"] == inside.sum()


def test_when_no_quick_tie_is_exact_the_closest_one_is_kept(monkeypatch):
    # every tie near but none exact: the quick seeds' ties are all tried, the full free fit does
    # not run, and the tie of lowest residual (the first) is returned, its images 0.05 Å moved
    seen = _near_ties(monkeypatch, lambda i: True)
    calls = _spy_free_fits(monkeypatch)
    P, Zi, _ = cube(2)
    inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
    atoms = fit_atoms(direct_field(P, Zi, GRID), GRID, "repeating_lattice")
    assert calls == list(DEFAULT_FIT.tie_seed_rounds) and len(seen) >= 2
    m = match_atoms(P[inside] + 0.05, Zi[inside], atoms.positions, atoms.Z, tol=1e-3)
    assert m["true_matched"] >= inside.sum() - 3  # (an image moved out across a face is lost)


def test_distinct_translations_and_the_bases_they_span():
    """The translations of a 3 x 4 x 5 Å orthorhombic lattice given with both signs, a 0.05 Å
    near-duplicate and a sum: one of each, shortest first; the smallest spanning triple is the
    cell, and a coplanar triple (a, b, a + b) is never offered."""
    from crystalstudio.core.lattice_fit import basis_of, distinct_translations, spanning_triples

    a, b, c = np.array([3.0, 0, 0]), np.array([0, 4.0, 0]), np.array([0, 0, 5.0])
    V = np.array([c, -a, b + [0.05, 0, 0], a, -b, a + b, b])
    U = distinct_translations(V, 0.2)
    assert np.allclose(U, [-a, -b, c, a + b])  # lengths 3, 4, 5, 5 (ties in input order)
    vols = sorted(v for _, v in spanning_triples(U))
    assert np.allclose(vols, [60.0, 60.0, 60.0])  # (a, b, c), (a, a+b, c), (b, a+b, c); not (a, b, a+b)
    assert np.allclose(np.abs(basis_of(V)), np.abs(np.array([a, b, c])))
