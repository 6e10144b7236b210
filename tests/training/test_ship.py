"""``python -m training ship`` (an evaluated checkpoint into assets/) and ``results-table``
(README's results from the shipped evaluation JSONs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crystalstudio.core.checkpoint import CheckpointError, load_checkpoint, update_metadata, weights_fingerprint
from training.__main__ import main
from training.data import prepare
from training.ship import (BEGIN, END, READING_KEYS, ShipError, check_evaluation, metrics_path, results_table, ship,
                           update_readme)
from training.train import TrainConfig, train

from .test_gate import GRID, PROTOTYPES, TINY

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(d: Path, ck: Path, out: Path, *extra: str) -> dict:
    assert main(["evaluate", "--checkpoint", str(ck), "--data", str(d / "tiny.npz"), "--draws", "0", "--no-budget",
                 "--refine-steps", "2", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ship")
    cifs = d / "cifs"
    cifs.mkdir()
    for i, (sg, a, species, coords) in enumerate(PROTOTYPES):
        Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords).to(filename=str(cifs / f"c{i}.cif"))
    prepare([str(cifs)], str(d / "tiny.npz"), GRID, val=0.3, test=0.3)
    train(TrainConfig(data=str(d / "tiny.npz"), out=str(d / "m.safetensors"), steps=3, batch=2, eval_every=10**6,
                      test_n=0, warmup=1, device="cpu", save_every_min=1e6, threads=1, model=TINY,
                      final_split="val"))
    _evaluate(d, d / "m.safetensors", d / "test.json", "--split", "test")
    return d


def test_fingerprint_follows_the_weights_not_the_metadata(run_dir, tmp_path):
    ck = run_dir / "m.safetensors"
    fp = weights_fingerprint(ck)
    assert len(fp) == 64 and fp == weights_fingerprint(ck)
    gated = update_metadata(ck, {"unet_gate": 0.3}, tmp_path / "gated.safetensors")
    assert weights_fingerprint(gated) == fp  # metadata only
    state = load_file(str(ck))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    changed = tmp_path / "changed.safetensors"
    with safe_open(str(ck), framework="pt") as f:  # the same metadata, one weight moved
        meta = f.metadata()
    save_file(state, str(changed), metadata=meta)
    assert weights_fingerprint(changed) != fp
    assert load_checkpoint(changed) is not None  # still a valid checkpoint
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        weights_fingerprint(tmp_path / "nope.safetensors")


def test_ship_writes_the_test_measures_into_the_checkpoint_and_the_json_beside(run_dir, tmp_path):
    res = json.loads((run_dir / "test.json").read_text())
    assert res["split"] == "test" and res["n_crystals"] == res["n_split"] >= 1
    assert res["weights_sha256"] == weights_fingerprint(run_dir / "m.safetensors")
    # evaluate records the reading the checkpoint reports, the keys ship compares
    reading = load_checkpoint(run_dir / "m.safetensors").reading
    assert tuple(reading) == READING_KEYS and {k: res[k] for k in READING_KEYS} == reading
    (tmp_path / "assets").mkdir()
    out = ship(run_dir / "m.safetensors", run_dir / "test.json", tmp_path / "assets" / "unit_cell.safetensors")
    m = load_checkpoint(out)
    assert m.info["metrics"]["split"] == "test"
    for k in ("atoms_within_tol", "exact_count", "species_accuracy", "n_crystals", "voxel_mse"):
        assert m.info["metrics"][k] == res[k]
    assert weights_fingerprint(out) == res["weights_sha256"]
    beside = metrics_path(out)
    assert beside == tmp_path / "assets" / "unit_cell.metrics.json"
    shipped = json.loads(beside.read_text())
    assert shipped["checkpoint"] == str(out)
    assert {k: v for k, v in shipped.items() if k != "checkpoint"} == {k: v for k, v in res.items() if k != "checkpoint"}
    # the shipped pair passes its own check (the app and the README read this pair)
    assert check_evaluation(out, beside)["atoms_within_tol"] == res["atoms_within_tol"]


def test_ship_carries_the_runs_adam_state_in_bfloat16_for_a_fresh_fine_tune(run_dir, tmp_path):
    """``--optimizer-of``: the run's moments beside the shipped file at half the size, read
    back in float32 within bfloat16's rounding, step counters exact; a fine-tune with
    ``--init-optimizer`` starts from them; shipping again without it drops the stale file."""
    import torch

    from training.train import load_train_state, optim_path

    (tmp_path / "assets").mkdir()
    out = tmp_path / "assets" / "unit_cell.safetensors"
    assert main(["ship", "--checkpoint", str(run_dir / "m.safetensors"), "--evaluation", str(run_dir / "test.json"),
                 "--out", str(out), "--optimizer-of", str(run_dir / "m.safetensors")]) == 0
    side, full = optim_path(out), optim_path(run_dir / "m.safetensors")
    assert side.is_file() and side.stat().st_size < 0.6 * full.stat().st_size
    (ref, ref_info), (got, got_info) = load_train_state(run_dir / "m.safetensors"), load_train_state(out)
    assert got_info["moments_dtype"] == "bfloat16" and got_info["step"] == ref_info["step"]
    assert got["param_groups"] == ref["param_groups"] and got["state"].keys() == ref["state"].keys()
    for pid, st in ref["state"].items():
        for name, v in st.items():
            w = got["state"][pid][name]
            assert w.dtype == v.dtype == torch.float32 or torch.equal(w, v)
            if v.numel() > 1:
                torch.testing.assert_close(w, v, rtol=2 ** -8, atol=0)  # bf16: 8 significant bits
            else:
                assert torch.equal(w, v)  # step counters exactly
    with safe_open(str(side), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).numel() > 1} == {torch.bfloat16}
    train(TrainConfig(data=str(run_dir / "tiny.npz"), out=str(tmp_path / "ft.safetensors"), init=str(out),
                      init_optimizer=True, steps=1, batch=2, eval_every=10**6, test_n=0, warmup=1, device="cpu",
                      save_every_min=1e6, threads=1, final_split="val"))
    assert load_checkpoint(tmp_path / "ft.safetensors").info["training"]["steps"] > 0
    ship(run_dir / "m.safetensors", run_dir / "test.json", out)  # no run named: no stale side file
    assert not side.exists()


def test_ship_takes_the_runs_adam_state_after_fit_prior_added_a_prior(run_dir, tmp_path):
    """The shipping path: ``fit-prior`` attaches a prior (new tensors) to a copy of the run
    after training, and the test evaluation measures that copy; the run's Adam state still
    belongs to it (same network tensors), so it ships beside it."""
    import numpy as np

    from crystalstudio.core.checkpoint import attach_prior
    from crystalstudio.core.prior import LatentPrior
    from training.train import optim_path

    n = load_checkpoint(run_dir / "m.safetensors").latent
    with_prior = attach_prior(run_dir / "m.safetensors", LatentPrior([1.0], np.zeros((1, n)), np.ones((1, n))),
                              tmp_path / "m_ship.safetensors")
    assert weights_fingerprint(with_prior) != weights_fingerprint(run_dir / "m.safetensors")  # the prior counts there
    res = _evaluate(run_dir, with_prior, tmp_path / "test.json", "--split", "test")
    assert res["weights_sha256"] == weights_fingerprint(with_prior)
    out = ship(with_prior, tmp_path / "test.json", tmp_path / "u.safetensors", run_dir / "m.safetensors")
    assert optim_path(out).is_file() and load_checkpoint(out).prior is not None


def test_ship_refuses_the_optimizer_state_of_other_weights(run_dir, tmp_path):
    other = update_metadata(run_dir / "m.safetensors", {"unet_gate": 0.3}, tmp_path / "same.safetensors")
    with pytest.raises(ShipError, match="no same.optim.safetensors"):  # same weights, no state beside
        ship(run_dir / "m.safetensors", run_dir / "test.json", tmp_path / "o.safetensors", other)
    state = load_file(str(run_dir / "m.safetensors"))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name] = state[name] + 1e-3
    with safe_open(str(run_dir / "m.safetensors"), framework="pt") as f:
        save_file(state, str(tmp_path / "moved.safetensors"), metadata=f.metadata())
    shutil.copy(run_dir / "m.optim.safetensors", tmp_path / "moved.optim.safetensors")
    with pytest.raises(ShipError, match="moved.safetensors: other weights"):
        ship(run_dir / "m.safetensors", run_dir / "test.json", tmp_path / "o.safetensors",
             tmp_path / "moved.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_ship_refuses_an_evaluation_of_something_else(run_dir, tmp_path):
    ck = run_dir / "m.safetensors"
    res = json.loads((run_dir / "test.json").read_text())

    def variant(**changes) -> Path:
        p = tmp_path / f"v{len(list(tmp_path.iterdir()))}.json"
        p.write_text(json.dumps({**res, **changes}))
        return p

    with pytest.raises(ShipError, match="'val' split"):
        ship(ck, variant(split="val"), tmp_path / "o.safetensors")
    with pytest.raises(ShipError, match="--limit"):
        ship(ck, variant(limit=1, n_crystals=1, n_split=res["n_split"] + 1), tmp_path / "o.safetensors")
    with pytest.raises(ShipError, match="trained without"):
        ship(ck, variant(split_matches_checkpoint_test_ids=False), tmp_path / "o.safetensors")
    with pytest.raises(ShipError, match="other weights"):
        ship(ck, variant(weights_sha256="0" * 64), tmp_path / "o.safetensors")
    with pytest.raises(ShipError, match="records no weights_sha256"):
        ship(ck, variant(weights_sha256=None, checkpoint="elsewhere.safetensors"), tmp_path / "o.safetensors")
    # the same weights with another reading (a gate changed after the evaluation)
    regated = update_metadata(ck, {"unet_gate": 0.35}, tmp_path / "regated.safetensors")
    with pytest.raises(ShipError, match="unet_gate"):
        ship(regated, run_dir / "test.json", tmp_path / "o.safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ShipError, match="bad.json"):
        ship(ck, bad, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.metrics.json").exists()


def test_ship_cli_exits_2_with_one_line(run_dir, tmp_path, capsys):
    val = _evaluate(run_dir, run_dir / "m.safetensors", tmp_path / "val.json", "--split", "val")
    assert val["split"] == "val"
    capsys.readouterr()
    rc = main(["ship", "--checkpoint", str(run_dir / "m.safetensors"), "--evaluation", str(tmp_path / "val.json"),
               "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: val.json:") and "\n" not in err
    assert main(["ship", "--checkpoint", str(run_dir / "m.safetensors"), "--evaluation", str(run_dir / "test.json"),
                 "--out", str(tmp_path / "o.safetensors")]) == 0
    assert "test atoms within 0.5 Å" in capsys.readouterr().out


def test_readme_results_table_is_the_shipped_jsons():
    """README's numbers are the evaluation command's: the table between the markers equals
    the one written from assets/*.metrics.json (fails when either is edited alone)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert table == results_table(ROOT / "assets")
    default = json.loads((ROOT / "assets" / "unit_cell.metrics.json").read_text())
    row = next(r for r in table.splitlines() if r.startswith("| true atoms with a predicted atom"))
    assert row.split(" | ")[1] == f"{100 * default['atoms_within_tol']:.1f}%"


def test_results_table_cli_check_and_rewrite(tmp_path, capsys):
    shutil.copytree(ROOT / "assets", tmp_path / "assets", ignore=shutil.ignore_patterns("*.safetensors", "samples"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n")
    args = ["results-table", "--readme", str(readme), "--assets", str(tmp_path / "assets")]
    assert main([*args, "--check"]) == 1 and "| stale |" in readme.read_text()
    assert main(args) == 0
    text = readme.read_text()
    assert "| stale |" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert main([*args, "--check"]) == 0
    j = json.loads((tmp_path / "assets" / "unit_cell.metrics.json").read_text())
    j["atoms_within_tol"] = 0.991
    (tmp_path / "assets" / "unit_cell.metrics.json").write_text(json.dumps(j))
    assert main([*args, "--check"]) == 1
    assert update_readme(readme, tmp_path / "assets") and "| 99.1% |" in readme.read_text()
    readme.write_text("no markers\n")
    capsys.readouterr()
    assert main(args) == 2 and "no results-table markers" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["unit_cell", "unit_cell_conditional", "repeating_lattice"])
def test_each_shipped_checkpoint_carries_an_evaluation_of_itself(name):
    res = check_evaluation(ROOT / "assets" / f"{name}.safetensors", ROOT / "assets" / f"{name}.metrics.json")
    assert res["split"] == "test" and res["n_crystals"] == 358


def test_ready_makes_a_candidate_with_the_references_reading_priors_and_gates(run_dir, tmp_path, capsys):
    from crystalstudio.core.checkpoint import read_metadata
    from training.gate import choose_draw_row, choose_gate

    run = run_dir / "m.safetensors"
    before = run.read_bytes()
    like = update_metadata(run, {"refine_lr": [0.02, 0.5], "light_subtract": True}, tmp_path / "like.safetensors")
    out = tmp_path / "cand" / "c.safetensors"
    assert main(["ready", "--checkpoint", str(run), "--out", str(out), "--data", str(run_dir / "tiny.npz"),
                 "--like", str(like), "--draws", "6", "--threads", "1"]) == 0
    assert run.read_bytes() == before  # the run stays as trained
    meta = read_metadata(out)
    assert meta["refine_lr"] == [0.02, 0.5] and meta["light_subtract"] is True
    assert weights_fingerprint(out, prior=False) == weights_fingerprint(run, prior=False)
    m = load_checkpoint(out)
    assert m.prior is not None and m.species_prior is not None and load_checkpoint(run).prior is None
    # the gates written are the choices of the tables stored beside them
    assert meta["unet_gate"] == choose_gate(meta["unet_gate_choice"]["table"])
    row = choose_draw_row(meta["draw_gate_choice"]["table"])
    assert (meta["draw_gate"], meta["draw_light"]) == (row["gate"], row["light"])
    assert meta["draw_gate_choice"]["n_draws"] == 6
    text = capsys.readouterr().out
    assert f"--evaluation TEST.json --optimizer-of {run}" in text
    # refused: the run as its own candidate, a reference of another representation, a missing file
    with pytest.raises(SystemExit, match="m.safetensors: the candidate must be another file than the run"):
        main(["ready", "--checkpoint", str(run), "--out", str(run), "--data", str(run_dir / "tiny.npz")])
    with safe_open(str(run), framework="pt") as f:  # the same weights declared a repeating-lattice model
        meta = dict(f.metadata())
    meta["crystalstudio"] = json.dumps({**json.loads(meta["crystalstudio"]), "representation": "repeating_lattice"})
    lattice = tmp_path / "lattice.safetensors"
    save_file(load_file(str(run)), str(lattice), metadata=meta)
    with pytest.raises(SystemExit, match="lattice.safetensors: a repeating_lattice model, the run is unit_cell"):
        main(["ready", "--checkpoint", str(run), "--out", str(tmp_path / "x.safetensors"),
              "--data", str(run_dir / "tiny.npz"), "--like", str(lattice)])
    with pytest.raises(SystemExit, match="nope.safetensors"):
        main(["ready", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "y.safetensors"),
              "--data", str(run_dir / "tiny.npz")])
    assert run.read_bytes() == before
