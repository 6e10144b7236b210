"""Latent refinement in the GUI: a dropped CIF is reconstructed from the refined latent (the
status bar shows its steps as a determinate progress bar), Model > Refine the latent turns it
off and on, the reconstruction and its pixels change with it, and the choice is remembered."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QSettings

from crystalstudio.gui.main_window import MainWindow
from crystalstudio.session import ASSETS, Session

from .test_main_window import WAIT_MS, changed, drop_and_wait, frames

pytestmark = pytest.mark.gui

SRTIO3 = ASSETS / "samples" / "SrTiO3.cif"


def test_refinement_is_on_by_default_and_a_remembered_toggle(qtbot, window, model):
    steps0 = model.refine_steps
    try:
        assert window.refine_enabled() and window.refine_action.isChecked() and model.refine_steps > 0
        reported: list[tuple[int, int]] = []
        window._progress.connect(lambda d, t: reported.append((d, t)))
        rec = drop_and_wait(qtbot, window, SRTIO3)
        assert not np.array_equal(rec.z, rec.mu)  # the latent was refined
        assert reported and reported[-1][1] == model.refine_steps
        # the reconstruction is the decoded refined latent, and closer to the input than mu's
        assert np.allclose(rec.M_hat, model.decode(rec.z), atol=1e-5)
        err_refined = float(((rec.M_hat - rec.M) ** 2).mean())
        err_mu = float(((model.decode(rec.mu) - rec.M) ** 2).mean())
        assert err_refined < err_mu
        np.testing.assert_array_equal(window.session.z, rec.z)  # the explorer starts at the refined z
        _, right_refined = frames(window)

        with qtbot.waitSignal(window.reconstruction_shown, timeout=WAIT_MS) as blocker:
            window.refine_action.trigger()  # off: the encoder's mu alone (the paper)
        qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
        rec_mu = blocker.args[0]
        assert np.array_equal(rec_mu.z, rec_mu.mu) and model.refine_steps == 0
        assert window.settings.value("model/refine") in (False, "false")
        _, right_mu = frames(window)
        assert changed(right_refined, right_mu, tol=8) > 0.0005  # the view shows the other field

        # a new window with the same settings starts with refinement off
        settings = QSettings(window.settings.fileName(), QSettings.Format.IniFormat)
        w2 = MainWindow(Session(model=model), settings=settings)
        qtbot.addWidget(w2)
        assert not w2.refine_enabled() and not w2.refine_action.isChecked()
        assert w2.session.refine_steps == 0
        w2.close()
    finally:
        model.refine_steps = steps0  # the fixture's model is shared by the module
