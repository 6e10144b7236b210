"""Video and density export from a real main window under Xvfb: the export dialog's answers,
the progress dialog with Cancel, and the files read back (imageio, numpy, pyvista)."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import pyvista as pv
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QProgressDialog

from crystalstudio.core.latent import interpolate
from crystalstudio.gui.export_dialog import ExportDialog, ExportSpec, latent_path
from crystalstudio.io.structures import read_structure
from crystalstudio.session import ASSETS

pytestmark = pytest.mark.gui

SAMPLES = ASSETS / "samples"


def set_endpoints(window, a="NaCl", b="SrTiO3"):
    s = window.session
    for which, name in (("A", a), ("B", b)):
        rec = s.compute(read_structure(SAMPLES / f"{name}.cif", s.grid))
        s.path.set_endpoint(which, name, rec.mu, rec)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "settings.ini")


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_gui_export_of_an_interpolation(qtbot, window, tmp_path, suffix):
    set_endpoints(window)
    seen: list[int] = []
    timer = QTimer(window)  # watch the progress dialog while the export runs
    timer.timeout.connect(lambda: [seen.append(d.value()) for d in window.findChildren(QProgressDialog)
                                   if d.isVisible()])
    timer.start(5)
    out = window.export_video(ExportSpec("interpolation", str(tmp_path / f"ab{suffix}"), frames=6, fps=10,
                                         size=(320, 240)))
    timer.stop()
    assert window.errors == []
    assert out == tmp_path / f"ab{suffix}" and leftovers(tmp_path) == [f"ab{suffix}"]
    frames = iio.imread(out)
    assert frames.shape[:3] == (6, 240, 320)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0  # NaCl vs SrTiO3
    assert max(seen, default=0) >= 1  # the progress dialog showed frames being written
    assert "Exported 6 frames" in window.statusBar().currentMessage()


def test_cancel_in_the_progress_dialog_leaves_nothing(qtbot, window, tmp_path):
    set_endpoints(window)
    cancelled = []

    def cancel_after_first_frame():
        for d in window.findChildren(QProgressDialog):
            if d.isVisible() and d.value() >= 1 and not cancelled:
                cancelled.append(d.value())
                d.cancel()  # what the Cancel button does

    timer = QTimer(window)
    timer.timeout.connect(cancel_after_first_frame)
    timer.start(5)
    out = window.export_video(ExportSpec("interpolation", str(tmp_path / "long.mp4"), frames=40, size=(320, 240)))
    timer.stop()
    assert out is None and cancelled and cancelled[0] < 40
    assert leftovers(tmp_path) == []
    assert "cancelled" in window.statusBar().currentMessage() and window.errors == []


def test_missing_endpoints_or_keyframes_give_one_line_errors(qtbot, window, tmp_path):
    assert window.export_video(ExportSpec("interpolation", str(tmp_path / "x.mp4"), frames=4)) is None
    assert window.export_video(ExportSpec("keyframes", str(tmp_path / "y.mp4"), frames=4)) is None
    assert window.export_video(ExportSpec("sweep", str(tmp_path / "z.avi"), frames=4, size=(64, 64))) is None
    assert [t for t, _ in window.errors] == ["Cannot export video"] * 3
    texts = [m for _, m in window.errors]
    assert all("\n" not in m for m in texts)
    assert texts[0].startswith("x.mp4: set both interpolation endpoints")
    assert texts[1].startswith("y.mp4: a keyframe path needs at least 2 keyframes, there are 0")
    assert texts[2].startswith("z.avi:") and ".avi" in texts[2][6:]
    assert leftovers(tmp_path) == []


def test_keyframes_from_the_explorer_and_a_sweep(qtbot, window, tmp_path):
    ex = window.explorer
    s = window.session
    ex.set_z(np.zeros(s.model.latent, np.float32))
    ex.add_key_button.click()
    z1 = np.zeros(s.model.latent, np.float32)
    z1[s.model.latent_rank[0]] = 2.5
    ex.set_z(z1)
    ex.add_key_button.click()
    assert ex.keys_label.text() == "Keyframes: 2"
    zs, titles = latent_path(s, ExportSpec("keyframes", frames=5))
    np.testing.assert_allclose(zs, interpolate(np.zeros_like(z1), z1, 5), atol=1e-6)
    assert titles[-1] == "keyframe path   5/5"
    out = window.export_video(ExportSpec("keyframes", str(tmp_path / "keys.gif"), frames=5, size=(160, 120),
                                         show_atoms=False))
    assert out is not None and iio.imread(out).shape[:3] == (5, 120, 160)
    ex.clear_keys_button.click()
    assert s.path.keyframes == [] and ex.keys_label.text() == "Keyframes: 0"

    zs, titles = latent_path(s, ExportSpec("sweep", frames=3, dim=7))
    assert zs[:, 7].tolist() == [-3.0, 0.0, 3.0] and titles[0] == "z[7] = -3.00"
    np.testing.assert_array_equal(np.delete(zs, 7, axis=1), np.repeat(np.delete(s.z, 7)[None], 3, 0))


def test_export_dialog_answers_are_remembered(qtbot, window, tmp_path):
    settings = QSettings(str(tmp_path / "export.ini"), QSettings.Format.IniFormat)
    dlg = ExportDialog(window.session, settings, window, dim=3)
    qtbot.addWidget(dlg)
    assert dlg.spec().dim == 3 and not dlg.dim_spin.isEnabled()
    dlg.kind_combo.setCurrentIndex(dlg.kind_combo.findData("sweep"))
    assert dlg.dim_spin.isEnabled() and not dlg.mode_combo.isEnabled()
    dlg.frames_spin.setValue(12)
    dlg.fps_spin.setValue(24)
    dlg.width_spin.setValue(640)
    dlg.height_spin.setValue(480)
    dlg.orbit_spin.setValue(90)
    dlg.atoms_check.setChecked(False)
    dlg.path_edit.setText(str(tmp_path / "sweep.gif"))
    dlg.remember()
    again = ExportDialog(window.session, settings, window)
    qtbot.addWidget(again)
    sp = again.spec()
    assert (sp.kind, sp.frames, sp.fps, sp.size, sp.orbit_degrees) == ("sweep", 12, 24, (640, 480), 90.0)
    assert sp.show_density and not sp.show_atoms and sp.path.endswith(".gif")


def test_density_export_from_the_window(qtbot, window, tmp_path):
    s = window.session
    rec = s.compute(read_structure(SAMPLES / "NaCl.cif", s.grid))
    s.set_current(rec)
    npy = window.export_density(tmp_path / "nacl.npy")
    np.testing.assert_array_equal(np.load(npy), window.shown_field())
    vti = window.export_density(tmp_path / "nacl.vti")
    img = pv.read(vti)
    n, h = s.grid.n, s.grid.length / s.grid.n
    assert img.dimensions == (n, n, n)
    np.testing.assert_allclose(img.spacing, (h, h, h))
    vals = np.asarray(img.point_data[img.array_names[0]]).reshape(n, n, n, order="F")
    np.testing.assert_allclose(vals, window.shown_field(), rtol=1e-6)
    assert window.export_density(tmp_path / "missing" / "x.npy") is None
    assert window.errors and window.errors[-1][1].startswith("x.npy:")


def test_export_dialog_asks_before_replacing_a_file(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"keep me")
    dlg = ExportDialog(window.session, window.settings, window)
    qtbot.addWidget(dlg)
    asked = []
    answer = {"value": QMessageBox.StandardButton.No}
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer["value"])
    dlg.path_edit.setText(str(existing))
    dlg.accept()
    assert asked == ["old.mp4 exists. Replace it?"] and dlg.result() != ExportDialog.DialogCode.Accepted
    answer["value"] = QMessageBox.StandardButton.Yes
    dlg.accept()
    assert dlg.result() == ExportDialog.DialogCode.Accepted and existing.read_bytes() == b"keep me"
    fresh = ExportDialog(window.session, window.settings, window)
    qtbot.addWidget(fresh)
    fresh.path_edit.setText(str(tmp_path / "new.gif"))
    fresh.accept()
    assert len(asked) == 2 and fresh.result() == ExportDialog.DialogCode.Accepted
