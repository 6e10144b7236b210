"""Headless exports (:mod:`crystalstudio.render.export`): videos, stills, density fields.

Small sizes (160x120, a few frames) keep this fast on a 2-core machine. Nothing here depends
on how well the shipped checkpoint reconstructs: checks on what the frames *show* use a toy
model whose decoded field is a blob that moves with z.
"""

from __future__ import annotations

import types
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import pyvista as pv

from crystalstudio.core.density import Grid
from crystalstudio.core.latent import interpolate
from crystalstudio.core.segment import Atoms
from crystalstudio.io.structures import read_structure
from crystalstudio.render import export as ex
from crystalstudio.session import Frame, Session

SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "samples"
W, H = 160, 120
T = 6


class ToyModel:
    """Decodes z into one Gaussian atom (peak Z = 20) at 5 + 3 tanh(z[:3]) Å; segments it as Na."""

    latent = 4

    def __init__(self) -> None:
        self.grid = Grid()
        self.path = None

    def centre(self, z) -> np.ndarray:
        return 5.0 + 3.0 * np.tanh(np.asarray(z, np.float64)[:3])

    def decode(self, z, cond=None):
        z = np.asarray(z, np.float32)
        c = self.grid.centres()
        out = []
        for zi in z.reshape(-1, self.latent):
            x0, y0, w0 = self.centre(zi)
            d2 = (c[:, None, None] - x0) ** 2 + (c[None, :, None] - y0) ** 2 + (c[None, None, :] - w0) ** 2
            out.append(20.0 / self.grid.peak_scale * np.exp(-d2 / (2 * self.grid.sigma ** 2)))
        M = np.asarray(out, np.float32)
        return M[0] if z.ndim == 1 else M

    def segment(self, M):
        i = np.unravel_index(np.argmax(M), M.shape)
        return Atoms(((np.asarray(i) + 0.5) * self.grid.spacing)[None], np.array([11]), np.array([1]))


@pytest.fixture(scope="module")
def session() -> Session:
    return Session()


@pytest.fixture(scope="module")
def path(session) -> np.ndarray:
    a = session.compute(read_structure(SAMPLES / "NaCl.cif", session.grid))
    b = session.compute(read_structure(SAMPLES / "SrTiO3.cif", session.grid))
    return interpolate(a.mu, b.mu, T)


@pytest.fixture
def toy():
    return types.SimpleNamespace(model=ToyModel())


@pytest.fixture
def toy_path() -> np.ndarray:
    return interpolate(np.array([-1.5, 1.5, 0, 0], np.float32), np.array([1.5, -1.5, 0, 0], np.float32), T)


def read_frames(p: Path) -> list[np.ndarray]:
    plugin = "FFMPEG" if p.suffix == ".mp4" else "pillow"
    return [np.asarray(f)[..., :3] for f in iio.imiter(p, plugin=plugin)]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# --------------------------------------------------------------------------- videos


def test_mp4_of_an_interpolation_between_samples(session, path, tmp_path):
    out = tmp_path / "movie.mp4"
    calls = []
    got = ex.export_path(session, path, out, fps=10, size=(W, H), orbit_degrees=180,
                         progress=lambda i, n: calls.append((i, n)),
                         titles=[f"t = {t:.2f}" for t in np.linspace(0, 1, T)])
    assert got == out
    assert sorted(tmp_path.iterdir()) == [out]  # no temporary file left
    frames = read_frames(out)
    assert len(frames) == T
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)
    assert mad(frames[0], frames[-1]) > 1.0  # the camera turned half a circle
    assert calls[-1] == (T, T) and all(n == T for _, n in calls)
    assert [i for i, _ in calls] == sorted(i for i, _ in calls)  # never goes backwards


