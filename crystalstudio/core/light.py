"""Light atoms from a decoder's light-atom field L (a deviation from the paper; issue 13).

A Z-weighted field (Eq. 1) draws H at 1/8 and Li at 3/8 of an O's height, usually on the tail
of a heavier neighbour 1-2 Å away: a decoder trained on M alone does not draw them, and the
fit of a decoded M_hat (amplitude floor 6, :data:`~crystalstudio.core.fit.DECODED_FIT`) cannot
read them. A checkpoint with ``ModelConfig.light_channel`` decodes a second field,
L = Eq. 1 of the atoms with Z <= ``light_z_max`` alone, each weighted by ``light_gain`` x Z
(:func:`~crystalstudio.core.density.light_field`). There a light atom stands alone, so the
same least-squares fit reads it (:func:`fit_light`), and :func:`merge_light` adds those atoms
to the ones read from M_hat.

Reconstructing a given field, the latent refinement (:mod:`crystalstudio.core.refine`) fits
the decoder's two outputs to the input's M and to its L (:func:`refine_problem`); the input's L
comes from the exact Eq. 1 fit of the input M (:func:`light_target`), so nothing but the field
is needed. On 24 validation crystals (session 16) this found more atoms, exact counts and
light atoms than refining on M alone (docs/cpu_recipe.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from .density import Grid, light_field
from .fit import DECODED_FIT, DEFAULT_FIT, UNET_GATE, fit_atoms, fit_decoded, species_from_amplitude
from .segment import Atoms

__all__ = ["LIGHT_FIT", "LIGHT_MIN_SEPARATION", "fit_light", "merge_light", "atoms_with_light", "heavy_field",
           "decoded_atoms", "light_target", "refine_problem"]

#: fit settings of L / gain (amplitudes in Z units): the decoded-field settings with an
#: amplitude floor of half an H and a merge distance below the shortest light-light pairs
#: (H-H in a water molecule 1.5 Å)
LIGHT_FIT = replace(DECODED_FIT, min_amplitude=0.5, merge_A=1.0)
#: a light atom closer than this (Å) to an atom read from M_hat is taken to be that atom. Chosen
#: on the validation split (session 16, runs/light17, 165 crystals, refined on [M, L]): 0.3 / 0.5 /
#: 0.7 / 0.9 / 1.1 Å gave a mean of atoms within 0.5 Å, exact count and species of 0.740 / 0.738 /
#: 0.735 / 0.734 / 0.730; 0.5, the match tolerance, so one true atom is not read twice within it
LIGHT_MIN_SEPARATION = 0.5


def fit_light(L_hat: np.ndarray, grid: Grid, gain: float, z_max: int, representation: str = "unit_cell",
              settings=LIGHT_FIT, species_prior: np.ndarray | None = None) -> Atoms:
    """Light atoms of a decoded light-atom field.

    Args:
        L_hat: (n, n, n) float light-atom field (Eq. 1 units, each atom weighted gain x Z).
        grid: its :class:`Grid`. gain, z_max: the checkpoint's ``light_gain`` and ``light_z_max``.
        settings: :class:`~crystalstudio.core.fit.FitSettings` for ``L_hat / gain``.
        species_prior: (K,) training-split counts of each Z (the checkpoint's ``species_prior``)
            or None.

    Returns:
        :class:`Atoms` with ``amplitude`` in Z units (the fit of ``L_hat / gain``) and Z read
        from it: without a prior the rounded amplitude clipped to 1..z_max, with one the
        maximum a posteriori Z in 1..z_max (:func:`~crystalstudio.core.fit.species_from_amplitude`,
        width :data:`~crystalstudio.core.fit.SPECIES_PRIOR_SD`). The prior was chosen on the
        validation split (session 17, runs/light18, 165 crystals): species exact 69.9% -> 71.8%
        of the matched atoms, the mean of the three Sec. 4.1 measures 0.745 -> 0.751; a light
        amplitude reads low, and H and Li, far more frequent than He and Be, take the
        in-between amplitudes.

    Raises:
        FieldError: as :func:`~crystalstudio.core.fit.fit_atoms`.
        ValueError: gain not positive.
    """
    if not gain > 0:
        raise ValueError(f"light-field gain must be positive, got {gain!r}")
    a = fit_atoms(np.asarray(L_hat, np.float32) / np.float32(gain), grid, representation, settings)
    Z = species_from_amplitude(a.amplitude, species_prior, z_max=z_max) if len(a) else a.Z
    return Atoms(a.positions, Z, None, a.amplitude, a.amplitude_sigma)


def merge_light(atoms: Atoms, light: Atoms, min_separation: float = LIGHT_MIN_SEPARATION) -> Atoms:
    """``atoms`` (read from M_hat) plus the ``light`` atoms farther than ``min_separation`` Å from
    all of them (a nearer one is the same atom, read in both fields; M_hat's reading stays).

    Returns:
        :class:`Atoms`: ``atoms`` first, then the light atoms kept; ``voxels`` None;
        amplitudes (Z units) kept where both carry them.
    """
    if len(light) == 0:
        return atoms
    keep = np.ones(len(light), bool)
    if len(atoms):
        d = np.linalg.norm(light.positions[:, None, :] - atoms.positions[None, :, :], axis=2)
        keep = d.min(1) > min_separation
    if not keep.any():
        return atoms

    def cat(a, b):
        return None if a is None or b is None else np.concatenate([a, b[keep]])

    return Atoms(np.concatenate([atoms.positions, light.positions[keep]]),
                 np.concatenate([atoms.Z, light.Z[keep]]).astype(np.int64), None,
                 cat(atoms.amplitude, light.amplitude), cat(atoms.amplitude_sigma, light.amplitude_sigma))


def atoms_with_light(atoms: Atoms, L_hat: np.ndarray | None, grid: Grid, config, representation: str = "unit_cell",
                     min_separation: float = LIGHT_MIN_SEPARATION, species_prior: np.ndarray | None = None) -> Atoms:
    """``atoms`` with the light atoms of ``L_hat`` merged in (:func:`fit_light`, :func:`merge_light`);
    ``atoms`` unchanged when ``L_hat`` is None. ``config``: the checkpoint's
    :class:`~crystalstudio.core.models.ModelConfig` (its ``light_gain``, ``light_z_max``);
    ``species_prior``: as :func:`fit_light`."""
    if L_hat is None:
        return atoms
    light = fit_light(L_hat, grid, config.light_gain, config.light_z_max, representation,
                      species_prior=species_prior)
    return merge_light(atoms, light, min_separation)


def heavy_field(M_hat: np.ndarray, L_hat: np.ndarray, gain: float) -> np.ndarray:
    """The heavy atoms' share of a decoded field: ``max(M_hat - L_hat / gain, 0)``.

    A true field is M = M_heavy + L / gain (L weights each light atom by ``gain`` x Z, Eq. 1
    otherwise), so the light atoms' density, which inflates a heavy neighbour's fitted
    amplitude (LiF's F read as Na), is taken out before the heavy atoms are fitted.

    Args: M_hat, L_hat: (..., n, n, n) float Eq. 1 units and light-field units; gain: the
    checkpoint's ``light_gain`` (> 0).
    Returns: float32, the shape of ``M_hat``.
    Raises: ValueError: the shapes differ or ``gain`` is not positive.
    """
    M_hat, L_hat = np.asarray(M_hat, np.float32), np.asarray(L_hat, np.float32)
    if M_hat.shape != L_hat.shape:
        raise ValueError(f"light field shape {L_hat.shape} differs from the field's {M_hat.shape}")
    if not gain > 0:
        raise ValueError(f"light gain must be positive, got {gain!r}")
    return np.maximum(M_hat - L_hat / np.float32(gain), 0, dtype=np.float32)


def decoded_atoms(M_hat: np.ndarray, probs: np.ndarray, L_hat: np.ndarray | None, grid: Grid, config,
                  representation: str = "unit_cell", gate: float = UNET_GATE, refined: bool = False,
                  species_prior: np.ndarray | None = None, light_subtract: bool = False) -> Atoms:
    """The atoms of a decoded field and its light-atom field, as the app reads them.

    Heavy atoms by :func:`~crystalstudio.core.fit.fit_decoded` (Eq. 1 fit, species and gating by
    the U-Net's ``probs``) of ``M_hat``, or of :func:`heavy_field` when ``light_subtract``,
    ``refined`` and ``L_hat`` is given; then the light atoms of ``L_hat`` merged in
    (:func:`atoms_with_light`). The U-Net's ``probs`` are always those of ``M_hat`` as decoded.

    Only a field decoded from a refined latent is subtracted: its L_hat was fitted to the input's
    L. An encoder's L_hat holds spurious light blobs, and subtracting them takes density from
    real heavy atoms. Validation split, the default checkpoint (165 crystals; atoms within 0.5 Å,
    exact count, species): refined 86.9 / 66.7 / 71.8% -> 87.2 / 66.1 / 74.6% (session 18),
    encoder's mu alone 71.1 / 42.4 / 26.4% -> 67.3 / 41.8 / 22.1% (session 21).

    Args:
        M_hat: (n, n, n) float32 decoded field (Eq. 1 units). probs: (classes, n, n, n) float32
            U-Net softmax of ``M_hat``. L_hat: (n, n, n) float32 light-atom field, or None.
        config: the checkpoint's :class:`~crystalstudio.core.models.ModelConfig`.
        gate, refined, species_prior: as :func:`~crystalstudio.core.fit.fit_decoded`.
        light_subtract: fit a refined field's heavy atoms on ``M_hat - L_hat / light_gain`` (the
            checkpoint's ``light_subtract``; docs/refine.md).
    Returns: :class:`~crystalstudio.core.segment.Atoms` with amplitudes.
    Raises: FieldError: as :func:`~crystalstudio.core.fit.fit_atoms`.
    """
    subtract = light_subtract and refined and L_hat is not None
    M_fit = heavy_field(M_hat, L_hat, config.light_gain) if subtract else M_hat
    atoms = fit_decoded(M_fit, probs, grid, representation, gate, refined, species_prior)
    return atoms_with_light(atoms, L_hat, grid, config, representation, species_prior=species_prior)


def light_target(M: np.ndarray, grid: Grid, config) -> np.ndarray:
    """The light-atom field L of a *true* field M (unit cell): its atoms by the exact Eq. 1 fit
    (:func:`~crystalstudio.core.fit.fit_atoms`, :data:`~crystalstudio.core.fit.DEFAULT_FIT`,
    which finds every atom of a true field, H included), then
    :func:`~crystalstudio.core.density.light_field` of those with Z <= ``config.light_z_max``.

    Args: M (n, n, n) float Eq. 1 units; config: the checkpoint's ModelConfig.
    Returns: (n, n, n) float32.
    Raises: FieldError: as :func:`~crystalstudio.core.fit.fit_atoms`.
    """
    a = fit_atoms(np.asarray(M, np.float32), grid, "unit_cell", DEFAULT_FIT)
    return light_field(torch.as_tensor(a.positions)[None], torch.as_tensor(a.Z)[None], grid, config.light_gain,
                       config.light_z_max)[0].numpy()


def refine_problem(vae, M: torch.Tensor, grid: Grid) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """``(decode, target)`` for :func:`~crystalstudio.core.refine.refine_latent` of fields M
    (B, n, n, n): for a decoder with a light channel, decode(z[, c]) -> (R, 2, n, n, n) stacks
    M_hat and L_hat and the target stacks M and :func:`light_target` of each M, so the latent
    is fitted to both; otherwise ``(vae.decode, M)``."""
    if not getattr(vae.cfg, "light_channel", False):
        return vae.decode, M
    L = np.stack([light_target(Mk, grid, vae.cfg) for Mk in M.detach().float().cpu().numpy()])
    target = torch.stack([M, torch.as_tensor(L, dtype=M.dtype, device=M.device)], 1)

    def decode(z, cond=None):
        M_hat, L_hat = vae.decode_fields(z, cond)
        return torch.stack([M_hat, L_hat], 1)

    return decode, target
