"""Off-screen rendering of :class:`crystalstudio.render.scene.CrystalScene` (no Qt).

Runs with a plain ``pyvista.Plotter(off_screen=True)``: under pytest-xvfb VTK renders
through Xvfb + Mesa, without a display it falls back to EGL (Mesa llvmpipe).
"""

from __future__ import annotations

import numpy as np
import pytest
import pyvista as pv

from crystalstudio.core.density import Grid
from crystalstudio.render.scene import CrystalScene, offscreen_plotter, render_frame

W, H = 240, 240
GRID = Grid(n=30, length=10.0, sigma=1.0)


def blob(grid: Grid, centre, Z: float = 20.0) -> np.ndarray:
    """Eq. 1 density of one atom of atomic number Z at ``centre`` (Å), sampled at voxel centres."""
    c = grid.centres()
    d2 = ((c[:, None, None] - centre[0]) ** 2 + (c[None, :, None] - centre[1]) ** 2
          + (c[None, None, :] - centre[2]) ** 2)
    return (Z / grid.peak_scale * np.exp(-d2 / (2.0 * grid.sigma**2))).astype(np.float32)


def voxel_centre(grid: Grid, ijk) -> np.ndarray:
    return (np.asarray(ijk, np.float64) + 0.5) * grid.spacing


@pytest.fixture
def plotter():
    pl = offscreen_plotter((W, H))
    yield pl
    pl.close()


def n_props(pl) -> int:
    return pl.renderer.GetViewProps().GetNumberOfItems()


