"""The repeating lattice's atoms tied to their lattice: one site per atom of the cell.

A field of representation 2 (Hoffmann et al. 2019, Sec. 4.2) is periodic: every atom in the
cube, and every image just outside it whose Gaussian reaches in, is a translate ``r_b + n L``
of one of the cell's sites ``b`` (``n`` integer, ``L`` the lattice, rows the lattice vectors
in Å). The free fit (:func:`crystalstudio.core.fit.fit_atoms`) treats each image as its own
atom; the images outside the cube are seen only through their tails, so they are weakly
constrained and drag the atoms near the faces (docs/atom_fit.md: misses of 0.1-0.2 Å within
0.6 Å of a face). Here the free fit's atoms are tied back to the lattice:

1. :func:`find_lattice`: translations that map the fitted atoms onto atoms of the same
   amplitude (within ``MATCH_A``) are the lattice's vectors; the three of smallest
   non-zero volume that generate all found ones are the basis. No lattice (a cell longer
   than the cube along some axis, or a field that is not periodic) -> None.
2. :func:`tied_fit`: the sites (the fitted atoms modulo the lattice) and the lattice are
   refined together by Levenberg-Marquardt against Eq. 1, every image within ``4 sigma`` of
   the cube (as :func:`crystalstudio.core.density.lattice_positions` builds the field) taking
   its site's position plus its lattice translation and its site's amplitude. The normal
   equations are the free fit's over the images, ``J^T J`` and ``J^T r``, mapped to the
   tied parameters by the (images x sites) chain rule ``T``: ``T^T (J^T J) T``. Residual
   maxima that no image explains become new sites (a site the free fit missed).

:func:`crystalstudio.core.fit.fit_atoms` keeps the tied atoms when they explain the field
better by the Bayesian information criterion (residual energy against parameter count).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import linalg
from scipy.spatial import cKDTree

from .density import Grid
from .fit import FLOAT_FLOOR

__all__ = ["find_lattice", "lattice_candidates", "tied_fit", "TiedFit", "tie_if_better", "TIED_EDGE_A", "basis_of",
           "same_lattice"]

#: atoms this close (Å) after a lattice translation are the same site
MATCH_A = 0.3
#: a translation is a lattice vector when this fraction of the atoms it can be checked on map
#: onto an atom of the same amplitude
MIN_SCORE = 0.9
#: a residual maximum this far (Å) from every image may be a missing site
MERGE_NEW_A = 0.5
#: images of the true field reach this many sigma outside the cube (lattice_positions)
IMAGE_SIGMAS = 4.0
#: a tied fit leaving more than this fraction of the field's energy unexplained is tried again
#: from the heavy sites alone (an exact tie of a float32 field leaves ~1e-13)
FIELD_EXPLAINED = 1e-8
#: a tied fit leaving more than this fraction of the field's energy is not exact (an exact tie
#: of a float32 field ends at 3e-14 to 1e-12): when it leaves at most ``REMOVAL_WINDOW``, each of
#: its least integral sites is removed in turn and the rest regrown (:func:`_without_one`)
FIELD_EXACT = 1e-11
#: upper end of that move's window (fraction of the field's energy). Val H6OF4: a tie of 24 sites
#: at 5.2e-8 (14 non-integral, 48 of 105 atoms within 0.1 Å) became 22 sites at 9.3e-14, 105 of
#: 105 (the window was ``FIELD_EXPLAINED`` = 1e-8 before; a missing H leaves ~1e-5)
REMOVAL_WINDOW = 1e-6
#: at most this many sites are tried by :func:`_without_one`, those whose amplitude is furthest
#: from an integer Z first, and only sites at least ``NON_INTEGRAL`` from one (Z units)
REMOVE_TRIES = 4
NON_INTEGRAL = 0.1
#: most images a tied fit takes on (its normal equations over the images hold (4 K)^2
#: float64: 184 MB at 1200)
MAX_IMAGES = 1200
#: a tied atom counts as inside the cube up to this far (Å) beyond a face: tied positions of a
#: true field are exact to ~1e-6 Å (~1e-5 Å for H; val cube CuSnPd2: an atom 5.77e-5 Å outside
#: fitted 5.76e-5 Å outside), and the cell origin sits on the cube's corner. An atom truly this
#: close outside a face is taken in (val TmAl2Ni, 1.4e-6 Å outside; one of 165 val cubes),
#: against a corner atom lost in most cubes with a margin below the fit's accuracy (the
#: positions' standard errors, ~3e-8 Å, are 3-50 times too small to set it: val cubes 0-11, 56)
TIED_EDGE_A = 1e-5
#: a tied fit's lattice vectors stay within this distance (Å) of the candidate lattice's: the
#: candidate's vectors are means of translations matched within ``MATCH_A``, so a lattice moved
#: further is another lattice. Without it, the heavy sites alone (tied_fit's restart) shrank a cell
#: to put their images on the light atoms' density (test Li2MnFe(BO3)2: a vector 6.1 -> 2.4 Å;
#: held within trust, its 12 true sites grow back exactly)
LATTICE_TRUST_A = 2 * MATCH_A
#: the free fit's atoms are trusted in the cube and a band this fraction of ``reach`` wide around
#: it (one sigma-ish): further out an atom is seen through its tail alone and may take any
#: amplitude or position. Lattice translations are checked, amplitude scales taken and sites
#: built there (:func:`_near_cube`)
RELIABLE_BAND = 0.25
#: a tie leaving between ``FIELD_EXPLAINED`` and this fraction of the field's energy is close but
#: not exact: most often a pseudo-cell, a smaller cell the atoms repeat on to ~0.01 Å (test
#: Fe(OH)2: 5 sites tie at 1.7e-6 with every atom within 0.014 Å, where the true cell holds 20).
#: Its images then seed a free refinement of every atom (:func:`_polished`)
POLISH_WINDOW = 1e-5
#: Levenberg-Marquardt iterations of that refinement
POLISH_ITER = 200
#: its atoms count as inside the cube up to this far (Å) beyond a face, as a free fit's do: untied
#: positions are exact to ~1e-4 Å, not ~1e-6 (a pseudo-cell built in the tests: a Ba on a face
#: refined 1e-4 Å outside it)
POLISHED_EDGE_A = 0.02
#: a tied fit stops once five accepted steps together lowered the residual energy by less
#: than this fraction
STALL_REL = 1e-3


def _in_box(P: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(N,) bool: rows of ``P`` (N, 3) inside the box [lo, hi]^3 (Å, faces included)."""
    return np.all((P >= lo) & (P <= hi), axis=1)


