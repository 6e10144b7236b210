"""The readouts below the latent explorer's pages: its status line and the frame's figures.

:func:`readouts_html` writes a frame's :func:`~crystalstudio.session.readouts` (atoms and
composition, closest pair, largest density) and, for an encoded crystal, the match figures
against its input; :class:`FrameReadouts` shows them with the explorer's status line.
"""

from __future__ import annotations

import html

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..io.structures import element_symbol
from ..session import Reconstruction

__all__ = ["FrameReadouts", "composition_text", "readouts_html", "CLOSE_A"]

CLOSE_A = 0.5  # Å: closer pairs are flagged


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


class FrameReadouts(QWidget):
    """The explorer's status line (:attr:`status_label`: "decoding…", hints) and the readouts
    of the frame on screen (:attr:`readout_label`, rich text).

    Args:
        parent: parent widget.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.status_label = QLabel("", self)
        self.status_label.setStyleSheet("color: gray;")
        layout.addWidget(self.status_label)
        self.readout_label = QLabel("", self)
        self.readout_label.setTextFormat(Qt.TextFormat.RichText)
        self.readout_label.setWordWrap(True)
        self.readout_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.readout_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(self.readout_label)

    def show_busy(self, busy: bool) -> None:
        """"decoding…" while the worker is busy (a hint shown meanwhile is kept)."""
        if busy:
            self.status_label.setText("decoding…")
        elif self.status_label.text() == "decoding…":
            self.status_label.setText("")

    def show_readouts(self, r: dict, segmented: bool = True, metrics: dict | None = None, against: str = "") -> None:
        """Show a frame's readouts ``r`` (see :func:`readouts_html`)."""
        self.readout_label.setText(readouts_html(r, segmented, metrics, against))

    def show_reconstruction(self, rec: Reconstruction, peak_scale: float) -> dict:
        """Show the readouts of a reconstruction with its match figures; returns the readouts."""
        from ..session import readouts

        r = readouts(rec.atoms, rec.M_hat, peak_scale, CLOSE_A)
        self.show_readouts(r, True, rec.metrics, rec.crystal.name)
        return r
