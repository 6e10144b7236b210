"""Keep drawing until N valid crystals are found (the Sample tab's search box).

Each seed from the start seed on is drawn from the session's prior
(:meth:`~crystalstudio.session.Session.draw`), decoded, its atoms read, and checked by
:func:`~crystalstudio.io.validity.check_draw` (structural: all pairs >= 0.5 Å;
compositional: SMACT charge balance). One seed per worker job, so the progress bar moves
and "Stop" answers at once; the search gives up after ``MAX_TRIES_PER_VALID`` x N seeds.
Valid seeds are listed; choosing one emits :attr:`ValidDrawSearch.chosen` (the explorer
then shows that draw).
"""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QGroupBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from ..io.validity import DrawValidity, check_draw
from ..session import Session
from .workers import LatestRunner

__all__ = ["ValidDrawSearch", "MAX_TRIES_PER_VALID", "check_seed"]

MAX_TRIES_PER_VALID = 20


def check_seed(session: Session, seed: int, cond_override: float | None) -> tuple[int, DrawValidity]:
    """Worker side: the validity of the draw of ``seed`` (one draw of the session's prior)."""
    z, cond = session.draw(1, seed)
    c = cond_override if cond_override is not None else (None if cond is None else float(cond[0]))
    frame = session.decode(z[0], c)
    return seed, check_draw(frame.atoms.positions, frame.atoms.Z)


class ValidDrawSearch(QGroupBox):
    """"Draw until N valid" with a progress bar and the list of valid seeds found.

    Args:
        session_of: returns the session (or None) when a search starts.
        start_seed: returns the first seed to try.
        cond_of: returns the user's explicit conditioning value (or None).

    Signals:
        chosen(int): the user picked a valid seed (also emitted for the first one found).
        finished(int, int): (valid found, seeds tried) when a search ends.
    """

    chosen = Signal(int)
    finished = Signal(int, int)

    def __init__(self, parent: QWidget, session_of: Callable[[], Session | None], start_seed: Callable[[], int],
                 cond_of: Callable[[], float | None]) -> None:
        super().__init__("Draw until valid (structure + charge balance)", parent)
        self._session_of, self._start_seed, self._cond_of = session_of, start_seed, cond_of
        self.runner = LatestRunner(self)
        self.runner.done.connect(self._on_done)
        self.runner.failed.connect(self._on_failed)
        v = QVBoxLayout(self)
        h = QHBoxLayout()
        h.addWidget(QLabel("Find", self))
        self.n_spin = QSpinBox(self)
        self.n_spin.setRange(1, 64)
        self.n_spin.setValue(8)
        self.n_spin.setToolTip("How many valid draws to find")
        h.addWidget(self.n_spin)
        h.addWidget(QLabel("valid", self))
        self.button = QPushButton("Search", self)
        self.button.setToolTip("Draw seed after seed from the Seed box on until this many are valid")
        h.addWidget(self.button)
        h.addStretch(1)
        v.addLayout(h)
        self.progress = QProgressBar(self)
        self.progress.setFormat("%v / %m valid")
        self.progress.setValue(0)
        v.addWidget(self.progress)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        v.addWidget(self.status)
        self.results = QComboBox(self)
        self.results.setToolTip("Valid draws found: choose one to show it")
        self.results.setEnabled(False)
        v.addWidget(self.results)
        self.button.clicked.connect(self.toggle)
        self.results.activated.connect(lambda i: self.chosen.emit(int(self.results.itemData(i))))
        self._running = False
        self._epoch = 0
        self.found: list[tuple[int, DrawValidity]] = []
        self.tried = 0

    @property
    def running(self) -> bool:
        """True while a search is drawing."""
        return self._running

    def toggle(self) -> None:
        """Start a search, or stop the one running."""
        self.stop() if self._running else self.start()

    def start(self) -> None:
        """Start drawing seeds in the background until the asked number of valid draws is found."""
        s = self._session_of()
        if s is None:
            return
        self._epoch += 1
        self._running = True
        self.found, self.tried = [], 0
        self._target = int(self.n_spin.value())
        self._next = int(self._start_seed())
        self._cond = self._cond_of()
        self.results.clear()
        self.results.setEnabled(False)
        self.progress.setRange(0, self._target)
        self.progress.setValue(0)
        self.button.setText("Stop")
        self.status.setText(f"drawing from the {s.prior_in_use()} prior…")
        self._submit(s)

    def _submit(self, s: Session) -> None:
        self.runner.submit(check_seed, s, self._next, self._cond, tag={"epoch": self._epoch}, channel="search")
        self._next += 1

    def stop(self, why: str = "stopped") -> None:
        """Stop the running search after the draw in progress (found draws stay listed)."""
        if not self._running:
            return
        self._running = False
        self._epoch += 1
        self.runner.cancel()
        self.button.setText("Search")
        self.status.setText(f"{len(self.found)} valid of {self.tried} draws ({why})")
        self.finished.emit(len(self.found), self.tried)

    def _on_done(self, result: Any, tag: dict) -> None:
        if tag["epoch"] != self._epoch:
            return
        seed, v = result
        self.tried += 1
        if v.valid:
            self.found.append((seed, v))
            self.results.addItem(f"seed {seed}: {v.formula}, {v.n_atoms} atoms", seed)
            self.results.setEnabled(True)
            self.progress.setValue(len(self.found))
            if len(self.found) == 1:
                self.chosen.emit(seed)
        s = self._session_of()
        if len(self.found) >= self._target:
            self.stop("done")
        elif self.tried >= MAX_TRIES_PER_VALID * self._target or s is None:
            self.stop(f"gave up after {self.tried} draws")
        else:
            self.status.setText(f"{len(self.found)} valid of {self.tried} draws…")
            self._submit(s)

    def _on_failed(self, exc: BaseException, tag: dict) -> None:
        if tag["epoch"] == self._epoch:
            self.stop(f"failed: {next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)}")

    def shutdown(self) -> None:
        """Stop and wait for the worker (the window is closing)."""
        self.stop()
        self.runner.shutdown()