def _near_cube(P: np.ndarray, length: float, margin: float = 0.0) -> np.ndarray:
    """(N,) bool: positions ``P`` (N, 3) Å within ``margin`` Å of the cube [0, length]^3."""
    return _in_box(P, -margin, length + margin)


def _same_kind(a: np.ndarray, b: np.ndarray, strict: bool = False) -> np.ndarray:
    """Amplitudes of one element: within 0.5 Z (``strict``: they round to one Z, Fe 26 and Co
    27 differ), else within 0.75 Z or 4% (a free fit's amplitudes; Sm 62 and Ho 67 differ)."""
    if strict:
        return np.abs(a - b) < 0.5
    return np.abs(a - b) <= np.maximum(0.75, 0.04 * np.maximum(a, b))


def _score(t: np.ndarray, P: np.ndarray, A: np.ndarray, tree: cKDTree, src: np.ndarray,
           lo: float, hi: float, match: float = MATCH_A, strict: bool = False) -> tuple[int, int, np.ndarray]:
    """(atoms of ``src`` whose translate by ``t`` lands in [lo, hi]^3, of those with a partner of
    the same amplitude within ``match`` Å, and the mean displacement to the partners (Å))."""
    Q = P[src] + t
    ok = _in_box(Q, lo, hi)
    if not ok.any():
        return 0, 0, t
    d, k = tree.query(Q[ok], distance_upper_bound=match)
    hit = np.isfinite(d)
    hit[hit] &= _same_kind(A[src][ok][hit], A[k[hit]], strict)
    mean = (P[k[hit]] - P[src][ok][hit]).mean(0) if hit.any() else t
    return int(ok.sum()), int(hit.sum()), mean


def lattice_candidates(P: np.ndarray, A: np.ndarray, length: float, reach: float):
    """Candidate lattices of atoms fitted to a repeating-lattice field, most trusted first.

    Tiers, each on all atoms, then on the stronger half, then on those of at least half the
    strongest amplitude (every site's images repeat on the lattice, and heavy atoms are
    fitted best):

    1. every checked atom maps within 0.1 Å onto an atom whose amplitude rounds to its Z;
    2. at least 95%, then 90% of them within ``MATCH_A`` (a free fit with misfit atoms);
    3. positions alone, whatever the amplitudes, 90% within ``MATCH_A`` (a free fit stopped
       early has amplitudes off by 10-20%; on the heavy atoms alone, the light ones of a quick
       free fit are up to 1 Å off: val DyCu(WO4)2, CdGeO3).

    A pseudo-translation (val: Li5Mn(CoO4)2, HgO, H8PtO6, whose atoms nearly repeat on half
    the cell) passes the looser tiers and gives too small a cell, whose tied fit cannot
    explain the field; the strict tier comes first so that the true lattice is tried first.

    Args:
        P: (N, 3) float64 fitted positions in Å (cube frame, up to ``reach`` outside the cube).
        A: (N,) float64 fitted amplitudes (Z units).
        length: the cube's edge in Å. reach: how far outside the cube (Å) atoms were fitted.

    Yields:
        (3, 3) float64 lattice vectors as rows (Å), each lattice once.
    """
    P = np.asarray(P, np.float64).reshape(-1, 3)
    A = np.asarray(A, np.float64).reshape(-1)
    if not len(A):
        return
    # the thresholds come from the atoms the free fit places reliably (the cube and a quarter of
    # ``reach`` around it, where translations are checked): an atom further out is seen through
    # its tail alone and may take any amplitude (test Li2ZrO3: 210 for a Zr of 40, 2.3 Å outside,
    # which left the Zr out of the heavy subset and no lattice was found)
    near = _near_cube(P, length, RELIABLE_BAND * reach)
    ref = A[near] if near.any() else A
    subsets = (np.ones(len(A), bool), A >= np.median(ref), A >= 0.5 * ref.max())
    tiers = [(1.0, 0.1, True, False), (0.95, MATCH_A, False, False), (MIN_SCORE, MATCH_A, False, False),
             (MIN_SCORE, MATCH_A, False, True)]
    seen: list[np.ndarray] = []
    for min_score, match, strict, positions_only in tiers:
        for keep in subsets:
            amp = np.zeros(int(keep.sum())) if positions_only else A[keep]
            L = _lattice_of(P[keep], amp, length, reach, min_score, match, strict)
            if L is not None and not any(same_lattice(L, S) for S in seen):
                seen.append(L)
                yield L


