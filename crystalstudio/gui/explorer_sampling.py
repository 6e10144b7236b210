"""The latent explorer's "Sample" page: random draws (Sec. 4.4) and max-density conditioning (Sec. 4.5).

:class:`SamplingPanel` draws z from a seed ("Randomise"; "Sample" = next seed) from the prior
of choice: the checkpoint's aggregate prior (a Gaussian mixture fitted where the training
crystals encode) or N(0, I); it shows each draw's validity and holds the "Draw until valid"
search (:class:`~crystalstudio.gui.draw_search.ValidDrawSearch`). :class:`ConditionBox` is the
target largest density of a conditional checkpoint (disabled for any other).

Neither decodes anything: a draw leaves through :attr:`SamplingPanel.drawn`, a change of
conditioning through :attr:`ConditionBox.switched` / :attr:`ConditionBox.target_changed`.
"""

from __future__ import annotations

import html
from typing import Callable

import numpy as np
from PySide6.QtCore import QSignalBlocker, Signal
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

from ..session import Session

__all__ = ["SamplingPanel", "ConditionBox", "NOT_CONDITIONAL"]

NOT_CONDITIONAL = "this checkpoint is not conditional"


class ConditionBox(QGroupBox):
    """"Condition on the largest density (Sec. 4.5)": a checkable box with the target value.

    Args:
        parent: parent widget.
        session_of: returns the session (or None).

    Signals:
        switched(): conditioning was switched on or off (switched on, the target starts at the
            crystal's own largest density).
        target_changed(): the user changed the target value.
    """

    switched = Signal()
    target_changed = Signal()

    def __init__(self, parent: QWidget | None, session_of: Callable[[], Session | None]) -> None:
        super().__init__("Condition on the largest density (Sec. 4.5)", parent)
        self._session_of = session_of
        self.setCheckable(True)
        self.setChecked(False)
        f = QFormLayout(self)
        self.cond_spin = QDoubleSpinBox(self)
        self.cond_spin.setDecimals(3)
        self.cond_spin.setRange(0.01, 10.0)
        self.cond_spin.setSingleStep(0.01)
        self.cond_spin.setValue(1.0)
        self.cond_z_label = QLabel("", self)
        f.addRow("Target max density", self.cond_spin)
        f.addRow("as largest Z", self.cond_z_label)
        self.cond_spin.valueChanged.connect(self._on_value)
        self.toggled.connect(self._on_toggled)

    def explicit(self) -> float | None:
        """The target largest density when conditioning is switched on, else None."""
        if self.isEnabled() and self.isChecked():
            return float(self.cond_spin.value())
        return None

    def set_conditional(self, conditional: bool) -> None:
        """Adopt a model: enabled only for a conditional one (and then switched off when not)."""
        self.setEnabled(conditional)
        self.setToolTip("" if conditional else NOT_CONDITIONAL)
        self.cond_spin.setToolTip("Scale of the bottleneck: the decoded field's largest density"
                                  if conditional else NOT_CONDITIONAL)
        if not conditional:
            with QSignalBlocker(self):
                self.setChecked(False)
        self.show_z(self.cond_spin.value())

    def set_target(self, value: float) -> None:
        """Show ``value`` as the target without emitting :attr:`target_changed`."""
        with QSignalBlocker(self.cond_spin):
            self.cond_spin.setValue(value)
        self.show_z(self.cond_spin.value())

    def show_z(self, value: float) -> None:
        """Show the target ``value`` as the atomic number of its peak."""
        session = self._session_of()
        ps = session.model.grid.peak_scale if session is not None else 1.0
        self.cond_z_label.setText(f"Z ≈ {value * ps:.1f}")

    def _on_toggled(self, on: bool) -> None:
        session = self._session_of()
        natural = None if session is None else session.natural_cond()
        if on and natural is not None:  # start from the crystal's own largest density
            with QSignalBlocker(self.cond_spin):
                self.cond_spin.setValue(natural)
            self.show_z(natural)
        self.switched.emit()

    def _on_value(self, value: float) -> None:
        self.show_z(value)
        self.target_changed.emit()


class SamplingPanel(QWidget):
    """The "Sample" page: prior, seed, random draws with their validity, the valid-draw search
    and the conditioning box (:attr:`cond_group`, a :class:`ConditionBox`).

    Args:
        parent: parent widget.
        session_of: returns the session (or None).

    Attributes:
        draw_cond: the largest density that came with the last aggregate-prior draw of a
            conditional model (None otherwise or when conditioning is switched on).

    Signals:
        drawn(ndarray, str): a draw to explore and its caption.
    """

    drawn = Signal(object, str)

    def __init__(self, parent: QWidget | None, session_of: Callable[[], Session | None]) -> None:
        super().__init__(parent)
        self._session_of = session_of
        self.draw_cond: float | None = None
        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        v.addWidget(self._build_draw_box())
        from .draw_search import ValidDrawSearch

        self.search = ValidDrawSearch(self, session_of, lambda: int(self.seed_spin.value()),
                                      lambda: self.cond_group.explicit())
        self.search.chosen.connect(self.show_seed)
        v.addWidget(self.search)
        self.cond_group = ConditionBox(self, session_of)
        v.addWidget(self.cond_group)
        v.addStretch(1)

        self.randomise_button.clicked.connect(self.randomise)
        self.sample_button.clicked.connect(self.sample)
        self.prior_combo.currentIndexChanged.connect(self._on_prior_combo)

    def _build_draw_box(self) -> QGroupBox:
        rnd = QGroupBox("Random draw (Sec. 4.4)", self)
        rv = QVBoxLayout(rnd)
        h = QHBoxLayout()
        h.addWidget(QLabel("Prior", rnd))
        self.prior_combo = QComboBox(rnd)
        self.prior_combo.addItem("aggregate (fitted on the training crystals)", "aggregate")
        self.prior_combo.addItem("standard normal N(0, I)", "standard")
        self.prior_combo.setToolTip("Where z is drawn from. The aggregate prior is a Gaussian mixture fitted on the\n"
                                    "encoded training crystals: its draws decode to crystal-like fields. N(0, I) is\n"
                                    "the VAE's own prior (Sec. 4.4); with a small beta most of it lies "
                                    "between crystals.")
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
        return rnd

    def sync_prior(self) -> None:
        """Show the session's prior choice and whether the model has an aggregate prior."""
        s = self._session_of()
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
        session = self._session_of()
        if session is not None:
            session.set_prior(str(self.prior_combo.itemData(index)))
            self.sync_prior()

    def randomise(self) -> np.ndarray | None:
        """The draw of the seed in the seed box from the session's prior (same seed, same z);
        a conditional model with an aggregate prior also draws its largest density unless
        conditioning is switched on by the user."""
        session = self._session_of()
        if session is None:
            return None
        seed = int(self.seed_spin.value())
        z, cond = session.draw(1, seed)
        if cond is not None and self.cond_group.explicit() is None:
            self.cond_group.set_target(float(cond[0]))  # value and its "as largest Z" label
            self.draw_cond = float(cond[0])
        else:
            self.draw_cond = None
        self.drawn.emit(z[0], f"random, seed {seed} ({session.prior_in_use()} prior)")
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

    def show_validity(self, why: str) -> None:
        """Show a segmented frame's validity: ``"valid"`` or the reason it is not."""
        ok = why == "valid"
        self.validity_label.setText(f"<b style='color:{'#2a7' if ok else '#c33'}'>"
                                    f"{'valid crystal' if ok else 'not valid'}</b>"
                                    + ("" if ok else f": {html.escape(why)}"))
