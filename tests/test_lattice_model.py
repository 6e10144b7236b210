"""The shipped repeating-lattice checkpoint (Sec. 3.1, representation 2) through the session.

The reference field is an independent float64 sum of Eq. 1 over every periodic image of the
conventional NaCl cell (a = 5.64 Å) within 5 sigma of the cube, built here with numpy.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.session import Session, bundled_checkpoints, default_checkpoint

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LATTICE = ASSETS / "repeating_lattice.safetensors"
NACL = ASSETS / "samples" / "NaCl.cif"
A = 5.64  # Å, the sample's lattice constant (Fm-3m, Na at 0 0 0, Cl at 1/2 1/2 1/2)
NA_SITES = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def nacl_images(reach: float, length: float = 10.0):
    """Cartesian Å positions and Z of every NaCl atom within ``reach`` of the [0, length]^3 cube."""
    pos, Z = [], []
    for n in itertools.product(range(-3, 5), repeat=3):
        for site in NA_SITES:
            for off, z in ((0.0, 11), (0.5, 17)):
                p = (np.array(n) + site + np.array([off, 0, 0])) * A
                if np.all((p >= -reach) & (p <= length + reach)):
                    pos.append(p)
                    Z.append(z)
    return np.array(pos), np.array(Z)


@pytest.fixture(scope="module")
def session():
    return Session(model=load_checkpoint(LATTICE))


def test_lattice_checkpoint_ships_and_is_listed():
    model = load_checkpoint(LATTICE)
    assert model.representation == "repeating_lattice"
    assert model.info["metrics"]["split"] == "test"
    listed = {p.resolve(): what for p, what in bundled_checkpoints()}
    shipped = json.loads(LATTICE.with_name("repeating_lattice.metrics.json").read_text())
    assert listed[LATTICE.resolve()] == (f"repeating lattice (test atoms within 0.5 Å: "
                                         f"{100 * shipped['atoms_within_tol']:.0f}%)")


def test_open_fills_the_cube_with_the_lattice(session):
    rec = session.open(NACL)
    grid = session.grid
    # independent reference: direct float64 sum of Eq. 1 over the images within 5 sigma
    pos, Z = nacl_images(5 * grid.sigma, grid.length)
    c = (np.arange(grid.n) + 0.5) * grid.spacing
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    ref = np.zeros((grid.n,) * 3)
    for p, z in zip(pos, Z):
        ref += z * np.exp(-((X - p) ** 2).sum(-1) / (2 * grid.sigma**2))
    ref /= grid.peak_scale
    assert np.allclose(rec.M, ref, atol=1e-3 * ref.max())
    # the true atoms are those inside the cube (the crystal has 8 per cell)
    inside, Zin = nacl_images(0.0, grid.length)
    assert len(rec.positions) == len(inside) > 8
    assert sorted(rec.Z.tolist()) == sorted(Zin.tolist())


def test_a_cell_larger_than_the_cube_is_accepted_only_by_the_lattice_model(session, tmp_path):
    from pymatgen.core import Lattice, Structure

    big = tmp_path / "big.cif"
    Structure(Lattice.cubic(11.0), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(big))
    rec = session.open(big)
    assert len(rec.positions) == 2  # the corner atom and the body centre (at 5.5 Å) lie in the cube
    unit = Session(model=load_checkpoint(default_checkpoint()))
    assert unit.model.representation == "unit_cell"
    rec = unit.open(big)  # a unit-cell session switches to the lattice model, and says why
    assert unit.model.representation == "repeating_lattice" and len(rec.positions) == 2
    assert rec.crystal.meta["note"].startswith("cell too large for the 10 Å cube")


def test_a_cell_that_fits_some_orientations_stays_with_the_unit_cell_model(tmp_path, monkeypatch):
    """A 4 x 4 x 11 Å cell (one Fe at the origin, centred at (-2, -2, -5.5) Å) sticks out of the
    cube unrotated but fits turned; a 6.5 Å W cube (corner atom 5.63 Å from the centre) fits as
    written. The unit-cell model reads both (on val cells of this kind it finds 89% of atoms
    within 0.5 Å, the lattice model 21% on its test split), in an orientation that fits."""
    from pymatgen.core import Lattice, Structure

    from crystalstudio.core.density import cell_positions

    unit = Session(model=load_checkpoint(default_checkpoint()))
    tall, cube = tmp_path / "tall.cif", tmp_path / "cube.cif"
    Structure(Lattice.tetragonal(4.0, 11.0), ["Fe"], [[0, 0, 0]]).to(filename=str(tall))
    Structure(Lattice.cubic(6.5), ["W"], [[0, 0, 0]]).to(filename=str(cube))
    import crystalstudio.session as session_module

    searches = []
    real_search = session_module.fitting_rotation
    monkeypatch.setattr(session_module, "fitting_rotation", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    rec = unit.open(tall)
    assert unit.model.representation == "unit_cell"
    # the orientation is searched once, when the file is read, and travels with the crystal
    assert len(searches) == 1 and np.array_equal(rec.rotation, rec.crystal.meta["fit_rotation"])
    assert rec.crystal.meta["note"] == "the cell fits the 10 Å cube only in some orientations: reconstructed rotated to fit"
    assert not np.allclose(rec.rotation, np.eye(3)) and np.allclose(rec.rotation @ rec.rotation.T, np.eye(3))
    assert len(rec.positions) == 1 and np.all((rec.positions >= 0) & (rec.positions <= 10.0))
    assert np.allclose(rec.positions, cell_positions(rec.crystal, unit.grid, rec.rotation))
    # the field is the input's, rotated: its peak sits at the atom (within a voxel)
    peak = np.array(np.unravel_index(np.argmax(rec.M), rec.M.shape)) + 0.5
    assert np.linalg.norm(peak * unit.grid.spacing - rec.positions[0]) < unit.grid.spacing * np.sqrt(3) / 2 + 1e-9
    rec = unit.open(cube)
    assert unit.model.representation == "unit_cell" and np.array_equal(rec.rotation, np.eye(3))
    assert rec.crystal.meta["note"].endswith("reconstructed as oriented in the file")
    assert np.allclose(rec.positions, [[1.75, 1.75, 1.75]])
