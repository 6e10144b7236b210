"""crystalstudio.core.checkpoint: safetensors round trip, size limit, and every refusal path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from crystalstudio.core.checkpoint import (
    MAX_BYTES, CheckpointError, CrystalModel, held_out_measures, load_checkpoint, read_metadata, save_checkpoint,
)
from crystalstudio.core.density import Grid
from crystalstudio.core.models import CrystalNet, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(grid_n=12, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), n_classes=12)
GRID = Grid(n=12, length=10.0)
META = {"representation": "unit_cell", "training": {"steps": 7, "seed": 3}, "metrics": {"atoms_within_tol": 0.5},
        "beta": 0.01, "gamma": 0.1, "latent_rank": [7, 6, 5, 4, 3, 2, 1, 0]}


def tiny_net(seed: int = 0, **over) -> CrystalNet:
    torch.manual_seed(seed)
    net = CrystalNet(ModelConfig(**{**TINY, **over}))
    net.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their defaults
        net.vae(torch.rand(2, net.cfg.grid_n, net.cfg.grid_n, net.cfg.grid_n))
        net.unet(torch.rand(2, net.cfg.grid_n, net.cfg.grid_n, net.cfg.grid_n))
    return net.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    net = tiny_net()
    save_checkpoint(path, net, GRID, META)
    return path, net


def assert_refused(path: Path, pattern: str):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(path.name + ": "), msg
    assert "\n" not in msg
    assert re.search(pattern, msg, re.I), msg
    return msg


def test_roundtrip_identical_outputs(saved):
    path, net = saved
    model = load_checkpoint(path, jit=False)  # the eager modules: bitwise equal
    assert isinstance(model, CrystalModel)
    assert model.config == net.cfg and model.grid == GRID and model.latent == 8
    assert model.representation == "unit_cell"
    assert model.latent_rank == META["latent_rank"]
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k
    g = torch.Generator().manual_seed(1)
    M = torch.rand(2, 12, 12, 12, generator=g)
    z = torch.randn(2, 8, generator=g)
    with torch.no_grad():
        mu, lv = net.vae.encode(M[:1])  # same batch size as the model's calls: bitwise equal
        ref_dec = net.vae.decode(z)
        ref_dec1 = net.vae.decode(z[:1])
        ref_logits = net.unet(ref_dec1)
    mu2, lv2 = model.encode(M[0].numpy())
    np.testing.assert_array_equal(mu2, mu[0].numpy())
    np.testing.assert_array_equal(lv2, lv[0].numpy())
    np.testing.assert_array_equal(model.decode(z.numpy()), ref_dec.numpy())
    np.testing.assert_array_equal(model.decode(z[0].numpy()), ref_dec1[0].numpy())
    np.testing.assert_array_equal(model.logits(ref_dec1[0].numpy()), ref_logits[0].numpy())

    # The default CPU path is traced and frozen (BatchNorm folded): equal to float32 rounding.
    fast = load_checkpoint(path)
    assert fast.jit and fast._frozen is None  # built on first use
    dec = fast.decode(z.numpy())
    assert fast._frozen is not None and fast.jit_error is None
    np.testing.assert_allclose(dec, ref_dec.numpy(), rtol=1e-4, atol=1e-5 * float(ref_dec.abs().max()))
    np.testing.assert_allclose(fast.logits(ref_dec1[0].numpy()), ref_logits[0].numpy(), rtol=1e-4,
                               atol=1e-4 * float(ref_logits.abs().max()))
    off = load_checkpoint(path, jit=False)
    assert not off.jit and off.decode(z[0].numpy()) is not None and off._frozen is None
    M_hat, atoms = model.decode_segment(z[0].numpy())
    np.testing.assert_array_equal(M_hat, ref_dec1[0].numpy())
    assert atoms.positions.shape[1] == 3


def test_metadata_fields(saved):
    path, net = saved
    info = read_metadata(path)
    assert info["format"] == "crystalstudio-checkpoint" and info["version"] == 1
    assert info["grid"]["n"] == 12 and info["grid"]["length"] == 10.0 and info["grid"]["sigma"] == 1.0
    assert info["grid"]["species_radius"] == 0.5 and "0.5" in info["grid"]["voxel_centres"]
    assert info["representation"] == "unit_cell"
    assert info["classes"] == list(range(12))
    assert ModelConfig.from_dict(info["model_config"]) == net.cfg
    assert info["training"] == {"steps": 7, "seed": 3}
    assert info["metrics"] == {"atoms_within_tol": 0.5}
    assert info["weights_dtype"] == "float32"
    # the metadata is the safetensors "crystalstudio" header entry, JSON
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["crystalstudio"]) == info


def test_save_rejects_unknown_representation(tmp_path):
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "x.safetensors", tiny_net(), GRID, {"representation": "voxels"})
    assert not (tmp_path / "x.safetensors").exists()


def test_large_config_saved_as_bfloat16(tmp_path):
    net = tiny_net(grid_n=16, latent=3000, bottleneck_channels=64)
    fp32 = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert fp32 > MAX_BYTES  # would not fit as float32
    path = save_checkpoint(tmp_path / "big.safetensors", net, Grid(n=16), META | {"latent_rank": []})
    assert path.stat().st_size <= 16 * 1024 * 1024
    assert read_metadata(path)["weights_dtype"] == "bfloat16"
    raw = load_file(str(path))
    assert raw["vae.to_stats.weight"].dtype == torch.bfloat16
    assert raw["vae.encoder.0.1.num_batches_tracked"].dtype == torch.int64
    model = load_checkpoint(path)
    # loaded weights are the bfloat16-rounded originals, as float32
    for k, v in net.state_dict().items():
        w = model.net.state_dict()[k]
        if v.is_floating_point():
            assert w.dtype == torch.float32
            assert torch.equal(w, v.to(torch.bfloat16).float()), k
        else:
            assert torch.equal(w, v), k
    assert model.latent_rank == list(range(3000))
    z = torch.randn(2, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net.vae.decode(z).numpy()
    out = model.decode(z.numpy())
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6


# --------------------------------------------------------------------------- refusals


def rewrite(src: Path, dst: Path, *, state=None, info=None, metadata=None) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with a modified state dict and/or metadata."""
    st = load_file(str(src)) if state is None else state
    meta = read_metadata(src) if info is None else info
    save_file(st, str(dst), metadata={"crystalstudio": json.dumps(meta)} if metadata is None else metadata)
    return dst


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.safetensors", "no such")
    with pytest.raises(CheckpointError):
        read_metadata(tmp_path / "nope.safetensors")


