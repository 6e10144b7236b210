"""Is a decoded draw a crystal? Validity as crystal-generator papers measure it.

* **Structural validity** (CDVAE, Xie et al. 2022, Sec. 5.3): every pair of atoms at least
  0.5 Å apart. Draws of the unit-cell representation carry no lattice, so distances are
  taken in the 10 Å cube without periodic images; a draw with no atoms is invalid.
* **Compositional validity**: charge neutrality with Pauling-electronegativity ordering
  by SMACT's rules (``smact.screening.smact_validity``, the test CDVAE reports; pure
  metals and alloys count as valid, as there). SMACT's data decide it, searched per
  electronegativity split rather than by SMACT's loop over every combination of
  oxidation states, which takes seconds on a draw of ten elements; the answers agree
  (tests/io/test_validity.py checks them against ``smact_validity``).
* **Distribution distances**: Wasserstein-1 distance (``scipy.stats.wasserstein_distance``)
  between the draws' atom counts (and numbers of elements) and the real crystals'.
* **Uniqueness**: two valid draws are the same when they hold the same atoms of each
  element and their sorted interatomic distances agree within 0.1 Å (a rotation- and
  translation-invariant test; pymatgen's StructureMatcher needs a lattice, which a
  unit-cell draw does not have). **Novelty**: a valid unique draw whose reduced formula is
  not among the training crystals' (compositional novelty).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["DrawValidity", "check_draw", "validity_report", "reference_of", "MIN_DISTANCE_A", "formula_of"]

MIN_DISTANCE_A = 0.5  # CDVAE's structural-validity rule


@dataclass(frozen=True)
class DrawValidity:
    """Validity of one set of atoms.

    Attributes:
        n_atoms, n_elements: counts.
        formula: reduced formula ("" when empty).
        min_distance_A: closest pair in Å (None for fewer than 2 atoms).
        structural: every pair >= 0.5 Å apart and at least one atom.
        compositional: SMACT charge-neutral (and electronegativity-ordered) composition.
    """

    n_atoms: int
    n_elements: int
    formula: str
    min_distance_A: float | None
    structural: bool
    compositional: bool

    @property
    def valid(self) -> bool:
        """Structurally and compositionally valid."""
        return self.structural and self.compositional

    @property
    def reason(self) -> str:
        """"valid", or why not, in a few words."""
        if self.n_atoms == 0:
            return "no atoms"
        why = []
        if not self.structural:
            why.append(f"atoms {self.min_distance_A:.2f} Å apart (< {MIN_DISTANCE_A} Å)")
        if not self.compositional:
            why.append(f"{self.formula} is not charge-balanced")
        return "; ".join(why) or "valid"


def formula_of(Z: np.ndarray) -> str:
    """Reduced formula of atomic numbers Z (pymatgen), "" when empty."""
    from pymatgen.core import Composition, Element

    Z = np.asarray(Z, np.int64).reshape(-1)
    if not len(Z):
        return ""
    zs, counts = np.unique(Z, return_counts=True)
    return Composition({Element.from_Z(int(z)): int(c) for z, c in zip(zs, counts)}).reduced_formula


def _min_distance(positions: np.ndarray) -> float | None:
    from scipy.spatial import cKDTree

    p = np.asarray(positions, np.float64).reshape(-1, 3)
    if len(p) < 2:
        return None
    d, _ = cKDTree(p).query(p, k=2)
    return float(d[:, 1].min())


@functools.lru_cache(maxsize=4096)
def _smact_ok(formula: str) -> bool:
    """SMACT's ``smact_validity(formula)`` (its defaults: ICSD24 oxidation states, Pauling
    test, alloys valid), decided by :func:`_neutral_pauling` on SMACT's own data; falls back to
    ``smact_validity`` itself where that data is not reachable (an older SMACT)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from pymatgen.core import Composition
            from smact import Element
            from smact.screening import ICSD24FilterConfig, _get_icsd24_oxidation_dict, metals
        except ImportError:
            from smact.screening import smact_validity

            try:
                return bool(smact_validity(formula))
            except Exception:  # noqa: BLE001 - an element SMACT has no data for: not valid
                return False
        try:
            amounts = {str(el): int(round(n)) for el, n in Composition(formula).items()}
            if len(amounts) == 1 or all(el in metals for el in amounts):
                return True  # SMACT's fast paths: one element; an alloy
            cfg = ICSD24FilterConfig()
            states = _get_icsd24_oxidation_dict(cfg.include_zero, cfg.consensus, cfg.commonality)
            if any(el not in states for el in amounts):
                return False
            enegs = [Element(el).pauling_eneg for el in amounts]
        except Exception:  # noqa: BLE001 - an element SMACT has no data for: not valid
            return False
        if any(e is None for e in enegs):
            return False  # SMACT's Pauling test fails any pair with an unknown electronegativity
        return _neutral_pauling([states[el] for el in amounts], list(amounts.values()), enegs)


