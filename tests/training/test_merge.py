"""``python -m training merge-unet``: one checkpoint's VAE and prior with another's U-Net."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from crystalstudio.core.checkpoint import CheckpointError, read_metadata, save_checkpoint
from crystalstudio.core.density import Grid
from crystalstudio.core.models import CrystalNet, ModelConfig
from training.__main__ import main

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), grid_n=16)


def _checkpoint(path, seed, **over):
    torch.manual_seed(seed)
    net = CrystalNet(ModelConfig(**{**TINY, **over}))
    meta = {"representation": "unit_cell", "unet_gate": 0.3, "draw_gate": 0.1, "metrics": {"exact_count": 0.5},
            "training": {"steps": 100 * seed, "config": {"seed": seed}}}
    return save_checkpoint(path, net, GRID, meta)


def test_merged_checkpoint_has_the_vae_of_one_and_the_unet_of_the_other(tmp_path):
    a = _checkpoint(tmp_path / "vae.safetensors", 1)
    b = _checkpoint(tmp_path / "unet.safetensors", 2)
    out = tmp_path / "merged.safetensors"
    assert main(["merge-unet", "--vae", str(a), "--unet", str(b), "--out", str(out)]) == 0
    sa, sb, sm = load_file(str(a)), load_file(str(b)), load_file(str(out))
    assert set(sm) == set(sa)
    n_vae = n_unet = 0
    for k, v in sm.items():
        src = sb if k.startswith("unet.") else sa
        assert torch.equal(v, src[k]), k
        if v.is_floating_point() and not torch.equal(sa[k], sb[k]):
            n_vae += k.startswith("vae.")
            n_unet += k.startswith("unet.")
    assert n_vae > 10 and n_unet > 10  # the two inputs really differ in both networks
    meta = read_metadata(out)
    assert "unet_gate" not in meta and "draw_gate" not in meta and "metrics" not in meta  # another U-Net's
    assert meta["training"]["steps"] == 100 and meta["training"]["unet_from"]["steps"] == 200


def test_merge_refuses_a_different_architecture_and_overwriting_an_input(tmp_path):
    a = _checkpoint(tmp_path / "vae.safetensors", 1)
    c = _checkpoint(tmp_path / "other.safetensors", 2, unet_channels=(4, 4))
    with pytest.raises(CheckpointError, match="model_config differs"):
        main(["merge-unet", "--vae", str(a), "--unet", str(c), "--out", str(tmp_path / "m.safetensors")])
    with pytest.raises(CheckpointError, match="new file"):
        main(["merge-unet", "--vae", str(a), "--unet", str(c), "--out", str(a)])