def test_frames_follow_the_latent_path(toy, toy_path, tmp_path):
    out = tmp_path / "toy.mp4"
    ex.export_path(toy, toy_path, out, fps=10, size=(W, H))
    frames = read_frames(out)
    assert len(frames) == T
    assert mad(frames[0], frames[-1]) > 1.0  # the atom and its density moved across the cube
    assert all(mad(a, b) > 0.05 for a, b in zip(frames, frames[1:]))


def test_gif(toy, toy_path, tmp_path):
    out = tmp_path / "toy.gif"
    ex.export_path(toy, toy_path, out, fps=10, size=(W, H), titles=lambda i: f"frame {i}")
    assert sorted(tmp_path.iterdir()) == [out]
    frames = read_frames(out)
    assert len(frames) == T
    assert frames[0].shape == (H, W, 3)
    meta = iio.immeta(out, plugin="pillow")
    assert meta["loop"] == 0 and meta["duration"] == 100


@pytest.mark.parametrize("name", ["movie.mp4", "movie.gif"])
def test_cancel_leaves_nothing(toy, toy_path, tmp_path, name):
    seen = []

    def progress(i, n):
        seen.append(i)
        return i < 2  # stop after two frames

    with pytest.raises(ex.ExportCancelled):
        ex.export_path(toy, toy_path, tmp_path / name, size=(W, H), progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert max(seen) == 2


@pytest.mark.parametrize("name", ["movie.mp4", "movie.gif"])
def test_failing_renderer_leaves_nothing_and_keeps_an_old_file(toy, toy_path, tmp_path, monkeypatch, name):
    out = tmp_path / name
    out.write_bytes(b"old video")
    real = ex.FrameRenderer.render

    def render(self, frame, index=0, total=1, title=None):
        if index == 3:
            raise RuntimeError("GL context lost")
        return real(self, frame, index, total, title)

    monkeypatch.setattr(ex.FrameRenderer, "render", render)
    with pytest.raises(RuntimeError, match="GL context lost"):
        ex.export_path(toy, toy_path, out, size=(W, H))
    assert list(tmp_path.iterdir()) == [out]
    assert out.read_bytes() == b"old video"


@pytest.mark.parametrize("name, size, match", [
    ("movie.avi", (W, H), "unsupported video format"),
    ("movie", (W, H), "unsupported video format"),
    ("movie.mp4", (161, 120), "even width and height"),
    ("movie.mp4", (0, 120), "between"),
])
def test_bad_arguments_fail_before_writing(toy, toy_path, tmp_path, name, size, match):
    with pytest.raises(ValueError, match=match):
        ex.export_path(toy, toy_path, tmp_path / name, size=size)
    with pytest.raises(ValueError):
        ex.export_path(toy, toy_path[:, :3], tmp_path / "x.mp4", size=(W, H))  # wrong latent size
    assert list(tmp_path.iterdir()) == []


def test_write_video_keeps_the_exact_size(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (46, 62, 3), dtype=np.uint8) for _ in range(4)]
    out = ex.write_video(images, tmp_path / "noise.mp4", fps=5)
    frames = read_frames(out)
    assert len(frames) == 4 and frames[0].shape == (46, 62, 3)
    with pytest.raises(ValueError, match="frame 1"):
        ex.write_video([images[0], images[1][:, :60]], tmp_path / "mixed.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.mp4"]


def test_parse_size():
    assert ex.parse_size("1280x720") == (1280, 720)
    assert ex.parse_size(" 640 X 480 ") == (640, 480)
    assert ex.parse_size((320, 240)) == (320, 240)
    for bad in ("1280", "1280x", "x720", "-5x10", "1280x720x3", "0x10", "99999x10", "axb"):
        with pytest.raises(ValueError):
            ex.parse_size(bad)


# --------------------------------------------------------------------------- renderer


def test_frame_renderer_orbit_and_layers(toy, toy_path):
    f = next(ex.decode_frames(toy, toy_path[:1]))
    with ex.FrameRenderer(toy.model.grid, (W, H), orbit_degrees=90) as r:
        a, b = r.render(f, 0, 2), r.render(f, 1, 2)
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    assert mad(a, b) > 0.5
    with ex.FrameRenderer(toy.model.grid, (W, H), show_density=False, show_atoms=False) as r:
        empty = r.render(f)
    assert mad(a, empty) > 0.5


