"""The latent explorer's "Interpolate" page: endpoints A and B, the t slider, playback, keyframes.

Endpoints are the z explored now or a shipped sample encoded on the fly; t in [0, 1] moves
linearly or along the great circle between them (t = 0 and t = 1 are A's and B's z exactly),
and "Play" steps t through "frames per sweep" values (looping if asked). "Add keyframe"
appends the explored z to the session's keyframe path (File > Export video…).

:class:`InterpolationPanel` does no model work itself: a point on the path leaves through
:attr:`~InterpolationPanel.moved`, a sample to encode through
:attr:`~InterpolationPanel.encode_requested`; the explorer decodes and encodes in its worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PySide6.QtCore import QSignalBlocker, Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QGridLayout, QHBoxLayout, QLabel, QPushButton, QSizePolicy,
                               QSlider, QSpinBox, QVBoxLayout, QWidget)

from ..session import Reconstruction, Session, sample_files

__all__ = ["InterpolationPanel", "KeyframeBar", "T_STEPS", "PLAY_INTERVAL_MS"]

T_STEPS = 1000  # t slider ticks
PLAY_INTERVAL_MS = 80  # playback: at most ~12 frames/s, never faster than frames decode


class KeyframeBar(QWidget):
    """"Add keyframe" [K], "Clear" and the count of the session's keyframe path (for a video).

    Args:
        parent: parent widget.
        session_of: returns the session (or None).
        z_of: returns the latent vector explored now (what "Add keyframe" appends).
    """

    def __init__(self, parent: QWidget | None, session_of: Callable[[], Session | None],
                 z_of: Callable[[], np.ndarray]) -> None:
        super().__init__(parent)
        self._session_of, self._z_of = session_of, z_of
        krow = QHBoxLayout(self)
        krow.setContentsMargins(0, 0, 0, 0)
        self.add_key_button = QPushButton("Add keyframe", self)
        self.add_key_button.setToolTip("Append the current z to the keyframe path (File > Export video…) [K]")
        self.add_key_button.setShortcut("K")
        self.clear_keys_button = QPushButton("Clear", self)
        self.keys_label = QLabel("Keyframes: 0", self)
        krow.addWidget(self.add_key_button)
        krow.addWidget(self.clear_keys_button)
        krow.addWidget(self.keys_label)
        krow.addStretch(1)
        self.add_key_button.clicked.connect(self.add_keyframe)
        self.clear_keys_button.clicked.connect(self.clear_keyframes)

    def add_keyframe(self) -> int:
        """Append the explored z to the session's keyframe path; returns the count."""
        session = self._session_of()
        if session is None:
            return 0
        n = session.path.add_keyframe(self._z_of())
        self.show_keyframes()
        return n

    def clear_keyframes(self) -> None:
        """Empty the session's keyframe path."""
        session = self._session_of()
        if session is not None:
            session.path.clear_keyframes()
        self.show_keyframes()

    def show_keyframes(self) -> None:
        """Show how many keyframes the session holds."""
        session = self._session_of()
        n = 0 if session is None else len(session.path.keyframes)
        self.keys_label.setText(f"Keyframes: {n}")


