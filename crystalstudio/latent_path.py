"""The explorer's latent path: interpolation endpoints A and B, the position t between them,
and a user-made keyframe path (what the interpolation panel scrubs and the exporters render).

Plain data, no Qt and no model: :class:`~crystalstudio.session.Session` holds one as
``session.path`` and passes it its event callback, so that views are told ``("endpoint",
(which, Endpoint))`` and ``("keyframes", count)`` as they are today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .core.latent import latent_vector

if TYPE_CHECKING:  # only for annotations: session.py imports this module
    from .session import Reconstruction

__all__ = ["Endpoint", "LatentPath", "MODES"]

#: interpolation modes of :meth:`LatentPath.between` (Sec. 4.3: linear; spherical as an option)
MODES = ("linear", "spherical")


@dataclass
class Endpoint:
    """One end of an interpolation (Sec. 4.3): a named latent vector.

    Attributes:
        name: what it is (e.g. the crystal's name, ``"seed 3"``).
        z: (latent,) float32.
        reconstruction: the encoded crystal it came from, if any.
    """

    name: str
    z: np.ndarray
    reconstruction: Reconstruction | None = None


class LatentPath:
    """Endpoints A and B, the position ``t`` in [0, 1] between them, and keyframes.

    Args:
        latent: the model's latent size; vectors of another size are refused.
        emit: ``emit(event, value)``, called on every change (the session's observers).

    Attributes:
        endpoints: ``{"A": Endpoint | None, "B": Endpoint | None}``.
        t: the last position asked of :meth:`between` (0 = A, 1 = B).
        keyframes: (latent,) float32 vectors of the user's path, in order.
    """

    def __init__(self, latent: int, emit: Callable[[str, object], None] | None = None):
        self.latent = int(latent)
        self._emit = emit or (lambda event, value: None)
        self.endpoints: dict[str, Endpoint | None] = {"A": None, "B": None}
        self.t = 0.0
        self.keyframes: list[np.ndarray] = []

    def resize(self, latent: int) -> None:
        """Take a new latent size (another model): endpoints and keyframes of another size
        are forgotten, the rest kept."""
        self.latent = int(latent)
        for k, ep in self.endpoints.items():
            if ep is not None and ep.z.shape != (self.latent,):
                self.endpoints[k] = None
        self.keyframes = [k for k in self.keyframes if k.shape == (self.latent,)]

    def _vector(self, z, what: str) -> np.ndarray:
        return latent_vector(z, self.latent, what)

    # ------------------------------------------------------------------ endpoints
    def set_endpoint(self, which: str, name: str, z: np.ndarray,
                     reconstruction: Reconstruction | None = None) -> Endpoint:
        """Set end ``which`` (``"A"`` or ``"B"``) to ``z`` (copied, float32); observers get
        ``("endpoint", (which, Endpoint))``.

        Raises:
            ValueError: another ``which``, or ``z`` is not a (latent,) vector of finite numbers.
        """
        if which not in self.endpoints:
            raise ValueError(f"endpoint must be 'A' or 'B', got {which!r}")
        ep = Endpoint(str(name), self._vector(z, f"endpoint {which}"), reconstruction)
        self.endpoints[which] = ep
        self._emit("endpoint", (which, ep))
        return ep

    def ready(self) -> bool:
        """Whether both endpoints are set."""
        return self.endpoints["A"] is not None and self.endpoints["B"] is not None

    def between(self, t: float, mode: str = "linear") -> np.ndarray:
        """z at ``t`` (clipped to [0, 1]) between A and B, (latent,) float32; ``t`` is kept.

        t = 0 and t = 1 give A's and B's z exactly (same z, same decoded field).

        Raises:
            ValueError: an endpoint is not set, or ``mode`` is not one of :data:`MODES`.
        """
        from .core.latent import lerp, slerp

        if not self.ready():
            raise ValueError("set both interpolation endpoints A and B first")
        f = {"linear": lerp, "spherical": slerp}.get(mode)
        if f is None:
            raise ValueError(f"unknown interpolation mode {mode!r} ({', '.join(MODES)})")
        t = float(min(max(t, 0.0), 1.0))
        self.t = t
        a, b = self.endpoints["A"], self.endpoints["B"]
        if t == 0.0:
            return a.z.copy()
        if t == 1.0:
            return b.z.copy()
        return f(a.z, b.z, t)

    def endpoint_maxima(self) -> tuple[float, float] | None:
        """The largest input densities (Eq. 1 units) of the crystals A and B were encoded
        from, or None when an endpoint is unset or not an encoded crystal (a draw)."""
        a, b = self.endpoints["A"], self.endpoints["B"]
        if a is None or b is None or a.reconstruction is None or b.reconstruction is None:
            return None
        return float(a.reconstruction.M.max()), float(b.reconstruction.M.max())

    # ------------------------------------------------------------------ keyframes
    def add_keyframe(self, z: np.ndarray) -> int:
        """Append ``z`` (copied, float32) to the keyframe path; returns the count; observers
        get ``("keyframes", count)``.

        Raises:
            ValueError: ``z`` is None or not a (latent,) vector of finite numbers.
        """
        if z is None:
            raise ValueError("nothing to add: encode a crystal or move a slider first")
        self.keyframes.append(self._vector(z, "a keyframe"))
        self._emit("keyframes", len(self.keyframes))
        return len(self.keyframes)

    def clear_keyframes(self) -> None:
        """Forget the keyframe path; observers get ``("keyframes", 0)``."""
        self.keyframes = []
        self._emit("keyframes", 0)
