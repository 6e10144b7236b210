"""A table of the atoms read from the decoded field: Z, element, position and, for the
Eq. 1 fit, the fitted amplitude (the Z estimate) with its standard error, so a user sees
how sure each atom of the reconstruction is.

Model/view: one :class:`AtomsModel` holds the atoms as arrays and answers Qt's questions
about cells; a sort proxy sorts by the numbers, not the text. Nothing is allocated per
cell, so refreshing the table for every explorer frame costs one model reset (a
``QTableWidget`` makes and deletes a wrapped item per cell on every frame)."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableView, QVBoxLayout, QWidget

from ..core.segment import Atoms
from ..io.structures import element_symbol

__all__ = ["AtomsModel", "AtomsTable", "amplitude_text"]

COLUMNS = ("Z", "element", "x (Å)", "y (Å)", "z (Å)", "amplitude (Z units)")
_NUMERIC = (0, 2, 3, 4, 5)
_RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter


def amplitude_text(amplitude: float | None, sigma: float | None) -> str:
    """``"16.2 ± 0.4"``, or ``"—"`` for atoms of the U-Net path (no amplitude)."""
    if amplitude is None or not np.isfinite(amplitude):
        return "—"
    if sigma is None or not np.isfinite(sigma):
        return f"{amplitude:.1f}"
    return f"{amplitude:.1f} ± {sigma:.1f}"


class AtomsModel(QAbstractTableModel):
    """The atoms of one frame as a read-only Qt table model (rows: atoms, columns: ``COLUMNS``).

    ``Qt.DisplayRole`` gives the text shown; ``Qt.UserRole`` gives the number a column sorts
    by (Z, Å, amplitude; None where an atom has no amplitude)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._Z = np.zeros(0, np.int64)
        self._positions = np.zeros((0, 3))
        self._amplitude: np.ndarray | None = None
        self._sigma: np.ndarray | None = None

    def set_atoms(self, atoms: Atoms) -> None:
        """Replace the rows by ``atoms`` (one model reset)."""
        self.beginResetModel()
        self._Z = np.asarray(atoms.Z, np.int64).copy()
        self._positions = np.asarray(atoms.positions, np.float64).reshape(-1, 3).copy()
        self._amplitude = None if atoms.amplitude is None else np.asarray(atoms.amplitude, np.float64).copy()
        self._sigma = None if atoms.amplitude_sigma is None else np.asarray(atoms.amplitude_sigma, np.float64).copy()
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 (Qt API)
        return 0 if parent.isValid() else len(self._Z)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 (Qt API)
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def _amp(self, r: int) -> tuple[float | None, float | None]:
        a = None if self._amplitude is None else float(self._amplitude[r])
        s = None if self._sigma is None else float(self._sigma[r])
        return a, s

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self._Z):
            return None
        r, c = index.row(), index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if c == 0:
                return str(int(self._Z[r]))
            if c == 1:
                return element_symbol(int(self._Z[r]))
            if c in (2, 3, 4):
                return f"{self._positions[r, c - 2]:.3f}"
            return amplitude_text(*self._amp(r))
        if role == Qt.ItemDataRole.UserRole:
            if c == 0:
                return int(self._Z[r])
            if c == 1:
                return element_symbol(int(self._Z[r]))
            if c in (2, 3, 4):
                return float(self._positions[r, c - 2])
            a = self._amp(r)[0]
            return a if a is not None and np.isfinite(a) else None
        if role == Qt.ItemDataRole.TextAlignmentRole and c in _NUMERIC:
            return int(_RIGHT.value)
        return None


class AtomsTable(QWidget):
    """One row per atom of the shown reconstruction or explorer frame (read-only; sorted by Z,
    heaviest first, until the user clicks another column's header)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        self.caption = QLabel("No reconstruction yet.", self)
        self.caption.setWordWrap(True)
        self.model = AtomsModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.table = QTableView(self)
        self.table.setModel(self.proxy)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.DescendingOrder)  # heaviest atoms first
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        lay.addWidget(self.caption)
        lay.addWidget(self.table)

    def set_atoms(self, atoms: Atoms, method: str) -> None:
        """Show ``atoms`` read by ``method`` ("fit" or "unet")."""
        self.model.set_atoms(atoms)
        how = ("least-squares fit of Eq. 1 (amplitude = Z estimate ± standard error)" if method == "fit"
               else "U-Net argmax + connected components (paper, Sec. 4.2.2)")
        self.caption.setText(f"{len(atoms)} atoms, read by {how}")

    def row_count(self) -> int:
        """Rows shown (one per atom)."""
        return self.proxy.rowCount()

    def text(self, row: int, column: int) -> str:
        """The text shown in cell (``row``, ``column``) of the table as sorted on screen."""
        return self.proxy.index(row, column).data(Qt.ItemDataRole.DisplayRole)
