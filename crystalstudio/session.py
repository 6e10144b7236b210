"""The plain-Python session: the single source of truth the GUI and the CLI both drive.

No Qt here. Views subscribe with :meth:`Session.subscribe` and are told
``callback(event, value)`` when something changed (``"model"``, ``"reconstruction"``,
``"latent"`` (the explorer's z), and from ``session.path`` (:class:`LatentPath`)
``"endpoint"`` ((``"A"``/``"B"``, :class:`Endpoint`)) and ``"keyframes"`` (their count)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .core.checkpoint import CheckpointError, CrystalModel, load_checkpoint
from .core.density import Crystal, cell_positions, cube_input, fitting_rotation, lattice_positions
from .core.latent import latent_vector
from .core.metrics import match_atoms
from .core.segment import Atoms
from .latent_path import Endpoint, LatentPath

__all__ = ["Session", "Reconstruction", "Frame", "Endpoint", "LatentPath", "default_checkpoint", "sample_files",
           "CheckpointError", "readouts"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CHECKPOINT = "unit_cell.safetensors"


def default_checkpoint() -> Path:
    """The checkpoint the app starts with: ``$CRYSTALSTUDIO_CHECKPOINT`` or ``assets/unit_cell.safetensors``."""
    env = os.environ.get("CRYSTALSTUDIO_CHECKPOINT")
    return Path(env) if env else ASSETS / DEFAULT_CHECKPOINT


def lattice_checkpoint() -> Path | None:
    """The bundled repeating-lattice checkpoint (``assets/repeating_lattice.safetensors``), if shipped."""
    p = ASSETS / "repeating_lattice.safetensors"
    return p if p.is_file() else None


def disordered_sites(rec: "Reconstruction", representation: str, grid) -> tuple[np.ndarray, list[str]]:
    """The mixed or partly vacant sites of a reconstruction's input, for labelling:
    (positions (K, 3) Å in the cube frame, labels like ``"Al0.50 Nb0.50"`` or ``"Fe0.75 □"``).
    An ordered input gives no sites."""
    from .io.structures import element_symbol

    c = rec.crystal
    if not c.disordered:
        return np.zeros((0, 3)), []
    first, inv = c.site_index()
    fracs, labels = [], []
    for s in range(len(first)):
        here = np.flatnonzero(inv == s)
        occ = c.occupancy[here]
        if len(here) == 1 and occ[0] >= 1.0:
            continue
        parts = [f"{element_symbol(int(z))}{o:.2f}" for z, o in sorted(zip(c.Z[here], occ), key=lambda t: -t[1])]
        if occ.sum() < 0.999:
            parts.append(f"vac{1 - occ.sum():.2f}")
        fracs.append(c.frac[here[0]])
        labels.append(" ".join(parts))
    site = Crystal(c.lattice, np.array(fracs), np.ones(len(fracs), np.int64))
    if representation == "repeating_lattice":
        pos, idx = lattice_positions(Crystal(c.lattice, np.array(fracs), np.arange(1, len(fracs) + 1)), grid,
                                     rec.rotation)
        inside = np.all((pos >= 0) & (pos <= grid.length), axis=1)
        return pos[inside], [labels[i - 1] for i in idx[inside]]
    return cell_positions(site, grid, rec.rotation), labels


def bundled_checkpoints() -> list[tuple[Path, str]]:
    """The checkpoints shipped in ``assets/`` with a one-line description each (from their
    metadata: representation, conditioning; and atoms within 0.5 Å on the test split from the
    evaluation JSON beside each, :func:`~crystalstudio.core.checkpoint.held_out_measures`), the
    default first. Unreadable files are left out."""
    from .core.checkpoint import CheckpointError, held_out_measures, read_metadata

    out = []
    for path in sorted(ASSETS.glob("*.safetensors"), key=lambda p: (p.name != DEFAULT_CHECKPOINT, p.name)):
        try:
            info = read_metadata(path)
        except CheckpointError:
            continue
        what = {"unit_cell": "single rotated unit cell", "repeating_lattice": "repeating lattice"}.get(
            info.get("representation"), str(info.get("representation")))
        if info.get("model_config", {}).get("conditional"):
            what += ", conditional on the largest density"
        measures = held_out_measures(path, info)
        acc = measures.get("atoms_within_tol")
        if isinstance(acc, (int, float)):
            what += f" ({measures.get('split', 'held-out')} atoms within 0.5 Å: {100 * acc:.0f}%)"
        out.append((path, what))
    return out


def sample_files() -> list[Path]:
    """The sample CIFs shipped in ``assets/samples`` (built from textbook prototypes)."""
    return sorted((ASSETS / "samples").glob("*.cif"))


@dataclass
class Reconstruction:
    """One crystal through encode -> decode -> segment.

    Attributes:
        crystal: the input crystal.
        rotation: (3, 3) rotation applied to the centred cell (identity by default).
        positions: (N, 3) float64 Å, input atoms in the cube frame; ``Z`` (N,) int64.
        M: (n, n, n) float32 input density field (Eq. 1); ``M_hat`` the decoded one.
        mu, logvar: (latent,) float32 posterior of z (the encoder's guess).
        z: (latent,) float32 latent that made ``M_hat``: mu polished by latent refinement
            (:meth:`CrystalModel.refine`), or mu itself when refinement is off.
        atoms: segmented atoms of ``M_hat``.
        metrics: the Sec. 4.1 measures for this crystal (see :func:`summarise`).
        window_origin: (3,) fractional coordinates of the cell at the cube's corner
            (repeating-lattice model; zeros for the unit-cell model).
    """

    crystal: Crystal
    rotation: np.ndarray
    positions: np.ndarray
    Z: np.ndarray
    M: np.ndarray
    mu: np.ndarray
    logvar: np.ndarray
    M_hat: np.ndarray
    atoms: Atoms
    metrics: dict = field(default_factory=dict)
    window_origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    z: np.ndarray | None = None

    def __post_init__(self):
        if self.z is None:
            self.z = np.asarray(self.mu, np.float32).copy()


@dataclass
class Frame:
    """One decoded latent vector: what the explorer and the exporters show.

    Attributes:
        z: (latent,) float32.
        M_hat: (n, n, n) float32 decoded density (Eq. 1 units).
        atoms: segmented atoms (Cartesian Å, cube frame).
        readouts: :func:`readouts` of the frame.
    """

    z: np.ndarray
    M_hat: np.ndarray
    atoms: Atoms
    readouts: dict = field(default_factory=dict)


def readouts(atoms: Atoms, M_hat: np.ndarray, peak_scale: float, close_A: float = 0.5) -> dict:
    """Live numbers of a frame: ``n_atoms``, ``composition`` ({Z: count}), ``min_distance_A``
    (smallest interatomic distance, None for < 2 atoms), ``too_close`` (min distance below
    ``close_A`` Å), ``max_density`` (Eq. 1 units) and ``max_density_Z`` (the same read as Z)."""
    from scipy.spatial import cKDTree

    Zs, counts = np.unique(atoms.Z, return_counts=True)
    dmin = None
    if len(atoms) >= 2:
        d, _ = cKDTree(atoms.positions).query(atoms.positions, k=2)
        dmin = float(d[:, 1].min())
    mx = float(M_hat.max()) if M_hat.size else 0.0
    return {"n_atoms": len(atoms), "composition": {int(z): int(c) for z, c in zip(Zs, counts)},
            "min_distance_A": dmin, "too_close": dmin is not None and dmin < close_A,
            "max_density": mx, "max_density_Z": mx * peak_scale}


def summarise(positions: np.ndarray, Z: np.ndarray, atoms: Atoms, M: np.ndarray, M_hat: np.ndarray,
              tol: float = 0.5) -> dict:
    """Per-crystal Sec. 4.1 measures as plain JSON-able numbers.

    Keys: ``n_true``, ``n_pred``, ``atoms_within_tol`` (fraction of true atoms with a
    predicted atom within ``tol`` Å), ``pred_within_tol``, ``exact_count``,
    ``species_accuracy`` (matched atoms), ``median_error_A``, ``voxel_mse``, ``tol_A``.
    """
    r = match_atoms(positions, Z, atoms.positions, atoms.Z, tol)
    d = r["d_true"][np.isfinite(r["d_true"])]
    return {
        "n_true": r["n_true"],
        "n_pred": r["n_pred"],
        "atoms_within_tol": r["true_matched"] / max(r["n_true"], 1),
        "pred_within_tol": r["pred_matched"] / max(r["n_pred"], 1),
        "exact_count": bool(r["exact_count"]),
        "species_accuracy": r["species_correct"] / max(r["true_matched"], 1),
        "median_error_A": float(np.median(d)) if len(d) else None,
        "voxel_mse": float(np.mean((M_hat.astype(np.float64) - M) ** 2)),
        "tol_A": tol,
    }


class Session:
    """Model + current crystal; what the explorer shows.

    Args:
        checkpoint: path of a checkpoint; None loads :func:`default_checkpoint`.
        device: torch device for inference ("cpu" or "cuda").
        model: an already loaded :class:`CrystalModel` (tests, embedding).

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or foreign.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                 model: CrystalModel | None = None):
        self._subscribers: list[Callable[[str, object], None]] = []
        self.device = device
        self.model: CrystalModel = model or load_checkpoint(checkpoint or default_checkpoint(), device)
        self.current: Reconstruction | None = None
        #: repeating-lattice window: fractional point of the cell at the cube's corner
        self.window_origin = np.zeros(3)
        # Latent-space state of the explorer (plain data; the GUI and scripts share it).
        self.z: np.ndarray | None = None  # the latent vector being explored
        #: endpoints A and B, t between them, keyframes (interpolation scrubbing, export)
        self.path = LatentPath(self.model.latent, self._emit)
        #: where random draws come from: "aggregate" (the checkpoint's fitted prior, when it
        #: has one) or "standard" (z ~ N(0, I), Sec. 4.4)
        self.prior: str = "aggregate"

    # ------------------------------------------------------------------ events
    def subscribe(self, callback: Callable[[str, object], None]) -> None:
        """Call ``callback(event, value)`` on every change."""
        self._subscribers.append(callback)

    def _emit(self, event: str, value: object) -> None:
        for cb in list(self._subscribers):
            cb(event, value)

    @property
    def grid(self):
        """The model's voxel grid."""
        return self.model.grid

    # ------------------------------------------------------------------ model
    def load_checkpoint(self, path: str | os.PathLike) -> CrystalModel:
        """Swap in another checkpoint; the current reconstruction is kept only if it is redone.

        Raises:
            CheckpointError: nothing changes in the session when loading fails.
        """
        model = load_checkpoint(path, self.device)
        model.atoms_method = self.model.atoms_method  # the user's choices survive a model switch
        model.refine_steps = self.model.refine_steps
        return self.set_model(model)

    def set_model(self, model: CrystalModel) -> CrystalModel:
        """Swap in an already loaded model (see :meth:`load_checkpoint`); observers get
        ``("model", model)`` and the current reconstruction is redone with it."""
        self.model = model
        self.reset_latent_state()
        self._emit("model", model)
        if self.current is not None:
            self.reconstruct(self.current.crystal, self.current.rotation)
        return model

    @property
    def atoms_method(self) -> str:
        """How atoms are read from decoded fields: ``"fit"`` (Eq. 1 least squares, the
        default) or ``"unet"`` (the paper's argmax + connected components)."""
        return self.model.atoms_method

    def set_prior(self, name: str) -> None:
        """Choose where random draws come from, ``"aggregate"`` or ``"standard"``;
        observers get ``("prior", name)``.

        Raises:
            ValueError: an unknown prior.
        """
        from .core.prior import PRIORS

        if name not in PRIORS:
            raise ValueError(f"unknown prior {name!r} (one of {', '.join(PRIORS)})")
        if name != self.prior:
            self.prior = name
            self._emit("prior", name)

    def prior_in_use(self) -> str:
        """The prior draws actually use: ``"aggregate"`` only when chosen and the model has one."""
        return "aggregate" if self.prior == "aggregate" and self.model.prior is not None else "standard"

    def draw(self, n: int, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` random latent vectors from :meth:`prior_in_use` and, for a conditional
        model with an aggregate prior, a largest density per draw from the training
        distribution (else None: decode at the model's reference scale).

        Returns:
            (z (n, latent) float32, cond (n,) float32 or None); the same seed gives the same draws.
        """
        from .core.prior import draw_latents

        prior = self.model.prior if self.prior_in_use() == "aggregate" else None
        z = draw_latents(n, self.model.latent, seed, prior)
        cond = prior.sample_cond(n, seed) if (prior is not None and self.model.config.conditional) else None
        return z, cond

    def set_atoms_method(self, method: str) -> None:
        """Choose ``"fit"`` or ``"unet"``; the current reconstruction is redone with it and
        observers get ``("atoms_method", method)``.

        Raises:
            ValueError: an unknown method.
        """
        from .core.checkpoint import ATOM_METHODS

        if method not in ATOM_METHODS:
            raise ValueError(f"unknown atoms method {method!r} (one of {', '.join(ATOM_METHODS)})")
        if method == self.model.atoms_method:
            return
        self.model.atoms_method = method
        self._emit("atoms_method", method)
        if self.current is not None:
            self.reconstruct(self.current.crystal, self.current.rotation)

    @property
    def refine_steps(self) -> int:
        """Adam steps of latent refinement after encoding (0: the encoder's mean alone, the
        paper's path); see :mod:`crystalstudio.core.refine`."""
        return self.model.refine_steps

    def set_refine_steps(self, steps: int) -> None:
        """Set :attr:`refine_steps`; the current reconstruction is redone with it and
        observers get ``("refine_steps", steps)``.

        Raises:
            ValueError: a negative or non-integer number of steps.
        """
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"refine steps must be a whole number >= 0, not {steps!r}")
        steps = int(steps)
        if steps == self.model.refine_steps:
            return
        self.model.refine_steps = steps
        self._emit("refine_steps", steps)
        if self.current is not None:
            self.reconstruct(self.current.crystal, self.current.rotation)

    # ------------------------------------------------------------------ work
    def compute(self, crystal: Crystal, rotation: np.ndarray | None = None,
                window_origin: np.ndarray | None = None, progress=None) -> Reconstruction:
        """Encode (then refine the latent, :attr:`refine_steps`), decode and segment
        ``crystal``; no state change, thread-safe.

        Args:
            crystal: the input. rotation: (3, 3) applied to the lattice (default: identity, or for a
                unit-cell model and a cell that fits its cube only in some orientations, one in
                which it fits, :func:`~crystalstudio.core.density.fitting_rotation`).
            window_origin: repeating-lattice model only: (3,) fractional coordinates of the
                cell that sit at the cube's corner (default :attr:`window_origin`): which
                10 Å window of the lattice is shown and reconstructed.
            progress: ``progress(done, steps)`` during latent refinement; True stops it
                early (the best latent so far is used).
        """
        grid = self.model.grid
        if rotation is not None:
            R = np.asarray(rotation, np.float64)
        elif self.model.representation == "unit_cell":
            R = crystal.meta.get("fit_rotation")  # found once by read_for_model for this cube
            if R is None or crystal.meta.get("fit_grid") != grid.length:
                R = fitting_rotation(crystal, grid)
            R = np.eye(3) if R is None else np.asarray(R, np.float64)
        else:
            R = np.eye(3)
        uvw = np.asarray(self.window_origin if window_origin is None else window_origin, np.float64).reshape(3)
        M, pos, Z = cube_input(crystal, grid, self.model.representation, R, uvw)
        cond = float(M.max()) if self.model.config.conditional else None  # Sec. 4.5: its own maximum
        mu, logvar = self.model.encode(M, cond)
        z = self.model.refine(M, mu, cond, progress=progress)  # mu itself when refinement is off
        M_hat, L_hat = self.model.decode_fields(z, cond)
        # a field refined to the input's Eq. 1 heights: Z from the fitted amplitudes
        atoms = self.model.segment(M_hat, refined=not np.array_equal(z, mu), light=L_hat)
        lattice_model = self.model.representation == "repeating_lattice"
        return Reconstruction(crystal, R, pos, Z, M, mu, logvar, M_hat, atoms,
                              summarise(pos, Z, atoms, M, M_hat), uvw.copy() if lattice_model else np.zeros(3), z)

    def set_window_origin(self, uvw) -> Reconstruction | None:
        """Move the repeating-lattice window: the cell's fractional point ``uvw`` (3,) goes to
        the cube's corner (wrapped into [0, 1)); the current crystal is reconstructed again
        when the model is a repeating-lattice one (returned), else None.

        Raises:
            ValueError: ``uvw`` is not three finite numbers.
        """
        uvw = np.asarray(uvw, np.float64).reshape(-1)
        if uvw.shape != (3,) or not np.all(np.isfinite(uvw)):
            raise ValueError(f"the window origin must be three finite fractional coordinates, not {uvw.tolist()}")
        self.window_origin = np.mod(uvw, 1.0)
        if self.current is not None and self.model.representation == "repeating_lattice":
            return self.reconstruct(self.current.crystal, self.current.rotation)
        return None

    def set_current(self, rec: Reconstruction) -> None:
        """Make ``rec`` the current reconstruction; the explored z becomes its ``mu``."""
        self.current = rec
        self.z = np.array(rec.z, np.float32)
        self._emit("reconstruction", rec)

    # ------------------------------------------------------------------ latent state
    def reset_latent_state(self) -> None:
        """Forget z, the endpoints and keyframes that no longer fit the model (another latent size)."""
        n = self.model.latent
        if self.z is not None and self.z.shape != (n,):
            self.z = None
        self.path.resize(n)

    def natural_cond(self) -> float | None:
        """Conditioning value when the user sets none: for a conditional model the current
        crystal's largest input density (Eq. 1 units; None before any, i.e. the model's
        reference); None for an unconditional model."""
        if not self.model.config.conditional or self.current is None:
            return None
        return float(self.current.M.max())

    def cond_between(self, t: float) -> float | None:
        """For a conditional model: the largest input densities of endpoints A and B
        interpolated linearly at ``t`` (Eq. 1 units); None for an unconditional model or
        when an endpoint has no encoded crystal."""
        c = self._endpoint_maxima()
        return None if c is None else float((1.0 - t) * c[0] + t * c[1])

    def endpoint_conds(self, n: int) -> np.ndarray | None:
        """:meth:`cond_between` at ``n`` evenly spaced t from 0 to 1, (n,) float32 (what an
        A -> B export conditions on when the user sets no value), or None."""
        c = self._endpoint_maxima()
        return None if c is None else np.linspace(c[0], c[1], int(n), dtype=np.float32)

    def _endpoint_maxima(self) -> tuple[float, float] | None:
        return self.path.endpoint_maxima() if self.model.config.conditional else None

    def set_latent(self, z: np.ndarray) -> np.ndarray:
        """Set the explored latent vector (copied, float32); observers get ``("latent", z)``.

        Raises:
            ValueError: ``z`` is not a (latent,) vector of finite numbers.
        """
        z = latent_vector(z, self.model.latent)
        self.z = z
        self._emit("latent", z)
        return z

    def reconstruct(self, crystal: Crystal, rotation: np.ndarray | None = None) -> Reconstruction:
        """:meth:`compute` then make it the current reconstruction (observers are told)."""
        rec = self.compute(crystal, rotation)
        self.set_current(rec)
        return rec

    def decode(self, z: np.ndarray, cond: float | None = None, segment: bool = True) -> Frame:
        """Decode one latent vector (and segment it unless ``segment`` is False, at the model's
        :attr:`~crystalstudio.core.checkpoint.CrystalModel.draw_gate`: a latent with no input
        to compare against); thread-safe."""
        if segment:
            M_hat, atoms = self.model.decode_segment(z, cond)
        else:
            M_hat, atoms = self.model.decode(z, cond), Atoms.empty()
        return Frame(np.asarray(z, np.float32), M_hat, atoms,
                     readouts(atoms, M_hat, self.model.grid.peak_scale))

    def open(self, path: str | os.PathLike) -> Reconstruction:
        """Read a structure file (CIF, POSCAR) and reconstruct it.

        Raises:
            StructureError: one line naming the file and the problem.
        """
        return self.reconstruct(self.read(path))

    def read(self, path: str | os.PathLike, block: int | None = None) -> Crystal:
        """Read a structure file for this session's model; a cell that fits the cube in no
        orientation switches a unit-cell session to the bundled repeating-lattice checkpoint
        (any cell fills its cube), and ``crystal.meta["note"]`` says so.

        Raises:
            StructureError: one line naming the file and the problem (also when the cell
                does not fit and no repeating-lattice checkpoint is available).
        """
        crystal, model = self.read_for_model(path, block)
        if model is not None:
            self.set_model(model)
        return crystal

    def read_for_model(self, path: str | os.PathLike, block: int | None = None) -> tuple[Crystal, CrystalModel | None]:
        """What :meth:`read` does, without changing the session (safe in a worker thread):
        the crystal, and the repeating-lattice model (loaded, the session's atoms method)
        when the cell fits this unit-cell model's cube in no orientation, else None. A cell
        that fits only in some orientations stays with the unit-cell model and is reconstructed
        in one of them (:meth:`compute`; its ``meta["note"]`` says so). The caller swaps the
        model in (the GUI does so on its own thread).

        Raises:
            StructureError: as :meth:`read`.
            CheckpointError: the repeating-lattice checkpoint does not load.
        """
        from .core.density import fits_in_cube
        from .io.structures import StructureError, read_structure

        model = self.model
        crystal = read_structure(path, model.grid, require_fit=False, block=block)
        if model.representation != "unit_cell" or fits_in_cube(crystal, model.grid):
            return crystal, None
        why = crystal.meta.get("fit_reason", "the cell does not fit the cube")
        R = fitting_rotation(crystal, model.grid)
        if R is not None:
            crystal.meta["fit_rotation"], crystal.meta["fit_grid"] = R, model.grid.length  # for compute
            how = "as oriented in the file" if np.array_equal(R, np.eye(3)) else "rotated to fit"
            crystal.meta["note"] = (f"the cell fits the {model.grid.length:g} Å cube only in some orientations: "
                                    f"reconstructed {how}")
            return crystal, None
        lattice = lattice_checkpoint()
        if lattice is None:
            raise StructureError(Path(path).name, f"{why}, and no repeating-lattice checkpoint is available")
        other = load_checkpoint(lattice, self.device)
        other.atoms_method = model.atoms_method
        crystal.meta["note"] = f"{why}: switched to the repeating-lattice model {lattice.name}"
        return crystal, other
