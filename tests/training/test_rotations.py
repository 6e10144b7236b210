"""Cells larger than the cube's inscribed sphere: ``prepare --fit some`` and rejection-sampled rotations.

Reference: a cubic cell of edge a with one atom at the corner sits, centred, at (-a/2, -a/2, -a/2):
it fits the 10 Å cube unrotated whenever a <= 10, under every rotation only when a * sqrt(3) / 2 <= 5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from crystalstudio.core.density import Crystal, Grid, fits_in_cube, fits_rotated, random_rotations
from training.__main__ import main
from training.batcher import GPUCrystalBatcher
from training.data import CrystalArrays, _split_of, cube_rotations, prepare, voxelise

GRID = Grid(n=16, length=10.0)

# name: (formula's split with val 0.2 / test 0.3, space group, a Å, species, fractional coordinates)
CELLS = {
    "w_big": (0, "Pm-3m", 6.5, ["W"], [[0, 0, 0]]),         # train, fits some rotations (2/3 of them)
    "fe_huge": (0, "Pm-3m", 9.9, ["Fe"], [[0, 0, 0]]),      # train, fits almost none: refused
    "ni_big": (2, "Pm-3m", 6.5, ["Ni"], [[0, 0, 0]]),       # test, larger than the sphere: refused either way
    "au_big": (1, "Pm-3m", 6.5, ["Au"], [[0, 0, 0]]),       # val, same
    "cu": (0, "Fm-3m", 3.61, ["Cu"], [[0, 0, 0]]),          # fit every rotation
    "mgo": (2, "Fm-3m", 4.21, ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "rbcl": (1, "Fm-3m", 5.6, ["Rb", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "nacl": (0, "Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
}


def corner_cell(a: float) -> Crystal:
    return Crystal(np.eye(3) * a, np.zeros((1, 3)), np.array([26]))


def test_fits_rotated_against_the_corner_geometry():
    c = corner_cell(6.5)
    assert not fits_in_cube(c, GRID)  # 6.5 * sqrt(3) / 2 = 5.63 Å from the centre
    diagonal = Rotation.align_vectors([[1.0, 0, 0]], [[1.0, 1.0, 1.0]])[0].as_matrix()  # corner onto +x: 5.63 Å
    quarter = Rotation.from_euler("z", 45, degrees=True).as_matrix()  # (-3.25 sqrt 2, 0, -3.25): 4.60 Å
    tilt = Rotation.from_euler("z", 30, degrees=True).as_matrix()  # x = -3.25 (cos 30 - sin 30) -> fits
    assert fits_rotated(c, GRID, np.stack([np.eye(3), diagonal, quarter, tilt])).tolist() == [True, False, True, True]
    assert fits_rotated(corner_cell(10.5), GRID, np.eye(3)).tolist() == [False]
    # a cell inside the sphere fits every rotation
    assert fits_rotated(corner_cell(5.0), GRID, random_rotations(64, 0)).all()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("big_cifs")
    for name, (split, sg, a, species, coords) in CELLS.items():
        s = Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords)
        assert _split_of(s.composition.reduced_formula, 0.2, 0.3) == split, name
        s.to(filename=str(d / f"{name}.cif"))
    out = tmp_path_factory.mktemp("npz")
    every = prepare([str(d)], str(out / "every.npz"), GRID, val=0.2, test=0.3)
    some = prepare([str(d)], str(out / "some.npz"), GRID, val=0.2, test=0.3, fit="some")
    prepare([str(d)], str(out / "val.npz"), GRID, val=0.2, test=0.3, fit="some", partial_splits=("train", "val"))
    return (every, some, CrystalArrays.load(str(out / "every.npz")), CrystalArrays.load(str(out / "some.npz")),
            CrystalArrays.load(str(out / "val.npz")))


def test_fit_some_adds_training_cells_only(prepared):
    every, some, d_every, d_some, _ = prepared
    assert every["kept"] == 4 and every["partial_fit"] == 0 and d_every.fit_fraction is None
    assert some["kept"] == 5 and some["partial_fit"] == 1
    assert some["rejected"] == {"cell too large for the cube (val/test)": 2, "cell fits too few rotations": 1}
    # val and test hold the same crystals either way; the one new crystal is W, in train
    for split in ("val", "test"):
        assert sorted(d_some.ids[d_some.indices(split)]) == sorted(d_every.ids[d_every.indices(split)])
    new = set(d_some.ids[d_some.indices("train")]) - set(d_every.ids[d_every.indices("train")])
    assert new == {"w_big"}
    i = int(np.flatnonzero(d_some.ids == "w_big")[0])
    # the stored fraction is the fraction of the formula-seeded probe rotations (about 2/3 for this cell)
    assert 0.5 < d_some.fit_fraction[i] < 0.8
    assert d_some.partial_fit(np.arange(len(d_some))).tolist() == [bool(x == "w_big") for x in d_some.ids]


def test_cube_rotations_draw_only_rotations_under_which_the_cell_fits(prepared):
    _, _, d_every, d_some, _ = prepared
    i = int(np.flatnonzero(d_some.ids == "w_big")[0])
    idx = np.array([i] * 64)
    rots = cube_rotations(d_some, idx, GRID, 3)
    assert fits_rotated(d_some.crystal(i), GRID, rots).all()
    assert len({tuple(np.round(r, 6).ravel()) for r in rots}) == 64  # still random, not one fixed rotation
    assert np.allclose(np.einsum("bij,bkj->bik", rots, rots), np.eye(3), atol=1e-12)
    # plain uniform draws would push the atom out of the cube a third of the time
    assert not fits_rotated(d_some.crystal(i), GRID, random_rotations(64, 3)).all()
    # the voxelised field then holds the atom's peak (a voxel centre within 0.54 Å of it: at least
    # exp(-0.54^2 / 2) = 0.86 of the peak), as unrotated; a uniform rotation that pushes it out does not
    M, _, P, Zp = voxelise(d_some, idx[:8], GRID, rots[:8])
    M0, _, _, _ = voxelise(d_some, idx[:1], GRID, np.eye(3)[None])
    assert (Zp > 0).sum() == 8 and ((P >= 0) & (P <= 10.0)).all()
    assert (M.flatten(1).amax(1) >= 0.86 * M0.max() * 0.999).all()
    out = random_rotations(64, 3)[~fits_rotated(d_some.crystal(i), GRID, random_rotations(64, 3))]
    Mout, _, _, _ = voxelise(d_some, idx[:len(out)], GRID, out)
    assert (Mout.flatten(1).amax(1) < 0.86 * M0.max()).any()
    # cells that fit every rotation: exactly random_rotations, seed for seed (old runs unchanged)
    tr = d_every.indices("train")
    assert np.array_equal(cube_rotations(d_every, tr, GRID, 7), random_rotations(len(tr), 7))
    cu = d_some.indices("train")[d_some.partial_fit(d_some.indices("train")) == 0]
    assert np.array_equal(cube_rotations(d_some, cu, GRID, 7), random_rotations(len(cu), 7))
    # representation 2 fills the cube with the lattice whatever the rotation: no rejection
    assert np.array_equal(cube_rotations(d_some, idx, GRID, 3, "repeating_lattice"), random_rotations(64, 3))


def test_gpu_batcher_redraws_rotations_of_partial_cells(prepared):
    _, _, _, d_some, _ = prepared
    tr = d_some.indices("train")
    b = GPUCrystalBatcher(d_some, GRID, "cpu", pool=tr)
    assert b.partial is not None and int(b.partial.sum()) == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx, R = b.sample(len(tr), gen)
        assert b.fits(idx, R).all()
        _, _, P, Z = b(idx, R)
        assert int((Z > 0).sum()) == int(np.diff(d_some.offsets)[idx.numpy()].sum())


def test_prepare_cli_fit_some(tmp_path, prepared, capsys):
    d = tmp_path / "cifs"
    d.mkdir()
    Structure.from_spacegroup("Pm-3m", Lattice.cubic(6.5), ["W"], [[0, 0, 0]]).to(filename=str(d / "w.cif"))
    assert main(["prepare", str(d), "--out", str(tmp_path / "a.npz"), "--grid", "16", "--fit", "some",
                 "--val", "0", "--test", "0"]) == 0
    assert '"partial_fit": 1' in capsys.readouterr().out
    with pytest.raises(ValueError, match="min_fit"):
        prepare([str(d)], str(tmp_path / "b.npz"), GRID, fit="some", min_fit=0.0)
    # a measuring set: val keeps its larger cells too (the test split still does not)
    d = prepared[4]
    assert sorted(d.ids[d.indices("val")]) == ["au_big", "rbcl"] and "ni_big" not in d.ids
    with pytest.raises(ValueError, match="partial_splits"):
        prepare([str(tmp_path / "cifs")], str(tmp_path / "b.npz"), GRID, fit="some", partial_splits=("dev",))
    with pytest.raises(ValueError, match="fit must be"):
        prepare([str(d)], str(tmp_path / "b.npz"), GRID, fit="any")
