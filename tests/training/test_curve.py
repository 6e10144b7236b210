"""Learning curves (``python -m training curve``) and the U-Net-only recipe (``train --unet-only``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalstudio.core.checkpoint import load_checkpoint, read_metadata
from crystalstudio.core.density import Grid
from training.__main__ import main
from training.curve import chain_points, checkpoint_cost
from training.data import prepare
from training.train import TrainConfig, train

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), grid_n=16)
PROTOTYPES = [("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Pm-3m", 4.1, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Fd-3m", 5.431, ["Si"], [[0, 0, 0]]),
              ("Pm-3m", 3.35, ["Po"], [[0, 0, 0]]),
              ("Pm-3m", 3.905, ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
              ("Im-3m", 2.87, ["Fe"], [[0, 0, 0]]),
              ("Fm-3m", 4.05, ["Al"], [[0, 0, 0]]),
              ("Pm-3m", 4.2, ["K", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny data set and a 3-step VAE-only run from scratch with a snapshot after every step."""
    d = tmp_path_factory.mktemp("curve")
    cifs = d / "cifs"
    cifs.mkdir()
    for i, (sg, a, species, coords) in enumerate(PROTOTYPES):
        Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords).to(filename=str(cifs / f"c{i}.cif"))
    prepare([str(cifs)], str(d / "tiny.npz"), GRID, val=0.3, test=0.2)
    cfg = TrainConfig(data=str(d / "tiny.npz"), out=str(d / "scratch.safetensors"), steps=3, batch=2,
                      eval_every=10**6, test_n=1, warmup=1, device="cpu", save_every_min=1e6, vae_only=True,
                      peak_weight=1.0, snapshot_every_min=1e-9, threads=1, model=TINY, final_split="val")
    train(cfg)
    return d


def test_chain_points_adds_segment_costs_in_step_order():
    # a from-scratch segment (100 steps, 50 s, 2 threads) then a fine-tune of 40 steps at 1 core-s/step
    a = {"steps": 100, "segment_steps": 100, "batch": 8, "threads": 2, "seconds": 50.0, "cpu_per_step": 1.0}
    b = {"steps": 140, "segment_steps": 40, "batch": 8, "threads": 1, "seconds": 20.0, "cpu_per_step": 0.5}
    pts = chain_points([b, a])
    assert [p["steps"] for p in pts] == [100, 140]
    assert pts[0]["cpu_seconds"] == pytest.approx(100.0)  # 50 s x 2 threads
    assert pts[1]["cpu_seconds"] == pytest.approx(100.0 + 40 * 0.5)
    assert [p["samples"] for p in pts] == [800, 1120]


def test_checkpoint_cost_reads_the_training_block_and_refuses_none(run_dir):
    meta = read_metadata(run_dir / "scratch.safetensors")
    c = checkpoint_cost(meta)
    assert c["steps"] == 3 and c["segment_steps"] == 3 and c["batch"] == 2 and c["threads"] == 1
    assert c["cpu_per_step"] == pytest.approx(meta["training"]["seconds"] / 3)
    with pytest.raises(ValueError, match="no training"):
        checkpoint_cost({"training": {"steps": 3}})


def test_curve_cli_measures_every_snapshot(run_dir, capsys):
    snaps = sorted(run_dir.glob("scratch.step*.safetensors"))
    assert len(snaps) >= 2
    out, png = run_dir / "curve.json", run_dir / "curve.png"
    main(["curve", "--run", f"scratch={run_dir}/scratch.step*.safetensors,{run_dir}/scratch.safetensors",
          "--data", str(run_dir / "tiny.npz"), "--cache", str(run_dir / "cache.json"), "--reach", "0.0",
          "--out", str(out), "--png", str(png)])
    res = json.loads(out.read_text())
    (r,) = res["runs"]
    steps = [p["steps"] for p in r["points"]]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    cpu = [p["cpu_seconds"] for p in r["points"]]
    # time only adds up (a 3-step run on a fast, idle machine may round to 0.0 s: >= 0, not > 0)
    assert all(b >= a for a, b in zip(cpu, cpu[1:])) and cpu[-1] >= 0
    # a from-scratch checkpoint costs exactly its wall seconds x threads
    last = read_metadata(r["points"][-1]["file"])["training"]
    assert cpu[-1] == pytest.approx(last["seconds"] * 1, abs=0.05)  # threads = 1
    for p in r["points"]:
        assert 0.0 <= p["atoms_within_tol"] <= 1.0 and p["voxel_mse"] > 0
    assert res["n_crystals"] > 0 and res["split"] == "val"
    assert r["reach"]["cpu_minutes"] is not None  # level 0 is met at the first point
    assert "| scratch |" in capsys.readouterr().out
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 400 and img.std() > 5  # drawn, not blank
    cache = json.loads((run_dir / "cache.json").read_text())
    assert len(cache) == len(snaps) + 1

    # --include: an earlier curve's runs drawn beside the new one, kept as they were
    old = {**res, "runs": [{**r, "label": "earlier recipe", "points": [{**p, "atoms_within_tol": 0.25}
                                                                       for p in r["points"]]}]}
    (run_dir / "old.json").write_text(json.dumps(old))
    both = run_dir / "both.json"
    main(["curve", "--run", f"scratch={run_dir}/scratch.safetensors", "--data", str(run_dir / "tiny.npz"),
          "--cache", str(run_dir / "cache.json"), "--include", str(run_dir / "old.json"), "--reach", "0.2",
          "--out", str(both)])
    got = json.loads(both.read_text())
    assert [r["label"] for r in got["runs"]] == ["earlier recipe", "scratch"]
    assert got["runs"][0]["points"] == old["runs"][0]["points"] and got["runs"][0]["reach"]["cpu_minutes"] is not None
    assert len(json.loads((run_dir / "cache.json").read_text())) == len(snaps) + 1  # nothing re-measured
    (run_dir / "other.json").write_text(json.dumps({**old, "seed": 5}))
    with pytest.raises(ValueError, match="other.json: measured with seed 5"):
        main(["curve", "--run", f"scratch={run_dir}/scratch.safetensors", "--data", str(run_dir / "tiny.npz"),
              "--cache", str(run_dir / "cache.json"), "--include", str(run_dir / "other.json")])


