"""The ``crystalstudio`` command line, in process (``cli.main``) plus one real console-script run.

Nothing here depends on how well the shipped checkpoint reconstructs; renders are tiny.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from crystalstudio.cli import EXIT_BAD_INPUT, main

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
NACL, SRTIO3 = str(SAMPLES / "NaCl.cif"), str(SAMPLES / "SrTiO3.cif")
SMALL = ["--size", "160x120", "-q"]


def one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("crystalstudio: error: ")
    for n in needles:
        assert n in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- reconstruct


def test_reconstruct_json(capsys):
    assert main(["reconstruct", NACL, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("n_true", "n_pred", "atoms_within_tol", "pred_within_tol", "exact_count", "species_accuracy",
                "median_error_A", "voxel_mse", "formula", "file"):
        assert key in m
    assert m["n_true"] == 8 and m["formula"] == "NaCl"
    assert 0.0 <= m["atoms_within_tol"] <= 1.0


def test_reconstruct_atoms_method(capsys, tmp_path):
    """--atoms fit lists each atom's amplitude; --atoms unet (the paper's path) has none; the
    written CIF holds the atoms the JSON reports."""
    out = tmp_path / "fit.xyz"
    assert main(["reconstruct", SRTIO3, "--json", "--out", str(out)]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["atoms_method"] == "fit" and len(fit["atoms"]) == fit["n_pred"]
    assert all(a["amplitude"] > 0 and a["amplitude_sigma"] >= 0 for a in fit["atoms"])
    assert int(out.read_text().split()[0]) == fit["n_pred"]
    assert main(["reconstruct", SRTIO3, "--json", "--atoms", "unet"]) == 0
    unet = json.loads(capsys.readouterr().out)
    assert unet["atoms_method"] == "unet" and "atoms" not in unet
    assert unet["voxel_mse"] == fit["voxel_mse"]  # same decoded field, another reading of it
    with pytest.raises(SystemExit) as e:  # argparse: an unknown method is a usage error
        main(["reconstruct", SRTIO3, "--atoms", "peaks"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_reconstruct_missing_file(capsys, tmp_path):
    assert main(["reconstruct", str(tmp_path / "nope.cif")]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, "nope.cif")


def test_reconstruct_garbage_file(capsys, tmp_path):
    bad = tmp_path / "garbage.cif"
    bad.write_bytes(b"\x00\x01 this is not a crystal \xff\n" * 20)
    assert main(["reconstruct", str(bad)]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, "garbage.cif")


# --------------------------------------------------------------------------- videos


def test_interpolate_mp4(capsys, tmp_path):
    out = tmp_path / "movie.mp4"
    assert main(["interpolate", NACL, SRTIO3, "--frames", "4", "--fps", "8", "--out", str(out),
                 "--mode", "spherical", "--orbit", "30", *SMALL]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(tmp_path.iterdir()) == [out]
    frames = list(iio.imiter(out, plugin="FFMPEG"))
    assert len(frames) == 4 and frames[0].shape == (120, 160, 3)


def test_sweep_gif(capsys, tmp_path):
    out = tmp_path / "sweep.gif"
    assert main(["sweep", NACL, "--dim", "0", "--frames", "3", "--out", str(out), "--no-density", *SMALL]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    frames = iio.imread(out, index=None, plugin="pillow")
    assert frames.shape[0] == 3 and frames.shape[1:3] == (120, 160)  # titles differ: no frame merged


@pytest.mark.parametrize("args, needle", [
    (["interpolate", NACL, SRTIO3, "--size", "big"], "--size"),
    (["interpolate", NACL, SRTIO3, "--size", "161x120"], "even"),
    (["interpolate", NACL, "{tmp}/missing.cif"], "missing.cif"),
    (["sweep", NACL, "--dim", "100000"], "--dim"),
    (["interpolate", NACL, SRTIO3, "--max-density", "2"], "not a conditional checkpoint"),
])
def test_video_bad_input(capsys, tmp_path, args, needle):
    out = tmp_path / "movie.mp4"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*args, "--frames", "3", "--out", str(out), "-q"]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


def test_video_bad_suffix(capsys, tmp_path):
    assert main(["interpolate", NACL, SRTIO3, "--out", str(tmp_path / "movie.avi"), *SMALL]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, "movie.avi")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- stills


def test_sample_writes_pngs(capsys, tmp_path):
    out = tmp_path / "draws"
    assert main(["sample", "--n", "2", "--seed", "3", "--out", str(out), *SMALL]) == 0
    summary = capsys.readouterr().out
    assert "2 samples" in summary and "sample_001" in summary
    for i in range(2):
        img = iio.imread(out / f"sample_{i:03d}.png")
        assert img.shape[:2] == (120, 160)
        assert np.load(out / f"sample_{i:03d}.npy").shape == (30, 30, 30)
    cifs = sorted(p.name for p in out.glob("*.cif"))
    assert set(cifs) <= {"sample_000.cif", "sample_001.cif"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_sample_bad_size(capsys, tmp_path):
    assert main(["sample", "--n", "1", "--out", str(tmp_path / "d"), "--size", "640by480"]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, "--size")
    assert list(tmp_path.iterdir()) == []


def test_export_density(capsys, tmp_path):
    vti, npy = tmp_path / "field.vti", tmp_path / "field.npy"
    assert main(["export-density", NACL, "--out", str(vti), "-q"]) == 0
    assert main(["export-density", NACL, "--out", str(npy), "-q"]) == 0
    assert capsys.readouterr().out.split() == [str(vti), str(npy)]
    import pyvista as pv

    M = np.load(npy)
    dens = np.asarray(pv.read(vti).point_data["density"]).reshape(M.shape, order="F")
    np.testing.assert_allclose(dens, M)
    assert main(["export-density", NACL, "--out", str(tmp_path / "field.txt")]) == EXIT_BAD_INPUT
    one_error_line(capsys.readouterr().err, "field.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field.npy", "field.vti"]


# --------------------------------------------------------------------------- console script


def test_console_script_reconstruct_json():
    exe = shutil.which("crystalstudio")
    if exe is None:
        pytest.skip("the crystalstudio console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "reconstruct", NACL, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["n_true"] == 8 and m["formula"] == "NaCl"


def test_sample_prior_and_report(capsys, tmp_path):
    """Draws come from the shipped checkpoint's aggregate prior by default and from N(0, I)
    with --prior standard (each the same z as the library draws); --report writes the
    validity table and report.json."""
    import json

    from crystalstudio.core.checkpoint import load_checkpoint
    from crystalstudio.core.latent import random_latents
    from crystalstudio.session import default_checkpoint

    model = load_checkpoint(default_checkpoint())
    for prior in ("aggregate", "standard"):
        out = tmp_path / prior
        assert main(["sample", "--n", "3", "--seed", "5", "--out", str(out), "--prior", prior, "--report",
                     "--no-density", "--size", "64x48"]) == 0
        text = capsys.readouterr().out
        rep = json.loads((out / "report.json").read_text())
        used = "aggregate" if (prior == "aggregate" and model.prior is not None) else "standard"
        assert rep["prior"] == used and rep["n"] == 3 and f"{used} prior" in text
        assert "structurally valid" in text and 0 <= rep["structural_valid"] <= 1
        z = model.prior.sample(3, 5) if used == "aggregate" else random_latents(3, model.latent, 5)
        np.testing.assert_allclose(np.load(out / "sample_001.npy"), model.decode(z[1]), atol=1e-5)


def test_reconstruct_window_origin(capsys, tmp_path):
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    from crystalstudio.session import lattice_checkpoint

    if lattice_checkpoint() is None:
        pytest.skip("no repeating-lattice checkpoint shipped")
    path = tmp_path / "big.cif"
    CifWriter(Structure(Lattice.cubic(13.0), ["Fe", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])).write_file(str(path))
    runs = {}
    for uvw in ("0,0,0", "0.25,0,0"):
        assert main(["reconstruct", str(path), "--json", "--window-origin", uvw]) == 0
        runs[uvw] = json.loads(capsys.readouterr().out)
    assert runs["0.25,0,0"]["representation"] == "repeating_lattice"
    assert runs["0.25,0,0"]["window_origin"] == [0.25, 0.0, 0.0] and runs["0,0,0"]["window_origin"] == [0, 0, 0]
    assert main(["reconstruct", str(path), "--window-origin", "0.1,x"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--window-origin 0.1,x" in err[0]


def test_reconstruct_refine_steps(capsys):
    """--refine-steps 0 is the encoder alone; the default refines the latent, and the
    reconstruction it gives is closer to the input field; a negative count is a usage error."""
    assert main(["reconstruct", SRTIO3, "--json", "--refine-steps", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["reconstruct", SRTIO3, "--json"]) == 0
    refined = json.loads(capsys.readouterr().out)
    assert plain["refine_steps"] == 0 and refined["refine_steps"] > 0
    assert refined["voxel_mse"] < plain["voxel_mse"]
    with pytest.raises(SystemExit) as e:
        main(["reconstruct", SRTIO3, "--refine-steps", "-1"])
    assert e.value.code == 2 and "whole number" in capsys.readouterr().err
