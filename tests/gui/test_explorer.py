"""The latent explorer dock in a real main window under Xvfb (pytest-qt, Qt ``xcb`` + Mesa).

Nothing here depends on how good the model is: only on decoding being deterministic and
the decoded field changing with z. The shipped checkpoint may be an untrained placeholder
whose fields peak below 1 Z, under the transparent floor of the fixed 0-30 Z colour range,
so the pixel test fits the colour range of the decoded view to the field first.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PySide6.QtCore import QTimer

from crystalstudio.core.checkpoint import CrystalModel
from crystalstudio.core.latent import lerp, random_latents
from crystalstudio.core.metrics import worst_nearest
from crystalstudio.core.segment import density_peaks
from crystalstudio.core.models import CrystalNet, ModelConfig
from crystalstudio.gui.explorer import DEBOUNCE_MS, NOT_CONDITIONAL, ROWS, composition_text, readouts_html
from crystalstudio.io.structures import read_structure
from crystalstudio.render.scene import render_frame
from crystalstudio.session import ASSETS, Session

CONDITIONAL = ASSETS / "unit_cell_conditional.safetensors"

pytestmark = pytest.mark.gui

NACL = ASSETS / "samples" / "NaCl.cif"
SRTIO3 = ASSETS / "samples" / "SrTiO3.cif"
WAIT_MS = 120_000  # CPU inference on a busy machine


def open_and_wait(qtbot, window, path):
    with qtbot.waitSignal(window.reconstruction_shown, timeout=WAIT_MS) as blocker:
        window.open_file(path)
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    return blocker.args[0]


def frame_of(qtbot, explorer, action, z=None, segmented=True):
    """Run ``action()`` and wait for the frame it leads to (segmented, with latent ``z`` if given)."""
    def check(frame, seg):
        return seg == segmented and (z is None or np.array_equal(frame.z, z))

    with qtbot.waitSignal(explorer.frame_shown, timeout=WAIT_MS, check_params_cb=check) as blocker:
        action()
    return blocker.args[0]


def idle(qtbot, explorer):
    qtbot.waitUntil(lambda: not explorer.runner.busy, timeout=WAIT_MS)


def changed(a: np.ndarray, b: np.ndarray, tol: int) -> float:
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > tol).mean())


def test_slider_changes_decoded_field_and_right_view(qtbot, window, model):
    ex = window.explorer
    assert window.explorer_dock.isVisible() and window.slices_dock.isVisible()
    rec = open_and_wait(qtbot, window, NACL)
    np.testing.assert_array_equal(window.session.z, rec.z)  # the explorer starts at the encoded (refined) z
    window.fit_range_action.trigger()
    before = render_frame(window.output.view)

    # Sliders in rank order, -3..3, a page of ROWS rows; value labels follow z.
    rank = model.latent_rank
    assert [r.dim for r in ex.rows] == rank[:ROWS]
    row = ex.rows[0]
    d0 = row.dim
    assert (row.slider.minimum(), row.slider.maximum()) == (-300, 300)
    frame = frame_of(qtbot, ex, lambda: row.slider.setValue(300))
    assert frame.z[d0] == pytest.approx(3.0)
    np.testing.assert_array_equal(np.delete(frame.z, d0), np.delete(rec.z, d0))
    assert np.any(frame.M_hat != rec.M_hat), "decoded field did not change with z"
    after = render_frame(window.output.view)
    assert changed(before, after, tol=2) > 0.001, "right view did not change"
    assert window.output.label.text().startswith("Decoded")
    assert "z[" in window.output.label.text()

    # Any of the 300 dimensions can be brought up.
    last = rank[-1]
    r = ex.show_dimension(last)
    assert r is ex.row_for(last) and r.slider.isVisible() and ex.jump_spin.value() == last
    frame = frame_of(qtbot, ex, lambda: r.slider.setValue(-150))
    assert frame.z[last] == pytest.approx(-1.5) and frame.z[d0] == pytest.approx(3.0)
    ex.first_spin.setValue(1)
    assert ex.rows[0].dim == rank[0] and ex.rows[0].slider.value() == 300

    # Reset to encoded: z = mu again, the reconstruction's field comes back.
    frame = frame_of(qtbot, ex, ex.reset_button.click, z=rec.z)
    np.testing.assert_allclose(frame.M_hat, rec.M_hat)
    assert ex.rows[0].slider.value() == int(round(np.clip(rec.z[rank[0]], -3, 3) * 100))
    assert "Atoms" in ex.readout_label.text() and "vs NaCl input" in ex.readout_label.text()


def test_interpolation_ends_reproduce_the_reconstructions(qtbot, window, model):
    ex = window.explorer
    ex.tabs.setCurrentIndex(1)
    assert not ex.t_slider.isEnabled() and not ex.play_button.isEnabled()
    for which, combo, name in (("A", ex.a_combo, "NaCl"), ("B", ex.b_combo, "SrTiO3")):
        i = combo.findText(name)
        assert i > 0
        with qtbot.waitSignal(ex.endpoint_set, timeout=WAIT_MS, check_params_cb=lambda w, k=which: w == k):
            combo.setCurrentIndex(i)
            combo.activated.emit(i)  # what a user's choice sends
        assert window.session.path.endpoints[which].name == name
    assert ex.t_slider.isEnabled() and ex.play_button.isEnabled()
    zA, zB = window.session.path.endpoints["A"].z, window.session.path.endpoints["B"].z

    ref = Session(model=model)
    M_a = ref.compute(read_structure(NACL, ref.grid)).M_hat
    M_b = ref.compute(read_structure(SRTIO3, ref.grid)).M_hat

    mid = frame_of(qtbot, ex, lambda: ex.t_slider.setValue(500), z=lerp(zA, zB, 0.5))
    assert not np.allclose(mid.M_hat, M_a)
    f0 = frame_of(qtbot, ex, lambda: ex.t_slider.setValue(0), z=zA)
    np.testing.assert_allclose(f0.M_hat, M_a)
    f1 = frame_of(qtbot, ex, lambda: ex.t_slider.setValue(1000), z=zB)
    np.testing.assert_allclose(f1.M_hat, M_b)
    assert not np.allclose(M_a, M_b)
    for mode in ("linear", "spherical"):  # both modes end exactly on A and B
        np.testing.assert_array_equal(window.session.path.between(0.0, mode), zA)
        np.testing.assert_array_equal(window.session.path.between(1.0, mode), zB)

    # Play: t steps through `frames` values from A to B and stops at B without loop.
    ex.steps_spin.setValue(3)
    ex.t_slider.setValue(0)
    idle(qtbot, ex)
    seen: list[np.ndarray] = []
    ex.frame_shown.connect(lambda f, seg: seen.append(f.z.copy()) if seg else None)
    ex.play_button.click()
    assert ex.playing and ex.play_button.text() == "Pause"
    qtbot.waitUntil(lambda: not ex.playing, timeout=WAIT_MS)
    idle(qtbot, ex)
    assert ex.t_slider.value() == 1000 and len(seen) >= 2
    np.testing.assert_allclose(seen[-2], 0.5 * zA + 0.5 * zB, atol=1e-6)
    np.testing.assert_array_equal(seen[-1], zB)


def test_window_stays_responsive_and_requests_coalesce(qtbot, window, monkeypatch):
    ex = window.explorer
    session = window.session
    real_decode = session.decode
    calls: list[tuple[np.ndarray, bool, bool]] = []
    in_decode = threading.Event()

    def slow_decode(z, cond=None, segment=True):
        in_decode.set()
        calls.append((np.array(z), segment, threading.current_thread() is threading.main_thread()))
        time.sleep(1.5)
        result = real_decode(z, cond, segment)
        in_decode.clear()
        return result

    monkeypatch.setattr(session, "decode", slow_decode)
    gui_thread: list[bool] = []
    ex.frame_shown.connect(lambda f, seg: gui_thread.append(threading.current_thread() is threading.main_thread()))

    row = ex.rows[0]
    row.slider.setSliderDown(True)  # a drag: density only while it moves
    t0 = time.monotonic()
    for k in range(1, 11):
        row.slider.setValue(20 * k)
    assert ex.runner.busy
    # The event loop runs while the decode sleeps: a timer fires, a queued click is handled.
    fired: list[float] = []
    QTimer.singleShot(50, lambda: fired.append(time.monotonic() - t0))
    QTimer.singleShot(100, ex.reset_button.click)  # nothing encoded: it says so
    qtbot.waitUntil(lambda: bool(fired) and "Nothing encoded" in ex.status_label.text(), timeout=1300)
    assert in_decode.is_set() and len(calls) == 1, "the click waited for the decode"
    assert fired[0] < 1.3
    row.slider.setSliderDown(False)  # release: decode + segment the newest value
    idle(qtbot, ex)
    assert 1 <= len(calls) <= 3, len(calls)
    assert calls[0][1] is False  # dragging: density only
    z_last, segment_last, _ = calls[-1]
    assert segment_last and z_last[row.dim] == pytest.approx(2.0)
    assert not any(c[2] for c in calls), "decode ran on the GUI thread"
    assert gui_thread and all(gui_thread), "frames were applied outside the GUI thread"
    assert ex.segmented and ex.frame.z[row.dim] == pytest.approx(2.0)

    # A pause in the drag (debounce) segments without a release.
    calls.clear()
    row.slider.setSliderDown(True)
    row.slider.setValue(-100)
    qtbot.waitUntil(lambda: any(c[1] for c in calls), timeout=DEBOUNCE_MS + 10_000)
    idle(qtbot, ex)
    row.slider.setSliderDown(False)  # nothing new to decode: same z as the last frame
    idle(qtbot, ex)
    assert [c[1] for c in calls] == [False, True]
    assert all(c[0][row.dim] == pytest.approx(-1.0) for c in calls)


def test_randomise_seed_and_conditioning_control(qtbot, window, model, monkeypatch):
    ex = window.explorer
    ex.tabs.setCurrentIndex(2)
    ex.prior_combo.setCurrentIndex(ex.prior_combo.findData("standard"))  # z ~ N(0, I), Sec. 4.4
    assert window.session.prior == "standard"
    ex.seed_spin.setValue(7)
    ex.randomise_button.click()
    z1 = ex.z.copy()
    ex.randomise_button.click()
    np.testing.assert_array_equal(ex.z, z1)
    np.testing.assert_array_equal(z1, random_latents(1, model.latent, 7)[0])
    ex.sample_button.click()
    assert ex.seed_spin.value() == 8 and not np.array_equal(ex.z, z1)
    frame = frame_of(qtbot, ex, lambda: None, z=random_latents(1, model.latent, 8)[0])
    assert frame.readouts["max_density_Z"] == pytest.approx(frame.M_hat.max() * model.grid.peak_scale)
    idle(qtbot, ex)

    # A checkpoint that is not conditional (the shipped one): the control is off, with the reason.
    if not model.config.conditional:
        assert not ex.cond_group.isEnabled() and ex.cond_group.toolTip() == NOT_CONDITIONAL
        assert ex.cond() is None

    # A conditional model enables it and its target goes to the decoder.
    net = CrystalNet(ModelConfig(conditional=True))
    cmodel = CrystalModel(net, model.grid, {"representation": "unit_cell"})
    conds: list = []
    real_decode = cmodel.decode_fields  # what a segmented frame decodes through (M_hat and L_hat)
    monkeypatch.setattr(cmodel, "decode_fields", lambda z, cond=None: conds.append(cond) or real_decode(z, cond))
    window.session.model = cmodel
    ex.model_changed()
    assert ex.cond_group.isEnabled() and ex.cond_group.toolTip() == ""
    ex.cond_group.setChecked(True)
    ex.cond_spin.setValue(0.5)
    assert "7.9" in ex.cond_z_label.text()  # 0.5 x peak_scale 15.75
    frame_of(qtbot, ex, ex.randomise_button.click)
    idle(qtbot, ex)
    assert conds and conds[-1] == pytest.approx(0.5)

    # With conditioning off, the shipped conditional checkpoint's aggregate prior draws the
    # largest density too: the box and its "as largest Z" label both show the drawn value
    from crystalstudio.core.checkpoint import load_checkpoint

    window.session.model = load_checkpoint(CONDITIONAL)
    ex.model_changed()
    ex.cond_group.setChecked(False)
    ex.prior_combo.setCurrentIndex(ex.prior_combo.findData("aggregate"))
    ex.seed_spin.setValue(11)
    frame_of(qtbot, ex, ex.randomise_button.click)
    idle(qtbot, ex)
    _, cond = window.session.draw(1, 11)
    assert ex.cond_spin.value() == pytest.approx(float(cond[0]), abs=1e-3)
    ps = window.session.model.grid.peak_scale
    assert ex.cond_z_label.text() == f"Z ≈ {ex.cond_spin.value() * ps:.1f}"


def test_slice_view_follows_index_and_axis(qtbot, window):
    sv = window.explorer.slice_view
    n = window.grid.n
    i, j, k = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    target = np.exp(-((i - 8) ** 2 + (j - 15) ** 2 + (k - 20) ** 2) / 8.0).astype(np.float32)
    decoded = np.roll(target, 3, axis=0)
    sv.set_fields(target, decoded, "blob")
    assert sv.index == n // 2 and sv.axis == 2
    shown = {key: sv.image(key).copy() for key in ("target", "decoded", "difference")}
    assert shown["target"].shape == (n, n, 3)
    assert not np.array_equal(shown["target"], shown["decoded"])
    sv.index_slider.setValue(5)
    assert sv.index == 5 and not np.array_equal(sv.image("target"), shown["target"])
    assert not np.array_equal(sv.image("difference"), shown["difference"])
    at5 = sv.image("target").copy()
    sv.axis_combo.setCurrentIndex(0)
    assert not np.array_equal(sv.image("target"), at5)
    assert window.explorer.slice_view.images["decoded"].pixmap() is not None
    sv.set_fields(None, decoded)  # a random draw has no target
    assert sv.image("target") is None and sv.image("difference") is None and sv.image("decoded") is not None


def test_readout_text():
    assert composition_text({17: 4, 11: 4}) == "Na4 Cl4" and composition_text({}) == "—"
    r = {"n_atoms": 2, "composition": {8: 2}, "min_distance_A": 0.3, "too_close": True,
         "max_density": 0.5, "max_density_Z": 7.87}
    text = readouts_html(r)
    assert "O2" in text and "0.30 Å" in text and "#e03030" in text and "Z 7.9" in text
    ok = readouts_html({**r, "min_distance_A": 1.2, "too_close": False})
    assert "#e03030" not in ok and "1.20 Å" in ok


def test_conditioning_control_scales_density_keeps_geometry(qtbot, window):
    """The shipped conditional checkpoint in the real window: switching conditioning on starts
    at the crystal's own largest density; raising the target raises the decoded field's
    largest density (readout and rendered view follow) and leaves the density peaks in place."""
    from crystalstudio.core.checkpoint import load_checkpoint

    window.session.model = load_checkpoint(CONDITIONAL)
    window.explorer.model_changed()
    ex = window.explorer
    ex.tabs.setCurrentIndex(2)
    assert ex.cond_group.isEnabled()
    rec = open_and_wait(qtbot, window, SRTIO3)
    c0 = float(rec.M.max())
    np.testing.assert_allclose(rec.M_hat, window.session.model.decode(rec.z, c0), rtol=1e-5, atol=1e-6)
    window.fit_range_action.setChecked(False)
    base = frame_of(qtbot, ex, lambda: ex.cond_group.setChecked(True), z=rec.z)
    assert ex.cond_spin.value() == pytest.approx(c0, abs=1e-3)  # starts at the crystal's own maximum
    np.testing.assert_allclose(base.M_hat, rec.M_hat, rtol=1e-3, atol=1e-4)
    before = render_frame(window.output.view)
    up = frame_of(qtbot, ex, lambda: ex.cond_spin.setValue(1.25 * c0), z=rec.z)
    assert up.M_hat.max() > 1.05 * base.M_hat.max()
    assert up.readouts["max_density"] == pytest.approx(float(up.M_hat.max()))
    assert f"{up.readouts['max_density_Z']:.1f}" in ex.readout_label.text()
    assert changed(before, render_frame(window.output.view), tol=2) > 0.0005
    g = window.grid
    assert worst_nearest(density_peaks(base.M_hat, g, 0.3), density_peaks(up.M_hat, g, 0.15)) <= 0.33
    assert worst_nearest(density_peaks(up.M_hat, g, 0.3), density_peaks(base.M_hat, g, 0.15)) <= 0.33
    ex.cond_group.setChecked(False)  # off: back to the crystal's own maximum
    idle(qtbot, ex)
    assert ex.cond() == pytest.approx(c0)


def test_aggregate_prior_validity_and_search(qtbot, window, model, monkeypatch, tmp_path):
    """Draws come from the aggregate prior by default (a mixture around encoded crystals here
    when the shipped checkpoint has none), each shows its validity, the search finds valid
    seeds with a progress bar, and the prior choice is remembered."""
    from crystalstudio.core.prior import LatentPrior
    from crystalstudio.io.validity import check_draw

    s = window.session
    if model.prior is None:
        mus = [s.compute(read_structure(p, model.grid)).mu for p in (NACL, SRTIO3)]
        monkeypatch.setattr(model, "prior", LatentPrior([0.5, 0.5], mus, np.full((2, model.latent), 0.05)))
    ex = window.explorer
    ex.model_changed()
    ex.tabs.setCurrentIndex(2)
    assert s.prior == "aggregate" and s.prior_in_use() == "aggregate"
    assert ex.prior_combo.currentData() == "aggregate" and "Gaussian" in ex.prior_note.text()
    ex.seed_spin.setValue(3)
    frame = frame_of(qtbot, ex, ex.randomise_button.click, z=model.prior.sample(1, 3)[0])
    v = check_draw(frame.atoms.positions, frame.atoms.Z)
    assert len(frame.atoms) > 0
    assert ("valid crystal" in ex.validity_label.text()) == v.valid
    idle(qtbot, ex)

    ex.search.n_spin.setValue(2)
    with qtbot.waitSignal(ex.search.finished, timeout=WAIT_MS) as blocker:
        ex.search.button.click()
    found, tried = blocker.args
    assert tried >= found and ex.search.progress.value() == found == len(ex.search.found)
    assert ex.search.results.count() == found
    for seed, val in ex.search.found:  # each listed seed is valid when drawn again
        z, _ = s.draw(1, seed)
        f = s.decode(z[0])
        assert val.valid and check_draw(f.atoms.positions, f.atoms.Z).valid
    idle(qtbot, ex)

    ex.prior_combo.setCurrentIndex(ex.prior_combo.findData("standard"))
    assert window.settings.value("sample/prior") == "standard"


def test_value_beyond_the_slider_range_is_flagged(qtbot):
    """A refined latent can lie beyond -3..3: the slider pins at its end, the value label shows
    the true value in orange (pixels) with a tooltip; inside the range the label is plain."""
    from PySide6.QtWidgets import QGridLayout, QWidget

    from crystalstudio.gui.explorer import _SliderRow

    w = QWidget()
    qtbot.addWidget(w)
    row = _SliderRow(w, QGridLayout(w), 0)
    w.resize(400, 40)
    w.show()
    qtbot.waitExposed(w)

    def orange_pixels() -> int:
        img = row.value.grab().toImage()
        a = np.array([[img.pixelColor(x, y).getRgb()[:3] for x in range(img.width())] for y in range(img.height())])
        return int(((a[..., 0] > 150) & (a[..., 0] - a[..., 2] > 100) & (a[..., 1] > 60)).sum())

    row.show(69, 0, -3.98)
    assert row.slider.value() == -300 and row.value.text() == "-3.98"
    assert "beyond the slider's range" in row.value.toolTip()
    assert orange_pixels() > 5
    row.set_value(1.25)
    assert row.slider.value() == 125 and row.value.text() == "+1.25" and row.value.toolTip() == ""
    assert orange_pixels() == 0
