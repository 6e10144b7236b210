"""Reconstruction measures of Hoffmann et al. 2019, Sec. 4.1 / 4.2.2 (Eq. 6)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["match_atoms", "aggregate", "worst_nearest", "MEASURE_KEYS"]

#: the top-level measures of an evaluation (``python -m training evaluate``) that a shipped
#: checkpoint carries as its ``metrics`` and the app shows: fractions in [0, 1], distances in Å
MEASURE_KEYS = ("n_crystals", "n_true_atoms", "atoms_within_tol", "pred_within_tol", "exact_count", "within2_count",
                "species_accuracy", "species_within2", "median_error_A", "voxel_mse", "split", "atoms_method",
                "refine_steps", "lattice_fold", "light_subtract")


def match_atoms(true_pos: np.ndarray, true_Z: np.ndarray, pred_pos: np.ndarray, pred_Z: np.ndarray,
                tol: float = 0.5) -> dict:
    """Compare predicted atoms with the true ones (Eq. 6, both directions).

    Args:
        true_pos, pred_pos: (N, 3) and (K, 3) Cartesian Å, same frame.
        true_Z, pred_Z: (N,) and (K,) atomic numbers.
        tol: match distance in Å (paper 0.5).

    Returns:
        dict with ``n_true``, ``n_pred``, ``true_matched`` (true atoms with a predicted atom
        within tol), ``pred_matched`` (the reverse), ``exact_count`` (bool),
        ``species_correct`` and ``species_within2`` (among matched true atoms: nearest
        predicted atom has the same Z / |dZ| <= 2), ``d_true`` (N,) and ``d_pred`` (K,)
        nearest distances in Å (inf when the other side is empty).
    """
    true_pos = np.asarray(true_pos, np.float64).reshape(-1, 3)
    pred_pos = np.asarray(pred_pos, np.float64).reshape(-1, 3)
    true_Z = np.asarray(true_Z).reshape(-1)
    pred_Z = np.asarray(pred_Z).reshape(-1)
    N, K = len(true_pos), len(pred_pos)
    out = {"n_true": N, "n_pred": K, "exact_count": N == K}
    if N and K:
        d_true, j = cKDTree(pred_pos).query(true_pos)
        d_pred, _ = cKDTree(true_pos).query(pred_pos)
    else:
        d_true, j = np.full(N, np.inf), np.zeros(N, int)
        d_pred = np.full(K, np.inf)
    m = d_true <= tol
    out["true_matched"] = int(m.sum())
    out["pred_matched"] = int((d_pred <= tol).sum())
    dz = np.abs(pred_Z[j[m]] - true_Z[m]) if m.any() else np.zeros(0)
    out["species_correct"] = int((dz == 0).sum())
    out["species_within2"] = int((dz <= 2).sum())
    out["d_true"], out["d_pred"] = d_true, d_pred
    return out


def aggregate(per_crystal: list[dict], mse: list[float] | None = None) -> dict:
    """Pool per-crystal :func:`match_atoms` results into the Sec. 4.1 table.

    Returns fractions in [0, 1]: ``atoms_within_tol`` (true atoms with a predicted atom
    within tol), ``pred_within_tol``, ``exact_count``, ``within2_count`` (|K - N| <= 2),
    ``species_accuracy`` and ``species_within2`` (over matched true atoms),
    ``median_error_A`` (median nearest distance of true atoms, Å), ``voxel_mse``, ``n_crystals``.
    """
    if not per_crystal:
        return {"n_crystals": 0}
    nt = sum(r["n_true"] for r in per_crystal)
    npred = sum(r["n_pred"] for r in per_crystal)
    mt = sum(r["true_matched"] for r in per_crystal)
    d = np.concatenate([r["d_true"] for r in per_crystal]) if nt else np.zeros(0)
    res = {
        "n_crystals": len(per_crystal),
        "n_true_atoms": nt,
        "atoms_within_tol": mt / max(nt, 1),
        "pred_within_tol": sum(r["pred_matched"] for r in per_crystal) / max(npred, 1),
        "exact_count": float(np.mean([r["exact_count"] for r in per_crystal])),
        "within2_count": float(np.mean([abs(r["n_pred"] - r["n_true"]) <= 2 for r in per_crystal])),
        "species_accuracy": sum(r["species_correct"] for r in per_crystal) / max(mt, 1),
        "species_within2": sum(r["species_within2"] for r in per_crystal) / max(mt, 1),
        "median_error_A": float(np.median(d[np.isfinite(d)])) if np.isfinite(d).any() else None,
    }
    if mse is not None:
        res["voxel_mse"] = float(np.mean(mse))
    return res


def worst_nearest(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (Å) from a point of ``a`` (N, 3) to its nearest point of ``b`` (K, 3):
    0 when ``a`` is empty, inf when only ``b`` is (a one-sided Hausdorff distance)."""
    a = np.asarray(a, np.float64).reshape(-1, 3)
    b = np.asarray(b, np.float64).reshape(-1, 3)
    if len(a) == 0:
        return 0.0
    if len(b) == 0:
        return float("inf")
    return float(cKDTree(b).query(a)[0].max())
