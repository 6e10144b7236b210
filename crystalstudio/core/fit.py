"""Atoms by fitting Eq. 1 to a density field: the model-based atom finder.

Eq. 1 of Hoffmann et al. 2019 says exactly what a density field is: a sum of isotropic
Gaussians of known width sigma, one per atom, each weighted by the atom's Z. In the units
of :attr:`Grid.peak_scale` (``F = M * peak_scale``) an atom of amplitude ``A`` at ``p``
adds ``A exp(-|x - p|^2 / (2 sigma^2))``, so for a true field ``A = Z`` exactly. This
module inverts Eq. 1 by sparse-in-atoms nonlinear least squares:

1. **Seed** (matching pursuit): local maxima (3x3x3) of the residual ``F - F_model`` above
   half the amplitude floor, refined to sub-voxel by a log-parabola per axis; the first
   residual is the field itself, sharpened first (true unit-cell fields, ``sharpen_A``): a 1-D
   Tikhonov deconvolution along each axis turns every Gaussian of width sigma into a
   narrower one, so atoms that are only shoulders at sigma are separate maxima and the
   first round seeds nearly all of them.
2. **Refine** jointly all positions (Å) and amplitudes (Z units) by Levenberg-Marquardt
   (Gauss-Newton with Marquardt's diagonal damping). Each Gaussian factorises over x, y
   and z, so the normal equations ``J^T J`` are products of 1-D Gram matrices (cost
   ``N^2 n`` instead of ``N^2 n^3``), ``J^T r`` is three matrix products with the residual
   (cost ``N n^3``), and no Jacobian is ever stored: for 100 atoms on a 30^3 grid one
   iteration is about 1 ms.
3. **Add and remove**: new residual maxima become atoms; atoms whose amplitude falls below
   the floor ``min_amplitude`` are removed; two atoms closer than ``merge_A`` are merged.
   Repeat until a round no longer lowers the residual energy by more than a BIC penalty
   (ln(voxels) noise variances per new parameter), at most ``max_rounds`` rounds.
4. **Verify**: converge the chosen atoms (``max_iter``) and look at the residual again;
   where it still holds atoms, go back to 3 (``verify_passes`` times at most).

Amplitudes of fixed positions are solved linearly (Eq. 1 is linear in them), as a
non-negative least-squares problem where the plain solution has a negative weight: seeds
crowded in a dense field (a hydroxide's hydrogens, a lattice's images at the faces) otherwise
swing to amplitudes of +-10^4 and the fit never recovers.

The noise level is estimated from the residual, ``s^2 = RSS / (n^3 - 4 N)``, and each
amplitude's standard error is ``s sqrt([(J^T J)^-1]_AA)`` (white-noise approximation; a
decoded field's errors are smooth, so the floor ``min_amplitude`` is what counts there).

For the repeating lattice (representation 2) atoms just outside the cube still reach it:
they are fitted too (positions up to ``outside_sigmas`` sigma outside) and only the atoms
inside the cube are returned. A true lattice field is then refitted with every image tied
to its site through the lattice the fitted atoms repeat on
(:mod:`crystalstudio.core.lattice_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from .density import Grid
from .segment import Atoms

__all__ = ["FitSettings", "fit_atoms", "field_model", "FieldError", "DEFAULT_FIT", "DECODED_FIT", "UNET_GATE",
           "SPECIES_AMPLITUDE_REL", "REFINED_GATE", "SPECIES_PRIOR_SD", "sharpening_matrix",
           "combine_with_unet", "fit_decoded", "species_from_amplitude", "check_species_prior"]


class FieldError(ValueError):
    """A field the atom fit refuses (wrong shape, NaN/inf, all negative), one line."""


@dataclass(frozen=True)
class FitSettings:
    """Knobs of :func:`fit_atoms`.

    Attributes:
        min_amplitude: smallest amplitude (Z units) kept as an atom (0.5: half a hydrogen).
        merge_A: atoms closer than this (Å) are merged into one (amplitudes summed).
        max_rounds: add/refine/remove rounds.
        detect: after the first round, residual features down to ``detect * min_amplitude``
            are tried as atoms (a light atom beside a heavy one leaves a small residual).
        relative: per round only candidates at least this fraction of the strongest new one (not
            within merge_A of a fitted atom).
        noise_k: after the first round a residual feature must also exceed this many robust
            standard deviations (1.4826 x median absolute deviation) of its detector.
        max_iter: Levenberg-Marquardt iterations of the final refinement of the chosen atoms.
        round_iter: Levenberg-Marquardt iterations per detection round (a round whose atoms
            are not all found yet is not worth converging: the next round adds the missing
            ones, and the chosen state is refined with ``max_iter`` at the end).
        max_atoms: hard cap on fitted atoms (inside and outside the cube).
        outside_sigmas: how far outside the cube (in sigma) an atom may sit. For the unit
            cell representation atoms are kept within ``edge_A`` of the cube.
        edge_A: unit-cell representation: allowed margin outside the cube, Å.
        z_max: largest Z read from an amplitude.
        width_scale: fit Gaussians of ``width_scale * sigma`` (a decoded field is blurrier
            than Eq. 1); Z is then the amplitude times ``width_scale^3`` (the integral).
        laplacian: also seed from maxima of the residual's negative Laplacian (resolves
            shoulders of a true field; on a decoded field it mostly finds wiggles).
        backoff: after a round that did not pay, retry from the best state with half as
            many candidates (robust on true fields, slower).
        verify_passes: after the chosen state is converged (``max_iter``), look at its
            residual again and run more rounds when it still holds atoms, at most this many
            times (a round's decision was made on a state converged only ``round_iter``
            iterations; the converged residual is the fair judge).
        sharpen_A: first round: seed from the maxima of the field sharpened to Gaussians of
            this width (Å) instead of ``sigma`` (:func:`sharpening_matrix`), so that atoms
            which are shoulders at sigma become maxima; 0 turns it off (decoded fields,
            whose noise a deconvolution would amplify). 100 random atoms at sigma 1 Å: the
            first round seeds ~94 of them within 0.3 Å instead of ~30
            (benchmarks/bench_fit.py). Unit-cell representation only: on the repeating
            lattice (val cubes 12-30) it was 24% faster but missed 33 atoms instead of 27.
            Not used where it is not below the grid's sigma.
        sharpen_lambda: Tikhonov weight of that deconvolution (relative; larger is smoother).
        round_stall: unit-cell representation, detection rounds: stop refining once three
            accepted Levenberg-Marquardt steps together lowered the residual energy by less
            than this fraction (the atoms present cannot explain the field yet; the next
            round's candidates will). 0 turns it off (the decoded-field settings, whose
            atom counts it lowered on the validation split). With it on, the damping falls
            by x0.5 after an accepted step instead of x0.1. 100 atoms: 318 -> 100 Cholesky
            factorisations per field, all atoms still exact (benchmarks/bench_fit.py).
        tie_lattice: repeating lattice: after the free fit, find the lattice its atoms repeat
            on and refit sites and lattice together, every image a translate of its site
            (:mod:`crystalstudio.core.lattice_fit`); kept when it explains the field better by
            the information criterion (residual energy against parameter count). False for
            decoded fields (not chosen on them).
        tie_seed_rounds: repeating lattice with ``tie_lattice``: first try the tie from quick
            free fits of these many detection rounds, in turn (no verify pass, the matching
            ``tie_seed_iter`` final iterations), and keep the first tie that explains the field
            to within :data:`crystalstudio.core.lattice_fit.FIELD_EXPLAINED` of its energy;
            only when none does is the full free fit run. Val cubes 0-11: 617 of 617 atoms
            exact from the 4-round seed, 8.6 s per cube (the free fits alone took 54 s;
            docs/atom_fit.md); 10 of 13 val cubes that it could not explain (50-450 s each
            through the full free fit) are explained from the 8-round seed in 10-100 s. Empty
            turns it off.
        tie_seed_iter: Levenberg-Marquardt iterations of each quick fit's chosen atoms.
    """

    min_amplitude: float = 0.5
    merge_A: float = 0.5
    max_rounds: int = 25
    detect: float = 0.1
    noise_k: float = 5.0
    relative: float = 0.25
    max_iter: int = 200
    round_iter: int = 30
    max_atoms: int = 600
    outside_sigmas: float = 3.5
    edge_A: float = 0.5
    z_max: int = 94
    width_scale: float = 1.0
    laplacian: bool = True
    backoff: bool = True
    verify_passes: int = 2
    round_stall: float = 0.2
    sharpen_A: float = 0.45
    sharpen_lambda: float = 3e-7
    tie_lattice: bool = True
    tie_seed_rounds: tuple[int, ...] = (4, 8)
    tie_seed_iter: tuple[int, ...] = (100, 200)


#: for true (noise-free) fields and the tests: hydrogen (Z = 1) is found
DEFAULT_FIT = FitSettings()
#: for decoded fields M_hat of a VAE (chosen on the validation split; docs/atom_fit.md):
#: seeds from maxima of the field only, three rounds, no back-off, an amplitude floor of 6,
#: one verify pass (val, shipped default: 0 / 1 / 2 passes gave 57.8 / 57.7 / 57.7% atoms within
#: 0.5 Å and 27.9 / 28.5 / 28.5% exact counts; a second pass only costs time on wiggly fields),
#: and peaks closer than 1.4 Å merged into one atom: a decoded field often splits one atom into
#: two peaks 0.6-1.2 Å apart, while only 3.6% of the validation crystals' non-H atoms have a
#: neighbour closer than 1.3 Å (and the fit never resolves H beside its partner). Validation
#: split, refined fields, merge distance 0.5 / 0.8 / 1.1 / 1.2 / 1.3 / 1.4 / 1.5 / 1.8 Å: exact
#: count 47.3 / 50.3 / 57.6 / 57.6 / 58.2 / 59.4 / 60.0 / 52.7%, atoms within 0.5 Å 77.4 / 77.6 /
#: 77.8 / 77.7 / 78.0 / 77.7 / 76.6 / 69.2% (docs/refine.md)
DECODED_FIT = FitSettings(min_amplitude=6.0, merge_A=1.4, detect=0.5, max_rounds=3, laplacian=False, backoff=False,
                          max_iter=20, round_iter=20, verify_passes=1, round_stall=0.0,
                          sharpen_A=0.0, tie_lattice=False)
#: species rule for decoded fields (chosen on the validation split): a fitted atom is kept
#: when the U-Net gives it at least this probability of being an atom
UNET_GATE = 0.2
#: relative width of the amplitude's Z likelihood in :func:`combine_with_unet` (chosen on val)
SPECIES_AMPLITUDE_REL = 0.2
#: gate of :func:`combine_with_unet` for fields decoded from a refined latent (Z from the
#: amplitude; chosen on the validation split from 0, 0.03, 0.05, 0.1, docs/refine.md)
REFINED_GATE = 0.05
#: width (Z units) of the fitted amplitude's likelihood in :func:`species_from_amplitude`
#: (chosen on the validation split, refined fields; docs/refine.md)
SPECIES_PRIOR_SD = 0.5


def check_species_prior(counts, n_classes: int) -> np.ndarray:
    """Validate a species prior: ``n_classes`` finite non-negative counts (Z = 0 .. n_classes - 1),
    some of them positive for Z >= 1. Returns them as float64.

    Raises:
        ValueError: one line saying what is wrong.
    """
    try:
        c = np.asarray(counts, np.float64)
    except (TypeError, ValueError):
        raise ValueError("species prior counts are not numbers") from None
    if c.shape != (n_classes,):
        raise ValueError(f"species prior has {c.size} counts, expected {n_classes} (Z = 0..{n_classes - 1})")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("species prior counts must be finite and non-negative")
    if c[1:].sum() <= 0:
        raise ValueError("species prior counts no atom")
    return c


def species_from_amplitude(amplitude: np.ndarray, counts: np.ndarray | None = None,
                           sd: float = SPECIES_PRIOR_SD, z_max: int = 94) -> np.ndarray:
    """Z of atoms from their fitted Eq. 1 amplitudes (Eq. 1: the amplitude is Z).

    Without ``counts``: the rounded amplitude, clipped to 1..z_max. With ``counts`` (how often
    each Z = 0..K-1 occurs among the training crystals' atoms, the checkpoint's
    ``species_prior``): the maximum a posteriori Z,
    ``argmax_Z  log((counts[Z] + 1) / sum) - (A - Z)^2 / (2 sd^2)``, Z in 1..min(z_max, K-1):
    where an amplitude lies between two Z, the element the training crystals hold more often
    wins (add-one smoothing keeps every Z possible). With ``sd`` = 0.5 an exact amplitude is
    read as another Z only where that Z is more than e^2 (7.4) times as frequent as its own
    (in the shipped training split: He, Be, Ne, Ar, Kr, Tc, Xe, Po, Ra). Chosen on the
    validation split's refined fields (docs/refine.md): species exact 53.6% -> 57.7% of the
    matched atoms, from O/N/F and Li/Be confusions; widths 0.4-0.7 and prior powers 0.5-1
    all gave 55-58%.

    Args:
        amplitude: (N,) float fitted amplitudes (Z units). counts: (K,) or None.
    Returns:
        (N,) int64 atomic numbers.
    """
    A = np.asarray(amplitude, np.float64).reshape(-1)
    if counts is None or not len(A):
        return np.clip(np.rint(A), 1, z_max).astype(np.int64)
    counts = np.asarray(counts, np.float64)
    top = min(z_max, len(counts) - 1)
    Zc = np.arange(1, top + 1, dtype=np.float64)
    logp = np.log((counts[1:top + 1] + 1.0) / (counts[1:top + 1] + 1.0).sum())
    score = logp[None, :] - 0.5 * ((A[:, None] - Zc[None, :]) / sd) ** 2
    return (score.argmax(1) + 1).astype(np.int64)


def combine_with_unet(atoms: Atoms, probs: np.ndarray, grid: Grid, gate: float = UNET_GATE,
                      amplitude_species: bool = False, species_prior: np.ndarray | None = None) -> Atoms:
    """Species of fitted atoms from the U-Net (Sec. 3.2) where the checkpoint has one.

    ``amplitude_species=True`` is the rule for fields decoded from a *refined* latent
    (:mod:`crystalstudio.core.refine`), whose peaks were fitted to the input's Eq. 1 heights:
    Z is read from the fitted amplitude by :func:`species_from_amplitude` (Eq. 1: the
    amplitude is Z; with ``species_prior``, the checkpoint's training-set frequencies of each
    Z, the most probable Z under them, else the rounded amplitude), and the U-Net only drops
    atoms it gives less than ``gate`` of being an atom (callers pass :data:`REFINED_GATE`).
    On the validation split (165 crystals, 2026-12-04 default, refined fields) this gave
    77.4% atoms within 0.5 Å, 47.3% exact count and 53.6% species exact, against 74.9 / 43.6 /
    31.5% for the product rule below at gate 0.2; on encoder-only fields the amplitude read
    species worse (20.9% against 27.2%), so the product rule stays theirs (docs/refine.md).

    The rule (chosen on the validation split of the shipped default, docs/atom_fit.md):
    the U-Net's class probabilities are averaged over the 3x3x3 voxels around each fitted
    atom; the atom is dropped when its probability of being an atom (1 - P(Z = 0)) is below
    ``gate``. Its Z is the most probable Z >= 1 under both readings of the atom: the U-Net's
    mean probability p(Z) times the likelihood of the fitted amplitude A (Eq. 1 makes A an
    estimate of Z), ``p(Z) * exp(-((A - Z) / (rel * Z + 0.5))^2 / 2)`` with
    ``rel`` = :data:`SPECIES_AMPLITUDE_REL`. Where the atoms carry no amplitude, Z is the
    majority vote of the U-Net's per-voxel argmax labels (Z >= 1) among those 27 voxels (the
    paper's vote, Sec. 4.2.2, on the atom's neighbourhood), or, where none of them is
    labelled an atom, the most probable Z >= 1 of the mean. Positions, amplitudes and their
    standard errors stay those of the fit. (Validation split, the 2026-12-03 default, gate
    0.15: species exact 24.0% with the vote, 19.6% from the amplitude alone, 26.5% with the
    product; species within 2 Z 52.6 / 60.0 / 60.9%. rel from 0.05 to 0.3 all gave 25.1-26.6%.)

    Args:
        atoms: :func:`fit_atoms` output. probs: (K, n, n, n) float class probabilities
            (softmax of the U-Net logits on the same field). grid: its grid.
        species_prior: (K,) counts of each Z in the training crystals, or None; used only
            with ``amplitude_species``.
    Returns:
        :class:`Atoms` (a subset of ``atoms``, Z replaced).
    """
    if len(atoms) == 0:
        return atoms
    probs = np.asarray(probs)
    n = grid.n
    v = np.clip(np.floor(atoms.positions / grid.spacing).astype(int), 0, n - 1)
    K = probs.shape[0]
    blocks = [probs[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(l - 1, 0):l + 2].reshape(K, -1)
              for i, j, l in v]
    p = np.stack([blk.mean(1) for blk in blocks])
    vote = np.ones(len(v), bool)  # atoms whose Z is the U-Net's vote
    Z = np.zeros(len(v), np.int64)
    if amplitude_species and atoms.amplitude is not None:
        vote[:] = False
        Z = species_from_amplitude(atoms.amplitude, species_prior, z_max=K - 1)
    elif atoms.amplitude is not None:
        Zc = np.arange(1, K, dtype=np.float64)
        A = np.asarray(atoms.amplitude, np.float64)[:, None]
        post = p[:, 1:] * np.exp(-0.5 * ((A - Zc) / (SPECIES_AMPLITUDE_REL * Zc + 0.5)) ** 2)
        vote = post.max(1) <= 0  # nothing left of either reading: the vote
        Z = post.argmax(1) + 1
    for k in np.flatnonzero(vote):
        labels = blocks[k].argmax(0)
        labels = labels[labels > 0]
        Z[k] = np.bincount(labels).argmax() if len(labels) else p[k, 1:].argmax() + 1
    keep = (1.0 - p[:, 0]) >= gate
    amp = None if atoms.amplitude is None else atoms.amplitude[keep]
    sig = None if atoms.amplitude_sigma is None else atoms.amplitude_sigma[keep]
    return Atoms(atoms.positions[keep], Z[keep].astype(np.int64), None, amp, sig)


def fit_decoded(M_hat: np.ndarray, probs: np.ndarray, grid: Grid, representation: str = "unit_cell",
                gate: float = UNET_GATE, refined: bool = False, species_prior: np.ndarray | None = None) -> Atoms:
    """Atoms of a decoded field M_hat the way the app reads them: :func:`fit_atoms` with
    :data:`DECODED_FIT`, then :func:`combine_with_unet`. An encoder-only field (``refined``
    False) takes the product species rule at ``gate`` (the checkpoint's); a field decoded from
    a refined latent takes Z from its amplitudes (with ``species_prior``) at
    :data:`REFINED_GATE`.

    Args:
        M_hat: (n, n, n) decoded field, Eq. 1 units. probs: (K, n, n, n) U-Net class
            probabilities on it. grid: its grid.
    Raises:
        FieldError: as :func:`fit_atoms`.
    """
    return combine_with_unet(fit_atoms(M_hat, grid, representation, DECODED_FIT), probs, grid,
                             REFINED_GATE if refined else gate, amplitude_species=refined, species_prior=species_prior)


def _basis(P: np.ndarray, c: np.ndarray, sigma: float):
    """1-D Gaussians and their derivatives w.r.t. the position, per atom and axis.

    Returns ``g, dg``, each (3, N, n): ``g[a, m, i] = exp(-(c_i - P[m, a])^2 / 2 sigma^2)``,
    ``dg = d g / d P[m, a]``.
    """
    d = c[None, None, :] - P.T[:, :, None]  # (3, N, n)
    g = np.exp(-(d * d) / (2.0 * sigma * sigma))
    return g, g * d / (sigma * sigma)


def _model(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Sum of separable Gaussians: (n, n, n) float64 (F units: M x peak_scale)."""
    N, n = g.shape[1], g.shape[2]
    if N == 0:
        return np.zeros((n, n, n))
    W = (g[1][:, :, None] * g[2][:, None, :]).reshape(N, n * n)
    return ((A[:, None] * g[0]).T @ W).reshape(n, n, n)


def field_model(positions: np.ndarray, amplitudes: np.ndarray, grid: Grid) -> np.ndarray:
    """Eq. 1 in F units for given atoms: ``sum_m A_m exp(-|x - p_m|^2 / 2 sigma^2)``.

    Args:
        positions: (N, 3) Å, cube frame. amplitudes: (N,) Z units.
    Returns:
        (n, n, n) float64; divide by ``grid.peak_scale`` for Eq. 1 units.
    """
    P = np.asarray(positions, np.float64).reshape(-1, 3)
    g, _ = _basis(P, grid.centres(), grid.sigma)
    return _model(np.asarray(amplitudes, np.float64).reshape(-1), g)


def _normal_equations(r: np.ndarray, A: np.ndarray, g: np.ndarray, dg: np.ndarray):
    """``(J^T J, J^T r)`` for parameters ordered [A (N), px (N), py (N), pz (N)].

    ``J`` is the Jacobian of the model; with the factorised Gaussians every entry of
    ``J^T J`` is a product of three 1-D inner products.
    """
    N, n = g.shape[1], g.shape[2]
    R2 = r.reshape(n * n, n)
    T = (R2 @ np.concatenate([g[2], dg[2]]).T).reshape(n, n, 2 * N)  # contract z
    Tg, Td = T[..., :N], T[..., N:]
    U = np.einsum("ijm,mj->mi", Tg, g[1])
    Uy = np.einsum("ijm,mj->mi", Tg, dg[1])
    Uz = np.einsum("ijm,mj->mi", Td, g[1])
    b = np.concatenate([(U * g[0]).sum(1), A * (U * dg[0]).sum(1), A * (Uy * g[0]).sum(1),
                        A * (Uz * g[0]).sum(1)])
    G = g @ g.transpose(0, 2, 1)    # (3, N, N) <g_p, g_q>
    D = dg @ g.transpose(0, 2, 1)   # <dg_p, g_q>
    E = dg @ dg.transpose(0, 2, 1)  # <dg_p, dg_q>
    # block (u, v) of J^T J, u <= v over [A, px, py, pz], is the product over the axes of
    # G, D, D^T or E (E where both differentiate along the axis), taken in the order x, y, z;
    # the products over x and y are shared between blocks (the same floating-point products
    # as multiplying each block out in full)
    Dt = D.transpose(0, 2, 1)
    xy = {(0, 0): G[0] * G[1], (0, 1): G[0] * Dt[1], (1, 0): Dt[0] * G[1], (0, 2): G[0] * E[1],
          (2, 0): E[0] * G[1], (0, 3): G[0] * D[1], (3, 0): D[0] * G[1], (1, 1): D[0] * Dt[1]}
    # (u, v): (key of the x-y product, z factor)
    parts = {(0, 0): ((0, 0), G[2]), (0, 1): ((1, 0), G[2]), (0, 2): ((0, 1), G[2]), (0, 3): ((0, 0), Dt[2]),
             (1, 1): ((2, 0), G[2]), (1, 2): ((1, 1), G[2]), (1, 3): ((3, 0), Dt[2]), (2, 2): ((0, 2), G[2]),
             (2, 3): ((0, 3), Dt[2]), (3, 3): ((0, 0), E[2])}
    H = np.empty((4 * N, 4 * N))
    for (u, v), (k, z) in parts.items():
        blk = xy[k] * z
        if u:
            blk = blk * A[:, None]
        if v:
            blk = blk * A[None, :]
        H[u * N:(u + 1) * N, v * N:(v + 1) * N] = blk
        if v != u:
            H[v * N:(v + 1) * N, u * N:(u + 1) * N] = blk.T
    return H, b


#: Levenberg-Marquardt (free and tied fits) stops once the residual holds less than this fraction
#: of the field's energy: float32 rounding of a field, nothing below it is signal (an exact fit
#: ends at ~3e-14)
FLOAT_FLOOR = 1e-13
#: Levenberg-Marquardt stops once no position moves by more than this (Å) and no amplitude
#: by more than this fraction of the largest
STEP_TOL_A = 1e-4
#: Levenberg-Marquardt: damping increases (x10 from 1e-3) per rejected step before giving up;
#: 6 (damping up to 1e2 x diag) stopped repeating-lattice fits whose images far outside the
#: cube are barely constrained (test split, HfBeSi: 38 of 70 atoms off by more than 0.1 Å)
LM_TRIES = 12


def _refine(F: np.ndarray, P: np.ndarray, A: np.ndarray, c: np.ndarray, sigma: float, lo: float, hi: float,
            max_iter: int, tol: float = 1e-6, stall: float = 0.0):
    """Levenberg-Marquardt on all positions and amplitudes; returns (P, A, residual, H).

    ``stall`` > 0 (detection rounds): also stop when the last three accepted steps lowered
    the residual energy by less than this fraction in all (the atoms present cannot explain
    the field: the next round's candidates will, so converging further is wasted)."""
    N = len(A)
    # a stalled-round fit lowers the damping gently (fewer rejected steps, measured: 100
    # instead of 150 factorisations for a 100-atom field); otherwise the classic /10
    shrink = 0.5 if stall > 0 else 0.1
    steptol = STEP_TOL_A if stall > 0 else 0.0
    g, dg = _basis(P, c, sigma)
    r = F - _model(A, g)
    rss = float(np.vdot(r, r))
    floor = FLOAT_FLOOR * float(np.vdot(F, F))
    lam = 1e-3
    H = None
    history = [rss]
    for _ in range(max_iter):
        H, b = _normal_equations(r, A, g, dg)
        diag = np.diag(H).copy()
        diag = np.maximum(diag, 1e-9 * max(float(diag.max()), 1e-300))
        improved = False
        for _try in range(LM_TRIES):
            Hd = H + lam * np.diag(diag)
            try:  # Hd is symmetric positive definite for lam > 0: Cholesky is ~2x an LU solve
                delta = linalg.cho_solve(linalg.cho_factor(Hd, check_finite=False), b, check_finite=False)
            except np.linalg.LinAlgError:
                delta = linalg.lstsq(Hd, b, check_finite=False)[0]
            A1 = A + delta[:N]
            P1 = np.clip(P + delta[N:].reshape(3, N).T, lo, hi)
            g1, dg1 = _basis(P1, c, sigma)
            r1 = F - _model(A1, g1)
            rss1 = float(np.vdot(r1, r1))
            if rss1 <= rss:
                improved = True
                step = np.abs(P1 - P).max() if N else 0.0
                astep = np.abs(A1 - A).max() / max(float(np.abs(A1).max()), 1e-300) if N else 0.0
                drel = (rss - rss1) / max(rss, 1e-300)
                P, A, g, dg, r = P1, A1, g1, dg1, r1
                rss = rss1
                history.append(rss)
                lam = max(lam * shrink, 1e-7)
                break
            lam *= 10.0
        if stall > 0 and improved and len(history) > 3 and rss > (1.0 - stall) * history[-4]:
            break
        if (not improved or rss <= floor or drel < tol or (step < 1e-3 and drel < 1e-4)
                or (step < steptol and astep < steptol)):
            break
    return P, A, r, H


def _local_maxima(v: np.ndarray, threshold: float) -> np.ndarray:
    """(K, 3) int voxel indices of 3x3x3 local maxima of ``v`` above ``threshold``."""
    mx = ndimage.maximum_filter(v, size=3, mode="constant", cval=-np.inf)
    return np.argwhere((v == mx) & (v > threshold))


def _subvoxel(v: np.ndarray, idx: np.ndarray, log: bool, reach: float = 0.0, sigma_vox: float = 1.0) -> np.ndarray:
    """Sub-voxel maxima: a parabola per axis through ``v`` (or its log) at idx - 1, idx, idx + 1.

    A maximum on a face of the cube has no outer neighbour. With ``reach`` > 0 (voxels; the
    repeating lattice, whose atoms may sit outside the cube) and ``log``, it is placed where a
    Gaussian of the known width ``sigma_vox`` (voxels) through the face voxel and its inner
    neighbour peaks: ``log v`` is a parabola of curvature ``-1 / sigma_vox^2``, so its slope s
    between them puts the centre at the pair's midpoint + ``sigma_vox^2 s``, at most ``reach``
    voxels beyond the face. Without ``reach`` a face maximum stays on its voxel.
    """
    out = idx.astype(np.float64)
    n = v.shape[0]
    top = float(v[tuple(idx.T)].max()) if len(idx) else 1.0
    for ax in range(3):
        lo_i, hi_i = idx.copy(), idx.copy()
        lo_i[:, ax] = np.maximum(idx[:, ax] - 1, 0)
        hi_i[:, ax] = np.minimum(idx[:, ax] + 1, n - 1)
        vals = [v[tuple(w.T)] for w in (lo_i, idx, hi_i)]
        if log:
            vals = [np.log(np.maximum(x, 1e-12 * top)) for x in vals]
        a, b, cc = vals
        curv = a - 2.0 * b + cc
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(curv < 0, 0.5 * (a - cc) / curv, 0.0)
        first, last = idx[:, ax] == 0, idx[:, ax] == n - 1
        shift = np.where(first | last, 0.0, np.clip(np.nan_to_num(off), -0.5, 0.5))
        if reach > 0 and log:
            # first face: the slope from voxel 1 to 0 is b - cc (<= 0 at a maximum), midpoint +0.5
            out_first = np.clip(0.5 - sigma_vox**2 * (b - cc), -reach, 0.5)
            out_last = np.clip(-0.5 + sigma_vox**2 * (b - a), -0.5, reach)
            shift = np.where(first, out_first, np.where(last, out_last, shift))
        out[:, ax] += shift
    return out


_GAINS: dict = {}


def _noise_gains(grid: Grid) -> tuple[float, float]:
    """Standard deviations of the high-pass and of the Laplacian detector on unit white noise."""
    key = (grid.n, grid.spacing, grid.sigma)
    if key not in _GAINS:
        w = np.random.default_rng(0).standard_normal((32, 32, 32))
        hp = (w - ndimage.gaussian_filter(w, 1.0, mode="nearest"))[4:-4, 4:-4, 4:-4]
        lap = -ndimage.laplace(w, mode="nearest")[4:-4, 4:-4, 4:-4] * grid.sigma**2 / (3 * grid.spacing**2)
        _GAINS[key] = (1.4826 * float(np.median(np.abs(hp))), float(lap.std()))
    return _GAINS[key]


def _candidates(r: np.ndarray, grid: Grid, threshold: float, noise_k: float = 5.0,
                laplacian: bool = True, reach_A: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Where the residual ``r`` (F units) may hold an atom: ((K, 3) Å, (K,) strength in Z
    units), strongest first.

    Two detectors: the 3x3x3 maxima of ``-laplacian(r)`` (a Gaussian of amplitude A peaks
    there at ``3 A / sigma^2`` and turns negative at ``sqrt(3) sigma``, so atoms that are
    shoulders of the field are separate maxima), and the maxima of ``r`` itself (which also
    catch the tails of atoms outside the cube at its faces). ``reach_A`` > 0 (the repeating
    lattice) places a maximum of ``r`` on a face up to that many Å outside the cube, where a
    Gaussian of width sigma through it peaks (:func:`_subvoxel`).
    """
    h2 = grid.spacing ** 2
    s2 = grid.sigma ** 2
    lap = -ndimage.laplace(r, mode="nearest") * (s2 / (3.0 * h2))  # Z units at an atom's centre
    # the noise of the residual, seen where a field of Eq. 1 has no power (what a 1-voxel
    # Gaussian smoothing removes), raises each detector's threshold by that detector's own
    # gain on white noise, so the wiggles of a noisy field are not tried as atoms
    if noise_k > 0:
        sd = 1.4826 * float(np.median(np.abs(r - ndimage.gaussian_filter(r, 1.0, mode="nearest"))))
        g_hp, g_lap = _noise_gains(grid)
        t1 = max(threshold, noise_k * sd / g_hp * g_lap)
        t2 = max(threshold, noise_k * sd / g_hp)
    else:
        t1 = t2 = threshold
    i1 = _local_maxima(lap, t1) if laplacian else np.zeros((0, 3), np.int64)
    i2 = _local_maxima(r, t2)
    p1 = _subvoxel(lap, i1, log=False)
    p2 = _subvoxel(r, i2, log=True, reach=reach_A / grid.spacing, sigma_vox=grid.sigma / grid.spacing)
    strength = np.concatenate([lap[tuple(i1.T)], r[tuple(i2.T)]])
    P = (np.concatenate([p1, p2]) + 0.5) * grid.spacing
    order = np.argsort(-strength, kind="stable")
    return P[order], strength[order]


_SHARPEN: dict = {}


def sharpening_matrix(grid: Grid, width_A: float, lam: float = 3e-7, reach_A: float = 4.0) -> np.ndarray:
    """1-D deconvolution D (n, n) float64: ``D @ g_sigma(p) ~ g_width(p)`` for every centre p.

    Eq. 1's Gaussians factorise over x, y and z, so applying D along each axis turns every
    atom's Gaussian of width ``grid.sigma`` into nearly one of ``width_A`` (same centre; on
    the default grid, with the default ``lam``, a peak 0.8-0.9 as high and about half as
    wide at half maximum for centres in the cube) and leaves the field a sum of narrow
    bumps whose atoms are separate maxima. Only seeds come from it; the least-squares fit
    of Eq. 1 then places the atoms. D is the Tikhonov-regularised least-squares fit of that
    map over 2000 centres from ``reach_A`` Å outside the cube's first voxel centre to as far
    beyond its last (so the faces need no periodic assumption): ``D^T = (G^T G + lam K I)^-1 G^T T``, G and T the
    (K, n) profiles at sigma and at ``width_A``. Cached per grid and arguments.

    Raises:
        ValueError: ``width_A`` not between 0 and ``grid.sigma``, or ``lam`` not positive.
    """
    if not 0.0 < width_A < grid.sigma or not lam > 0:
        raise ValueError(f"sharpening to {width_A} Å (lambda {lam}) needs 0 < width < sigma = {grid.sigma} Å "
                         "and lambda > 0")
    key = (grid.n, grid.spacing, grid.sigma, float(width_A), float(lam), float(reach_A))
    if key not in _SHARPEN:
        c = grid.centres()
        p = np.linspace(c[0] - reach_A, c[-1] + reach_A, 2000)
        d2 = (c[None, :] - p[:, None]) ** 2
        G = np.exp(-d2 / (2.0 * grid.sigma ** 2))
        T = np.exp(-d2 / (2.0 * width_A ** 2))
        _SHARPEN[key] = np.linalg.solve(G.T @ G + lam * len(p) * np.eye(grid.n), G.T @ T).T
    return _SHARPEN[key]


def _sharp_candidates(r: np.ndarray, grid: Grid, threshold: float, width_A: float,
                      lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Maxima of ``r`` sharpened by :func:`sharpening_matrix` along each axis: ((K, 3) Å,
    (K,) strength in Z units), strongest first."""
    D = sharpening_matrix(grid, width_A, lam)
    n = grid.n
    S = (D @ r.reshape(n, n * n)).reshape(n, n, n)
    S = np.einsum("bj,ajk->abk", D, S)
    S = (S.reshape(n * n, n) @ D.T).reshape(n, n, n)
    idx = _local_maxima(S, threshold)
    P = (_subvoxel(S, idx, log=False) + 0.5) * grid.spacing
    strength = S[tuple(idx.T)]
    order = np.argsort(-strength, kind="stable")
    return P[order], strength[order]


def _amplitudes(F: np.ndarray, P: np.ndarray, c: np.ndarray, sigma: float) -> np.ndarray:
    """Least-squares amplitudes for fixed positions (Eq. 1 is linear in them): ``G A = <g, F>``."""
    g, _ = _basis(P, c, sigma)
    N, n = g.shape[1], g.shape[2]
    G = (g[0] @ g[0].T) * (g[1] @ g[1].T) * (g[2] @ g[2].T)
    T = (F.reshape(n * n, n) @ g[2].T).reshape(n, n, N)
    b = (np.einsum("ijm,mj->mi", T, g[1]) * g[0]).sum(1)
    G[np.diag_indices(N)] += 1e-9 * max(float(G.diagonal().max()), 1e-300)
    try:
        A = np.linalg.solve(G, b)
    except np.linalg.LinAlgError:
        A = linalg.lstsq(G, b, check_finite=False)[0]
    if A.min() >= 0:
        return A
    # Eq. 1 weights are positive: crowded seeds make the unconstrained solution swing to large
    # negative and positive amplitudes, so solve the non-negative problem instead
    # (min |R A - d| with G = R^T R, R^T d = b, by scipy's NNLS)
    from scipy.optimize import nnls

    try:
        R = linalg.cholesky(G, check_finite=False)
        return nnls(R, linalg.solve_triangular(R, b, trans="T", check_finite=False))[0]
    except (linalg.LinAlgError, RuntimeError):
        return np.maximum(A, 0.0)


def _prune(P: np.ndarray, A: np.ndarray, floor: np.ndarray, merge_A: float):
    """Drop atoms below their floor; merge pairs closer than ``merge_A`` (heaviest first)."""
    keep = A >= floor
    P, A = P[keep], A[keep]
    if len(A) < 2:
        return P, A
    from scipy.spatial import cKDTree

    pairs = cKDTree(P).query_pairs(merge_A, output_type="ndarray")
    if not len(pairs):
        return P, A
    alive = np.ones(len(A), bool)
    for i, j in pairs[np.argsort(-(A[pairs[:, 0]] + A[pairs[:, 1]]))]:
        if alive[i] and alive[j]:
            w = A[i] + A[j]
            if w > 0:
                P[i] = (A[i] * P[i] + A[j] * P[j]) / w
            A[i] = w
            alive[j] = False
    return P[alive], A[alive]


def _dedupe(cand: np.ndarray, P: np.ndarray, merge_A: float, strength: np.ndarray | None = None):
    """Candidates (strongest first) farther than ``merge_A`` from the atoms ``P`` and from a
    stronger candidate; with ``strength`` given, ``(candidates, their strengths)``."""
    from scipy.spatial import cKDTree

    if not len(cand):
        return cand if strength is None else (cand, strength)
    if len(P):
        d, _ = cKDTree(P).query(cand)
        cand = cand[d > merge_A]
        strength = None if strength is None else strength[d > merge_A]
    keep: list[int] = []
    tree = cKDTree(cand) if len(cand) else None
    taken = np.zeros(len(cand), bool)
    for i in range(len(cand)):  # strongest first
        if taken[i]:
            continue
        keep.append(i)
        taken[tree.query_ball_point(cand[i], merge_A)] = True
    return cand[keep] if strength is None else (cand[keep], strength[keep])


def _new_candidates(cand: np.ndarray, strength: np.ndarray, P: np.ndarray, merge_A: float,
                    relative: float) -> np.ndarray:
    """The candidates (strongest first) a round tries: none within ``merge_A`` of a fitted atom
    ``P`` or of a stronger candidate, and of those only the ones of at least ``relative`` times
    the strongest. The cut is taken after the candidates near fitted atoms are dropped: the
    residual peak of a misfit atom must not silence the light atoms elsewhere (a lattice of
    CsReF6 on the validation split lost every F that way)."""
    if not len(cand):
        return cand
    cand, strength = _dedupe(cand, P, merge_A, strength)
    return cand[strength >= relative * strength[0]] if len(cand) else cand


def _check_field(M: np.ndarray, grid: Grid) -> np.ndarray:
    M = np.asarray(M)
    if M.shape != (grid.n,) * 3:
        raise FieldError(f"density field of shape {M.shape} is not ({grid.n}, {grid.n}, {grid.n})")
    F = M.astype(np.float64) * grid.peak_scale
    if not np.all(np.isfinite(F)):
        raise FieldError(f"density field holds {int((~np.isfinite(F)).sum())} NaN or infinite voxels")
    if F.size and F.max() <= 0 and F.min() < 0:
        raise FieldError("density field is negative everywhere: not a density (Eq. 1 is a sum of positive Gaussians)")
    return F


_BLAS = None


def _one_blas_thread():
    """Context manager: BLAS on one thread. The fit's matrices are small (N x n), and a
    multi-threaded OpenBLAS beside torch's OpenMP pool is 5-6x slower on them (measured)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def fit_atoms(M: np.ndarray, grid: Grid, representation: str = "unit_cell",
              settings: FitSettings = DEFAULT_FIT, keep_outside: bool = False) -> Atoms:
    """Atoms of a density field by least-squares fitting of Eq. 1 (module docstring).

    Args:
        M: (n, n, n) density field in Eq. 1 units (a true field M or a decoded M_hat).
        grid: its :class:`Grid` (voxel centres at ``(i + 0.5) h``, sigma of Eq. 1).
        representation: ``"unit_cell"`` (atoms inside the cube) or ``"repeating_lattice"``
            (atoms outside the cube are fitted too, since their Gaussians reach it).
        settings: :class:`FitSettings` (``DECODED_FIT`` for decoded fields).
        keep_outside: also return the fitted atoms outside the cube (lattice only).

    Returns:
        :class:`Atoms` with ``positions`` (K, 3) float64 Å in the cube frame, ``Z`` (K,)
        int64 = the rounded amplitude clipped to 1..z_max, ``amplitude`` (K,) float64 (the
        Z estimate) and ``amplitude_sigma`` (K,) float64 its standard error. No atoms for
        an all-zero field.

    Raises:
        FieldError: wrong shape, NaN/inf voxels, or a field negative everywhere.
    """
    F = _check_field(M, grid)
    s = float(settings.width_scale)
    if s == 1.0:
        with _one_blas_thread():
            return _fit(F, grid, representation, settings, keep_outside)
    # a blurred field (a decoded M_hat): Gaussians of width s sigma; an atom's integral, and
    # so its Z, is the fitted peak height times s^3
    from dataclasses import replace

    wide = replace(grid, sigma=grid.sigma * s)
    with _one_blas_thread():
        a = _fit(F, wide, representation, replace(settings, min_amplitude=settings.min_amplitude / s**3,
                                                   outside_sigmas=settings.outside_sigmas / s), keep_outside)
    amp, sig = a.amplitude * s**3, a.amplitude_sigma * s**3
    return Atoms(a.positions, np.clip(np.rint(amp), 1, settings.z_max).astype(np.int64), None, amp, sig)


def _fit(F: np.ndarray, grid: Grid, representation: str, settings: FitSettings, keep_outside: bool) -> Atoms:
    sig, L = grid.sigma, grid.length
    c = grid.centres()
    if representation == "repeating_lattice":
        lo, hi = -settings.outside_sigmas * sig, L + settings.outside_sigmas * sig
    elif representation == "unit_cell":
        lo, hi = -settings.edge_A, L + settings.edge_A
    else:
        raise ValueError(f"unknown representation {representation!r}")
    if F.max() <= 0.5 * settings.min_amplitude:
        return _result(np.zeros((0, 3)), np.zeros(0), np.zeros(0), L, keep_outside)
    tie = representation == "repeating_lattice" and settings.tie_lattice
    close: list = []  # ties that nearly explained the field (a pseudo-cell): the last resort
    lattices: list = []  # the field's own lattices (its self-overlap), tried first
    near: list = []  # quick seeds' ties that explain the field but not exactly: the best is kept
    if tie:
        from .lattice_overlap import overlap_lattices

        lattices = overlap_lattices(F, grid)
    for rounds, iters in (zip(settings.tie_seed_rounds, settings.tie_seed_iter) if tie else ()):
        # a quick free fit is enough to find the lattice and seed the tie; kept only when the
        # tied atoms explain the field, else a longer seed, and last the full free fit, decide
        from dataclasses import replace

        quick = replace(settings, max_rounds=rounds, verify_passes=0, max_iter=iters)
        P, A, r, H = _free_fit(F, grid, quick, c, lo, hi, representation)
        tied = _tied(F, grid, P, A, r, hi - L, settings, True, keep_outside, close, lattices, near)
        if tied is not None:
            return tied
    if near:  # no quick seed tied exactly: the closest tie that explains the field
        return _tied_atoms(min(near, key=lambda t: t.rss), L, keep_outside, settings.z_max)
    P, A, r, H = _free_fit(F, grid, settings, c, lo, hi, representation)
    if tie and len(A):
        tied = _tied(F, grid, P, A, r, hi - L, settings, False, keep_outside, close, lattices)
        if tied is not None:
            return tied
    if tie and close:  # every tie failed: refine the closest one untied
        from .lattice_fit import polish_closest

        polished = polish_closest(F, grid, close, hi - L)
        if polished is not None:
            return _tied_atoms(polished, L, keep_outside, settings.z_max)
    if len(A):  # the free fit's normal equations, for its amplitudes' standard errors
        gb, dgb = _basis(P, c, sig)
        H, _ = _normal_equations(r, A, gb, dgb)
    sigA = _amplitude_sigma(H, r, len(A))
    return _result(P, A, sigA, L, keep_outside, settings.z_max)


def _free_fit(F: np.ndarray, grid: Grid, settings: FitSettings, c: np.ndarray, lo: float, hi: float,
              representation: str):
    """Detection rounds, convergence and verify passes of every atom on its own (module
    docstring): (P (N, 3) Å, A (N,), residual, H or None), atoms below the floor removed."""
    sig = grid.sigma
    P, A = np.zeros((0, 3)), np.zeros(0)
    state = (P, A, F, None, float(np.vdot(F, F)))
    for _pass in range(settings.verify_passes + 1):
        found = _rounds(F, grid, settings, state, c, lo, hi, first=_pass == 0, representation=representation)
        if found is None:  # the converged state's residual holds no atom: done
            break
        P, A, r, H, rss = found
        if len(A) and settings.max_iter > settings.round_iter:  # converge the chosen atoms
            P, A, r, H = _refine(F, P, A, c, sig, lo, hi, settings.max_iter)
            rss = float(np.vdot(r, r))
        state = (P, A, r, H, rss)
    P, A, r, H, rss = state
    low = A < settings.min_amplitude  # (a state kept as best is pruned already; belt and braces)
    if low.any():
        P, A = P[~low], A[~low]
        r = F - field_model(P, A, grid) if len(A) else F
    return P, A, r, H


def _tied(F: np.ndarray, grid: Grid, P: np.ndarray, A: np.ndarray, r: np.ndarray, reach: float,
          settings: FitSettings, explained: bool, keep_outside: bool, close: list | None = None,
          lattices: list | None = None, near: list | None = None) -> Atoms | None:
    """The lattice-tied atoms of a free fit (:func:`crystalstudio.core.lattice_fit.tie_if_better`)
    as :class:`Atoms`, or None; ``explained``: only a tie that explains the field; ``close``
    collects the ties that nearly did, ``near`` those that explain it but not exactly;
    ``lattices`` are tried first."""
    if not len(A):
        return None
    from .lattice_fit import tie_if_better

    tied = tie_if_better(F, grid, P, A, float(np.vdot(r, r)), reach, settings.min_amplitude, explained=explained,
                         close=close, lattices=lattices, near=near)
    return None if tied is None else _tied_atoms(tied, grid.length, keep_outside, settings.z_max)


def _tied_atoms(tied, length: float, keep_outside: bool, z_max: int) -> Atoms:
    """The atoms of a :class:`~crystalstudio.core.lattice_fit.TiedFit` (every image, kept inside
    the cube up to its ``edge_A`` unless ``keep_outside``)."""
    return _result(tied.positions, tied.image_amplitudes, tied.image_sigma, length, keep_outside, z_max,
                   edge=tied.edge_A)


def _rounds(F: np.ndarray, grid: Grid, settings: FitSettings, state: tuple, c: np.ndarray, lo: float, hi: float,
            first: bool, representation: str = "unit_cell"):
    """Detection rounds (add candidates, refine ``round_iter`` iterations, prune) from ``state``
    = (P, A, residual, H, rss); returns the best state by the BIC rule, or None when no round
    improved on ``state`` (so a converged ``state`` is final)."""
    sig = grid.sigma
    P, A, r, H, rss = state
    best, improved = state, False
    thresh = 0.5 * settings.min_amplitude
    # the lattice's images outside the cube are weakly constrained and converge slowly
    # without being wrong: a stalled round there still needs its iterations
    stall = settings.round_stall if representation == "unit_cell" else 0.0
    limit = settings.max_atoms  # candidates per round; halved after a round that did not pay
    reach = settings.outside_sigmas * sig if representation == "repeating_lattice" else 0.0
    for _round in range(settings.max_rounds):
        initial = first and _round == 0
        if initial and 0.0 < settings.sharpen_A < sig and representation == "unit_cell":
            cand, strength = _sharp_candidates(r, grid, thresh, settings.sharpen_A, settings.sharpen_lambda)
        else:
            cand, strength = (_candidates(r, grid, thresh, 0.0, settings.laplacian, reach) if initial else
                              _candidates(r, grid, settings.detect * settings.min_amplitude, settings.noise_k,
                                          settings.laplacian, reach))
        cand = _new_candidates(cand, strength, P, settings.merge_A, 0.0 if initial else settings.relative)
        cand = cand[:max(min(limit, settings.max_atoms - len(P)), 0)]
        if not len(cand):
            break
        P = np.concatenate([P, cand])
        A = _amplitudes(F, P, c, sig)
        it = min(settings.round_iter, settings.max_iter)
        P, A, r, H = _refine(F, P, A, c, sig, lo, hi, it, stall=stall)
        for _ in range(len(A) + 1):  # remove what fell below the floor, refit what is left
            P2, A2 = _prune(P.copy(), A.copy(), settings.min_amplitude, settings.merge_A)
            if len(A2) == len(A):
                break
            P, A = P2, A2
            if len(A):
                P, A, r, H = _refine(F, P, A, c, sig, lo, hi, it, stall=stall)
            else:
                r, H = F, None
        rss = float(np.vdot(r, r))
        # stopping rule (BIC): a round must lower the residual energy by more than
        # ln(voxels) noise variances per new parameter, else the residual holds no more atoms
        s2 = rss / max(r.size - 4 * len(A), 1)
        extra = 4 * max(len(A) - len(best[1]), 1)
        if rss < best[4] - extra * np.log(r.size) * s2 and rss < best[4] * (1 - 1e-6):
            best, improved = (P, A, r, H, rss), True
        elif len(cand) > 1 and settings.backoff:  # back to the best state; fewer, stronger candidates
            P, A, r, H, rss = best
            limit = max(1, len(cand) // 2)
        else:
            break
    return best if (improved or first) else None


def _amplitude_sigma(H: np.ndarray | None, r: np.ndarray, N: int) -> np.ndarray:
    """Standard errors of the amplitudes, ``s sqrt([H^-1]_AA)``, s^2 = RSS / (voxels - 4N)."""
    if N == 0 or H is None or H.shape[0] != 4 * N:
        return np.zeros(N)
    dof = max(r.size - 4 * N, 1)
    s2 = float(np.vdot(r, r)) / dof
    try:  # the amplitude block of H^-1 by Cholesky; pseudo-inverse if H is singular
        E = np.eye(4 * N, N)
        Hinv_diag = np.einsum("ii->i", linalg.cho_solve(linalg.cho_factor(H, check_finite=False), E,
                                                        check_finite=False)[:N])
    except (linalg.LinAlgError, ValueError):
        try:
            Hinv_diag = np.diag(linalg.pinvh(H))[:N]
        except (linalg.LinAlgError, ValueError):
            return np.full(N, np.inf)
    return np.sqrt(np.maximum(Hinv_diag, 0.0) * s2)


def _result(P, A, sigA, L, keep_outside, z_max: int = 94, edge: float = 0.02) -> Atoms:
    # an atom on a face (the cell origin at the cube's corner) may be fitted 1e-5 Å outside
    inside = np.all((P >= -edge) & (P <= L + edge), axis=1) if len(P) else np.zeros(0, bool)
    if not keep_outside:
        P, A, sigA = P[inside], A[inside], sigA[inside]
    Z = np.clip(np.rint(A), 1, z_max).astype(np.int64)
    return Atoms(P.astype(np.float64), Z, None, amplitude=A.astype(np.float64),
                 amplitude_sigma=np.asarray(sigA, np.float64))
