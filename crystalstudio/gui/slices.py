"""2-D slices of the target field M, the decoded field M_hat and their difference (Fig. 5B, 10D).

:class:`SliceView` shows three colour-mapped images side by side: the target (the encoded
crystal's input M, or any reference field), the decoded M_hat and ``M_hat - M``. Values are
shown in units of Z (times ``grid.peak_scale``), densities with one shared ``magma`` range,
the difference with a symmetric ``RdBu_r`` range. The slice is chosen by axis (x, y, z)
and index. Images are numpy arrays turned into ``QImage`` (no plotting library at run
time; matplotlib only supplies the colour tables).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QComboBox, QGridLayout, QHBoxLayout, QLabel, QSizePolicy, QSlider, QSpinBox,
                               QVBoxLayout, QWidget)

__all__ = ["SliceView", "colour_map", "slice_of", "AXES"]

AXES = ("x", "y", "z")
_LUTS: dict[str, np.ndarray] = {}


def _lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colour table of a matplotlib colour map (cached)."""
    if name not in _LUTS:
        from matplotlib import colormaps

        _LUTS[name] = np.round(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)
    return _LUTS[name]


def colour_map(a: np.ndarray, lo: float, hi: float, cmap: str = "magma") -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 RGB, ``lo``..``hi`` spread over the colour map."""
    span = hi - lo if hi > lo else 1.0
    idx = np.clip((np.nan_to_num(np.asarray(a, np.float64)) - lo) / span * 255.0, 0, 255).astype(np.uint8)
    return _lut(cmap)[idx]


def slice_of(M: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` across ``axis`` of (n, n, n) ``M``, oriented for display.

    The remaining axes (u, v) in (x, y, z) order become image columns (u, left to right)
    and rows (v, bottom to top), as in a plot with v pointing up.
    """
    s = np.take(np.asarray(M), int(index), axis=int(axis))  # (u, v)
    return s.T[::-1]


def _to_pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    img = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # own the pixels
    return QPixmap.fromImage(img)


class _Image(QLabel):
    """A label that shows an RGB array scaled (nearest neighbour) to its size."""

    def __init__(self, parent: QWidget) -> None:
        super().__init__(parent)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setMinimumSize(60, 60)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setStyleSheet("background: #1b1b1f; color: #888;")
        self._pixmap: QPixmap | None = None

    def set_rgb(self, rgb: np.ndarray | None, empty_text: str = "") -> None:
        self._pixmap = None if rgb is None else _to_pixmap(rgb)
        if self._pixmap is None:
            self.clear()
            self.setText(empty_text)
        self._rescale()

    def _rescale(self) -> None:
        if self._pixmap is not None:
            self.setPixmap(self._pixmap.scaled(self.size(), Qt.AspectRatioMode.KeepAspectRatio,
                                               Qt.TransformationMode.FastTransformation))

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._rescale()