def changed(a: np.ndarray, b: np.ndarray, tol: int = 10) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose colour differs by more than ``tol``."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > tol


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(column, row) centre of the pixels in ``mask``; row 0 is the top of the image."""
    rows, cols = np.nonzero(mask)
    assert len(rows) > 0, "no pixels changed"
    return float(cols.mean()), float(rows.mean())


def test_frame_shape_and_not_blank(plotter):
    empty = render_frame(plotter)
    assert empty.shape == (H, W, 3) and empty.dtype == np.uint8
    scene = CrystalScene(plotter)
    scene.set_outline(GRID)
    scene.set_density(blob(GRID, voxel_centre(GRID, (15, 15, 15))), GRID)
    scene.set_atoms([[5.0, 5.0, 5.0]], [26], colors=[[0.9, 0.4, 0.1]])
    scene.set_title("blob")
    scene.reset_camera()
    img = render_frame(plotter)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert img.std() > 5.0
    assert changed(img, empty).sum() > 0.02 * W * H  # more than a few outline pixels
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_density_alone_renders_and_updates_in_place(plotter):
    scene = CrystalScene(plotter, scalar_bar=False)
    scene.set_outline(GRID)
    scene.reset_camera("xy")
    outline_only = render_frame(plotter)
    scene.set_density(blob(GRID, voxel_centre(GRID, (6, 6, 15))), GRID)
    data = scene._vol_data
    a = render_frame(plotter)
    assert changed(a, outline_only).sum() > 200, "the volume drew nothing"
    scene.set_density(blob(GRID, voxel_centre(GRID, (23, 23, 15))), GRID)
    assert scene._vol_data is data  # same dataset, overwritten in place
    b = render_frame(plotter)
    diff = changed(a, b)
    assert diff.sum() > 200, "moving the blob did not change the picture"
    # the blob moved from the lower left to the upper right (view down -z, x right, y up)
    ca = centroid(changed(a, outline_only))
    cb = centroid(changed(b, outline_only))
    assert cb[0] > ca[0] + W / 4 and cb[1] < ca[1] - H / 4


def test_volume_and_atoms_line_up_and_axis_order(plotter):
    """A blob at (x, y) = (2, 8) Å shows up at the same place as an atom there, upper left."""
    pos = np.array([[2.0, 8.0, 5.0]])
    scene = CrystalScene(plotter, scalar_bar=False)
    scene.set_outline(GRID)
    scene.reset_camera("xy")
    base = render_frame(plotter)
    scene.set_density(blob(GRID, pos[0], Z=30.0), GRID)
    vol = render_frame(plotter)
    scene.show_density(False)
    scene.set_atoms(pos, [8], colors=[[1.0, 0.0, 0.0]], radii=[0.6])
    atom = render_frame(plotter)
    cv, ca = centroid(changed(vol, base)), centroid(changed(atom, base))
    assert cv[0] < W / 2 and cv[1] < H / 2, f"blob drawn at {cv}, expected upper left"
    assert abs(cv[0] - ca[0]) < 0.05 * W and abs(cv[1] - ca[1]) < 0.05 * H, (cv, ca)


@pytest.mark.parametrize("where, left, top", [((1.0, 5.0, 5.0), True, None), ((9.0, 5.0, 5.0), False, None),
                                               ((5.0, 9.0, 5.0), None, True), ((5.0, 1.0, 5.0), None, False)])
def test_atom_lands_in_expected_half(plotter, where, left, top):
    scene = CrystalScene(plotter)
    scene.set_outline(GRID)
    scene.reset_camera("xy")  # looking down -z: x to the right, y up
    scene.set_atoms([where], [8], colors=[[1.0, 0.0, 0.0]])
    scene.show_atoms(False)
    without = render_frame(plotter)
    scene.show_atoms(True)
    with_atom = render_frame(plotter)
    mask = changed(with_atom, without)
    assert mask.sum() > 20
    cx, cy = centroid(mask)
    if left is not None:
        assert (cx < W / 2) == left, cx
    if top is not None:
        assert (cy < H / 2) == top, cy
    # the sphere is red
    assert with_atom[mask][:, 0].mean() > with_atom[mask][:, 2].mean() + 50


def test_toggles_change_pixels(plotter):
    scene = CrystalScene(plotter)
    scene.set_outline(GRID)
    scene.set_density(blob(GRID, (3.0, 3.0, 3.0)), GRID)
    scene.set_atoms([[7.0, 7.0, 3.0], [3.0, 7.0, 7.0]], [8, 14], colors=[[1, 0, 0], [0, 0, 1]])
    scene.reset_camera()
    both = render_frame(plotter)
    scene.show_atoms(False)
    no_atoms = render_frame(plotter)
    assert changed(both, no_atoms).sum() > 50
    scene.show_density(False)
    nothing = render_frame(plotter)
    assert changed(no_atoms, nothing).sum() > 50
    scene.show_atoms(True)
    scene.show_density(True)
    assert np.array_equal(render_frame(plotter), both)


def test_no_actor_growth_over_updates(plotter):
    scene = CrystalScene(plotter)
    rng = np.random.default_rng(0)
    counts = []
    frames = []
    for step in range(6):
        c = rng.uniform(2.0, 8.0, size=3)
        scene.set_outline(GRID)
        scene.set_density(blob(GRID, c, Z=10.0 + step), GRID)
        k = 1 + step % 3
        scene.set_atoms(rng.uniform(1, 9, size=(k, 3)), rng.integers(1, 40, size=k),
                        colors=rng.uniform(size=(k, 3)), radii=rng.uniform(0.3, 0.7, size=k))
        scene.set_title(f"step {step}")
        if step == 0:
            scene.reset_camera()
        frames.append(render_frame(plotter))
        counts.append((n_props(plotter), len(plotter.renderer.actors), len(plotter.scalar_bars)))
    assert all(c == counts[0] for c in counts), counts
    assert len(scene.actors()) == 4
    assert scene.clim == (0.0, 30.0)  # pinned: peaks of 10..15 never rescale the colours
    assert all(changed(frames[i], frames[i + 1]).sum() > 0 for i in range(5))


def test_clim_pinned_grows_only_for_heavier_peaks_and_explicit_clim(plotter):
    scene = CrystalScene(plotter)
    scene.set_density(blob(GRID, (5, 5, 5), Z=12.0), GRID)
    assert scene.clim == (0.0, 30.0)
    scene.set_density(blob(GRID, (5, 5, 5), Z=5.0), GRID)
    assert scene.clim == (0.0, 30.0)
    scene.set_density(blob(GRID, voxel_centre(GRID, (15, 15, 15)), Z=82.0), GRID)
    assert scene.clim[1] >= 82.0 - 1e-3
    lut_range = tuple(scene._vol_actor.mapper.lookup_table.scalar_range)
    assert lut_range == pytest.approx(scene.clim)
    other = CrystalScene(offscreen_plotter((64, 64)), clim=(0.0, 10.0))
    other.set_density(blob(GRID, (5, 5, 5), Z=50.0), GRID)
    assert other.clim == (0.0, 10.0)
    other.plotter.close()


def test_set_clim_pins_and_releases_the_colour_range(plotter):
    scene = CrystalScene(plotter)
    scene.set_density(blob(GRID, (5, 5, 5), Z=4.0), GRID)
    scene.reset_camera()
    dim = render_frame(plotter)
    scene.set_clim((0.0, 4.0))  # a weak field spread over the whole colour map
    assert scene.clim == (0.0, 4.0)
    assert tuple(scene._vol_actor.mapper.lookup_table.scalar_range) == pytest.approx((0.0, 4.0))
    bright = render_frame(plotter)
    assert changed(dim, bright).sum() > 100  # the image follows the range
    scene.set_density(blob(GRID, (5, 5, 5), Z=60.0), GRID)
    assert scene.clim == (0.0, 4.0)  # pinned: a heavier peak does not widen it
    scene.set_clim(None)
    assert scene.clim == (0.0, 30.0)
    scene.set_density(blob(GRID, (5, 5, 5), Z=60.0), GRID)
    assert scene.clim[1] >= 60.0 - 1e-3  # released: grows again
    with pytest.raises(ValueError, match="high > low"):
        scene.set_clim((2.0, 2.0))


def test_grid_change_and_none_density(plotter):
    scene = CrystalScene(plotter)
    small = Grid(n=16, length=8.0)
    scene.set_density(blob(small, (4, 4, 4)), small)
    img = scene._vol_data
    assert tuple(img.dimensions) == (16, 16, 16)
    assert img.origin == pytest.approx((0.25, 0.25, 0.25)) and img.spacing == pytest.approx((0.5,) * 3)
    scene.set_density(blob(GRID, (5, 5, 5)), GRID)
    assert scene._vol_data is img and tuple(img.dimensions) == (30, 30, 30)
    h = GRID.spacing
    assert img.origin == pytest.approx((h / 2,) * 3)
    # point (i, j, k) of the ImageData holds M[i, j, k] times peak_scale (x fastest)
    M = np.random.default_rng(1).random((30, 30, 30), dtype=np.float32)
    scene.set_density(M, GRID)
    vals = np.asarray(img.point_data[img.active_scalars_name])
    idx = np.array([[0, 0, 0], [3, 7, 11], [29, 1, 5]])
    flat = idx[:, 0] + 30 * idx[:, 1] + 900 * idx[:, 2]
    assert vals[flat] == pytest.approx(M[tuple(idx.T)] * GRID.peak_scale, rel=1e-5)
    assert np.asarray(img.points)[flat] == pytest.approx((idx + 0.5) * h)
    scene.set_atoms(np.zeros((0, 3)), np.zeros(0, int))
    scene.set_density(None, GRID)
    render_frame(plotter)  # nothing to draw, must not fail
    assert not scene._vol_actor.GetVisibility()


def test_offscreen_plotter_defaults():
    pl = offscreen_plotter((100, 80), background="white")
    try:
        img = render_frame(pl)
        assert img.shape == (80, 100, 3)
        assert (img > 250).all()
        assert isinstance(pl, pv.Plotter) and pl.off_screen
    finally:
        pl.close()
