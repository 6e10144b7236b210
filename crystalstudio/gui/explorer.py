"""The latent explorer: move z and watch the decoded crystal (Hoffmann et al. 2019, Sec. 4.3-4.5).

A panel (the main window puts it in a dock) with three pages:

* **Sliders**: every latent dimension from -3 to 3 (Fig. 10D), most informative first
  (``model.latent_rank``). Twelve slider rows show a window of the ranking; "from rank"
  pages through it and "jump to dim" brings any dimension's slider to the top. "Reset to
  encoded" returns to mu of the current reconstruction.
* **Interpolate**: endpoints A and B (the current z, or a shipped sample encoded on the
  fly), a t slider in [0, 1], linear or spherical, play/pause with loop and frames per
  sweep. t = 0 and t = 1 decode A's and B's z exactly.
* **Sample**: a draw from a seed ("Randomise"; "Sample" = next seed) from the prior of
  choice: the checkpoint's aggregate prior (a Gaussian mixture fitted where the training
  crystals encode; the default when the checkpoint has one) or z ~ N(0, I) (Sec. 4.4);
  each draw's validity (all pairs >= 0.5 Å, SMACT charge balance) beside it; "Draw until
  valid" searches seed after seed with a progress bar; and the Sec. 4.5 max-density
  conditioning (only for a conditional checkpoint; an aggregate prior draws its value
  from the training crystals unless the user sets one).

Below the pages: live readouts of the frame (atoms, composition, closest pair, largest
density) and, for an encoded crystal, the match figures against its input.

All model work runs in one :class:`~crystalstudio.gui.workers.LatestRunner`: the newest
request wins, so dragging a slider never queues up decodes. While a slider is dragged only
the density is decoded; 250 ms after the last move (or on release) the frame is decoded
and segmented. Frames leave through :attr:`LatentExplorer.frame_ready`; the window draws
them in its right-hand view.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QSignalBlocker, Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGridLayout, QGroupBox,
                               QHBoxLayout, QLabel, QPushButton, QSizePolicy, QSlider, QSpinBox, QTabWidget,
                               QVBoxLayout, QWidget)

from ..core.latent import SLIDER_RANGE
from ..io.structures import element_symbol, read_structure
from ..session import Frame, Reconstruction, Session, sample_files, summarise
from .slices import SliceView
from .workers import LatestRunner

__all__ = ["LatentExplorer", "composition_text", "readouts_html", "SLIDER_STEPS", "ROWS", "DEBOUNCE_MS"]

ROWS = 12  # slider rows shown at once
SLIDER_STEPS = 100  # slider ticks per unit of z: -3..3 -> -300..300
T_STEPS = 1000  # t slider ticks
DEBOUNCE_MS = 250  # pause after the last move before atoms are segmented
PLAY_INTERVAL_MS = 80  # playback: at most ~12 frames/s, never faster than frames decode
CLOSE_A = 0.5  # Å: closer pairs are flagged
NOT_CONDITIONAL = "this checkpoint is not conditional"


def composition_text(composition: dict) -> str:
    """``{11: 4, 17: 4}`` -> ``"Na4 Cl4"`` (by Z); ``"—"`` when empty."""
    if not composition:
        return "—"
    return " ".join(f"{element_symbol(z)}{n if n != 1 else ''}" for z, n in sorted(composition.items()))


def readouts_html(r: dict, segmented: bool = True, metrics: dict | None = None, against: str = "") -> str:
    """Rich text of a frame's :func:`~crystalstudio.session.readouts` (and match figures)."""
    rows = []
    if segmented:
        rows.append(f"<b>Atoms</b> {r['n_atoms']} &nbsp; {html.escape(composition_text(r['composition']))}")
        d = r.get("min_distance_A")
        if d is None:
            rows.append("<b>Closest pair</b> —")
        else:
            style = " style='color:#e03030; font-weight:bold'" if r.get("too_close") else ""
            flag = " (too close)" if r.get("too_close") else ""
            rows.append(f"<b>Closest pair</b> <span{style}>{d:.2f} Å{flag}</span>")
    else:
        rows.append("<b>Atoms</b> <i>segmenting when the slider rests…</i>")
    rows.append(f"<b>Largest density</b> {r['max_density']:.3f} (≈ Z {r['max_density_Z']:.1f})")
    if metrics:
        m = metrics
        txt = (f"{m['n_true']} in, {m['n_pred']} out · {m['atoms_within_tol']:.0%} within {m.get('tol_A', 0.5):g} Å"
               f" · species {m['species_accuracy']:.0%} · exact count {'✓' if m['exact_count'] else '✗'}"
               f" · MSE {m['voxel_mse']:.1e}")
        rows.append(f"<b>vs {html.escape(against)} input</b> {txt}")
    return "<br>".join(rows)


