"""Held-out evaluation: the Sec. 4.1 / 4.2 / 4.4 measures of Hoffmann et al. 2019.

For each crystal: representation 1 with a rotation fixed by the seed, encode (posterior
mean), decode, segment, then compare atoms (:func:`crystalstudio.core.metrics.match_atoms`)
and voxels (MSE in Eq. 1 units). Needs only numpy/scipy/torch (runs on the GPU machine).

:func:`evaluate` is the compact table used during training. The harness
(``python -m training.evaluate``, or ``python -m training evaluate``) adds everything
behind the paper's figures and writes it to one JSON file (optionally PNG figures, see
:mod:`training.figures`)::

    python -m training.evaluate --checkpoint runs/m.safetensors --data data/mp.npz \\
        --split test --json eval.json --figures figs/ [--seed 0] [--limit N] [--draws 200]

``--data`` takes a prepared ``.npz`` or CSV files in the CDVAE layout (a ``cif`` column)
/ CIF folders, converted in memory with :func:`training.data.prepare`, so a crystal's
split is the same hash of its reduced formula as in training (``--val``/``--test`` must
be the fractions given to ``prepare``; defaults are prepare's).

JSON (all fractions in [0, 1], distances in Å, deterministic for a seed):

* run: ``checkpoint``, ``representation``, ``grid``, ``latent``, ``checkpoint_steps``,
  ``weights_sha256`` (:func:`~crystalstudio.core.checkpoint.weights_fingerprint`), ``data``,
  ``split``, ``seed``, ``limit``, ``tol_A``, ``draws``, ``n_split`` (crystals in the split
  before ``--limit``), ``split_ids_sha1``, ``split_matches_checkpoint_test_ids``;
* the :func:`aggregate` table at top level (``n_crystals``, ``atoms_within_tol``, ...,
  ``voxel_mse``) and ``error_percentiles_A``;
* ``counts`` (Fig. 3B/4D): ``pairs`` [[true, predicted], ...] per crystal, ``exact``,
  ``within2``, ``mean_abs_diff``;
* ``distances`` (Fig. 3D/4C): ``true_to_pred`` and ``pred_to_true``, each with ``n``,
  ``n_no_partner`` (the other side empty), ``within_tol``, ``percentiles`` (5 .. 99) and
  ``hist`` (``edges``, ``counts``, ``overflow``);
* ``species`` (Fig. 3C/4E, 4B): over matched true atoms ``n_matched``, ``exact``,
  ``within2``, ``wrong`` (fractions) and ``pairs`` [[true Z, predicted Z, count], ...];
  per voxel ``voxel_top1_accuracy`` and ``voxel_top1_accuracy_atoms`` (U-Net argmax on the
  decoded field against S, all voxels / voxels with an atom);
* ``voxel_mse_stats`` (Fig. 4A): per-crystal MSE ``mean`` and ``percentiles``, ``hist``;
* ``random_draws`` (Fig. 9A): z ~ N(0, I) from the seed, decoded and segmented; nearest
  neighbour distances between segmented atoms vs between the true atoms of the evaluated
  crystals (same cube frame, no periodic images) and of their reconstructions:
  ``nn_hist`` (``edges``, ``draws``, ``real``, ``reconstructed``), ``atoms_per_draw``,
  ``frac_empty``, ``frac_draws_with_close_pair`` (two atoms closer than ``close_A``),
  ``frac_nn_below_close_draws`` / ``_real``, ``nn_percentiles_draws`` / ``_real``;
* ``error_budget``: where atoms are lost, per stage (:data:`STAGES`): ``true_field_peaks``
  (are the atoms separate local maxima of the true M at this sigma?), ``unet_on_true_M``
  (the U-Net alone, on the true field) and ``full`` (the model); each with
  ``atoms_within_tol``, ``pred_within_tol``, ``exact_count``, ``species_accuracy``,
  ``median_error_A``, ``n_pred_atoms``;
* ``per_crystal``: ``id``, ``formula``, ``n_true``, ``n_pred``, ``true_matched``, ``voxel_mse``.

Wall times are kept out of the JSON, so that it is byte-for-byte the same for a seed; the
``fit_on_true_M`` fits' times (median, 95th percentile, longest, total; a fit read back from
``--fit-cache`` keeps the time it took when it ran) are printed to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from crystalstudio.core.checkpoint import CheckpointError, CrystalModel, load_checkpoint, weights_fingerprint
from crystalstudio.core.density import Grid, random_rotations
from crystalstudio.core.latent import random_latents
from crystalstudio.core.metrics import aggregate, match_atoms
from crystalstudio.core.models import CrystalNet, kl_divergence, max_density
from crystalstudio.core.refine import REFINE_LR, frozen, learning_rates, refine_latent
from crystalstudio.core.fit import DECODED_FIT, DEFAULT_FIT, UNET_GATE, fit_atoms
from crystalstudio.core.light import atoms_with_light, decoded_atoms, refine_problem
from crystalstudio.core.segment import density_peaks, species_map_to_atoms

from .data import SPLITS, CrystalArrays, cube_rotations, voxelise
from .fit_cache import FitCache, timed_fit

__all__ = ["evaluate", "evaluate_model", "error_budget", "peak_separability", "STAGES", "format_table", "harness", "load_data", "run", "main", "add_arguments",
           "HarnessError", "PERCENTILES"]

PERCENTILES = (5, 25, 50, 75, 95, 99)
DIST_EDGES = [round(0.05 * i, 2) for i in range(61)]  # 0 .. 3 Å, matching distances
NN_EDGES = [round(0.1 * i, 1) for i in range(81)]  # 0 .. 8 Å, interatomic spacings
CLOSE_A = 0.5  # Fig. 9A: atoms closer than this are unphysical


class HarnessError(ValueError):
    """A one-line reason the harness cannot run (missing data, empty split, ...)."""


def _submit_true_fit(M: np.ndarray, grid: Grid, representation: str, pool: Executor | None,
                     cache: FitCache | None) -> Future:
    """Start the budget's fit of one true field: a Future of ``(Atoms, seconds)``, ``seconds``
    the fit's wall time when it ran. A fit stored in ``cache`` is returned done (with the time it
    took then); with ``pool`` the fit runs there and is stored in ``cache`` as soon as it
    finishes; without one it runs here, now, and is stored. The field is hashed once."""
    key = cache.key(M, grid, representation, DEFAULT_FIT) if cache is not None else None
    hit = cache.get(key) if cache is not None else None
    if hit is None and pool is not None:
        fut = pool.submit(timed_fit, M, grid, representation, DEFAULT_FIT)
        if cache is not None:
            def store(f: Future, key: str = key) -> None:
                if not f.cancelled() and f.exception() is None:
                    cache.put(key, *f.result())

            fut.add_done_callback(store)
        return fut
    if hit is None:
        hit = timed_fit(M, grid, representation, DEFAULT_FIT)
        if cache is not None:
            cache.put(key, *hit)
    done: Future = Future()
    done.set_result(hit)
    return done


def _reconstructions(net: CrystalNet, data: CrystalArrays, idx: np.ndarray, grid: Grid, seed: int, batch: int,
                     device, tol: float, kls: list, voxel: np.ndarray | None = None,
                     representation: str = "unit_cell", stages: dict | None = None, atoms: str = "fit",
                     gate: float = UNET_GATE, refine_steps: int = 0, species_prior: np.ndarray | None = None,
                     refine_lr: float | tuple[float, ...] = REFINE_LR, true_fit_limit: int = 0,
                     pool: Executor | None = None, fit_cache: FitCache | None = None,
                     fit_seconds: list | None = None, light_subtract: bool = False, lattice_fold: bool = False):
    """Yield ``(match, mse, true_pos, true_Z, atoms)`` per crystal of ``idx``, in order.

    ``refine_steps`` > 0: the model's M_hat is decoded from the encoder's mu refined by that
    many Adam steps at ``refine_lr`` (one rate or a multi-start,
    :func:`~crystalstudio.core.refine.refine_latent`, as the app does); the
    error budget then keeps the encoder-only rows (``*_on_decoded_M``) and adds
    ``*_on_refined_M``.

    ``atoms``: how the model's atoms are read from M_hat, ``"fit"`` (Eq. 1 least squares,
    species from the U-Net), ``"unet"`` (the paper's argmax + connected components) or
    ``"fit-amplitude"`` (the fit alone, Z from its amplitude: a measure of the VAE that does
    not depend on the U-Net, used by the learning curve of VAE-only runs).

    KL per dimension (B, latent) of each batch is appended to ``kls``; when ``voxel`` is
    given, ``[correct, voxels, correct atom voxels, atom voxels]`` of the U-Net's argmax
    against S are added to it. When ``stages`` is given, the :data:`STAGES` matches of each
    crystal are appended to ``stages[name]`` (see :func:`error_budget`). ``true_fit_limit`` > 0:
    the Eq. 1 fit of the true M (the ``fit_on_true_M`` stages; 2-100 s per repeating-lattice
    field) runs on the first that many crystals only; with ``pool`` (an executor of worker
    processes) those fits run there, a batch ahead of the rest of the budget; with ``fit_cache``
    each finished fit is stored as it completes and a stored one is not run again
    (:mod:`training.fit_cache`). The wall time (s) of each true-M fit, as measured when it ran,
    is appended to ``fit_seconds``. ``light_subtract``: the heavy atoms of a field decoded from a
    refined latent with a light-atom field are fitted on M_hat - L_hat / gain
    (:func:`~crystalstudio.core.light.decoded_atoms`). ``lattice_fold``: each decoded
    repeating-lattice field (encoder-only and refined alike) is averaged over its own lattice's
    images before the U-Net and the fit read it
    (:func:`~crystalstudio.core.lattice_fold.fold_decoded`); the voxel MSE is of the field as
    decoded.
    """
    fit_seconds = [] if fit_seconds is None else fit_seconds
    rot = cube_rotations(data, idx, grid, seed, representation)
    for s in range(0, len(idx), batch):
        b = idx[s:s + batch]
        # representation 2 is evaluated with the cube starting at the cell origin
        M, S, P, Zp = voxelise(data, b, grid, rot[s:s + batch], device, representation)
        true_fits = {}
        if stages is not None:
            M_np = M.float().cpu().numpy().reshape(len(b), *(grid.n,) * 3)
            for k in range(len(b)):
                if not true_fit_limit or s + k < true_fit_limit:
                    true_fits[k] = _submit_true_fit(M_np[k], grid, representation, pool, fit_cache)
        cond = max_density(M) if net.cfg.conditional else None  # Sec. 4.5: the input's own maximum
        mu, logvar = net.vae.encode(M, cond)
        kls.append(kl_divergence(mu, logvar).cpu())
        Mh, Lh = Mh_enc, Lh_enc = net.vae.decode_fields(mu, cond)
        if refine_steps > 0:
            decode, target = refine_problem(net.vae, M.reshape(len(b), *(grid.n,) * 3), grid)
            with frozen(net.vae):
                z = refine_latent(decode, target, mu, refine_steps, refine_lr, cond=cond)
            Mh, Lh = net.vae.decode_fields(z, cond)
        mse = ((Mh - M) ** 2).flatten(1).mean(1).cpu().tolist()
        if lattice_fold:  # the encoder-only field is read again only by the error budget
            Mh = folded_fields(Mh, grid)
            Mh_enc = Mh if refine_steps <= 0 else (folded_fields(Mh_enc, grid) if stages is not None else Mh_enc)
        Lh_np = [None] * len(b) if Lh is None else Lh.float().cpu().numpy()
        Lh_enc_np = [None] * len(b) if Lh_enc is None else Lh_enc.float().cpu().numpy()
        logits = net.unet(Mh)
        species_t = logits.argmax(1)
        probs = torch.softmax(logits.float(), 1).cpu().numpy() if (atoms == "fit" or stages is not None) else None
        if voxel is not None:
            ok, atom = species_t == S, S > 0
            voxel += np.array([int(ok.sum()), ok.numel(), int((ok & atom).sum()), int(atom.sum())], np.int64)
        species = species_t.cpu().numpy()
        Mh_np = Mh.float().cpu().numpy()
        if stages is not None:
            species_true_M = net.unet(M.reshape(len(b), *(grid.n,) * 3)).argmax(1).cpu().numpy()
            if refine_steps > 0:  # the encoder-only rows beside the refined ones
                logits_enc = net.unet(Mh_enc)
                species_enc = logits_enc.argmax(1).cpu().numpy()
                probs_enc = torch.softmax(logits_enc.float(), 1).cpu().numpy()
                Mh_enc_np = Mh_enc.float().cpu().numpy()
        for k in range(len(b)):
            keep = Zp[k] > 0
            tp, tz = P[k][keep], Zp[k][keep]
            unet_atoms = species_map_to_atoms(species[k], grid, Mh_np[k])
            fit_dec = (decoded_atoms(Mh_np[k], probs[k], Lh_np[k], grid, net.cfg, representation, gate,
                                     refine_steps > 0, species_prior, light_subtract)
                       if probs is not None else None)
            if atoms == "fit-amplitude":  # the VAE alone: no U-Net vote, Z from the fitted amplitude
                found = atoms_with_light(fit_atoms(Mh_np[k], grid, representation, DECODED_FIT), Lh_np[k], grid,
                                         net.cfg, representation, species_prior=species_prior)
            else:
                found = fit_dec if atoms == "fit" else unet_atoms
            if stages is not None:
                if refine_steps > 0:
                    stages.setdefault("unet_on_refined_M", []).append(
                        match_atoms(tp, tz, unet_atoms.positions, unet_atoms.Z, tol))
                    stages.setdefault("fit_on_refined_M", []).append(
                        match_atoms(tp, tz, fit_dec.positions, fit_dec.Z, tol))
                    unet_atoms = species_map_to_atoms(species_enc[k], grid, Mh_enc_np[k])
                    fit_dec = decoded_atoms(Mh_enc_np[k], probs_enc[k], Lh_enc_np[k], grid, net.cfg, representation,
                                            gate, species_prior=species_prior)  # encoder-only: never subtracted
                stages.setdefault("unet_on_decoded_M", []).append(
                    match_atoms(tp, tz, unet_atoms.positions, unet_atoms.Z, tol))
                stages.setdefault("fit_on_decoded_M", []).append(match_atoms(tp, tz, fit_dec.positions, fit_dec.Z, tol))
                if k in true_fits:
                    fit_true, seconds = true_fits[k].result()
                    fit_seconds.append(seconds)
                    stages.setdefault("fit_on_true_M", []).append(
                        match_atoms(tp, tz, fit_true.positions, fit_true.Z, tol))
                    stages.setdefault("fit_on_true_M_0.1A", []).append(
                        match_atoms(tp, tz, fit_true.positions, fit_true.Z, 0.1))
                on_true = species_map_to_atoms(species_true_M[k], grid, M_np[k])
                stages.setdefault("unet_on_true_M", []).append(match_atoms(tp, tz, on_true.positions, on_true.Z, tol))
                peaks = _field_peaks(M_np[k], grid)
                stages.setdefault("true_field_peaks", []).append(
                    match_atoms(tp, tz, peaks, np.zeros(len(peaks), np.int64), tol))
            yield match_atoms(tp, tz, found.positions, found.Z, tol), mse[k], tp, tz, found


def folded_fields(Mh: torch.Tensor, grid: Grid) -> torch.Tensor:
    """:func:`~crystalstudio.core.lattice_fold.fold_decoded` of a batch of decoded fields, as a
    tensor of their dtype on their device."""
    from crystalstudio.core.lattice_fold import fold_decoded

    F = fold_decoded(Mh.detach().float().cpu().numpy(), grid)
    return torch.as_tensor(F, device=Mh.device).to(Mh.dtype)


#: the error budget's stages, from the representation to the full model (see error_budget)
STAGES = {
    "true_field_peaks": "local maxima of the true M above Z 0.5 (the representation: are the atoms separate "
                        "peaks at this sigma?)",
    "unet_on_true_M": "the U-Net segmenting the true M (the segmentation stage alone)",
    "fit_on_true_M": "the Eq. 1 least-squares fit of the true M, Z from the amplitude (the atom fit alone)",
    "fit_on_true_M_0.1A": "the same, atoms matched within 0.1 Å instead of tol",
    "unet_on_decoded_M": "the U-Net segmenting the decoded M_hat (the paper's path: encode, decode, segment)",
    "fit_on_decoded_M": "the Eq. 1 fit of the decoded M_hat, species and gating by the U-Net (encoder's mu alone)",
    "unet_on_refined_M": "the U-Net segmenting M_hat decoded from the refined latent (encode, refine z, decode)",
    "fit_on_refined_M": "the Eq. 1 fit of M_hat decoded from the refined latent, species by the U-Net "
                        "(the app's default)",
    "full": "the model as evaluated (the --atoms method on the decoded M_hat)",
}


def _field_peaks(M: np.ndarray, grid: Grid, min_Z: float = 0.5) -> np.ndarray:
    """Sub-voxel local maxima of ``M`` whose height in Z units (M x peak_scale) exceeds ``min_Z``."""
    peaks = density_peaks(M, grid, rel=0.0)
    if not len(peaks):
        return peaks
    v = np.clip(np.floor(peaks / grid.spacing).astype(int), 0, grid.n - 1)
    return peaks[M[v[:, 0], v[:, 1], v[:, 2]] * grid.peak_scale > min_Z]


def peak_separability(data: CrystalArrays, idx: np.ndarray, sigmas: list[float], grid: Grid = Grid(),
                      seed: int = 0, batch: int = 16, tol: float = 0.5) -> list[dict]:
    """The representation's own limit, per Gaussian width: how many atoms are separate local
    maxima of the true density field M (Eq. 1) at each sigma (no model involved).

    Each crystal is voxelised as representation 1 with the harness's rotations for ``seed``
    on ``grid`` with its sigma replaced; the peaks (:func:`_field_peaks`) are matched to the
    true atoms (:func:`~crystalstudio.core.metrics.match_atoms`, ``tol`` Å). Overlapping
    Gaussians merge (a light atom ~2 Å from a heavy one is a shoulder at sigma 1 Å) or pull
    each other's maxima off the atoms, which no segmentation by maxima can undo.

    Returns:
        one dict per sigma: ``sigma`` (Å), ``atoms_within_tol``, ``pred_within_tol``,
        ``exact_count``, ``median_error_A``, ``n_crystals``, ``n_true_atoms``.
    Raises:
        ValueError: a sigma that is not > 0.
    """
    rot = cube_rotations(data, idx, grid, seed)
    out = []
    for sigma in sigmas:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 Å, not {sigma}")
        g = Grid(grid.n, grid.length, float(sigma), grid.species_radius)
        per = []
        for s in range(0, len(idx), batch):
            M, _, P, Zp = voxelise(data, idx[s:s + batch], g, rot[s:s + batch], "cpu", "unit_cell")
            M = M.numpy().reshape(-1, *(g.n,) * 3)
            for k in range(len(M)):
                keep = Zp[k] > 0
                peaks = _field_peaks(M[k], g)
                per.append(match_atoms(P[k][keep], Zp[k][keep], peaks, np.zeros(len(peaks), np.int64), tol))
        agg = aggregate(per)
        out.append({"sigma": float(sigma), **{k: agg.get(k) for k in (
            "atoms_within_tol", "pred_within_tol", "exact_count", "median_error_A", "n_crystals", "n_true_atoms")}})
    return out


def error_budget(stages: dict, full: list[dict]) -> dict:
    """Where atoms are lost, stage by stage (same crystals, same rotations).

    Args:
        stages: ``{"true_field_peaks": [...], "unet_on_true_M": [...]}`` per-crystal
            :func:`~crystalstudio.core.metrics.match_atoms` results (``_reconstructions``).
        full: the per-crystal results of the whole model.

    Returns:
        ``{stage: {"what", "atoms_within_tol", "pred_within_tol", "exact_count",
        "species_accuracy", "median_error_A", "n_pred_atoms", "n_crystals"}}`` for the
        :data:`STAGES` (``n_crystals`` is fewer than the run's for the true-M fit under
        ``--true-fit-limit``); the peaks stage carries no species (``None``).
    """
    out = {}
    for name, what in STAGES.items():
        if name != "full" and name not in stages:
            continue  # e.g. the refined rows of a run without refinement
        per = full if name == "full" else stages[name]
        agg = aggregate(per)
        row = {"what": what, **{k: agg.get(k) for k in ("atoms_within_tol", "pred_within_tol", "exact_count",
                                                          "species_accuracy", "median_error_A")}}
        row["n_pred_atoms"] = int(sum(r["n_pred"] for r in per))
        row["n_crystals"] = len(per)
        if name == "true_field_peaks":
            row["species_accuracy"] = None
        out[name] = row
    return out


def _table(per: list[dict], mse: list[float], kls: list, latent: int) -> dict:
    res = aggregate(per, mse)
    kl = torch.cat(kls).mean(0).numpy() if kls else np.zeros(latent)
    res["latent_kl"] = [round(float(v), 5) for v in kl]
    res["latent_rank"] = [int(i) for i in np.argsort(-kl, kind="stable")]
    d = np.concatenate([r["d_true"] for r in per]) if per else np.zeros(0)
    d = d[np.isfinite(d)]
    if len(d):
        res["error_percentiles_A"] = {str(p): float(np.percentile(d, p)) for p in (50, 90, 95, 99)}
    return res


@torch.no_grad()
def evaluate(net: CrystalNet, data: CrystalArrays, idx: np.ndarray, grid: Grid, seed: int = 0,
             batch: int = 16, device: str | torch.device = "cpu", tol: float = 0.5,
             representation: str = "unit_cell", atoms: str = "fit", gate: float = UNET_GATE) -> dict:
    """Sec. 4.1 table over crystals ``idx`` plus the per-dimension mean KL (atoms read by
    ``atoms``: "fit" or "unet", see :func:`_reconstructions`).

    Returns:
        dict: the :func:`aggregate` measures, ``latent_kl`` (latent,) list of mean KL per
        dimension in nats, ``latent_rank`` (dimensions sorted by decreasing KL) and
        ``error_percentiles_A`` (50/90/95/99th percentile of the true -> predicted distance).
    """
    was_training = net.training
    net.eval()
    per, mse, kls = [], [], []
    try:
        for r, e, *_ in _reconstructions(net, data, idx, grid, seed, batch, device, tol, kls,
                                             representation=representation, atoms=atoms, gate=gate):
            per.append(r)
            mse.append(e)
    finally:
        net.train(was_training)
    return _table(per, mse, kls, net.cfg.latent)


def evaluate_model(model: CrystalModel, data: CrystalArrays, split: str = "test", seed: int = 0,
                   limit: int | None = None) -> dict:
    """Evaluate a loaded checkpoint on one split of a prepared ``.npz``."""
    idx = data.indices(split)
    if limit:
        idx = idx[:limit]
    return evaluate(model.net, data, idx, model.grid, seed, device=model.device,
                    representation=model.representation, gate=model.unet_gate)


# ----------------------------------------------------------------------------- harness

def _pct(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return {str(p): (float(np.percentile(x, p)) if len(x) else None) for p in PERCENTILES}


def _hist(x: np.ndarray, edges: list[float]) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    counts, _ = np.histogram(x, np.asarray(edges))
    return {"edges": list(edges), "counts": counts.tolist(), "underflow": int((x < edges[0]).sum()),
            "overflow": int((x > edges[-1]).sum())}


def _frac(num: float, den: float):
    return float(num) / float(den) if den else None


def _nn_distances(pos: np.ndarray) -> np.ndarray:
    """Distance from each atom to its nearest other atom (no periodic images), Å."""
    pos = np.asarray(pos, np.float64).reshape(-1, 3)
    if len(pos) < 2:
        return np.zeros(0)
    d, _ = cKDTree(pos).query(pos, k=2)
    return d[:, 1]


def _direction(d: np.ndarray, tol: float) -> dict:
    d = np.asarray(d, np.float64)
    fin = np.isfinite(d)
    return {"n": int(len(d)), "n_no_partner": int((~fin).sum()), "within_tol": _frac((d <= tol).sum(), len(d)),
            "percentiles": _pct(d), "hist": _hist(d, DIST_EDGES)}


@torch.no_grad()
def _random_draws(model: CrystalModel, n: int, seed: int, batch: int, method: str = "fit") -> dict:
    """Decode n draws z ~ N(0, I) (Sec. 4.4), atoms read by ``method`` (:func:`_latent_atoms`);
    per-draw atom counts and NN distances."""
    z = random_latents(n, model.latent, seed)
    counts, nn, close = [], [], []
    for atoms in _latent_atoms(model, z, None, method, batch):
        d = _nn_distances(atoms.positions)
        counts.append(len(atoms))
        nn.append(d)
        close.append(bool((d < CLOSE_A).any()))
    return {"counts": np.asarray(counts, np.int64), "nn": np.concatenate(nn) if nn else np.zeros(0),
            "close": np.asarray(close, bool)}


def _reference_Z(model: CrystalModel, data: CrystalArrays, n: int, seed: int) -> list[np.ndarray]:
    """Atomic numbers of the atoms in each of up to ``n`` training fields as the model sees
    them (rotated cell, or the cube of the lattice at the cell origin): a list of (N_i,) int."""
    tr = data.indices("train")
    b = np.random.default_rng(seed).choice(tr, size=min(n, len(tr)), replace=False)
    _, _, _, Zp = voxelise(data, b, model.grid, cube_rotations(data, b, model.grid, seed, model.representation), "cpu",
                         model.representation)
    return [z[z > 0] for z in np.asarray(Zp)]


def _reference_fields(model: CrystalModel, data: CrystalArrays, n: int, seed: int) -> tuple:
    """(atom counts, numbers of elements, reduced formulas) of up to ``n`` training fields
    as the model sees them (:func:`_reference_Z`)."""
    Zs = _reference_Z(model, data, n, seed)
    return (np.array([len(z) for z in Zs], np.int64), np.array([len(np.unique(z)) for z in Zs]),
            {str(f) for f in data.formula[data.indices("train")]})


def _latent_atoms(model: CrystalModel, z: np.ndarray, cond, method: str, batch: int) -> list:
    """Atoms of the fields decoded from latent vectors z (B, latent) as the app reads a draw:
    :meth:`CrystalModel.decode_fields`, then :meth:`CrystalModel.segment_draws` by ``method``
    (the checkpoint's ``draw_gate`` and ``draw_light``). ``cond``: (B,) conditions or None."""
    out = []
    for s in range(0, len(z), batch):
        c = None if cond is None else cond[s:s + batch]
        M, L = model.decode_fields(z[s:s + batch], c)
        out += model.segment_draws(M, L, method)
    return out


def _atoms_of(model: CrystalModel, z: np.ndarray, cond, method: str, batch: int) -> list[tuple]:
    return [(a.positions, a.Z) for a in _latent_atoms(model, z, cond, method, batch)]


@torch.no_grad()
def draws_block(model: CrystalModel, data: CrystalArrays, test_idx: np.ndarray, n: int, seed: int,
                method: str = "fit", batch: int = 16) -> dict:
    """Validity of ``n`` seeded draws from each prior and of interpolation midpoints.

    Returns:
        ``{"standard": report, "aggregate": report or None, "midpoints": report,
        "reference": {...}}`` with :func:`crystalstudio.io.validity.validity_report` dicts;
        midpoints are z = (mu_a + mu_b) / 2 of consecutive pairs of test crystals (t = 0.5).
    """
    from crystalstudio.core.prior import draw_latents
    from crystalstudio.io.validity import validity_report

    counts, nel, forms = _reference_fields(model, data, 1000, seed)
    out = {"n": n, "seed": seed, "atoms_method": method,
           "reference": {"fields": int(len(counts)), "mean_atoms": float(counts.mean()) if len(counts) else None,
                         "what": "training-split fields (rotated, seeded) as the model sees them"}}
    for name, prior in (("standard", None), ("aggregate", model.prior)):
        if name == "aggregate" and prior is None:
            out[name] = None
            continue
        z = draw_latents(n, model.latent, seed, prior)
        cond = prior.sample_cond(n, seed) if (prior is not None and model.config.conditional) else None
        out[name] = validity_report(_atoms_of(model, z, cond, method, batch), counts, nel, forms)
    zm, cm = midpoint_latents(model, data, test_idx, n, seed + 1, batch)
    out["midpoints"] = validity_report(_atoms_of(model, zm, cm, method, batch), counts, nel, forms) if len(zm) else None
    return out


@torch.no_grad()
def midpoint_latents(model: CrystalModel, data: CrystalArrays, idx: np.ndarray, n: int, seed: int,
                     batch: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """Interpolation midpoints (t = 0.5) between consecutive pairs of crystals ``idx``.

    Up to ``n`` pairs (idx[0], idx[1]), (idx[2], idx[3]), ... are voxelised under
    ``random_rotations(2 * pairs, seed)`` and encoded; a midpoint is z = (mu_a + mu_b) / 2
    (and, for a conditional checkpoint, the mean of the two max densities).

    Returns:
        ``(z, cond)``: (pairs, latent) float32 and (pairs,) float32 or None (not conditional);
        (0, latent) with fewer than two crystals.
    """
    pairs = np.asarray(idx)[: 2 * min(n, len(idx) // 2)].reshape(-1, 2)
    if not len(pairs):
        return np.zeros((0, model.latent), np.float32), None
    flat = pairs.reshape(-1)
    M, _, _, _ = voxelise(data, flat, model.grid, random_rotations(len(flat), seed), model.device,
                          model.representation)
    top = max_density(M)
    mus = torch.cat([model.net.vae.encode(M[s:s + batch], top[s:s + batch] if model.config.conditional else None)[0]
                     for s in range(0, len(flat), batch)]).float().cpu().numpy()
    zm = 0.5 * (mus[0::2] + mus[1::2])
    cm = 0.5 * (top[0::2] + top[1::2]).float().cpu().numpy() if model.config.conditional else None
    return zm, cm


@torch.no_grad()
def harness(model: CrystalModel, data: CrystalArrays, idx: np.ndarray, seed: int = 0, draws: int = 200,
            tol: float = 0.5, batch: int = 16, atoms: str = "fit", budget: bool = True,
            refine_steps: int = 0, refine_lr: float | tuple[float, ...] | None = None,
            true_fit_limit: int = 0, fit_workers: int = 1, fit_cache: str | Path | None = None) -> dict:
    """All measures of the module docstring over crystals ``idx`` (no run metadata).

    Deterministic for a given seed: rotations are ``cube_rotations(data, idx, grid, seed)`` and
    draws ``random_latents(draws, latent, seed)``; the ``validity`` block (:func:`draws_block`) draws as many from each prior.
    ``refine_lr`` None: the model's own (:attr:`CrystalModel.refine_lr`). ``true_fit_limit`` > 0:
    the budget's fit of the true M on the first that many crystals only; ``fit_workers`` > 1:
    those fits run in that many worker processes (the results do not change); ``fit_cache``: a
    :class:`~training.fit_cache.FitCache` file that stores each of those fits as it finishes and
    supplies the ones stored by an earlier run of the same fitting code (the results do not change).
    """
    net = model.net
    was_training = net.training
    net.eval()
    per, mse, kls, rows, fit_seconds = [], [], [], [], []
    voxel = np.zeros(4, np.int64)
    stages: dict | None = {} if budget else None
    dt, dp, nn_real, nn_rec, zpairs = [], [], [], [], []
    pool = (ProcessPoolExecutor(fit_workers, mp_context=get_context("spawn"))
            if budget and fit_workers > 1 else None)
    cache = FitCache(fit_cache) if (budget and fit_cache) else None
    if cache is not None:
        print(f"fit cache {cache.path}: {len(cache)} stored fits"
              + (f", {cache.skipped} unreadable lines skipped" if cache.skipped else ""), file=sys.stderr)
    try:
        recs = _reconstructions(net, data, idx, model.grid, seed, batch, model.device, tol, kls, voxel,
                                model.representation, stages, atoms, model.unet_gate, refine_steps,
                                model.species_prior, model.refine_lr if refine_lr is None else refine_lr,
                                true_fit_limit, pool, cache, fit_seconds, model.light_subtract,
                                model.lattice_fold)
        for i, (r, e, tp, tz, found) in zip(idx, recs):
            per.append(r)
            mse.append(e)
            dt.append(r["d_true"])
            dp.append(r["d_pred"])
            nn_real.append(_nn_distances(tp))
            nn_rec.append(_nn_distances(found.positions))
            m = r["d_true"] <= tol
            if m.any():  # species of the nearest predicted atom, as in match_atoms
                _, j = cKDTree(found.positions).query(tp[m])
                zpairs.append(np.stack([tz[m], found.Z[j]], 1))
            rows.append({"id": str(data.ids[i]), "formula": str(data.formula[i]), "n_true": int(r["n_true"]),
                         "n_pred": int(r["n_pred"]), "true_matched": int(r["true_matched"]), "voxel_mse": float(e)})
        res = _table(per, mse, kls, model.latent)
        res.pop("latent_kl")
        res.pop("latent_rank")
        if stages is not None:
            res["error_budget"] = error_budget(stages, per)
            print(fit_time_line(fit_seconds), file=sys.stderr)

        nt = np.array([r["n_true"] for r in rows], np.int64)
        npred = np.array([r["n_pred"] for r in rows], np.int64)
        res["counts"] = {"pairs": np.stack([nt, npred], 1).tolist(), "exact": _frac((nt == npred).sum(), len(nt)),
                         "within2": _frac((np.abs(nt - npred) <= 2).sum(), len(nt)),
                         "mean_abs_diff": float(np.abs(nt - npred).mean()) if len(nt) else None}
        res["distances"] = {"tol_A": tol, "true_to_pred": _direction(np.concatenate(dt), tol),
                            "pred_to_true": _direction(np.concatenate(dp), tol)}
        zp = np.concatenate(zpairs) if zpairs else np.zeros((0, 2), np.int64)
        dz = np.abs(zp[:, 0] - zp[:, 1])
        uniq, cnt = np.unique(zp, axis=0, return_counts=True) if len(zp) else (np.zeros((0, 2), int), [])
        res["species"] = {
            "n_matched": int(len(zp)), "exact": _frac((dz == 0).sum(), len(dz)),
            "within2": _frac((dz <= 2).sum(), len(dz)), "wrong": _frac((dz > 2).sum(), len(dz)),
            "pairs": [[int(a), int(b), int(c)] for (a, b), c in zip(uniq, cnt)],
            "voxel_top1_accuracy": _frac(voxel[0], voxel[1]), "voxel_top1_accuracy_atoms": _frac(voxel[2], voxel[3]),
        }
        e = np.asarray(mse, np.float64)
        pos = e[e > 0]
        lo, hi = (np.floor(np.log10(pos.min())), np.ceil(np.log10(pos.max()))) if len(pos) else (-3.0, 0.0)
        edges = np.logspace(lo, max(hi, lo + 1), 31).tolist()
        res["voxel_mse_stats"] = {"mean": float(e.mean()) if len(e) else None, "percentiles": _pct(e),
                                  "hist": _hist(e, edges), "units": "Eq. 1 density squared, mean over voxels"}

        nn_real = np.concatenate(nn_real) if nn_real else np.zeros(0)
        nn_rec = np.concatenate(nn_rec) if nn_rec else np.zeros(0)
        rd = {"n": int(draws), "seed": int(seed), "close_A": CLOSE_A,
              "frame": "cube (representation 1), no periodic images"}
        dr = _random_draws(model, draws, seed, batch, atoms) if draws > 0 else None
        nn_draws = dr["nn"] if dr else np.zeros(0)
        rd["nn_hist"] = {"edges": NN_EDGES, "draws": _hist(nn_draws, NN_EDGES)["counts"],
                         "real": _hist(nn_real, NN_EDGES)["counts"],
                         "reconstructed": _hist(nn_rec, NN_EDGES)["counts"],
                         "overflow": {"draws": int((nn_draws > NN_EDGES[-1]).sum()),
                                      "real": int((nn_real > NN_EDGES[-1]).sum()),
                                      "reconstructed": int((nn_rec > NN_EDGES[-1]).sum())}}
        rd["n_nn"] = {"draws": int(len(nn_draws)), "real": int(len(nn_real)), "reconstructed": int(len(nn_rec))}
        rd["atoms_per_draw"] = ({"mean": float(dr["counts"].mean()), "percentiles": _pct(dr["counts"])}
                                if dr else {"mean": None, "percentiles": _pct([])})
        rd["frac_empty"] = _frac((dr["counts"] == 0).sum(), draws) if dr else None
        rd["frac_draws_with_close_pair"] = _frac(dr["close"].sum(), draws) if dr else None
        rd["frac_nn_below_close_draws"] = _frac((nn_draws < CLOSE_A).sum(), len(nn_draws))
        rd["frac_nn_below_close_real"] = _frac((nn_real < CLOSE_A).sum(), len(nn_real))
        rd["nn_percentiles_draws"] = _pct(nn_draws)
        rd["nn_percentiles_real"] = _pct(nn_real)
        res["random_draws"] = rd
        if draws > 0:
            res["validity"] = draws_block(model, data, idx, draws, seed, atoms, batch)
        res["per_crystal"] = rows
    finally:
        net.train(was_training)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return res


def _clean(x):
    """JSON-safe copy: numpy -> Python, floats to 7 significant digits, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.7g}") if np.isfinite(x) else None
    return x


def load_data(paths: list[str], grid: Grid, val: float = 0.05, test: float = 0.10) -> CrystalArrays:
    """A prepared ``.npz``, or CSV files / CIF folders converted in memory with ``prepare``.

    Raises:
        HarnessError: a missing file or no usable crystal.
    """
    paths = [str(p) for p in paths]
    for p in paths:
        if not Path(p).exists():
            raise HarnessError(f"{p}: no such data file")
    if len(paths) == 1 and paths[0].lower().endswith(".npz"):
        try:
            return CrystalArrays.load(paths[0])
        except Exception as exc:  # zip / key errors of a foreign file
            raise HarnessError(f"{paths[0]}: not a prepared crystal .npz ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    if any(p.lower().endswith(".npz") for p in paths):
        raise HarnessError("give one prepared .npz, or CSV files / CIF folders (not both)")
    from .data import prepare

    with tempfile.TemporaryDirectory(prefix="crystalstudio-eval-") as tmp:
        out = Path(tmp) / "eval.npz"
        try:
            prepare(paths, str(out), grid, val, test)
        except ValueError as exc:
            if "at least one array" in str(exc):
                raise HarnessError(f"{', '.join(paths)}: no usable crystal") from None
            raise
        except KeyError as exc:
            raise HarnessError(f"{', '.join(paths)}: CSV without a {exc} column") from None
        return CrystalArrays.load(str(out))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The harness's options (shared by ``python -m training evaluate``)."""
    p.add_argument("--checkpoint", required=True, help="crystalstudio .safetensors checkpoint")
    p.add_argument("--data", required=True, nargs="+",
                   help="prepared .npz, or CSV files (cif column) / CIF folders converted like prepare")
    p.add_argument("--split", default="test", choices=list(SPLITS))
    p.add_argument("--limit", type=int, default=0, help="first N crystals of the split (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rotations and the random draws")
    p.add_argument("--draws", type=int, default=200,
                   help="random latent draws per prior (Fig. 9A; validity of N(0, I) and aggregate-prior draws, "
                        "and of as many interpolation midpoints)")
    p.add_argument("--tol", type=float, default=0.5, help="atom match distance in Å (paper 0.5)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--atoms", choices=("fit", "unet"), default="fit",
                   help="how the model's atoms are read from M_hat (default fit; the error budget has both)")
    p.add_argument("--no-budget", action="store_true", help="skip the error budget (faster)")
    p.add_argument("--true-fit-limit", type=int, default=0, metavar="N",
                   help="error budget: fit the true M of the first N crystals only (0 = all; a repeating-lattice "
                        "field takes 2-100 s)")
    p.add_argument("--fit-workers", type=int, default=1, metavar="N",
                   help="error budget: fit the true M in N worker processes (same results, faster on N cores)")
    p.add_argument("--fit-cache", default="", metavar="FILE",
                   help="error budget: store each fit of the true M in this JSON-lines file as it finishes, and "
                        "reuse those of an earlier run with the same fitting code (a killed run resumes)")
    p.add_argument("--refine-steps", type=int, default=None, metavar="N",
                   help="Adam steps refining the encoder's latent before decoding, as the app does "
                        "(default: the checkpoint's, as CrystalModel.refine_steps; 0 = the encoder alone)")
    p.add_argument("--refine-lr", default=None, metavar="LR[,LR...]",
                   help="Adam learning rate(s) of the refinement; several (comma-separated) refine each field "
                        "from mu once per rate and keep the best (default: the checkpoint's, as CrystalModel.refine_lr)")
    p.add_argument("--light-subtract", choices=("on", "off"), default=None,
                   help="fit the heavy atoms of a light-channel model's refined fields on M_hat - L_hat / gain "
                        "(default: the checkpoint's light_subtract, as CrystalModel.light_subtract)")
    p.add_argument("--lattice-fold", choices=("on", "off"), default=None,
                   help="for this run, read a repeating-lattice field's atoms after averaging it over its own "
                        "lattice's images (default: the checkpoint's lattice_fold, as CrystalModel.lattice_fold)")
    p.add_argument("--val", type=float, default=0.05, help="validation fraction given to prepare (CSV input)")
    p.add_argument("--test", type=float, default=0.10, help="test fraction given to prepare (CSV input)")
    p.add_argument("--json", default="", help="write the measures to this JSON file")
    p.add_argument("--figures", default="", help="write PNG figures into this folder")
    return p


def run(a: argparse.Namespace) -> dict:
    """Run the harness for parsed options; prints the table, writes JSON / figures.

    Raises:
        CheckpointError: unusable checkpoint (one-line message).
        HarnessError: unusable data or options (one-line message).
    """
    true_fit_limit = getattr(a, "true_fit_limit", 0)
    if a.limit < 0 or a.draws < 0 or a.batch < 1 or not a.tol > 0 or true_fit_limit < 0:
        raise HarnessError("--limit, --draws and --true-fit-limit must be >= 0, --batch >= 1, --tol > 0")
    fit_workers = getattr(a, "fit_workers", 1)
    if fit_workers < 1:
        raise HarnessError("--fit-workers must be >= 1")
    model = load_checkpoint(a.checkpoint, a.device)
    if getattr(a, "light_subtract", None) is not None:  # for this run only; the file is not changed
        model.info["light_subtract"] = a.light_subtract == "on"
    if getattr(a, "lattice_fold", None) is not None:
        model.info["lattice_fold"] = a.lattice_fold == "on"
    refine_steps = model.refine_steps if getattr(a, "refine_steps", None) is None else a.refine_steps
    if refine_steps < 0:
        raise HarnessError("--refine-steps must be >= 0")
    refine_lr = model.refine_lr
    if getattr(a, "refine_lr", None):
        try:
            refine_lr = learning_rates(str(a.refine_lr))
        except ValueError:
            raise HarnessError(f"--refine-lr must be positive numbers separated by commas, got {a.refine_lr!r}") from None
    data = load_data(a.data, model.grid, a.val, a.test)
    full = data.indices(a.split)
    idx = full[: a.limit] if a.limit else full
    if not len(idx):
        raise HarnessError(f"no crystals in the {a.split} split of {' '.join(map(str, a.data))}")
    ids_sha1 = hashlib.sha1("\n".join(sorted(map(str, data.ids[full]))).encode()).hexdigest()
    ck_sha1 = model.info.get("training", {}).get("test_ids_sha1")
    res = {
        "checkpoint": str(a.checkpoint),
        "representation": model.representation,
        "grid": model.grid.to_dict(),
        "latent": model.latent,
        "checkpoint_steps": model.info.get("training", {}).get("steps"),
        "weights_sha256": weights_fingerprint(a.checkpoint),
        "data": [str(p) for p in a.data],
        "split": a.split,
        "seed": a.seed,
        "limit": a.limit or None,
        "true_fit_limit": true_fit_limit or None,
        "tol_A": a.tol,
        "draws": a.draws,
        "atoms_method": a.atoms,
        **{k: v for k, v in model.reading.items() if k not in ("representation", "latent", "refine_lr")},
        "refine_steps": refine_steps,
        "refine_lr": list(refine_lr),  # --refine-lr overrides the file's for this run
        "n_split": int(len(full)),
        "split_ids_sha1": ids_sha1,
        "split_matches_checkpoint_test_ids": (ids_sha1 == ck_sha1) if (a.split == "test" and ck_sha1) else None,
        **harness(model, data, idx, a.seed, a.draws, a.tol, a.batch, a.atoms, not a.no_budget,
                   refine_steps, refine_lr, true_fit_limit, fit_workers, getattr(a, "fit_cache", "") or None),
    }
    res = _clean(res)
    print(format_table(res), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(res, indent=1, allow_nan=False) + "\n"
        with open(a.json, "w") as fh:
            fh.write(text)
        print(f"measures written to {a.json}", file=sys.stderr)
    if a.figures:
        from .figures import make_figures

        files = make_figures(res, a.figures)
        print(f"{len(files)} figures written to {a.figures}", file=sys.stderr)
    return res


def fit_time_line(seconds: list[float]) -> str:
    """One line on the wall times (s) of the ``fit_on_true_M`` fits: median, 95th percentile,
    longest and total (non-finite times, from cache lines without one, are left out)."""
    t = np.asarray(seconds, np.float64)
    t = t[np.isfinite(t)]
    if not len(t):
        return "fit_on_true_M wall time: not measured"
    sec = (lambda x: f"{x:.3g} s" if x < 100 else f"{x:.0f} s")  # noqa: E731
    return (f"fit_on_true_M wall time per crystal (one process, {len(t)} fits): median {sec(np.median(t))}, "
            f"95th percentile {sec(np.percentile(t, 95))}, longest {sec(t.max())}, {t.sum() / 3600:.2f} h in all")


def format_table(res: dict) -> str:
    """A Markdown table of the Sec. 4.1 measures beside the paper's numbers."""
    rows = [
        ("true atoms with a predicted atom within 0.5 Å", "atoms_within_tol", "~99%"),
        ("predicted atoms within 0.5 Å of a true atom", "pred_within_tol", "-"),
        ("crystals with the exact atom count", "exact_count", "~90%"),
        ("crystals within ±2 atoms", "within2_count", "97%"),
        ("species exact (matched atoms)", "species_accuracy", "66%"),
        ("species within ±2 Z (matched atoms)", "species_within2", "98%"),
    ]
    out = ["| measure | crystalstudio | paper (Sec. 4.1) |", "|---|---|---|"]
    for label, key, paper in rows:
        if res.get(key) is not None:
            out.append(f"| {label} | {100 * res[key]:.1f}% | {paper} |")
    if res.get("median_error_A") is not None:
        out.append(f"| median position error | {res['median_error_A']:.3f} Å | - |")
    if res.get("voxel_mse") is not None:
        out.append(f"| voxel MSE (Eq. 1 units) | {res['voxel_mse']:.2e} | - |")
    out.append(f"| held-out crystals | {res.get('n_crystals', 0)} ({res.get('n_true_atoms', 0)} atoms) | - |")
    dr = res.get("validity")
    if dr:
        pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
        num = (lambda v: "-" if v is None else f"{v:.2f}")
        cols = [(k, dr.get(k)) for k in ("standard", "aggregate", "midpoints") if dr.get(k)]
        out += ["", "| draws (validity) | " + " | ".join({"standard": "N(0, I)", "aggregate": "aggregate prior",
                                                          "midpoints": "midpoints t = 0.5"}[k] for k, _ in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for label, key, f in (("structurally valid", "structural_valid", pct),
                              ("compositionally valid (SMACT)", "compositional_valid", pct),
                              ("atoms per draw", "atoms_per_draw", num),
                              ("atom-count Wasserstein", "count_wasserstein", num),
                              ("unique (valid)", "uniqueness", pct), ("novel formula", "novelty", pct)):
            out.append(f"| {label} | " + " | ".join(f(r.get(key)) for _, r in cols) + " |")
    budget = res.get("error_budget")
    if budget:
        out += ["", "| stage (error budget) | atoms within 0.5 Å | exact count | species exact |", "|---|---|---|---|"]
        for name, row in budget.items():
            cells = [("-" if row.get(k) is None else f"{100 * row[k]:.1f}%")
                     for k in ("atoms_within_tol", "exact_count", "species_accuracy")]
            n = row.get("n_crystals")
            label = name if n in (None, res.get("n_crystals")) else f"{name} (first {n} crystals)"
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.evaluate``: exit 0, or 2 with a one-line ``error: ...`` on stderr."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate",
                                description="Held-out measures of Hoffmann et al. 2019 (Sec. 4.1, 4.2, 4.4) "
                                            "of a checkpoint: JSON + optional PNG figures.")
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        run(a)
    except (CheckpointError, HarnessError, OSError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
