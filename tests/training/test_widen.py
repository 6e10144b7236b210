"""``python -m training widen``: a wider decoder that decodes the same fields and then learns."""

from __future__ import annotations

import pytest
import torch

from crystalstudio.core.checkpoint import load_checkpoint, save_checkpoint
from crystalstudio.core.density import Grid
from crystalstudio.core.models import CrystalNet, ModelConfig
from training.__main__ import main
from training.widen import widen_decoder

CFG = dict(grid_n=16, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
           unet_channels=(4, 8), light_channel=True)


def _trained_like(seed: int = 0) -> CrystalNet:
    """A tiny net with non-trivial weights and BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    net = CrystalNet(ModelConfig(**CFG))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_widened_decoder_decodes_the_same_fields(mode):
    net = _trained_like()
    wide = widen_decoder(net, (8, 6, 12), seed=3)
    assert tuple(wide.cfg.dec_channels) == (8, 6, 12) and tuple(net.cfg.dec_channels) == (4, 4, 4)
    assert sum(p.numel() for p in wide.vae.parameters()) > sum(p.numel() for p in net.vae.parameters())
    getattr(net, mode)(), getattr(wide, mode)()
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        M0, L0 = net.vae.decode_fields(z)
        M1, L1 = wide.vae.decode_fields(z)
    assert float(M0.abs().max()) > 0 and float(L0.abs().max()) > 0
    torch.testing.assert_close(M1, M0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L1, L0, rtol=1e-5, atol=1e-6)
    # the encoder and the U-Net are the same weights
    for k, v in net.state_dict().items():
        if not k.startswith(("vae.dec_blocks.", "vae.out")):
            assert torch.equal(wide.state_dict()[k], v), k


def test_the_new_channels_learn():
    net = _trained_like()
    wide = widen_decoder(net, (4, 4, 8), seed=0).train()
    out_w = wide.vae.out.weight.detach()  # a view: it follows the optimizer
    assert float(out_w[:, 4:].abs().max()) == 0.0  # function-preserving start
    opt = torch.optim.Adam(wide.parameters(), lr=1e-2)
    M = torch.rand(2, 16, 16, 16)
    for _ in range(3):
        M_hat, mu, logvar = wide.vae(M)
        loss = (M_hat - M).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(out_w[:, 4:].abs().max()) > 0  # the zero weights received gradients
    assert not torch.equal(wide.vae.dec_blocks[2][0].weight[4:], widen_decoder(net, (4, 4, 8), seed=0)
                           .vae.dec_blocks[2][0].weight[4:])


def test_narrower_or_fewer_blocks_are_refused():
    net = _trained_like()
    with pytest.raises(ValueError, match="at least"):
        widen_decoder(net, (4, 2, 4))
    with pytest.raises(ValueError, match="3 entries"):
        widen_decoder(net, (8, 8))


def test_widen_cli_writes_a_checkpoint_that_decodes_the_same(tmp_path, capsys):
    net = _trained_like().eval()
    src = save_checkpoint(tmp_path / "m.safetensors", net, Grid(n=16, length=10.0),
                          {"representation": "unit_cell", "training": {"steps": 7}, "unet_gate": 0.3})
    out = tmp_path / "w.safetensors"
    assert main(["widen", "--checkpoint", str(src), "--dec-channels", "6,6,6", "--out", str(out)]) == 0
    assert "(4, 4, 4) -> (6, 6, 6)" in capsys.readouterr().out
    a, b = load_checkpoint(src), load_checkpoint(out)
    assert tuple(b.config.dec_channels) == (6, 6, 6)
    assert b.info["training"]["steps"] == 7 and b.info["unet_gate"] == 0.3
    assert b.info["widened_from"]["dec_channels"] == [4, 4, 4]
    z = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(b.net.vae.decode(z), a.net.vae.decode(z), rtol=1e-5, atol=1e-6)
    assert main(["widen", "--checkpoint", str(src), "--dec-channels", "2,2,2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: dec_channels must have")
