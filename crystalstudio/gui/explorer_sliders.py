"""The latent explorer's "Sliders" page: one slider per latent dimension, most informative first.

:class:`SliderRow` is one dimension (label, slider from -3 to 3, value). :class:`LatentSliders`
shows :data:`ROWS` of them, a window of the model's ranking (``model.latent_rank``): "from rank"
pages through it, "jump to dim" brings any dimension's slider to the top. The page only shows
z; the explorer (:class:`~crystalstudio.gui.explorer.LatentExplorer`) acts on its signals and
on its "Reset to encoded" and "z = 0" buttons.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PySide6.QtCore import QSignalBlocker, Qt, Signal
from PySide6.QtWidgets import (QGridLayout, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QSlider, QSpinBox,
                               QVBoxLayout, QWidget)

from ..core.latent import SLIDER_RANGE

__all__ = ["LatentSliders", "SliderRow", "ROWS", "SLIDER_STEPS"]

ROWS = 12  # slider rows shown at once
SLIDER_STEPS = 100  # slider ticks per unit of z: -3..3 -> -300..300


class SliderRow:
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
        """Show dimension ``dim`` (``rank`` in the ranking, from 0) at value ``z``."""
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


class LatentSliders(QWidget):
    """The "Sliders" page: a window of :data:`ROWS` dimensions of the ranking, with paging.

    Args:
        parent: parent widget.
        z_of: returns the latent vector explored now (the values the rows show).

    Attributes:
        rows: the :class:`SliderRow` objects, top to bottom.
        first_spin, jump_spin: "From rank" (1-based) and "Jump to dim".
        reset_button, zero_button: "Reset to encoded" and "z = 0" (connected by the explorer).

    Signals:
        moved(SliderRow, int): a row's slider moved to this value (ticks, :data:`SLIDER_STEPS`
            per unit of z); rows without a dimension stay silent.
        released(): a row's slider was released.
    """

    moved = Signal(object, int)
    released = Signal()

    def __init__(self, parent: QWidget | None, z_of: Callable[[], np.ndarray]) -> None:
        super().__init__(parent)
        self._z_of = z_of
        self._order: list[int] = []  # latent_rank
        self._rank_of: dict[int, int] = {}
        self._first = 0  # rank shown in the first row

        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        nav = QHBoxLayout()
        nav.addWidget(QLabel("From rank", self))
        self.first_spin = QSpinBox(self)
        self.first_spin.setToolTip("Dimensions are ordered most informative first; page through the ranking")
        nav.addWidget(self.first_spin)
        nav.addSpacing(8)
        nav.addWidget(QLabel("Jump to dim", self))
        self.jump_spin = QSpinBox(self)
        self.jump_spin.setToolTip("Bring the slider of latent dimension N to the top")
        self.jump_spin.setKeyboardTracking(False)
        nav.addWidget(self.jump_spin)
        nav.addStretch(1)
        v.addLayout(nav)
        self.page_label = QLabel("", self)
        self.page_label.setStyleSheet("color: gray;")
        v.addWidget(self.page_label)

        grid = QGridLayout()
        grid.setVerticalSpacing(2)
        self.rows = [SliderRow(self, grid, i) for i in range(ROWS)]
        for row in self.rows:
            row.slider.valueChanged.connect(lambda value, r=row: self._on_slider(r, value))
            row.slider.sliderReleased.connect(self.released)
        v.addLayout(grid)

        buttons = QHBoxLayout()
        self.reset_button = QPushButton("Reset to encoded", self)
        self.reset_button.setToolTip("z = μ of the current reconstruction")
        self.zero_button = QPushButton("z = 0", self)
        self.zero_button.setToolTip("The origin of the latent space (the prior's mean)")
        buttons.addWidget(self.reset_button)
        buttons.addWidget(self.zero_button)
        buttons.addStretch(1)
        v.addLayout(buttons)
        v.addStretch(1)

        self.first_spin.valueChanged.connect(lambda r: self.show_page(r - 1))
        self.jump_spin.valueChanged.connect(self.show_dimension)

    def set_ranking(self, order: list[int]) -> None:
        """Adopt a model's ranking of its dimensions (most informative first) and show its top;
        an empty ``order`` (no model) only forgets the old one."""
        self._order = list(order)
        self._rank_of = {d: i for i, d in enumerate(self._order)}
        if not self._order:
            return
        n = len(self._order)
        with QSignalBlocker(self.first_spin):
            self.first_spin.setRange(1, n)
        with QSignalBlocker(self.jump_spin):
            self.jump_spin.setRange(0, n - 1)

    def show_page(self, first: int) -> None:
        """Show the ranks from ``first`` (0-based; clipped so that the page is full)."""
        n = len(self._order)
        if n == 0:
            return
        first = int(min(max(first, 0), max(n - ROWS, 0)))
        self._first = first
        with QSignalBlocker(self.first_spin):
            self.first_spin.setValue(first + 1)
        self.refresh()
        last = min(first + ROWS, n)
        self.page_label.setText(f"ranks {first + 1}–{last} of {n} (most informative first)")

    def refresh(self, highlight: int | None = None) -> None:
        """Show the explored z in the rows (dimension ``highlight`` in bold orange)."""
        z = self._z_of()
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

    def show_dimension(self, dim: int) -> SliderRow:
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
            self.show_page(min(rank, max(n - ROWS, 0)))
        self.refresh(highlight=dim)
        return self.row_for(dim)

    def row_for(self, dim: int) -> SliderRow | None:
        """The slider row showing ``dim`` now (None when it is not on the page)."""
        return next((r for r in self.rows if r.dim == dim and r.slider.isVisible()), None)

    def _on_slider(self, row: SliderRow, value: int) -> None:
        if row.dim >= 0:
            self.moved.emit(row, value)