def find_lattice(P: np.ndarray, A: np.ndarray, length: float, reach: float) -> np.ndarray | None:
    """The first of :func:`lattice_candidates` ((3, 3) float64 rows, Å), or None when three
    independent translations that map the atoms onto themselves are not found."""
    return next(lattice_candidates(P, A, length, reach), None)


def same_lattice(A: np.ndarray, B: np.ndarray, tol_A: float = MATCH_A) -> bool:
    """Do the rows of ``A`` and of ``B`` ((3, 3) float, Å) generate one lattice: is each row a
    whole-number combination of the other's rows, within ``tol_A`` Å? Raises
    :class:`numpy.linalg.LinAlgError` when either is singular."""
    for X, Y in ((A, B), (B, A)):
        c = X @ np.linalg.inv(Y)
        if np.abs(X - np.rint(c) @ Y).max() > tol_A:
            return False
    return True


def _lattice_of(P: np.ndarray, A: np.ndarray, length: float, reach: float, min_score: float = MIN_SCORE,
                match: float = MATCH_A, strict: bool = False) -> np.ndarray | None:
    """One lattice of one set of atoms (:func:`lattice_candidates`), or None."""
    inside = _near_cube(P, length)
    if inside.sum() < 2:
        return None
    tree = cKDTree(P)
    src = np.flatnonzero(inside)
    # translations are checked where the fit is reliable
    lo, hi = -RELIABLE_BAND * reach, length + RELIABLE_BAND * reach
    # reference atoms: the three nearest the centre, and the one nearest each corner (whose
    # translates across the cube show the long lattice vectors)
    corners = [np.full(3, length / 2)] + [np.array(c, float) * length for c in itertools.product((0, 1), repeat=3)]
    refs = list(src[np.argsort(np.linalg.norm(P[src] - corners[0], axis=1))][:3])
    refs += [int(src[np.argmin(np.linalg.norm(P[src] - c, axis=1))]) for c in corners[1:]]
    refs = list(dict.fromkeys(refs))
    cands = []
    reliable = _in_box(P, lo, hi)
    for i in refs:
        j = np.flatnonzero(_same_kind(A, A[i], strict) & reliable)
        t = P[j] - P[i]
        cands.append(t[np.linalg.norm(t, axis=1) > 2 * MATCH_A])
    if not cands:
        return None
    T = np.concatenate(cands)
    need = max(3, int(0.1 * len(src)))
    good, checks = [], []
    for t in T:
        n, hit, mean = _score(t, P, A, tree, src, lo, hi, match, strict)
        if n >= need and hit >= min_score * n:
            good.append(mean)  # averaged over every matched pair: one misfit atom does not skew it
            checks.append(n)
    if len(good) < 3:
        return None
    # vectors checked on at least a quarter of the atoms make the basis when they span space: a
    # long vector checked on a few atoms may be a near-coincidence (val: U(SiPt)2, a half
    # translation that held on the few atoms it could be checked on)
    checks = np.array(checks)
    strong = checks >= max(3, 0.25 * len(src))
    for use in (strong, np.ones(len(good), bool)):
        L = basis_of(np.array(good)[use])
        if L is not None:
            return L
    return None


def distinct_translations(V: np.ndarray, tol_A: float) -> np.ndarray:
    """Translations shortest first, one of each +-t pair, near-duplicates merged.

    Args:
        V: (K, 3) float translations in Å (either sign).
        tol_A: two translations closer than this (Å), or than this to each other's negative,
            count once (the shorter is kept).

    Returns:
        (J, 3) float64, J <= K, sorted by length (ties in input order).
    """
    V = np.asarray(V, np.float64).reshape(-1, 3)
    uniq: list[np.ndarray] = []
    for v in V[np.argsort(np.linalg.norm(V, axis=1), kind="stable")]:
        if not any(min(np.linalg.norm(v - u), np.linalg.norm(v + u)) < tol_A for u in uniq):
            uniq.append(v)
    return np.array(uniq).reshape(-1, 3)


def spanning_triples(U: np.ndarray, shortest: int = 16):
    """Candidate bases among the ``shortest`` first rows of ``U``: every triple that is not
    near-coplanar (volume at least 5% of the product of the lengths).

    Args:
        U: (J, 3) float translations in Å, e.g. from :func:`distinct_translations`.

    Yields:
        ``(B, volume)``: (3, 3) float64 rows three translations, and ``|det B|`` in Å^3.
    """
    U = np.asarray(U, np.float64)[:shortest]
    for a, b, c in itertools.combinations(range(len(U)), 3):
        B = U[[a, b, c]]
        vol = abs(float(np.linalg.det(B)))
        if vol >= 0.05 * float(np.prod(np.linalg.norm(B, axis=1))):
            yield B, vol


