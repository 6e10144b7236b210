"""The main window's file actions: open / save dialogs, saving, exporting and the recent-files list.

:class:`FileActions` asks for file names (the File menu's dialogs), writes the reconstruction
(CIF / XYZ), a screenshot (PNG), the decoded density (.npy / .vti) and latent-path videos
(MP4 / GIF), and keeps the recent files and the last folder in the window's settings. The
:class:`~crystalstudio.gui.main_window.MainWindow` keeps methods of the same names that
delegate here; the dialogs go back through those (``window.open_file``,
``window.save_reconstruction``, ...), so a test or script that replaces one is obeyed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtWidgets import QFileDialog, QMainWindow

from ..io.structures import write_cif, write_xyz
from ..render.export import ExportCancelled, save_density_npy, save_density_vti
from .export_dialog import ExportDialog, ExportSpec, run_export
from .jobs import one_line as _one_line

__all__ = ["FileActions", "n_atoms", "MAX_RECENT", "STRUCTURE_FILTER"]

MAX_RECENT = 8
STRUCTURE_FILTER = ("Structures (*.cif *.mcif *.vasp POSCAR* CONTCAR* *.json);;CIF (*.cif);;"
                    "POSCAR / VASP (POSCAR* CONTCAR* *.vasp);;pymatgen JSON (*.json);;All files (*)")


def n_atoms(n: int) -> str:
    """``"1 atom"``, ``"8 atoms"``."""
    return f"{n} atom" if n == 1 else f"{n} atoms"


class FileActions:
    """File dialogs, saving and exporting for the main window, and its recent-files list.

    Args:
        window: the main window: its ``session``, ``settings``, ``grid``, ``explorer``,
            ``recent_menu``, status bar and the methods the dialogs end in (``open_file``,
            ``open_checkpoint``, ``save_reconstruction``, ``save_screenshot``,
            ``export_density``, ``grab_views``, ``shown_field``).
        on_error: ``on_error(title, text)`` tells the user something failed.
    """

    def __init__(self, window: QMainWindow, on_error: Callable[[str, str], None]) -> None:
        self.window = window
        self._error = on_error

    # ------------------------------------------------------------------ recent files
    def recent_files(self) -> list[str]:
        """The recently opened files, newest first (resolved paths)."""
        v = self.window.settings.value("files/recent")
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return [str(x) for x in v]

    def fill_recent_menu(self) -> None:
        """Fill File > Recent files (just before it opens)."""
        w = self.window
        w.recent_menu.clear()
        files = self.recent_files()
        if not files:
            w.recent_menu.addAction("(none)").setEnabled(False)
            return
        for f in files:
            a = w.recent_menu.addAction(f)
            a.triggered.connect(lambda _=False, p=f: w.open_file(p))
        w.recent_menu.addSeparator()
        w.recent_menu.addAction("Clear list").triggered.connect(lambda: w.settings.remove("files/recent"))

    def add_recent(self, path: Path) -> None:
        """Put ``path`` first in the recent files (at most :data:`MAX_RECENT`); its folder is the last one."""
        p = str(Path(path).resolve())
        files = [p] + [f for f in self.recent_files() if f != p]
        self.window.settings.setValue("files/recent", files[:MAX_RECENT])
        self.window.settings.setValue("files/last_dir", str(Path(p).parent))

    def last_dir(self) -> str:
        """The folder the dialogs start in (the last one used, else the home folder)."""
        return str(self.window.settings.value("files/last_dir", str(Path.home())))

    # ------------------------------------------------------------------ dialogs
    def ask_open(self) -> None:
        """File > Open…: choose a structure file and open it."""
        path, _ = QFileDialog.getOpenFileName(self.window, "Open structure", self.last_dir(), STRUCTURE_FILTER)
        if path:
            self.window.open_file(path)

    def ask_checkpoint(self) -> None:
        """File > Open checkpoint…: choose a ``.safetensors`` checkpoint and load it."""
        w = self.window
        start = str(w.session.model.path.parent) if w.session and w.session.model.path else self.last_dir()
        path, _ = QFileDialog.getOpenFileName(w, "Open checkpoint", start,
                                              "Checkpoints (*.safetensors);;All files (*)")
        if path:
            w.open_checkpoint(path)

    def ask_save(self) -> None:
        """File > Save reconstruction…: choose a CIF or XYZ file name and save."""
        w = self.window
        rec = w.session.current if w.session else None
        if rec is None:
            self._error("Nothing to save", "Open a structure first; there is no reconstruction yet.")
            return
        start = str(Path(self.last_dir()) / f"{rec.crystal.name}_reconstructed.cif")
        path, chosen = QFileDialog.getSaveFileName(w, "Save reconstruction", start, "CIF (*.cif);;XYZ (*.xyz)")
        if path:
            if not Path(path).suffix:
                path += ".xyz" if chosen.startswith("XYZ") else ".cif"
            w.save_reconstruction(path)

    def ask_screenshot(self) -> None:
        """File > Save screenshot…: choose a PNG file name and save the two views."""
        w = self.window
        name = w.session.current.crystal.name if w.session and w.session.current else "crystalstudio"
        path, _ = QFileDialog.getSaveFileName(w, "Save screenshot", str(Path(self.last_dir()) / f"{name}.png"),
                                              "PNG image (*.png)")
        if path:
            if not Path(path).suffix:
                path += ".png"
            w.save_screenshot(path)

    def ask_export_density(self) -> None:
        """File > Export decoded density…: choose a .vti or .npy file name and export."""
        w = self.window
        if w.shown_field() is None:
            self._error("Nothing to export", "Open a structure or decode a latent vector first.")
            return
        name = w.session.current.crystal.name if w.session.current else "decoded"
        path, chosen = QFileDialog.getSaveFileName(
            w, "Export decoded density", str(Path(self.last_dir()) / f"{name}_density.vti"),
            "VTK image, ParaView (*.vti);;NumPy array (*.npy)")
        if path:
            if not Path(path).suffix:
                path += ".npy" if chosen.startswith("NumPy") else ".vti"
            w.export_density(path)

    # ------------------------------------------------------------------ saving and exporting
    def save_reconstruction(self, path: str | Path) -> Path | None:
        """Write the reconstructed atoms to ``path`` (.xyz: XYZ, anything else: CIF).

        Returns the path written, or None after telling the user why not.
        """
        w = self.window
        path = Path(path)
        rec = w.session.current if w.session is not None else None
        if rec is None:
            self._error("Nothing to save", "Open a structure first; there is no reconstruction yet.")
            return None
        if len(rec.atoms) == 0:
            self._error("Nothing to save", f"No atoms were segmented from the {rec.crystal.name} reconstruction.")
            return None
        def write() -> Path:
            if path.suffix.lower() == ".xyz":
                ck = w.session.model.path.name if w.session.model.path else "in-memory model"
                return write_xyz(rec.atoms.positions, rec.atoms.Z, path,
                                 comment=f"{rec.crystal.name} reconstructed by crystalstudio ({ck}); "
                                         f"cube {w.grid.length:g} A")
            return write_cif(rec.atoms.positions, rec.atoms.Z, path, grid=w.grid)

        return self._write(path, write, "Cannot save", lambda out: f"Saved {n_atoms(len(rec.atoms))} to {path}")

    def _write(self, path: Path, write, title: str, saved) -> Path | None:
        """Run ``write()``; on OSError/ValueError show ``title`` and one line naming the file and
        return None; else remember the folder, show ``saved(out)`` in the status bar, return out."""
        try:
            out = write()
        except (OSError, ValueError) as exc:
            self._error(title, f"{path.name}: {getattr(exc, 'strerror', None) or _one_line(exc)}")
            return None
        self.window.settings.setValue("files/last_dir", str(path.resolve().parent))
        self.window.statusBar().showMessage(saved(out), 5000)
        return out

    def save_screenshot(self, path: str | Path) -> Path | None:
        """Save a PNG of the two views; None (after an error message) when it cannot be written."""
        path = Path(path)
        if not self.window.grab_views().save(str(path), "PNG"):
            self._error("Cannot save screenshot", f"{path.name}: could not write the PNG file")
            return None
        self.window.statusBar().showMessage(f"Screenshot saved to {path}", 5000)
        return path

    def export_density(self, path: str | Path) -> Path | None:
        """Write the decoded field on screen (n, n, n) to ``path``: ``.npy`` (float32, Eq. 1
        units) or ``.vti`` (VTK image: spacing h Å, origin h/2). None after an error message."""
        w = self.window
        path = Path(path)
        M = w.shown_field()
        if M is None:
            self._error("Nothing to export", "Open a structure or decode a latent vector first.")
            return None
        return self._write(path, lambda: (save_density_npy(M, path) if path.suffix.lower() == ".npy"
                                          else save_density_vti(M, w.grid, path)),
                           "Cannot export density", lambda out: f"Density field saved to {out}")

    def export_video(self, spec: ExportSpec | None = None) -> Path | None:
        """Export a latent path to MP4 / GIF with a progress dialog and Cancel.

        ``spec`` None asks with :class:`ExportDialog`. Returns the file written, or None
        (cancelled, or after a one-line error message; no partial file is left).
        """
        w = self.window
        if w.session is None:
            self._error("No model", "Load a checkpoint first (File > Open checkpoint…).")
            return None
        if spec is None:
            dlg = ExportDialog(w.session, w.settings, w, dim=w.session.model.latent_rank[0])
            if dlg.exec() != ExportDialog.DialogCode.Accepted:
                return None
            dlg.remember()
            spec = dlg.spec()
        w.explorer.play(False)
        name = Path(spec.path).name or "(no file name)"
        try:
            out = run_export(w, w.session, spec, cond=w.explorer.explicit_cond())
        except ExportCancelled:
            w.statusBar().showMessage(f"Export cancelled; no {name} written", 5000)
            return None
        except (OSError, ValueError, RuntimeError) as exc:
            self._error("Cannot export video", f"{name}: {getattr(exc, 'strerror', None) or _one_line(exc)}")
            return None
        w.settings.setValue("files/last_dir", str(out.resolve().parent))
        w.statusBar().showMessage(f"Exported {spec.frames} frames to {out}", 8000)
        return out