def test_random_bytes_and_empty_file(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(p, "safetensors")
    e = tmp_path / "empty.safetensors"
    e.write_bytes(b"")
    assert_refused(e, "safetensors")
    t = tmp_path / "text.safetensors"
    t.write_text("hello\nworld\n" * 20)
    assert_refused(t, "safetensors")


def test_foreign_safetensors(saved, tmp_path):
    src, _ = saved
    p = rewrite(src, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    assert_refused(p, "without crystalstudio metadata")
    q = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(3)}, str(q))
    assert_refused(q, "without crystalstudio metadata")


def test_bad_metadata(saved, tmp_path):
    src, _ = saved
    info = read_metadata(src)
    p = rewrite(src, tmp_path / "fmt.safetensors", info={**info, "format": "someone-else"})
    assert_refused(p, "not describe a crystalstudio checkpoint")
    p = rewrite(src, tmp_path / "json.safetensors", metadata={"crystalstudio": "{not json"})
    assert_refused(p, "JSON")
    for key in ("grid", "model_config", "classes", "representation", "training"):
        bad = {k: v for k, v in info.items() if k != key}
        p = rewrite(src, tmp_path / f"no_{key}.safetensors", info=bad)
        assert_refused(p, f"lacks {key}")
    p = rewrite(src, tmp_path / "rep.safetensors", info={**info, "representation": "point_cloud"})
    assert_refused(p, "unknown representation 'point_cloud'")
    p = rewrite(src, tmp_path / "ver.safetensors", info={**info, "version": 99})
    assert_refused(p, "version 99")
    p = rewrite(src, tmp_path / "cls.safetensors", info={**info, "classes": list(range(11))})
    assert_refused(p, "class")
    p = rewrite(src, tmp_path / "cfg.safetensors", info={**info, "model_config": {**info["model_config"], "x": 1}})
    assert_refused(p, "unknown model settings")
    p = rewrite(src, tmp_path / "gridn.safetensors", info={**info, "grid": {**info["grid"], "n": 16}})
    assert_refused(p, "grid")


def test_bad_tensors(saved, tmp_path):
    src, _ = saved
    state = load_file(str(src))
    key = "vae.to_stats.weight"
    wrong = dict(state, **{key: torch.zeros(3, 3)})
    assert_refused(rewrite(src, tmp_path / "shape.safetensors", state=wrong), rf"tensor {re.escape(key)} has shape")
    missing = {k: v for k, v in state.items() if k != key}
    assert_refused(rewrite(src, tmp_path / "missing.safetensors", state=missing), "missing")
    extra = dict(state, surprise=torch.zeros(2))
    assert_refused(rewrite(src, tmp_path / "extra.safetensors", state=extra), "unexpected")
    nan = dict(state)
    nan[key] = state[key].clone()
    nan[key][0, 0] = float("nan")
    assert_refused(rewrite(src, tmp_path / "nan.safetensors", state=nan), "NaN")
    inf = dict(state)
    inf["unet.head.bias"] = state["unet.head.bias"].clone()
    inf["unet.head.bias"][1] = float("inf")
    assert_refused(rewrite(src, tmp_path / "inf.safetensors", state=inf), "infinite")
    # the untouched copy still loads
    load_checkpoint(rewrite(src, tmp_path / "same.safetensors"))