def basis_of(V: np.ndarray) -> np.ndarray | None:
    """A basis of the lattice that translations generate.

    Args:
        V: (K, 3) float translations in Å (either sign; near-duplicates within ``MATCH_A`` Å
            count once).

    Returns:
        (3, 3) float64, rows the three of the sixteen shortest distinct translations that span
        the smallest non-zero volume (shortest total length among equal volumes), when every
        translation is a whole-number combination of them within ``MATCH_A`` Å; else None (fewer
        than three, coplanar, or not one lattice).
    """
    if len(V) < 3:
        return None
    U = distinct_translations(V, MATCH_A)
    best, best_key = None, None
    for B, vol in spanning_triples(U):
        key = (round(vol, 1), float(np.linalg.norm(B, axis=1).sum()))
        if best_key is None or key < best_key:
            best, best_key = B, key
    if best is None:
        return None
    coef = U @ np.linalg.inv(best)
    if np.abs(U - np.rint(coef) @ best).max() > MATCH_A:
        return None
    return best


class TiedFit:
    """Result of :func:`tied_fit`.

    Attributes:
        lattice: (3, 3) float64 rows = lattice vectors (Å).
        sites: (Nb, 3) float64 site positions (Å, cube frame; one image of each site).
        amplitudes: (Nb,) float64 site amplitudes (Z units). sigma: (Nb,) their standard errors.
        positions, image_amplitudes, image_sigma: every image within ``IMAGE_SIGMAS`` sigma
            of the cube, (K, 3) Å and (K,) Z units.
        rss: residual energy (F units squared). n_params: 4 Nb + 9.
        edge_A: an atom counts as inside the cube up to this far (Å) beyond a face
            (``TIED_EDGE_A``; ``POLISHED_EDGE_A`` for atoms refined untied, :func:`_polished`).
    """

    def __init__(self, lattice, sites, amplitudes, sigma, positions, image_amplitudes, image_sigma, rss,
                 edge_A: float = TIED_EDGE_A):
        self.lattice, self.sites, self.amplitudes, self.sigma = lattice, sites, amplitudes, sigma
        self.positions, self.image_amplitudes, self.image_sigma = positions, image_amplitudes, image_sigma
        self.rss = float(rss)
        self.n_params = 4 * len(amplitudes) + 9
        self.edge_A = float(edge_A)


def _images(sites: np.ndarray, lattice: np.ndarray, lo: float, hi: float, max_images: int = MAX_IMAGES):
    """(site index (K,), shifts n (K, 3) int) of every image ``r_b + n L`` inside [lo, hi]^3."""
    inv = np.linalg.inv(lattice)
    corners = np.array([[x, y, z] for x in (lo, hi) for y in (lo, hi) for z in (lo, hi)])
    bs, ns = [], []
    for b, r in enumerate(sites):
        f = (corners - r) @ inv
        nmin, nmax = np.floor(f.min(0)).astype(int), np.ceil(f.max(0)).astype(int)
        if np.prod(nmax - nmin + 1) > 50 * max_images:
            raise ValueError("lattice too small for the cube")
        n = np.stack(np.meshgrid(*[np.arange(a, c + 1) for a, c in zip(nmin, nmax)], indexing="ij"), -1).reshape(-1, 3)
        Q = r + n @ lattice
        keep = _in_box(Q, lo, hi)
        bs.append(np.full(int(keep.sum()), b))
        ns.append(n[keep])
    b, n = np.concatenate(bs), np.concatenate(ns)
    if len(b) > max_images:
        raise ValueError("too many images")
    return b, n


def _sites_of(P: np.ndarray, A: np.ndarray, lattice: np.ndarray, length: float, margin: float):
    """One site per set of fitted atoms that are lattice translates of each other (within
    ``MATCH_A``, whatever their amplitudes): its member nearest the cube's centre and the
    median amplitude of its members inside the cube (of all members if none is); sets of
    fewer than a quarter of the median set's members are dropped. Only atoms
    within ``margin`` Å of the cube make sites: the images further out are seen through
    their tails alone, and a misfit one would become a second copy of its site."""
    near = _near_cube(P, length, margin)
    P, A = P[near], A[near]
    inv = np.linalg.inv(lattice)
    centre = np.full(3, length / 2)
    order = np.argsort(np.linalg.norm(P - centre, axis=1))
    sites: list[np.ndarray] = []
    members: list[list[int]] = []
    for i in order:
        for s, q in enumerate(sites):
            d = (P[i] - q) @ inv
            if np.linalg.norm((d - np.rint(d)) @ lattice) < MATCH_A:
                members[s].append(i)
                break
        else:
            sites.append(P[i].copy())
            members.append([i])
    # a true site recurs in every cell of the region; a misfit atom of the free fit makes a
    # "site" seen once or twice: those are dropped, and what they explained is found again
    # from the residual (tied_fit's growth)
    if not members:
        return np.zeros((0, 3)), np.zeros(0)
    counts = np.array([len(m) for m in members])
    recurring = counts >= 0.25 * np.median(counts)
    amps = []
    for m in members:
        m = np.array(m)
        inside = _near_cube(P[m], length)
        amps.append(float(np.median(A[m[inside]] if inside.any() else A[m])))
    return np.array(sites)[recurring], np.array(amps)[recurring]


