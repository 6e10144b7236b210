"""Evaluation harness (python -m training.evaluate): JSON measures, determinism, figures,
CSV input with the training split, one-line errors, and a perfect-predictor reference."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from scipy.spatial.distance import cdist

import training.evaluate as ev
from crystalstudio.core.checkpoint import save_checkpoint
from crystalstudio.core.density import Grid
from crystalstudio.core.models import CrystalNet, ModelConfig
from training.data import CrystalArrays, prepare

ROOT = Path(__file__).resolve().parents[2]
GRID = Grid()  # 30^3, 10 Å: h = 1/3 Å, so every atom owns voxels of S
TINY = dict(grid_n=30, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8))
VAL, TEST = 0.2, 0.3  # with these fractions NaCl, CsCl -> train; Si -> val; MgO, LiF, GaAs, Po -> test
CRYSTALS = {
    "a_nacl": ("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "b_cscl": ("Pm-3m", 4.1, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "c_si": ("Fd-3m", 5.431, ["Si"], [[0, 0, 0]]),
    "d_mgo": ("Fm-3m", 4.21, ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "e_lif": ("Fm-3m", 4.03, ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "f_gaas": ("F-43m", 5.65, ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
    "g_po": ("Pm-3m", 3.35, ["Po"], [[0, 0, 0]]),
}
TEST_IDS = ["d_mgo", "e_lif", "f_gaas", "g_po"]
TABLE_KEYS = ("n_crystals", "n_true_atoms", "atoms_within_tol", "pred_within_tol", "exact_count", "within2_count",
              "species_accuracy", "species_within2", "median_error_A", "voxel_mse")
RUN_KEYS = ("checkpoint", "representation", "grid", "latent", "data", "split", "seed", "limit", "tol_A", "draws",
            "n_split", "split_ids_sha1", "split_matches_checkpoint_test_ids")
SECTIONS = ("counts", "distances", "species", "voxel_mse_stats", "random_draws", "per_crystal")


def structure(name: str) -> Structure:
    sg, a, species, coords = CRYSTALS[name]
    return Structure.from_spacegroup(sg, Lattice.cubic(a), species, coords)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("harness")
    cifs = base / "cifs"
    cifs.mkdir()
    for name in CRYSTALS:
        structure(name).to(filename=str(cifs / f"{name}.cif"))
    csv_path = base / "all.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "pretty_formula", "cif"])
        for name in CRYSTALS:
            w.writerow([name, structure(name).composition.reduced_formula, (cifs / f"{name}.cif").read_text()])
    npz = base / "tiny.npz"
    prepare([str(cifs)], str(npz), GRID, VAL, TEST)
    data = CrystalArrays.load(str(npz))
    assert sorted(map(str, data.ids[data.indices("test")])) == TEST_IDS
    torch.manual_seed(0)
    net = CrystalNet(ModelConfig(**TINY))
    test_sha1 = hashlib.sha1("\n".join(TEST_IDS).encode()).hexdigest()
    ckpt = base / "tiny.safetensors"
    save_checkpoint(ckpt, net, GRID, {"representation": "unit_cell", "training": {"test_ids_sha1": test_sha1}})
    return {"base": base, "cifs": cifs, "csv": csv_path, "npz": npz, "ckpt": ckpt, "data": data}


def _args(files, out: Path, data=None, *extra) -> list[str]:
    return ["--checkpoint", str(files["ckpt"]), "--data", str(data or files["npz"]), "--split", "test",
            "--json", str(out), "--draws", "12", "--batch", "4",
            *(() if "--refine-steps" in extra else ("--refine-steps", "0")), *extra]


@pytest.fixture(scope="module")
def result(files):
    out = files["base"] / "a.json"
    figs = files["base"] / "figs"
    assert ev.main(_args(files, out, None, "--figures", str(figs))) == 0
    return out, figs


def _fractions(res: dict):
    yield from (res[k] for k in TABLE_KEYS[2:8])
    yield from (res["counts"][k] for k in ("exact", "within2"))
    for d in ("true_to_pred", "pred_to_true"):
        yield res["distances"][d]["within_tol"]
    yield from (res["species"][k] for k in ("exact", "within2", "wrong", "voxel_top1_accuracy",
                                             "voxel_top1_accuracy_atoms"))
    rd = res["random_draws"]
    yield from (rd[k] for k in ("frac_empty", "frac_draws_with_close_pair", "frac_nn_below_close_real"))


def test_json_keys_and_ranges(files, result):
    res = json.loads(result[0].read_text())
    for k in TABLE_KEYS + RUN_KEYS + SECTIONS:
        assert k in res, k
    assert "latent_kl" not in res and "latent_rank" not in res
    assert res["checkpoint"] == str(files["ckpt"]) and res["data"] == [str(files["npz"])]
    assert res["representation"] == "unit_cell" and res["grid"]["n"] == 30 and res["latent"] == 8
    assert res["split"] == "test" and res["seed"] == 0 and res["draws"] == 12 and res["limit"] is None
    assert res["n_crystals"] == res["n_split"] == 4
    assert res["split_matches_checkpoint_test_ids"] is True
    # counts: the true side is the pymatgen structures' site count (independent of the harness)
    assert [r["id"] for r in res["per_crystal"]] == TEST_IDS
    assert res["counts"]["pairs"] == [[r["n_true"], r["n_pred"]] for r in res["per_crystal"]]
    assert [p[0] for p in res["counts"]["pairs"]] == [len(structure(n)) for n in TEST_IDS] == [8, 8, 8, 1]
    assert res["n_true_atoms"] == 25
    assert res["counts"]["exact"] == res["exact_count"] and res["counts"]["within2"] == res["within2_count"]
    for v in _fractions(res):
        assert v is None or 0.0 <= v <= 1.0
    # distances: both directions, monotone percentiles, histogram accounts for every finite distance
    for d, n in (("true_to_pred", 25), ("pred_to_true", sum(p[1] for p in res["counts"]["pairs"]))):
        dd = res["distances"][d]
        assert dd["n"] == n
        pct = [dd["percentiles"][str(p)] for p in ev.PERCENTILES]
        if all(v is not None for v in pct):
            assert pct == sorted(pct) and pct[0] >= 0
        h = dd["hist"]
        assert len(h["counts"]) == len(h["edges"]) - 1
        assert sum(h["counts"]) + h["overflow"] + dd["n_no_partner"] == n
    assert res["distances"]["true_to_pred"]["within_tol"] == res["atoms_within_tol"]
    # species: matched atoms, pairs consistent with the aggregate table
    sp = res["species"]
    assert sp["n_matched"] == round(res["atoms_within_tol"] * 25) == sum(c for _, _, c in sp["pairs"])
    if sp["n_matched"]:
        assert sp["exact"] == pytest.approx(res["species_accuracy"]) and sp["within2"] == pytest.approx(
            res["species_within2"])
        assert sp["exact"] + (sp["within2"] - sp["exact"]) + sp["wrong"] == pytest.approx(1.0)
    # voxel MSE
    vm = res["voxel_mse_stats"]
    assert vm["mean"] == pytest.approx(res["voxel_mse"], rel=1e-6) and res["voxel_mse"] >= 0
    assert vm["percentiles"]["5"] <= vm["percentiles"]["50"] <= vm["percentiles"]["99"]
    assert sum(vm["hist"]["counts"]) + vm["hist"]["underflow"] + vm["hist"]["overflow"] == 4
    # random draws against the real crystals' nearest-neighbour spacings
    rd = res["random_draws"]
    assert rd["n"] == 12 and rd["seed"] == 0
    nh = rd["nn_hist"]
    for k in ("draws", "real", "reconstructed"):
        assert len(nh[k]) == len(nh["edges"]) - 1
    assert sum(nh["draws"]) + nh["overflow"]["draws"] == rd["n_nn"]["draws"]
    assert rd["atoms_per_draw"]["mean"] >= 0


def test_real_spacings_match_an_independent_computation(result):
    """The 'real' NN histogram equals nearest-neighbour distances within each pymatgen cell."""
    res = json.loads(result[0].read_text())
    nn = []
    for name in TEST_IDS:
        s = structure(name)
        x = np.mod(s.frac_coords, 1.0) @ s.lattice.matrix
        if len(x) > 1:
            d = cdist(x, x) + np.diag(np.full(len(x), np.inf))
            nn.extend(d.min(1))
    rd = res["random_draws"]
    assert rd["n_nn"]["real"] == len(nn) == 24
    expected, _ = np.histogram(nn, rd["nn_hist"]["edges"])
    assert rd["nn_hist"]["real"] == expected.tolist()
    assert rd["nn_percentiles_real"]["50"] == pytest.approx(np.median(nn), abs=1e-4)
    assert rd["frac_nn_below_close_real"] == 0.0


def test_deterministic(files, result, tmp_path):
    out = tmp_path / "b.json"
    assert ev.main(_args(files, out)) == 0
    assert out.read_bytes() == result[0].read_bytes()
    # another seed: other rotations and draws
    out2 = tmp_path / "c.json"
    assert ev.main(_args(files, out2, None, "--seed", "1", "--draws", "0")) == 0
    assert json.loads(out2.read_text())["voxel_mse"] != json.loads(result[0].read_text())["voxel_mse"]


def test_figures_are_pngs(result, tmp_path):
    from training.figures import main as figures_main

    expected = sorted(f"{n}.png" for n in ("counts", "distances", "species", "voxel_mse", "random_draws",
                                           "error_budget"))
    redrawn = tmp_path / "redrawn"
    assert figures_main([str(result[0]), "--out", str(redrawn)]) == 0  # the same figures from the JSON alone
    for figs in (result[1], redrawn):
        assert sorted(p.name for p in figs.glob("*.png")) == expected
        for p in figs.glob("*.png"):
            b = p.read_bytes()
            assert len(b) > 2000 and b[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_selects_the_same_split_as_npz(files, result, tmp_path):
    out = tmp_path / "csv.json"
    assert ev.main(_args(files, out, files["csv"], "--val", str(VAL), "--test", str(TEST))) == 0
    a, b = json.loads(result[0].read_text()), json.loads(out.read_text())
    assert b["data"] == [str(files["csv"])]
    assert [r["id"] for r in b["per_crystal"]] == TEST_IDS
    assert b["split_ids_sha1"] == a["split_ids_sha1"] and b["split_matches_checkpoint_test_ids"] is True
    a.pop("data"), b.pop("data")
    assert a == b  # same crystals, same rotations: the same measures
    # no test crystal is in the training split of the CSV route either
    data = ev.load_data([str(files["csv"])], GRID, VAL, TEST)
    assert not set(data.ids[data.indices("train")]) & set(TEST_IDS)
    assert not set(data.formula[data.indices("train")]) & set(data.formula[data.indices("test")])


def test_limit_and_stdout_table(files, tmp_path, capsys):
    out = tmp_path / "l.json"
    capsys.readouterr()
    assert ev.main(_args(files, out, None, "--limit", "2", "--draws", "0")) == 0
    res = json.loads(out.read_text())
    assert res["n_crystals"] == 2 and res["n_split"] == 4 and res["limit"] == 2
    assert [r["id"] for r in res["per_crystal"]] == TEST_IDS[:2]
    assert res["random_draws"]["n_nn"]["draws"] == 0 and res["random_draws"]["frac_empty"] is None
    assert capsys.readouterr().out.strip() == ev.format_table(res).strip()


def test_training_cli_routes_to_the_harness(files, result, tmp_path):
    from training.__main__ import main as training_main

    out = tmp_path / "t.json"
    assert training_main(["evaluate", *_args(files, out)]) == 0
    assert out.read_bytes() == result[0].read_bytes()


def test_bad_inputs_give_one_line_errors(files, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    capsys.readouterr()
    assert ev.main(["--checkpoint", str(bad), "--data", str(files["npz"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: bad.safetensors: ")
    assert ev.main(["--checkpoint", str(files["ckpt"]), "--data", str(tmp_path / "none.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such data file" in err
    # as a module, in a fresh interpreter
    p = subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", str(bad), "--data",
                        str(files["npz"])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: bad.safetensors: ")


class _OneHotUNet(torch.nn.Module):
    """Logits = one-hot of the true S of the batch just voxelised (optionally Z shifted)."""

    def __init__(self, k: int, store: list, shift: int):
        super().__init__()
        self.k, self.store, self.shift = k, store, shift

    def forward(self, M: torch.Tensor) -> torch.Tensor:
        S = self.store[-1]
        assert S.shape == M.shape
        S = torch.where(S > 0, S + self.shift, S)
        return torch.nn.functional.one_hot(S, self.k).permute(0, 4, 1, 2, 3).float()


@pytest.mark.parametrize("shift", [0, 1])
def test_perfect_predictor_reference(files, tmp_path, monkeypatch, shift):
    """Decoded field = input field, U-Net = one-hot of the true S: the harness must report
    every atom within 0.5 Å, exact counts and (unshifted) exact species; with Z shifted by
    one, species are 0% exact but 100% within ±2."""
    store = []
    orig_vox, orig_load = ev.voxelise, ev.load_checkpoint

    def spy(*a, **k):
        out = orig_vox(*a, **k)
        store.append(out[1])
        return out

    def load(path, device="cpu"):
        model = orig_load(path, device)
        n = model.grid.n
        model.net.vae.encode = lambda M, cond=None: (M.flatten(1), torch.zeros_like(M.flatten(1)))
        model.net.vae.decode = lambda z, cond=None: z.view(-1, n, n, n)
        model.net.vae.decode_fields = lambda z, cond=None: (z.view(-1, n, n, n), None)
        model.net.unet = _OneHotUNet(model.config.n_classes, store, shift)
        return model

    monkeypatch.setattr(ev, "voxelise", spy)
    monkeypatch.setattr(ev, "load_checkpoint", load)
    out = tmp_path / "perfect.json"
    assert ev.main(_args(files, out, None, "--draws", "0", "--atoms", "unet")) == 0
    res = json.loads(out.read_text())
    assert res["atoms_method"] == "unet"
    assert res["n_crystals"] == 4 and res["n_true_atoms"] == 25
    assert res["atoms_within_tol"] == res["pred_within_tol"] == 1.0
    assert res["exact_count"] == res["within2_count"] == res["counts"]["exact"] == 1.0
    assert all(t == p for t, p in res["counts"]["pairs"])
    assert res["distances"]["true_to_pred"]["percentiles"]["99"] < 0.5
    assert res["distances"]["pred_to_true"]["within_tol"] == 1.0
    assert res["voxel_mse"] == 0.0 and res["voxel_mse_stats"]["hist"]["underflow"] == 4
    assert res["species"]["n_matched"] == 25
    if shift == 0:
        assert res["species_accuracy"] == res["species_within2"] == res["species"]["exact"] == 1.0
        assert res["species"]["voxel_top1_accuracy"] == res["species"]["voxel_top1_accuracy_atoms"] == 1.0
        assert all(a == b for a, b, _ in res["species"]["pairs"])
    else:
        assert res["species_accuracy"] == 0.0 and res["species_within2"] == 1.0 and res["species"]["wrong"] == 0.0
        assert res["species"]["voxel_top1_accuracy_atoms"] == 0.0
        assert all(b == a + 1 for a, b, _ in res["species"]["pairs"])
    # error budget: the U-Net on the true M is this same perfect U-Net; the decoded M is M
    eb = res["error_budget"]
    assert eb["unet_on_true_M"]["atoms_within_tol"] == eb["full"]["atoms_within_tol"] == 1.0
    assert eb["unet_on_true_M"]["species_accuracy"] == eb["full"]["species_accuracy"] == (1.0 if shift == 0 else 0.0)
    assert eb["unet_on_decoded_M"] == {**eb["full"], "what": eb["unet_on_decoded_M"]["what"]}
    # the Eq. 1 fit of the true M needs no U-Net: every atom within 0.1 Å with its Z, shift or not
    for stage in ("fit_on_true_M", "fit_on_true_M_0.1A"):
        assert eb[stage]["atoms_within_tol"] == eb[stage]["exact_count"] == eb[stage]["species_accuracy"] == 1.0


def _direct_peaks(pos: np.ndarray, Z: np.ndarray, grid: Grid, min_Z: float = 0.5) -> np.ndarray:
    """Voxel centres (Å) that beat all 26 neighbours in a float64 direct sum of Eq. 1 (in Z
    units) and exceed ``min_Z``: an independent reference for the peaks stage."""
    c = (np.arange(grid.n) + 0.5) * grid.spacing
    X = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    M = np.zeros((grid.n,) * 3)
    for p, z in zip(pos, Z):
        M += z * np.exp(-((X - p) ** 2).sum(-1) / (2 * grid.sigma**2))
    P = np.pad(M, 1, constant_values=-np.inf)
    n = grid.n
    best = np.full_like(M, -np.inf)
    for dx in (0, 1, 2):
        for dy in (0, 1, 2):
            for dz in (0, 1, 2):
                if (dx, dy, dz) != (1, 1, 1):
                    best = np.maximum(best, P[dx:dx + n, dy:dy + n, dz:dz + n])
    return c[np.argwhere((M >= best) & (M > min_Z))]


def test_error_budget_stages(files, result):
    """The budget's 'full' row is the headline table; the peaks stage finds the peaks of an
    independent float64 field of the same rotated cells (same counts; matches within the
    0.29 Å a voxel centre can be off a sub-voxel peak)."""
    from crystalstudio.core.density import Crystal, cell_positions, random_rotations

    res = json.loads(result[0].read_text())
    eb = res["error_budget"]
    # no refinement in this run: the refined rows are left out
    assert list(eb) == [k for k in ev.STAGES if "refined" not in k] == [
        "true_field_peaks", "unet_on_true_M", "fit_on_true_M", "fit_on_true_M_0.1A", "unet_on_decoded_M",
        "fit_on_decoded_M", "full"]
    for k in ("atoms_within_tol", "pred_within_tol", "exact_count", "species_accuracy"):
        assert eb["full"][k] == pytest.approx(res[k])
    assert eb["true_field_peaks"]["species_accuracy"] is None
    rots = random_rotations(len(TEST_IDS), 0)
    exact, loose, strict, n, n_peaks = [], 0, 0, 0, 0
    for name, R in zip(TEST_IDS, rots):
        s = structure(name)
        cry = Crystal(s.lattice.matrix, s.frac_coords, np.array([sp.Z for sp in s.species]))
        pos = cell_positions(cry, GRID, R)
        pk = _direct_peaks(pos, cry.Z, GRID)
        exact.append(len(pk) == len(pos))
        d = cdist(pos, pk).min(1) if len(pk) else np.full(len(pos), np.inf)
        loose += int((d <= 0.5 + 0.29).sum())  # a voxel centre is within 0.29 Å of a sub-voxel peak
        strict += int((d <= 0.5 - 0.29).sum())
        n, n_peaks = n + len(pos), n_peaks + len(pk)
    assert eb["true_field_peaks"]["exact_count"] == pytest.approx(np.mean(exact))
    assert eb["true_field_peaks"]["n_pred_atoms"] == n_peaks == 17  # GaAs 8, Po 1, MgO and LiF 4 each
    assert strict <= round(eb["true_field_peaks"]["atoms_within_tol"] * n) <= loose
    # MgO, LiF: the light anion 2.0-2.1 Å from the cation is a shoulder, not a peak, at sigma 1 Å
    assert eb["true_field_peaks"]["atoms_within_tol"] < 1.0


@pytest.mark.parametrize("sigma", [0.4, 1.0])
def test_peak_separability_matches_an_independent_field(files, sigma, capsys):
    """Per sigma, the exact-count fraction and the number of matched atoms agree with peaks of
    a float64 direct sum; narrow Gaussians separate every atom of these cells, 1 Å ones do not."""
    from crystalstudio.core.density import Crystal, cell_positions, random_rotations
    from training.__main__ import main as training_main

    data = files["data"]
    idx = data.indices("test")
    (row,) = ev.peak_separability(data, idx, [sigma], GRID, seed=0)
    g = Grid(sigma=sigma)
    exact, strict, loose, n = [], 0, 0, 0
    for name, R in zip(TEST_IDS, random_rotations(len(idx), 0)):
        s = structure(name)
        cry = Crystal(s.lattice.matrix, s.frac_coords, np.array([sp.Z for sp in s.species]))
        pos = cell_positions(cry, g, R)
        pk = _direct_peaks(pos, cry.Z, g)
        exact.append(len(pk) == len(pos))
        d = cdist(pos, pk).min(1)
        strict, loose, n = strict + int((d <= 0.21).sum()), loose + int((d <= 0.79).sum()), n + len(pos)
    assert row["sigma"] == sigma and row["n_true_atoms"] == n == 25
    assert row["exact_count"] == pytest.approx(np.mean(exact))
    assert strict <= round(row["atoms_within_tol"] * n) <= loose
    assert (row["atoms_within_tol"] == 1.0) == (sigma == 0.4)
    training_main(["separability", "--data", str(files["npz"]), "--split", "test", "--sigmas", f"{sigma}"])
    assert f"| {sigma:.2f} | {100 * row['atoms_within_tol']:.1f}% |" in capsys.readouterr().out


def test_fit_prior_then_draws_block(files, tmp_path):
    """fit-prior writes a prior chosen on val into a copy; the harness then reports draws from
    both priors and the interpolation midpoints; draws are reproducible from the seed."""
    from crystalstudio.core.checkpoint import load_checkpoint
    from training.__main__ import main as training_main

    out = tmp_path / "with_prior.safetensors"
    assert training_main(["fit-prior", "--checkpoint", str(files["ckpt"]), "--data", str(files["npz"]),
                          "--out", str(out), "--rotations", "4"]) == 0
    m = load_checkpoint(out, jit=False)
    assert m.prior is not None and m.prior.latent == 8
    assert m.prior.info["chosen_by"] == "validation mean log-likelihood"
    ref = m.prior.info["reference"]
    assert sum(ref["atom_counts"]) == 2 * 4 and set(ref["formulas"]) == {"NaCl", "CsCl"}
    assert load_checkpoint(files["ckpt"], jit=False).prior is None  # the source is untouched
    # the species prior: the training split's atoms counted per Z (NaCl and CsCl: 11, 17, 55)
    from training.data import CrystalArrays

    data = CrystalArrays.load(files["npz"])
    tr = data.indices("train")
    want = np.bincount(np.concatenate([data.Z[data.offsets[i]:data.offsets[i + 1]] for i in tr]), minlength=95)
    np.testing.assert_array_equal(m.species_prior, want)
    assert m.species_prior[[11, 17, 55]].sum() == m.species_prior.sum() > 0
    only = tmp_path / "species_only.safetensors"
    assert training_main(["fit-prior", "--checkpoint", str(files["ckpt"]), "--data", str(files["npz"]),
                          "--out", str(only), "--species-only"]) == 0
    s = load_checkpoint(only, jit=False)
    assert s.prior is None and np.array_equal(s.species_prior, want)
    res = [json.loads(p.read_text()) for p in (tmp_path / "a.json", tmp_path / "b.json")
           if ev.main(["--checkpoint", str(out), "--data", str(files["npz"]), "--split", "test", "--json", str(p),
                       "--draws", "6", "--batch", "4", "--no-budget"]) == 0]
    assert len(res) == 2 and res[0]["validity"] == res[1]["validity"]
    d = res[0]["validity"]
    for k in ("standard", "aggregate", "midpoints"):
        assert d[k]["n"] == (6 if k != "midpoints" else 2)  # 4 test crystals: 2 pairs
        assert 0 <= d[k]["structural_valid"] <= 1


def test_refined_run_keeps_the_encoder_rows(files, result, tmp_path):
    """With --refine-steps the model's atoms come from the refined latent: the budget gains
    the refined rows (the 'full' row is the refined fit) and keeps the encoder-only rows."""
    out = tmp_path / "refined.json"
    assert ev.main(_args(files, out, None, "--draws", "0", "--refine-steps", "3")) == 0
    res = json.loads(out.read_text())
    assert res["refine_steps"] == 3
    eb = res["error_budget"]
    assert list(eb) == ["true_field_peaks", "unet_on_true_M", "fit_on_true_M", "fit_on_true_M_0.1A",
                        "unet_on_decoded_M", "fit_on_decoded_M", "unet_on_refined_M", "fit_on_refined_M", "full"]
    assert eb["fit_on_refined_M"] == {**eb["full"], "what": eb["fit_on_refined_M"]["what"]}
    plain = json.loads(result[0].read_text())  # the encoder-only rows do not depend on refinement
    for stage in ("unet_on_decoded_M", "fit_on_decoded_M", "fit_on_true_M"):
        assert eb[stage] == plain["error_budget"][stage]
    with pytest.raises(SystemExit):
        ev.main(_args(files, out, None, "--refine-steps", "x"))
    assert ev.main(_args(files, out, None, "--refine-steps", "-1")) == 2


def test_multi_start_refinement_run(files, tmp_path):
    """--refine-lr with several rates: recorded in the JSON; on this tiny model a large second
    rate wins on some crystals, so the voxel MSE falls below the single rate's; a bad list is
    refused with exit 2."""
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    base = ("--draws", "0", "--no-budget", "--refine-steps", "4")
    assert ev.main(_args(files, one, None, *base, "--refine-lr", "0.1")) == 0
    assert ev.main(_args(files, many, None, *base, "--refine-lr", "0.1,2")) == 0
    r1, r2 = json.loads(one.read_text()), json.loads(many.read_text())
    assert r1["refine_lr"] == [0.1] and r2["refine_lr"] == [0.1, 2.0]
    assert r2["voxel_mse"] < r1["voxel_mse"]
    for bad in ("0.1,x", "0", "-0.2,0.1"):
        assert ev.main(_args(files, one, None, *base, f"--refine-lr={bad}")) == 2


@pytest.mark.parametrize("batch", ["1", "4"])
def test_true_fit_limit_fits_the_first_crystals_only(files, result, tmp_path, capsys, batch):
    """--true-fit-limit N: the budget's true-M fit covers the first N crystals (whatever the
    batch), every other stage is the plain run's, and the printed row says so."""
    out = tmp_path / "limited.json"
    assert ev.main(_args(files, out, None, "--true-fit-limit", "2", "--batch", batch)) == 0
    res, plain = json.loads(out.read_text()), json.loads(result[0].read_text())
    eb = res["error_budget"]
    assert res["true_fit_limit"] == 2 and plain["true_fit_limit"] is None
    for stage in ("fit_on_true_M", "fit_on_true_M_0.1A"):
        assert eb[stage]["n_crystals"] == 2
        # the fit of a true field is exact here: it predicts the first two crystals' atoms
        assert eb[stage]["n_pred_atoms"] == sum(r["n_true"] for r in res["per_crystal"][:2])
        assert eb[stage]["atoms_within_tol"] == 1.0
    for stage in ("true_field_peaks", "unet_on_true_M", "unet_on_decoded_M", "fit_on_decoded_M", "full"):
        assert eb[stage]["n_crystals"] == len(TEST_IDS)
        assert eb[stage]["atoms_within_tol"] == plain["error_budget"][stage]["atoms_within_tol"]
    assert "| fit_on_true_M (first 2 crystals) |" in capsys.readouterr().out
    assert ev.main(_args(files, out, None, "--true-fit-limit", "-1")) == 2


