"""train --light-channel: a decoder head for the light atoms, trained on L beside M."""

from __future__ import annotations

import csv
import json

import pytest
from pymatgen.core import Lattice, Structure

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.core.density import Grid
from training.data import prepare
from training.evaluate import main as evaluate_main
from training.train import TrainConfig, train

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8))


@pytest.fixture(scope="module")
def light_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("light_cifs")
    for name, sp, a in (("lif", ["Li", "F"], 4.03), ("lih", ["Li", "H"], 4.08), ("nacl", ["Na", "Cl"], 5.64),
                        ("mgo", ["Mg", "O"], 4.21)):
        Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), sp, [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
            filename=str(d / f"{name}.cif"))
    out = tmp_path_factory.mktemp("light_data") / "light.npz"
    prepare([str(d)], str(out), GRID, val=0.0, test=0.0)
    return out


def _cfg(npz, out, **kw):
    return TrainConfig(data=str(npz), out=str(out), steps=4, batch=2, eval_every=0, test_n=1, warmup=1,
                       device="cpu", save_every_min=1e6, vae_only=True, model=dict(TINY, grid_n=16), **kw)


def test_light_channel_training_learns_l_and_ships_the_head(light_npz, tmp_path):
    base = tmp_path / "base.safetensors"
    train(_cfg(light_npz, base))
    assert not load_checkpoint(base).has_light
    out = tmp_path / "light.safetensors"
    train(_cfg(light_npz, out, init=str(base), light_channel=True, light_channel_weight=2.0))
    model = load_checkpoint(out)
    assert model.has_light and model.config.light_gain == 4.0 and model.config.light_z_max == 5
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    light = [float(r["light"]) for r in rows]
    assert len(light) == 4 and all(v > 0 for v in light)  # every batch holds Li: L is never empty
    for r in rows:  # Eq. 2 plus the light term at its weight
        expect = float(r["recon"]) + 0.01 * float(r["kl"]) + 2.0 * float(r["light"])
        assert float(r["loss"]) == pytest.approx(expect, rel=1e-3, abs=1e-3)
    # the base run had no light term
    assert all(float(r["light"]) == 0.0 for r in csv.DictReader(open(base.with_suffix(".csv"))))

    # the harness reads the light checkpoint end to end: refinement on [M, L], L's atoms merged,
    # draws through the same reading (the aggregate prior is absent: standard draws only)
    js = tmp_path / "light.json"
    assert evaluate_main(["--checkpoint", str(out), "--data", str(light_npz), "--split", "train", "--draws", "3",
                          "--batch", "2", "--refine-steps", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_crystals"] == 4 and res["n_true_atoms"] == 4 * 8
    assert len(res["per_crystal"]) == 4


def test_light_channel_is_refused_for_the_repeating_lattice(light_npz, tmp_path):
    with pytest.raises(ValueError, match="light-channel: unit cell representation only"):
        train(_cfg(light_npz, tmp_path / "l.safetensors", light_channel=True, representation="repeating_lattice"))