def tied_fit(F: np.ndarray, grid: Grid, P: np.ndarray, A: np.ndarray, lattice: np.ndarray, reach: float,
             min_amplitude: float = 0.5, max_iter: int = 100, grow_rounds: int = 4) -> TiedFit | None:
    """Refine sites and lattice together against a repeating-lattice field (module docstring).

    After the sites from the free fit converge, maxima of the residual inside the cube that
    no image explains become new sites (one per set of lattice translates), and the fit is
    converged again; a round is kept when it lowers the Bayesian information criterion
    (``grow_rounds`` rounds at most). So a site the free fit missed, or fitted only as junk,
    is still found. When that leaves more than ``FIELD_EXPLAINED`` of the field's energy
    unexplained, the fit is started again from the heavy sites alone (at least 3/4 of the
    strongest amplitude) with three times the rounds, and the lower BIC is kept. A fit that
    nearly explains the field but not exactly (between ``FIELD_EXACT`` and ``REMOVAL_WINDOW`` of
    its energy left) tries removing its least integral sites one at a time (:func:`_without_one`).

    Args:
        F: (n, n, n) float64 field in F units (``M * grid.peak_scale``).
        grid: its :class:`Grid`. P, A: the free fit's atoms ((N, 3) Å, (N,) Z units), inside
            and outside the cube. lattice: (3, 3) from :func:`find_lattice`. reach: how far
            outside the cube (Å) the free fit placed atoms.
        min_amplitude: sites below it are removed (Z units). max_iter: LM iterations per pass.

    Returns:
        :class:`TiedFit`, or None when the sites or images cannot be built (a degenerate or
        tiny lattice).
    """
    L0 = np.array(lattice, np.float64)
    try:
        sites, amps = _sites_of(P, A, L0, grid.length, RELIABLE_BAND * reach)
    except (np.linalg.LinAlgError, ValueError):
        return None
    state = _grown(F, grid, sites, amps, L0, min_amplitude, max_iter, grow_rounds, L0)
    energy = float(np.vdot(F, F))
    if (state is None or state["rss"] > FIELD_EXPLAINED * energy) and len(amps):
        # the free fit's sites did not explain the field (a dense cube whose free fit is
        # junk, val CrB4: 28 "sites" for 5): start again from the heavy sites alone and let
        # the residual bring in the rest
        heavy = amps >= 0.75 * amps.max()
        other = _grown(F, grid, sites[heavy], amps[heavy], L0, min_amplitude, max_iter, 3 * grow_rounds, L0)
        if other is not None and (state is None or _state_bic(other, F.size) < _state_bic(state, F.size)):
            state = other
    if state is not None and FIELD_EXACT * energy < state["rss"] <= REMOVAL_WINDOW * energy:
        state = _without_one(F, grid, state, min_amplitude, max_iter, grow_rounds, FIELD_EXACT * energy, L0)
    if state is None:
        return None
    sites, amps, L, H_t, rss = state["sites"], state["amps"], state["L"], state["H"], state["rss"]
    bidx = state["bidx"]
    sigma = _site_sigma(H_t, rss, F.size, len(amps))
    return TiedFit(L, sites, amps, sigma, state["Pk"], state["Ak"],
                   sigma[bidx] if len(sigma) == len(amps) else np.zeros(len(bidx)), rss)


def _grown(F: np.ndarray, grid: Grid, sites: np.ndarray, amps: np.ndarray, L: np.ndarray, min_amplitude: float,
           max_iter: int, rounds: int, L_ref: np.ndarray) -> dict | None:
    """:func:`_converge` from ``sites``, then up to ``rounds`` rounds of new sites from the
    residual, each kept when it lowers the BIC; the state, or None when nothing converged
    (no site left, or more images than ``MAX_IMAGES``). ``L_ref``: the candidate lattice
    (``LATTICE_TRUST_A``)."""
    try:
        state = _converge(F, grid, sites, amps, L, min_amplitude, max_iter, L_ref)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if state is None:
        return None
    for _round in range(rounds):
        new, new_amps = _missing_sites(state, grid, min_amplitude)
        if not len(new):
            break
        try:
            grown = _converge(F, grid, np.vstack([state["sites"], new]), np.concatenate([state["amps"], new_amps]),
                              state["L"], min_amplitude, max_iter, L_ref)
        except (np.linalg.LinAlgError, ValueError):
            break
        if grown is None or _state_bic(grown, F.size) >= _state_bic(state, F.size):
            break
        state = grown
    return state


