"""training package: CIF folder -> .npz -> voxelise -> 3 training steps -> checkpoint -> CLI evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalstudio.core.checkpoint import load_checkpoint, read_metadata
from crystalstudio.core.density import Grid, random_rotations
from training import train as train_mod
from training.__main__ import main
from training.data import SPLITS, CrystalArrays, prepare, voxelise
from training.evaluate import format_table
from training.train import TrainConfig, train

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8))
TABLE_KEYS = ("n_crystals", "n_true_atoms", "atoms_within_tol", "pred_within_tol", "exact_count", "within2_count",
              "species_accuracy", "species_within2", "median_error_A", "voxel_mse")

# name: (space group, a, species, fractional coordinates) -> expected number of atoms (conventional cell)
CRYSTALS = {
    "a_nacl": ("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]], 8),
    "b_cscl": ("Pm-3m", 4.1, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]], 2),
    "c_si": ("Fd-3m", 5.431, ["Si"], [[0, 0, 0]], 8),
    "d_po": ("Pm-3m", 3.35, ["Po"], [[0, 0, 0]], 1),
    "e_srtio3": ("Pm-3m", 3.905, ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]], 5),
    "f_po_small": ("Pm-3m", 3.0, ["Po"], [[0, 0, 0]], 1),  # same formula, other volume: not a duplicate
    "g_big": ("Pm-3m", 12.0, ["Fe"], [[0, 0, 0]], 1),  # corner atom 10.4 Å from the centre: rejected
}
FORMULA = {"a_nacl": "NaCl", "b_cscl": "CsCl", "c_si": "Si", "d_po": "Po", "e_srtio3": "SrTiO3",
           "f_po_small": "Po"}


def structure(name: str) -> Structure:
    sg, a, species, coords, _ = CRYSTALS[name]
    return Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords)


@pytest.fixture(scope="module")
def cif_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cifs")
    for name in CRYSTALS:
        structure(name).to(filename=str(d / f"{name}.cif"))
    (d / "z_nacl_copy.cif").write_text((d / "a_nacl.cif").read_text())  # same CIF twice
    return d


@pytest.fixture(scope="module")
def npz(cif_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("data") / "new_folder" / "tiny.npz"  # prepare makes the folder
    summary = prepare([str(cif_dir)], str(out), GRID, val=0.0, test=0.3)
    return out, summary


def test_prepare_counts_offsets_and_rejections(npz):
    out, summary = npz
    kept = [k for k in CRYSTALS if k != "g_big"]
    assert summary["kept"] == len(kept) == 6
    assert summary["rejected"].get("duplicate") == 1
    assert sum(summary["rejected"].values()) == 2
    assert any("too large" in k for k in summary["rejected"])
    d = np.load(out, allow_pickle=False)
    assert sorted(d.files) == sorted(["lattice", "offsets", "frac", "Z", "split", "ids", "formula", "source", "grid"])
    np.testing.assert_allclose(d["grid"], [16, 10.0, 1.0, 0.5])
    data = CrystalArrays.load(str(out))
    assert len(data) == 6
    assert list(data.ids) == kept  # files read in name order, the copy (z_...) dropped
    counts = [CRYSTALS[k][4] for k in kept]
    np.testing.assert_array_equal(data.offsets, np.concatenate([[0], np.cumsum(counts)]))
    assert len(data.Z) == len(data.frac) == sum(counts)
    assert d["Z"].dtype == np.uint8
    for i, name in enumerate(kept):
        s = structure(name)
        c = data.crystal(i)
        assert c.name == FORMULA[name] == data.formula[i]
        assert sorted(c.Z.tolist()) == sorted(site.specie.Z for site in s)
        np.testing.assert_allclose(c.lattice, s.lattice.matrix, atol=1e-5)
        assert np.all((c.frac >= 0) & (c.frac < 1))
        # each atom of the npz is a site of the structure (same Z, same fractional position mod 1)
        for f, z in zip(c.frac, c.Z):
            dfrac = np.mod(s.frac_coords - f + 0.5, 1.0) - 0.5
            hit = np.linalg.norm(dfrac, axis=1) < 1e-5
            assert hit.sum() == 1 and s[int(np.flatnonzero(hit)[0])].specie.Z == z
    assert summary["splits"] == {k: int((data.split == v).sum()) for k, v in SPLITS.items()}
    assert set(data.sources) == {Path(str(data.source[0])).name}


def test_splits_are_by_formula(npz, cif_dir):
    out, summary = npz
    data = CrystalArrays.load(str(out))
    assert summary["splits"]["val"] == 0
    tr, te = data.indices("train"), data.indices("test")
    assert len(tr) + len(te) == len(data) and len(te) > 0 and len(tr) > 0
    assert not set(data.formula[tr]) & set(data.formula[te])
    # both Po cells (same formula, different volume) are on the same side
    po = np.flatnonzero(data.formula == "Po")
    assert len(po) == 2 and len(set(data.split[po])) == 1
    # the split is a deterministic function of the formula: a second run agrees
    out2 = out.with_name("again.npz")
    prepare([str(cif_dir)], str(out2), GRID, 0.0, 0.3)
    np.testing.assert_array_equal(CrystalArrays.load(str(out2)).split, data.split)


def test_voxelise_shapes_and_species(npz):
    out, _ = npz
    data = CrystalArrays.load(str(out))
    idx = np.array([0, 2, 4])  # NaCl, Si, SrTiO3
    grid = Grid()  # h = 1/3 Å: every point is within 0.29 Å of a voxel centre
    R = random_rotations(3, 7)
    M, S, P, Zp = voxelise(data, idx, grid, R)
    assert M.shape == S.shape == (3, 30, 30, 30) and M.dtype == torch.float32 and S.dtype == torch.int64
    assert P.shape == (3, 8, 3) and Zp.shape == (3, 8)
    assert (Zp[2, 5:] == 0).all() and (Zp[2, :5] > 0).all()
    c = (np.arange(30) + 0.5) / 3
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    for b in range(3):
        cr = data.crystal(int(idx[b]))
        assert sorted(Zp[b][Zp[b] > 0].tolist()) == sorted(cr.Z.tolist())
        for p, z in zip(P[b], Zp[b]):
            if z == 0:
                continue
            d = np.linalg.norm(X - p, axis=-1)
            near = d <= 0.5 - 1e-4
            assert near.sum() > 0
            assert np.all(S[b].numpy()[near] == z)  # atoms in these cells are > 1 Å apart
        # density: Eq. 1 summed directly over the atoms
        ref = sum(z * np.exp(-((X - p) ** 2).sum(-1) / 2) for p, z in zip(P[b], Zp[b]) if z) / (2 * np.pi) ** 1.5
        np.testing.assert_allclose(M[b].numpy(), ref, rtol=1e-5, atol=1e-6 * ref.max())
        assert set(np.unique(S[b].numpy())) == {0} | set(cr.Z.tolist())
    # on the npz grid (n = 16) the shapes follow the grid
    M16, S16, _, _ = voxelise(data, idx[:2], GRID, None)
    assert M16.shape == S16.shape == (2, 16, 16, 16)


@pytest.fixture(scope="module")
def trained(cif_dir, tmp_path_factory):
    """3 training steps on a 2 train / 2 val / 2 test split, recording every training batch."""
    base = tmp_path_factory.mktemp("run")
    data_path = base / "tv.npz"
    prepare([str(cif_dir)], str(data_path), GRID, val=0.2, test=0.3)
    data = CrystalArrays.load(str(data_path))
    seen = []
    orig = train_mod.voxelise

    def spy(d, idx, *a, **k):
        seen.append(np.asarray(idx).copy())
        return orig(d, idx, *a, **k)

    train_mod.voxelise = spy
    try:
        cfg = TrainConfig(data=str(data_path), out=str(base / "m.safetensors"), steps=3, batch=2, eval_every=2,
                          eval_n=2, test_n=2, warmup=1, device="cpu", save_every_min=1e6, model=dict(TINY, grid_n=16))
        metrics = train(cfg)
    finally:
        train_mod.voxelise = orig
    return base, data_path, data, metrics, seen


def test_train_writes_a_loadable_checkpoint(trained):
    base, data_path, data, metrics, seen = trained
    assert len(data.indices("train")) > 0 and len(data.indices("val")) > 0 and len(data.indices("test")) > 0
    ckpt = base / "m.safetensors"
    model = load_checkpoint(ckpt)
    assert model.grid == GRID and model.config.grid_n == 16 and model.latent == 8
    assert model.config.n_classes >= 95 and model.config.enc_channels == (4, 4, 4, 4)
    info = read_metadata(ckpt)
    assert info["representation"] == "unit_cell"
    assert info["metrics"]["split"] == "val"  # the default: a run's own table never reads the test split
    assert info["metrics"]["n_crystals"] == min(2, len(data.indices("val")))
    for k in ("atoms_within_tol", "exact_count", "species_accuracy", "voxel_mse"):
        assert k in info["metrics"]
    assert sorted(info["latent_rank"]) == list(range(8))
    assert info["training"]["steps"] == 3 and info["training"]["samples"] == 6
    assert info["training"]["n_test"] == len(data.indices("test"))
    assert json.loads((base / "m.json").read_text()) == info["metrics"]
    assert metrics == info["metrics"]
    z = np.zeros(8, np.float32)
    assert model.decode(z).shape == (16, 16, 16)


def test_training_log_has_one_row_per_step(trained):
    base = trained[0]
    with open(base / "m.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["recon"]) + 0.01 * float(rows[0]["kl"])
                                                   + float(rows[0]["seg_ce"]), rel=1e-2, abs=1e-3)
    # validation ran at step 2 only (eval_every = 2)
    assert rows[1]["val_atoms_within"] != "" and rows[0]["val_atoms_within"] == rows[2]["val_atoms_within"] == ""


def test_training_never_sees_test_or_val_crystals(trained):
    _, _, data, _, seen = trained
    assert len(seen) == 3 and all(len(b) == 2 for b in seen)
    drawn = set(np.concatenate(seen).tolist())
    assert drawn <= set(data.indices("train").tolist())
    assert not drawn & set(data.indices("test").tolist())
    assert not drawn & set(data.indices("val").tolist())


def test_cli_evaluate_writes_json(trained, tmp_path, capsys):
    base, data_path, data, _, _ = trained
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--checkpoint", str(base / "m.safetensors"), "--data", str(data_path), "--split", "test",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for k in TABLE_KEYS:
        assert k in res, k
    assert res["n_crystals"] == len(data.indices("test"))
    assert res["n_true_atoms"] == sum(data.crystal(int(i)).num_atoms for i in data.indices("test"))
    assert "latent_kl" not in res
    text = capsys.readouterr().out
    assert text.strip() == format_table(res).strip()


def test_cli_refuses_a_bad_checkpoint(trained, tmp_path):
    from crystalstudio.core.checkpoint import CheckpointError

    _, data_path, _, _, _ = trained
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"^bad\.safetensors: "):
        main(["evaluate", "--checkpoint", str(bad), "--data", str(data_path)])