class _SliderRow:
    """One latent dimension: label, slider (-3..3), value."""

    def __init__(self, parent: QWidget, grid: QGridLayout, row: int) -> None:
        self.dim = -1
        self.rank = -1
        self.label = QLabel("", parent)
        self.label.setMinimumWidth(64)
        self.slider = QSlider(Qt.Orientation.Horizontal, parent)
        lo, hi = SLIDER_RANGE
        self.slider.setRange(int(round(lo * SLIDER_STEPS)), int(round(hi * SLIDER_STEPS)))
        self.slider.setSingleStep(5)
        self.slider.setPageStep(50)
        self.slider.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.value = QLabel("+0.00", parent)
        self.value.setMinimumWidth(44)
        self.value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        grid.addWidget(self.label, row, 0)
        grid.addWidget(self.slider, row, 1)
        grid.addWidget(self.value, row, 2)

    def show(self, dim: int, rank: int, z: float, highlight: bool = False) -> None:
        self.dim, self.rank = dim, rank
        self.label.setText(f"z[{dim}]")
        self.label.setToolTip(f"latent dimension {dim}, rank {rank + 1} by information (held-out KL)")
        self.label.setStyleSheet("font-weight: bold; color: #e0a020;" if highlight else "")
        self.set_value(z)

    def set_value(self, z: float) -> None:
        """Show ``z``; a value beyond the slider's range (a refined latent can go there) pins the
        slider at its end and is shown in orange, with a tooltip that says so."""
        lo, hi = SLIDER_RANGE
        with QSignalBlocker(self.slider):
            self.slider.setValue(int(round(float(np.clip(z, lo, hi)) * SLIDER_STEPS)))
        self.value.setText(f"{z:+.2f}")
        outside = not lo <= z <= hi
        self.value.setStyleSheet("color: #e07020; font-weight: bold;" if outside else "")
        self.value.setToolTip(f"z = {z:+.3f} lies beyond the slider's range ({lo:g} to {hi:g}); "
                              "moving the slider sets a value inside it" if outside else "")


