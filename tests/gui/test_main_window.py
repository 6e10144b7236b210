"""The main window in a real Qt session under Xvfb (pytest-xvfb, Qt ``xcb`` + Mesa).

Each test opens one window (two ``QtInteractor`` views, closed in teardown), drops files on
it the way Qt delivers a drop (QDragEnterEvent + QDropEvent with file URLs) and waits for
the worker thread's reconstruction. View pixels come from ``render_frame`` (VTK's own
image after a render). Nothing here depends on how good the model's reconstructions are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv
from PySide6.QtCore import QMimeData, QPoint, QPointF, QTimer, QSettings, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from crystalstudio.core.segment import Atoms
from crystalstudio.gui.app import create_window
from crystalstudio.gui.app import main as app_main
from crystalstudio.gui.main_window import MainWindow
from crystalstudio.io.structures import read_structure
from crystalstudio.render.scene import render_frame
from crystalstudio.session import ASSETS, default_checkpoint

pytestmark = pytest.mark.gui

NACL = ASSETS / "samples" / "NaCl.cif"
NA_PURPLE = (0xAB, 0x5C, 0xF2)  # Jmol colours
CL_GREEN = (0x1F, 0xF0, 0x1F)
WAIT_MS = 120_000  # CPU inference on a busy machine


def drop(window: MainWindow, path: Path) -> None:
    """Drag ``path`` over the window and drop it (what Qt sends on a real drop)."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    pos = QPointF(window.width() / 2, window.height() / 2)
    enter = QDragEnterEvent(pos, Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(window, enter)
    assert enter.isAccepted(), "the window refused the drag"
    ev = QDropEvent(pos, Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(window, ev)
    assert ev.isAccepted(), "the window refused the drop"


def drop_and_wait(qtbot, window: MainWindow, path: Path):
    with qtbot.waitSignal(window.reconstruction_shown, timeout=WAIT_MS) as blocker:
        drop(window, path)
        assert window.busy and window._busy.isVisible()  # the work runs in a worker thread
        assert window.statusBar().currentMessage() == f"Reconstructing {path.name}…"
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert not window._busy.isVisible()
    return blocker.args[0]


def frames(window: MainWindow) -> tuple[np.ndarray, np.ndarray]:
    return render_frame(window.input.view), render_frame(window.output.view)


def changed(a: np.ndarray, b: np.ndarray, tol: int = 24) -> float:
    """Fraction of pixels whose colour moved by more than ``tol`` in some channel."""
    assert a.shape == b.shape
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > tol).mean())


def near(img: np.ndarray, rgb, vmin: float = 0.4, dh: float = 20.0, smin: float = 0.25) -> int:
    """Number of pixels of the hue of ``rgb`` (within ``dh`` degrees), saturated and bright enough.

    Shaded spheres seen through the density are darker and paler than their Jmol colour, so
    pixels are compared by hue; ``vmin`` (HSV value) keeps the dark purple of the density's
    colour map from passing for sodium.
    """
    hsv = rgb_to_hsv(img.astype(np.float64) / 255.0)
    h0 = rgb_to_hsv(np.asarray(rgb, np.float64) / 255.0)[0]
    dist = np.abs(hsv[..., 0] - h0)
    dist = np.minimum(dist, 1.0 - dist) * 360.0
    return int(((dist <= dh) & (hsv[..., 1] >= smin) & (hsv[..., 2] >= vmin)).sum())


