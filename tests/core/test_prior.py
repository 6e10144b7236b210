"""crystalstudio.core.prior: Gaussian-mixture draws and densities against direct references,
the round trip through the checkpoint, refusal of a corrupt prior block, seeded draws."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import multivariate_normal

from crystalstudio.core.checkpoint import CheckpointError, attach_prior, load_checkpoint, save_checkpoint
from crystalstudio.core.density import Grid
from crystalstudio.core.latent import random_latents
from crystalstudio.core.models import CrystalNet, ModelConfig
from crystalstudio.core.prior import LatentPrior, PriorError, draw_latents
from crystalstudio.session import Session

TINY = dict(grid_n=12, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), n_classes=12)
GRID = Grid(n=12, length=10.0)
META = {"representation": "unit_cell", "training": {"steps": 1}}


def mixture(D: int = 8, full: bool = True, seed: int = 0) -> LatentPrior:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2, (2, D))
    if full:
        A = rng.normal(0, 0.3, (2, D, D))
        cov = A @ A.transpose(0, 2, 1) + 0.2 * np.eye(D)
        scale = np.linalg.cholesky(cov)
    else:
        scale = rng.uniform(0.3, 1.2, (2, D))
    return LatentPrior([0.3, 0.7], means, scale, cond_quantiles=np.linspace(0.5, 2.0, 11), info={"note": "test"})


def test_draws_follow_the_mixture():
    p = mixture()
    z = p.sample(40000, seed=1)
    assert z.shape == (40000, 8) and z.dtype == np.float32
    C = [p.scale[k].astype(np.float64) @ p.scale[k].T for k in range(2)]
    mean = sum(w * m for w, m in zip(p.weights, p.means.astype(np.float64)))
    cov = sum(w * (c + np.outer(m - mean, m - mean)) for w, c, m in zip(p.weights, C, p.means.astype(np.float64)))
    assert np.allclose(z.mean(0), mean, atol=0.05)
    assert np.allclose(np.cov(z.T), cov, atol=0.12)


def test_temperature_scales_the_spread_about_each_component():
    for full in (True, False):
        p = mixture(full=full)
        z1 = p.sample(2000, seed=3).astype(np.float64)
        assert np.array_equal(p.sample(2000, seed=3, temperature=1.0), p.sample(2000, seed=3))
        z0 = p.sample(2000, seed=3, temperature=0.0).astype(np.float64)
        # tau = 0: every draw is its component's mean (same components as tau = 1, same seed)
        d = np.abs(z0[:, None, :] - p.means[None].astype(np.float64)).max(2)
        assert d.min(1).max() < 1e-5
        k = d.argmin(1)
        zh = p.sample(2000, seed=3, temperature=0.5).astype(np.float64)
        np.testing.assert_allclose(zh - p.means[k], 0.5 * (z1 - p.means[k]), atol=1e-5)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            mixture().sample(3, temperature=bad)


def test_log_density_equals_scipy_reference():
    for full in (True, False):
        p = mixture(full=full)
        z = np.random.default_rng(2).normal(0, 2, (20, 8))
        ref = np.log(sum(w * multivariate_normal(p.means[k], (p.scale[k] @ p.scale[k].T) if full
                                                 else np.diag(p.scale[k] ** 2)).pdf(z)
                         for k, w in enumerate(p.weights)))
        assert np.allclose(p.log_density(z), ref, rtol=1e-5)


def test_seeded_and_standard_draws():
    p = mixture()
    assert np.array_equal(p.sample(5, seed=4), p.sample(5, seed=4))
    assert not np.array_equal(p.sample(5, seed=4), p.sample(5, seed=5))
    assert np.array_equal(draw_latents(6, 8, 3), random_latents(6, 8, 3))  # standard = Sec. 4.4
    c = p.sample_cond(1000, seed=0)
    assert c.min() >= 0.5 and c.max() <= 2.0 and abs(np.median(c) - 1.25) < 0.1
    with pytest.raises(PriorError, match="latent"):
        draw_latents(2, 9, 0, p)


@pytest.mark.parametrize("bad, pattern", [
    (dict(weights=[0.5, 0.6]), "distribution"),
    (dict(weights=[np.nan, 1.0]), "NaN"),
    (dict(scale=-np.ones((2, 8))), "positive"),
    (dict(means=np.zeros((3, 8))), "shape"),
    (dict(scale=np.ones((2, 8, 8))), "lower-triangular"),
    (dict(cond_quantiles=[2.0, 1.0]), "increasing"),
])
def test_inconsistent_priors_refused(bad, pattern):
    kw = dict(weights=[0.3, 0.7], means=np.zeros((2, 8)), scale=np.ones((2, 8)))
    with pytest.raises(PriorError, match=pattern):
        LatentPrior(**{**kw, **bad})


def test_roundtrip_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = CrystalNet(ModelConfig(**TINY)).eval()
    plain = save_checkpoint(tmp_path / "plain.safetensors", net, GRID, META)
    assert load_checkpoint(plain, jit=False).prior is None
    p = mixture()
    path = save_checkpoint(tmp_path / "p.safetensors", net, GRID, META, prior=p)
    m = load_checkpoint(path, jit=False)
    assert m.prior is not None and m.prior.covariance_type == "full" and m.prior.info["note"] == "test"
    for a in ("weights", "means", "scale", "cond_quantiles"):
        assert np.allclose(getattr(m.prior, a), getattr(p, a))
    assert np.array_equal(m.prior.sample(4, 9), p.sample(4, 9))
    # attach_prior rewrites an existing checkpoint; weights are unchanged, removing works too
    attach_prior(plain, mixture(full=False), tmp_path / "q.safetensors")
    q = load_checkpoint(tmp_path / "q.safetensors", jit=False)
    assert q.prior.covariance_type == "diag"
    for k, v in net.state_dict().items():
        assert torch.equal(q.net.state_dict()[k], v)
    attach_prior(tmp_path / "q.safetensors", None)
    assert load_checkpoint(tmp_path / "q.safetensors", jit=False).prior is None


def _rewrite(src, dst, tensors=None, meta=None):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        info = json.loads(f.metadata()["crystalstudio"])
    state = load_file(str(src))
    if tensors:
        state.update(tensors)
    if meta:
        meta(info)
    save_file(state, str(dst), metadata={"crystalstudio": json.dumps(info)})


def _species(value):
    return lambda i: i.update(species_prior=value)


@pytest.mark.parametrize("tensors, meta, what, pattern", [
    ({"prior.weights": torch.tensor([0.3, np.nan])}, None, "corrupt prior block", "NaN"),
    ({"prior.means": torch.zeros(2, 5)}, None, "corrupt prior block", "shape"),
    (None, lambda i: i.pop("prior"), "corrupt prior block", "without prior metadata"),
    (None, lambda i: i["prior"].update(kind="flow"), "corrupt prior block", "unknown prior kind"),
    ({"prior.extra": torch.zeros(2)}, None, "corrupt prior block", "unexpected prior arrays"),
    # the species prior (training counts of each Z) is checked on load too
    (None, _species({"counts": [1] * 5}), "corrupt species prior", "5 counts, expected 12"),
    (None, _species({"counts": [1] * 11 + [-3]}), "corrupt species prior", "non-negative"),
    (None, _species({"counts": None}), "corrupt species prior", "not numbers|counts"),
    (None, _species([1] * 12), "corrupt species prior", "species prior"),
])
def test_corrupt_prior_block_refused_in_one_line(tmp_path, tensors, meta, what, pattern):
    torch.manual_seed(0)
    net = CrystalNet(ModelConfig(**TINY)).eval()
    good = save_checkpoint(tmp_path / "good.safetensors", net, GRID, META, prior=mixture())
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad, jit=False)
    msg = str(info.value)
    assert msg.startswith(f"bad.safetensors: {what}: ") and "\n" not in msg
    assert re.search(pattern, msg), msg


def test_session_draws_from_the_chosen_prior(tmp_path):
    torch.manual_seed(0)
    net = CrystalNet(ModelConfig(**TINY)).eval()
    p = mixture()
    s = Session(save_checkpoint(tmp_path / "p.safetensors", net, GRID, META, prior=p))
    assert s.prior_in_use() == "aggregate"
    z, cond = s.draw(3, seed=2)
    assert np.array_equal(z, p.sample(3, 2)) and cond is None  # unconditional model: no value drawn
    s.set_prior("standard")
    z2, _ = s.draw(3, seed=2)
    assert np.array_equal(z2, random_latents(3, 8, 2))
    with pytest.raises(ValueError, match="unknown prior"):
        s.set_prior("uniform")
    s2 = Session(save_checkpoint(tmp_path / "n.safetensors", net, GRID, META))
    assert s2.prior == "aggregate" and s2.prior_in_use() == "standard"  # no prior stored: N(0, I)


def test_species_prior_round_trip_and_refined_species(tmp_path):
    """update_metadata writes a species prior; the loaded model hands it to the refined-field
    species rule (a fitted amplitude of 7.45 reads as O under an O-rich prior, N without)."""
    from crystalstudio.core.checkpoint import update_metadata
    from crystalstudio.core.density import density_field

    torch.manual_seed(0)
    net = CrystalNet(ModelConfig(**TINY)).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", net, GRID, META)
    plain = load_checkpoint(path, jit=False)
    assert plain.species_prior is None
    counts = [0] * 12
    counts[8], counts[7] = 500, 3
    update_metadata(path, {"species_prior": {"counts": counts, "what": "test"}})
    model = load_checkpoint(path, jit=False)
    np.testing.assert_array_equal(model.species_prior, np.array(counts, float))
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)
    # a single atom of Eq. 1 height 7.45 in the middle of the cube; the untrained U-Net gates
    # nothing away at gate 0 (REFINED_GATE is 0.05: use probabilities that say "atom")
    M7, _ = density_field(np.array([[5.0, 5.0, 5.0]]), np.array([7]), GRID, species=False)
    M = M7 * (7.45 / 7.0)  # Eq. 1 is linear in the weight
    from crystalstudio.core.fit import DECODED_FIT, combine_with_unet, fit_atoms

    atoms = fit_atoms(M, GRID, settings=DECODED_FIT)
    assert len(atoms) == 1 and abs(atoms.amplitude[0] - 7.45) < 1e-3
    probs = np.zeros((12, *M.shape))
    probs[8] = 1.0
    assert combine_with_unet(atoms, probs, GRID, 0.05, True, model.species_prior).Z.tolist() == [8]
    assert combine_with_unet(atoms, probs, GRID, 0.05, True, plain.species_prior).Z.tolist() == [7]