class LatentExplorer(QWidget):
    """Latent sliders, A-B interpolation, random draws and conditioning for one session.

    Args:
        parent: parent widget.
        session: the session to explore (None: everything is disabled until
            :meth:`set_session`).

    Signals:
        frame_ready(Frame, str, bool): a decoded frame to draw, its caption, and whether it
            was segmented (False: density only, keep the atoms on screen).
        frame_shown(Frame, bool): emitted after ``frame_ready`` (the frame is on screen).
        failed(str, str): title and one-line message of a failure.
        endpoint_set(str): endpoint "A" or "B" has a new z.
    """

    frame_ready = Signal(object, str, bool)
    frame_shown = Signal(object, bool)
    failed = Signal(str, str)
    endpoint_set = Signal(str)

    def __init__(self, parent: QWidget | None = None, session: Session | None = None) -> None:
        super().__init__(parent)
        self.session: Session | None = None
        self.runner = LatestRunner(self)
        self.runner.done.connect(self._on_done)
        self.runner.failed.connect(self._on_failed)
        self.runner.busy_changed.connect(self._on_busy)
        self.frame: Frame | None = None  # the frame on screen (last result)
        self.segmented = True
        self._epoch = 0  # decodes of older epochs are dropped (a new reconstruction or model)
        self._model_epoch = 0  # endpoint encodings of an older model are dropped
        self._last_request: tuple[bytes, Any, bool] | None = None
        self._source = "z = 0"
        self._order: list[int] = []  # latent_rank
        self._rank_of: dict[int, int] = {}
        self._first = 0  # rank shown in the first row
        self._t = 0.0
        self._path_cond: float | None = None  # conditioning of an A -> B frame
        self._playing = False
        self._closed = False

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(lambda: self.request(segment=True))
        self._play_timer = QTimer(self)
        self._play_timer.setInterval(PLAY_INTERVAL_MS)
        self._play_timer.timeout.connect(self._play_tick)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.tabs = QTabWidget(self)
        self.tabs.addTab(self._build_sliders(), "Sliders")
        self.tabs.addTab(self._build_interpolation(), "Interpolate")
        self.tabs.addTab(self._build_sampling(), "Sample")
        layout.addWidget(self.tabs)

        self.status_label = QLabel("", self)
        self.status_label.setStyleSheet("color: gray;")
        layout.addWidget(self.status_label)
        self.readout_label = QLabel("", self)
        self.readout_label.setTextFormat(Qt.TextFormat.RichText)
        self.readout_label.setWordWrap(True)
        self.readout_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.readout_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(self.readout_label)
        layout.addStretch(1)

        # The slice panel belongs to the explorer; the window docks it where it likes.
        self.slice_view = SliceView(None)
        self.set_session(session)

    # ------------------------------------------------------------------ construction
    def _build_sliders(self) -> QWidget:
        page = QWidget(self)
        v = QVBoxLayout(page)
        v.setContentsMargins(4, 4, 4, 4)
        nav = QHBoxLayout()
        nav.addWidget(QLabel("From rank", page))
        self.first_spin = QSpinBox(page)
        self.first_spin.setToolTip("Dimensions are ordered most informative first; page through the ranking")
        nav.addWidget(self.first_spin)
        nav.addSpacing(8)
        nav.addWidget(QLabel("Jump to dim", page))
        self.jump_spin = QSpinBox(page)
        self.jump_spin.setToolTip("Bring the slider of latent dimension N to the top")
        self.jump_spin.setKeyboardTracking(False)
        nav.addWidget(self.jump_spin)
        nav.addStretch(1)
        v.addLayout(nav)
        self.page_label = QLabel("", page)
        self.page_label.setStyleSheet("color: gray;")
        v.addWidget(self.page_label)

        grid = QGridLayout()
        grid.setVerticalSpacing(2)
        self.rows = [_SliderRow(page, grid, i) for i in range(ROWS)]
        for row in self.rows:
            row.slider.valueChanged.connect(lambda value, r=row: self._on_dim_slider(r, value))
            row.slider.sliderReleased.connect(self._on_release)
        v.addLayout(grid)

        buttons = QHBoxLayout()
        self.reset_button = QPushButton("Reset to encoded", page)
        self.reset_button.setToolTip("z = μ of the current reconstruction")
        self.zero_button = QPushButton("z = 0", page)
        self.zero_button.setToolTip("The origin of the latent space (the prior's mean)")
        buttons.addWidget(self.reset_button)
        buttons.addWidget(self.zero_button)
        buttons.addStretch(1)
        v.addLayout(buttons)
        v.addStretch(1)

        self.first_spin.valueChanged.connect(lambda r: self._show_page(r - 1))
        self.jump_spin.valueChanged.connect(self.show_dimension)
        self.reset_button.clicked.connect(self.reset_to_encoded)
        self.zero_button.clicked.connect(lambda: self.set_z(np.zeros(self._latent(), np.float32), "z = 0"))
        return page

    def _build_interpolation(self) -> QWidget:
        page = QWidget(self)
        v = QVBoxLayout(page)
        v.setContentsMargins(4, 4, 4, 4)
        form = QGridLayout()
        self.set_a_button = QPushButton("Set A = current", page)
        self.set_b_button = QPushButton("Set B = current", page)
        self.a_combo, self.b_combo = QComboBox(page), QComboBox(page)
        self.a_label, self.b_label = QLabel("A: —", page), QLabel("B: —", page)
        for i, (btn, combo, label) in enumerate(((self.set_a_button, self.a_combo, self.a_label),
                                                 (self.set_b_button, self.b_combo, self.b_label))):
            combo.addItem("sample…", None)
            for path in sample_files():
                combo.addItem(path.stem, str(path))
            combo.setToolTip("Encode a shipped sample as this endpoint")
            form.addWidget(btn, i, 0)
            form.addWidget(combo, i, 1)
            form.addWidget(label, i, 2)
            label.setMinimumWidth(40)
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        form.setColumnStretch(2, 1)
        v.addLayout(form)

        trow = QHBoxLayout()
        trow.addWidget(QLabel("t", page))
        self.t_slider = QSlider(Qt.Orientation.Horizontal, page)
        self.t_slider.setRange(0, T_STEPS)
        self.t_slider.setPageStep(T_STEPS // 10)
        self.t_slider.setEnabled(False)
        self.t_slider.setToolTip("Set A and B first")
        trow.addWidget(self.t_slider, 1)
        self.t_label = QLabel("0.000", page)
        self.t_label.setMinimumWidth(40)
        trow.addWidget(self.t_label)
        v.addLayout(trow)

        prow = QHBoxLayout()
        self.mode_combo = QComboBox(page)
        self.mode_combo.addItem("linear", "linear")
        self.mode_combo.addItem("spherical", "spherical")
        self.mode_combo.setToolTip("Straight line in z, or the great circle (norm interpolated linearly)")
        self.play_button = QPushButton("Play", page)
        self.play_button.setCheckable(True)
        self.play_button.setEnabled(False)
        self.loop_check = QCheckBox("Loop", page)
        self.steps_spin = QSpinBox(page)
        self.steps_spin.setRange(2, 1000)
        self.steps_spin.setValue(30)
        self.steps_spin.setToolTip("Frames per sweep from A to B")
        prow.addWidget(self.mode_combo)
        prow.addWidget(self.play_button)
        prow.addWidget(self.loop_check)
        prow.addStretch(1)
        v.addLayout(prow)
        srow = QHBoxLayout()
        srow.addWidget(QLabel("Frames per sweep", page))
        srow.addWidget(self.steps_spin)
        srow.addStretch(1)
        v.addLayout(srow)
        krow = QHBoxLayout()
        self.add_key_button = QPushButton("Add keyframe", page)
        self.add_key_button.setToolTip("Append the current z to the keyframe path (File > Export video…) [K]")
        self.add_key_button.setShortcut("K")
        self.clear_keys_button = QPushButton("Clear", page)
        self.keys_label = QLabel("Keyframes: 0", page)
        krow.addWidget(self.add_key_button)
        krow.addWidget(self.clear_keys_button)
        krow.addWidget(self.keys_label)
        krow.addStretch(1)
        v.addLayout(krow)
        v.addStretch(1)
        self.add_key_button.clicked.connect(self.add_keyframe)
        self.clear_keys_button.clicked.connect(self.clear_keyframes)

        self.set_a_button.clicked.connect(lambda: self.set_endpoint_current("A"))
        self.set_b_button.clicked.connect(lambda: self.set_endpoint_current("B"))
        self.a_combo.activated.connect(lambda i: self._endpoint_from_combo("A", self.a_combo, i))
        self.b_combo.activated.connect(lambda i: self._endpoint_from_combo("B", self.b_combo, i))
        self.t_slider.valueChanged.connect(self._on_t_slider)
        self.t_slider.sliderReleased.connect(self._on_release)
        self.mode_combo.currentIndexChanged.connect(lambda _: self._apply_t(self._t, segment=True))
        self.play_button.toggled.connect(self.play)
        return page

    def _build_sampling(self) -> QWidget:
        page = QWidget(self)
        v = QVBoxLayout(page)
        v.setContentsMargins(4, 4, 4, 4)
        rnd = QGroupBox("Random draw (Sec. 4.4)", page)
        rv = QVBoxLayout(rnd)
        h = QHBoxLayout()
        h.addWidget(QLabel("Prior", rnd))
        self.prior_combo = QComboBox(rnd)
        self.prior_combo.addItem("aggregate (fitted on the training crystals)", "aggregate")
        self.prior_combo.addItem("standard normal N(0, I)", "standard")
        self.prior_combo.setToolTip("Where z is drawn from. The aggregate prior is a Gaussian mixture fitted on the\n"
                                    "encoded training crystals: its draws decode to crystal-like fields. N(0, I) is\n"
                                    "the VAE's own prior (Sec. 4.4); with a small beta most of it lies between crystals.")
        h.addWidget(self.prior_combo, 1)
        rv.addLayout(h)
        self.prior_note = QLabel("", rnd)
        self.prior_note.setWordWrap(True)
        rv.addWidget(self.prior_note)
        h = QHBoxLayout()
        h.addWidget(QLabel("Seed", rnd))
        self.seed_spin = QSpinBox(rnd)
        self.seed_spin.setRange(0, 2**31 - 1)
        h.addWidget(self.seed_spin)
        h.addStretch(1)
        rv.addLayout(h)
        h = QHBoxLayout()
        rv.addLayout(h)
        self.randomise_button = QPushButton("Randomise", rnd)
        self.randomise_button.setToolTip("z from this seed (the same seed gives the same z)")
        self.sample_button = QPushButton("Sample", rnd)
        self.sample_button.setToolTip("Next seed, then randomise")
        h.addWidget(self.randomise_button)
        h.addWidget(self.sample_button)
        h.addStretch(1)
        self.validity_label = QLabel("", rnd)
        self.validity_label.setWordWrap(True)
        self.validity_label.setToolTip("Valid: every pair of atoms at least 0.5 Å apart and a charge-balanced\n"
                                       "composition by SMACT's rules (as CDVAE measures its draws)")
        rv.addWidget(self.validity_label)
        v.addWidget(rnd)
        from .draw_search import ValidDrawSearch

        self.search = ValidDrawSearch(page, lambda: self.session, lambda: int(self.seed_spin.value()),
                                      self.explicit_cond)
        self.search.chosen.connect(self.show_seed)
        v.addWidget(self.search)

        self.cond_group = QGroupBox("Condition on the largest density (Sec. 4.5)", page)
        self.cond_group.setCheckable(True)
        self.cond_group.setChecked(False)
        f = QFormLayout(self.cond_group)
        self.cond_spin = QDoubleSpinBox(self.cond_group)
        self.cond_spin.setDecimals(3)
        self.cond_spin.setRange(0.01, 10.0)
        self.cond_spin.setSingleStep(0.01)
        self.cond_spin.setValue(1.0)
        self.cond_z_label = QLabel("", self.cond_group)
        f.addRow("Target max density", self.cond_spin)
        f.addRow("as largest Z", self.cond_z_label)
        v.addWidget(self.cond_group)
        v.addStretch(1)

        self.randomise_button.clicked.connect(self.randomise)
        self.sample_button.clicked.connect(self.sample)
        self.prior_combo.currentIndexChanged.connect(self._on_prior_combo)
        self.cond_spin.valueChanged.connect(self._on_cond_changed)
        self.cond_group.toggled.connect(self._on_cond_toggled)
        return page

    # ------------------------------------------------------------------ session / model
    def _latent(self) -> int:
        return self.session.model.latent if self.session is not None else 0

    def set_session(self, session: Session | None) -> None:
        self.session = session
        self.model_changed()

    def model_changed(self) -> None:
        """Adopt the session's (new) model: ranking, slider ranges, conditioning."""
        s = self.session
        self.setEnabled(s is not None)
        self._epoch += 1
        self._model_epoch += 1
        self.runner.cancel()
        self._last_request = None
        if s is None:
            self._order, self._rank_of = [], {}
            self.status_label.setText("No model loaded.")
            self._show_keyframes()
            return
        s.reset_latent_state()
        m = s.model
        self._order = list(m.latent_rank)
        self._rank_of = {d: i for i, d in enumerate(self._order)}
        with QSignalBlocker(self.first_spin):
            self.first_spin.setRange(1, m.latent)
        with QSignalBlocker(self.jump_spin):
            self.jump_spin.setRange(0, m.latent - 1)
        self.slice_view.peak_scale = float(m.grid.peak_scale)
        conditional = bool(m.config.conditional)
        self.cond_group.setEnabled(conditional)
        self.cond_group.setToolTip("" if conditional else NOT_CONDITIONAL)
        self.cond_spin.setToolTip("Scale of the bottleneck: the decoded field's largest density"
                                  if conditional else NOT_CONDITIONAL)
        if not conditional:
            with QSignalBlocker(self.cond_group):
                self.cond_group.setChecked(False)
        self._on_cond_changed(self.cond_spin.value(), request=False)
        self._sync_prior()
        self._show_page(0)
        self._update_endpoints()
        self._show_keyframes()
        self.status_label.setText("")

    @property
    def z(self) -> np.ndarray:
        """The latent vector being explored (zeros before anything was encoded)."""
        s = self.session
        if s is None:
            return np.zeros(0, np.float32)
        if s.z is None or s.z.shape != (s.model.latent,):
            s.z = np.zeros(s.model.latent, np.float32)
        return s.z

    def explicit_cond(self) -> float | None:
        """The control's target largest density when conditioning is switched on, else None."""
        if self.cond_group.isEnabled() and self.cond_group.isChecked():
            return float(self.cond_spin.value())
        return None

    def cond(self) -> float | None:
        """The target largest density passed to the decoder (Eq. 1 units): the control's value
        when conditioning is on; else, between A and B, :meth:`~Session.cond_between`; else the
        session's :meth:`~Session.natural_cond` (None for an unconditional model)."""
        c = self.explicit_cond()
        if c is None and self._source.startswith("random"):
            c = getattr(self, "_draw_cond", None)  # an aggregate-prior draw's own value
        if c is None:
            c = self._path_cond  # between A and B: their largest densities interpolated
        if c is None and self.session is not None:
            c = self.session.natural_cond()
        return c

    # ------------------------------------------------------------------ keyframes
    def add_keyframe(self) -> int:
        """Append the explored z to the session's keyframe path; returns the count."""
        if self.session is None:
            return 0
        n = self.session.add_keyframe(self.z)
        self._show_keyframes()
        return n

    def clear_keyframes(self) -> None:
        if self.session is not None:
            self.session.clear_keyframes()
        self._show_keyframes()

    def _show_keyframes(self) -> None:
        n = 0 if self.session is None else len(self.session.keyframes)
        self.keys_label.setText(f"Keyframes: {n}")

    # ------------------------------------------------------------------ sliders
    def _show_page(self, first: int) -> None:
        n = len(self._order)
        if n == 0:
            return
        first = int(min(max(first, 0), max(n - ROWS, 0)))
        self._first = first
        with QSignalBlocker(self.first_spin):
            self.first_spin.setValue(first + 1)
        self._refresh_rows()
        last = min(first + ROWS, n)
        self.page_label.setText(f"ranks {first + 1}–{last} of {n} (most informative first)")

    def _refresh_rows(self, highlight: int | None = None) -> None:
        z = self.z
        for i, row in enumerate(self.rows):
            k = self._first + i
            if k < len(self._order):
                d = self._order[k]
                row.show(d, k, float(z[d]), highlight=(d == highlight))
                row.slider.setVisible(True)
            else:
                row.label.setText("")
                row.slider.setVisible(False)
                row.value.setText("")

    def show_dimension(self, dim: int) -> _SliderRow:
        """Bring latent dimension ``dim``'s slider into view (highlighted) and return its row."""
        if not self._order:
            raise ValueError("no model loaded")
        if not 0 <= dim < len(self._order):
            raise ValueError(f"latent dimension {dim} out of range 0..{len(self._order) - 1}")
        with QSignalBlocker(self.jump_spin):
            self.jump_spin.setValue(dim)
        rank = self._rank_of[dim]
        n = len(self._order)
        if not self._first <= rank < self._first + ROWS:
            self._show_page(min(rank, max(n - ROWS, 0)))
        self._refresh_rows(highlight=dim)
        return self.row_for(dim)

    def row_for(self, dim: int) -> _SliderRow | None:
        """The slider row showing ``dim`` now (None when it is not on the page)."""
        return next((r for r in self.rows if r.dim == dim and r.slider.isVisible()), None)

    def _on_dim_slider(self, row: _SliderRow, value: int) -> None:
        if self.session is None or row.dim < 0:
            return
        z = self.z.copy()
        z[row.dim] = value / SLIDER_STEPS
        row.value.setText(f"{z[row.dim]:+.2f}")
        base = self._source.split(" · ")[0]
        self._set_z(z, f"{base} · z[{row.dim}] = {z[row.dim]:+.2f}", dragging=row.slider.isSliderDown(),
                    refresh=False)

    def _on_release(self) -> None:
        self._debounce.stop()
        self.request(segment=True)

    # ------------------------------------------------------------------ setting z
    def _set_z(self, z: np.ndarray, source: str, dragging: bool = False, refresh: bool = True,
               path_cond: float | None = None) -> None:
        self.session.set_latent(z)
        self._source = source
        self._path_cond = path_cond
        if refresh:
            self._refresh_rows()
        if dragging:  # density only now, atoms when the slider rests
            self.request(segment=False)
            self._debounce.start()
        else:
            self._debounce.stop()
            self.request(segment=True)

    def set_z(self, z: np.ndarray, source: str = "z") -> None:
        """Explore ``z`` (decoded and segmented in the background)."""
        if self.session is None:
            return
        self._set_z(np.asarray(z, np.float32), source)

    def reset_to_encoded(self) -> None:
        """z = mu of the current reconstruction."""
        rec = self.session.current if self.session is not None else None
        if rec is None:
            self.status_label.setText("Nothing encoded yet: open a structure first.")
            return
        self.set_z(rec.z, f"{rec.crystal.name} {'μ' if np.array_equal(rec.z, rec.mu) else 'z*'}")

    def _sync_prior(self) -> None:
        """Show the session's prior choice and whether the model has an aggregate prior."""
        s = self.session
        if s is None:
            return
        with QSignalBlocker(self.prior_combo):
            self.prior_combo.setCurrentIndex(max(0, self.prior_combo.findData(s.prior)))
        p = s.model.prior
        if p is None:
            self.prior_note.setText("This checkpoint has no aggregate prior (python -m training fit-prior adds one): "
                                    "draws come from N(0, I)." if s.prior == "aggregate" else "")
        else:
            self.prior_note.setText(f"aggregate prior: {p.n_components} Gaussian(s), {p.covariance_type} covariance"
                                    if s.prior == "aggregate" else "")

    def _on_prior_combo(self, index: int) -> None:
        if self.session is not None:
            self.session.set_prior(str(self.prior_combo.itemData(index)))
            self._sync_prior()

    def randomise(self) -> np.ndarray | None:
        """The draw of the seed in the seed box from the session's prior (same seed, same z);
        a conditional model with an aggregate prior also draws its largest density unless
        conditioning is switched on by the user."""
        if self.session is None:
            return None
        seed = int(self.seed_spin.value())
        z, cond = self.session.draw(1, seed)
        if cond is not None and self.explicit_cond() is None:
            with QSignalBlocker(self.cond_spin):
                self.cond_spin.setValue(float(cond[0]))
            self._draw_cond = float(cond[0])
        else:
            self._draw_cond = None
        self.set_z(z[0], f"random, seed {seed} ({self.session.prior_in_use()} prior)")
        return z[0]

    def show_seed(self, seed: int) -> None:
        """Put ``seed`` in the seed box and show its draw."""
        with QSignalBlocker(self.seed_spin):
            self.seed_spin.setValue(int(seed))
        self.randomise()

    def sample(self) -> np.ndarray | None:
        """Next seed, then :meth:`randomise`."""
        self.seed_spin.setValue(min(self.seed_spin.value() + 1, self.seed_spin.maximum()))
        return self.randomise()

    def _on_cond_toggled(self, on: bool) -> None:
        natural = None if self.session is None else self.session.natural_cond()
        if on and natural is not None:  # start from the crystal's own largest density
            with QSignalBlocker(self.cond_spin):
                self.cond_spin.setValue(natural)
            self._on_cond_changed(natural, request=False)
        self.request(segment=True)

    def _on_cond_changed(self, value: float, request: bool = True) -> None:
        ps = self.session.model.grid.peak_scale if self.session is not None else 1.0
        self.cond_z_label.setText(f"Z ≈ {value * ps:.1f}")
        if request and self.cond() is not None:
            self.request(segment=False)
            self._debounce.start()

    # ------------------------------------------------------------------ interpolation
    def set_endpoint_current(self, which: str) -> None:
        """Endpoint ``which`` = the z explored now (the reconstruction's μ unless it was moved)."""
        if self.session is None:
            return
        rec = self.session.current
        z = self.z.copy()
        if rec is not None and np.array_equal(z, rec.z):
            name, r = rec.crystal.name, rec
        else:
            name, r = self._source, None
        self.session.set_endpoint(which, name, z, r)
        combo = self.a_combo if which == "A" else self.b_combo
        combo.setCurrentIndex(0)
        self._endpoint_changed(which)

    def set_endpoint_sample(self, which: str, path: str | Path) -> None:
        """Encode the structure file ``path`` in the background and make it endpoint ``which``."""
        if self.session is None:
            return
        session, path = self.session, Path(path)

        def work() -> Reconstruction:
            return session.compute(read_structure(path, session.grid))

        (self.a_label if which == "A" else self.b_label).setText(f"{which}: encoding {path.stem}…")
        self.runner.submit(work, tag={"kind": "endpoint", "which": which, "model_epoch": self._model_epoch},
                           channel=f"endpoint-{which}")

    def _endpoint_from_combo(self, which: str, combo: QComboBox, index: int) -> None:
        path = combo.itemData(index)
        if path:
            self.set_endpoint_sample(which, path)

    def _endpoint_changed(self, which: str) -> None:
        self._update_endpoints()
        self.endpoint_set.emit(which)
        if self.t_slider.isEnabled():
            self._apply_t(self._t, segment=True)

    def _update_endpoints(self) -> None:
        eps = self.session.endpoints if self.session is not None else {"A": None, "B": None}
        for which, label in (("A", self.a_label), ("B", self.b_label)):
            ep = eps.get(which)
            label.setText(f"{which}: {ep.name}" if ep is not None else f"{which}: —")
        ready = all(eps.get(k) is not None for k in ("A", "B"))
        self.t_slider.setEnabled(ready)
        self.play_button.setEnabled(ready)
        self.t_slider.setToolTip("" if ready else "Set A and B first")
        if not ready and self._playing:
            self.play(False)

    def _on_t_slider(self, value: int) -> None:
        self._apply_t(value / T_STEPS, segment=not self.t_slider.isSliderDown())

    def _apply_t(self, t: float, segment: bool = True) -> None:
        s = self.session
        if s is None or s.endpoints["A"] is None or s.endpoints["B"] is None:
            return
        self._t = float(t)
        with QSignalBlocker(self.t_slider):
            self.t_slider.setValue(int(round(self._t * T_STEPS)))
        self.t_label.setText(f"{self._t:.3f}")
        mode = self.mode_combo.currentData()
        z = s.latent_between(self._t, mode)
        a, b = s.endpoints["A"].name, s.endpoints["B"].name
        self._set_z(z, f"{a} → {b}, t = {self._t:.3f} ({mode})", dragging=not segment,
                    path_cond=s.cond_between(self._t))

    def set_t(self, t: float) -> None:
        """Move to ``t`` in [0, 1] between A and B (decoded and segmented)."""
        self._apply_t(min(max(float(t), 0.0), 1.0), segment=True)

    def play(self, on: bool = True) -> None:
        """Start / stop stepping t through ``frames`` values from A to B."""
        on = bool(on) and self.t_slider.isEnabled()
        self._playing = on
        with QSignalBlocker(self.play_button):
            self.play_button.setChecked(on)
        self.play_button.setText("Pause" if on else "Play")
        if on:
            self._play_timer.start()
        else:
            self._play_timer.stop()

    @property
    def playing(self) -> bool:
        return self._playing

    def _play_tick(self) -> None:
        if self.runner.busy:  # show every frame: wait for the one being decoded
            return
        steps = int(self.steps_spin.value())
        i = int(round(self._t * (steps - 1))) + 1
        if i > steps - 1:
            if not self.loop_check.isChecked():
                self.play(False)
                return
            i = 0
        self._apply_t(i / (steps - 1), segment=True)

    # ------------------------------------------------------------------ requests
    def request(self, segment: bool = True) -> None:
        """Decode the current z (and segment it) in the worker; the newest request wins."""
        s = self.session
        if s is None or self._closed:
            return
        z = self.z.copy()
        cond = self.cond()
        key = (z.tobytes(), cond)
        if self._last_request is not None and self._last_request[:2] == key and (self._last_request[2] or not segment):
            return  # the same frame is already on its way
        self._last_request = (*key, segment)
        rec = s.current
        tag = {"kind": "decode", "segment": segment, "epoch": self._epoch, "source": self._source,
               "target": rec.crystal.name if rec is not None else ""}
        self.runner.submit(_decode_job, s, z, cond, segment, rec, tag=tag, channel="decode")

    def _on_busy(self, busy: bool) -> None:
        if busy:
            self.status_label.setText("decoding…")
        elif self.status_label.text() == "decoding…":
            self.status_label.setText("")

    def _on_done(self, result: Any, tag: dict) -> None:
        if self._closed:
            return
        if tag["kind"] == "endpoint":
            if tag["model_epoch"] != self._model_epoch:
                return
            rec: Reconstruction = result
            self.session.set_endpoint(tag["which"], rec.crystal.name, rec.z, rec)
            self._endpoint_changed(tag["which"])
            return
        if tag["epoch"] != self._epoch:
            return
        frame, metrics = result
        self.frame, self.segmented = frame, bool(tag["segment"])
        caption = tag["source"] + ("" if self.segmented else " (density only)")
        self.frame_ready.emit(frame, caption, self.segmented)
        rec = self.session.current
        if rec is not None:
            self.slice_view.set_fields(rec.M, frame.M_hat, rec.crystal.name)
        else:
            self.slice_view.set_fields(None, frame.M_hat)
        self.readout_label.setText(readouts_html(frame.readouts, self.segmented, metrics, tag["target"]))
        why = frame.readouts.get("validity")
        if self.segmented and why is not None:
            ok = why == "valid"
            self.validity_label.setText(f"<b style='color:{'#2a7' if ok else '#c33'}'>"
                                        f"{'valid crystal' if ok else 'not valid'}</b>"
                                        + ("" if ok else f": {html.escape(why)}"))
        self.frame_shown.emit(frame, self.segmented)

    def _on_failed(self, exc: BaseException, tag: dict) -> None:
        if self._closed:
            return
        if tag.get("kind") == "endpoint":
            self._update_endpoints()
        self._last_request = None
        msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        self.failed.emit("Latent explorer", msg)

    # ------------------------------------------------------------------ reconstruction
    def on_reconstruction(self, rec: Reconstruction) -> None:
        """A new reconstruction is on screen: z = its μ; in-flight decodes are dropped."""
        self._epoch += 1
        self._debounce.stop()
        self.runner.cancel("decode")
        self.play(False)
        self._last_request = (np.asarray(rec.z, np.float32).tobytes(), None, True)
        self._source = f"{rec.crystal.name} μ"
        if self.session is not None and (self.session.z is None or not np.array_equal(self.session.z, rec.z)):
            self.session.set_latent(rec.z)
        self._refresh_rows()
        self.frame = Frame(np.asarray(rec.z, np.float32), rec.M_hat, rec.atoms, {})
        self.segmented = True
        from ..session import readouts

        r = readouts(rec.atoms, rec.M_hat, self.session.grid.peak_scale if self.session else 1.0, CLOSE_A)
        self.frame.readouts = r
        self.readout_label.setText(readouts_html(r, True, rec.metrics, rec.crystal.name))
        self.slice_view.set_fields(rec.M, rec.M_hat, rec.crystal.name)
        if self.cond_group.isEnabled():
            with QSignalBlocker(self.cond_spin):
                self.cond_spin.setValue(float(rec.M.max()))
            self._on_cond_changed(self.cond_spin.value(), request=False)

    def shutdown(self) -> None:
        """Stop timers and wait for the worker (window closing)."""
        self._closed = True
        self._debounce.stop()
        self._play_timer.stop()
        self.search.shutdown()
        self.runner.shutdown()


def _decode_job(session: Session, z: np.ndarray, cond: float | None, segment: bool,
                target: Reconstruction | None) -> tuple[Frame, dict | None]:
    """Worker side: decode (and segment) z; match figures against the encoded input."""
    frame = session.decode(z, cond, segment=segment)
    if segment:
        from ..io.validity import check_draw

        frame.readouts["validity"] = check_draw(frame.atoms.positions, frame.atoms.Z).reason
    metrics = None
    if segment and target is not None:
        metrics = summarise(target.positions, target.Z, frame.atoms, target.M, frame.M_hat)
    return frame, metrics
