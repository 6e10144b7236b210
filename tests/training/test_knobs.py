"""Knob study (python -m training knobs): one-knob fine-tunes measured on the validation split."""

from __future__ import annotations

import json
import math

import pytest
from pymatgen.core import Lattice, Structure

from crystalstudio.core.checkpoint import read_metadata
from crystalstudio.core.density import Grid
from training import knobs
from training.__main__ import main
from training.data import CrystalArrays, prepare
from training.train import TrainConfig, _lr_at, train

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), grid_n=16)
PROTOTYPES = [("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Pm-3m", 4.1, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Fd-3m", 5.431, ["Si"], [[0, 0, 0]]),
              ("Pm-3m", 3.35, ["Po"], [[0, 0, 0]]),
              ("Pm-3m", 3.905, ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
              ("Im-3m", 2.87, ["Fe"], [[0, 0, 0]])]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A prepared .npz with train and val crystals and a 1-step tiny checkpoint to fine-tune."""
    d = tmp_path_factory.mktemp("knobs")
    for i, (sg, a, sp, xyz) in enumerate(PROTOTYPES):
        Structure.from_spacegroup(sg, Lattice.cubic(a), sp, xyz).to(filename=str(d / f"{i}.cif"))
    data = d / "k.npz"
    prepare([str(d)], str(data), GRID, val=0.3, test=0.0)
    arr = CrystalArrays.load(str(data))
    assert len(arr.indices("train")) and len(arr.indices("val"))
    init = d / "init.safetensors"
    train(TrainConfig(data=str(data), out=str(init), steps=1, batch=2, warmup=1, device="cpu", eval_every=10 ** 6,
                      save_every_min=1e6, final_split="val", model=TINY))
    return d, data, init, arr


def test_constant_schedule_holds_the_rate_and_cosine_decays():
    cos = TrainConfig(lr=1e-3, steps=100, warmup=10)
    const = TrainConfig(lr=1e-3, steps=100, warmup=10, schedule="constant")
    assert _lr_at(const, 4, 0.0) == pytest.approx(1e-3 * 5 / 10)  # warm-up is shared
    cos_at = lambda f: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f))  # noqa: E731
    assert _lr_at(cos, 4, 0.0) == pytest.approx(1e-3 * 5 / 10 * cos_at(0.04))
    assert _lr_at(const, 90, 0.0) == pytest.approx(1e-3)
    assert _lr_at(cos, 90, 0.0) == pytest.approx(1e-3 * cos_at(0.9))
    with pytest.raises(ValueError, match="schedule"):
        _lr_at(TrainConfig(schedule="step"), 5, 0.0)


def test_study_trains_one_knob_per_variant_and_measures_on_val(start, tmp_path):
    d, data, init, arr = start
    base = TrainConfig(data=str(data), init=str(init), steps=2, batch=2, warmup=1, device="cpu",
                       eval_every=10 ** 6, save_every_min=1e6)
    rows = knobs.run_study(base, tmp_path, only=["beta_x10", "lr_constant"])
    assert [r["name"] for r in rows] == ["start", "baseline", "beta_x10", "lr_constant"]
    n_val = len(arr.indices("val"))
    # the starting checkpoint is measured exactly as training measured it when it was saved
    start = rows[0]["metrics"]
    saved = read_metadata(init)["metrics"]
    assert start["split"] == saved["split"] == "val" and start["n_crystals"] == n_val
    for k in ("atoms_within_tol", "exact_count", "species_accuracy", "voxel_mse"):
        assert start[k] == pytest.approx(saved[k], rel=1e-5, abs=1e-9), k
    for r in rows[1:]:
        assert r["metrics"]["split"] == "val" and r["metrics"]["n_crystals"] == n_val
        meta = read_metadata(tmp_path / f"{r['name']}.safetensors")
        cfg = meta["training"]["config"]
        assert cfg["init"] == str(init) and cfg["steps"] == 2
        assert meta["beta"] == (0.1 if r["name"] == "beta_x10" else base.beta)
        assert cfg["schedule"] == ("constant" if r["name"] == "lr_constant" else "cosine")
        assert json.loads((tmp_path / f"{r['name']}.json").read_text()) == r["metrics"]


def test_study_resumes_from_measured_variants(start, tmp_path, monkeypatch):
    d, data, init, arr = start
    for name, v in (("start", 0.4), ("baseline", 0.5), ("gamma_0.33", 0.6)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"atoms_within_tol": v, "split": "val"}))

    def boom(cfg):
        raise AssertionError(f"{cfg.out} was trained again")

    monkeypatch.setattr(knobs, "train", boom)
    rows = knobs.run_study(TrainConfig(data=str(data), init=str(init)), tmp_path, only=["gamma_0.33"])
    assert [r["metrics"]["atoms_within_tol"] for r in rows] == [0.4, 0.5, 0.6]
    with pytest.raises(ValueError, match="unknown knob variant.*beta_x100"):
        knobs.run_study(TrainConfig(), tmp_path, only=["beta_x100"])


def test_table_gives_baseline_values_and_changes_in_points():
    m0 = {"atoms_within_tol": 0.4, "exact_count": 0.1, "species_accuracy": 0.2, "species_within2": 0.3,
          "median_error_A": 0.9, "voxel_mse": 0.0065, "n_crystals": 165}
    m1 = dict(m0, atoms_within_tol=0.4325, median_error_A=0.8, voxel_mse=0.006, species_within2=None)
    m_start = dict(m0, atoms_within_tol=0.45)
    rows = [{"name": "start", "change": "s", "metrics": m_start},
            {"name": "baseline", "change": "-", "metrics": m0}, {"name": "gamma_0.33", "change": "g", "metrics": m1}]
    md = knobs.format_markdown(rows, TrainConfig(steps=250, batch=8, init="x.safetensors"))
    lines = md.splitlines()
    cells = lambda i: [c.strip() for c in lines[i].strip("|").split("|")]  # noqa: E731
    assert cells(2) == ["start", "s", "+5.00", "+0.00", "+0.00", "+0.00", "+0.000", "+0.00"]
    assert cells(3) == ["baseline", "-", "40.00", "10.00", "20.00", "30.00", "0.900", "6.50"]
    assert cells(4) == ["gamma_0.33", "g", "+3.25", "+0.00", "+0.00", "n/a", "-0.100", "-0.50"]
    assert "250 steps of batch 8" in md and "165 validation crystals" in md


def test_cli_knobs_writes_the_table(start, tmp_path, capsys):
    d, data, init, arr = start
    out = tmp_path / "study"
    main(["knobs", "--data", str(data), "--init", str(init), "--steps", "1", "--batch", "2", "--device", "cpu",
          "--out", str(out), "--only", "gamma_0.33"])
    md = (out / "knobs.md").read_text()
    assert md in capsys.readouterr().out
    assert [r["name"] for r in json.loads((out / "knobs.json").read_text())] == ["start", "baseline", "gamma_0.33"]
    assert "| gamma_0.33 |" in md
