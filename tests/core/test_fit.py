"""crystalstudio.core.fit: atoms recovered from fields built in the test (Eq. 1 as a direct
float64 sum over atoms and voxels, independent of the separable code under test)."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core.density import Crystal, Grid, lattice_positions
from crystalstudio.core.fit import DECODED_FIT, FieldError, field_model, fit_atoms
from crystalstudio.core.metrics import match_atoms

GRID = Grid()  # 30^3 voxels over 10 Å, sigma 1 Å


def direct_field(P: np.ndarray, Z: np.ndarray, grid: Grid, occupancy: np.ndarray | None = None) -> np.ndarray:
    """Eq. 1 by brute force: for every voxel centre, the sum over atoms, in float64."""
    c = grid.centres()
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((X - P[None]) ** 2).sum(-1)
    w = Z * (1.0 if occupancy is None else occupancy)
    M = (w[None] * np.exp(-d2 / (2 * grid.sigma**2))).sum(1) / grid.peak_scale
    return M.reshape((grid.n,) * 3)


def random_atoms(rng, N, dmin=1.2, lo=1.5, hi=8.5):
    P: list[np.ndarray] = []
    while len(P) < N:
        p = rng.uniform(lo, hi, 3)
        if all(np.linalg.norm(p - q) >= dmin for q in P):
            P.append(p)
    return np.array(P), rng.integers(1, 95, N)


@pytest.mark.parametrize("seed", range(4))
def test_random_crystals_come_back_exactly(seed):
    rng = np.random.default_rng(seed)
    P, Z = random_atoms(rng, 14)
    # force one close pair (1.2 Å) of a light atom beside a heavy one
    P[1] = P[0] + np.array([1.2, 0.0, 0.0])
    Z[0], Z[1] = 90, 1
    from scipy.spatial import cKDTree
    d, _ = cKDTree(P).query(P, k=2)
    assert d[:, 1].min() >= 1.2 - 1e-9
    M = direct_field(P, Z, GRID).astype(np.float32)
    atoms = fit_atoms(M, GRID)
    m = match_atoms(P, Z, atoms.positions, atoms.Z, tol=0.1)
    assert len(atoms) == len(Z)
    assert m["true_matched"] == len(Z)
    assert m["species_correct"] == len(Z)
    np.testing.assert_allclose(np.sort(atoms.amplitude), np.sort(Z.astype(float)), atol=0.05)
    assert np.all(atoms.amplitude_sigma >= 0) and np.all(np.isfinite(atoms.amplitude_sigma))


def test_every_Z_from_1_to_94_is_read_from_its_amplitude():
    rng = np.random.default_rng(7)
    # a 5 x 5 x 4 lattice of 2 Å spacing holds Z = 1..94 (plus some repeats), shuffled
    g = np.arange(5) * 2.0 + 1.0
    P = np.stack(np.meshgrid(g, g, g[:4], indexing="ij"), -1).reshape(-1, 3)
    P = P + rng.normal(0, 0.1, P.shape)
    Z = np.concatenate([np.arange(1, 95), rng.integers(1, 95, len(P) - 94)])
    rng.shuffle(Z)
    atoms = fit_atoms(direct_field(P, Z, GRID), GRID)
    m = match_atoms(P, Z, atoms.positions, atoms.Z, tol=0.1)
    assert (len(atoms), m["true_matched"], m["species_correct"]) == (len(Z), len(Z), len(Z))


def test_noise_of_a_stated_level_keeps_the_count():
    rng = np.random.default_rng(3)
    P, Z = random_atoms(rng, 12, dmin=1.8)
    Z = np.maximum(Z, 6)  # atoms of at least carbon
    F = direct_field(P, Z, GRID)
    noise = 0.05 * GRID.peak_scale ** -1  # 0.05 in Z units per voxel, white
    M = F + rng.normal(0, noise, F.shape)
    atoms = fit_atoms(M, GRID, settings=DECODED_FIT)
    m = match_atoms(P, Z, atoms.positions, atoms.Z, tol=0.2)
    assert len(atoms) == len(Z)
    assert m["true_matched"] == len(Z)
    assert np.all(np.abs(np.sort(atoms.amplitude) - np.sort(Z)) < 1.0)
    # the reported standard errors know about the noise
    assert 0.005 < np.median(atoms.amplitude_sigma) < 0.5


def test_empty_field_gives_no_atoms():
    atoms = fit_atoms(np.zeros((30, 30, 30), np.float32), GRID)
    assert len(atoms) == 0 and atoms.positions.shape == (0, 3)


@pytest.mark.parametrize("bad, what", [
    (np.full((30, 30, 30), np.nan, np.float32), "NaN"),
    (-np.ones((30, 30, 30), np.float32), "negative everywhere"),
    (np.zeros((20, 20, 20), np.float32), "shape"),
])
def test_bad_fields_are_refused_with_one_line(bad, what):
    with pytest.raises(FieldError) as e:
        fit_atoms(bad, GRID)
    msg = str(e.value)
    assert what in msg and "\n" not in msg


def test_field_model_equals_the_direct_sum():
    rng = np.random.default_rng(0)
    P, Z = random_atoms(rng, 9, lo=-1.0, hi=11.0)
    np.testing.assert_allclose(field_model(P, Z.astype(float), GRID) / GRID.peak_scale,
                               direct_field(P, Z, GRID), rtol=1e-12, atol=1e-15)


def test_repeating_lattice_atoms_in_the_cube_and_images_outside():
    # rock salt (a = 5.64 Å) rotated: the cube is filled, images outside reach it
    a = 5.64
    frac = np.array([[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5],
                     [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]])
    nacl = Crystal(np.eye(3) * a, frac, [11] * 4 + [17] * 4, "NaCl")
    from scipy.spatial.transform import Rotation
    R = Rotation.from_euler("zyx", [20, 35, 10], degrees=True).as_matrix()
    grid = Grid(n=18, length=6.0)  # h = 1/3 Å as in the default grid, a smaller window
    P, Z = lattice_positions(nacl, grid, R)
    M = direct_field(P, Z, grid)
    atoms = fit_atoms(M, grid, "repeating_lattice")
    inside = np.all((P >= 0) & (P <= grid.length), axis=1)
    m = match_atoms(P[inside], Z[inside], atoms.positions, atoms.Z, tol=0.1)
    assert m["true_matched"] >= 0.99 * inside.sum()
    assert m["species_correct"] >= 0.99 * inside.sum()
    everything = fit_atoms(M, grid, "repeating_lattice", keep_outside=True)
    assert len(everything) > len(atoms)  # atoms outside the cube were fitted too


@pytest.mark.parametrize("outside", [0.4, 1.0, 2.0])
def test_a_lattice_atom_outside_a_face_is_seeded_where_its_gaussian_peaks(outside):
    # one atom `outside` Å beyond the x = 0 face: its only trace in the cube is a tail whose
    # maximum lies on the face; a Gaussian of the known sigma through it points back to the atom
    from crystalstudio.core.fit import _candidates

    P = np.array([[-outside, 4.3, 6.1]])
    F = direct_field(P, np.array([40]), GRID) * GRID.peak_scale
    cand, _ = _candidates(F, GRID, 0.05, 0.0, laplacian=False, reach_A=3.5)
    assert np.linalg.norm(cand[0] - P[0]) < 0.05
    on_face, _ = _candidates(F, GRID, 0.05, 0.0, laplacian=False)  # the unit cell: no reach
    assert on_face[0, 0] == pytest.approx(0.5 * GRID.spacing)
    atoms = fit_atoms(F / GRID.peak_scale, GRID, "repeating_lattice", keep_outside=True)
    assert len(atoms) == 1 and np.linalg.norm(atoms.positions[0] - P[0]) < 1e-3 and atoms.Z[0] == 40


def test_the_sharpening_matrix_narrows_every_gaussian_in_place():
    # D applied to a 1-D Gaussian of sigma centred anywhere in the cube (direct float64) peaks
    # at the same voxel, at most a quarter below the original height, and is at most 0.6 as wide
    from crystalstudio.core.fit import sharpening_matrix

    c = GRID.centres()
    D = sharpening_matrix(GRID, 0.45)
    fine = np.linspace(c[0], c[-1], 2000)
    for p in np.linspace(0.2, GRID.length - 0.2, 37):
        got = D @ np.exp(-(c - p) ** 2 / (2 * GRID.sigma ** 2))
        assert abs(c[np.argmax(got)] - p) <= 0.5 * GRID.spacing + 1e-9
        assert 0.75 < got.max() <= 1.0
        prof = np.interp(fine, c, got)
        above = fine[prof >= 0.5 * got.max()]
        width = above.max() - above.min()
        assert width < 0.6 * 2.3548 * GRID.sigma  # FWHM of sigma is 2.35 Å


@pytest.mark.parametrize("width, lam", [(0.0, 3e-7), (1.0, 3e-7), (1.5, 3e-7), (0.45, 0.0)])
def test_the_sharpening_matrix_refuses_widths_it_cannot_make(width, lam):
    from crystalstudio.core.fit import sharpening_matrix

    with pytest.raises(ValueError, match="sharpening to"):
        sharpening_matrix(GRID, width, lam)


def test_first_round_seeds_most_atoms_of_a_dense_field():
    # 100 atoms in a 10 Å cube (pairs down to 1.8 Å): at sigma 1 Å most are shoulders. The
    # maxima of the sharpened field seed at least 85 of them within 0.3 Å in the first round;
    # the unsharpened detectors (maxima of the field and of its Laplacian) seed at most 60
    from crystalstudio.core.fit import DEFAULT_FIT, _candidates, _new_candidates, _sharp_candidates

    rng = np.random.default_rng(7)
    P, Z = random_atoms(rng, 100, dmin=1.8, lo=0.8, hi=9.2)
    F = direct_field(P, Z.astype(float), GRID) * GRID.peak_scale
    none = np.zeros((0, 3))

    def seeded(cand, strength):
        cand = _new_candidates(cand, strength, none, DEFAULT_FIT.merge_A, 0.0)
        return int((np.linalg.norm(P[:, None] - cand[None], axis=-1).min(1) < 0.3).sum())

    assert seeded(*_sharp_candidates(F, GRID, 0.25, DEFAULT_FIT.sharpen_A, DEFAULT_FIT.sharpen_lambda)) >= 85
    assert seeded(*_candidates(F, GRID, 0.25, 0.0, laplacian=True)) <= 60


def test_a_misfit_atoms_residual_peak_does_not_silence_new_light_atoms():
    # the strongest residual peak sits on an atom already fitted (it is not a new atom); the
    # relative cut must be taken against the strongest *new* candidate, so two F-like peaks stay
    from crystalstudio.core.fit import _new_candidates

    P = np.array([[5.0, 5.0, 5.0]])
    cand = np.array([[5.1, 5.0, 5.0], [2.0, 2.0, 2.0], [8.0, 2.0, 6.0], [2.1, 2.0, 2.0], [7.0, 7.0, 7.0]])
    strength = np.array([60.0, 9.0, 8.5, 8.0, 1.0])
    new = _new_candidates(cand, strength, P, merge_A=0.5, relative=0.25)
    np.testing.assert_array_equal(new, cand[[1, 2]])  # not the misfit, not the duplicate, not the weak one
    assert len(_new_candidates(cand[:1], strength[:1], P, 0.5, 0.25)) == 0


def test_crowded_seeds_get_the_non_negative_least_squares_amplitudes():
    # seeds 0.4 Å apart beside a field's two atoms: the plain linear solve swings to weights
    # of both signs (47, -32, 12); Eq. 1 weights are positive, so the fit's solve must equal
    # NNLS on the explicit design matrix (direct float64 sums, one column per seed)
    from scipy.optimize import nnls

    from crystalstudio.core.fit import _amplitudes

    P_true = np.array([[5.0, 5.0, 5.0], [6.4, 5.0, 5.0]])
    F = direct_field(P_true, np.array([26, 1]), GRID) * GRID.peak_scale
    seeds = np.array([[5.2, 5.0, 5.0], [5.6, 5.0, 5.0], [6.0, 5.0, 5.0]])
    X = np.stack([direct_field(p[None], np.array([1.0]), GRID).ravel() * GRID.peak_scale for p in seeds], 1)
    plain = np.linalg.lstsq(X, F.ravel(), rcond=None)[0]
    assert plain.min() < 0  # the case the constraint is for
    ref = nnls(X, F.ravel())[0]
    A = _amplitudes(F, seeds, GRID.centres(), GRID.sigma)
    assert A.min() >= 0
    np.testing.assert_allclose(A, ref, atol=1e-6 * ref.max())


def test_levenberg_marquardt_raises_the_damping_until_a_step_is_accepted():
    # 12 atoms in the cube, 6 images outside a face placed 0.8 Å off, and 4 spurious
    # candidates at the fit's outer bound with Z 5000: every step at damping <= 1e2 x diag is
    # rejected at some point, and a refinement that gave up there stopped at a residual of
    # 1e-8 of the field's energy; it must reach the exact field (float rounding)
    from crystalstudio.core.fit import _refine

    rng = np.random.default_rng(27)
    Pt, At = rng.uniform(0.5, 9.5, (12, 3)), rng.integers(1, 80, 12).astype(float)
    Po = rng.uniform(0, 10, (6, 3))
    Po[:, 0] = -rng.uniform(0.5, 3.0, 6)
    Ao = rng.integers(1, 80, 6).astype(float)
    P_true, A_true = np.vstack([Pt, Po]), np.concatenate([At, Ao])
    Pf = rng.uniform(0, 10, (4, 3))
    Pf[:, 0] = -3.5 + rng.uniform(0, 0.3, 4)
    P0 = np.vstack([Pt + rng.normal(0, 0.2, Pt.shape), Po + rng.normal(0, 0.8, Po.shape), Pf])
    A0 = np.concatenate([At, Ao, np.full(4, 5000.0)])
    F = field_model(P_true, A_true, GRID)
    P, A, r, _ = _refine(F, P0, A0, GRID.centres(), GRID.sigma, -3.5, 13.5, 30)
    assert np.vdot(r, r) < 1e-12 * np.vdot(F, F)
    np.testing.assert_allclose(P[:12], Pt, atol=1e-4)  # the atoms in the cube, exactly


def _probs_around(grid: Grid, positions: np.ndarray, classes: list[dict[int, float]], K: int = 95) -> np.ndarray:
    """U-Net-like class probabilities: background everywhere, the given p(Z) in the 3x3x3
    voxels around each position."""
    probs = np.zeros((K, *(grid.n,) * 3))
    probs[0] = 1.0
    for pos, pz in zip(positions, classes):
        i, j, l = np.floor(pos / grid.spacing).astype(int)
        sl = (slice(i - 1, i + 2), slice(j - 1, j + 2), slice(l - 1, l + 2))
        probs[(0, *sl)] = 1.0 - sum(pz.values())
        for z, v in pz.items():
            probs[(z, *sl)] = v
    return probs


def test_combine_with_unet_reads_species_from_both_the_u_net_and_the_amplitude():
    """Species rule of decoded fields: the U-Net's p(Z) times the amplitude's likelihood
    (a fitted amplitude of 15.7 tips a near tie between O and S to S, and 7.6 to O); the
    vote where the atoms carry no amplitude; atoms under the gate are dropped."""
    from crystalstudio.core.fit import combine_with_unet
    from crystalstudio.core.segment import Atoms

    P = np.array([[2.0, 2.0, 2.0], [5.0, 5.0, 5.0], [8.0, 5.0, 2.0], [5.0, 8.0, 8.0]])
    classes = [{8: 0.40, 16: 0.35}, {8: 0.40, 16: 0.35}, {26: 0.9}, {8: 0.05}]
    probs = _probs_around(GRID, P, classes)
    A = np.array([15.7, 7.6, 30.0, 8.0])
    atoms = Atoms(P, np.rint(A).astype(np.int64), None, A, np.full(4, 0.1))
    out = combine_with_unet(atoms, probs, GRID, gate=0.2)
    assert out.Z.tolist() == [16, 8, 26]  # the last atom: P(atom) 0.05 < gate
    np.testing.assert_array_equal(out.positions, P[:3])
    np.testing.assert_array_equal(out.amplitude, A[:3])
    voted = combine_with_unet(Atoms(P, atoms.Z), probs, GRID, gate=0.2)
    assert voted.Z.tolist() == [8, 8, 26] and voted.amplitude is None
    assert len(combine_with_unet(atoms, probs, GRID, gate=0.0)) == 4


def test_combine_with_unet_on_refined_fields_takes_z_from_the_amplitude():
    """The refined-field rule: Z is the rounded fitted amplitude whatever the U-Net prefers
    (15.7 -> S although the U-Net leans to O; 30.0 -> Zn although it says Fe); the U-Net
    still drops atoms below the gate; atoms without an amplitude keep the vote."""
    from crystalstudio.core.fit import REFINED_GATE, combine_with_unet
    from crystalstudio.core.segment import Atoms

    P = np.array([[2.0, 2.0, 2.0], [5.0, 5.0, 5.0], [8.0, 5.0, 2.0], [5.0, 8.0, 8.0]])
    classes = [{8: 0.40, 16: 0.35}, {8: 0.40, 16: 0.35}, {26: 0.9}, {8: 0.01}]
    probs = _probs_around(GRID, P, classes)
    A = np.array([15.7, 7.6, 30.0, 8.0])
    atoms = Atoms(P, np.zeros(4, np.int64), None, A, np.full(4, 0.1))
    out = combine_with_unet(atoms, probs, GRID, gate=REFINED_GATE, amplitude_species=True)
    assert out.Z.tolist() == [16, 8, 30]  # the last atom: P(atom) 0.01 < 0.05
    np.testing.assert_array_equal(out.amplitude, A[:3])
    assert combine_with_unet(atoms, probs, GRID, gate=0.0, amplitude_species=True).Z.tolist() == [16, 8, 30, 8]
    voted = combine_with_unet(Atoms(P, atoms.Z), probs, GRID, gate=0.2, amplitude_species=True)
    assert voted.Z.tolist() == [8, 8, 26]


def _map_z_reference(a: float, counts: np.ndarray, sd: float) -> int:
    """The maximum a posteriori Z by a direct loop in float64 (the reference)."""
    best, arg = -np.inf, None
    total = float(np.sum(counts[1:] + 1.0))
    for z in range(1, len(counts)):
        s = np.log((counts[z] + 1.0) / total) - (a - z) ** 2 / (2 * sd * sd)
        if s > best:
            best, arg = s, z
    return arg


def test_species_from_amplitude_weighs_the_training_frequencies():
    """Without a prior Z is the rounded amplitude; with one it is the most probable Z (a direct
    loop as reference): an amplitude of 7.6 between N and O goes to the element the training
    crystals hold more often, and an exact amplitude stays itself unless its neighbour is
    more than e^2 times as frequent."""
    from crystalstudio.core.fit import SPECIES_PRIOR_SD, combine_with_unet, species_from_amplitude
    from crystalstudio.core.segment import Atoms

    A = np.array([7.6, 7.4, 8.0, 7.0, 26.2, 0.2, 120.0])
    assert species_from_amplitude(A).tolist() == [8, 7, 8, 7, 26, 1, 94]
    o_rich = np.ones(95)
    o_rich[8] = 400.0
    n_rich = np.ones(95)
    n_rich[7] = 400.0
    rng = np.random.default_rng(3)
    random = rng.integers(0, 300, 95).astype(float)
    for counts in (o_rich, n_rich, random):
        got = species_from_amplitude(A, counts)
        want = [_map_z_reference(a, counts, SPECIES_PRIOR_SD) for a in A]
        assert got.tolist() == want
    assert species_from_amplitude(A, o_rich)[:4].tolist() == [8, 8, 8, 8]  # 7.0 too: 400/2 > e^2
    assert species_from_amplitude(A, n_rich)[:4].tolist() == [7, 7, 7, 7]
    few = np.ones(95)
    few[8] = 5.0  # less than e^2 times the others: exact amplitudes keep their own Z
    assert species_from_amplitude(np.arange(1.0, 95.0), few).tolist() == list(range(1, 95))
    # through the refined-field rule of combine_with_unet
    P = np.array([[2.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    probs = _probs_around(GRID, P, [{8: 0.5, 7: 0.4}, {26: 0.9}])
    atoms = Atoms(P, np.zeros(2, np.int64), None, np.array([7.4, 26.2]), np.full(2, 0.1))
    assert combine_with_unet(atoms, probs, GRID, gate=0.05, amplitude_species=True).Z.tolist() == [7, 26]
    assert combine_with_unet(atoms, probs, GRID, gate=0.05, amplitude_species=True,
                             species_prior=o_rich).Z.tolist() == [8, 26]


@pytest.mark.parametrize("counts, pattern", [
    ([1.0] * 12, "12 counts, expected 95"),
    ([1.0] * 94 + [-1.0], "non-negative"),
    ([1.0] * 94 + [np.nan], "finite"),
    ([5.0] + [0.0] * 94, "no atom"),
    ("abc", "not numbers|counts"),
])
def test_check_species_prior_refuses_bad_counts(counts, pattern):
    from crystalstudio.core.fit import check_species_prior

    with pytest.raises(ValueError, match=pattern):
        check_species_prior(counts, 95)
