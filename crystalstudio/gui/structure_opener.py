"""Opening a structure file in the main window: read, encode, decode and segment it in a
worker thread, then show it.

:class:`StructureOpener` asks which data block of a several-structure CIF to use, runs the
reconstruction as a background job (a cell too large for the unit-cell cube switches to the
repeating-lattice model the session offers), makes the result the session's current
reconstruction on the GUI thread and writes the notes about the file (model switched,
disorder, pymatgen's CIF warnings) into the status bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtWidgets import QInputDialog, QMainWindow

from ..io.structures import StructureError, cif_blocks
from ..session import Reconstruction, Session
from .jobs import one_line as _one_line

__all__ = ["StructureOpener", "file_notes"]


def file_notes(rec: Reconstruction) -> tuple[list[str], list[str]]:
    """(notes, pymatgen warnings) about the file behind ``rec``: the model switch, the
    disorder read from it (mixed and partly vacant sites) and the CIF parser's warnings."""
    meta = rec.crystal.meta
    notes = [meta["note"]] if meta.get("note") else []
    d = meta.get("disorder")
    if d:
        notes.append(f"disordered input: {d['mixed_sites']} mixed and {d['vacant_sites']} partly vacant "
                     f"of {d['sites']} sites; compared with each site's dominant species")
    return notes, list(meta.get("warnings") or [])


class StructureOpener:
    """Open structure files in the main window.

    Args:
        window: the main window: its ``session``, ``jobs``, ``explorer``, ``notes_label``,
            ``block_chooser`` (answers the data-block question instead of a dialog when set),
            ``_add_recent`` and ``_title``.
        on_error: ``on_error(title, text)`` tells the user something failed.
    """

    def __init__(self, window: QMainWindow, on_error: Callable[[str, str], None]) -> None:
        self.window = window
        self._error = on_error

    def open_file(self, path: str | Path) -> None:
        """Read ``path`` and reconstruct it in the background; errors end in one line that
        names the file (the session and the views keep what they had)."""
        w = self.window
        path = Path(path)
        if w.session is None:
            self._error("No model", "No model is loaded; use File > Open checkpoint… first.")
            return
        session = w.session
        progress = w.jobs.report_progress
        block = self.choose_block(path)
        if block is False:
            return  # the user cancelled the data-block choice

        def work():
            try:
                # a cell too large for the cube comes with the repeating-lattice model to use;
                # the swap happens in done(), on the GUI thread
                crystal, model = session.read_for_model(path, block)
                if model is not None:
                    model.refine_steps = session.model.refine_steps
                    return (Session(model=model, device=session.device).compute(crystal, progress=progress),
                            model)
                return session.compute(crystal, progress=progress), None
            except Exception as exc:
                msg = _one_line(exc)
                if not msg.startswith(path.name):  # StructureError messages already name the file
                    raise RuntimeError(f"{path.name}: {type(exc).__name__}: {msg}") from exc
                raise

        def done(result) -> None:
            rec, model = result
            w._add_recent(path)
            if model is not None:
                session.model = model
                w.explorer.model_changed()
                w.setWindowTitle(w._title())
                w.model_choices.mark_model()
            session.set_current(rec)  # -> "reconstruction" event -> views
            notes, warns = file_notes(rec)
            w.notes_label.setText(" · ".join(notes + ([f"{len(warns)} CIF warning(s)"] if warns else [])))
            w.notes_label.setToolTip("\n".join(notes + [f"pymatgen: {x}" for x in warns]))
            w.notes_label.setVisible(bool(notes or warns))

        w.jobs.start(f"Reconstructing {path.name}…", work, done=done, title="Cannot open structure")

    def choose_block(self, path: Path):
        """For a CIF with several structures, ask which: its index, None (one structure or not
        a CIF) or False (cancelled)."""
        if path.suffix.lower() not in (".cif", ".mcif"):
            return None
        try:
            blocks = cif_blocks(path)
        except StructureError:
            return None  # reading it again reports the problem in one line
        if len(blocks) < 2:
            return None
        w = self.window
        if w.block_chooser is not None:  # tests and scripts answer without a dialog
            return w.block_chooser(blocks)
        item, ok = QInputDialog.getItem(w, "Several structures",
                                        f"{path.name} holds {len(blocks)} structures. Open which?", blocks, 0, False)
        return blocks.index(item) if ok else False