class SliceView(QWidget):
    """Target M, decoded M_hat and their difference in one slice; axis and index selectable.

    Signals:
        changed(): the images were redrawn (new fields, axis or index).
    """

    changed = Signal()
    TITLES = ("Target M", "Decoded M̂", "Difference M̂ − M")

    def __init__(self, parent: QWidget | None = None, peak_scale: float = 1.0) -> None:
        super().__init__(parent)
        self.peak_scale = float(peak_scale)
        self._target: np.ndarray | None = None
        self._decoded: np.ndarray | None = None
        self._target_name = "target"
        self._rgb: dict[str, np.ndarray | None] = {"target": None, "decoded": None, "difference": None}

        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Slice across", self))
        self.axis_combo = QComboBox(self)
        self.axis_combo.addItems(list(AXES))
        self.axis_combo.setCurrentIndex(2)
        self.axis_combo.setToolTip("Axis the slice is perpendicular to")
        controls.addWidget(self.axis_combo)
        controls.addWidget(QLabel("index", self))
        self.index_slider = QSlider(Qt.Orientation.Horizontal, self)
        self.index_spin = QSpinBox(self)
        for w in (self.index_slider, self.index_spin):
            w.setRange(0, 0)
        controls.addWidget(self.index_slider, 1)
        controls.addWidget(self.index_spin)
        layout.addLayout(controls)

        grid = QGridLayout()
        grid.setSpacing(4)
        self.images: dict[str, _Image] = {}
        self.range_labels: dict[str, QLabel] = {}
        self.title_labels: dict[str, QLabel] = {}
        for col, (key, title) in enumerate(zip(("target", "decoded", "difference"), self.TITLES)):
            t = QLabel(title, self)
            t.setAlignment(Qt.AlignmentFlag.AlignCenter)
            img = _Image(self)
            r = QLabel("", self)
            r.setAlignment(Qt.AlignmentFlag.AlignCenter)
            r.setStyleSheet("color: gray; font-size: 9pt;")
            grid.addWidget(t, 0, col)
            grid.addWidget(img, 1, col)
            grid.addWidget(r, 2, col)
            grid.setColumnStretch(col, 1)
            self.images[key], self.range_labels[key], self.title_labels[key] = img, r, t
        grid.setRowStretch(1, 1)
        layout.addLayout(grid, 1)

        self.axis_combo.currentIndexChanged.connect(self._redraw)
        self.index_slider.valueChanged.connect(self.index_spin.setValue)
        self.index_spin.valueChanged.connect(self.index_slider.setValue)
        self.index_spin.valueChanged.connect(self._redraw)
        self._redraw()

    # ------------------------------------------------------------------ API
    @property
    def axis(self) -> int:
        """The axis (0, 1, 2 for x, y, z) the slices cut across."""
        return self.axis_combo.currentIndex()

    @property
    def index(self) -> int:
        """The voxel index of the slice along :attr:`axis`."""
        return self.index_spin.value()

    def set_axis(self, axis: int | str) -> None:
        """Cut across ``axis`` (0, 1, 2 or "x", "y", "z") from now on."""
        self.axis_combo.setCurrentIndex(AXES.index(axis) if isinstance(axis, str) else int(axis))

    def set_index(self, index: int) -> None:
        """Show the slice at voxel ``index`` (clipped to the grid)."""
        self.index_spin.setValue(int(index))

    def image(self, which: str) -> np.ndarray | None:
        """The RGB array last drawn for ``which`` ("target", "decoded", "difference"), unscaled."""
        return self._rgb[which]

    def set_fields(self, target: np.ndarray | None, decoded: np.ndarray | None,
                   target_name: str | None = None) -> None:
        """Show new fields (either may be None); keeps axis and index (centre slice at first)."""
        first = self._target is None and self._decoded is None
        self._target = None if target is None else np.asarray(target, np.float32)
        self._decoded = None if decoded is None else np.asarray(decoded, np.float32)
        if target_name is not None:
            self._target_name = target_name
        self.title_labels["target"].setText(f"Target M ({self._target_name})" if self._target is not None
                                            else "Target M")
        ref = self._decoded if self._decoded is not None else self._target
        n = 0 if ref is None else ref.shape[0]
        if n and self.index_spin.maximum() != n - 1:
            blocked = self.index_spin.blockSignals(True)
            for w in (self.index_slider, self.index_spin):
                w.setRange(0, n - 1)
            self.index_spin.blockSignals(blocked)
        if n and first:
            blocked = self.index_spin.blockSignals(True)
            self.index_spin.setValue(n // 2)
            self.index_slider.setValue(n // 2)
            self.index_spin.blockSignals(blocked)
        self._redraw()

    # ------------------------------------------------------------------ drawing
    def _redraw(self) -> None:
        ax, k, s = self.axis, self.index, self.peak_scale
        t = None if self._target is None else slice_of(self._target, ax, k) * s
        d = None if self._decoded is None else slice_of(self._decoded, ax, k) * s
        hi = max([float(a.max()) for a in (t, d) if a is not None] + [1e-6])
        for key, a in (("target", t), ("decoded", d)):
            self._rgb[key] = None if a is None else colour_map(a, 0.0, hi, "magma")
            self.range_labels[key].setText("" if a is None else f"0 – {hi:.2f} Z")
        if t is not None and d is not None and t.shape == d.shape:
            diff = d - t
            m = max(float(np.abs(diff).max()), 1e-6)
            self._rgb["difference"] = colour_map(diff, -m, m, "RdBu_r")
            self.range_labels["difference"].setText(f"± {m:.2f} Z")
        else:
            self._rgb["difference"] = None
            self.range_labels["difference"].setText("")
        empty = {"target": "no target\n(random z)", "decoded": "nothing decoded", "difference": ""}
        for key, img in self.images.items():
            img.set_rgb(self._rgb[key], empty[key])
        self.changed.emit()