def _neutral_pauling(states: list[list[int]], counts: list[int], enegs: list[float]) -> bool:
    """Is there one oxidation state per element (from ``states``) whose charges sum to zero
    over ``counts`` atoms, with every cation less electronegative than every anion (``enegs``,
    Pauling)? The rule of SMACT's ``smact_validity``, decided without enumerating every
    combination (SMACT's loop takes seconds for a ten-element draw).

    A valid choice splits the distinct electronegativities at some level: elements below it
    are cations, those at or above it anions (two elements of equal electronegativity cannot
    be one of each). For each of the K + 1 splits, the reachable total charges are built
    element by element (a set of sums), and the split is valid when 0 is reachable.
    """
    levels = sorted(set(enegs))
    for cut in range(len(levels) + 1):
        sums = {0}
        for ox, n, e in zip(states, counts, enegs):
            allowed = [q for q in ox if (q > 0 if levels.index(e) < cut else q < 0)]
            sums = {s + n * q for s in sums for q in allowed}
            if not sums:
                break
        if 0 in sums:
            return True
    return False


def check_draw(positions: np.ndarray, Z: np.ndarray) -> DrawValidity:
    """Validity of atoms at ``positions`` (N, 3) Å with atomic numbers ``Z`` (N,)."""
    Z = np.asarray(Z, np.int64).reshape(-1)
    dmin = _min_distance(positions)
    formula = formula_of(Z)
    structural = len(Z) > 0 and (dmin is None or dmin >= MIN_DISTANCE_A)
    compositional = len(Z) > 0 and _smact_ok(formula)
    return DrawValidity(int(len(Z)), int(len(np.unique(Z))), formula, dmin, bool(structural), bool(compositional))


def _fingerprint(positions: np.ndarray, Z: np.ndarray) -> tuple[tuple, np.ndarray]:
    from scipy.spatial.distance import pdist

    zs, counts = np.unique(np.asarray(Z, np.int64), return_counts=True)
    return tuple(zip(zs.tolist(), counts.tolist())), np.sort(pdist(np.asarray(positions, np.float64).reshape(-1, 3)))


def _unique_mask(draws: list[tuple[np.ndarray, np.ndarray]], tol: float = 0.1) -> np.ndarray:
    seen: dict[tuple, list[np.ndarray]] = {}
    keep = np.zeros(len(draws), bool)
    for i, (p, z) in enumerate(draws):
        key, d = _fingerprint(p, z)
        if not any(len(o) == len(d) and (len(d) == 0 or np.abs(o - d).max() <= tol) for o in seen.get(key, [])):
            seen.setdefault(key, []).append(d)
            keep[i] = True
    return keep


