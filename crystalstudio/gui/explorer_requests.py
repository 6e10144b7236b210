"""The latent explorer's model work: frame decodes and endpoint encodings in one worker.

:class:`DecodeRequests` owns the explorer's :class:`~crystalstudio.gui.workers.LatestRunner`:
the newest request of each channel wins, so dragging a slider never queues up decodes, and a
request for the frame already on its way is not sent again. While a slider is dragged only
the density is decoded; :meth:`~DecodeRequests.segment_later` starts the pause after which
:attr:`~DecodeRequests.settled` asks for the segmented frame. Results of an older epoch (a
new reconstruction or model since) are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from ..io.structures import read_structure
from ..session import Frame, Reconstruction, Session, summarise
from .workers import LatestRunner

__all__ = ["DecodeRequests", "DEBOUNCE_MS"]

DEBOUNCE_MS = 250  # pause after the last move before atoms are segmented


class DecodeRequests(QObject):
    """Decodes of z (density only, or segmented) and endpoint encodings, newest first.

    Args:
        parent: the explorer (GUI thread).

    Attributes:
        runner: the worker (``busy``, ``busy_changed``).
        last_request: ``(z bytes, cond, segmented)`` of the newest decode asked for (None:
            send the next one whatever it is).
        closed: True after :meth:`shutdown`; no request is sent and no result delivered.

    Signals:
        decoded(Frame, object, dict): a frame of the current epoch, its match figures against
            the encoded input (dict or None) and its tag (``segment``, ``source``, ``target``).
        encoded(str, Reconstruction): endpoint "A" or "B" encoded with the current model.
        failed(BaseException, dict): a job raised (tag ``kind`` "decode" or "endpoint").
        settled(): the pause after the last move ended: time to decode and segment.
    """

    decoded = Signal(object, object, object)
    encoded = Signal(str, object)
    failed = Signal(object, object)
    settled = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.runner = LatestRunner(self)
        self.runner.done.connect(self._on_done)
        self.runner.failed.connect(self._on_failed)
        self.last_request: tuple[bytes, Any, bool] | None = None
        self.closed = False
        self._epoch = 0  # decodes of older epochs are dropped (a new reconstruction or model)
        self._model_epoch = 0  # endpoint encodings of an older model are dropped
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.settled)

    def decode(self, session: Session, z: np.ndarray, cond: float | None, segment: bool, source: str) -> None:
        """Decode ``z`` (and segment it) in the worker, unless the same frame is on its way."""
        if self.closed:
            return
        key = (z.tobytes(), cond)
        if self.last_request is not None and self.last_request[:2] == key and (self.last_request[2] or not segment):
            return  # the same frame is already on its way
        self.last_request = (*key, segment)
        rec = session.current
        tag = {"kind": "decode", "segment": segment, "epoch": self._epoch, "source": source,
               "target": rec.crystal.name if rec is not None else ""}
        self.runner.submit(_decode_job, session, z, cond, segment, rec, tag=tag, channel="decode")

    def encode(self, session: Session, which: str, path: Path) -> None:
        """Encode the structure file ``path`` in the worker as endpoint ``which``."""

        def work() -> Reconstruction:
            return session.compute(read_structure(path, session.grid))

        self.runner.submit(work, tag={"kind": "endpoint", "which": which, "model_epoch": self._model_epoch},
                           channel=f"endpoint-{which}")

    def segment_later(self) -> None:
        """(Re)start the pause after which :attr:`settled` is emitted."""
        self._debounce.start()

    def stop_waiting(self) -> None:
        """Cancel the pause (a segmented frame is asked for now)."""
        self._debounce.stop()

    def new_model(self) -> None:
        """A new model: drop every request and result of the old one."""
        self._epoch += 1
        self._model_epoch += 1
        self.runner.cancel()
        self.last_request = None

    def new_reconstruction(self, z: np.ndarray) -> None:
        """A new reconstruction with latent ``z`` is on screen (segmented): drop older decodes."""
        self._epoch += 1
        self._debounce.stop()
        self.runner.cancel("decode")
        self.last_request = (np.asarray(z, np.float32).tobytes(), None, True)

    def close(self) -> None:
        """Send and deliver nothing from now on (window closing); :meth:`shutdown` waits."""
        self.closed = True
        self._debounce.stop()

    def shutdown(self) -> None:
        """Drop waiting requests and wait for the running job."""
        self.close()
        self.runner.shutdown()

    def _on_done(self, result: Any, tag: dict) -> None:
        if self.closed:
            return
        if tag["kind"] == "endpoint":
            if tag["model_epoch"] == self._model_epoch:
                self.encoded.emit(tag["which"], result)
            return
        if tag["epoch"] != self._epoch:
            return
        frame, metrics = result
        self.decoded.emit(frame, metrics, tag)

    def _on_failed(self, exc: BaseException, tag: dict) -> None:
        if self.closed:
            return
        self.last_request = None
        self.failed.emit(exc, tag)


def _decode_job(session: Session, z: np.ndarray, cond: float | None, segment: bool,
                target: Reconstruction | None) -> tuple[Frame, dict | None]:
    """Worker side: decode (and segment) z; match figures against the encoded input."""
    frame = session.decode(z, cond, segment=segment)
    if segment:
        from ..io.validity import check_draw

        frame.readouts["validity"] = check_draw(frame.atoms.positions, frame.atoms.Z).reason
    metrics = None
    if segment and target is not None:
        metrics = summarise(target.positions, target.Z, frame.atoms, target.M, frame.M_hat)
    return frame, metrics
