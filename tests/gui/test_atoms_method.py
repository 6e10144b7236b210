"""The atoms method in the GUI: a dropped CIF shows fitted atoms (with their amplitudes in
the Atoms table), Model > Atoms switches to the paper's U-Net path and back, the choice
changes the reconstruction view's pixels and is remembered."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QSettings

from crystalstudio.gui.main_window import MainWindow
from crystalstudio.session import ASSETS, Session

from .test_main_window import WAIT_MS, drop_and_wait, frames

pytestmark = pytest.mark.gui

SRTIO3 = ASSETS / "samples" / "SrTiO3.cif"


def test_dropped_cif_shows_fitted_atoms_and_the_method_is_a_remembered_choice(qtbot, window, model, tmp_path):
    assert window.atoms_method() == "fit" and window.atoms_method_actions["fit"].isChecked()
    rec = drop_and_wait(qtbot, window, SRTIO3)
    assert window.session.atoms_method == "fit"
    assert rec.atoms.amplitude is not None and len(rec.atoms) > 0
    table = window.atoms_table
    assert table.row_count() == len(rec.atoms)
    amp_cells = [table.text(r, 5) for r in range(table.row_count())]
    assert all("±" in t for t in amp_cells), amp_cells
    assert "least-squares fit" in window.atoms_table.caption.text()
    _, right_fit = frames(window)

    with qtbot.waitSignal(window.reconstruction_shown, timeout=WAIT_MS) as blocker:
        window.atoms_method_actions["unet"].trigger()
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    rec_u = blocker.args[0]
    assert window.session.atoms_method == "unet" and rec_u.atoms.amplitude is None
    assert "U-Net" in window.atoms_table.caption.text()
    assert table.text(0, 5) == "—" if table.row_count() else True
    same = (len(rec_u.atoms) == len(rec.atoms)
            and np.allclose(np.sort(rec_u.atoms.positions, 0), np.sort(rec.atoms.positions, 0), atol=1e-3))
    if not same:  # the two methods read different atoms: the view shows it
        _, right_unet = frames(window)
        assert (np.abs(right_fit.astype(int) - right_unet.astype(int)).max(-1) > 24).mean() > 0.001
    assert window.settings.value("model/atoms_method") == "unet"

    # a new window with the same settings starts with the remembered method
    settings = QSettings(window.settings.fileName(), QSettings.Format.IniFormat)
    w2 = MainWindow(Session(model=model), settings=settings)
    qtbot.addWidget(w2)
    assert w2.atoms_method() == "unet" and w2.session.atoms_method == "unet"
    assert w2.atoms_method_actions["unet"].isChecked()
    w2.session.model.atoms_method = "fit"  # the fixture's model is shared by the module
    w2.close()


def test_switching_the_method_away_from_the_crystal_rereads_the_explorer_frame(qtbot, window, model):
    """With the explorer elsewhere in latent space (z = 0), Model > Atoms re-reads the frame on
    screen by the new method at the same z; the crystal's reconstruction is not redone."""
    rec = drop_and_wait(qtbot, window, SRTIO3)
    ex = window.explorer
    z0 = np.zeros(model.latent, np.float32)

    def at_z0(frame, segmented):
        return segmented and np.array_equal(frame.z, z0)

    with qtbot.waitSignal(ex.frame_shown, timeout=WAIT_MS, check_params_cb=at_z0) as blocker:
        ex.set_z(z0)
    assert blocker.args[0].atoms.amplitude is not None  # read by the fit
    shown: list = []
    window.reconstruction_shown.connect(shown.append)
    try:
        with qtbot.waitSignal(ex.frame_shown, timeout=WAIT_MS, check_params_cb=at_z0) as blocker:
            window.atoms_method_actions["unet"].trigger()
        frame = blocker.args[0]
        assert frame.atoms.amplitude is None  # the U-Net path carries no amplitudes
        assert "U-Net" in window.atoms_table.caption.text()
        assert window.atoms_table.row_count() == len(frame.atoms)
        qtbot.wait(200)
        assert not shown and window.session.current is rec and not window.busy
        np.testing.assert_array_equal(window.session.z, z0)  # the explorer stayed where it was
    finally:
        window.session.model.atoms_method = "fit"  # the fixture's model is shared by the module