def test_truncated_file(saved, tmp_path):
    src, _ = saved
    p = tmp_path / "cut.safetensors"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_refused(p, "safetensors|unreadable")


IMPORT_PICKLE = re.compile(r"^\s*(import\s+(pickle|cPickle|dill|joblib)\b|from\s+(pickle|cPickle|dill|joblib)\s+import)",
                           re.M)


def test_no_pickle_anywhere():
    files = [p for d in ("crystalstudio", "training") for p in (ROOT / d).rglob("*.py")]
    assert len(files) >= 10
    for p in files:
        text = p.read_text()
        assert "torch." + "load(" not in text, p  # spelled apart so this file does not match itself
        assert not IMPORT_PICKLE.search(text), p
        assert "allow_pickle=True" not in text, p
        assert "weights_only=False" not in text, p


def test_conditional_decode_scales_the_bottleneck(tmp_path):
    """Sec. 4.5: z is multiplied by cond / cond_scale before the decoder; one value or one per row;
    encode defaults cond to the input's largest density. Checked against the eager modules."""
    net = tiny_net(3, conditional=True, cond_scale=2.0)
    with torch.no_grad():
        net.vae.out.bias.fill_(0.5)  # a live (non-zero) output that depends on z
    path = tmp_path / "cond.safetensors"
    save_checkpoint(path, net, GRID, META)
    for jit in (False, True):
        model = load_checkpoint(path, jit=jit)
        assert model.config.conditional and model.config.cond_scale == 2.0
        z = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
        conds = np.array([0.5, 2.0, 3.0], np.float32)
        with torch.no_grad():
            ref = net.vae.decode(torch.as_tensor(z), torch.as_tensor(conds)).numpy()
            ref_plain = net.vae.decode(torch.as_tensor(z) * torch.as_tensor(conds)[:, None] / 2.0).numpy()
        np.testing.assert_allclose(ref, ref_plain, rtol=1e-6)
        assert (ref > 0).mean() > 0.5 and np.ptp(ref[0] - ref[1]) > 1e-3
        tol = dict(rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
        np.testing.assert_allclose(model.decode(z, conds), ref, **tol)
        for i in range(3):
            np.testing.assert_allclose(model.decode(z[i], float(conds[i])), ref[i], **tol)
        np.testing.assert_allclose(model.decode(z, 2.0), model.decode(z), **tol)  # reference scale
        assert not np.allclose(model.decode(z, 0.5), model.decode(z), atol=tol["atol"])
        with pytest.raises(ValueError, match="2 values for 3"):
            model.decode(z, conds[:2])
    M = np.random.default_rng(1).random((12, 12, 12)).astype(np.float32)
    mu_default, _ = model.encode(M)
    mu_own, _ = model.encode(M, float(M.max()))
    mu_other, _ = model.encode(M, 2.0 * float(M.max()))
    np.testing.assert_array_equal(mu_default, mu_own)
    assert not np.allclose(mu_default, mu_other)


def test_held_out_measures_prefer_the_test_evaluation_beside_the_file(tmp_path):
    """The app shows a checkpoint's test evaluation (the JSON ``ship`` writes beside it) over
    its metadata's ``metrics``, but only a test evaluation that names this very file."""
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_net(), GRID,
                           {**META, "metrics": {"atoms_within_tol": 0.71, "split": "val"}})
    assert held_out_measures(path) == {"atoms_within_tol": 0.71, "split": "val"}
    beside = tmp_path / "m.metrics.json"
    evaluation = {"checkpoint": "assets/m.safetensors", "split": "test", "atoms_within_tol": 0.883,
                  "exact_count": 0.662, "n_crystals": 358, "seed": 0, "per_crystal": [{"id": "x"}]}
    beside.write_text(json.dumps(evaluation))
    got = held_out_measures(path)
    assert got == {"atoms_within_tol": 0.883, "exact_count": 0.662, "n_crystals": 358, "split": "test"}
    for bad in ({**evaluation, "split": "val"}, {**evaluation, "checkpoint": "other.safetensors"},
                {**evaluation, "atoms_within_tol": "88%"}):
        beside.write_text(json.dumps(bad))
        assert held_out_measures(path)["split"] == "val", bad
    beside.write_text("{truncated")
    assert held_out_measures(path) == {"atoms_within_tol": 0.71, "split": "val"}
    bare = save_checkpoint(tmp_path / "bare.safetensors", tiny_net(), GRID, {"representation": "unit_cell"})
    assert held_out_measures(bare) == {}
    assert held_out_measures(tmp_path / "missing.safetensors") == {}