def _without_one(F: np.ndarray, grid: Grid, state: dict, min_amplitude: float, max_iter: int, rounds: int,
                 exact: float, L_ref: np.ndarray) -> dict:
    """Escape a tie that explains the field but not exactly: remove one site, converge the
    rest and regrow from the residual (:func:`_grown`); the lowest-BIC state of the tries.

    A true field's sites have integer amplitudes (Eq. 1: each atom weighted by its Z), so a site
    far from an integer is a junk site or one that took part of a neighbour's density. The
    sites at least ``NON_INTEGRAL`` from an integer are tried in that order, furthest first, at
    most ``REMOVE_TRIES``; the tries stop once one leaves at most ``exact`` (F units squared).
    Val H8PtO6 (30 sites, each O bonded to an H): a tie of 32 sites at 4.5e-9 of the energy
    (two junk sites of 2.1 and 1.8; four O at 5.7-6.8), 105 of 136 atoms within 0.1 Å; removing
    any one of its seven least integral sites gave the 30 true sites at 4e-14 to 1e-12, all 136
    atoms within 0.1 Å (``runs/exp/death_move.py``; 23-57 s each beside another job).
    """
    a = state["amps"]
    off = np.abs(a - np.rint(a))
    order = [b for b in np.argsort(-off, kind="stable") if off[b] >= NON_INTEGRAL][:REMOVE_TRIES]
    best = state
    for b in order:
        keep = np.arange(len(a)) != b
        tried = _grown(F, grid, state["sites"][keep], a[keep], state["L"], min_amplitude, max_iter, rounds, L_ref)
        if tried is not None and _state_bic(tried, F.size) < _state_bic(best, F.size):
            best = tried
            if best["rss"] <= exact:
                break
    return best


def _bic(rss: float, k: int, n: int) -> float:
    """Bayesian information criterion of a least-squares fit: ``n ln(RSS / n) + k ln n``."""
    return n * np.log(max(rss, 1e-300) / n) + k * np.log(n)


def _state_bic(state: dict, n: int) -> float:
    """:func:`_bic` of a tied state: 4 parameters per site (amplitude, position) and 9 (lattice)."""
    return _bic(state["rss"], 4 * len(state["amps"]) + 9, n)


def _missing_sites(state: dict, grid: Grid, min_amplitude: float):
    """Residual maxima inside the cube that no image explains (farther than ``MERGE_NEW_A``
    from every image), one per set of lattice translates (within ``MERGE_NEW_A``), strongest
    first, as many as ``MAX_IMAGES`` allows: ((K, 3) Å, (K,) Z units)."""
    from .fit import _candidates

    cand, strength = _candidates(state["r"], grid, 0.5 * min_amplitude, 5.0, True, 0.0)
    if not len(cand):
        return cand, strength
    inside = _near_cube(cand, grid.length)
    cand, strength = cand[inside], strength[inside]
    if len(cand) and len(state["Pk"]):
        d, _ = cKDTree(state["Pk"]).query(cand)
        cand, strength = cand[d > MERGE_NEW_A], strength[d > MERGE_NEW_A]
    L = state["L"]
    inv = np.linalg.inv(L)
    # as many new sites as the image budget allows (each site has about as many images as
    # the first one); residual maxima of one site, seen in several cells, agree only to a few
    # tenths of an Å, so translates within MERGE_NEW_A are one site
    per_site = len(state["Pk"]) / max(len(state["amps"]), 1)
    room = max(1, int(MAX_IMAGES / max(per_site, 1.0)) - len(state["amps"]))
    keep: list[int] = []
    for i in range(len(cand)):
        if strength[i] < 0.25 * strength[0] or len(keep) >= room:  # the rest wait for the next round
            break
        if all(np.linalg.norm(((cand[i] - cand[j]) @ inv - np.rint((cand[i] - cand[j]) @ inv)) @ L) >= MERGE_NEW_A
               for j in keep):
            keep.append(i)
    return cand[keep], np.maximum(strength[keep], min_amplitude)