def test_fit_workers_give_the_same_measures(files, result, tmp_path):
    """--fit-workers 2: the true-M fits run in two worker processes and every measure is the
    single-process run's; 0 workers is refused with exit 2."""
    out = tmp_path / "workers.json"
    assert ev.main(_args(files, out, None, "--fit-workers", "2")) == 0
    res, plain = json.loads(out.read_text()), json.loads(result[0].read_text())
    assert res["error_budget"] == plain["error_budget"]
    assert res["per_crystal"] == plain["per_crystal"]
    assert ev.main(_args(files, out, None, "--fit-workers", "0")) == 2


def test_multi_start_refinement_of_a_conditional_model(files, tmp_path):
    """A conditional checkpoint (Sec. 4.5) refined from several rates: its condition is tiled
    over the starts (a batch of 4 fields, 2 rates: 8 decoder rows), and the best of the starts
    reconstructs no worse than the single rate."""
    torch.manual_seed(1)
    net = CrystalNet(ModelConfig(**TINY, conditional=True, cond_scale=3.0))
    ckpt = tmp_path / "cond.safetensors"
    save_checkpoint(ckpt, net, GRID, {"representation": "unit_cell"})
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    base = ["--checkpoint", str(ckpt), "--data", str(files["npz"]), "--split", "test", "--draws", "0",
            "--no-budget", "--batch", "4", "--refine-steps", "4"]
    assert ev.main([*base, "--json", str(one), "--refine-lr", "0.1"]) == 0
    assert ev.main([*base, "--json", str(many), "--refine-lr", "0.1,2"]) == 0
    r1, r2 = json.loads(one.read_text()), json.loads(many.read_text())
    assert r2["refine_lr"] == [0.1, 2.0] and r2["n_crystals"] == len(TEST_IDS)
    assert r2["voxel_mse"] <= r1["voxel_mse"] * 1.001


