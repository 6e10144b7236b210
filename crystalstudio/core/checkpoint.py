"""The one place checkpoints are saved and loaded.

A checkpoint is a single safetensors file (never pickle): the weights of
:class:`~crystalstudio.core.models.CrystalNet` plus one JSON metadata entry
(``"crystalstudio"``) holding everything needed to rebuild and trust the model:

``format``/``version``, ``model_config`` (:class:`ModelConfig`), ``grid`` (n, length Å,
sigma Å, species_radius Å, voxel-centre convention), ``representation``, ``classes``
(Z of each class index), ``beta``/``gamma``, ``training`` (data sets, counts, steps,
seed, wall time) and ``metrics`` (held-out Sec. 4.1 measures), ``latent_rank`` (latent
dimensions, most informative first, by mean KL on held-out crystals), and optionally
``prior`` (settings of an aggregate-posterior :class:`~crystalstudio.core.prior.LatentPrior`
whose arrays are the tensors named ``prior.*``).

Files stay <= 16 MiB so they can come back from the GPU machine: weights are stored
float32 when they fit, else bfloat16 (converted back to float32 on load).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .density import REPRESENTATIONS, Grid
from .models import CrystalNet, ModelConfig
from .prior import LatentPrior, PriorError
from .refine import REFINE_LR, REFINE_STEPS, learning_rates
from .segment import Atoms, species_map_to_atoms

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "attach_prior", "update_metadata",
           "weights_fingerprint", "held_out_measures", "evaluation_path", "CrystalModel", "FrozenNet", "FORMAT",
           "MAX_BYTES", "ATOM_METHODS", "DEFAULT_ATOMS_METHOD"]

FORMAT = "crystalstudio-checkpoint"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024
_REQUIRED = ("format", "version", "model_config", "grid", "representation", "classes", "training")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign or inconsistent. One-line message
    ``"<file>: <reason>"``."""


def save_checkpoint(path: str | os.PathLike, net: CrystalNet, grid: Grid, meta: dict,
                    prior: LatentPrior | None = None) -> Path:
    """Write ``net`` (and ``prior``) and its metadata to ``path`` (safetensors), atomically.

    Args:
        path: target file (``.safetensors``).
        net: the trained networks.
        grid: the grid the model was trained on.
        meta: extra metadata: ``representation`` (required), ``training``, ``metrics``,
            ``latent_rank``, ``beta``, ``gamma`` and anything JSON-serialisable.
        prior: an aggregate-posterior prior to store beside the weights (``prior.*``).

    Returns:
        The path written.

    Raises:
        CheckpointError: when even bfloat16 weights exceed 16 MiB.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return _write(path, state, net.cfg, grid, meta, prior)


def _write(path: Path, state: dict, cfg: ModelConfig, grid: Grid, meta: dict, prior: LatentPrior | None) -> Path:
    from safetensors.torch import save_file

    meta = {k: v for k, v in meta.items() if k != "prior"}
    if prior is not None:
        arrays, pmeta = prior.to_tensors()
        meta["prior"] = pmeta
        extra = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    else:
        extra = {}
    nbytes = sum(v.numel() * v.element_size() for v in [*state.values(), *extra.values()])
    dtype = "float32"
    if nbytes > MAX_BYTES - 65536:
        state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
        dtype = "bfloat16"
        if sum(v.numel() * v.element_size() for v in [*state.values(), *extra.values()]) > MAX_BYTES - 65536:
            raise CheckpointError(f"{path.name}: model too large for a 16 MiB checkpoint")
    info = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": cfg.to_dict(),
        "grid": {**grid.to_dict(), "voxel_centres": "(i + 0.5) * length / n"},
        "classes": list(range(cfg.n_classes)),
        "weights_dtype": dtype,
        "training": {},
        **meta,
    }
    if info.get("representation") not in REPRESENTATIONS:
        raise CheckpointError(f"{path.name}: representation must be one of {REPRESENTATIONS}")
    tmp = path.with_name(path.name + ".tmp")
    save_file({**state, **extra}, str(tmp), metadata={"crystalstudio": json.dumps(info)})
    os.chmod(tmp, 0o644)  # a shipped file, readable by all (safetensors writes 0600)
    os.replace(tmp, path)
    return path


def attach_prior(path: str | os.PathLike, prior: LatentPrior | None, out: str | os.PathLike | None = None,
                 updates: dict | None = None) -> Path:
    """Write the checkpoint ``path`` again to ``out`` (default: in place, atomically) with
    ``prior`` as its aggregate prior (None removes it); weights unchanged, metadata updated
    by ``updates`` as in :func:`update_metadata` (default: unchanged).

    Raises:
        CheckpointError: the checkpoint does not load, the prior is for another latent size,
            or ``updates`` touches a structural key.
    """
    updates = dict(updates or {})
    _check_updates(Path(path), updates)
    model = load_checkpoint(path, jit=False)
    if prior is not None and prior.latent != model.latent:
        raise _fail(Path(path), f"the prior is for a {prior.latent}-dimensional latent, the model has {model.latent}")
    return _rewrite(model, Path(path), Path(out or path), updates, prior)


def _check_updates(path: Path, updates: dict) -> None:
    bad = sorted(set(updates) & (_STRUCTURAL | {"prior", "representation"}))
    if bad:
        raise _fail(path, f"metadata key(s) {', '.join(bad)} cannot be changed")
    if updates.get("refine_lr") is not None:  # refuse here what the loader would refuse later
        try:
            learning_rates(updates["refine_lr"])
        except (TypeError, ValueError):
            raise _fail(path, f"metadata refine_lr must be positive numbers, got {updates['refine_lr']!r}") from None


#: metadata keys that describe the weights themselves (never copied or changed by a rewrite)
_STRUCTURAL = frozenset({"format", "version", "model_config", "grid", "classes", "weights_dtype"})


def _rewrite(model: "CrystalModel", path: Path, out: Path, updates: dict, prior: LatentPrior | None) -> Path:
    """``path``'s weights written to ``out`` with its metadata plus ``updates`` (None removes a key)."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("prior.")}
    meta = {k: v for k, v in model.info.items() if k not in _STRUCTURAL}
    for k, v in updates.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return _write(out, state, model.config, model.grid, meta, prior)


