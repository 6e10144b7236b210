"""The checkpoint's U-Net gate (``python -m training choose-gate``) and ``update_metadata``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from safetensors.torch import load_file

from crystalstudio.core.checkpoint import CheckpointError, load_checkpoint, read_metadata, update_metadata
from crystalstudio.core.density import Grid
from crystalstudio.core.fit import UNET_GATE
from training.__main__ import main
from training.data import CrystalArrays, prepare
from training.evaluate import evaluate
from training.gate import choose_gate, gate_table
from training.train import TrainConfig, train

GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), grid_n=16)
PROTOTYPES = [("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Pm-3m", 4.1, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Pm-3m", 3.35, ["Po"], [[0, 0, 0]]),
              ("Pm-3m", 3.905, ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]),
              ("Im-3m", 2.87, ["Fe"], [[0, 0, 0]]),
              ("Fm-3m", 4.05, ["Al"], [[0, 0, 0]]),
              ("Pm-3m", 4.2, ["K", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
              ("Pm-3m", 3.6, ["Cu"], [[0, 0, 0]])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gate")
    cifs = d / "cifs"
    cifs.mkdir()
    for i, (sg, a, species, coords) in enumerate(PROTOTYPES):
        Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords).to(filename=str(cifs / f"c{i}.cif"))
    prepare([str(cifs)], str(d / "tiny.npz"), GRID, val=0.4, test=0.2)
    train(TrainConfig(data=str(d / "tiny.npz"), out=str(d / "m.safetensors"), steps=3, batch=2, eval_every=10**6,
                      test_n=1, warmup=1, device="cpu", save_every_min=1e6, threads=1, model=TINY,
                      final_split="val"))
    return d


def test_gate_table_rows_equal_the_harness_with_that_gate(run_dir):
    model = load_checkpoint(run_dir / "m.safetensors", jit=False)
    data = CrystalArrays.load(str(run_dir / "tiny.npz"))
    idx = data.indices("val")
    table = gate_table(model, data, idx, gates=(0.0, 0.5, 1.0))
    for row in table:
        ref = evaluate(model.net, data, idx, model.grid, seed=0, gate=row["gate"])
        for k in ("atoms_within_tol", "pred_within_tol", "exact_count", "species_accuracy"):
            assert row[k] == pytest.approx(ref[k], nan_ok=True), (row["gate"], k)
    # a gate of 1 keeps only atoms the U-Net is certain of: never more found than with no gate
    assert table[2]["pred_within_tol"] is None or table[2]["atoms_within_tol"] <= table[0]["atoms_within_tol"]
    with pytest.raises(ValueError, match="gates must lie"):
        gate_table(model, data, idx, gates=(1.5,))


def test_choose_gate_maximises_the_mean_and_ties_to_the_smaller():
    rows = [{"gate": 0.0, "atoms_within_tol": 0.6, "exact_count": 0.1, "species_accuracy": 0.2},
            {"gate": 0.1, "atoms_within_tol": 0.5, "exact_count": 0.3, "species_accuracy": 0.2},
            {"gate": 0.2, "atoms_within_tol": 0.4, "exact_count": 0.4, "species_accuracy": 0.2}]
    # 0.1 and 0.2 both have mean 1/3: the tie goes to the smaller gate
    assert choose_gate(rows) == 0.1
    rows[0]["exact_count"] = 0.5
    assert choose_gate(rows) == 0.0


def test_choose_gate_cli_writes_the_gate_and_the_model_uses_it(run_dir, capsys):
    ck = run_dir / "w.safetensors"
    ck.write_bytes((run_dir / "m.safetensors").read_bytes())
    assert load_checkpoint(ck).unet_gate == UNET_GATE  # no gate stored: the module default
    before = load_file(str(ck))
    assert main(["choose-gate", "--checkpoint", str(ck), "--data", str(run_dir / "tiny.npz"),
                 "--gates", "0,0.3,1", "--write"]) == 0
    out = capsys.readouterr().out
    chosen = json.loads(out.strip().splitlines()[-1])["unet_gate"]
    meta = read_metadata(ck)
    assert meta["unet_gate"] == chosen and meta["unet_gate_choice"]["split"] == "val"
    assert [r["gate"] for r in meta["unet_gate_choice"]["table"]] == [0.0, 0.3, 1.0]
    assert load_checkpoint(ck).unet_gate == chosen
    after = load_file(str(ck))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the harness reports the gate it used
    res = main(["evaluate", "--checkpoint", str(ck), "--data", str(run_dir / "tiny.npz"), "--split", "val",
                "--draws", "0", "--no-budget", "--json", str(run_dir / "e.json")])
    assert res == 0 and json.loads((run_dir / "e.json").read_text())["unet_gate"] == chosen


def test_update_metadata_refuses_structural_keys_and_removes_none(run_dir):
    ck = run_dir / "u.safetensors"
    ck.write_bytes((run_dir / "m.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="u.safetensors: metadata key.*grid"):
        update_metadata(ck, {"grid": {}})
    update_metadata(ck, {"note": "x"})
    assert read_metadata(ck)["note"] == "x"
    update_metadata(ck, {"note": None})
    assert "note" not in read_metadata(ck)
    assert read_metadata(ck)["representation"] == "unit_cell"
    assert np.isfinite(load_checkpoint(ck).unet_gate)


def test_draw_gate_cli_writes_the_gate_its_table_is_the_draws_and_sessions_use_it(run_dir, capsys):
    from scipy.stats import wasserstein_distance

    from crystalstudio.core.density import Crystal, density_field
    from crystalstudio.core.prior import draw_latents
    from crystalstudio.session import Session
    from crystalstudio.io.validity import validity_report
    from training.evaluate import _reference_Z, midpoint_latents
    from training.gate import MIDPOINT_PASSES, choose_draw_row

    ck = run_dir / "d.safetensors"
    ck.write_bytes((run_dir / "m.safetensors").read_bytes())
    data = str(run_dir / "tiny.npz")
    with pytest.raises(SystemExit, match="d.safetensors: the checkpoint has no aggregate prior"):
        main(["choose-gate", "--checkpoint", str(ck), "--data", data, "--draws", "6"])
    assert main(["fit-prior", "--checkpoint", str(ck), "--data", data, "--threads", "1"]) == 0
    model = load_checkpoint(ck, jit=False)
    assert model.draw_gate == model.unet_gate  # none stored: the reconstructions' gate
    assert main(["choose-gate", "--checkpoint", str(ck), "--data", data, "--draws", "6", "--gates", "0,1",
                 "--write"]) == 0
    chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["draw_gate"]
    meta = read_metadata(ck)
    assert meta["draw_gate"] == chosen and meta["draw_gate_choice"]["seed"] == 1
    # each row by hand: the same seeded draws, read at that gate, against the same training fields
    model = load_checkpoint(ck, jit=False)
    assert not model.has_light and meta["draw_light"] is False and model.draw_light is False
    ref_Z = _reference_Z(model, CrystalArrays.load(data), 1000, 1)
    ref, ref_light = [len(z) for z in ref_Z], [int((z <= 5).sum()) for z in ref_Z]
    M = model.decode(draw_latents(6, model.latent, 1, model.prior))
    val = CrystalArrays.load(data).indices("val")
    assert len(val) >= 2
    zm, _ = midpoint_latents(model, CrystalArrays.load(data), val, 6, 1)
    assert zm.shape == (len(val) // 2, model.latent)
    # the table's midpoints: MIDPOINT_PASSES passes, pass r the split shifted by r under seed 1 + r
    zm = np.concatenate([midpoint_latents(model, CrystalArrays.load(data), np.roll(val, -r), 6, 1 + r)[0]
                         for r in range(MIDPOINT_PASSES)])
    table = meta["draw_gate_choice"]["table"]
    assert [r["light"] for r in table] == [False, False]  # no light channel: no light variant
    for row in table:
        found = model.segment_batch(M, "fit", gate=row["gate"])
        counts, light = [len(a) for a in found], [int((a.Z <= 5).sum()) for a in found]
        assert row["count_wasserstein"] == pytest.approx(wasserstein_distance(counts, ref), abs=1e-6)
        assert row["light_wasserstein"] == pytest.approx(wasserstein_distance(light, ref_light), abs=1e-6)
        assert row["score"] == pytest.approx(row["count_wasserstein"] + row["light_wasserstein"])
        # validity as the evaluation's validity block reads the same atoms (draws, then val midpoints)
        rep = validity_report([(a.positions, a.Z) for a in found], ref, [1])
        assert (row["draws_structural"], row["draws_smact"]) == (rep["structural_valid"], rep["compositional_valid"])
        mids = model.segment_batch(model.decode(zm), "fit", gate=row["gate"])
        rep = validity_report([(a.positions, a.Z) for a in mids], ref, [1])
        assert (row["midpoints_structural"], row["midpoints_smact"]) == (rep["structural_valid"],
                                                                         rep["compositional_valid"])
        assert row["atoms_per_midpoint"] == pytest.approx(np.mean([len(a) for a in mids]))
    assert chosen == choose_draw_row(table)["gate"]

    # a session reads a latent's atoms at the draw gate, a reconstruction's at the U-Net gate
    update_metadata(ck, {"draw_gate": 1.0, "unet_gate": 0.0})
    model = load_checkpoint(ck, jit=False)
    nacl = Crystal(np.eye(3) * 5.64, np.array([[0, 0, 0], [.5, .5, .5]]), [11, 17], "NaCl")
    field = density_field(nacl.cartesian() + 2.5, nacl.Z, model.grid, species=False)[0]
    model.decode_fields = lambda z, cond=None: (field, None)  # a field whose atoms the fit certainly finds
    assert len(model.segment(field)) == 2  # gate 0 keeps every fitted atom
    frame = Session(model=model).decode(np.zeros(model.latent, np.float32))
    expect = model.segment(field, gate=1.0)
    assert len(frame.atoms) == len(expect) < 2 and np.array_equal(frame.atoms.Z, expect.Z)


def test_the_draw_gate_meets_the_validity_targets_before_it_matches_counts():
    from training.gate import VALIDITY_TARGETS, choose_draw_row

    ok = dict.fromkeys(VALIDITY_TARGETS, 1.0)
    rows = [{"gate": 0.25, "light": True, "score": 1.9, **ok, "midpoints_smact": 0.73},  # session 31's choice
            {"gate": 0.15, "light": False, "score": 2.2, **ok},
            {"gate": 0.1, "light": False, "score": 2.4, **ok}]
    assert choose_draw_row(rows) is rows[1]  # the best count among the rows that are crystals
    rows[1]["draws_structural"] = 0.94  # now none meets every target: the least shortfall wins
    rows[2]["draws_smact"] = 0.79
    assert choose_draw_row(rows) is rows[1]
    rows[2]["draws_smact"] = 0.795
    assert choose_draw_row(rows) is rows[2]
    # a table written before validity was scored: the count alone, as then
    legacy = [{"gate": g, "light": False, "score": sc} for g, sc in ((0.1, 2.0), (0.2, 1.5), (0.3, 1.5))]
    assert choose_draw_row(legacy) is legacy[2]


@pytest.mark.parametrize("key, value", [("draw_gate", "high"), ("draw_gate", 1.5), ("unet_gate", -0.1),
                                        ("draw_gate", True), ("draw_light", "yes"), ("draw_light", 1),
                                        ("light_subtract", "on"), ("lattice_fold", "yes")])
def test_a_damaged_gate_is_refused_on_load_with_one_line(run_dir, key, value):
    ck = run_dir / "bad_gate.safetensors"
    ck.write_bytes((run_dir / "m.safetensors").read_bytes())
    update_metadata(ck, {key: value})
    flags = ("draw_light", "light_subtract", "lattice_fold")
    what = "must be true or false" if key in flags else "must be a number from 0 to 1"
    with pytest.raises(CheckpointError, match=f"bad_gate.safetensors: metadata {key} {what}"):
        load_checkpoint(ck)
