"""Partial occupancy in Eq. 1: the field of a disordered crystal equals the occupancy-weighted
direct float64 sum; the reconstruction is compared with the sites' dominant species; a cell
that does not fit the cube switches a unit-cell session to the repeating-lattice model."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystalstudio.core.density import Crystal, Grid, cell_positions, density_field, lattice_positions
from crystalstudio.io.structures import read_structure
from crystalstudio.session import Session, lattice_checkpoint


def direct_sum(pos, w, grid):
    c = (np.arange(grid.n) + 0.5) * grid.spacing
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    d2 = ((X[:, None, :] - pos[None].astype(np.float64)) ** 2).sum(-1)
    return (np.exp(-d2 / (2 * grid.sigma ** 2)) @ w / grid.peak_scale).reshape((grid.n,) * 3)


@pytest.fixture
def big_cell(tmp_path):
    """An F-centred 14 Å Si cell (too large for the 10 Å cube) and its CIF."""
    big = Structure(Lattice.cubic(14.0), ["Si"] * 4, [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    path = tmp_path / "big.cif"
    CifWriter(big).write_file(str(path))
    return big, path


@pytest.fixture
def ca_al_nb_o3(tmp_path):
    s = Structure(Lattice.cubic(3.9), ["Ca", {"Al": 0.5, "Nb": 0.5}, "O", "O", "O"],
                  [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    path = tmp_path / "CaAlNbO3.cif"
    CifWriter(s).write_file(str(path))
    return path


def test_unit_cell_field_is_occupancy_weighted(ca_al_nb_o3):
    grid = Grid()
    c = read_structure(ca_al_nb_o3, grid)
    pos = cell_positions(c, grid)
    M, S = density_field(pos, c.Z, grid, occupancy=c.occupancy)
    w = np.array([{20: 20, 13: 6.5, 41: 20.5, 8: 8}[int(z)] for z in c.Z], np.float64)  # Z x occupancy by hand
    np.testing.assert_allclose(M, direct_sum(pos, w, grid), atol=1e-6, rtol=0)
    assert set(np.unique(S)) <= {0, 8, 13, 20, 41}


def test_lattice_field_is_occupancy_weighted(ca_al_nb_o3):
    grid = Grid(n=20, length=10.0)
    c = read_structure(ca_al_nb_o3, grid)
    pos, Z, occ = lattice_positions(c, grid, occupancy=True)
    M, _ = density_field(pos, Z, grid, species=False, occupancy=occ)
    assert occ.min() == 0.5 and len(pos) == len(Z) == len(occ)
    np.testing.assert_allclose(M, direct_sum(pos, Z * occ, grid), atol=1e-6, rtol=0)


def test_session_compares_with_dominant_sites(ca_al_nb_o3):
    s = Session()
    rec = s.open(ca_al_nb_o3)
    assert rec.crystal.disordered and len(rec.Z) == 5  # 5 sites, the mixed one once
    assert sorted(rec.Z.tolist()) == [8, 8, 8, 20, 41]
    assert rec.M.max() > 0 and rec.metrics["n_true"] == 5


@pytest.mark.skipif(lattice_checkpoint() is None, reason="no repeating-lattice checkpoint shipped")
def test_large_cell_switches_to_the_lattice_model(big_cell):
    big, path = big_cell
    s = Session()
    assert s.model.representation == "unit_cell"
    rec = s.open(path)
    assert s.model.representation == "repeating_lattice"
    assert "switched to the repeating-lattice model" in rec.crystal.meta["note"]
    assert "cell too large" in rec.crystal.meta["note"]
    # the atoms compared are those of the lattice inside the 10 Å cube from the cell origin
    inside = lattice_positions(Crystal(big.lattice.matrix, big.frac_coords, [14] * 4), s.grid)[0]
    inside = inside[np.all((inside >= 0) & (inside <= s.grid.length), axis=1)]
    assert rec.metrics["n_true"] == len(inside) == len(rec.Z)


@pytest.mark.skipif(lattice_checkpoint() is None, reason="no repeating-lattice checkpoint shipped")
def test_read_for_model_leaves_the_session_alone(big_cell, tmp_path):
    big, path = big_cell
    s = Session()
    s.model.atoms_method = "unet"
    before = s.model
    crystal, model = s.read_for_model(path)
    assert s.model is before and s.model.representation == "unit_cell"  # nothing swapped yet
    assert model.representation == "repeating_lattice" and model.atoms_method == "unet"
    assert "switched to the repeating-lattice model" in crystal.meta["note"]
    small = tmp_path / "nacl.cif"
    CifWriter(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                        [[0, 0, 0], [.5, .5, .5]])).write_file(str(small))
    crystal, model = s.read_for_model(small)
    assert model is None and len(crystal.Z) == 8
    # read() swaps the model in; the user's atoms method survives
    s.read(path)
    assert s.model.representation == "repeating_lattice" and s.model.atoms_method == "unet"


@pytest.mark.skipif(lattice_checkpoint() is None, reason="no repeating-lattice checkpoint shipped")
def test_window_origin_picks_the_lattice_window(big_cell):
    big, path = big_cell
    s = Session()
    crystal = s.read(path)
    rec0 = s.reconstruct(crystal)
    # a lattice translation of the motif (F-centring) shows the same window
    same = s.compute(crystal, window_origin=[0.5, 0.5, 0.0])
    np.testing.assert_allclose(same.M, rec0.M, atol=5e-4 * rec0.M.max())  # images cut at 4 sigma: exp(-8)
    # a quarter cell along a: the input atoms move by -3.5 Å, the field changes
    rec = s.set_window_origin([0.25, 0.0, 1.0])  # 1.0 wraps to 0
    assert np.allclose(s.window_origin, [0.25, 0, 0]) and np.allclose(rec.window_origin, [0.25, 0, 0])
    frac = (rec.positions + np.array([3.5, 0, 0])) / 14.0
    assert np.allclose(frac - np.round(frac * 2) / 2, 0, atol=1e-6)
    assert np.abs(rec.M - rec0.M).max() > 0.1 * rec0.M.max()
    # the field is Eq. 1 of the shifted lattice: a direct float64 sum over its images
    from crystalstudio.core.density import lattice_positions

    P, Zs = lattice_positions(crystal, s.grid, origin=np.array([-3.5, 0.0, 0.0]))
    c = s.grid.centres()
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    ref = sum(z * np.exp(-((X - p) ** 2).sum(-1) / (2 * s.grid.sigma ** 2)) for p, z in zip(P, Zs))
    np.testing.assert_allclose(rec.M * s.grid.peak_scale, ref, atol=1e-4 * ref.max())
    with pytest.raises(ValueError, match="three finite"):
        s.set_window_origin([0.1, 0.2])
