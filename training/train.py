"""Joint training of the beta-VAE and the attention U-Net (Eq. 2 + Eq. 3).

One readable loop: draw a batch of crystals, voxelise them on the device with a fresh
random rotation each (representation 1), encode/decode, segment the decoded field, and
step one Adam optimiser on ``L_VAE + L_U-Net``. The U-Net's cross entropy reaches the
decoder times gamma (Eq. 2) and the U-Net at full weight (Eq. 3) through one pass
(:func:`crystalstudio.core.models.scale_grad`).

Checkpoints (safetensors, <= 16 MiB) are written every ``save_every_min`` minutes and at
the end, with the held-out (test split) measures and the latent ranking in their metadata.
Beside each checkpoint ``<out>.optim.safetensors`` holds the Adam state (safetensors
tensors + JSON metadata: step, samples, seconds), so ``--resume`` continues a run where
its last checkpoint left it (same step count, learning-rate schedule and budgets).

At scale (the defaults of ``--amp`` and ``--channels-last`` are "on for CUDA and for a CPU
with native bf16, AMX or AVX-512 BF16 (:func:`cpu_bf16_fast`), off for other CPUs"; ``--gpu-batcher``
is on for CUDA only):

* ``--amp``: bf16 autocast of the networks; the losses are computed in float32.
* ``--channels-last``: channels-last-3d memory format of weights and inputs. On a 2-core
  Xeon with AMX, one thread, a VAE-only step takes 0.25-0.30 of the float32 time with both
  (batch 16 and 8; ``python benchmarks/bench_train.py --vae-only``), 0.39 on an AMD EPYC with
  AVX-512 BF16 (batch 8); on an AVX2-only CPU bf16
  is several times slower than float32, so the default there stays float32.
* ``--gpu-batcher``: the whole data set padded on the device, batches and rotations drawn
  there (:class:`training.batcher.GPUCrystalBatcher`); no Python loop per crystal.
* Multi-GPU: ``torchrun --standalone --nproc_per_node=N -m training train ...``
  (DistributedDataParallel, :mod:`training.dist`); ``--batch`` is per process.
* Per-step losses stay on the device and are copied to the host every 25 steps (CSV rows
  are still one per step), so the host does not wait for the GPU at every step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crystalstudio.core.checkpoint import save_checkpoint
from crystalstudio.core.density import Grid, light_field
from crystalstudio.core.models import CrystalNet, ModelConfig, count_parameters, scale_grad, unet_loss, vae_loss

from . import dist as tdist
from .data import CrystalArrays, cube_rotations, random_origins, voxelise
from .evaluate import evaluate, format_table

OPTIM_FORMAT = "crystalstudio-optimizer"


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/mp.npz"            # prepared by `python -m training prepare`
    out: str = "runs/model.safetensors"  # checkpoint path
    log: str = ""                        # CSV of losses (default: next to out)
    # optimisation (paper: Adam, lr 1e-5, batch 24; a larger lr converges far sooner here)
    steps: int = 3000
    minutes: float = 0.0                 # wall-clock budget; 0 = steps only
    batch: int = 16                      # per process (global batch = batch * world size under torchrun)
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"             # "cosine" (decay to 5% of lr) or "constant" (after warm-up)
    beta: float = 0.01                   # KL weight in Eq. 2
    gamma: float = 0.1                   # segmentation weight in Eq. 2 (paper 0.1)
    background_weight: float = 1.0       # cross-entropy weight of the no-atom class
    unet_true_frac: float = 0.0          # fraction of each batch the U-Net segments from the true M
                                         # (not the decoded one): teaches it sharp peaks early
    vae_only: bool = False               # train the VAE alone (no U-Net forward/backward: ~4x cheaper
                                         # per step at 30^3); atoms are read by the Eq. 1 fit
    unet_only: bool = False              # train the U-Net alone on the fields of a frozen VAE (its
                                         # decoded M_hat, and the true M for unet_true_frac of a batch)
    freeze_bn: bool = False              # the VAE's BatchNorm layers normalise with their running statistics
                                         # (frozen) while training, as the app decodes; their affine
                                         # weights still learn (a fine-tune of a trained VAE)
    peak_weight: float = 0.0             # peak-weighted MSE: voxel weight 1 + peak_weight * M / max(M)
    light_weight: float = 0.0            # light-atom MSE: + light_weight * min(4, (8 / Z)^2) on atom voxels of S
    light_channel: bool = False          # decoder's second output L (light atoms, Z <= 5, at gain 4; unit cell
                                         # only); added to a checkpoint without one (its head copied from M's)
    light_channel_weight: float = 1.0    # weight of L's summed squared error beside M's
    snapshot_every_min: float = 0.0      # also keep <out>.step<N>.safetensors this often (learning curve)
    # runtime
    device: str = "auto"
    threads: int = 0                     # torch CPU threads (0 = torch default)
    seed: int = 0
    eval_every: int = 250                # steps between validation logs; 0 = never
    eval_n: int = 48                     # validation crystals per periodic check
    test_n: int = 0                      # crystals for the final table (0 = all of final_split)
    final_split: str = "val"             # split of the final table: "val" (the default: a run never sees
                                         # test numbers unasked; shipped tables come from `evaluate`) or "test"
    save_every_min: float = 5.0
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    init: str = ""                       # start from this checkpoint's weights (resume / fine-tune)
    resume: bool = False                 # also restore optimizer + step from <init or out>.optim.safetensors
    init_optimizer: bool = False         # fine-tune: restore only the Adam moments of --init (new schedule, step 0)
    # speed (None = on for CUDA and AMX CPUs, off for other CPUs; gpu_batcher: CUDA only)
    amp: bool | None = None              # bf16 autocast (losses in float32); None: CUDA or a native-bf16 CPU
    channels_last: bool | None = None    # channels-last-3d memory format; None: as amp
    conditional: bool = False            # Sec. 4.5: condition the bottleneck on the largest density
    cond_jitter: float = 0.0             # conditional: scale each field M by exp(U(-j, j)) (Fig. 10B: the target sets the magnitude)
    cond_normalise: bool = False         # conditional: the encoder sees M scaled to the reference maximum (shape only), so z cannot carry the magnitude
    representation: str = "unit_cell"    # Sec. 3.1: "unit_cell" (1) or "repeating_lattice" (2)
    gpu_batcher: bool | None = None      # whole data set on the device, batches drawn there
    progress: bool | None = None         # tqdm bar (None = when stderr is a terminal)
    tensorboard: str = ""                # TensorBoard log folder (needs the tensorboard package)


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in evaluation mode: it normalises with its running
    mean and variance (which stop updating) while its affine weight and bias still learn, so the
    loss a step lowers is the loss of the network the app runs (``net.eval()``). Call after
    ``module.train()``, every step. Returns the number of layers frozen."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def cpu_bf16_fast() -> bool:
    """Whether this CPU runs bf16 3-D convolutions natively: AMX tile units (Intel Sapphire
    Rapids and later) or the AVX-512 BF16 instructions (AMD Zen 4 and later, Intel Cooper
    Lake). There torch's oneDNN runs a bf16 channels-last step several times faster than
    float32 (measured with ``python benchmarks/bench_train.py --vae-only --cpu-bf16 on``, one
    thread, batch 8: a VAE-only step at 0.25-0.30 of the float32 time on a Xeon with AMX, 0.39 on
    an AMD EPYC with AVX-512 BF16 and no AMX). Without either, bf16 convolutions are emulated:
    several times slower than float32 on this project's AVX2-only AMD, so training stays in
    float32 there. False when torch cannot tell (the probes are torch's
    ``torch.cpu._is_amx_tile_supported`` and ``torch.cpu._is_avx512_bf16_supported``)."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except RuntimeError:
            continue
    return False


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, else :func:`platform.processor`), recorded
    in a checkpoint's training block beside its seconds."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    frac = step / max(cfg.steps, 1)
    if cfg.minutes > 0:
        frac = max(frac, elapsed / (60 * cfg.minutes))
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.schedule == "constant":
        return cfg.lr * warm
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {cfg.schedule!r}")
    return cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class JointNet(nn.Module):
    """VAE + U-Net as one module (one ``forward`` for DistributedDataParallel).

    ``forward(M (B, 1, n, n, n), gamma) -> (M_hat, mu, logvar, logits)``; the U-Net sees
    the decoded field through :func:`scale_grad` (Eq. 2 and Eq. 3 in one pass).
    """

    def __init__(self, net: CrystalNet):
        super().__init__()
        self.net = net

    def forward(self, M: torch.Tensor, gamma: float, n_true: int = 0, vae_only: bool = False,
                unet_only: bool = False):
        """Returns ``(M_hat, mu, logvar, logits or None, L_hat or None)``."""
        if unet_only:  # the VAE frozen (no graph): the U-Net learns the fields the app will show it
            with torch.no_grad():
                M_hat, mu, logvar, L_hat = self.net.vae(M, light=True)
            u_in = M_hat.detach()
        else:
            M_hat, mu, logvar, L_hat = self.net.vae(M, light=True)
            if vae_only:
                return M_hat, mu, logvar, None, L_hat
            u_in = scale_grad(M_hat, gamma)
        if n_true > 0:  # the first n_true crystals: the U-Net segments the true field instead
            u_in = torch.cat([M[:n_true, 0].to(u_in.dtype), u_in[n_true:]])
        return M_hat, mu, logvar, self.net.unet(u_in), L_hat


