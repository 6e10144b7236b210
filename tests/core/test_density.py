"""crystalstudio.core.density against direct float64 evaluations of Eq. 1 (Hoffmann et al. 2019, Sec. 3.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from crystalstudio.core.density import (
    Crystal, Grid, cell_positions, density_field, density_fields, fits_in_cube, fitting_rotation, lattice_positions,
    pad_batch, random_rotations,
)


def centres(grid: Grid) -> np.ndarray:
    """(n, n, n, 3) voxel-centre coordinates, float64, computed independently: (i + 0.5) * length / n."""
    c = (np.arange(grid.n) + 0.5) * (grid.length / grid.n)
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)


def eq1(pos: np.ndarray, Z: np.ndarray, grid: Grid) -> np.ndarray:
    """Eq. 1 by brute force: M_ijk = 1/(sigma^3 (2 pi)^1.5) sum_m Z_m exp(-d^2 / 2 sigma^2), float64."""
    X = centres(grid)
    M = np.zeros(X.shape[:3])
    for p, z in zip(pos, Z):
        d2 = ((X - p) ** 2).sum(-1)
        M += z * np.exp(-d2 / (2 * grid.sigma**2))
    return M / (grid.sigma**3 * (2 * np.pi) ** 1.5)


def species_reference(pos, Z, grid):
    """S by brute force, plus a mask of voxels whose label is numerically unambiguous."""
    X = centres(grid)
    real = np.asarray(Z) > 0
    pos, Z = np.asarray(pos)[real], np.asarray(Z)[real]
    d = np.sqrt(((X[..., None, :] - pos) ** 2).sum(-1))  # (n, n, n, N)
    k = d.argmin(-1)
    dmin = np.take_along_axis(d, k[..., None], -1)[..., 0]
    S = np.where(dmin <= grid.species_radius, Z[k], 0)
    ds = np.sort(d, axis=-1)
    safe = np.abs(dmin - grid.species_radius) > 1e-4
    if d.shape[-1] > 1:
        safe &= (ds[..., 1] - ds[..., 0]) > 1e-4
    return S, safe


# ----------------------------------------------------------------------------- Eq. 1


def test_batched_density_matches_brute_force_eq1_with_padding():
    rng = np.random.default_rng(0)
    grid = Grid(n=16, length=8.0)
    pos = [rng.uniform(1.0, 7.0, (5, 3)), rng.uniform(1.0, 7.0, (2, 3))]
    Zs = [rng.integers(1, 90, 5), rng.integers(1, 90, 2)]
    P, Zp = pad_batch(pos, Zs)
    assert P.shape == (2, 5, 3) and Zp.shape == (2, 5)
    assert np.all(Zp[1, 2:] == 0) and np.all(P[1, 2:] == 0)
    M, S = density_fields(torch.as_tensor(P), torch.as_tensor(Zp), grid)
    assert M.shape == (2, 16, 16, 16) and M.dtype == torch.float32
    assert S.shape == (2, 16, 16, 16) and S.dtype == torch.int64
    for b in range(2):
        ref = eq1(pos[b], Zs[b], grid)
        np.testing.assert_allclose(M[b].numpy(), ref, rtol=1e-5, atol=1e-6 * ref.max())
        Sref, safe = species_reference(pos[b], Zs[b], grid)
        assert safe.mean() > 0.99
        np.testing.assert_array_equal(S[b].numpy()[safe], Sref[safe])
    # the padded crystal alone gives the same field: padding atoms (Z = 0) add nothing
    M1, S1 = density_field(pos[1], Zs[1], grid)
    np.testing.assert_allclose(M1, M[1].numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(S1, S[1].numpy())


def test_atom_chunks_give_the_same_fields():
    rng = np.random.default_rng(1)
    grid = Grid(n=12, length=6.0)
    pos = rng.uniform(0.5, 5.5, (1, 9, 3))
    pos[0, 1] = pos[0, 0] + [0.55, 0.0, 0.0]  # overlapping 0.5 Å spheres in different chunks
    Z = rng.integers(1, 50, (1, 9))
    M1, S1 = density_fields(torch.as_tensor(pos), torch.as_tensor(Z), grid, atom_chunk=64)
    M2, S2 = density_fields(torch.as_tensor(pos), torch.as_tensor(Z), grid, atom_chunk=1)
    np.testing.assert_allclose(M1.numpy(), M2.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(S1.numpy(), S2.numpy())
    Sref, safe = species_reference(pos[0], Z[0], grid)
    np.testing.assert_array_equal(S2[0].numpy()[safe], Sref[safe])
    M3, S3 = density_fields(torch.as_tensor(pos), torch.as_tensor(Z), grid, species=False)
    assert S3 is None
    np.testing.assert_allclose(M3.numpy(), M1.numpy(), rtol=1e-6)


def test_isolated_atom_peaks_at_Z_over_peak_scale():
    grid = Grid()  # 30 voxels over 10 Å
    assert grid.peak_scale == pytest.approx((2 * math.pi) ** 1.5)
    assert grid.spacing == pytest.approx(1 / 3)
    p = (np.array([15, 14, 16]) + 0.5) * grid.spacing  # a voxel centre
    M, S = density_field(p[None], [26], grid)
    assert np.unravel_index(M.argmax(), M.shape) == (15, 14, 16)
    assert M.max() == pytest.approx(26 / grid.peak_scale, rel=1e-6)
    assert M.max() * grid.peak_scale == pytest.approx(26.0, rel=1e-6)
    # neighbour one voxel away: exp(-h^2 / 2)
    assert M[16, 14, 16] == pytest.approx(26 / grid.peak_scale * math.exp(-grid.spacing**2 / 2), rel=1e-5)
    # total mass: sum(M) h^3 = Z for an atom well inside the cube
    assert M.astype(np.float64).sum() * grid.spacing**3 == pytest.approx(26.0, rel=1e-4)
    # species: exactly the voxels within 0.5 Å; h = 1/3 -> offsets with |d|^2 <= 2.25 voxels^2
    offs = np.argwhere(S == 26) - [15, 14, 16]
    expected = sorted(tuple(o) for o in np.argwhere(np.ones((5, 5, 5))) - 2 if (o**2).sum() <= 2.25)
    assert sorted(map(tuple, offs)) == expected
    assert len(expected) == 19 and set(np.unique(S)) == {0, 26}


def test_mass_with_other_sigma():
    grid = Grid(n=32, length=16.0, sigma=1.5)  # atom >= 5 sigma from every face
    p = np.array([[8.1, 7.8, 8.3]])
    M, _ = density_field(p, [8], grid, species=False)
    assert M.max() * grid.peak_scale < 8.0
    assert M.astype(np.float64).sum() * grid.spacing**3 == pytest.approx(8.0, rel=1e-4)
    np.testing.assert_allclose(M, eq1(p, [8], grid), rtol=1e-5, atol=1e-9)


def test_species_nearest_atom_wins_between_close_atoms():
    grid = Grid()
    a = np.array([5.0, 5.0, 5.0])
    b = a + [0.6, 0.0, 0.0]  # 0.5 Å spheres overlap
    M, S = density_field(np.stack([a, b]), [8, 26], grid)
    X = centres(grid)
    da = np.linalg.norm(X - a, axis=-1)
    db = np.linalg.norm(X - b, axis=-1)
    overlap = (da <= 0.5) & (db <= 0.5)
    assert overlap.sum() > 0
    assert np.all(S[overlap & (da < db - 1e-6)] == 8)
    assert np.all(S[overlap & (db < da - 1e-6)] == 26)
    assert np.all(S[(da <= 0.5 - 1e-6) & (db > 0.5 + 1e-6)] == 8)
    assert np.all(S[(db <= 0.5 - 1e-6) & (da > 0.5 + 1e-6)] == 26)
    assert np.all(S[(da > 0.5 + 1e-6) & (db > 0.5 + 1e-6)] == 0)


def test_non_default_grid():
    grid = Grid(n=20, length=8.0)
    rng = np.random.default_rng(2)
    pos = rng.uniform(0.0, 8.0, (4, 3))
    Z = np.array([1, 6, 29, 92])
    M, S = density_field(pos, Z, grid)
    assert M.shape == S.shape == (20, 20, 20)
    ref = eq1(pos, Z, grid)
    np.testing.assert_allclose(M, ref, rtol=1e-5, atol=1e-6 * ref.max())
    Sref, safe = species_reference(pos, Z, grid)
    np.testing.assert_array_equal(S[safe], Sref[safe])
    np.testing.assert_allclose(grid.centres(), (np.arange(20) + 0.5) * 0.4)


def test_grid_validation_and_roundtrip():
    g = Grid(n=20, length=8.0, sigma=0.8, species_radius=0.4)
    assert Grid.from_dict(g.to_dict()) == g
    for bad in ({"n": 3}, {"n": 10.0}, {"length": 0}, {"sigma": -1.0}, {"species_radius": float("nan")}):
        with pytest.raises(ValueError):
            Grid(**bad)


# ----------------------------------------------------------------------------- representation 1


def triclinic() -> Crystal:
    lat = np.array([[4.0, 0.0, 0.0], [0.9, 3.6, 0.0], [-0.7, 0.5, 3.9]])
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.25, 0.8, 0.1], [1.3, -0.2, 0.7]])
    return Crystal(lat, frac, [8, 26, 14, 3], name="X")


def test_cell_positions_centres_cell_and_preserves_distances():
    grid = Grid()
    c = triclinic()
    R = Rotation.random(random_state=3).as_matrix()
    pos = cell_positions(c, grid, R)
    # direct computation of the wrapped Cartesian positions
    cart = (c.frac - np.floor(c.frac)) @ c.lattice
    d_ref = np.linalg.norm(cart[:, None] - cart[None], axis=-1)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    np.testing.assert_allclose(d, d_ref, atol=1e-10)
    # the atom at fractional (0.5, 0.5, 0.5) sits at the cube centre
    np.testing.assert_allclose(pos[1], [5.0, 5.0, 5.0], atol=1e-12)
    # centroid of the 8 (rotated) cell corners = cube centre; corner 0 is the atom at frac 0
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ (c.lattice @ R.T)
    np.testing.assert_allclose(pos[0] + corners.mean(0), [5.0, 5.0, 5.0], atol=1e-12)
    # the displacement of atom 2 from atom 0 is the rotated lattice combination
    np.testing.assert_allclose(pos[2] - pos[0], (np.array([0.25, 0.8, 0.1]) @ c.lattice) @ R.T, atol=1e-12)
    # a scipy Rotation gives the same; None means no rotation
    np.testing.assert_allclose(cell_positions(c, grid, Rotation.from_matrix(R)), pos, atol=1e-12)
    np.testing.assert_allclose(cell_positions(c, grid), cart - 0.5 * c.lattice.sum(0) + 5.0, atol=1e-12)


def test_random_rotations_are_rotations():
    R = random_rotations(16, 0)
    assert R.shape == (16, 3, 3)
    np.testing.assert_allclose(R @ np.transpose(R, (0, 2, 1)), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_array_equal(R, random_rotations(16, 0))
    assert not np.allclose(R, random_rotations(16, 1))


def test_fits_in_cube():
    grid = Grid()
    five = Crystal(np.eye(3) * 5.0, [[0, 0, 0], [0.5, 0.5, 0.5]], [11, 17])
    twelve = Crystal(np.eye(3) * 12.0, [[0, 0, 0], [0.5, 0.5, 0.5]], [11, 17])
    assert fits_in_cube(five, grid)
    assert not fits_in_cube(twelve, grid)
    # a corner atom of the 5 Å cell is sqrt(3) * 2.5 = 4.33 Å from the centre
    assert fits_in_cube(five, grid, margin=0.6)
    assert not fits_in_cube(five, grid, margin=0.7)
    # under any rotation the atoms of a fitting cell stay in the cube
    for R in random_rotations(20, 4):
        p = cell_positions(five, grid, R)
        assert np.all((p >= 0) & (p <= grid.length))


def test_fitting_rotation_picks_an_orientation_in_which_the_cell_fits():
    grid = Grid()
    five = Crystal(np.eye(3) * 5.0, [[0, 0, 0], [0.5, 0.5, 0.5]], [11, 17])
    assert np.array_equal(fitting_rotation(five, grid), np.eye(3))
    # corner atom of a 6.5 Å cube: 5.63 Å from the centre, but 3.25 Å along each axis: fits unrotated
    cube65 = Crystal(np.eye(3) * 6.5, [[0, 0, 0]], [74])
    assert not fits_in_cube(cube65, grid) and np.array_equal(fitting_rotation(cube65, grid), np.eye(3))
    # a 4 x 4 x 11 Å cell: the corner atom sits at (-2, -2, -5.5), outside the cube unrotated
    # (5.5 > 5), 6.18 Å from the centre, so it fits once turned towards a body diagonal (3.57 Å per axis)
    tall = Crystal(np.diag([4.0, 4.0, 11.0]), [[0, 0, 0]], [26])
    R = fitting_rotation(tall, grid)
    assert R is not None and not np.allclose(R, np.eye(3))
    assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)
    p = cell_positions(tall, grid, R)
    assert np.all((p >= 0) & (p <= grid.length))
    assert np.abs(p - 5.0).max() < 4.6  # the widest margin of 512 tries: close to the diagonal's 3.57 Å
    assert np.array_equal(fitting_rotation(tall, grid), R)  # the same orientation every time
    # 9.53 Å from the centre: more than the cube's half diagonal (8.66 Å), fits no orientation
    assert fitting_rotation(Crystal(np.eye(3) * 11.0, [[0, 0, 0], [0.5, 0.5, 0.5]], [26, 26]), grid) is None


# ----------------------------------------------------------------------------- representation 2


def periodic_1d(x: np.ndarray, x0: float, a: float, sigma: float, K: int = 40) -> np.ndarray:
    k = np.arange(-K, K + 1)
    return np.exp(-((x[:, None] - x0 - k * a) ** 2) / (2 * sigma**2)).sum(1)


def test_lattice_positions_give_the_periodic_density():
    grid = Grid()
    a = 2.5
    c = Crystal(np.eye(3) * a, [[0.0, 0.0, 0.0]], [26])
    pos, Z = lattice_positions(c, grid)
    assert np.all(Z == 26)
    # images sit on the lattice a * (i, j, k) within the cube plus the 4 sigma cutoff
    np.testing.assert_allclose(pos / a, np.round(pos / a), atol=1e-9)
    assert pos.min() >= -4.0 - 1e-9 and pos.max() <= 14.0 + 1e-9
    assert len(pos) == len(np.unique(np.round(pos, 6), axis=0)) == 7**3  # -2.5, 0, ..., 12.5 per axis
    M, _ = density_field(pos, Z, grid, species=False)
    # reference 1: separable periodic sum (cubic lattice, one atom)
    x = grid.centres()
    f = periodic_1d(x, 0.0, a, grid.sigma)
    ref = 26 / grid.peak_scale * f[:, None, None] * f[None, :, None] * f[None, None, :]
    np.testing.assert_allclose(M, ref, rtol=2e-3)  # truncation at 4 sigma outside the cube
    inner = slice(6, 24)  # >= 2 Å inside the cube
    np.testing.assert_allclose(M[inner, inner, inner], ref[inner, inner, inner], rtol=2e-5)
    # reference 2: direct 3-D sum over +-8 cells around the voxel next to the cube centre
    i = 15
    p = np.full(3, x[i])
    g = np.arange(-8, 9) + 2  # cells around the lattice point at the cube centre (5 = 2 a)
    L = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) * a
    direct = 26 / grid.peak_scale * np.exp(-((L - p) ** 2).sum(1) / 2).sum()
    assert M[i, i, i] == pytest.approx(direct, rel=2e-5)


def test_lattice_density_is_translation_periodic():
    grid = Grid(n=30, length=10.0)  # h = 1/3 Å, a / h = 6 voxels
    c = Crystal(np.eye(3) * 2.0, [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]], [26, 8])
    pos, Z = lattice_positions(c, grid, origin=np.array([0.3, 0.1, 0.7]))
    M, _ = density_field(pos, Z, grid, species=False)
    # the field is not trivially constant, but repeats every 6 voxels along each axis
    assert (M.max() - M.min()) / M.max() > 1e-3
    inner = (slice(6, 18),) * 3
    for axis in range(3):
        A = np.take(M, range(0, 24), axis=axis)
        B = np.take(M, range(6, 30), axis=axis)
        np.testing.assert_allclose(A[inner], B[inner], rtol=1e-5)
        np.testing.assert_allclose(A, B, rtol=1e-3)
        # and is not periodic with a wrong period
        C = np.take(M, range(3, 27), axis=axis)
        assert np.abs(A - C)[inner].max() > 100 * np.abs(A - B)[inner].max()


def test_lattice_positions_rotation_keeps_neighbour_distances():
    grid = Grid()
    c = Crystal(np.diag([3.0, 3.5, 4.0]), [[0.1, 0.2, 0.3]], [6])
    R = Rotation.random(random_state=5).as_matrix()
    pos, _ = lattice_positions(c, grid, rotation=R)
    # every image minus the first is an integer combination of the rotated lattice vectors
    f = (pos - pos[0]) @ np.linalg.inv(c.lattice @ R.T)
    np.testing.assert_allclose(f, np.round(f), atol=1e-9)
    # all lattice points within [-4, 14]^3 are present: compare with a brute-force enumeration
    base = np.array([0.1, 0.2, 0.3]) @ c.lattice @ R.T
    g = np.arange(-12, 13)
    allp = base + np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) @ (c.lattice @ R.T)
    keep = np.all((allp >= -4.0) & (allp <= 14.0), axis=1)
    assert len(pos) == keep.sum()
    with pytest.raises(ValueError):
        lattice_positions(Crystal(np.diag([1.0, 1.0, 0.0]), [[0, 0, 0]], [1]), grid)


def test_species_matrix_of_a_lattice_batch_matches_float64_reference():
    """The local (K^3 voxels per atom) species scatter against the brute-force float64
    nearest-atom rule, with images outside the cube, atoms on the faces and close pairs."""
    rng = np.random.default_rng(7)
    grid = Grid(n=20, length=6.0)
    pos = [rng.uniform(-1.5, 7.5, (60, 3)), rng.uniform(-0.2, 6.2, (25, 3))]
    pos[1][1] = pos[1][0] + [0.4, 0.1, 0.0]  # spheres of 0.5 Å that overlap
    pos[1][2] = [0.0, 3.0, 6.0]  # on two faces
    Zs = [rng.integers(1, 95, 60), rng.integers(1, 95, 25)]
    P, Zp = pad_batch(pos, Zs)
    _, S = density_fields(torch.as_tensor(P), torch.as_tensor(Zp), grid)
    for b in range(2):
        Sref, safe = species_reference(pos[b], Zs[b], grid)
        assert safe.mean() > 0.99 and (Sref > 0).sum() > 100
        np.testing.assert_array_equal(S[b].numpy()[safe], Sref[safe])


def test_species_matrix_ties_go_to_the_first_atom_and_vacancies_are_skipped():
    grid = Grid(n=10, length=5.0)  # h = 0.5 Å: voxel centres at 0.25, 0.75, ...
    pos = np.array([[[2.25, 2.25, 1.95], [2.25, 2.25, 2.55], [0.75, 0.75, 0.75]]])
    Z = np.array([[8, 26, 3]])
    _, S = density_fields(torch.as_tensor(pos), torch.as_tensor(Z), grid)
    assert S[0, 4, 4, 4] == 8  # voxel centre (2.25, 2.25, 2.25) is 0.3 Å from both: the first wins
    _, S2 = density_fields(torch.as_tensor(pos[:, ::-1].copy()), torch.as_tensor(Z[:, ::-1].copy()), grid)
    assert S2[0, 4, 4, 4] == 26
    occ = torch.tensor([[1.0, 1.0, 0.0]])
    _, S3 = density_fields(torch.as_tensor(pos), torch.as_tensor(Z), grid, occupancy=occ)
    assert S[0, 1, 1, 1] == 3 and S3[0, 1, 1, 1] == 0  # an empty site labels no voxel


def test_cube_input_of_each_representation_against_direct_eq1_sums():
    """What the model encodes (M) and what its output is compared with (positions, Z)."""
    from crystalstudio.core.density import cube_input

    grid = Grid()
    # unit cell: an ordered rock salt conventional cell, the cell's centre at the cube's, identity and a 90° turn
    nacl = Crystal(np.eye(3) * 5.64, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                                      [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]], [11] * 4 + [17] * 4)
    R = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    for rot in (None, R):
        M, pos, Z = cube_input(nacl, grid, "unit_cell", rot)
        frac = np.asarray(nacl.frac, np.float64)
        cart = frac @ (np.eye(3) * 5.64) @ (np.eye(3) if rot is None else R).T
        ref_pos = cart - (np.full(3, 2.82) @ (np.eye(3) if rot is None else R).T) + 5.0
        np.testing.assert_allclose(np.sort(pos, 0), np.sort(ref_pos, 0), atol=1e-9)
        assert sorted(Z.tolist()) == [11] * 4 + [17] * 4 and M.dtype == np.float32
        np.testing.assert_allclose(M, eq1(ref_pos, Z, grid), rtol=1e-4, atol=1e-6)
    # disordered: a 50/50 Fe/Co site weighs 0.5 * 26 + 0.5 * 27 in M and compares as Co (ties: larger Z)
    alloy = Crystal(np.eye(3) * 2.87, [[0, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5]], [26, 27, 26],
                    occupancy=np.array([0.5, 0.5, 1.0]))
    M, pos, Z = cube_input(alloy, grid)
    assert Z.tolist() == [27, 26] and len(pos) == 2
    centred = np.array([[0, 0, 0], [1.435] * 3]) - 1.435 + 5.0
    np.testing.assert_allclose(pos, centred, atol=1e-9)
    np.testing.assert_allclose(M, eq1(centred, np.array([26.5, 26.0]), grid), rtol=1e-4, atol=1e-6)
    # repeating lattice: simple cubic Po with the cell's point (0.5, 0.5, 0.5) at the cube's
    # corner: lattice points at (k + 0.5) a, against the separable periodic sum
    a = 3.35
    po = Crystal(np.eye(3) * a, [[0.0, 0.0, 0.0]], [84])
    M, pos, Z = cube_input(po, grid, "repeating_lattice", None, [0.5, 0.5, 0.5])
    f = periodic_1d(grid.centres(), 0.5 * a, a, grid.sigma)
    inner = slice(6, 24)
    ref = 84 / grid.peak_scale * f[:, None, None] * f[None, :, None] * f[None, None, :]
    np.testing.assert_allclose(M[inner, inner, inner], ref[inner, inner, inner], rtol=2e-5)
    k = np.arange(3) * a + 0.5 * a  # 1.675, 5.025, 8.375: the points inside [0, 10]
    assert len(pos) == 27 and np.all(Z == 84)
    np.testing.assert_allclose(np.unique(np.round(pos, 9)), k, atol=1e-9)
    with pytest.raises(ValueError, match="unknown representation 'voxels'"):
        cube_input(po, grid, "voxels")