def validity_report(draws: list[tuple[np.ndarray, np.ndarray]], real_counts: np.ndarray,
                    real_n_elements: np.ndarray, train_formulas: set[str] | None = None) -> dict:
    """Validity measures of ``draws`` (list of (positions (N, 3) Å, Z (N,))) against real crystals.

    Args:
        real_counts, real_n_elements: atom counts and numbers of elements of real crystals
            (the training split).
        train_formulas: reduced formulas of the training crystals (for novelty); None skips it.

    Returns:
        dict: ``n``, ``structural_valid``, ``compositional_valid``, ``valid`` (both) as
        fractions; ``count_wasserstein``, ``n_elements_wasserstein`` (atoms, elements);
        ``uniqueness`` (unique among valid), ``novelty`` (new formula among valid unique);
        ``atoms_per_draw`` mean; ``count_hist`` of draws and real crystals; ``reasons``
        (how many draws failed for each reason class).
    """
    from scipy.stats import wasserstein_distance

    checks = [check_draw(p, z) for p, z in draws]
    n = len(checks)
    frac = (lambda k: float(k) / n if n else None)
    counts = np.array([c.n_atoms for c in checks], np.int64)
    nel = np.array([c.n_elements for c in checks], np.int64)
    valid_idx = [i for i, c in enumerate(checks) if c.valid]
    uniq = _unique_mask([draws[i] for i in valid_idx]) if valid_idx else np.zeros(0, bool)
    uniq_idx = [i for i, u in zip(valid_idx, uniq) if u]
    novel = ([checks[i].formula not in train_formulas for i in uniq_idx] if train_formulas is not None else [])
    real_counts = np.asarray(real_counts, np.int64)
    edges = list(range(0, int(max(counts.max(initial=0), real_counts.max(initial=0))) + 2))
    reasons = {"no atoms": sum(c.n_atoms == 0 for c in checks),
               "atoms too close": sum(c.n_atoms > 0 and not c.structural for c in checks),
               "not charge-balanced": sum(c.n_atoms > 0 and not c.compositional for c in checks)}
    return {
        "n": n,
        "structural_valid": frac(sum(c.structural for c in checks)),
        "compositional_valid": frac(sum(c.compositional for c in checks)),
        "valid": frac(len(valid_idx)),
        "count_wasserstein": float(wasserstein_distance(counts, real_counts)) if n and len(real_counts) else None,
        "n_elements_wasserstein": (float(wasserstein_distance(nel, np.asarray(real_n_elements)))
                                   if n and len(real_n_elements) else None),
        "uniqueness": float(len(uniq_idx)) / len(valid_idx) if valid_idx else None,
        "novelty": (float(sum(novel)) / len(novel)) if novel else None,
        "atoms_per_draw": float(counts.mean()) if n else None,
        "real_atoms_per_crystal": float(real_counts.mean()) if len(real_counts) else None,
        "count_hist": {"edges": edges, "draws": np.histogram(counts, edges)[0].tolist(),
                       "real": np.histogram(real_counts, edges)[0].tolist()},
        "reasons": reasons,
        "rules": "structural: all pairs >= 0.5 Å (cube, no periodic images); compositional: SMACT "
                 "smact_validity (charge neutrality + Pauling test, alloys valid); uniqueness: same atoms "
                 "per element and sorted distances within 0.1 Å; novelty: reduced formula not in training set",
    }


def reference_of(prior_info: dict | None) -> tuple[np.ndarray, np.ndarray, set[str] | None]:
    """(atom counts, numbers of elements, formulas) of the training fields a prior was
    fitted on, from its ``reference`` metadata (stored as bincounts); empty arrays and None
    when the prior (or its reference) is missing."""
    ref = (prior_info or {}).get("reference") or {}
    counts = np.repeat(np.arange(len(ref.get("atom_counts", []))), ref.get("atom_counts", []))
    nel = np.repeat(np.arange(len(ref.get("n_elements", []))), ref.get("n_elements", []))
    forms = set(ref["formulas"]) if "formulas" in ref else None
    return counts.astype(np.int64), nel.astype(np.int64), forms
