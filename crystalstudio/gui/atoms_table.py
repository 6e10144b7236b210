"""A table of the atoms read from the decoded field: Z, element, position and, for the
Eq. 1 fit, the fitted amplitude (the Z estimate) with its standard error, so a user sees
how sure each atom of the reconstruction is."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHeaderView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..core.segment import Atoms
from ..io.structures import element_symbol

__all__ = ["AtomsTable", "amplitude_text"]

COLUMNS = ("Z", "element", "x (Å)", "y (Å)", "z (Å)", "amplitude (Z units)")


def amplitude_text(amplitude: float | None, sigma: float | None) -> str:
    """``"16.2 ± 0.4"``, or ``"—"`` for atoms of the U-Net path (no amplitude)."""
    if amplitude is None or not np.isfinite(amplitude):
        return "—"
    if sigma is None or not np.isfinite(sigma):
        return f"{amplitude:.1f}"
    return f"{amplitude:.1f} ± {sigma:.1f}"


class AtomsTable(QWidget):
    """One row per atom of the shown reconstruction or explorer frame (read-only)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        self.caption = QLabel("No reconstruction yet.", self)
        self.caption.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS), self)
        # our own header object: asking the table for its built-in one can hand back a stale
        # Python wrapper of a deleted Qt object at the same address (seen once under the
        # test suite: a QOffscreenSurface), so the header is created and held here
        self.header = QHeaderView(Qt.Orientation.Horizontal, self.table)
        self.header.setSectionsClickable(True)
        self.table.setHorizontalHeader(self.header)
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.header.setStretchLastSection(True)
        lay.addWidget(self.caption)
        lay.addWidget(self.table)

    def set_atoms(self, atoms: Atoms, method: str) -> None:
        """Show ``atoms`` read by ``method`` ("fit" or "unet")."""
        t = self.table
        t.setSortingEnabled(False)
        t.setRowCount(len(atoms))
        amp = atoms.amplitude if atoms.amplitude is not None else [None] * len(atoms)
        sig = atoms.amplitude_sigma if atoms.amplitude_sigma is not None else [None] * len(atoms)
        for r, (z, p, a, s) in enumerate(zip(atoms.Z, atoms.positions, amp, sig)):
            cells = [str(int(z)), element_symbol(int(z)), *(f"{x:.3f}" for x in p), amplitude_text(a, s)]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c in (0, 2, 3, 4) or (c == 5 and a is not None):
                    item.setData(Qt.ItemDataRole.UserRole, float(text.split()[0]))
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                t.setItem(r, c, item)
        t.setSortingEnabled(True)
        how = ("least-squares fit of Eq. 1 (amplitude = Z estimate ± standard error)" if method == "fit"
               else "U-Net argmax + connected components (paper, Sec. 4.2.2)")
        self.caption.setText(f"{len(atoms)} atoms, read by {how}")