def update_metadata(path: str | os.PathLike, updates: dict, out: str | os.PathLike | None = None) -> Path:
    """Write the checkpoint ``path`` again to ``out`` (default: in place, atomically) with its
    metadata updated by ``updates`` (JSON-serialisable; a value None removes the key);
    weights and prior unchanged.

    Raises:
        CheckpointError: the checkpoint does not load, ``updates`` touches a structural key
            (format, version, model_config, grid, classes, weights_dtype, prior, representation),
            or gives a ``refine_lr`` the loader would refuse.
    """
    _check_updates(Path(path), updates)
    model = load_checkpoint(path, jit=False)
    return _rewrite(model, Path(path), Path(out or path), updates, model.prior)


def weights_fingerprint(path: str | os.PathLike, prior: bool = True) -> str:
    """SHA-256 (hex, 64 characters) of every tensor of the checkpoint ``path`` (network weights
    and the ``prior.*`` arrays): names in sorted order with their dtype, shape and raw bytes.
    ``prior`` False leaves the prior arrays out: the network alone (whether two files hold the
    weights of one training step, one of them with a prior fitted afterwards).

    The metadata is left out, so :func:`update_metadata` (a gate, the ``metrics``) keeps the
    fingerprint and an evaluation JSON that records it can be matched to the weights it
    measured; any change of a weight or of the prior changes it.

    Raises:
        CheckpointError: missing file or not a readable safetensors file.
    """
    import hashlib

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such checkpoint file")
    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(k for k in f.keys() if prior or not k.startswith("prior.")):
                t = f.get_tensor(name).contiguous().reshape(-1)
                h.update(f"{name}|{t.dtype}|{tuple(f.get_slice(name).get_shape())}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise _fail(path, f"not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    return h.hexdigest()


def evaluation_path(path: str | os.PathLike) -> Path:
    """Where a shipped checkpoint's test evaluation lies: ``assets/unit_cell.safetensors`` ->
    ``assets/unit_cell.metrics.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".metrics.json")


def held_out_measures(path: str | os.PathLike, info: dict | None = None) -> dict:
    """The held-out measures to show for the checkpoint ``path``: the top-level measures
    (:data:`~crystalstudio.core.metrics.MEASURE_KEYS`) of its test evaluation beside it
    (``<name>.metrics.json``, as ``python -m training ship`` writes it) when that JSON is a
    test evaluation naming this file, else the ``metrics`` of its metadata ``info`` (read from
    the file when not given). ``split`` says which split they are of.

    Returns:
        dict (empty when there are none). Never raises for an unreadable or foreign JSON: it is
        passed over.
    """
    from .metrics import MEASURE_KEYS

    path = Path(path)
    beside = evaluation_path(path)
    try:
        if beside.is_file() and beside.stat().st_size < 8 * 2**20:
            res = json.loads(beside.read_text())
            if (isinstance(res, dict) and res.get("split") == "test"
                    and Path(str(res.get("checkpoint", ""))).name == path.name
                    and isinstance(res.get("atoms_within_tol"), (int, float))):
                return {k: res[k] for k in MEASURE_KEYS if k in res}
    except (OSError, ValueError):
        pass
    if info is None:
        try:
            info = read_metadata(path)
        except CheckpointError:
            return {}
    m = info.get("metrics")
    return dict(m) if isinstance(m, dict) else {}


def _fail(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path.name}: {reason}")


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata dict, validated; no weights are read.

    Raises:
        CheckpointError: missing file, not a safetensors file, foreign or incomplete metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such checkpoint file")
    if path.stat().st_size > 4 * MAX_BYTES:
        raise _fail(path, f"file is {path.stat().st_size / 2**20:.0f} MiB, too large for a crystalstudio checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("crystalstudio")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _fail(path, f"not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if raw is None:
        raise _fail(path, "safetensors file without crystalstudio metadata (a foreign checkpoint?)")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _fail(path, "metadata does not describe a crystalstudio checkpoint")
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise _fail(path, f"metadata lacks {', '.join(missing)}")
    if info["version"] != VERSION:
        raise _fail(path, f"checkpoint version {info['version']} is not supported (expected {VERSION})")
    if info["representation"] not in REPRESENTATIONS:
        raise _fail(path, f"unknown representation {info['representation']!r}")
    return info


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    jit: bool | None = None) -> "CrystalModel":
    """Load and validate a checkpoint into a ready-to-use :class:`CrystalModel`.

    Validation: file readable as safetensors; metadata present and complete; grid and
    model config rebuild; the class list matches the U-Net head; every tensor the model
    needs is present with the right shape and no unexpected tensor is there; all weights
    are finite.

    ``jit``: see :class:`CrystalModel`.

    Raises:
        CheckpointError: with a one-line ``"<file>: <reason>"`` message.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_metadata(path)
    try:
        grid = Grid.from_dict(info["grid"])
        cfg = ModelConfig.from_dict(info["model_config"])
        if cfg.grid_n != grid.n:
            raise ValueError(f"model is for a {cfg.grid_n}^3 grid but the grid is {grid.n}^3")
        if list(info["classes"]) != list(range(cfg.n_classes)):
            raise ValueError("class list does not match the U-Net's output classes")
        net = CrystalNet(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise _fail(path, f"inconsistent metadata: {exc}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise _fail(path, f"weights unreadable ({str(exc).splitlines()[0][:120]})") from None
    try:
        prior = LatentPrior.from_tensors({k: v.float().numpy() for k, v in state.items() if k.startswith("prior.")},
                                         info.get("prior"))
        if prior is not None and prior.latent != cfg.latent:
            raise PriorError(f"prior is for a {prior.latent}-dimensional latent, the model has {cfg.latent}")
    except PriorError as exc:
        raise _fail(path, f"corrupt prior block: {exc}") from None
    if "species_prior" in info:
        from .fit import check_species_prior

        try:
            sp = info["species_prior"]
            check_species_prior(sp["counts"] if isinstance(sp, dict) else None, cfg.n_classes)
        except (ValueError, KeyError, TypeError) as exc:
            raise _fail(path, f"corrupt species prior: {exc}") from None
    state = {k: v for k, v in state.items() if not k.startswith("prior.")}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise _fail(path, f"weights do not match the model ({what})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise _fail(path, f"tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
        if state[k].is_floating_point():
            if not torch.isfinite(state[k].float()).all():
                raise _fail(path, f"tensor {k} holds NaN or infinite values")
            state[k] = state[k].to(v.dtype)
    net.load_state_dict(state)
    model = CrystalModel(net, grid, info, path, device, jit=jit)
    model.prior = prior
    return model


def decoded_fields(vae, z: torch.Tensor) -> torch.Tensor:
    """The decoder's outputs stacked: z (B, latent) -> (B, C, n, n, n), channel 0 M_hat and, for
    a decoder with a light channel (``ModelConfig.light_channel``), channel 1 the light-atom
    field L_hat."""
    M, L = vae.decode_fields(z)
    return M.unsqueeze(1) if L is None else torch.stack([M, L], 1)


class FrozenNet:
    """The decoder and the U-Net traced and frozen for inference (``torch.jit.trace`` +
    ``torch.jit.freeze``: BatchNorm folded into the convolutions, constants inlined; on the
    CPU also ``optimize_for_inference``: oneDNN convolutions with pre-packed weights).

    Same results as the eager modules to float32 rounding (relative 1e-6; see
    ``benchmarks/bench_decode.py``), about 3x faster per 30^3 frame on a 2-core CPU.

    Attributes:
        fields: z (B, latent) -> (B, C, n, n, n) as :func:`decoded_fields` (unconditioned;
            scale z first for Sec. 4.5).
        decode: z (B, latent) -> M_hat (B, n, n, n), channel 0 of ``fields``.
        unet: M_hat (B, n, n, n) -> logits (B, K, n, n, n).
    """

    def __init__(self, net: CrystalNet, device: torch.device):
        class _Decode(torch.nn.Module):
            def __init__(self, vae):
                super().__init__()
                self.vae = vae

            def forward(self, z):
                return decoded_fields(self.vae, z)

        import warnings

        z0 = torch.zeros(1, net.cfg.latent, device=device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 points to torch.compile
            M0 = net.vae.decode(z0)
            self.fields = torch.jit.freeze(torch.jit.trace(_Decode(net.vae).eval(), z0, check_trace=False))
            self.unet = torch.jit.freeze(torch.jit.trace(net.unet.eval(), M0, check_trace=False))
            if device.type == "cpu":
                self.fields = torch.jit.optimize_for_inference(self.fields)
                self.unet = torch.jit.optimize_for_inference(self.unet)
            for _ in range(2):  # the JIT profiles the first calls
                self.unet(self.decode(z0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent) -> M_hat (B, n, n, n)."""
        return self.fields(z)[:, 0]


#: ways of reading atoms from a decoded field (see CrystalModel.segment_batch)
ATOM_METHODS = ("fit", "unet")
#: the default: the Eq. 1 fit (README, "Atoms from a field", says why)
DEFAULT_ATOMS_METHOD = "fit"


def _jit_default(device: torch.device) -> bool:
    env = os.environ.get("CRYSTALSTUDIO_JIT", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    return device.type == "cpu" or env in ("1", "true", "yes", "on")


class CrystalModel:
    """A loaded model ready for inference (CPU or GPU); thread-safe.

    Args:
        net, grid, info, path, device: the network, its grid, the checkpoint metadata, the
            file it came from and the torch device.
        jit: decode and segment through a traced, frozen copy of the decoder and U-Net
            (built on first use, ~2 s; 3x faster on the CPU). None: on for the CPU unless
            the environment sets ``CRYSTALSTUDIO_JIT=0``. ``encode`` stays eager. When the
            trace cannot be built the eager modules are used.

    Attributes:
        grid: :class:`Grid` the model works on.
        config: :class:`ModelConfig`.
        info: the checkpoint metadata.
        path: file it came from (None when built in memory).
        latent: size of z.
        net: the eager :class:`CrystalNet` (training-time modules).
        prior: the checkpoint's aggregate-posterior :class:`LatentPrior`, or None.
    """

    def __init__(self, net: CrystalNet, grid: Grid, info: dict, path: Path | None = None,
                 device: str | torch.device = "cpu", jit: bool | None = None):
        self.net = net.to(device).eval()
        self.grid = grid
        self.info = info
        self.path = path
        self.device = torch.device(device)
        self.config = net.cfg
        self.latent = net.cfg.latent
        self._lock = threading.Lock()
        self.jit = _jit_default(self.device) if jit is None else bool(jit)
        self._frozen: FrozenNet | None = None
        self.jit_error: str | None = None  # why the traced path could not be built
        #: how atoms are read from a decoded field: "fit" (Eq. 1 least squares) or "unet"
        self.atoms_method: str = DEFAULT_ATOMS_METHOD
        self.prior: LatentPrior | None = None
        #: Adam steps of latent refinement after encoding a field (:meth:`refine`); 0: the
        #: encoder's mean alone (the paper's path)
        #: (the checkpoint's own ``refine_steps`` when its metadata has one)
        self.refine_steps: int = self.default_refine_steps
        #: Adam learning rate(s) of the refinement; several are a multi-start
        #: (:func:`~crystalstudio.core.refine.refine_latent`): the checkpoint's ``refine_lr``
        #: metadata (a number or a list) when it has one, else (REFINE_LR,)
        self.refine_lr: tuple[float, ...] = self.default_refine_lr
        for key in ("unet_gate", "draw_gate"):  # a damaged gate is refused when loading, not when used
            raw = info.get(key, 0.0)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
                where = Path(path).name if path else "checkpoint"
                raise CheckpointError(f"{where}: metadata {key} must be a number from 0 to 1, got {raw!r}")
        for key in ("draw_light", "light_subtract", "lattice_fold"):
            if not isinstance(info.get(key, True), bool):
                where = Path(path).name if path else "checkpoint"
                raise CheckpointError(f"{where}: metadata {key} must be true or false, got {info[key]!r}")

    @property
    def unet_gate(self) -> float:
        """The U-Net probability of "an atom" below which a fitted atom is dropped
        (:func:`~crystalstudio.core.fit.combine_with_unet`): the checkpoint's own
        ``unet_gate`` (chosen on its validation split by ``python -m training choose-gate``),
        else :data:`~crystalstudio.core.fit.UNET_GATE`."""
        from .fit import UNET_GATE

        return float(self.info.get("unet_gate", UNET_GATE))

    @property
    def draw_gate(self) -> float:
        """The gate of fields decoded from a latent with no input to compare against (random
        draws, interpolation midpoints, the latent explorer's frames): the checkpoint's
        ``draw_gate`` (chosen by ``python -m training choose-gate --draws N`` on training data:
        the gate whose draws' atom counts come closest to the training crystals'), else
        :attr:`unet_gate`. A reconstruction is judged against its input, a draw by whether it
        looks like a crystal, so the two gates may differ."""
        return float(self.info.get("draw_gate", self.unet_gate))

    @property
    def draw_light(self) -> bool:
        """Whether fields decoded from a latent with no input (as :attr:`draw_gate`) take the
        light atoms of their light-atom field L_hat: the checkpoint's ``draw_light``, chosen
        with the draw gate by ``python -m training choose-gate --draws N`` (the pair whose
        draws' atom counts and light-atom counts come closest to the training crystals'),
        else True. A reconstruction always takes them: its latent was refined to fit the
        input's L, a draw's was not."""
        return bool(self.info.get("draw_light", True))

    @property
    def light_subtract(self) -> bool:
        """Whether the heavy atoms of a field decoded from a refined latent with a light-atom field
        L_hat are fitted on M_hat - L_hat / ``light_gain`` (:func:`~crystalstudio.core.light.heavy_field`),
        so that a light atom's density does not inflate a heavy neighbour's amplitude
        (:func:`~crystalstudio.core.light.decoded_atoms`): the checkpoint's ``light_subtract``,
        else False (the reading its shipped metrics were measured with)."""
        return bool(self.info.get("light_subtract", False))

    @property
    def lattice_fold(self) -> bool:
        """Whether the atoms of a decoded repeating-lattice field are read from the field averaged
        over its own lattice's images (:func:`~crystalstudio.core.lattice_fold.fold_decoded`): the
        checkpoint's ``lattice_fold`` (chosen on its validation split), else False; always False
        for representation 1."""
        return self.representation == "repeating_lattice" and bool(self.info.get("lattice_fold", False))

    @property
    def species_prior(self) -> np.ndarray | None:
        """(n_classes,) float64 counts of each Z among the training crystals' atoms (metadata
        ``species_prior``, written by ``python -m training fit-prior``), or None. Read by
        :func:`~crystalstudio.core.fit.species_from_amplitude` for refined fields."""
        sp = self.info.get("species_prior")
        return None if sp is None else np.asarray(sp["counts"], np.float64)

    @property
    def reading(self) -> dict:
        """How this checkpoint's fields are read into atoms, as an evaluation JSON records it:
        ``representation``, ``latent``, ``unet_gate``, ``draw_gate``, ``draw_light``,
        ``light_subtract``, ``lattice_fold``, ``refine_lr`` (list) and ``species_prior`` (whether it
        has one). ``python -m training ship`` refuses a JSON whose reading differs from the file's."""
        return {"representation": self.representation, "latent": self.latent, "unet_gate": self.unet_gate,
                "draw_gate": self.draw_gate, "draw_light": self.draw_light, "light_subtract": self.light_subtract,
                "lattice_fold": self.lattice_fold, "refine_lr": list(self.refine_lr),
                "species_prior": self.species_prior is not None}

    def _modules(self):
        """(fields(z) -> (B, C, n, n, n) as :func:`decoded_fields`, unet(M)) to use; call with
        the lock held."""
        if self.jit and self._frozen is None and self.jit_error is None:
            try:
                self._frozen = FrozenNet(self.net, self.device)
            except Exception as exc:  # noqa: BLE001 - an unusual torch build: stay eager
                self.jit_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if self.jit and self._frozen is not None:
            return self._frozen.fields, self._frozen.unet
        return (lambda z: decoded_fields(self.net.vae, z)), self.net.unet

    @property
    def default_refine_steps(self) -> int:
        """Refinement steps this checkpoint asks for: its metadata's ``refine_steps``, else
        :data:`~crystalstudio.core.refine.REFINE_STEPS` (what "refinement on" means)."""
        return int(self.info.get("refine_steps", REFINE_STEPS)) or REFINE_STEPS

    @property
    def default_refine_lr(self) -> tuple[float, ...]:
        """Refinement learning rate(s) this checkpoint asks for: its metadata's ``refine_lr``
        (one number or a list: a multi-start), else (:data:`~crystalstudio.core.refine.REFINE_LR`,).

        Raises:
            CheckpointError: a ``refine_lr`` that is not positive numbers.
        """
        raw = self.info.get("refine_lr", REFINE_LR)
        try:
            return learning_rates(raw)
        except ValueError:
            where = Path(self.path).name if self.path else "checkpoint"
            raise CheckpointError(f"{where}: metadata refine_lr must be positive numbers, got {raw!r}") from None

    @property
    def representation(self) -> str:
        """``"unit_cell"`` or ``"repeating_lattice"`` (the paper's representation 1 or 2), from the
        checkpoint's metadata."""
        return self.info["representation"]

    @property
    def latent_rank(self) -> list[int]:
        """Latent dimensions, most informative first (held-out mean KL), or 0..latent-1."""
        r = self.info.get("latent_rank")
        return list(r) if r and len(r) == self.latent else list(range(self.latent))

    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, np.float32), device=self.device)

    @torch.no_grad()
    def encode(self, M: np.ndarray, cond: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior of one field: M (n, n, n) float32 -> (mu, logvar), each (latent,) float32."""
        with self._lock:
            c = None if cond is None else self._t([cond])
            mu, logvar = self.net.vae.encode(self._t(M)[None], c)
        return mu[0].cpu().numpy(), logvar[0].cpu().numpy()

    def refine(self, M: np.ndarray, z0: np.ndarray, cond: float | None = None, steps: int | None = None,
               progress=None) -> np.ndarray:
        """The encoder's latent polished so that the decoder reproduces ``M``
        (:func:`~crystalstudio.core.refine.refine_latent`, semi-amortised inference); with a
        light channel, M and its light-atom field (:func:`~crystalstudio.core.light.refine_problem`).

        Args:
            M: (n, n, n) float32 field (Eq. 1 units); z0: (latent,) start (the encoder's mu).
            cond: a conditional model's largest density (Eq. 1 units); None: its reference.
            steps: Adam steps; None takes :attr:`refine_steps`; 0 returns z0.
            progress: ``progress(done, steps)`` after each step; True stops early.

        Returns:
            (latent,) float32. The decoder's weights are not changed.
        """
        from .light import refine_problem
        from .refine import frozen, refine_latent

        steps = self.refine_steps if steps is None else int(steps)
        z0 = np.asarray(z0, np.float32).reshape(-1)
        if steps <= 0:
            return z0.copy()
        vae = self.net.vae
        c = None if (cond is None or not self.config.conditional) else self._t([cond])
        decode, target = refine_problem(vae, self._t(M)[None], self.grid)  # [M, L] with a light channel
        with self._lock, frozen(vae):
            z = refine_latent(decode, target, self._t(z0)[None], steps, self.refine_lr, progress=progress, cond=c)
        return z[0].cpu().numpy()

    def decode(self, z: np.ndarray, cond: float | None = None) -> np.ndarray:
        """z (latent,) or (B, latent) -> M_hat (n, n, n) or (B, n, n, n) float32, Eq. 1 units.

        ``cond``: target largest density of a conditional model (Sec. 4.5, Eq. 1 units), one
        value or one per row of z; None decodes at its reference scale; ignored by an
        unconditional model.

        Raises:
            ValueError: ``cond`` has another length than z.
        """
        return self.decode_fields(z, cond)[0]

    @property
    def has_light(self) -> bool:
        """Whether the decoder draws a light-atom field L beside M (``ModelConfig.light_channel``)."""
        return bool(getattr(self.config, "light_channel", False))

    @torch.no_grad()
    def decode_fields(self, z: np.ndarray, cond: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """As :meth:`decode`, returning ``(M_hat, L_hat)``: L_hat the light-atom field of the
        same shape (:mod:`crystalstudio.core.light`), or None for a decoder without one."""
        z = np.asarray(z, np.float32)
        single = z.ndim == 1
        zt = self._t(z.reshape(-1, self.latent))
        if self.config.conditional and cond is not None:  # what DensityVAE.decode does first
            c = np.asarray(cond, np.float32).reshape(-1)
            if c.size not in (1, len(zt)):
                raise ValueError(f"cond has {c.size} values for {len(zt)} latent vectors")
            zt = zt * (self._t(c) / self.config.cond_scale)[:, None]
        with self._lock:
            fields, _ = self._modules()
            step = self._step()
            out = torch.cat([fields(zt[s:s + step]) for s in range(0, len(zt), step)]).float().cpu().numpy()
        M = out[:, 0]
        L = out[:, 1] if out.shape[1] > 1 else None
        if single:
            return M[0], (None if L is None else L[0])
        return M, L

    @torch.no_grad()
    def logits(self, M_hat: np.ndarray) -> np.ndarray:
        """U-Net class scores: M_hat (n, n, n) -> (K, n, n, n) float32."""
        with self._lock:
            _, unet = self._modules()
            return unet(self._t(M_hat)[None])[0].float().cpu().numpy()

    def segment(self, M_hat: np.ndarray, method: str | None = None, refined: bool = False,
                gate: float | None = None, light: np.ndarray | None = None) -> Atoms:
        """Atoms of a decoded field by ``method`` (default :attr:`atoms_method`): see
        :meth:`segment_batch`; ``light`` (n, n, n) its light-atom field or None."""
        return self.segment_batch(np.asarray(M_hat)[None], method, refined, gate,
                                  None if light is None else np.asarray(light)[None])[0]

    def segment_batch(self, fields: np.ndarray, method: str | None = None, refined: bool = False,
                      gate: float | None = None, light: np.ndarray | None = None) -> list[Atoms]:
        """Atoms of each decoded field: (B, n, n, n) float32 -> B :class:`Atoms`.

        ``light`` (B, n, n, n) or None: the light-atom fields decoded beside them
        (:meth:`decode_fields`); with ``"fit"`` their atoms are merged in, and with
        :attr:`light_subtract` a refined field's heavy atoms are fitted on M_hat - L_hat / gain
        (:func:`~crystalstudio.core.light.decoded_atoms`).

        ``method`` (default :attr:`atoms_method`):

        * ``"fit"``: least-squares fit of Eq. 1 (:func:`~crystalstudio.core.fit.fit_atoms`
          with :data:`~crystalstudio.core.fit.DECODED_FIT`), species and gating by the
          U-Net's probabilities (:func:`~crystalstudio.core.fit.combine_with_unet`); atoms
          carry their fitted amplitude and its standard error. With ``refined=True`` (fields
          decoded from a refined latent, :meth:`refine`) Z is read from the amplitude
          (:func:`~crystalstudio.core.fit.species_from_amplitude`, with :attr:`species_prior`)
          and the U-Net only gates, at :data:`~crystalstudio.core.fit.REFINED_GATE`.
        * ``"unet"``: the paper's path (Sec. 4.2.2): U-Net argmax, connected components,
          majority vote, density-weighted centre of mass.

        With :attr:`lattice_fold` (repeating-lattice checkpoints) each field is first averaged
        over its own lattice's images, and the U-Net and the fit read that.

        One U-Net call per field on the traced path, else per 8 fields (each the faster there).

        Raises:
            ValueError: an unknown method.
        """
        from .light import decoded_atoms

        method = method or self.atoms_method
        if method not in ATOM_METHODS:
            raise ValueError(f"unknown atoms method {method!r} (one of {', '.join(ATOM_METHODS)})")
        fields = np.asarray(fields, np.float32)
        if self.lattice_fold:
            from .lattice_fold import fold_decoded

            fields = fold_decoded(fields, self.grid)
        prior = self.species_prior
        out: list[Atoms] = []
        s, n = 0, len(fields)
        while s < n:
            with self._lock, torch.no_grad():
                _, unet = self._modules()
                batch = self._step()
                logits = unet(self._t(fields[s:s + batch])).float()
                if method == "unet":
                    species = logits.argmax(1).cpu().numpy()
                else:
                    probs = torch.softmax(logits, 1).cpu().numpy()
            if method == "unet":
                out += [species_map_to_atoms(sp, self.grid, M) for sp, M in zip(species, fields[s:s + batch])]
            else:
                g = self.unet_gate if gate is None else float(gate)
                Ls = [None] * len(probs) if light is None else light[s:s + batch]
                out += [decoded_atoms(M, p, Lh, self.grid, self.config, self.representation, g, refined, prior,
                                      self.light_subtract)
                        for p, M, Lh in zip(probs, fields[s:s + batch], Ls)]
            s += batch
        return out

    def _step(self) -> int:
        """Fields per network call: 1 on the traced CPU path (its oneDNN kernels are
        fastest at batch 1), else 8 (eager batching amortises the per-call overhead)."""
        return 1 if self._frozen is not None and self.device.type == "cpu" else 8

    def decode_segment(self, z: np.ndarray, cond: float | None = None) -> tuple[np.ndarray, Atoms]:
        """z (latent,) -> (M_hat (n, n, n) float32, :class:`Atoms` read as a draw,
        :meth:`segment_draws`)."""
        M, L = self.decode_fields(z, cond)
        return M, self.segment_draws(M[None], None if L is None else L[None])[0]

    def segment_draws(self, fields: np.ndarray, light: np.ndarray | None = None,
                      method: str | None = None) -> list[Atoms]:
        """Atoms of fields decoded from latents with no input to compare against (random
        draws, interpolation frames, the explorer): :meth:`segment_batch` at
        :attr:`draw_gate`, with the light-atom fields ``light`` (B, n, n, n) only where
        :attr:`draw_light`. fields: (B, n, n, n) float32. Raises ValueError: an unknown method."""
        return self.segment_batch(fields, method, gate=self.draw_gate, light=light if self.draw_light else None)