def test_cpu_volume_mapper_matches_the_scene_mapper(toy, toy_path):
    """The CPU ray caster swapped in for speed shows the same field, and follows updates."""
    f0, f1 = list(ex.decode_frames(toy, toy_path[[0, -1]]))
    imgs = {}
    for mode in ("cpu", "scene"):
        with ex.FrameRenderer(toy.model.grid, (W, H), volume_mode=mode, show_atoms=False, antialias=False) as r:
            imgs[mode] = (r.render(f0), r.render(f1))
    with ex.FrameRenderer(toy.model.grid, (W, H), show_density=False, show_atoms=False) as r:
        empty = r.render(f0)
    for k in (0, 1):
        assert mad(imgs["cpu"][k], imgs["scene"][k]) < 0.3
        assert mad(imgs["cpu"][k], empty) > 0.5
    assert mad(imgs["cpu"][0], imgs["cpu"][1]) > 0.5
    # without a fixed colour range the scene widens it for a peak above Z = 30, through the mapper
    hot = Frame(f0.z, f0.M_hat * 2.5, f0.atoms)  # peak Z = 50
    with ex.FrameRenderer(toy.model.grid, (W, H), volume_mode="cpu") as r:
        r.render(f0)
        r.render(hot)
        assert r.scene.clim == (0.0, 50.0)
    with pytest.raises(ValueError, match="volume_mode"):
        ex.FrameRenderer(toy.model.grid, (W, H), volume_mode="fast")


def test_segment_batch_matches_segment(session, path):
    fields = session.model.decode(path[:3])
    for got, M in zip(ex.segment_batch(session.model, fields), fields):
        want = session.model.segment(M, gate=session.model.draw_gate)  # a latent path's frames: the draw gate
        np.testing.assert_array_equal(got.Z, want.Z)
        np.testing.assert_allclose(got.positions, want.positions, atol=1e-4)


# --------------------------------------------------------------------------- stills


def test_png_roundtrip(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    p = ex.save_png(img, tmp_path / "frame.png")
    np.testing.assert_array_equal(iio.imread(p)[..., :3], img)
    with pytest.raises(ValueError):
        ex.save_png(img, tmp_path / "frame.jpg")
    assert [q.name for q in tmp_path.iterdir()] == ["frame.png"]


def test_npy_roundtrip(tmp_path):
    M = np.random.default_rng(2).random((30, 30, 30), dtype=np.float32)
    p = ex.save_density_npy(M, tmp_path / "field.npy")
    back = np.load(p)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, M)


def test_vti_roundtrip(tmp_path):
    grid = Grid()
    M = np.random.default_rng(3).random((30, 30, 30), dtype=np.float32)
    p = ex.save_density_vti(M, grid, tmp_path / "field.vti")
    assert [q.name for q in tmp_path.iterdir()] == ["field.vti"]
    img = pv.read(p)
    h = grid.length / 30
    assert tuple(img.dimensions) == (30, 30, 30)
    np.testing.assert_allclose(img.spacing, (h, h, h))
    np.testing.assert_allclose(img.origin, (h / 2,) * 3)
    dens = np.asarray(img.point_data["density"]).reshape((30, 30, 30), order="F")
    np.testing.assert_array_equal(dens, M)
    dz = np.asarray(img.point_data["density_Z"]).reshape((30, 30, 30), order="F")
    np.testing.assert_allclose(dz, M * grid.peak_scale, rtol=1e-6)
    # the voxel (i, j, k) sits at its centre ((i, j, k) + 0.5) h, where the atoms are drawn
    k = img.find_closest_point(((3 + 0.5) * h, (7 + 0.5) * h, (11 + 0.5) * h))
    assert img.point_data["density"][k] == M[3, 7, 11]
