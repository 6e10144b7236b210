"""crystalstudio.core.segment: species maps -> atoms, checked against hand-computed centres."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core.density import Grid, density_field
from crystalstudio.core.segment import Atoms, density_peaks, segment, species_map_to_atoms


def test_two_separated_blobs():
    grid = Grid(n=12, length=6.0)  # h = 0.5
    S = np.zeros((12, 12, 12), np.int64)
    a = [(2, 2, 2), (3, 2, 2), (2, 3, 2)]
    b = [(8, 9, 7), (8, 9, 8), (9, 9, 8), (8, 10, 8)]
    for v in a:
        S[v] = 8
    for v in b:
        S[v] = 26
    atoms = species_map_to_atoms(S, grid)
    assert len(atoms) == 2
    order = np.argsort(atoms.Z)
    np.testing.assert_array_equal(atoms.Z[order], [8, 26])
    np.testing.assert_array_equal(atoms.voxels[order], [3, 4])
    ca = (np.mean(a, axis=0) + 0.5) * 0.5
    cb = (np.mean(b, axis=0) + 0.5) * 0.5
    np.testing.assert_allclose(atoms.positions[order], [ca, cb], atol=1e-12)
    assert atoms.positions.dtype == np.float64 and atoms.Z.dtype == np.int64


def test_majority_vote_in_a_mixed_blob_and_tie_to_smaller_Z():
    grid = Grid(n=10, length=5.0)
    S = np.zeros((10, 10, 10), np.int64)
    S[2:5, 3, 3] = [7, 8, 8]  # one component, majority 8
    S[6, 6, 6:8] = [12, 11]  # tie -> 11
    atoms = species_map_to_atoms(S, grid)
    assert sorted(atoms.Z.tolist()) == [8, 11]


def test_diagonal_voxels_are_separate_components():
    grid = Grid(n=10, length=5.0)
    S = np.zeros((10, 10, 10), np.int64)
    S[2, 2, 2] = 6
    S[3, 3, 2] = 6  # touches only along an edge: 6-connectivity keeps them apart
    assert len(species_map_to_atoms(S, grid)) == 2
    S[3, 2, 2] = 6
    assert len(species_map_to_atoms(S, grid)) == 1


def test_density_weighted_centre_of_mass():
    grid = Grid(n=10, length=4.0)  # h = 0.4
    S = np.zeros((10, 10, 10), np.int64)
    vox = np.array([(4, 4, 4), (5, 4, 4), (4, 5, 4), (4, 4, 5)])
    w_vals = np.array([1.0, 3.0, 0.5, 2.0])
    W = np.zeros((10, 10, 10))
    W[0, 0, 0] = 100.0  # weight outside the component is ignored
    for v, w in zip(vox, w_vals):
        S[tuple(v)] = 14
        W[tuple(v)] = w
    atoms = species_map_to_atoms(S, grid, W)
    ref = ((vox * w_vals[:, None]).sum(0) / w_vals.sum() + 0.5) * 0.4
    np.testing.assert_allclose(atoms.positions[0], ref, atol=1e-12)
    # negative weights are clipped to zero
    W2 = W.copy()
    W2[4, 5, 4] = -5.0
    w2 = np.array([1.0, 3.0, 0.0, 2.0])
    ref2 = ((vox * w2[:, None]).sum(0) / w2.sum() + 0.5) * 0.4
    np.testing.assert_allclose(species_map_to_atoms(S, grid, W2).positions[0], ref2, atol=1e-12)
    # zero density on the component falls back to the plain mean
    atoms0 = species_map_to_atoms(S, grid, np.zeros_like(W))
    np.testing.assert_allclose(atoms0.positions[0], (vox.mean(0) + 0.5) * 0.4, atol=1e-9)


def test_empty_map_and_min_voxels():
    grid = Grid(n=8, length=4.0)
    empty = species_map_to_atoms(np.zeros((8, 8, 8), np.int64), grid)
    assert len(empty) == 0 and empty.positions.shape == (0, 3) and empty.Z.shape == (0,)
    S = np.zeros((8, 8, 8), np.int64)
    S[1, 1, 1] = 3
    S[5, 5, 5:7] = 4
    assert len(species_map_to_atoms(S, grid)) == 2
    big = species_map_to_atoms(S, grid, min_voxels=2)
    assert big.Z.tolist() == [4]
    np.testing.assert_allclose(big.positions[0], [2.75, 2.75, 3.0])
    assert len(Atoms.empty()) == 0


def test_segment_takes_argmax_over_classes():
    grid = Grid(n=8, length=4.0)
    logits = np.zeros((30, 8, 8, 8), np.float32)
    logits[0] = 1.0
    logits[26, 3, 3, 3:5] = 5.0
    logits[8, 6, 1, 1] = 2.0
    atoms = segment(logits, grid)
    order = np.argsort(atoms.Z)
    np.testing.assert_array_equal(atoms.Z[order], [8, 26])
    np.testing.assert_allclose(atoms.positions[order], [[3.25, 0.75, 0.75], [1.75, 1.75, 2.0]])


def test_density_to_species_to_atoms_chain():
    """Eq. 1 density + the true S of three atoms -> segmented atoms at the right place and species."""
    grid = Grid()
    pos = np.array([[3.12, 4.07, 5.55], [6.40, 5.21, 3.93], [4.77, 7.02, 6.81]])
    Z = np.array([8, 26, 79])
    M, S = density_field(pos, Z, grid)
    atoms = species_map_to_atoms(S, grid, M)
    assert len(atoms) == 3
    for p, z in zip(pos, Z):
        d = np.linalg.norm(atoms.positions - p, axis=1)
        k = d.argmin()
        assert d[k] < 0.05
        assert atoms.Z[k] == z
    # unweighted (uniform) centres are still within the voxel-level accuracy
    plain = species_map_to_atoms(S, grid)
    for p in pos:
        assert np.linalg.norm(plain.positions - p, axis=1).min() < 0.2


def test_density_peaks_find_gaussian_centres_off_the_voxel_grid():
    """Eq. 1 fields of atoms at arbitrary (off-voxel) positions: one peak per atom, at the atom
    to a few hundredths of an Å (the log-parabola is exact for an isolated Gaussian)."""
    grid = Grid(n=30, length=10.0)
    pos = np.array([[2.13, 2.71, 3.05], [7.38, 6.02, 2.49], [4.91, 7.77, 7.26]])
    Z = np.array([8, 26, 56])
    M, _ = density_field(pos, Z, grid, species=False)
    P = density_peaks(M, grid, rel=0.05)
    assert len(P) == 3
    d = np.linalg.norm(P[:, None] - pos[None], axis=-1)
    assert d.min(1).max() < 0.03 and sorted(d.argmin(1).tolist()) == [0, 1, 2]
    assert len(density_peaks(M, grid, rel=0.4)) == 2  # O (Z 8) is below 0.4 of Ba's peak, Fe (26) above
    assert density_peaks(np.zeros((30, 30, 30)), grid).shape == (0, 3)
    with pytest.raises(ValueError, match="not \\(30, 30, 30\\)"):
        density_peaks(np.zeros((8, 8, 8)), grid)
