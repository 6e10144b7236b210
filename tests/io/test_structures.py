"""crystalstudio.io.structures against textbook values and hand-written CIFs (all files in tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from crystalstudio.core.density import Crystal, Grid, fits_in_cube
from crystalstudio.io import structures as st
from crystalstudio.io.structures import StructureError, read_cif_text, read_structure

SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "samples"


def cif(a, atoms, sg="'P 1'", b=None, c=None, occupancy=True):
    """A minimal CIF; atoms are (label, symbol, x, y, z[, occupancy])."""
    head = [
        "data_test", f"_cell_length_a {a}", f"_cell_length_b {b or a}", f"_cell_length_c {c or a}",
        "_cell_angle_alpha 90", "_cell_angle_beta 90", "_cell_angle_gamma 90",
        f"_symmetry_space_group_name_H-M {sg}", "loop_", "_atom_site_label", "_atom_site_type_symbol",
        "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy",
    ]
    rows = [" ".join(str(v) for v in (row if len(row) == 6 else (*row, 1))) for row in atoms]
    return "\n".join(head + rows) + "\n"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(path, *words):
    with pytest.raises(StructureError) as info:
        read_structure(path)
    msg = str(info.value)
    assert msg.startswith(f"{Path(path).name}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def periodic_match(a, b, L):
    """Largest distance (Å) from each point of a to its nearest periodic image in b (cubic cell L)."""
    d = a[:, None, :] - b[None, :, :]
    d -= L * np.round(d / L)
    return np.linalg.norm(d, axis=2).min(axis=1).max()


# ------------------------------------------------------------------------- reading


def test_nacl_sample_reads_back_as_rock_salt(tmp_path):
    paths = st.write_samples(tmp_path)
    assert sorted(p.name for p in paths) == ["NaCl.cif", "Si.cif", "SrTiO3.cif", "Ti2MnIn.cif"]
    c = read_structure(tmp_path / "NaCl.cif")
    assert isinstance(c, Crystal) and c.num_atoms == 8 and c.Z.dtype == np.int64
    assert set(c.Z.tolist()) == {11, 17} and np.count_nonzero(c.Z == 11) == 4
    np.testing.assert_allclose(c.lattice, 5.64 * np.eye(3), atol=1e-6)
    assert c.name == "NaCl" and c.meta["formula"] == "NaCl"
    assert c.meta["path"] == str((tmp_path / "NaCl.cif").resolve())
    # Na-Cl nearest neighbours at a/2 (periodic images included)
    cart = c.cartesian()
    na, cl = cart[c.Z == 11], cart[c.Z == 17]
    d = na[:, None] - cl[None]
    d -= 5.64 * np.round(d / 5.64)
    assert np.linalg.norm(d, axis=2).min() == pytest.approx(2.82, abs=1e-6)


def test_symmetry_expands_asymmetric_unit():
    text = cif(3.905, [("Sr1", "Sr", 0, 0, 0), ("Ti1", "Ti", 0.5, 0.5, 0.5), ("O1", "O", 0, 0.5, 0.5)],
               sg="'P m -3 m'")
    c = read_cif_text(text, "srtio3.cif")
    assert c.num_atoms == 5
    assert sorted(c.Z.tolist()) == [8, 8, 8, 22, 38]
    oxy = sorted(np.round(np.mod(c.frac[c.Z == 8], 1.0), 6).tolist())
    assert oxy == [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]  # Wyckoff 3c
    ti = c.cartesian()[c.Z == 22][0]
    d = np.linalg.norm(c.cartesian()[c.Z == 8] - ti, axis=1)
    np.testing.assert_allclose(d, 3.905 / 2, atol=1e-6)
    assert c.meta["path"] is None and c.name == "SrTiO3"


def test_partial_occupancy_kept_never_ordered(tmp_path):
    p = write(tmp_path, "alloy.cif", cif(4.0, [("Fe1", "Fe", 0, 0, 0, 0.5), ("Co1", "Co", 0, 0, 0, 0.5),
                                               ("O1", "O", 0.5, 0.5, 0.5)]))
    c = read_structure(p)
    assert c.disordered and sorted(zip(c.Z.tolist(), c.occupancy.tolist())) == [(8, 1.0), (26, 0.5), (27, 0.5)]
    assert c.meta["disorder"] == {"sites": 2, "mixed_sites": 1, "vacant_sites": 0}
    np.testing.assert_allclose(c.weights.sum(), 8 + 0.5 * 26 + 0.5 * 27)
    frac, Z = c.sites()
    assert sorted(Z.tolist()) == [8, 27]  # tie of occupancies: the heavier occupant is the dominant species


def test_vacancy_kept(tmp_path):
    p = write(tmp_path, "vacant.cif", cif(4.0, [("Fe1", "Fe", 0, 0, 0, 0.75), ("O1", "O", 0.5, 0.5, 0.5)]))
    c = read_structure(p)
    assert c.meta["disorder"]["vacant_sites"] == 1 and c.occupancy[c.Z == 26].tolist() == [0.75]


def test_occupancy_above_one_refused(tmp_path):
    p = write(tmp_path, "over.cif", cif(4.0, [("Fe1", "Fe", 0, 0, 0, 0.8), ("Co1", "Co", 0, 0, 0, 0.6),
                                              ("O1", "O", 0.5, 0.5, 0.5)]))
    msg = refused(p)
    assert "occupanc" in msg.lower(), msg


def test_several_data_blocks_and_block_choice(tmp_path):
    two = cif(4.0, [("O1", "O", 0, 0, 0)]) + cif(5.0, [("Cu1", "Cu", 0, 0, 0)]).replace("data_test", "data_second")
    p = write(tmp_path, "two.cif", two)
    assert st.cif_blocks(p) == ["test", "second"]
    first = read_structure(p)
    assert first.Z.tolist() == [8] and first.meta["n_blocks"] == 2
    assert any("2 data blocks" in w for w in first.meta["warnings"])
    second = read_structure(p, block=1)
    assert second.Z.tolist() == [29] and second.meta["block"] == "second"
    with pytest.raises(StructureError, match=r"^two.cif: no structure block 2 \(the file has 2: test, second\)"):
        read_structure(p, block=2)


def test_slow_parse_is_cut_off(tmp_path, monkeypatch):
    import time

    p = write(tmp_path, "slow.cif", cif(4.0, [("O1", "O", 0, 0, 0)]))
    real = st.CifParser.from_str
    monkeypatch.setattr(st.CifParser, "from_str", lambda *a, **k: (time.sleep(3), real(*a, **k))[1])
    monkeypatch.setattr(st, "PARSE_SECONDS", 0.3)
    t0 = time.time()
    refused(p, "took longer than 0.3 s")
    assert time.time() - t0 < 2.5


def test_garbage_empty_missing_and_huge_files_refused(tmp_path):
    refused(write(tmp_path, "garbage.cif", "this is not a crystal\n{[}]\n"), "no crystal structure")
    (tmp_path / "binary.cif").write_bytes(bytes(range(256)) * 8)
    refused(tmp_path / "binary.cif")
    refused(write(tmp_path, "empty.cif", ""), "empty")
    refused(write(tmp_path, "blank.cif", "  \n\n"), "empty")
    refused(tmp_path / "nothere.cif", "not found")
    refused(write(tmp_path, "atoms.xyz", "1\n\nH 0 0 0\n"), "unsupported")
    big = tmp_path / "huge.cif"
    with open(big, "wb") as f:
        f.truncate(21 * 1024 * 1024)
    refused(big, "too large", "20 MB")
    broken = cif(4.0, [("O1", "O", 0, 0, 0)]).replace("_cell_length_a 4.0", "_cell_length_a abc")
    refused(write(tmp_path, "broken.cif", broken), "cannot parse")
    with pytest.raises(StructureError, match=r"^<string>: empty"):
        read_cif_text("")


def test_large_cell_refused_unless_fit_not_required(tmp_path):
    p = write(tmp_path, "big.cif", cif(12.0, [("Cu1", "Cu", 0, 0, 0), ("Cu2", "Cu", 0.5, 0.5, 0.5)]))
    msg = refused(p, "cell too large for the 10 Å cube", "limit 5.0 Å")
    assert "atom 10.4 Å" in msg  # corner atom at 12 * sqrt(3) / 2 = 10.39 Å from the centre
    c = read_structure(p, require_fit=False)
    assert c.num_atoms == 2
    assert read_structure(p, grid=Grid(length=21.0)).num_atoms == 2  # fits a 21 Å cube


@pytest.mark.parametrize("symbol", ["Qq", "X"])
def test_unknown_element_refused(tmp_path, symbol):
    p = write(tmp_path, "odd.cif", cif(4.0, [(f"{symbol}1", symbol, 0, 0, 0), ("O1", "O", 0.5, 0.5, 0.5)]))
    refused(p, "unknown element", repr(symbol))


def test_too_many_atoms_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "MAX_ATOMS", 500)  # the real limit (20,000 entries) works the same way
    rng = np.random.default_rng(0)
    atoms = [(f"H{i}", "H", *np.round(rng.random(3), 6)) for i in range(501)]
    refused(write(tmp_path, "many.cif", cif(5.0, atoms)), "too many atoms", "501", "500")


def test_poscar_and_json_read(tmp_path):
    s = st.crystal_to_structure(Crystal(3.6 * np.eye(3), [[0, 0, 0], [0.5, 0.5, 0]], [29, 29]))
    s.to(filename=str(tmp_path / "POSCAR"))
    s.to(filename=str(tmp_path / "cu.json"))
    for name in ("POSCAR", "cu.json"):
        c = read_structure(tmp_path / name)
        assert c.num_atoms == 2 and c.Z.tolist() == [29, 29] and c.name == "Cu"
        np.testing.assert_allclose(c.lattice, 3.6 * np.eye(3), atol=1e-6)


# ------------------------------------------------------------------------- conversion


def test_crystal_structure_roundtrip():
    c = Crystal([[4, 0, 0], [1, 4, 0], [0, 0.5, 5]], [[0.1, 0.2, 0.3], [0.6, 0.7, 0.8]], [8, 26])
    back = st.structure_to_crystal(st.crystal_to_structure(c), "thing")
    np.testing.assert_allclose(back.lattice, c.lattice)
    np.testing.assert_allclose(back.frac, c.frac)
    assert back.Z.tolist() == [8, 26] and back.name == "thing"


def test_atoms_to_structure_uses_cube_as_cell():
    s = st.atoms_to_structure([[1, 2, 3], [5, 5, 5], [9, 9, 9]], [6, 0, 8], Grid(length=12.0))
    assert len(s) == 2 and [site.specie.Z for site in s] == [6, 8]
    np.testing.assert_allclose(s.lattice.matrix, 12.0 * np.eye(3))
    np.testing.assert_allclose(s.cart_coords, [[1, 2, 3], [9, 9, 9]])
    with pytest.raises(ValueError):
        st.atoms_to_structure([[1, 1, 1]], [0])
    with pytest.raises(ValueError):
        st.atoms_to_structure([[1, 1, 1]], [119])


# ------------------------------------------------------------------------- writing


def test_write_cif_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    pos = rng.uniform(0.2, 9.8, (12, 3))
    Z = rng.integers(1, 90, 12)
    Z[3] = 0  # padding, must be skipped
    p = st.write_cif(pos, Z, tmp_path / "recon.cif")
    assert p == tmp_path / "recon.cif" and [f.name for f in tmp_path.iterdir()] == ["recon.cif"]
    c = read_structure(p, require_fit=False)
    keep = Z > 0
    assert c.num_atoms == 11
    np.testing.assert_allclose(c.lattice, 10.0 * np.eye(3), atol=1e-6)
    cart = c.cartesian()
    assert periodic_match(pos[keep], cart, 10.0) < 1e-4 and periodic_match(cart, pos[keep], 10.0) < 1e-4
    for q, z in zip(pos[keep], Z[keep]):  # each atom comes back with its own element
        d = cart - q
        d -= 10.0 * np.round(d / 10.0)
        assert c.Z[np.argmin(np.linalg.norm(d, axis=1))] == z


def test_write_xyz_lines(tmp_path):
    p = st.write_xyz([[0, 0, 0], [1.5, -2.25, 3.125], [7, 7, 7]], [8, 11, 0], tmp_path / "a.xyz",
                     comment="two atoms\nreconstructed")
    lines = p.read_text().splitlines()
    assert lines[0] == "2" and lines[1] == "two atoms reconstructed" and len(lines) == 4
    sym, *xyz = lines[2].split()
    assert sym == "O" and [float(v) for v in xyz] == [0.0, 0.0, 0.0]
    sym, *xyz = lines[3].split()
    assert sym == "Na" and [float(v) for v in xyz] == [1.5, -2.25, 3.125]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "keep.xyz"
    p.write_text("old\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        st.write_xyz([[0, 0, 0]], [1], p)
    with pytest.raises(OSError):
        st.write_cif([[1, 1, 1]], [1], p.with_suffix(".cif"))
    assert p.read_text() == "old\n" and [f.name for f in tmp_path.iterdir()] == ["keep.xyz"]
    with pytest.raises(ValueError):  # mismatched shapes: nothing written
        st.write_xyz([[0, 0, 0]], [1, 2], tmp_path / "bad.xyz")
    assert not (tmp_path / "bad.xyz").exists()


# ------------------------------------------------------------------------- elements


def test_element_colors_match_pymatgen_tables():
    jmol = st.element_colors([8, 11, 0])
    assert jmol.shape == (3, 3) and jmol.dtype == np.float64
    # Jmol's published colours: O #FF0D0D, Na #AB5CF2
    np.testing.assert_allclose(jmol[0], np.array([255, 13, 13]) / 255)
    np.testing.assert_allclose(jmol[1], np.array([171, 92, 242]) / 255)
    assert not np.allclose(jmol[0], jmol[1])
    np.testing.assert_allclose(jmol[2], [0.5, 0.5, 0.5])  # unknown Z -> grey
    from monty.serialization import loadfn
    import pymatgen.vis
    table = loadfn(str(Path(pymatgen.vis.__path__[0]) / "ElementColorSchemes.yaml"))
    vesta = st.element_colors(np.array([8, 11]), scheme="VESTA")
    np.testing.assert_allclose(vesta * 255, [table["VESTA"]["O"], table["VESTA"]["Na"]])
    assert np.all((vesta >= 0) & (vesta <= 1))
    with pytest.raises(ValueError):
        st.element_colors([8], scheme="cpk")


def test_element_symbol_and_radius():
    assert st.element_symbol(8) == "O" and st.element_symbol(118) == "Og" and st.element_symbol(0) == "X"
    assert st.element_radius(8) == pytest.approx(0.6)  # Slater's empirical radius
    assert st.element_radius(2) == pytest.approx(0.31)  # no empirical value: calculated
    assert st.element_radius(0) == 1.0 and st.element_radius(118) == 1.0


# ------------------------------------------------------------------------- prototypes and samples


def test_prototypes_fit_the_cube():
    protos = st.build_prototypes()
    assert set(protos) == {"NaCl", "Si", "SrTiO3", "Ti2MnIn"}
    counts = {"NaCl": 8, "Si": 8, "SrTiO3": 5, "Ti2MnIn": 4}
    for name, s in protos.items():
        c = st.structure_to_crystal(s)
        assert c.num_atoms == counts[name] and c.name == name
        assert fits_in_cube(c, Grid())
    si = protos["Si"]
    d = si.distance_matrix[0]
    assert d[d > 0].min() == pytest.approx(5.431 * np.sqrt(3) / 4, abs=1e-6)  # diamond bond
    heusler = protos["Ti2MnIn"]
    assert heusler.volume == pytest.approx(6.39**3 / 4, rel=1e-9)  # fcc primitive cell


@pytest.mark.parametrize("name,n", [("NaCl", 8), ("Si", 8), ("SrTiO3", 5), ("Ti2MnIn", 4)])
def test_sample_files_exist_and_read(name, n):
    c = read_structure(SAMPLES / f"{name}.cif")
    assert c.num_atoms == n and c.name == name
