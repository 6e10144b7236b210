"""The Atoms table: one row per atom, the fit's amplitude beside Z, and sorting by number."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt

from crystalstudio.core.segment import Atoms
from crystalstudio.gui.atoms_table import AtomsTable

pytestmark = pytest.mark.gui


def _atoms(amplitude=True) -> Atoms:
    pos = np.array([[1.0, 2.0, 3.0], [10.5, 0.25, 0.0], [2.0, 9.0, 1.5]])
    Z = np.array([8, 38, 22])
    if not amplitude:
        return Atoms(pos, Z, np.array([5, 9, 7]))
    return Atoms(pos, Z, None, np.array([9.5, 38.25, 100.0]), np.array([0.1, 0.44, 2.0]))


def test_rows_show_each_atom_and_sort_by_number_not_text(qtbot):
    table = AtomsTable()
    qtbot.addWidget(table)
    table.set_atoms(_atoms(), "fit")
    assert table.row_count() == 3 and "3 atoms" in table.caption.text()
    assert [table.text(r, 1) for r in range(3)] == ["Sr", "Ti", "O"]  # heaviest first
    assert table.text(0, 2) == "10.500" and table.text(2, 5) == "9.5 ± 0.1"
    # as text "100.0" < "38.2" < "9.5"; by number the order is 9.5, 38.2, 100.0
    table.table.sortByColumn(5, Qt.SortOrder.AscendingOrder)
    assert [table.text(r, 5) for r in range(3)] == ["9.5 ± 0.1", "38.2 ± 0.4", "100.0 ± 2.0"]
    table.table.sortByColumn(2, Qt.SortOrder.AscendingOrder)
    assert [table.text(r, 1) for r in range(3)] == ["O", "Ti", "Sr"]  # x: 1.0, 2.0, 10.5


def test_a_new_frame_replaces_the_rows_and_unet_atoms_have_no_amplitude(qtbot):
    table = AtomsTable()
    qtbot.addWidget(table)
    table.set_atoms(_atoms(), "fit")
    table.set_atoms(Atoms.empty(), "fit")
    assert table.row_count() == 0 and "0 atoms" in table.caption.text()
    table.set_atoms(_atoms(amplitude=False), "unet")
    assert table.row_count() == 3 and "U-Net" in table.caption.text()
    assert [table.text(r, 5) for r in range(3)] == ["—"] * 3