def test_drop_nacl_updates_both_views(qtbot, window):
    assert window.acceptDrops() and not window.input.view.acceptDrops()  # drops reach the window
    assert window.windowTitle() == "crystalstudio"
    left0, right0 = frames(window)
    assert left0.std() > 0, "empty view is uniformly one colour (no outline drawn?)"
    assert near(left0, NA_PURPLE, vmin=0.55) == 0 and near(left0, CL_GREEN) == 0

    rec = drop_and_wait(qtbot, window, NACL)
    assert window.session.current is rec and rec.crystal.name == "NaCl"
    text = window.statusBar().currentMessage()
    assert "NaCl" in text and "8 atoms" in text, text
    assert window.windowTitle() == "crystalstudio — NaCl"

    left1, right1 = frames(window)
    assert changed(left0, left1) > 0.02, "input view barely changed"
    na, cl = near(left1, NA_PURPLE, vmin=0.55), near(left1, CL_GREEN)
    assert na > 200 and cl > 100, f"Na/Cl sphere pixels: {na}, {cl}"
    # The reconstruction view shows whatever the model made of it: its atoms, its density.
    assert window.output.scene.n_atoms == len(rec.atoms)
    if len(rec.atoms) or rec.M_hat.max() * window.grid.peak_scale > 3.0:
        assert changed(right0, right1) > 0.002, "reconstruction view did not change"

    # The window grab holds the VTK pixels too (used for docs/screenshot.png).
    img = window.grab().toImage()
    assert not img.isNull() and img.width() == window.width()

    # One camera for both views: dragging in the input view turns the reconstruction too,
    # and the window re-renders the other view by itself.
    assert window.input.view.renderer.GetActiveCamera() is window.output.view.renderer.GetActiveCamera()
    renders = []
    window.output.view.ren_win.AddObserver("EndEvent", lambda *_: renders.append(1))
    cam = window.input.view.renderer.GetActiveCamera()
    before = cam.GetPosition()
    view, centre = window.input.view, QPoint(window.input.view.width() // 2, window.input.view.height() // 2)
    QTest.mousePress(view, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, centre)
    for k in range(1, 8):
        QTest.mouseMove(view, centre + QPoint(12 * k, 4 * k))
        qtbot.wait(10)
    QTest.mouseRelease(view, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, centre + QPoint(84, 28))
    qtbot.waitUntil(lambda: len(renders) > 0, timeout=5000)
    assert np.linalg.norm(np.subtract(cam.GetPosition(), before)) > 1.0
    _, right2 = frames(window)
    assert changed(right1, right2, tol=10) > 0.002
    assert str(NACL.resolve()) in window.recent_files()


def test_bad_file_shows_one_line_error_and_keeps_working(qtbot, window, tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a CIF\n{{{ 42 garbage\n")
    with qtbot.waitSignal(window.failed, timeout=WAIT_MS):
        drop(window, bad)
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert len(window.errors) == 1
    title, text = window.errors[0]
    assert "bad.cif" in text and "\n" not in text, text
    assert window.session.current is None

    rec = drop_and_wait(qtbot, window, NACL)  # still works
    assert rec.crystal.name == "NaCl" and len(window.errors) == 1
    shown = frames(window)[0]

    # A failure later leaves the previous reconstruction on screen.
    with qtbot.waitSignal(window.failed, timeout=WAIT_MS):
        drop(window, bad)
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert len(window.errors) == 2 and "bad.cif" in window.errors[1][1]
    assert window.session.current is rec
    assert changed(shown, frames(window)[0]) < 0.001
    assert "NaCl" in window.statusBar().currentMessage()


def test_toggle_atoms_changes_pixels(qtbot, window):
    drop_and_wait(qtbot, window, NACL)
    window.cell_action.setChecked(False)  # the cell's b axis is drawn green, like Cl
    with_atoms, _ = frames(window)
    assert window.atoms_action.isChecked()
    window.atoms_action.trigger()
    assert not window.atoms_action.isChecked()
    without, _ = frames(window)
    assert changed(with_atoms, without) > 0.005
    assert near(without, CL_GREEN) < near(with_atoms, CL_GREEN) // 4
    assert window.settings.value("view/atoms", True, type=bool) is False
    window.atoms_action.trigger()
    assert changed(with_atoms, frames(window)[0]) < 0.001


def test_save_reconstruction_as_cif_and_xyz(qtbot, window, tmp_path):
    rec = drop_and_wait(qtbot, window, NACL)
    # Save the true atoms as if they had been segmented: the file content then does not
    # depend on the model's quality.
    window.session.current = dataclasses.replace(rec, atoms=Atoms(rec.positions.copy(), rec.Z.copy()))
    out = window.save_reconstruction(tmp_path / "nacl_rec.cif")
    assert out is not None and not window.errors
    back = read_structure(out, require_fit=False)
    assert back.num_atoms == 8 and sorted(back.Z.tolist()) == [11] * 4 + [17] * 4
    np.testing.assert_allclose(np.sort(back.cartesian(), axis=0), np.sort(rec.positions, axis=0), atol=1e-4)

    xyz = window.save_reconstruction(tmp_path / "nacl_rec.xyz")
    lines = Path(xyz).read_text().splitlines()
    assert lines[0] == "8" and sum(ln.split()[0] == "Na" for ln in lines[2:]) == 4

    png = window.save_screenshot(tmp_path / "views.png")
    assert png is not None and png.stat().st_size > 1000

    # a folder that does not exist: one line naming the file, nothing written, window up
    assert window.save_reconstruction(tmp_path / "missing" / "x.cif") is None
    assert window.errors[-1][0] == "Cannot save" and window.errors[-1][1].startswith("x.cif:")
    assert not (tmp_path / "missing").exists() and window.session.current is not None


def test_about_model_menus_and_no_reconstruction_to_save(window, tmp_path):
    assert [a.text() for a in window.samples_menu.actions()] == ["NaCl", "Si", "SrTiO3", "Ti2MnIn"]
    menus = {a.text().replace("&", ""): a.menu() for a in window.menuBar().actions()}
    assert set(menus) == {"File", "View", "Model", "Help"}
    assert window.open_action.shortcut().toString() == "Ctrl+O"
    assert window.save_action.shortcut().toString() == "Ctrl+S"
    assert [a.shortcut().toString() for a in (window.density_action, window.atoms_action, window.reset_action)] \
        == ["D", "A", "R"]
    assert window.export_action.shortcut().toString() == "Ctrl+E"
    text = window.about_model_text()
    assert "unit_cell" in text and "30³" in text and str(default_checkpoint()) in text
    assert window.save_reconstruction(tmp_path / "x.cif") is None
    assert window.errors and "no reconstruction" in window.errors[-1][1]
    assert not (tmp_path / "x.cif").exists()


def test_missing_checkpoint_opens_window_then_loads_one(qtbot, tmp_path, monkeypatch):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    window, error = create_window(str(tmp_path / "missing.safetensors"), settings=settings)
    errors: list[str] = []
    monkeypatch.setattr(window, "show_error", lambda title, text: errors.append(text))
    qtbot.addWidget(window)
    try:
        assert window.session is None and error == "missing.safetensors: no such checkpoint file"
        window.show()
        qtbot.waitExposed(window)
        window.open_file(NACL)  # no model yet: told so, nothing runs
        assert errors and "checkpoint" in errors[-1] and not window.busy
        with qtbot.waitSignal(window.failed, timeout=WAIT_MS):
            window.open_checkpoint(tmp_path / "missing.safetensors")
        assert errors[-1] == "missing.safetensors: no such checkpoint file" and window.session is None
        qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
        window.open_checkpoint(default_checkpoint())
        qtbot.waitUntil(lambda: window.session is not None and not window.busy, timeout=WAIT_MS)
        rec = drop_and_wait(qtbot, window, NACL)
        assert rec.crystal.name == "NaCl" and len(errors) == 2
    finally:
        window.close()


def test_main_survives_a_bad_checkpoint(qapp, tmp_path, monkeypatch):
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):  # keep ~/.config clean
        QSettings.setPath(fmt, QSettings.Scope.UserScope, str(tmp_path))
    shown: list[str] = []
    monkeypatch.setattr(MainWindow, "show_error", lambda self, title, text: shown.append(text))
    seen: list[MainWindow] = []

    def close_windows() -> None:
        seen.extend(w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible())
        for w in seen:
            w.close()

    closer = QTimer()
    closer.setSingleShot(True)
    closer.timeout.connect(close_windows)
    closer.start(1500)
    safety = QTimer()  # never hang the test run
    safety.setSingleShot(True)
    safety.timeout.connect(qapp.quit)
    safety.start(60_000)
    try:
        rc = app_main([str(NACL)], checkpoint=str(tmp_path / "missing.safetensors"))
    finally:
        safety.stop()
        closer.stop()
    assert rc == 0
    assert len(seen) == 1 and seen[0].session is None
    assert any("missing.safetensors: no such checkpoint file" in t for t in shown), shown


def test_model_menu_switches_and_remembers_the_model(qtbot, tmp_path, monkeypatch):
    """Every bundled checkpoint is in the Model menu; choosing one loads it, ticks it and is
    remembered for the next start; a remembered file that went bad falls back to the default."""
    from crystalstudio.core.checkpoint import save_checkpoint
    from crystalstudio.core.models import CrystalNet, ModelConfig
    from crystalstudio.session import bundled_checkpoints

    monkeypatch.delenv("CRYSTALSTUDIO_CHECKPOINT", raising=False)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    window, error = create_window(settings=settings)
    qtbot.addWidget(window)
    assert error is None
    bundled = bundled_checkpoints()
    assert bundled and bundled[0][0] == default_checkpoint()
    assert [a.data() for a in window.model_actions.values()] == [str(p) for p, _ in bundled]
    assert window.model_actions[str(default_checkpoint().resolve())].isChecked()

    # another checkpoint (a small in-memory model saved next to the test) through the same path
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, CrystalNet(ModelConfig(conditional=True)), window.grid,
                    {"representation": "unit_cell", "training": {}})
    window.open_checkpoint(other)
    qtbot.waitUntil(lambda: window.session.model.path == other and not window.busy, timeout=WAIT_MS)
    assert not any(a.isChecked() for a in window.model_actions.values())  # not a bundled one
    assert settings.value("model/checkpoint") == str(other.resolve())
    assert window.explorer.cond_group.isEnabled()  # the conditional control follows the model
    window.close()

    again, error = create_window(settings=settings)
    qtbot.addWidget(again)
    assert error is None and again.session.model.path == other
    again.close()

    other.write_bytes(b"not a checkpoint")
    third, error = create_window(settings=settings)
    qtbot.addWidget(third)
    assert error is None and third.session.model.path == default_checkpoint()
    # pick the bundled default from the menu: ticked and remembered
    third.model_actions[str(default_checkpoint().resolve())].trigger()
    qtbot.waitUntil(lambda: not third.busy, timeout=WAIT_MS)
    assert settings.value("model/checkpoint") == str(default_checkpoint().resolve())
    assert third.model_actions[str(default_checkpoint().resolve())].isChecked()
    third.close()


def test_lattice_model_shows_the_filled_cube(qtbot, window):
    """Switching to the shipped repeating-lattice model re-reads the open crystal as the cube
    filled with its lattice (Sec. 3.1, representation 2): many more atoms in the input view."""
    lattice = ASSETS / "repeating_lattice.safetensors"
    rec = drop_and_wait(qtbot, window, NACL)
    assert len(rec.positions) == 8
    cell, _ = frames(window)
    window.open_checkpoint(lattice)
    qtbot.waitUntil(lambda: window.session.model.path == lattice and not window.busy
                    and window.session.current is not rec, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.input.scene.n_atoms > 8, timeout=WAIT_MS)
    now = window.session.current
    assert window.model_actions[str(lattice.resolve())].isChecked()
    assert len(now.positions) > 8 and window.input.scene.n_atoms == len(now.positions)
    filled, _ = frames(window)
    assert changed(cell, filled) > 0.02
    assert near(filled, CL_GREEN) > 1.5 * near(cell, CL_GREEN)
