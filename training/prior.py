"""``python -m training fit-prior``: fit the aggregate-posterior prior of a checkpoint.

Encodes every training crystal (``--rotations`` random rotations each, the same
augmentation the VAE was trained with), fits scikit-learn ``GaussianMixture`` models on
the encoded means mu, and keeps the one with the highest mean log-likelihood on the
*validation* crystals' means (never the test split). The chosen mixture is written into
the checkpoint as :class:`crystalstudio.core.prior.LatentPrior` (tensors ``prior.*``,
settings in the ``prior`` metadata; weights unchanged). Conditional models (Sec. 4.5)
also get the quantiles of the training crystals' largest densities.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from crystalstudio.core.checkpoint import MAX_BYTES, CrystalModel, attach_prior, load_checkpoint, update_metadata
from crystalstudio.core.prior import LatentPrior

from .data import CrystalArrays, cube_rotations, random_origins, voxelise

__all__ = ["encode_means", "fit_prior", "species_counts", "add_arguments", "run"]

#: candidates tried: (components, covariance type)
CANDIDATES = tuple((k, c) for c in ("diag", "full") for k in (1, 2, 4, 8, 16, 32))


@torch.no_grad()
def encode_means(model: CrystalModel, data: CrystalArrays, idx: np.ndarray, rotations: int, seed: int,
                 batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Encoded means of crystals ``idx`` under ``rotations`` random rotations each.

    Returns:
        (mu (N, latent) float32, largest density of each field (N,) float32, atoms in each
        field (N,) int64, elements in each field (N,) int64), N = len(idx) * rotations.
    """
    rng = np.random.default_rng(seed)
    rep = np.repeat(np.asarray(idx), rotations)
    mus, peaks, counts, nel = [], [], [], []
    net = model.net.eval()
    for s in range(0, len(rep), batch):
        b = rep[s:s + batch]
        rots = cube_rotations(data, b, model.grid, rng, model.representation)
        origins = (random_origins(data, b, rots, rng) if model.representation == "repeating_lattice" else None)
        M, _, _, Zp = voxelise(data, b, model.grid, rots, model.device, model.representation, origins)
        Zp = np.asarray(Zp.cpu() if hasattr(Zp, "cpu") else Zp)
        counts += [int((z > 0).sum()) for z in Zp]
        nel += [len(np.unique(z[z > 0])) for z in Zp]
        top = M.flatten(1).amax(1)
        mu, _ = net.vae.encode(M, top if model.config.conditional else None)
        mus.append(mu.float().cpu().numpy())
        peaks.append(top.float().cpu().numpy())
    return np.concatenate(mus), np.concatenate(peaks), np.asarray(counts, np.int64), np.asarray(nel, np.int64)


def species_counts(data: CrystalArrays, n_classes: int) -> dict:
    """The species prior of a checkpoint: how often each Z occurs among the atoms of the
    training split's cells (``species_prior`` metadata, read by
    :func:`crystalstudio.core.fit.species_from_amplitude`).

    Returns:
        ``{"counts": [n_classes ints, Z = 0..n_classes - 1], "what": ..., "n_crystals": ...}``.

    Raises:
        ValueError: the data have no training crystals, or a Z >= n_classes.
    """
    tr = data.indices("train")
    if not len(tr):
        raise ValueError("the data have no training crystals to count species in")
    Z = np.concatenate([data.Z[data.offsets[i]:data.offsets[i + 1]] for i in tr]).astype(np.int64)
    if Z.max() >= n_classes:
        raise ValueError(f"the training crystals hold Z = {int(Z.max())}, the model has {n_classes} classes")
    return {"counts": np.bincount(Z, minlength=n_classes).tolist(), "n_crystals": int(len(tr)),
            "what": "atoms of each Z in the training split's cells (species prior of refined reconstructions)"}


def _size_ok(model: CrystalModel, k: int, cov: str) -> bool:
    """Whether the checkpoint stays under 16 MiB with this mixture beside the weights."""
    d = model.latent
    prior_bytes = 4 * k * (1 + d + (d * d if cov == "full" else d))
    return model.path.stat().st_size + prior_bytes < MAX_BYTES - 65536


