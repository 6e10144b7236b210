"""A resumable store of the error budget's fits of the true field (``evaluate --fit-cache``).

A repeating-lattice cube's true-M fit takes 2-450 s (docs/atom_fit.md), so the budget's
``fit_on_true_M`` rows over the whole test split (358 cubes) take hours on two cores, longer
than a working session. With a cache file, every finished fit is appended to it at once (one
JSON line, flushed and fsynced), and a later run of the same command reads it back instead of
fitting again: a run that is killed loses at most the fits in flight.

A line is reused only for the same field, grid, representation, fit settings *and fitting
code*: its key is a SHA-1 over the field's float32 bytes, the grid, the representation, the
settings' ``repr`` and the source files of the modules that fit (:data:`FIT_MODULES`). Any
change to the fit therefore misses the cache, and the measures of a resumed run are those of
one uninterrupted run (positions are stored with ``repr`` precision: float64 round-trips).

The file is JSON lines, never pickle; a line that does not parse (a run killed mid-write) or
lacks the fields is skipped and counted in :attr:`FitCache.skipped`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from crystalstudio.core.density import Grid
from crystalstudio.core.fit import FitSettings, fit_atoms
from crystalstudio.core.segment import Atoms

#: modules whose source decides a fit's result; their bytes are part of every key
FIT_MODULES = ("crystalstudio.core.fit", "crystalstudio.core.lattice_fit", "crystalstudio.core.density",
               "crystalstudio.core.segment", "crystalstudio.core.lattice_overlap")


def code_version() -> str:
    """SHA-1 (hex) of the source files of :data:`FIT_MODULES`, in that order."""
    h = hashlib.sha1()
    for name in FIT_MODULES:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def timed_fit(M: np.ndarray, grid: Grid, representation: str, settings: FitSettings) -> tuple[Atoms, float]:
    """:func:`~crystalstudio.core.fit.fit_atoms` and its wall time in seconds (a worker
    process's task: module level, so that it pickles)."""
    t = time.perf_counter()
    atoms = fit_atoms(M, grid, representation, settings)
    return atoms, time.perf_counter() - t


class FitCache:
    """Finished true-M fits on disk, keyed by field and fitting code (module docstring).

    Args:
        path: the JSON-lines file; created (with its folder) on the first :meth:`put`.

    Attributes:
        skipped: lines of the file that could not be read (not JSON, or missing fields).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._atoms: dict[str, Atoms] = {}
        self._seconds: dict[str, float] = {}
        self._code = code_version()
        self.skipped = 0
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    P = np.asarray(rec["positions"], np.float64).reshape(-1, 3)
                    Z = np.asarray(rec["Z"], np.int64).reshape(-1)
                    A = np.asarray(rec["amplitude"], np.float64).reshape(-1)
                    if len(Z) != len(P) or len(A) != len(P):
                        raise ValueError("lengths differ")
                    self._atoms[str(rec["key"])] = Atoms(P, Z, amplitude=A)
                    self._seconds[str(rec["key"])] = float(rec.get("seconds", float("nan")))
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1

    def __len__(self) -> int:
        return len(self._atoms)

    def key(self, M: np.ndarray, grid: Grid, representation: str, settings: FitSettings) -> str:
        """SHA-1 (hex) of ``M`` (as float32 bytes), ``grid``, ``representation``, ``settings``
        and :func:`code_version`."""
        h = hashlib.sha1(np.ascontiguousarray(M, np.float32).tobytes())
        h.update(json.dumps([grid.to_dict(), representation, repr(settings), self._code]).encode())
        return h.hexdigest()

    def get(self, key: str) -> tuple[Atoms, float] | None:
        """The stored fit (positions, Z, amplitude) and its wall time (s) when it ran, or None."""
        atoms = self._atoms.get(key)
        return None if atoms is None else (atoms, self._seconds[key])

    def put(self, key: str, atoms: Atoms, seconds: float) -> None:
        """Append one fit (thread-safe; flushed and fsynced before returning)."""
        amp = atoms.amplitude if atoms.amplitude is not None else np.zeros(len(atoms))
        rec = {"key": key, "positions": np.asarray(atoms.positions, np.float64).tolist(),
               "Z": np.asarray(atoms.Z).astype(int).tolist(), "amplitude": np.asarray(amp, np.float64).tolist(),
               "seconds": float(seconds)}
        line = json.dumps(rec, allow_nan=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():  # a line cut short by a kill: start a fresh one
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")
                fh.write(line.encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._atoms[key] = atoms
            self._seconds[key] = float(seconds)
