"""View > Lattice window origin: which 10 Å window of a repeating lattice is shown."""

from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QLabel, QWidget

__all__ = ["WindowOriginDialog"]


class WindowOriginDialog(QDialog):
    """Three fractional coordinates (u, v, w) in [0, 1): the point of the cell that sits at
    the cube's corner (repeating-lattice model, Sec. 3.1 representation 2)."""

    def __init__(self, uvw: np.ndarray, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Lattice window origin")
        form = QFormLayout(self)
        form.addRow(QLabel("Fractional coordinates of the cell at the cube's corner\n"
                           "(repeating-lattice model; 0 0 0 = the cell origin)."))
        self.boxes = []
        for name, value in zip("uvw", np.asarray(uvw, np.float64).reshape(3)):
            box = QDoubleSpinBox(self)
            box.setRange(0.0, 0.999)
            box.setDecimals(3)
            box.setSingleStep(0.05)
            box.setValue(float(value))
            form.addRow(f"{name}:", box)
            self.boxes.append(box)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
                                   | QDialogButtonBox.StandardButton.Reset, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.Reset).clicked.connect(
            lambda: [b.setValue(0.0) for b in self.boxes])
        form.addRow(buttons)

    def value(self) -> np.ndarray:
        """(3,) float64 fractional coordinates."""
        return np.array([b.value() for b in self.boxes], np.float64)