def light_atom_weight(S: torch.Tensor, z_ref: float = 8.0, cap: float = 4.0) -> torch.Tensor:
    """Extra reconstruction weight of the voxels of light atoms: ``min(cap, (z_ref / Z)^2)`` on
    the atom voxels of the species matrix S (B, n, n, n) int64, 0 on background; float32.

    A Z-weighted field (Eq. 1) makes an atom's squared error scale with Z^2, so the plain MSE
    hardly sees H (Z = 1) or Li beside Ba: on the validation split of the shipped default the
    decoded-field fit missed 119 of 123 H atoms and 333 of 605 atoms with Z 3-9, against 27 of
    355 with Z >= 41. O gets 1, C 1.8, H and Li the cap, Fe about a tenth, Ba 0.02.
    """
    Zf = S.float()
    return torch.where(S > 0, torch.clamp((z_ref / Zf.clamp_min(1.0)) ** 2, max=cap), torch.zeros_like(Zf))


def forward_losses(model: nn.Module, M: torch.Tensor, S: torch.Tensor, cfg: TrainConfig, amp: bool = False,
                   channels_last: bool = False, L: torch.Tensor | None = None) -> dict:
    """One forward pass of :class:`JointNet` (or its DDP wrapper) and the losses in float32.

    ``L`` (B, n, n, n): the true light-atom field (:func:`~crystalstudio.core.density.light_field`)
    for a decoder with a light channel; its summed squared error, times
    ``cfg.light_channel_weight``, joins the loss as ``light``.

    Returns scalar tensors ``total`` (what is backpropagated), ``loss`` (Eq. 2 without the
    segmentation term, with the light term), ``recon``, ``kl``, ``ce`` (Eq. 3) and ``light``.
    """
    x = M.unsqueeze(1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(M.device.type, dtype=torch.bfloat16, enabled=amp):
        M_hat, mu, logvar, logits, L_hat = model(x, cfg.gamma, int(round(cfg.unet_true_frac * len(M))),
                                                 cfg.vae_only, cfg.unet_only)
    ce = (unet_loss(logits.float(), S, cfg.background_weight) if logits is not None
          else torch.zeros((), device=M.device))
    w = None
    if cfg.peak_weight:
        w = 1.0 + cfg.peak_weight * M / M.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    if cfg.light_weight:
        w = (1.0 if w is None else w) + cfg.light_weight * light_atom_weight(S)
    V = vae_loss(M, M_hat.float(), mu.float(), logvar.float(), None, cfg.beta, cfg.gamma, weight=w)
    light = torch.zeros((), device=M.device)
    if L is not None and L_hat is not None:
        light = (L_hat.float() - L).pow(2).flatten(1).sum(1).mean()
    loss = V["loss"] + cfg.light_channel_weight * light
    total = ce if cfg.unet_only else loss + ce
    return {"total": total, "loss": loss, "recon": V["recon"], "kl": V["kl"], "ce": ce, "light": light}


# ---------------------------------------------------------------- optimizer state (resume)

def optim_path(checkpoint: str | os.PathLike) -> Path:
    """``runs/model.safetensors`` -> ``runs/model.optim.safetensors``."""
    return Path(checkpoint).with_suffix(".optim.safetensors")


def save_train_state(checkpoint: str | os.PathLike, opt: torch.optim.Optimizer, info: dict) -> Path:
    """Write the optimizer state beside ``checkpoint``: tensors flattened to ``state.<param>.<name>``
    in safetensors, everything else (param groups, non-tensor state, ``info``) as JSON metadata.
    No pickle. Atomic (temporary file + rename)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    meta = {"format": OPTIM_FORMAT, "version": 1, "optimizer": type(opt).__name__,
            "param_groups": sd["param_groups"], "scalars": scalars, **info}
    return _write_optim(optim_path(checkpoint), tensors, meta)


def _write_optim(path: Path, tensors: dict, meta: dict) -> Path:
    """The side file: ``tensors`` in safetensors, ``meta`` as JSON metadata; atomic."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"crystalstudio_optim": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_train_state(checkpoint: str | os.PathLike) -> tuple[dict, dict]:
    """``(optimizer state_dict, info)`` from :func:`save_train_state`'s side file (or from
    :func:`compact_train_state`'s: its bfloat16 moments are returned in float32).

    Raises:
        FileNotFoundError: no side file beside ``checkpoint``.
        ValueError: the side file is not a crystalstudio optimizer state.
    """
    from safetensors import safe_open

    path = optim_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: no optimizer state beside {Path(checkpoint).name} to resume from")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("crystalstudio_optim", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != OPTIM_FORMAT:
        raise ValueError(f"{path.name}: not a crystalstudio optimizer state")
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        # moments stored smaller (compact_train_state) come back in float32
        state.setdefault(int(pid), {})[name] = v.float() if v.dtype in (torch.bfloat16, torch.float16) else v
    for key, v in meta.pop("scalars").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta.pop("param_groups")
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}, meta


