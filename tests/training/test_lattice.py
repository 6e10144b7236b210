"""Representation 2 (repeating lattice) through the data path, training and the session."""

import numpy as np
import pytest
import torch

from crystalstudio.core.density import Crystal, Grid, density_field, lattice_positions
from training.data import CrystalArrays, random_origins, voxelise


def _arrays(crystals):
    offsets = np.concatenate([[0], np.cumsum([c.num_atoms for c in crystals])])
    return CrystalArrays(np.stack([c.lattice for c in crystals]), offsets,
                         np.concatenate([c.frac for c in crystals]), np.concatenate([c.Z for c in crystals]),
                         np.zeros(len(crystals), np.uint8), np.array(["a", "b"]), np.array(["Po", "CsCl"]),
                         np.array(["t", "t"]))


@pytest.fixture
def data():
    po = Crystal(np.eye(3) * 3.35, [[0, 0, 0]], [84])
    cscl = Crystal(np.eye(3) * 4.12, [[0, 0, 0], [0.5, 0.5, 0.5]], [55, 17])
    return _arrays([po, cscl])


def test_lattice_field_is_periodic_and_true_atoms_are_inside_the_cube(data):
    grid = Grid()
    M, S, P, Zp = voxelise(data, np.array([0, 1]), grid, None, "cpu", "repeating_lattice")
    # Po, a = 3.35 Å: the cube holds floor(10/3.35) + 1 = 3 images per axis from the corner
    inside = P[0][Zp[0] > 0]
    assert len(inside) == 27 and np.all((inside >= 0) & (inside <= grid.length))
    # CsCl: the field is the full periodic sum; compare with an independent direct sum
    c = data.crystal(1)
    pos, Z = lattice_positions(c, grid, cutoff=8.0)
    ref, _ = density_field(pos, Z, grid, species=False)
    # 4 sigma cutoff: each image beyond it would add < exp(-8) of its peak
    assert np.allclose(M[1].numpy(), ref, atol=2e-3 * ref.max())
    # S labels every in-cube atom whose nearest voxel centre is within 0.5 Å
    assert set(np.unique(S[1].numpy())) == {0, 17, 55}


def test_random_origins_shift_the_lattice(data):
    rng = np.random.default_rng(0)
    o = random_origins(data, np.array([1] * 20), None, rng, p_cell_origin=0.0)
    assert np.all(o <= 0) and np.all(o >= -4.12) and np.ptp(o) > 1.0
    M0, *_ = voxelise(data, np.array([1]), Grid(), None, "cpu", "repeating_lattice")
    M1, *_ = voxelise(data, np.array([1]), Grid(), None, "cpu", "repeating_lattice", o[:1])
    assert not torch.allclose(M0, M1)
    # shifting the origin by exactly one lattice vector gives the same field
    M2, *_ = voxelise(data, np.array([1]), Grid(), None, "cpu", "repeating_lattice", np.array([[-4.12, 0, 0]]))
    assert torch.allclose(M0, M2, atol=1e-4)


def test_unknown_representation_is_refused(data):
    with pytest.raises(ValueError, match="representation"):
        voxelise(data, np.array([0]), Grid(), None, "cpu", "hexagonal")