def test_unet_only_trains_the_unet_and_keeps_the_vae(run_dir):
    src = run_dir / "scratch.safetensors"
    out = run_dir / "unet.safetensors"
    cfg = TrainConfig(data=str(run_dir / "tiny.npz"), out=str(out), steps=2, batch=2, eval_every=10**6, test_n=1,
                      warmup=1, device="cpu", save_every_min=1e6, unet_only=True, unet_true_frac=0.5,
                      init=str(src), lr=1e-2, final_split="val")
    train(cfg)
    before, after = load_checkpoint(src).net.state_dict(), load_checkpoint(out).net.state_dict()
    vae = [k for k in before if k.startswith("vae.")]
    unet = [k for k in before if k.startswith("unet.") and before[k].is_floating_point()]
    assert vae and unet
    for k in vae:  # weights and BatchNorm running statistics untouched
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in unet)
    assert read_metadata(out)["training"]["steps"] == 5


def test_unet_only_and_vae_only_exclude_each_other(run_dir):
    cfg = TrainConfig(data=str(run_dir / "tiny.npz"), out=str(run_dir / "x.safetensors"), steps=1, batch=2,
                      device="cpu", unet_only=True, vae_only=True, model=TINY)
    with pytest.raises(ValueError, match="exclude each other"):
        train(cfg)


def test_snapshots_of_one_segment_cost_their_own_seconds():
    # one from-scratch run: the first steps cost more than the later ones (warm-up, a busy
    # machine); each snapshot costs exactly its wall seconds x threads, not an average
    snaps = [{"steps": s, "segment_steps": s, "batch": 8, "threads": 1, "seconds": t, "cpu_per_step": t / s}
             for s, t in ((400, 900.0), (1000, 1800.0), (4922, 6332.0))]
    pts = chain_points(snaps)
    assert [p["cpu_seconds"] for p in pts] == pytest.approx([900.0, 1800.0, 6332.0])
    # a fine-tune (--init the 1000-step snapshot) adds its own cost to that snapshot's
    ft = {"steps": 1500, "segment_steps": 500, "batch": 8, "threads": 2, "seconds": 100.0, "cpu_per_step": 0.4}
    pts = chain_points(snaps[:2] + [ft])
    assert pts[-1]["cpu_seconds"] == pytest.approx(1800.0 + 200.0)


def test_own_time_starts_a_fine_tune_at_zero_where_it_began():
    # a fine-tune from step 1000 of another run, its snapshots at 1200 and 1500 (60 s and 150 s
    # of one thread): listed alone it is charged 1000 steps it did not train, unless own_time
    ft = [{"steps": s, "segment_steps": s - 1000, "batch": 8, "threads": 1, "seconds": t,
           "cpu_per_step": t / (s - 1000)} for s, t in ((1200, 60.0), (1500, 150.0))]
    charged = chain_points(ft)
    assert [p["cpu_seconds"] for p in charged] == pytest.approx([1000 * 0.3 + 60.0, 1000 * 0.3 + 150.0])
    own = chain_points(ft, own_time=True)
    assert [p["cpu_seconds"] for p in own] == pytest.approx([60.0, 150.0])
    assert [p["samples"] for p in own] == [200 * 8, 500 * 8]
    assert [p["steps"] for p in own] == [1200, 1500]  # the weights' own step count is kept


def test_own_time_names_a_run(tmp_path):
    from training.curve import curve
    with pytest.raises(ValueError, match="--own-time lat: no --run with that label"):
        curve({"a": [str(tmp_path / "x.safetensors")]}, str(tmp_path / "none.npz"), own_time=("lat",))