def _converge(F: np.ndarray, grid: Grid, sites: np.ndarray, amps: np.ndarray, L: np.ndarray,
              min_amplitude: float, max_iter: int, L_ref: np.ndarray | None = None) -> dict | None:
    """Levenberg-Marquardt on sites, amplitudes and lattice; sites that meet are merged, those
    below ``min_amplitude`` removed, the images rebuilt, up to four passes. A step that moves a
    lattice vector more than ``LATTICE_TRUST_A`` from ``L_ref`` (default ``L``) has that vector
    put back at ``LATTICE_TRUST_A`` from it (then kept only if it lowers the residual).
    Returns the state (sites, amps, L, H the tied J^T J, rss, r the residual, Pk/Ak/bidx the
    images), or None when no site is left. Raises ValueError for a lattice too small for the
    cube."""
    from .fit import _basis, _model, _normal_equations

    c = grid.centres()
    sig = grid.sigma
    lo, hi = -IMAGE_SIGMAS * sig, grid.length + IMAGE_SIGMAS * sig
    H_t = None
    floor = FLOAT_FLOOR * float(np.vdot(F, F))
    L_ref = np.array(L if L_ref is None else L_ref, np.float64)
    for _pass in range(4):
        bidx, shifts = _images(sites, L, lo, hi)
        Nb, K = len(sites), len(bidx)
        # chain rule: image parameters [A (K), px, py, pz (K each)] from [a (Nb), rx, ry, rz (Nb), L (9)]
        T = np.zeros((4 * K, 4 * Nb + 9))
        T[np.arange(K), bidx] = 1.0
        for ax in range(3):
            T[(ax + 1) * K + np.arange(K), (ax + 1) * Nb + bidx] = 1.0
            for i in range(3):
                T[(ax + 1) * K + np.arange(K), 4 * Nb + 3 * i + ax] = shifts[:, i]

        def images(sites_, amps_, L_):
            return sites_[bidx] + shifts @ L_, amps_[bidx]

        Pk, Ak = images(sites, amps, L)
        g, dg = _basis(Pk, c, sig)
        r = F - _model(Ak, g)
        rss = float(np.vdot(r, r))
        lam = 1e-3
        history = [rss]
        for _ in range(max_iter):
            H, b = _normal_equations(r, Ak, g, dg)
            H_t, b_t = T.T @ H @ T, T.T @ b
            diag = np.maximum(np.diag(H_t).copy(), 1e-12 * max(float(np.diag(H_t).max()), 1e-300))
            accepted = False
            for _try in range(12):
                try:
                    delta = linalg.cho_solve(linalg.cho_factor(H_t + lam * np.diag(diag), check_finite=False), b_t,
                                             check_finite=False)
                except np.linalg.LinAlgError:
                    delta = linalg.lstsq(H_t + lam * np.diag(diag), b_t, check_finite=False)[0]
                amps1 = amps + delta[:Nb]
                sites1 = sites + delta[Nb:4 * Nb].reshape(3, Nb).T
                L1 = L + delta[4 * Nb:].reshape(3, 3)
                # a lattice vector leaving the trust region is put back on its edge (a refused
                # step would freeze the fit there; val SiH12C2(NF)6's restart from its four
                # heaviest sites: 19 sites at 2e-5 refused, the 27 true sites at 8e-14 clipped)
                dL = L1 - L_ref
                norm = np.linalg.norm(dL, axis=1, keepdims=True)
                L1 = L_ref + dL * np.minimum(1.0, LATTICE_TRUST_A / np.maximum(norm, 1e-300))
                Pk1, Ak1 = images(sites1, amps1, L1)
                g1, dg1 = _basis(Pk1, c, sig)
                r1 = F - _model(Ak1, g1)
                rss1 = float(np.vdot(r1, r1))
                if rss1 <= rss:
                    drel = (rss - rss1) / max(rss, 1e-300)
                    step = float(np.abs(delta[Nb:]).max()) if len(delta) > Nb else 0.0
                    sites, amps, L, Pk, Ak, g, dg, r, rss = sites1, amps1, L1, Pk1, Ak1, g1, dg1, r1, rss1
                    lam = max(lam * 0.1, 1e-7)
                    accepted = True
                    history.append(rss)
                    break
                lam *= 10.0
            # stalled: five accepted steps together gained less than STALL_REL (a site whose
            # amplitude went to zero wanders freely without changing the residual; it is
            # removed below and the fit goes on without it)
            stalled = len(history) > 5 and rss > (1.0 - STALL_REL) * history[-6]
            if not accepted or drel < 1e-9 or step < 1e-6 or rss <= floor or stalled:
                break
        sites, amps, merged = _merge_sites(sites, amps, L)
        low = amps < min_amplitude
        # wrap each site to its image nearest the cube's centre, then rebuild the images
        d = (sites - grid.length / 2) @ np.linalg.inv(L)
        sites = sites - np.rint(d) @ L
        if low.all():
            return None
        if low.any():
            sites, amps = sites[~low], amps[~low]
            continue
        if _pass > 0 and not merged:
            break
    bidx, shifts = _images(sites, L, lo, hi)
    Pk, Ak = sites[bidx] + shifts @ L, amps[bidx]
    g, _ = _basis(Pk, c, sig)
    r = F - _model(Ak, g)
    if H_t is not None and H_t.shape[0] != 4 * len(amps) + 9:
        H_t = None
    return {"sites": sites, "amps": amps, "L": L, "H": H_t, "rss": float(np.vdot(r, r)), "r": r,
            "Pk": Pk, "Ak": Ak, "bidx": bidx}


def _merge_sites(sites: np.ndarray, amps: np.ndarray, L: np.ndarray):
    """Sites that converged onto one position modulo the lattice (within ``MATCH_A``) become
    one, at the amplitude-weighted mean, with the summed amplitude; (sites, amps, any merged)."""
    inv = np.linalg.inv(L)
    keep = np.ones(len(amps), bool)
    sites, amps = sites.copy(), amps.copy()
    for i in range(len(amps)):
        if not keep[i]:
            continue
        for j in range(i + 1, len(amps)):
            if not keep[j]:
                continue
            d = (sites[j] - sites[i]) @ inv
            dj = (d - np.rint(d)) @ L  # j's image nearest i, minus i
            if np.linalg.norm(dj) < MATCH_A:
                w = amps[i] + amps[j]
                if abs(w) > 1e-9:
                    sites[i] = sites[i] + dj * (amps[j] / w)
                amps[i] = w
                keep[j] = False
    return sites[keep], amps[keep], bool((~keep).any())


def _site_sigma(H_t: np.ndarray | None, rss: float, n_vox: int, Nb: int) -> np.ndarray:
    """Standard errors of the site amplitudes, ``s sqrt([H^-1]_aa)`` (as the free fit's)."""
    if H_t is None or H_t.shape[0] != 4 * Nb + 9:
        return np.zeros(Nb)
    s2 = rss / max(n_vox - (4 * Nb + 9), 1)
    try:
        Hinv = linalg.pinvh(H_t)
    except (linalg.LinAlgError, ValueError):
        return np.full(Nb, np.inf)
    return np.sqrt(np.maximum(np.diag(Hinv)[:Nb], 0.0) * s2)


