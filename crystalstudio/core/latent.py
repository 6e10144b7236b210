"""Moving through the latent space (Hoffmann et al. 2019, Sec. 4.3-4.5, Fig. 8, 10, 11).

All functions take and return float32 numpy vectors z of shape (latent,) or (T, latent).
"""

from __future__ import annotations

import numpy as np

__all__ = ["latent_vector", "lerp", "slerp", "interpolate", "random_latents", "sweep", "keyframe_path", "SLIDER_RANGE"]

SLIDER_RANGE = (-3.0, 3.0)  # Fig. 10D: each latent value varied from -3 to 3


def latent_vector(z, latent: int, what: str = "z") -> np.ndarray:
    """``z`` as a new (latent,) float32 vector, checked.

    Args:
        z: anything numpy reads as ``latent`` numbers (any shape with that many elements).
        latent: the model's latent size.
        what: the name the error gives it.
    Raises:
        ValueError: ``z`` does not hold ``latent`` finite numbers (one line naming ``what``).
    """
    z = np.array(z, np.float32).reshape(-1)
    if z.shape != (int(latent),) or not np.all(np.isfinite(z)):
        raise ValueError(f"{what} must be {int(latent)} finite numbers, got shape {z.shape}")
    return z


def lerp(z0: np.ndarray, z1: np.ndarray, t: float) -> np.ndarray:
    """Linear interpolation ``(1 - t) z0 + t z1`` (Sec. 4.3); t in [0, 1]."""
    z0, z1 = np.asarray(z0, np.float32), np.asarray(z1, np.float32)
    return ((1.0 - t) * z0 + t * z1).astype(np.float32)


def slerp(z0: np.ndarray, z1: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation along the great circle between z0 and z1 (norms interpolated
    linearly); falls back to :func:`lerp` for (anti)parallel or zero vectors."""
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    n0, n1 = np.linalg.norm(z0), np.linalg.norm(z1)
    if n0 < 1e-12 or n1 < 1e-12:
        return lerp(z0, z1, t)
    cos = np.clip(np.dot(z0 / n0, z1 / n1), -1.0, 1.0)
    omega = np.arccos(cos)
    if omega < 1e-6 or np.pi - omega < 1e-6:
        return lerp(z0, z1, t)
    u = (np.sin((1 - t) * omega) * z0 / n0 + np.sin(t * omega) * z1 / n1) / np.sin(omega)
    return (u * ((1 - t) * n0 + t * n1)).astype(np.float32)


def interpolate(z0: np.ndarray, z1: np.ndarray, steps: int, mode: str = "linear") -> np.ndarray:
    """(steps, latent) path from z0 (t = 0) to z1 (t = 1) inclusive.

    Raises:
        ValueError: steps < 2 or unknown mode ("linear", "spherical").
    """
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps, got {steps}")
    f = {"linear": lerp, "spherical": slerp}.get(mode)
    if f is None:
        raise ValueError(f"unknown interpolation mode {mode!r} (linear, spherical)")
    return np.stack([f(z0, z1, t) for t in np.linspace(0.0, 1.0, steps)])


def random_latents(n: int, latent: int, seed: int | None = 0) -> np.ndarray:
    """(n, latent) float32 draws z ~ N(0, I) (Sec. 4.4); the same seed gives the same draws."""
    return np.random.default_rng(seed).standard_normal((n, latent)).astype(np.float32)


def sweep(z: np.ndarray, dim: int, steps: int, lo: float = SLIDER_RANGE[0], hi: float = SLIDER_RANGE[1]) -> np.ndarray:
    """(steps, latent): z with dimension ``dim`` swept from lo to hi (Fig. 10D)."""
    z = np.asarray(z, np.float32)
    if not 0 <= dim < z.shape[-1]:
        raise ValueError(f"latent dimension {dim} out of range 0..{z.shape[-1] - 1}")
    out = np.repeat(z[None], steps, axis=0)
    out[:, dim] = np.linspace(lo, hi, steps, dtype=np.float32)
    return out


def keyframe_path(keys: list[np.ndarray], steps: int, mode: str = "linear") -> np.ndarray:
    """(steps, latent) path through keyframes, frames spread evenly over the segments."""
    if len(keys) < 2:
        raise ValueError("a path needs at least 2 keyframes")
    seg = len(keys) - 1
    out = []
    for s in np.linspace(0.0, seg, steps):
        i = min(int(s), seg - 1)
        f = lerp if mode == "linear" else slerp
        out.append(f(keys[i], keys[i + 1], float(s - i)))
    return np.stack(out)