def test_repeat_condition_tiles_start_major():
    from crystalstudio.core.refine import repeat_condition

    c = torch.tensor([1.0, 2.0, 3.0])
    assert repeat_condition(c, 6).tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert repeat_condition(None, 6) is None
    with pytest.raises(ValueError, match="tile"):
        repeat_condition(c, 7)


def test_fit_cache_resumes_without_refitting(files, result, tmp_path, monkeypatch, capsys):
    """--fit-cache: the first run stores one JSON line per true-M fit and measures what a plain
    run measures; a second run reads every fit back (the fit itself is made to fail, so it
    cannot have run) and writes the same JSON; a line cut short by a kill is skipped and the
    next fit starts on a fresh line; a change of the fitting code misses the cache."""
    import training.fit_cache as fc

    cache = tmp_path / "fits.jsonl"
    out1, out2 = tmp_path / "c1.json", tmp_path / "c2.json"
    assert ev.main(_args(files, out1, None, "--fit-cache", str(cache))) == 0
    plain = json.loads(result[0].read_text())
    r1 = json.loads(out1.read_text())
    assert r1["error_budget"] == plain["error_budget"] and r1["per_crystal"] == plain["per_crystal"]
    lines = cache.read_text().splitlines()
    assert len(lines) == len(TEST_IDS)
    assert all(set(json.loads(line)) == {"key", "positions", "Z", "amplitude", "seconds"} for line in lines)

    def no_fit(*a, **k):
        raise AssertionError("fitted although the cache holds the fit")

    monkeypatch.setattr(fc, "fit_atoms", no_fit)
    assert ev.main(_args(files, out2, None, "--fit-cache", str(cache))) == 0
    r2 = json.loads(out2.read_text())
    assert r2 == r1  # the JSON holds no wall time: a resumed run writes the same file
    # the fit times printed are those measured when the fits ran, read back from the file
    stored = [json.loads(line)["seconds"] for line in lines]
    assert ev.fit_time_line(stored) in capsys.readouterr().err
    assert f"{len(TEST_IDS)} fits)" in ev.fit_time_line(stored)

    # a kill in the middle of the last line: that fit is lost, the others are kept
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    store = fc.FitCache(cache)
    assert len(store) == len(TEST_IDS) - 1 and store.skipped == 1
    monkeypatch.undo()
    assert ev.main(_args(files, out2, None, "--fit-cache", str(cache))) == 0
    again = fc.FitCache(cache)
    assert len(again) == len(TEST_IDS) and again.skipped == 1
    assert json.loads(out2.read_text())["error_budget"] == plain["error_budget"]

    # other fitting code: no stored key matches, so the fit runs (and here fails)
    monkeypatch.setattr(fc, "code_version", lambda: "another version")
    monkeypatch.setattr(fc, "fit_atoms", no_fit)
    with pytest.raises(AssertionError, match="fitted although"):
        ev.main(_args(files, out2, None, "--fit-cache", str(cache)))