def tie_if_better(F: np.ndarray, grid: Grid, P: np.ndarray, A: np.ndarray, rss_free: float, reach: float,
                  min_amplitude: float = 0.5, max_lattices: int = 3, explained: bool = False,
                  close: list | None = None, lattices: list | None = None,
                  near: list | None = None) -> TiedFit | None:
    """The tied fit of a free fit's atoms, when it explains the field better.

    Args:
        F: (n, n, n) float64 field (F units). grid: its grid. P, A: the free fit's atoms
            ((N, 3) Å inside and outside the cube, (N,) Z units). rss_free: the free fit's
            residual energy. reach: how far outside the cube (Å) the free fit placed atoms.
        explained: also require the tied fit to leave at most ``FIELD_EXPLAINED`` of the
            field's energy (a quick free fit's tie: when it does not, the full free fit is run).
        close: when given, every tie tried that is not kept but leaves between
            ``FIELD_EXPLAINED`` and ``POLISH_WINDOW`` of the energy is appended to it (the
            caller's last resort, :func:`polish_closest`).
        lattices: lattices to try first, before the free fit's (:func:`lattice_candidates`):
            those of the field's self-overlap
            (:func:`crystalstudio.core.lattice_overlap.overlap_lattices`).
        near: when given (with ``explained``), a tie that explains the field but leaves more
            than ``FIELD_EXACT`` of its energy is appended to it instead of returned, and the
            next lattice is tried (val SiH12C2(NF)6: the field's lattice from a quick seed tied
            at 6.9e-9, nine H images 0.1-0.3 Å off; the free fit's basis of the same lattice
            tied exactly, at 8.4e-14). The caller takes the best of them when no exact tie
            comes.

    Returns:
        :class:`TiedFit` of the first of ``lattices`` and (at most ``max_lattices``) candidate
        lattices whose
        tied fit has the lower Bayesian information criterion ``n ln(RSS / n) + k ln n``
        (n voxels, k parameters: 4 per atom free, 4 per site + 9 tied); None otherwise.
    """
    free = _bic(rss_free, 4 * len(A), F.size)
    energy = float(np.vdot(F, F))
    limit = FIELD_EXPLAINED * energy if explained else np.inf
    # the free fit's lattices are tried even where they repeat one of ``lattices``: another basis
    # and a rougher start converge elsewhere (val SiH12C2(NF)6: exact from the free fit's basis)
    for L in itertools.chain(lattices or (), itertools.islice(lattice_candidates(P, A, grid.length, reach),
                                                               max_lattices)):
        tf = tied_fit(F, grid, P, A, L, reach, min_amplitude)
        if tf is not None and _bic(tf.rss, tf.n_params, F.size) < free and tf.rss <= limit:
            if near is None or not explained or tf.rss <= FIELD_EXACT * energy:
                return tf
            near.append(tf)
            continue
        if close is not None and tf is not None and FIELD_EXPLAINED * energy < tf.rss <= POLISH_WINDOW * energy:
            close.append(tf)
    return None


def polish_closest(F: np.ndarray, grid: Grid, close: list, reach: float) -> TiedFit | None:
    """The last resort of a repeating-lattice fit whose ties all failed: the closest of the
    ``close`` ties (lowest residual) refined untied (:func:`_polished`), or None. Run only once
    every tie and the full free fit have failed: on val, polishing the quick seeds' close ties
    at once cost up to 900 s a cube (ScF3, ZrFeSi) that a later tie makes exact in seconds."""
    if not close:
        return None
    return _polished(F, grid, min(close, key=lambda t: t.rss), reach)


def _polished(F: np.ndarray, grid: Grid, tf: TiedFit, reach: float) -> TiedFit | None:
    """A tie that nearly explains the field, untied: its images within ``reach`` Å of the cube
    seed a free Levenberg-Marquardt refinement of every atom (positions and amplitudes each
    free, :func:`crystalstudio.core.fit._refine`). Returned (as a :class:`TiedFit` whose
    ``positions``, ``image_amplitudes`` and ``image_sigma`` are the refined atoms, ``rss`` their
    residual; lattice and sites those of the tie) when it leaves at most ``FIELD_EXPLAINED`` of
    the field's energy, else None. Test Fe(OH)2: the pseudo-cell's tie at 1.3e-6 refines to
    4e-12, every atom within 0.1 Å (566 atoms, about 2 minutes)."""
    from .fit import _amplitude_sigma, _refine

    lo, hi = -reach, grid.length + reach
    keep = _in_box(tf.positions, lo, hi)
    if not keep.any():
        return None
    P, A, r, H = _refine(F, tf.positions[keep], tf.image_amplitudes[keep], grid.centres(), grid.sigma, lo, hi,
                         POLISH_ITER)
    rss = float(np.vdot(r, r))
    if rss > FIELD_EXPLAINED * float(np.vdot(F, F)):
        return None
    return TiedFit(tf.lattice, tf.sites, tf.amplitudes, tf.sigma, P, A, _amplitude_sigma(H, r, len(A)), rss,
                   POLISHED_EDGE_A)
