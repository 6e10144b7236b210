"""Where to draw z from: the VAE's standard prior, or a density fitted to where the
training crystals actually sit in latent space (the aggregate posterior).

Hoffmann et al. 2019, Sec. 4.4 draw z ~ N(0, I). With a small beta the encoded crystals
fill only a small part of that ball, so most N(0, I) draws decode between crystals
(few atoms, overlapping atoms). :class:`LatentPrior` is a Gaussian mixture fitted on the
encoded means mu of the training crystals (the "aggregate posterior" of VAE papers,
for example Tomczak & Welling 2018, VampPrior; Ghosh et al. 2020, "From variational to
deterministic autoencoders", Sec. 4 ex-post density estimation). It needs only numpy;
fitting lives in ``training/prior.py`` (scikit-learn). It is stored in the checkpoint as
tensors named ``prior.*`` plus a ``prior`` metadata entry: never pickle.

Conditional models (Sec. 4.5) also need a conditioning value per draw: the prior keeps
the quantiles of the training crystals' largest densities and draws from them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LatentPrior", "PriorError", "PRIORS", "draw_latents"]

PRIORS = ("aggregate", "standard")
_PREFIX = "prior."


class PriorError(ValueError):
    """A prior block that is inconsistent or corrupt (one-line message)."""


class LatentPrior:
    """Gaussian mixture p(z) = sum_k w_k N(z; m_k, C_k) over the latent space.

    Args:
        weights: (K,) mixture weights, positive, summing to 1.
        means: (K, D) component means.
        scale: (K, D) per-dimension standard deviations (diagonal C_k), or (K, D, D)
            lower-triangular Cholesky factors L_k with C_k = L_k L_k^T (full C_k).
        cond_quantiles: optional (Q,) increasing quantiles of the training crystals'
            largest density (Eq. 1 units) for conditional models (Sec. 4.5).
        info: JSON-serialisable settings (how it was fitted, chosen on what).

    Raises:
        PriorError: shapes that do not agree, non-finite values, weights that are not a
            distribution, non-positive scales or unsorted quantiles.
    """

    def __init__(self, weights, means, scale, cond_quantiles=None, info: dict | None = None):
        self.weights = np.asarray(weights, np.float64).reshape(-1)
        self.means = np.asarray(means, np.float32)
        self.scale = np.asarray(scale, np.float32)
        self.cond_quantiles = None if cond_quantiles is None else np.asarray(cond_quantiles, np.float32).reshape(-1)
        self.info = dict(info or {})
        self._check()

    # ------------------------------------------------------------------ validation
    def _check(self) -> None:
        K = len(self.weights)
        if K < 1 or self.means.ndim != 2 or self.means.shape[0] != K:
            raise PriorError(f"prior means have shape {self.means.shape}, expected ({K}, latent)")
        D = self.means.shape[1]
        if self.scale.shape not in ((K, D), (K, D, D)):
            raise PriorError(f"prior scale has shape {self.scale.shape}, expected ({K}, {D}) or ({K}, {D}, {D})")
        for name, a in (("weights", self.weights), ("means", self.means), ("scale", self.scale)):
            if not np.isfinite(a).all():
                raise PriorError(f"prior {name} hold NaN or infinite values")
        if (self.weights <= 0).any() or abs(self.weights.sum() - 1.0) > 1e-3:
            raise PriorError(f"prior weights are not a distribution (sum {self.weights.sum():.4f})")
        diag = self.scale if self.scale.ndim == 2 else np.diagonal(self.scale, axis1=1, axis2=2)
        if (diag <= 0).any():
            raise PriorError("prior scales must be positive")
        if self.scale.ndim == 3 and np.abs(np.triu(self.scale, 1)).max() > 0:
            raise PriorError("prior scale factors are not lower-triangular")
        q = self.cond_quantiles
        if q is not None and (len(q) < 2 or not np.isfinite(q).all() or (np.diff(q) < 0).any() or q[0] <= 0):
            raise PriorError("prior conditioning quantiles must be positive, finite and increasing")
        self.weights = self.weights / self.weights.sum()

    @property
    def n_components(self) -> int:
        """Number of Gaussians in the mixture."""
        return len(self.weights)

    @property
    def latent(self) -> int:
        """Dimension of z."""
        return self.means.shape[1]

    @property
    def covariance_type(self) -> str:
        """``"full"`` or ``"diag"``: the form of each component's covariance."""
        return "diag" if self.scale.ndim == 2 else "full"

    # ------------------------------------------------------------------ use
    def sample(self, n: int, seed: int | None = 0, temperature: float = 1.0) -> np.ndarray:
        """(n, D) float32 draws; the same seed gives the same draws.

        ``temperature`` tau scales each component's spread: z = mean_k + tau L_k eps (tau = 1
        is the fitted mixture, what the app draws; tau < 1 draws nearer the components' means).

        Raises:
            ValueError: a negative or non-finite temperature.
        """
        if not (np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        rng = np.random.default_rng(seed)
        k = rng.choice(self.n_components, size=n, p=self.weights)
        eps = rng.standard_normal((n, self.latent))
        if self.scale.ndim == 2:
            z = self.means[k] + temperature * (self.scale[k] * eps)
        else:
            z = self.means[k] + temperature * np.einsum("nij,nj->ni", self.scale[k].astype(np.float64), eps)
        return z.astype(np.float32)

    def sample_cond(self, n: int, seed: int | None = 0) -> np.ndarray | None:
        """(n,) float32 largest densities drawn from the training distribution (linear
        interpolation between stored quantiles), or None when none are stored."""
        if self.cond_quantiles is None:
            return None
        rng = np.random.default_rng(None if seed is None else seed + 7919)
        q = self.cond_quantiles
        return np.interp(rng.uniform(0, 1, n), np.linspace(0, 1, len(q)), q).astype(np.float32)

    def log_density(self, z: np.ndarray) -> np.ndarray:
        """log p(z) for z (N, D): (N,) float64 (nats)."""
        z = np.atleast_2d(np.asarray(z, np.float64))
        D = self.latent
        out = np.empty((len(z), self.n_components))
        for k in range(self.n_components):
            d = z - self.means[k]
            if self.scale.ndim == 2:
                s = self.scale[k].astype(np.float64)
                u = d / s
                logdet = np.log(s).sum()
            else:
                from scipy.linalg import solve_triangular

                L = self.scale[k].astype(np.float64)
                u = solve_triangular(L, d.T, lower=True).T
                logdet = np.log(np.diag(L)).sum()
            out[:, k] = np.log(self.weights[k]) - 0.5 * (u * u).sum(1) - logdet - 0.5 * D * np.log(2 * np.pi)
        m = out.max(1, keepdims=True)
        return (m[:, 0] + np.log(np.exp(out - m).sum(1)))

    # ------------------------------------------------------------------ storage
    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays named ``prior.*``, metadata dict) as the checkpoint stores them."""
        arrays = {_PREFIX + "weights": self.weights.astype(np.float32), _PREFIX + "means": self.means,
                  _PREFIX + "scale": self.scale}
        if self.cond_quantiles is not None:
            arrays[_PREFIX + "cond_quantiles"] = self.cond_quantiles
        meta = {"kind": "gaussian_mixture", "n_components": self.n_components,
                "covariance_type": self.covariance_type, **self.info}
        return arrays, meta

    @classmethod
    def from_tensors(cls, arrays: dict, meta: dict | None) -> "LatentPrior | None":
        """The prior of a checkpoint's ``prior.*`` arrays and ``prior`` metadata; None when
        it has neither.

        Raises:
            PriorError: one without the other, a missing array, an unknown kind or
                inconsistent arrays.
        """
        mine = {k[len(_PREFIX):]: np.asarray(v) for k, v in arrays.items() if k.startswith(_PREFIX)}
        if not mine and not meta:
            return None
        if not meta:
            raise PriorError("prior arrays without prior metadata")
        if not isinstance(meta, dict) or meta.get("kind") != "gaussian_mixture":
            raise PriorError(f"unknown prior kind {meta.get('kind') if isinstance(meta, dict) else meta!r}")
        missing = [k for k in ("weights", "means", "scale") if k not in mine]
        if missing:
            raise PriorError(f"prior lacks {', '.join(missing)}")
        extra = sorted(set(mine) - {"weights", "means", "scale", "cond_quantiles"})
        if extra:
            raise PriorError(f"unexpected prior arrays {extra[:3]}")
        info = {k: v for k, v in meta.items() if k not in ("kind", "n_components", "covariance_type")}
        p = cls(mine["weights"], mine["means"], mine["scale"], mine.get("cond_quantiles"), info)
        if meta.get("n_components", p.n_components) != p.n_components:
            raise PriorError(f"prior metadata says {meta.get('n_components')} components, arrays hold {p.n_components}")
        return p


def draw_latents(n: int, latent: int, seed: int | None = 0, prior: LatentPrior | None = None) -> np.ndarray:
    """(n, latent) float32 draws: from ``prior`` when given, else z ~ N(0, I) (Sec. 4.4).

    Raises:
        PriorError: the prior is for another latent size.
    """
    if prior is None:
        return np.random.default_rng(seed).standard_normal((n, latent)).astype(np.float32)
    if prior.latent != latent:
        raise PriorError(f"the prior is for a {prior.latent}-dimensional latent, the model has {latent}")
    return prior.sample(n, seed)