def test_fit_cache_with_workers(files, result, tmp_path):
    """--fit-cache with --fit-workers 2: the workers' fits are stored as they finish and the
    measures are the plain run's."""
    cache = tmp_path / "fits.jsonl"
    out = tmp_path / "w.json"
    assert ev.main(_args(files, out, None, "--fit-workers", "2", "--fit-cache", str(cache))) == 0
    assert json.loads(out.read_text())["error_budget"] == json.loads(result[0].read_text())["error_budget"]
    assert len(cache.read_text().splitlines()) == len(TEST_IDS)


def test_light_subtract_is_recorded_and_overridden_for_the_run_only(files, result, tmp_path):
    """--light-subtract on|off: the run's JSON records the reading used (default: the
    checkpoint's, false for this one); the checkpoint file is not changed, and a model without
    a light channel reads the same atoms either way."""
    plain = json.loads(result[0].read_text())
    assert plain["light_subtract"] is False
    before = files["ckpt"].read_bytes()
    out = tmp_path / "ls.json"
    assert ev.main(_args(files, out, None, "--no-budget", "--draws", "0", "--light-subtract", "on")) == 0
    res = json.loads(out.read_text())
    assert res["light_subtract"] is True and files["ckpt"].read_bytes() == before
    assert res["per_crystal"] == plain["per_crystal"]
    with pytest.raises(SystemExit):
        ev.main(_args(files, out, None, "--light-subtract", "yes"))
    # --lattice-fold: only a repeating-lattice model folds; this unit-cell one records false
    assert plain["lattice_fold"] is False
    assert ev.main(_args(files, out, None, "--no-budget", "--draws", "0", "--lattice-fold", "on")) == 0
    res = json.loads(out.read_text())
    assert res["lattice_fold"] is False and res["per_crystal"] == plain["per_crystal"]
