"""crystalstudio.core.models: shapes, Eq. 2 / Eq. 3 losses against hand computations, gradient scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crystalstudio.core.models import (
    AttentionUNet3D, CrystalNet, DensityVAE, ModelConfig, count_parameters, kl_divergence, scale_grad, unet_loss,
    vae_loss,
)

TINY = dict(grid_n=16, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), n_classes=10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_default_config_shapes_grid30():
    cfg = ModelConfig()
    assert cfg.grid_n == 30 and cfg.latent == 300 and cfg.n_classes == 95
    net = CrystalNet(cfg).eval()
    M = torch.rand(1, 30, 30, 30)
    with torch.no_grad():
        M_hat, mu, logvar = net.vae(M)
        logits = net.unet(M_hat)
    assert M_hat.shape == (1, 30, 30, 30) and mu.shape == logvar.shape == (1, 300)
    assert (M_hat >= 0).all()
    assert logits.shape == (1, 95, 30, 30, 30)
    # the decoder's spatial sizes follow the encoder's: 4 -> 8 -> 15 -> 30
    assert net.vae.dec_sizes == [8, 15, 30] and net.vae.dec_start == (32, 4)


def test_tiny_config_shapes_grid16():
    cfg = ModelConfig(**TINY)
    net = CrystalNet(cfg)
    M = torch.rand(3, 16, 16, 16)
    M_hat, mu, logvar = net.vae(M)
    assert M_hat.shape == (3, 16, 16, 16) and M_hat.dtype == torch.float32
    assert (M_hat >= 0).all()
    assert mu.shape == logvar.shape == (3, 8)
    mu2, lv2 = net.vae.encode(M.unsqueeze(1))  # (B, 1, n, n, n) accepted too
    assert mu2.shape == lv2.shape == (3, 8)
    z = torch.randn(5, 8)
    assert net.vae.decode(z).shape == (5, 16, 16, 16)
    assert (net.vae.decode(z * 10) >= 0).all()
    logits = net.unet(M_hat)
    assert logits.shape == (3, 10, 16, 16, 16)
    assert net.unet(M.unsqueeze(1)).shape == (3, 10, 16, 16, 16)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0


def test_odd_grid_decodes_to_n():
    cfg = ModelConfig(**{**TINY, "grid_n": 13})
    net = CrystalNet(cfg).eval()
    with torch.no_grad():
        M_hat, _, _ = net.vae(torch.rand(2, 13, 13, 13))
        assert M_hat.shape == (2, 13, 13, 13)
        assert net.unet(M_hat).shape == (2, 10, 13, 13, 13)


def test_posterior_mean_when_not_sampling():
    net = DensityVAE(ModelConfig(**TINY)).eval()
    M = torch.rand(2, 16, 16, 16)
    with torch.no_grad():
        a, mu, _ = net(M, sample=False)
        np.testing.assert_allclose(a.numpy(), net.decode(mu).numpy(), rtol=1e-6, atol=1e-7)
        b, _, _ = net(M, sample=False)
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_conditional_bottleneck_uses_cond():
    net = DensityVAE(ModelConfig(**{**TINY, "conditional": True})).eval()
    z = torch.randn(2, 8)
    with torch.no_grad():
        d1 = net.decode(z, torch.tensor([1.0, 1.0]))
        d2 = net.decode(z, torch.tensor([2.0, 2.0]))
        np.testing.assert_allclose(net.decode(z).numpy(), d1.numpy(), rtol=1e-6)  # cond None = 1
        np.testing.assert_allclose(net.decode(2 * z).numpy(), d2.numpy(), rtol=1e-5, atol=1e-7)


def test_cond_normalise_encoder_sees_shape_only():
    """cond_normalise: the encoder's z is the same for M and for M at any magnitude (so only
    the condition can carry it), equals the plain encoder's z of M rescaled to cond_scale, and a
    field of zeros gives finite statistics."""
    cfg = ModelConfig(**{**TINY, "conditional": True, "cond_scale": 3.0, "cond_normalise": True})
    net = DensityVAE(cfg).eval()
    plain = DensityVAE(ModelConfig(**TINY)).eval()
    plain.load_state_dict(net.state_dict())
    M = torch.rand(2, 16, 16, 16)
    M[1] *= 5.0
    with torch.no_grad():
        mu, lv = net.encode(M)
        mu2, lv2 = net.encode(M * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1))
        ref, _ = plain.encode(M * (3.0 / M.flatten(1).amax(1)).view(2, 1, 1, 1))
        zero_mu, zero_lv = net.encode(torch.zeros(1, 16, 16, 16))
    np.testing.assert_allclose(mu2.numpy(), mu.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lv2.numpy(), lv.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mu.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(zero_mu).all() and torch.isfinite(zero_lv).all()
    # without cond_normalise the magnitude reaches z
    cfg.cond_normalise = False
    with torch.no_grad():
        assert not torch.allclose(net.encode(M)[0], net.encode(2 * M)[0], atol=1e-3)


def test_kl_divergence_closed_form():
    assert torch.count_nonzero(kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5))) == 0
    mu = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    lv = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    # KL(N(mu, s^2) || N(0, 1)) = log(1/s) + (s^2 + mu^2) / 2 - 1/2
    s2 = np.exp([0.3, -0.7])
    ref = -0.5 * np.log(s2) + (s2 + np.array([0.25, 1.0])) / 2 - 0.5
    np.testing.assert_allclose(kl_divergence(mu, lv).numpy()[0], ref, rtol=1e-12)
    # KL >= 0 everywhere
    assert (kl_divergence(torch.randn(100, 4), torch.randn(100, 4) * 3) >= -1e-6).all()


def test_vae_loss_hand_computation():
    g = np.random.default_rng(0)
    M = g.random((3, 4, 4, 4))
    Mh = g.random((3, 4, 4, 4))
    mu = g.normal(size=(3, 6))
    lv = g.normal(size=(3, 6))
    beta, gamma = 0.37, 0.2
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    L = vae_loss(t(M), t(Mh), t(mu), t(lv), None, beta, gamma)
    recon = np.mean([((Mh[b] - M[b]) ** 2).sum() for b in range(3)])
    kl = np.mean([sum(0.5 * (mu[b, j] ** 2 + math.exp(lv[b, j]) - 1 - lv[b, j]) for j in range(6)) for b in range(3)])
    assert L["recon"].item() == pytest.approx(recon, rel=1e-12)
    assert L["kl"].item() == pytest.approx(kl, rel=1e-12)
    assert L["loss"].item() == pytest.approx(recon + beta * kl, rel=1e-12)
    L2 = vae_loss(t(M), t(Mh), t(mu), t(lv), torch.tensor(2.5, dtype=torch.float64), beta, gamma)
    assert L2["loss"].item() == pytest.approx(recon + beta * kl + gamma * 2.5, rel=1e-12)


def test_unet_loss_hand_computation():
    g = np.random.default_rng(1)
    logits = g.normal(size=(2, 4, 3, 3, 3))
    S = g.integers(0, 4, (2, 3, 3, 3))
    S[0, 0, 0, 0] = 9  # above the last class: clamped to class 3
    lt, St = torch.tensor(logits), torch.tensor(S)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    y = np.minimum(S, 3)
    nll = -np.take_along_axis(logp, y[:, None], 1)[:, 0]
    assert unet_loss(lt, St).item() == pytest.approx(nll.mean(), rel=1e-10)
    w = np.where(y == 0, 0.3, 1.0)
    assert unet_loss(lt, St, 0.3).item() == pytest.approx((w * nll).sum() / w.sum(), rel=1e-10)


def test_scale_grad_scales_only_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 0.25 * w.numpy(), rtol=1e-6)
    # chained with a function: d/dx sum(scale_grad(x)^2) = scale * 2x
    x2 = torch.randn(5, requires_grad=True)
    (scale_grad(x2, 3.0) ** 2).sum().backward()
    np.testing.assert_allclose(x2.grad.numpy(), 3.0 * 2 * x2.detach().numpy(), rtol=1e-6)


def test_model_config_roundtrip_and_unknown_key():
    cfg = ModelConfig(**TINY)
    d = cfg.to_dict()
    assert isinstance(d["enc_channels"], list)
    import json

    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**d, "dropout": 0.1})


def test_mismatched_decoder_stages_raise():
    with pytest.raises(ValueError, match="stages"):
        DensityVAE(ModelConfig(**{**TINY, "dec_channels": (4, 4)}))
    with pytest.raises(ValueError):
        CrystalNet(ModelConfig(**{**TINY, "dec_channels": (4, 4, 4, 4)}))


def test_unet_runs_attention_gate_on_skip():
    net = AttentionUNet3D(ModelConfig(**{**TINY, "unet_channels": (4, 8, 8)})).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 16, 16, 16))
    assert out.shape == (1, 10, 16, 16, 16) and torch.isfinite(out).all()
