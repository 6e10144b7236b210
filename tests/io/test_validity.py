"""crystalstudio.io.validity: each rule on structures built here, and the report's measures
against hand-computed values."""

from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from crystalstudio.io.validity import check_draw, formula_of, reference_of, validity_report


def rocksalt(a: float = 5.64):
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.cart_coords, np.array([sp.Z for sp in s.species])


def test_structural_rule():
    v = check_draw(np.array([[0, 0, 0], [0.45, 0, 0], [3, 3, 3]]), np.array([11, 17, 17]))
    assert not v.structural and abs(v.min_distance_A - 0.45) < 1e-9
    assert "0.45 Å apart" in v.reason
    ok = check_draw(*rocksalt())
    assert ok.structural and ok.compositional and ok.valid and ok.reason == "valid"
    assert abs(ok.min_distance_A - 5.64 / 2) < 1e-6 and ok.formula == "NaCl"
    empty = check_draw(np.zeros((0, 3)), np.zeros(0))
    assert not empty.valid and empty.reason == "no atoms"


def test_compositional_rule():
    p = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]])
    assert not check_draw(p, np.array([11, 17, 17])).compositional  # NaCl2: no neutral assignment
    assert check_draw(p, np.array([12, 17, 17])).compositional      # MgCl2
    assert check_draw(p, np.array([26, 28, 28])).compositional      # FeNi2: an alloy counts as valid
    assert formula_of(np.array([8, 22, 8, 38, 8])) == "SrTiO3"


def test_report_measures():
    pos, Z = rocksalt()
    R = Rotation.from_euler("xyz", [20, 40, 60], degrees=True).as_matrix()
    same = (pos @ R.T + 1.0, Z)                         # the same crystal rotated and moved
    other = (pos * 1.1, Z)                              # a different one (stretched)
    close = (np.array([[0, 0, 0], [0.3, 0, 0]]), np.array([11, 17]))
    draws = [(pos, Z), same, other, close, (np.zeros((0, 3)), np.zeros(0, int))]
    real_counts = np.full(10, 5)
    rep = validity_report(draws, real_counts, np.full(10, 2), train_formulas={"NaCl"})
    assert rep["n"] == 5
    assert rep["structural_valid"] == 3 / 5 and rep["valid"] == 3 / 5
    assert rep["uniqueness"] == 2 / 3               # the rotated copy is a duplicate
    assert rep["novelty"] == 0.0                    # NaCl is in the training set
    counts = np.array([8, 8, 8, 2, 0])
    assert abs(rep["count_wasserstein"] - np.abs(counts - 5).mean()) < 1e-12  # 1-D W1 against a point mass
    assert rep["reasons"] == {"no atoms": 1, "atoms too close": 1, "not charge-balanced": 0}
    assert sum(rep["count_hist"]["draws"]) == 5 and sum(rep["count_hist"]["real"]) == 10


def test_reference_from_prior_metadata():
    counts, nel, forms = reference_of({"reference": {"atom_counts": [0, 2, 1], "n_elements": [0, 3],
                                                     "formulas": ["NaCl"]}})
    assert counts.tolist() == [1, 1, 2] and nel.tolist() == [1, 1, 1] and forms == {"NaCl"}
    c, n, f = reference_of(None)
    assert len(c) == 0 and f is None
