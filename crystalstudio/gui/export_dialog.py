"""Video export from the window: what to export (A -> B, a one-dimension sweep, the keyframe
path), how (MP4 / GIF, size, fps, frames, orbit, density and/or atoms), and a progress dialog
with Cancel around :func:`crystalstudio.render.export.export_path`, the same code the
headless ``crystalstudio interpolate`` command runs.

The export runs on the GUI thread inside a modal :class:`QProgressDialog` that processes
events between frames (the pattern Qt documents for it), because the off-screen VTK render
window must stay on the thread that made it; decoding and segmentation of the next batch
run in the exporter's worker thread meanwhile. The file is written under a temporary name
and renamed at the end: Cancel or an error leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (QApplication, QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox,
                               QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QMessageBox, QProgressDialog,
                               QPushButton, QSpinBox, QWidget)

from ..core.latent import SLIDER_RANGE, interpolate, keyframe_path, sweep
from ..render.export import ExportCancelled, export_path
from ..session import Session

__all__ = ["KINDS", "ExportSpec", "ExportDialog", "latent_path", "run_export"]

KINDS = {"interpolation": "Interpolation A → B", "sweep": "Sweep of one latent dimension (−3 → 3)",
         "keyframes": "Path through the keyframes"}
VIDEO_FILTER = "MP4 video (*.mp4);;Animated GIF (*.gif)"


@dataclass
class ExportSpec:
    """Everything one video export needs (the dialog's answer).

    Attributes:
        kind: ``"interpolation"``, ``"sweep"`` or ``"keyframes"``.
        path: output file; ``.mp4`` (H.264) or ``.gif``.
        frames: frames in the video (>= 2).
        fps: frames per second.
        size: (width, height) in pixels.
        orbit_degrees: camera azimuth turned over the video.
        show_density, show_atoms: what is drawn.
        mode: ``"linear"`` or ``"spherical"`` interpolation.
        dim: the latent dimension of a sweep.
    """

    kind: str = "interpolation"
    path: str = ""
    frames: int = 60
    fps: int = 30
    size: tuple[int, int] = (1280, 720)
    orbit_degrees: float = 0.0
    show_density: bool = True
    show_atoms: bool = True
    mode: str = "linear"
    dim: int = 0


def latent_path(session: Session, spec: ExportSpec) -> tuple[np.ndarray, list[str]]:
    """The latent vectors (frames, latent) float32 and one caption per frame for ``spec``.

    Raises:
        ValueError: one line saying what is missing (endpoints, keyframes, a z to sweep
            around) or what is wrong (unknown kind, dimension out of range).
    """
    n = int(spec.frames)
    if n < 2:
        raise ValueError(f"a video needs at least 2 frames, got {n}")
    if spec.kind == "interpolation":
        a, b = session.path.endpoints["A"], session.path.endpoints["B"]
        if a is None or b is None:
            raise ValueError("set both interpolation endpoints A and B first (Latent explorer > Interpolate)")
        zs = interpolate(a.z, b.z, n, spec.mode)
        titles = [f"{a.name} → {b.name}   t = {t:.2f}" for t in np.linspace(0.0, 1.0, n)]
    elif spec.kind == "sweep":
        latent = session.model.latent
        if not 0 <= int(spec.dim) < latent:
            raise ValueError(f"latent dimension {spec.dim} is outside 0..{latent - 1}")
        z = session.z if session.z is not None else np.zeros(latent, np.float32)
        zs = sweep(z, int(spec.dim), n)
        titles = [f"z[{spec.dim}] = {v:+.2f}" for v in np.linspace(*SLIDER_RANGE, n)]
    elif spec.kind == "keyframes":
        if len(session.path.keyframes) < 2:
            raise ValueError(f"a keyframe path needs at least 2 keyframes, there are {len(session.path.keyframes)} "
                             "(Latent explorer > Interpolate > Add keyframe)")
        zs = keyframe_path(session.path.keyframes, n, spec.mode)
        titles = [f"keyframe path   {i + 1}/{n}" for i in range(n)]
    else:
        raise ValueError(f"unknown export kind {spec.kind!r} ({', '.join(KINDS)})")
    return np.asarray(zs, np.float32), titles


class ExportDialog(QDialog):
    """Asks for an :class:`ExportSpec`; remembers the answers in ``settings`` (group ``export/``).

    Args:
        session: the session whose endpoints, z and keyframes are exported.
        settings: where the last answers are kept.
        parent: parent widget.
        dim: the latent dimension offered for a sweep (e.g. the explorer's top-ranked one).
    """

    def __init__(self, session: Session, settings: QSettings, parent: QWidget | None = None, dim: int = 0) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export video")
        self.session, self.settings = session, settings
        s = settings
        form = QFormLayout(self)
        self.kind_combo = QComboBox(self)
        for key, text in KINDS.items():
            self.kind_combo.addItem(text, key)
        self.kind_combo.setCurrentIndex(max(0, self.kind_combo.findData(s.value("export/kind", "interpolation"))))
        form.addRow("Export", self.kind_combo)
        self.dim_spin = QSpinBox(self)
        self.dim_spin.setRange(0, session.model.latent - 1)
        self.dim_spin.setValue(int(dim))
        form.addRow("Latent dimension", self.dim_spin)
        self.mode_combo = QComboBox(self)
        self.mode_combo.addItem("linear", "linear")
        self.mode_combo.addItem("spherical", "spherical")
        self.mode_combo.setCurrentIndex(max(0, self.mode_combo.findData(s.value("export/mode", "linear"))))
        form.addRow("Interpolation", self.mode_combo)

        self.frames_spin = self._spin(2, 5000, int(s.value("export/frames", 60)))
        form.addRow("Frames", self.frames_spin)
        self.fps_spin = self._spin(1, 120, int(s.value("export/fps", 30)))
        form.addRow("Frames per second", self.fps_spin)
        size = QHBoxLayout()
        self.width_spin = self._spin(64, 7680, int(s.value("export/width", 1280)), step=2)
        self.height_spin = self._spin(64, 4320, int(s.value("export/height", 720)), step=2)
        size.addWidget(self.width_spin)
        size.addWidget(self.height_spin)
        form.addRow("Size (width × height)", size)
        self.orbit_spin = QDoubleSpinBox(self)
        self.orbit_spin.setRange(0.0, 1080.0)
        self.orbit_spin.setSuffix("°")
        self.orbit_spin.setValue(float(s.value("export/orbit", 0.0)))
        self.orbit_spin.setToolTip("Camera turned about the vertical over the whole video (0: still camera)")
        form.addRow("Camera orbit", self.orbit_spin)
        self.density_check = QCheckBox("density", self)
        self.atoms_check = QCheckBox("atoms", self)
        self.density_check.setChecked(_bool(s.value("export/density", True)))
        self.atoms_check.setChecked(_bool(s.value("export/atoms", True)))
        show = QHBoxLayout()
        show.addWidget(self.density_check)
        show.addWidget(self.atoms_check)
        form.addRow("Show", show)
        out = QHBoxLayout()
        self.path_edit = QLineEdit(self)
        last_dir = Path(str(s.value("files/last_dir", str(Path.home()))))
        self.path_edit.setText(str(last_dir / f"crystalstudio{str(s.value('export/suffix', '.mp4'))}"))
        browse = QPushButton("Browse…", self)
        browse.clicked.connect(self._browse)
        out.addWidget(self.path_edit, 1)
        out.addWidget(browse)
        form.addRow("File (.mp4 or .gif)", out)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel,
                                        self)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)
        self.kind_combo.currentIndexChanged.connect(self._update)
        self._confirmed = ""
        self._update()

    def _spin(self, lo: int, hi: int, value: int, step: int = 1) -> QSpinBox:
        w = QSpinBox(self)
        w.setRange(lo, hi)
        w.setSingleStep(step)
        w.setValue(min(max(value, lo), hi))
        return w

    def _update(self) -> None:
        kind = self.kind_combo.currentData()
        self.dim_spin.setEnabled(kind == "sweep")
        self.mode_combo.setEnabled(kind != "sweep")

    def _browse(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(self, "Export video", self.path_edit.text(), VIDEO_FILTER)
        if path:
            if not Path(path).suffix:
                path += ".gif" if chosen.startswith("Animated") else ".mp4"
            self.path_edit.setText(path)
            self._confirmed = path  # the file dialog already asked before replacing it

    def accept(self) -> None:
        """Close with Export, after asking before replacing an existing file typed (not browsed) in."""
        path = Path(self.path_edit.text().strip())
        if not path.name:
            QMessageBox.warning(self, "Export video", "Choose a file name (.mp4 or .gif).")
            return
        if path.exists() and str(path) != self._confirmed and QMessageBox.question(
                self, "Export video", f"{path.name} exists. Replace it?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No) != QMessageBox.StandardButton.Yes:
            return
        super().accept()

    def spec(self) -> ExportSpec:
        """The answers as an :class:`ExportSpec`."""
        return ExportSpec(kind=self.kind_combo.currentData(), path=self.path_edit.text().strip(),
                          frames=self.frames_spin.value(), fps=self.fps_spin.value(),
                          size=(self.width_spin.value(), self.height_spin.value()),
                          orbit_degrees=self.orbit_spin.value(), show_density=self.density_check.isChecked(),
                          show_atoms=self.atoms_check.isChecked(), mode=self.mode_combo.currentData(),
                          dim=self.dim_spin.value())

    def remember(self) -> None:
        """Keep the answers for next time."""
        sp, s = self.spec(), self.settings
        for key, value in (("kind", sp.kind), ("mode", sp.mode), ("frames", sp.frames), ("fps", sp.fps),
                           ("width", sp.size[0]), ("height", sp.size[1]), ("orbit", sp.orbit_degrees),
                           ("density", sp.show_density), ("atoms", sp.show_atoms),
                           ("suffix", Path(sp.path).suffix.lower() or ".mp4")):
            s.setValue(f"export/{key}", value)


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def run_export(parent: QWidget, session: Session, spec: ExportSpec, cond: float | None = None,
               dialog: QProgressDialog | None = None) -> Path:
    """Export ``spec`` with a modal progress dialog; Cancel stops it and leaves no file.

    Args:
        parent: the window the progress dialog belongs to.
        session: supplies the model and the latent path (:func:`latent_path`).
        spec: what and how to export.
        cond: target largest density set by the user for a conditional decoder; None: for
            A -> B the endpoints' own maxima interpolated (:meth:`Session.endpoint_conds`),
            else :meth:`Session.natural_cond` (None for an unconditional model).
        dialog: a progress dialog to use (tests), else one is made.

    Returns:
        The path written.

    Raises:
        ExportCancelled: the user pressed Cancel (nothing is left behind).
        ValueError, OSError: one-line reasons (bad path, size, missing endpoints, ...).
    """
    if not spec.show_density and not spec.show_atoms:
        raise ValueError("nothing to draw: tick density, atoms or both")
    zs, titles = latent_path(session, spec)
    if cond is None:  # a conditional model decodes at the crystals' own largest densities
        cond = session.endpoint_conds(len(zs)) if spec.kind == "interpolation" else None
        cond = session.natural_cond() if cond is None else cond
    name = Path(spec.path).name
    progress = dialog or QProgressDialog(f"Exporting {len(zs)} frames to {name}…", "Cancel", 0, len(zs), parent)
    progress.setWindowTitle("Export video")
    progress.setWindowModality(Qt.WindowModality.WindowModal)
    progress.setMinimumDuration(0)
    progress.setAutoClose(False)
    progress.setAutoReset(False)
    progress.setMaximum(len(zs))
    progress.setValue(0)
    progress.show()

    def report(i: int, total: int) -> bool:
        progress.setMaximum(total)
        progress.setValue(i)
        progress.setLabelText(f"Exporting {name}: frame {i} of {total}" if i else f"Decoding {total} frames…")
        QApplication.processEvents()
        return not progress.wasCanceled()

    try:
        return export_path(session, zs, spec.path, fps=spec.fps, size=spec.size, orbit_degrees=spec.orbit_degrees,
                           show_density=spec.show_density, show_atoms=spec.show_atoms, cond=cond,
                           progress=report, titles=titles)
    finally:
        progress.close()


__all__ += ["ExportCancelled"]