class InterpolationPanel(QWidget):
    """A-B interpolation with play / pause, and the keyframe path (:attr:`keyframes`, a
    :class:`KeyframeBar`) of one session.

    Args:
        parent: parent widget.
        session_of: returns the session (or None).
        z_of: returns the latent vector explored now.
        source_of: returns the caption of the explored z (names an endpoint set from it).
        busy_of: returns True while a frame is being decoded (playback waits for it).

    Signals:
        moved(ndarray, str, bool, object): a point on the path to explore: z, its caption,
            whether t is being dragged (decode the density only), and the largest density
            between A's and B's (float or None).
        released(): the t slider was released.
        encode_requested(str, Path): encode this structure file as endpoint "A" or "B".
        endpoint_set(str): endpoint "A" or "B" has a new z.
    """

    moved = Signal(object, str, bool, object)
    released = Signal()
    encode_requested = Signal(str, object)
    endpoint_set = Signal(str)

    def __init__(self, parent: QWidget | None, session_of: Callable[[], Session | None],
                 z_of: Callable[[], np.ndarray], source_of: Callable[[], str], busy_of: Callable[[], bool]) -> None:
        super().__init__(parent)
        self._session_of, self._z_of, self._source_of, self._busy_of = session_of, z_of, source_of, busy_of
        self._t = 0.0
        self._playing = False
        self._play_timer = QTimer(self)
        self._play_timer.setInterval(PLAY_INTERVAL_MS)
        self._play_timer.timeout.connect(self._play_tick)
        self._build()

    def _build(self) -> None:
        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        form = QGridLayout()
        self.set_a_button = QPushButton("Set A = current", self)
        self.set_b_button = QPushButton("Set B = current", self)
        self.a_combo, self.b_combo = QComboBox(self), QComboBox(self)
        self.a_label, self.b_label = QLabel("A: —", self), QLabel("B: —", self)
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
        trow.addWidget(QLabel("t", self))
        self.t_slider = QSlider(Qt.Orientation.Horizontal, self)
        self.t_slider.setRange(0, T_STEPS)
        self.t_slider.setPageStep(T_STEPS // 10)
        self.t_slider.setEnabled(False)
        self.t_slider.setToolTip("Set A and B first")
        trow.addWidget(self.t_slider, 1)
        self.t_label = QLabel("0.000", self)
        self.t_label.setMinimumWidth(40)
        trow.addWidget(self.t_label)
        v.addLayout(trow)

        prow = QHBoxLayout()
        self.mode_combo = QComboBox(self)
        self.mode_combo.addItem("linear", "linear")
        self.mode_combo.addItem("spherical", "spherical")
        self.mode_combo.setToolTip("Straight line in z, or the great circle (norm interpolated linearly)")
        self.play_button = QPushButton("Play", self)
        self.play_button.setCheckable(True)
        self.play_button.setEnabled(False)
        self.loop_check = QCheckBox("Loop", self)
        self.steps_spin = QSpinBox(self)
        self.steps_spin.setRange(2, 1000)
        self.steps_spin.setValue(30)
        self.steps_spin.setToolTip("Frames per sweep from A to B")
        prow.addWidget(self.mode_combo)
        prow.addWidget(self.play_button)
        prow.addWidget(self.loop_check)
        prow.addStretch(1)
        v.addLayout(prow)
        srow = QHBoxLayout()
        srow.addWidget(QLabel("Frames per sweep", self))
        srow.addWidget(self.steps_spin)
        srow.addStretch(1)
        v.addLayout(srow)
        self.keyframes = KeyframeBar(self, self._session_of, self._z_of)
        v.addWidget(self.keyframes)
        v.addStretch(1)

        self.set_a_button.clicked.connect(lambda: self.set_endpoint_current("A"))
        self.set_b_button.clicked.connect(lambda: self.set_endpoint_current("B"))
        self.a_combo.activated.connect(lambda i: self._endpoint_from_combo("A", self.a_combo, i))
        self.b_combo.activated.connect(lambda i: self._endpoint_from_combo("B", self.b_combo, i))
        self.t_slider.valueChanged.connect(self._on_t_slider)
        self.t_slider.sliderReleased.connect(self.released)
        self.mode_combo.currentIndexChanged.connect(lambda _: self.apply_t(self._t, segment=True))
        self.play_button.toggled.connect(self.play)

    # ------------------------------------------------------------------ endpoints
    def set_endpoint_current(self, which: str) -> None:
        """Endpoint ``which`` = the z explored now (the reconstruction's μ unless it was moved)."""
        session = self._session_of()
        if session is None:
            return
        rec = session.current
        z = self._z_of().copy()
        if rec is not None and np.array_equal(z, rec.z):
            name, r = rec.crystal.name, rec
        else:
            name, r = self._source_of(), None
        session.path.set_endpoint(which, name, z, r)
        combo = self.a_combo if which == "A" else self.b_combo
        combo.setCurrentIndex(0)
        self.endpoint_changed(which)

    def set_endpoint_sample(self, which: str, path: str | Path) -> None:
        """Ask for the structure file ``path`` to be encoded as endpoint ``which``
        (:attr:`encode_requested`; :meth:`set_encoded` takes the result)."""
        if self._session_of() is None:
            return
        path = Path(path)
        (self.a_label if which == "A" else self.b_label).setText(f"{which}: encoding {path.stem}…")
        self.encode_requested.emit(which, path)

    def set_encoded(self, which: str, rec: Reconstruction) -> None:
        """The encoded structure ``rec`` is endpoint ``which`` now."""
        self._session_of().path.set_endpoint(which, rec.crystal.name, rec.z, rec)
        self.endpoint_changed(which)

    def _endpoint_from_combo(self, which: str, combo: QComboBox, index: int) -> None:
        path = combo.itemData(index)
        if path:
            self.set_endpoint_sample(which, path)

    def endpoint_changed(self, which: str) -> None:
        """Endpoint ``which`` changed: show it, emit :attr:`endpoint_set`, move along the new path."""
        self.update_endpoints()
        self.endpoint_set.emit(which)
        if self.t_slider.isEnabled():
            self.apply_t(self._t, segment=True)

    def update_endpoints(self) -> None:
        """Show the session's endpoints; t and Play are enabled once both are set."""
        session = self._session_of()
        eps = session.path.endpoints if session is not None else {"A": None, "B": None}
        for which, label in (("A", self.a_label), ("B", self.b_label)):
            ep = eps.get(which)
            label.setText(f"{which}: {ep.name}" if ep is not None else f"{which}: —")
        ready = all(eps.get(k) is not None for k in ("A", "B"))
        self.t_slider.setEnabled(ready)
        self.play_button.setEnabled(ready)
        self.t_slider.setToolTip("" if ready else "Set A and B first")
        if not ready and self._playing:
            self.play(False)

    # ------------------------------------------------------------------ t and playback
    def _on_t_slider(self, value: int) -> None:
        self.apply_t(value / T_STEPS, segment=not self.t_slider.isSliderDown())

    def apply_t(self, t: float, segment: bool = True) -> None:
        """Move to ``t`` between A and B (nothing before both are set); ``segment`` False: dragging."""
        s = self._session_of()
        if s is None or not s.path.ready():
            return
        self._t = float(t)
        with QSignalBlocker(self.t_slider):
            self.t_slider.setValue(int(round(self._t * T_STEPS)))
        self.t_label.setText(f"{self._t:.3f}")
        mode = self.mode_combo.currentData()
        z = s.path.between(self._t, mode)
        a, b = s.path.endpoints["A"].name, s.path.endpoints["B"].name
        self.moved.emit(z, f"{a} → {b}, t = {self._t:.3f} ({mode})", not segment, s.cond_between(self._t))

    def set_t(self, t: float) -> None:
        """Move to ``t`` in [0, 1] between A and B (decoded and segmented)."""
        self.apply_t(min(max(float(t), 0.0), 1.0), segment=True)

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
        """True while playback steps t."""
        return self._playing

    def stop_timer(self) -> None:
        """Stop the playback timer (window closing)."""
        self._play_timer.stop()

    def _play_tick(self) -> None:
        if self._busy_of():  # show every frame: wait for the one being decoded
            return
        steps = int(self.steps_spin.value())
        i = int(round(self._t * (steps - 1))) + 1
        if i > steps - 1:
            if not self.loop_check.isChecked():
                self.play(False)
                return
            i = 0
        self.apply_t(i / (steps - 1), segment=True)
