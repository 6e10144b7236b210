"""The crystalstudio main window: input crystal and its reconstruction, side by side.

Left view "Input": the density field M of the input crystal (volume rendering), its atoms
as spheres in Jmol colours and the cube outline. Right view "Reconstruction": the decoded
field M_hat and the atoms segmented from it. Both views share one ``vtkCamera``, so
rotating one rotates the other.

Files (CIF, POSCAR/.vasp, pymatgen .json) are opened by drag and drop or File > Open…;
reading and encode -> decode -> segment run in a worker thread, the result is made the
session's current reconstruction on the GUI thread and the views update in place.
Every error message goes through :meth:`MainWindow.show_error`.

The dock "Latent explorer" (:class:`~crystalstudio.gui.explorer.LatentExplorer`) moves z
(sliders, A-B interpolation, random draws, conditioning); its frames replace the right
view's content ("Decoded"). The dock "Slices" shows M, M_hat and their difference.

:class:`MainWindow` ties the parts together and keeps the settings; the parts live in
their own modules: the two linked views in :mod:`.views` (:class:`~.views.LinkedViews`),
the worker-thread jobs and their progress bar in :mod:`.jobs` (:class:`~.jobs.JobRunner`),
opening a structure file in :mod:`.structure_opener` (:class:`~.structure_opener.StructureOpener`),
the file dialogs, saving, exporting and recent files in :mod:`.file_actions`
(:class:`~.file_actions.FileActions`), the View menu's toggles in :mod:`.view_toggles`
(:class:`~.view_toggles.ViewToggles`), the Model menu's choices in :mod:`.model_actions`
(:class:`~.model_actions.ModelActions`), the menus in :mod:`.menus` and the About-model text in
:mod:`.about`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QDockWidget, QLabel, QMainWindow, QMessageBox, QScrollArea, QWidget

from ..core.density import Grid
from ..session import Frame, Reconstruction, Session, disordered_sites
from .about import about_model_html
from .explorer import LatentExplorer
from .export_dialog import ExportSpec
from .file_actions import STRUCTURE_FILTER, FileActions, n_atoms
from .jobs import JobRunner
from .menus import build_menus
from .model_actions import ModelActions
from .structure_opener import StructureOpener
from .view_toggles import ViewToggles
from .views import LinkedViews

__all__ = ["MainWindow", "status_text", "STRUCTURE_FILTER"]

APP_NAME = "crystalstudio"


def status_text(rec: Reconstruction) -> str:
    """One status-bar line from ``rec.metrics``, e.g.
    ``"NaCl: 8 atoms in, 8 out · 100% within 0.5 Å · species 50% · exact count ✓ · MSE 1.2e-03"``."""
    m = rec.metrics
    parts = [f"{rec.crystal.name}: {m['n_true']} atoms in, {m['n_pred']} out",
             f"{m['atoms_within_tol']:.0%} within {m.get('tol_A', 0.5):g} Å",
             f"species {m['species_accuracy']:.0%}",
             f"exact count {'✓' if m['exact_count'] else '✗'}"]
    if m.get("median_error_A") is not None:
        parts.append(f"median error {m['median_error_A']:.2f} Å")
    parts.append(f"MSE {m['voxel_mse']:.1e}")
    return " · ".join(parts)


class MainWindow(QMainWindow):
    """Input crystal and its reconstruction in two linked 3-D views, with menus and status bar.

    Args:
        session: the session to show; None when no model could be loaded (the window then
            asks for a checkpoint before it opens structures).
        settings: where geometry, recent files and view toggles are kept (default: the
            application's ``QSettings()``).

    Signals:
        reconstruction_shown(Reconstruction): the views show a new reconstruction.
        frame_shown(Frame, bool): the right view shows a latent explorer frame (segmented?).
        failed(str): a file or checkpoint could not be used (the message shown).
    """

    reconstruction_shown = Signal(object)
    frame_shown = Signal(object, bool)
    failed = Signal(str)
    _session_event = Signal(str, object)

    def __init__(self, session: Session | None, settings: QSettings | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session: Session | None = None
        self.settings = settings if settings is not None else QSettings()
        self._closed = False
        self._session_event.connect(self._on_session_event)

        self.setWindowTitle(APP_NAME)
        self.setAcceptDrops(True)
        self.resize(1400, 800)

        #: the two linked 3-D views (``splitter`` is the same object, under its older name)
        self.views = self.splitter = LinkedViews(self)
        self.setCentralWidget(self.views)
        self.input, self.output = self.views.input, self.views.output
        self.panels = self.views.panels

        #: worker-thread jobs; ``_busy`` is its status-bar progress bar, ``_progress`` its
        #: ``(done, total)`` signal of latent refinement (emitted from the worker thread)
        self.jobs = JobRunner(self, self.statusBar(), self._job_failed)
        self._busy = self.jobs.bar
        self._progress = self.jobs.progress
        #: notes about the open file (model switched, disorder, pymatgen warnings in the tooltip)
        self.notes_label = QLabel("", self)
        self.notes_label.setStyleSheet("color: #a60;")
        self.notes_label.setVisible(False)
        self.statusBar().addPermanentWidget(self.notes_label)
        #: answers the several-data-blocks question instead of a dialog when set: blocks -> index or False
        self.block_chooser: Callable[[list[str]], int | bool] | None = None
        #: the File menu's dialogs, saving, exporting and the recent files
        self.files = FileActions(self, self._error)
        #: opens structure files (worker-thread reconstruction, notes about the file)
        self.opener = StructureOpener(self, self._error)
        #: the View menu's toggles, opacity, colour range and camera
        self.view_toggles = ViewToggles(self)
        #: the Model menu: checkpoints, atoms method, refinement, lattice window
        self.model_choices = ModelActions(self, self._error)

        self._build_docks()
        build_menus(self)
        self._restore_settings()
        self._set_session(session)
        grid = self.grid
        for p in self.panels:
            p.scene.set_outline(grid)
        self.input.label.setText("Input · drop a CIF / POSCAR file here")
        self.reset_camera()
        if session is None:
            self.statusBar().showMessage("No model loaded: File > Open checkpoint…")
        else:
            self.statusBar().showMessage("Drop a structure file (CIF, POSCAR, .json) or use File > Open…")

    # ------------------------------------------------------------------ construction
    def _build_docks(self) -> None:
        self.explorer = LatentExplorer(self)
        self.explorer.frame_ready.connect(self.show_frame)
        self.explorer.failed.connect(self._error)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.explorer)
        self.explorer_dock = QDockWidget("Latent explorer", self)
        self.explorer_dock.setObjectName("latent_explorer_dock")
        self.explorer_dock.setWidget(scroll)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.explorer_dock.setMinimumWidth(self.explorer.minimumSizeHint().width()
                                           + scroll.verticalScrollBar().sizeHint().width() + 8)
        self.slices_dock = QDockWidget("Slices", self)
        self.slices_dock.setObjectName("slices_dock")
        self.slices_dock.setWidget(self.explorer.slice_view)
        from .atoms_table import AtomsTable

        self.atoms_table = AtomsTable(self)
        self.atoms_dock = QDockWidget("Atoms", self)
        self.atoms_dock.setObjectName("atoms_dock")
        self.atoms_dock.setWidget(self.atoms_table)
        self.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.explorer_dock)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.slices_dock)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.atoms_dock)
        self.tabifyDockWidget(self.slices_dock, self.atoms_dock)
        self.slices_dock.raise_()
        self.resizeDocks([self.explorer_dock], [360], Qt.Orientation.Horizontal)
        self.resizeDocks([self.slices_dock], [230], Qt.Orientation.Vertical)

    def _restore_settings(self) -> None:
        s = self.settings
        geom = s.value("window/geometry")
        if geom is not None:
            self.restoreGeometry(geom)
        split = s.value("window/splitter")
        if split is not None:
            self.splitter.restoreState(split)
        else:
            self.splitter.setSizes([700, 700])
        state = s.value("window/state")
        if state is not None:
            self.restoreState(state)
        self.view_toggles.restore()
        uvw = s.value("view/window_origin")
        if self.session is not None and uvw is not None:
            try:
                self.session.set_window_origin([float(x) for x in uvw])
            except (TypeError, ValueError):
                pass  # a damaged setting: keep the default window

    # ------------------------------------------------------------------ properties
    @property
    def grid(self) -> Grid:
        """The loaded model's voxel grid (the default grid when no model is loaded)."""
        return self.session.grid if self.session is not None else Grid()

    @property
    def busy(self) -> bool:
        """True while a file or checkpoint is being processed."""
        return self.jobs.busy

    def recent_files(self) -> list[str]:
        """The recently opened files, newest first."""
        return self.files.recent_files()

    # ------------------------------------------------------------------ dialogs (tests patch these)
    def show_error(self, title: str, text: str) -> None:
        """Tell the user something failed (a modal warning box)."""
        QMessageBox.warning(self, title, text)

    def show_info(self, title: str, text: str) -> None:
        """An information box (rich text allowed)."""
        QMessageBox.information(self, title, text)

    def _error(self, title: str, text: str) -> None:
        self.statusBar().showMessage(text)
        self.failed.emit(text)
        self.show_error(title, text)

    def _ask_open(self) -> None:
        self.files.ask_open()

    def _ask_checkpoint(self) -> None:
        self.files.ask_checkpoint()

    def _ask_save(self) -> None:
        self.files.ask_save()

    def _ask_screenshot(self) -> None:
        self.files.ask_screenshot()

    def _ask_export_density(self) -> None:
        self.files.ask_export_density()

    def _fill_recent_menu(self) -> None:
        self.files.fill_recent_menu()

    def _add_recent(self, path: Path) -> None:
        self.files.add_recent(path)

    def _ask_window_origin(self) -> None:
        self.model_choices.ask_window_origin()

    def set_window_origin(self, uvw) -> None:
        """Move the repeating-lattice window (see :meth:`ModelActions.set_window_origin`)."""
        self.model_choices.set_window_origin(uvw)

    # ------------------------------------------------------------------ jobs
    def _job_failed(self, title: str, text: str) -> None:
        """A background job raised: tell the user; back to the current status when idle."""
        self._error(title, text)
        if self.session is not None and self.session.current is not None and not self.jobs.busy:
            self.statusBar().showMessage(status_text(self.session.current), 0)

    def open_file(self, path: str | Path) -> None:
        """Read ``path`` and reconstruct it in the background (see :class:`StructureOpener`)."""
        self.opener.open_file(path)

    # ------------------------------------------------------------------ model choices (see ModelActions)
    def atoms_method(self) -> str:
        """The remembered way of reading atoms from a decoded field ("fit" or "unet")."""
        return self.model_choices.atoms_method()

    def set_atoms_method(self, method: str) -> None:
        """Read atoms by ``method`` from now on (see :meth:`ModelActions.set_atoms_method`)."""
        self.model_choices.set_atoms_method(method)

    def refine_enabled(self) -> bool:
        """The remembered choice of latent refinement after encoding (default on)."""
        return self.model_choices.refine_enabled()

    def set_refine_enabled(self, on: bool) -> None:
        """Latent refinement on or off (see :meth:`ModelActions.set_refine_enabled`)."""
        self.model_choices.set_refine_enabled(on)

    def open_checkpoint(self, path: str | Path) -> None:
        """Load another model in the background (see :meth:`ModelActions.open_checkpoint`)."""
        self.model_choices.open_checkpoint(path)

    # ------------------------------------------------------------------ session -> views
    def _set_session(self, session: Session | None) -> None:
        self.session = session
        if session is not None:
            self.model_choices.configure(session)
        if hasattr(self, "atoms_method_actions"):
            self.atoms_method_actions[self.atoms_method()].setChecked(True)
        if hasattr(self, "model_actions"):
            self.model_choices.mark_model()
        if session is not None:
            # The callback may be called from any thread; the signal brings it to the GUI thread.
            session.subscribe(lambda event, value: self._session_event.emit(event, value))
        self.explorer.set_session(session)

    def _on_session_event(self, event: str, value: object) -> None:
        if event == "reconstruction" and not self._closed:
            self._show(value)
        elif event == "prior":
            self.settings.setValue("sample/prior", str(value))  # remembered for the next start

    def _title(self) -> str:
        rec = self.session.current if self.session is not None else None
        return f"{APP_NAME} — {rec.crystal.name}" if rec is not None else APP_NAME

    def _show(self, rec: Reconstruction) -> None:
        grid = self.grid
        n_in, n_out = len(rec.Z), len(rec.atoms)
        self.input.set_crystal(rec.M, grid, rec.positions, rec.Z, f"{rec.crystal.name}, {n_atoms(n_in)}",
                               cell=self.view_toggles.input_cell() if self.cell_action.isChecked() else None)
        self.input.overlays.set_site_labels(*disordered_sites(rec, self.session.model.representation, grid))
        self.output.title = "Reconstruction"
        self.view_toggles.fit_output_range(rec.M_hat)
        self.output.set_crystal(rec.M_hat, grid, rec.atoms.positions, rec.atoms.Z, f"{n_atoms(n_out)} segmented")
        self.atoms_table.set_atoms(rec.atoms, self.session.model.atoms_method)
        self.explorer.on_reconstruction(rec)
        if getattr(self, "_framed", None) is not rec.crystal:  # a new crystal: frame it
            self.reset_camera(render=False)
            self._framed = rec.crystal
        self.setWindowTitle(self._title())
        self.statusBar().showMessage(status_text(rec), 0)
        self.render()
        self.reconstruction_shown.emit(rec)

    def render(self) -> None:
        """Re-render both views now (GUI thread)."""
        self.views.render()

    def show_frame(self, frame: Frame, caption: str = "", segmented: bool = True) -> None:
        """Draw a latent explorer frame in the right view ("Decoded"); with ``segmented`` False
        only the density changes and the atoms on screen stay."""
        if self._closed:
            return
        grid = self.grid
        out = self.output
        out.title = "Decoded"
        self.view_toggles.fit_output_range(frame.M_hat)
        if segmented:
            out.set_crystal(frame.M_hat, grid, frame.atoms.positions, frame.atoms.Z,
                            f"{caption} · {n_atoms(len(frame.atoms))}")
            self.atoms_table.set_atoms(frame.atoms, self.session.model.atoms_method)
        else:
            out.scene.set_density(frame.M_hat, grid)
            out.label.setText(f"Decoded · {caption}")
        out.view.renderer.reset_camera_clipping_range()
        out.view.render()
        self.frame_shown.emit(frame, segmented)

    # ------------------------------------------------------------------ view actions (see ViewToggles)
    def fit_colour_range(self, on: bool) -> None:
        """Fit the decoded view's colour range to its field (on) or use the fixed 0-30 Z (off)."""
        self.view_toggles.fit_colour_range(on)

    def show_density(self, visible: bool) -> None:
        """Density volume on or off in both views (remembered)."""
        self.view_toggles.show_density(visible)

    def show_atoms(self, visible: bool) -> None:
        """Atoms and element legend on or off in both views (remembered)."""
        self.view_toggles.show_atoms(visible)

    def show_bonds(self, visible: bool) -> None:
        """Bonds on or off in both views (remembered)."""
        self.view_toggles.show_bonds(visible)

    def show_cell(self, visible: bool) -> None:
        """The input's unit cell on or off (remembered)."""
        self.view_toggles.show_cell(visible)

    def set_opacity(self, value: float) -> None:
        """Opacity of the densest voxels in both views, 0.05..1 (remembered)."""
        self.view_toggles.set_opacity(value)

    def reset_camera(self, render: bool = True, whole_cube: bool = False) -> None:
        """Isometric view framed on the input's atoms (``whole_cube``: the whole cube)."""
        self.view_toggles.reset_camera(render, whole_cube)

    # ------------------------------------------------------------------ saving and exporting (see FileActions)
    def save_reconstruction(self, path: str | Path) -> Path | None:
        """Write the reconstructed atoms to ``path`` (.xyz: XYZ, anything else: CIF).

        Returns the path written, or None after telling the user why not.
        """
        return self.files.save_reconstruction(path)

    def grab_views(self):
        """A ``QPixmap`` of the two views (rendered first)."""
        return self.views.grab_views()

    def save_screenshot(self, path: str | Path) -> Path | None:
        """Save a PNG of the two views; None (after an error message) when it cannot be written."""
        return self.files.save_screenshot(path)

    def shown_field(self) -> np.ndarray | None:
        """The decoded field (n, n, n) float32 on screen: the explorer's frame, else the reconstruction."""
        frame = self.explorer.frame
        if frame is not None:
            return frame.M_hat
        return self.session.current.M_hat if self.session is not None and self.session.current else None

    def export_density(self, path: str | Path) -> Path | None:
        """Write the decoded field on screen (n, n, n) to ``path``: ``.npy`` (float32, Eq. 1
        units) or ``.vti`` (VTK image: spacing h Å, origin h/2). None after an error message."""
        return self.files.export_density(path)

    def export_video(self, spec: ExportSpec | None = None) -> Path | None:
        """Export a latent path to MP4 / GIF with a progress dialog and Cancel.

        ``spec`` None asks with :class:`~.export_dialog.ExportDialog`. Returns the file written,
        or None (cancelled, or after a one-line error message; no partial file is left).
        """
        return self.files.export_video(spec)

    # ------------------------------------------------------------------ about
    def about_model_text(self) -> str:
        """HTML description of the loaded model: checkpoint, grid, training data, held-out metrics."""
        return about_model_html(self.session.model if self.session is not None else None)

    def _show_about_model(self) -> None:
        self.show_info("About model", self.about_model_text())

    # ------------------------------------------------------------------ drag and drop
    @staticmethod
    def _local_files(event) -> list[Path]:
        md = event.mimeData()
        if md is None or not md.hasUrls():
            return []
        return [Path(u.toLocalFile()) for u in md.urls() if u.isLocalFile() and Path(u.toLocalFile()).is_file()]

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if self._local_files(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:  # noqa: N802
        if self._local_files(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        """Open the first dropped local file."""
        files = self._local_files(event)
        if not files:
            event.ignore()
            return
        event.acceptProposedAction()
        self.open_file(files[0])  # one structure at a time: the first dropped file

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        """Remember geometry and docks, stop the explorer and the jobs, close the views."""
        if not self._closed:
            self._closed = True
            self.jobs.stop()  # from now on running work is asked to stop and results are dropped
            self.settings.setValue("window/geometry", self.saveGeometry())
            self.settings.setValue("window/splitter", self.splitter.saveState())
            self.settings.setValue("window/state", self.saveState())
            self.settings.sync()
            self.explorer.shutdown()
            self.jobs.shutdown(30_000)
            self.views.close_views()
        super().closeEvent(event)

