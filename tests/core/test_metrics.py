"""crystalstudio.core.metrics: Sec. 4.1 measures on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core.metrics import aggregate, match_atoms, worst_nearest

TRUE_POS = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
TRUE_Z = np.array([8, 26, 14])
PRED_POS = np.array([[0.1, 0.0, 0.0], [3.7, 0.0, 0.0], [0.0, 3.0, 0.2]])  # second off by 0.7 Å
PRED_Z = np.array([8, 26, 15])  # third has the wrong Z (off by one)


def test_match_atoms_hand_case():
    r = match_atoms(TRUE_POS, TRUE_Z, PRED_POS, PRED_Z)
    assert r["n_true"] == 3 and r["n_pred"] == 3 and r["exact_count"] is True
    assert r["true_matched"] == 2
    assert r["pred_matched"] == 2
    assert r["species_correct"] == 1
    assert r["species_within2"] == 2
    np.testing.assert_allclose(r["d_true"], [0.1, 0.7, 0.2], atol=1e-12)
    np.testing.assert_allclose(r["d_pred"], [0.1, 0.7, 0.2], atol=1e-12)
    # a looser tolerance accepts the 0.7 Å atom
    r2 = match_atoms(TRUE_POS, TRUE_Z, PRED_POS, PRED_Z, tol=0.75)
    assert r2["true_matched"] == 3 and r2["pred_matched"] == 3 and r2["species_correct"] == 2


def test_match_atoms_asymmetric_and_species_from_nearest():
    # two predictions pile onto one true atom; the nearest one (wrong Z by 3) decides the species
    true_pos = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    pred_pos = np.array([[0.05, 0.0, 0.0], [0.3, 0.0, 0.0]])
    r = match_atoms(true_pos, [20, 30], pred_pos, [23, 20])
    assert r["true_matched"] == 1 and r["pred_matched"] == 2 and r["exact_count"] is True
    assert r["species_correct"] == 0 and r["species_within2"] == 0


def test_empty_prediction_and_empty_truth():
    r = match_atoms(TRUE_POS, TRUE_Z, np.zeros((0, 3)), np.zeros(0, int))
    assert r["n_pred"] == 0 and r["true_matched"] == 0 and r["pred_matched"] == 0
    assert r["exact_count"] is False and r["species_correct"] == 0
    assert np.all(np.isinf(r["d_true"])) and len(r["d_pred"]) == 0
    r = match_atoms(np.zeros((0, 3)), np.zeros(0, int), PRED_POS, PRED_Z)
    assert r["n_true"] == 0 and r["pred_matched"] == 0 and np.all(np.isinf(r["d_pred"]))


def test_aggregate_hand_checked():
    a = match_atoms(TRUE_POS, TRUE_Z, PRED_POS, PRED_Z)
    b = match_atoms(np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), [1, 2], np.zeros((0, 3)), np.zeros(0, int))
    c = match_atoms(np.array([[0.0, 0.0, 0.0]]), [6], np.array([[0.3, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4]]),
                    [7, 6, 6, 6])
    res = aggregate([a, b, c], mse=[1.0, 3.0, 5.0])
    assert res["n_crystals"] == 3
    assert res["n_true_atoms"] == 6
    assert res["atoms_within_tol"] == pytest.approx(3 / 6)  # 2 + 0 + 1 matched of 3 + 2 + 1
    assert res["pred_within_tol"] == pytest.approx(3 / 7)  # 2 + 0 + 1 of 3 + 0 + 4
    assert res["exact_count"] == pytest.approx(1 / 3)
    assert res["within2_count"] == pytest.approx(2 / 3)  # |dN| = 0, 2, 3
    assert res["species_accuracy"] == pytest.approx(1 / 3)  # of the 3 matched true atoms only a's first
    assert res["species_within2"] == pytest.approx(3 / 3)
    assert res["median_error_A"] == pytest.approx(np.median([0.1, 0.7, 0.2, 0.3]))  # inf distances ignored
    assert res["voxel_mse"] == pytest.approx(3.0)
    for k in ("atoms_within_tol", "pred_within_tol", "exact_count", "within2_count", "species_accuracy"):
        assert 0.0 <= res[k] <= 1.0
    assert "voxel_mse" not in aggregate([a])


def test_aggregate_empty_inputs():
    assert aggregate([]) == {"n_crystals": 0}
    b = match_atoms(np.array([[1.0, 1.0, 1.0]]), [1], np.zeros((0, 3)), np.zeros(0, int))
    res = aggregate([b])
    assert res["atoms_within_tol"] == 0.0 and res["pred_within_tol"] == 0.0
    assert res["median_error_A"] is None  # no matched atom: no value (JSON null)


def test_worst_nearest_is_the_one_sided_hausdorff_distance():
    a = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    b = np.array([[0.0, 0, 0.2], [5.0, 0, 0]])
    direct = max(min(np.linalg.norm(p - q) for q in b) for p in a)  # float64 double loop
    assert worst_nearest(a, b) == pytest.approx(direct) == pytest.approx(np.hypot(1.0, 0.2))
    assert worst_nearest(b, a) == pytest.approx(4.0)
    assert worst_nearest(np.zeros((0, 3)), b) == 0.0 and worst_nearest(a, np.zeros((0, 3))) == np.inf