def fit_prior(model: CrystalModel, data: CrystalArrays, rotations: int = 4, seed: int = 0,
              candidates=CANDIDATES, log=print) -> tuple[LatentPrior, list[dict]]:
    """Fit candidates on the training means, choose by validation log-likelihood.

    Returns:
        (the chosen prior, one row per candidate: components, covariance, train and val
        mean log-likelihood in nats per crystal).

    Raises:
        ValueError: the data have no training or no validation crystals.
    """
    from sklearn.mixture import GaussianMixture

    tr, va = data.indices("train"), data.indices("val")
    if not len(tr) or not len(va):
        raise ValueError("the data need training and validation crystals to fit a prior")
    t0 = time.time()
    mu_tr, peak_tr, count_tr, nel_tr = encode_means(model, data, tr, rotations, seed)
    mu_va, _, _, _ = encode_means(model, data, va, rotations, seed + 1)
    log(f"encoded {len(mu_tr)} training and {len(mu_va)} validation fields in {time.time() - t0:.0f} s")
    rows, best = [], None
    for k, cov in candidates:
        if k * 4 > len(mu_tr) or not _size_ok(model, k, cov):
            continue
        g = GaussianMixture(k, covariance_type=cov, reg_covar=1e-4, max_iter=300, n_init=1, random_state=seed)
        g.fit(mu_tr.astype(np.float64))
        row = {"n_components": k, "covariance_type": cov, "train_loglik": float(g.score(mu_tr)),
               "val_loglik": float(g.score(mu_va)), "converged": bool(g.converged_)}
        rows.append(row)
        log(f"  {k:3d} {cov:4s}  train {row['train_loglik']:10.1f}  val {row['val_loglik']:10.1f} nats")
        if best is None or row["val_loglik"] > best[0]["val_loglik"]:
            best = (row, g)
    row, g = best
    if g.covariance_type == "diag":
        scale = np.sqrt(g.covariances_)
    else:
        scale = np.linalg.cholesky(g.covariances_)
    cq = (np.quantile(peak_tr, np.linspace(0, 1, 101)).astype(np.float32) if model.config.conditional else None)
    info = {"fitted_on": "encoded means mu of the training split", "rotations_per_crystal": rotations,
            "n_fields": int(len(mu_tr)), "chosen_by": "validation mean log-likelihood",
            "val_loglik": row["val_loglik"], "train_loglik": row["train_loglik"], "seed": seed,
            "library": "scikit-learn GaussianMixture", "candidates": rows,
            "reference": {"what": "the training fields the prior was fitted on (validity measures)",
                          "atom_counts": np.bincount(count_tr).tolist(),
                          "n_elements": np.bincount(nel_tr).tolist(),
                          "formulas": sorted({str(f) for f in data.formula[tr]})}}
    return LatentPrior(g.weights_, g.means_, scale, cq, info), rows


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="checkpoint to fit the prior of")
    p.add_argument("--data", default="data/mp.npz", help="prepared .npz with the checkpoint's splits")
    p.add_argument("--out", default="", help="write here instead of rewriting the checkpoint in place")
    p.add_argument("--rotations", type=int, default=4, help="random rotations per training crystal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default="", help="also write the candidate table here")
    p.add_argument("--species-only", action="store_true",
                   help="only (re)write the species prior (training-split counts of each Z); keep the latent prior")
    return p


def run(a: argparse.Namespace) -> dict:
    """Fit, choose, write; returns the chosen prior's metadata."""
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint, jit=False)
    data = CrystalArrays.load(a.data)
    grid = CrystalArrays.load_grid(a.data)
    if grid != model.grid:
        raise ValueError(f"{a.checkpoint}: trained on {model.grid}, the data are on {grid}")
    species = species_counts(data, model.config.n_classes)
    if getattr(a, "species_only", False):
        path = update_metadata(a.checkpoint, {"species_prior": species}, a.out or None)
        print(f"species prior of {species['n_crystals']} training crystals written to {path}")
        return {"species_prior": species}
    prior, rows = fit_prior(model, data, a.rotations, a.seed)
    path = attach_prior(a.checkpoint, prior, a.out or None, {"species_prior": species})
    _, meta = prior.to_tensors()
    print(f"prior: {prior.n_components} {prior.covariance_type} Gaussian(s), val log-likelihood "
          f"{meta['val_loglik']:.1f} nats, written to {path}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    return meta