def compact_train_state(run: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the optimizer state beside ``run`` (:func:`save_train_state`'s side file) again
    beside ``out``, its moment tensors (Adam's ``exp_avg``, ``exp_avg_sq``: one value per
    parameter) stored in ``dtype``, so that a shipped checkpoint can carry what a fine-tune
    needs (``--init out --init-optimizer``) at half the size. bfloat16 keeps float32's exponent
    range (no second moment underflows) and about 3 significant digits; step counters and
    scalars are copied exactly. :func:`load_train_state` reads it back in float32. Atomic.

    Returns:
        the written path, :func:`optim_path` of ``out``.

    Raises:
        FileNotFoundError: ``run`` has no optimizer state beside it.
        ValueError: the side file is not a crystalstudio optimizer state.
    """
    from safetensors import safe_open

    load_train_state(run)  # checks the format
    with safe_open(str(optim_path(run)), framework="pt") as f:
        info = json.loads((f.metadata() or {})["crystalstudio_optim"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # moments (one value per parameter) smaller; step counters (one value) exact
    tensors = {k: (v.to(dtype) if v.is_floating_point() and v.numel() > 1 else v).contiguous()
               for k, v in tensors.items()}
    info["moments_dtype"] = str(dtype).replace("torch.", "")
    return _write_optim(optim_path(out), tensors, info)


# ---------------------------------------------------------------- logging (master only)

class _Log:
    """CSV rows (one per step), console lines, tqdm bar and TensorBoard, on the master.

    Per-step statistics are kept as device tensors and copied to the host in one go at
    :meth:`flush`, so logging does not synchronise with the GPU at every step.
    """

    COLUMNS = ["step", "seconds", "lr", "loss", "recon", "kl", "seg_ce", "val_atoms_within", "val_species",
               "light"]

    def __init__(self, cfg: TrainConfig, path: Path, master: bool, start_step: int):
        self.master, self.pending, self.fh, self.bar, self.tb = master, [], None, None, None
        self.minutes = cfg.minutes > 0
        if not master:
            return
        keep = []
        if start_step and path.is_file():  # resuming: drop rows past the checkpoint, append
            with open(path, newline="") as fh:
                keep = [r for r in csv.reader(fh)][1:]
            keep = [r for r in keep if r and int(r[0]) <= start_step]
        self.fh = open(path, "w", newline="")
        self.w = csv.writer(self.fh)
        self.w.writerow(self.COLUMNS)
        self.w.writerows(keep)
        self.fh.flush()
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        if show:
            try:
                from tqdm import tqdm

                self.bar = (tqdm(total=round(60 * cfg.minutes), desc="train (s)", mininterval=1.0,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s{postfix}")
                            if self.minutes else
                            tqdm(total=cfg.steps, initial=start_step, unit="step", desc="train", mininterval=1.0))
            except ImportError:
                pass
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.tensorboard)
            except ImportError:
                self.say("tensorboard is not installed: --tensorboard ignored")

    def say(self, text: str) -> None:
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def add(self, step: int, seconds: float, lr: float, L: dict) -> None:
        if not self.master:
            return
        stats = torch.stack([L["total"], L["recon"], L["kl"], L["ce"], L.get("light", L["ce"] * 0)]).detach()
        self.pending.append((step, seconds, lr, stats))
        if self.bar is not None:
            self.bar.update(max(0, int(seconds) - self.bar.n) if self.minutes else 1)

    def flush(self, val: dict | None = None, echo: bool = True) -> None:
        """Write the pending rows; ``val`` (evaluation measures) goes on the last one."""
        if not self.master or not self.pending:
            return
        values = torch.stack([p[3] for p in self.pending]).float().cpu().tolist()
        for i, ((step, seconds, lr, _), (tot, rec, kl, ce, li)) in enumerate(zip(self.pending, values)):
            row = [step, round(seconds, 1), f"{lr:.2e}", f"{tot:.4f}", f"{rec:.4f}", f"{kl:.2f}", f"{ce:.4f}", "", "",
                   f"{li:.4f}"]
            if val is not None and i == len(values) - 1:
                row[7:9] = [f"{val['atoms_within_tol']:.4f}", f"{val['species_accuracy']:.4f}"]
            self.w.writerow(row)
            if self.tb is not None:
                for k, v in zip(("loss", "recon", "kl", "seg_ce"), (tot, rec, kl, ce)):
                    self.tb.add_scalar(f"train/{k}", v, step)
                self.tb.add_scalar("train/lr", lr, step)
        self.fh.flush()
        self.pending = []
        if self.bar is not None:
            self.bar.set_postfix(loss=row[3], refresh=False)
        line = f"step {row[0]} {row[1]}s loss {row[3]} recon {row[4]} kl {row[5]} ce {row[6]}"
        if li:
            line += f" light {row[9]}"
        if val is not None:
            line += (f" | val atoms {val['atoms_within_tol']:.3f} count {val['exact_count']:.3f} "
                     f"species {val['species_accuracy']:.3f}")
            if self.tb is not None:
                for k in ("atoms_within_tol", "exact_count", "species_accuracy"):
                    self.tb.add_scalar(f"val/{k}", val[k], row[0])
        if echo:
            self.say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
        if self.fh is not None:
            self.fh.close()


def reference_max_density(data: CrystalArrays, idx: np.ndarray, grid: Grid, rng: np.random.Generator,
                          n: int = 256) -> float:
    """Median largest density (Eq. 1 units) of ``n`` randomly rotated training crystals: the
    ``cond_scale`` of a conditional model (Sec. 4.5), so the bottleneck scale is about 1."""
    b = rng.choice(idx, size=min(n, len(idx)), replace=False)
    M, _, _, _ = voxelise(data, b, grid, cube_rotations(data, b, grid, rng), torch.device("cpu"))
    return float(M.flatten(1).amax(1).median())


def _seed(cfg: TrainConfig, rank: int, start_step: int) -> tuple[np.random.Generator, int]:
    """Per-rank (and, on resume, per-start-step) seeds; rank 0 of a fresh run uses ``cfg.seed`` as before."""
    if rank == 0 and start_step == 0:
        return np.random.default_rng(cfg.seed), cfg.seed
    ss = np.random.SeedSequence([cfg.seed, rank, start_step])
    return np.random.default_rng(ss), int(ss.generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------- training

def train(cfg: TrainConfig) -> dict:
    """Train and write the checkpoint; returns the final held-out measures (``{}`` on ranks > 0)."""
    info, device = tdist.setup(cfg.device)
    try:
        return _train(cfg, info, device)
    finally:
        tdist.cleanup()


def _train(cfg: TrainConfig, dinfo: tdist.DistInfo, device: torch.device) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = device.type == "cuda"
    fast_bf16 = cuda or (device.type == "cpu" and cpu_bf16_fast())
    amp = fast_bf16 if cfg.amp is None else cfg.amp
    channels_last = fast_bf16 if cfg.channels_last is None else cfg.channels_last
    use_batcher = (cuda if cfg.gpu_batcher is None else cfg.gpu_batcher) and cfg.representation == "unit_cell"
    master, world = dinfo.master, dinfo.world_size
    out = Path(cfg.out)
    source = cfg.init or (str(out) if cfg.resume else "")
    if cfg.init_optimizer and (cfg.resume or not cfg.init):
        raise ValueError("--init-optimizer needs --init and excludes --resume")
    state, saved = (load_train_state(source) if cfg.resume else (None, {}))
    if cfg.init_optimizer:  # the moments only: the step count, schedule and budgets start afresh
        state = load_train_state(cfg.init)[0]
    start_step = int(saved.get("step", 0))
    rng, torch_seed = _seed(cfg, dinfo.rank, start_step)
    torch.manual_seed(torch_seed)
    data = CrystalArrays.load(cfg.data)
    grid = CrystalArrays.load_grid(cfg.data)
    train_idx, val_idx, test_idx = data.indices("train"), data.indices("val"), data.indices("test")
    zmax = int(data.Z.max())
    mcfg = ModelConfig(**{"grid_n": grid.n, "n_classes": max(95, zmax + 1), **cfg.model})
    prior_steps = 0
    if source:
        from crystalstudio.core.checkpoint import load_checkpoint

        init = load_checkpoint(source)
        if init.grid != grid:
            raise ValueError(f"{source}: trained on {init.grid}, the data are on {grid}")
        net = init.net.to(device)
        mcfg = net.cfg
        ck_steps = int(init.info.get("training", {}).get("steps", 0))
        if cfg.resume:
            prior_steps = int(saved.get("prior_steps", 0))
            if prior_steps + start_step != ck_steps:
                raise ValueError(f"{optim_path(source).name} is at step {prior_steps + start_step} but "
                                 f"{Path(source).name} at step {ck_steps}: not saved together")
        else:
            prior_steps = ck_steps
    else:
        net = CrystalNet(mcfg).to(device)
    if cfg.conditional and not net.cfg.conditional:  # fresh, or fine-tuning an unconditional checkpoint
        net.cfg.conditional = True
        net.cfg.cond_scale = reference_max_density(data, train_idx, grid, rng)
        log_note = f", conditional on the largest density (reference {net.cfg.cond_scale:.3f})"
    else:
        log_note = ""
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if cfg.unet_only and cfg.vae_only:
        raise ValueError("--unet-only and --vae-only exclude each other")
    if cfg.cond_jitter < 0 or (cfg.cond_jitter > 0 and not net.cfg.conditional):
        raise ValueError("--cond-jitter must be >= 0 and needs a conditional model (--conditional)")
    if cfg.light_channel:
        if cfg.representation != "unit_cell":
            raise ValueError("--light-channel: unit cell representation only")
        net.vae.add_light_head()
    light = net.cfg.light_channel and not cfg.unet_only
    if light and use_batcher:
        raise ValueError("a light channel is trained with the CPU batcher (--no-gpu-batcher)")
    if cfg.cond_normalise:
        if not net.cfg.conditional:
            raise ValueError("--cond-normalise needs a conditional model (--conditional)")
        net.cfg.cond_normalise = True
    trained = net.unet if cfg.unet_only else net
    opt = torch.optim.Adam(trained.parameters(), lr=cfg.lr, **({"fused": True} if cuda else {}))
    if state is not None:
        flags = {k: opt.param_groups[0].get(k) for k in ("foreach", "fused", "capturable", "differentiable")}
        opt.load_state_dict(state)
        for g in opt.param_groups:
            g.update({k: v for k, v in flags.items() if k in g})
    model: nn.Module = JointNet(net)
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)
    batcher = gen = None
    if use_batcher:
        from .batcher import GPUCrystalBatcher

        batcher = GPUCrystalBatcher(data, grid, device, pool=train_idx)
        gen = torch.Generator(device).manual_seed(torch_seed)
    if master:
        out.parent.mkdir(parents=True, exist_ok=True)
    log = _Log(cfg, Path(cfg.log or out.with_suffix(".csv")), master, start_step)
    log.say(f"device {device} x {world}, {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test "
            f"crystals, {count_parameters(net)} parameters, amp {amp}, channels-last {channels_last}, "
            f"gpu batcher {use_batcher}" + log_note + (f", resumed at step {start_step}" if cfg.resume else ""))
    meta_base = {
        "representation": cfg.representation,
        "beta": cfg.beta,
        "gamma": cfg.gamma,
        "training": {"config": asdict(cfg), "sources": data.sources, "n_train": int(len(train_idx)),
                     "n_val": int(len(val_idx)), "n_test": int(len(test_idx)),
                     "split": "by reduced formula (sha1 hash), test never trained on",
                     "test_ids_sha1": hashlib.sha1(
                         "\n".join(sorted(map(str, data.ids[test_idx]))).encode()).hexdigest(),
                     # the machine that paid the seconds (learning curves compare CPU time)
                     "cpu": cpu_name(), "amp": amp, "channels_last": channels_last},
    }
    t0 = time.time() - float(saved.get("seconds", 0.0))
    clock = tdist.Clock(t0, dinfo, device)
    last_save = last_snap = time.time()
    step, samples = start_step, int(saved.get("samples", 0))

    def save(net_: CrystalNet, meta: dict) -> None:  # master only: checkpoint + optimizer state beside it
        meta = {**meta, "training": {**meta["training"], "steps": prior_steps + step, "samples": samples}}
        save_checkpoint(out, net_, grid, meta)
        save_train_state(out, opt, {"step": step, "prior_steps": prior_steps, "samples": samples,
                                    "seconds": round(time.time() - t0, 1), "world_size": world})

    try:
        while step < cfg.steps and (cfg.minutes <= 0 or clock(step) < 60 * cfg.minutes):
            lr = _lr_at(cfg, step, clock(step))
            for g in opt.param_groups:
                g["lr"] = lr
            if batcher is not None:
                M, S, _, _ = batcher(*batcher.sample(cfg.batch, gen))
            else:
                b = rng.choice(train_idx, size=cfg.batch, replace=len(train_idx) < cfg.batch)
                rots = cube_rotations(data, b, grid, rng, cfg.representation)
                origins = (random_origins(data, b, rots, rng) if cfg.representation == "repeating_lattice" else None)
                M, S, P, Zp = voxelise(data, b, grid, rots, device, cfg.representation, origins)
            if cfg.cond_jitter > 0:  # the same geometry at another magnitude: the condition must carry it
                s = np.exp(rng.uniform(-cfg.cond_jitter, cfg.cond_jitter, len(M)))
                M = M * torch.as_tensor(s, dtype=M.dtype, device=M.device).view(-1, 1, 1, 1)
            model.train()
            if cfg.unet_only:
                net.vae.eval()  # running BatchNorm statistics, as the app decodes
            elif cfg.freeze_bn:
                freeze_batchnorm(net.vae)
            Lt = (light_field(torch.as_tensor(P, device=device), torch.as_tensor(Zp, device=device), grid,
                              net.cfg.light_gain, net.cfg.light_z_max) if light else None)
            L = forward_losses(model, M, S, cfg, amp, channels_last, Lt)
            opt.zero_grad(set_to_none=True)
            L["total"].backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 100.0)
            opt.step()
            step += 1
            samples += cfg.batch * world
            log.add(step, time.time() - t0, lr, L)
            if master and cfg.eval_every > 0 and step % cfg.eval_every == 0 and len(val_idx):
                log.flush(val=evaluate(net, data, val_idx[: cfg.eval_n], grid, seed=1, device=device,
                                                  representation=cfg.representation))
            elif step % 25 == 0:
                log.flush()
            if master and time.time() - last_save > 60 * cfg.save_every_min:
                log.flush(echo=False)
                save(net, meta_base)
                last_save = time.time()
            if master and cfg.snapshot_every_min and time.time() - last_snap > 60 * cfg.snapshot_every_min:
                snap = out.with_name(f"{out.stem}.step{prior_steps + step}.safetensors")
                save_checkpoint(snap, net, grid, {**meta_base, "training": {
                    **meta_base["training"], "steps": prior_steps + step, "samples": samples,
                    "seconds": round(time.time() - t0, 1)}})
                last_snap = time.time()
        log.flush(echo=False)
    finally:
        log.close()
    if not master:
        return {}
    if cfg.final_split not in ("test", "val"):
        raise ValueError(f"final_split must be 'test' or 'val', not {cfg.final_split!r}")
    final_idx = test_idx if cfg.final_split == "test" else val_idx
    idx = final_idx[: cfg.test_n] if cfg.test_n else final_idx
    res = evaluate(net, data, idx, grid, seed=0, device=device, representation=cfg.representation)
    metrics = {k: v for k, v in res.items() if k not in ("latent_kl", "latent_rank")}
    metrics["split"] = cfg.final_split
    meta = {**meta_base, "metrics": metrics, "latent_rank": res["latent_rank"], "latent_kl": res["latent_kl"]}
    meta["training"].update(init=cfg.init or None, resumed_at=start_step if cfg.resume else None,
                            seconds=round(time.time() - t0, 1), device=str(device), world_size=world,
                            amp=amp, channels_last=channels_last, torch=torch.__version__)
    save(net.cpu(), meta)
    print(format_table(metrics), flush=True)
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return metrics
