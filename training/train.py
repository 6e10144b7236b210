"""Joint training of the beta-VAE and the attention U-Net (Eq. 2 + Eq. 3).

One readable loop: draw a batch of crystals, voxelise them on the device with a fresh
random rotation each (representation 1), encode/decode, segment the decoded field, and
step one Adam optimiser on ``L_VAE + L_U-Net``. The U-Net's cross entropy reaches the
decoder times gamma (Eq. 2) and the U-Net at full weight (Eq. 3) through one pass
(:func:`crystalstudio.core.models.scale_grad`).

Checkpoints (safetensors, <= 16 MiB) are written every ``save_every_min`` minutes and at
the end, with the held-out (test split) measures and the latent ranking in their metadata.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from crystalstudio.core.checkpoint import save_checkpoint
from crystalstudio.core.density import Grid, random_rotations
from crystalstudio.core.models import CrystalNet, ModelConfig, count_parameters, scale_grad, unet_loss, vae_loss

from .data import CrystalArrays, voxelise
from .evaluate import evaluate, format_table


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/mp.npz"            # prepared by `python -m training prepare`
    out: str = "runs/model.safetensors"  # checkpoint path
    log: str = ""                        # CSV of losses (default: next to out)
    # optimisation (paper: Adam, lr 1e-5, batch 24; a larger lr converges far sooner here)
    steps: int = 3000
    minutes: float = 0.0                 # wall-clock budget; 0 = steps only
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    beta: float = 0.01                   # KL weight in Eq. 2
    gamma: float = 0.1                   # segmentation weight in Eq. 2 (paper 0.1)
    background_weight: float = 1.0       # cross-entropy weight of the no-atom class
    # runtime
    device: str = "auto"
    threads: int = 0                     # torch CPU threads (0 = torch default)
    seed: int = 0
    eval_every: int = 250
    eval_n: int = 48                     # validation crystals per periodic check
    test_n: int = 0                      # test crystals for the final table (0 = all)
    save_every_min: float = 5.0
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    init: str = ""                       # start from this checkpoint's weights (resume / fine-tune)


def _lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    frac = step / max(cfg.steps, 1)
    if cfg.minutes > 0:
        frac = max(frac, elapsed / (60 * cfg.minutes))
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(cfg: TrainConfig) -> dict:
    """Train and write the checkpoint; returns the final held-out measures."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = CrystalArrays.load(cfg.data)
    raw = np.load(cfg.data, allow_pickle=False)["grid"]
    grid = Grid(int(raw[0]), float(raw[1]), float(raw[2]), float(raw[3]))
    train_idx, val_idx, test_idx = data.indices("train"), data.indices("val"), data.indices("test")
    zmax = int(data.Z.max())
    mcfg = ModelConfig(**{"grid_n": grid.n, "n_classes": max(95, zmax + 1), **cfg.model})
    prior_steps = 0
    if cfg.init:
        from crystalstudio.core.checkpoint import load_checkpoint

        init = load_checkpoint(cfg.init)
        if init.grid != grid:
            raise ValueError(f"{cfg.init}: trained on {init.grid}, the data are on {grid}")
        net = init.net.to(device)
        mcfg = net.cfg
        prior_steps = int(init.info.get("training", {}).get("steps", 0))
    else:
        net = CrystalNet(mcfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(cfg.log or out.with_suffix(".csv"))
    print(f"device {device}, {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test crystals, "
          f"{count_parameters(net)} parameters", flush=True)
    meta_base = {
        "representation": "unit_cell",
        "beta": cfg.beta,
        "gamma": cfg.gamma,
        "training": {"config": asdict(cfg), "sources": data.sources, "n_train": int(len(train_idx)),
                     "n_val": int(len(val_idx)), "n_test": int(len(test_idx)),
                     "split": "by reduced formula (sha1 hash), test never trained on",
                     "test_ids_sha1": __import__("hashlib").sha1(
                         "\n".join(sorted(map(str, data.ids[test_idx]))).encode()).hexdigest()},
    }
    t0 = time.time()
    last_save = t0
    step = 0
    with open(log_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "seconds", "lr", "loss", "recon", "kl", "seg_ce", "val_atoms_within", "val_species"])
        while step < cfg.steps and (cfg.minutes <= 0 or time.time() - t0 < 60 * cfg.minutes):
            lr = _lr_at(cfg, step, time.time() - t0)
            for g in opt.param_groups:
                g["lr"] = lr
            b = rng.choice(train_idx, size=cfg.batch, replace=len(train_idx) < cfg.batch)
            M, S, _, _ = voxelise(data, b, grid, random_rotations(len(b), rng), device)
            net.train()
            M_hat, mu, logvar = net.vae(M)
            logits = net.unet(scale_grad(M_hat, cfg.gamma))
            ce = unet_loss(logits, S, cfg.background_weight)
            L = vae_loss(M, M_hat, mu, logvar, None, cfg.beta, cfg.gamma)
            opt.zero_grad(set_to_none=True)
            (L["loss"] + ce).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
            opt.step()
            step += 1
            row = [step, round(time.time() - t0, 1), f"{lr:.2e}", f"{(L['loss'] + ce).item():.4f}",
                   f"{L['recon'].item():.4f}", f"{L['kl'].item():.2f}", f"{ce.item():.4f}", "", ""]
            if step % cfg.eval_every == 0 and len(val_idx):
                r = evaluate(net, data, val_idx[: cfg.eval_n], grid, seed=1, device=device)
                row[-2:] = [f"{r['atoms_within_tol']:.4f}", f"{r['species_accuracy']:.4f}"]
                print(f"step {step} {row[1]}s loss {row[3]} recon {row[4]} kl {row[5]} ce {row[6]} | val atoms "
                      f"{r['atoms_within_tol']:.3f} count {r['exact_count']:.3f} species {r['species_accuracy']:.3f}",
                      flush=True)
            elif step % 25 == 0:
                print(f"step {step} {row[1]}s loss {row[3]} recon {row[4]} kl {row[5]} ce {row[6]}", flush=True)
            w.writerow(row)
            fh.flush()
            if time.time() - last_save > 60 * cfg.save_every_min:
                save_checkpoint(out, net, grid, {**meta_base, "training": {**meta_base["training"], "steps": prior_steps + step}})
                last_save = time.time()
    idx = test_idx[: cfg.test_n] if cfg.test_n else test_idx
    res = evaluate(net, data, idx, grid, seed=0, device=device)
    metrics = {k: v for k, v in res.items() if k not in ("latent_kl", "latent_rank")}
    metrics["split"] = "test"
    meta = {**meta_base, "metrics": metrics, "latent_rank": res["latent_rank"], "latent_kl": res["latent_kl"]}
    meta["training"].update(steps=prior_steps + step, init=cfg.init or None, samples=step * cfg.batch, seconds=round(time.time() - t0),
                            device=str(device), torch=torch.__version__)
    save_checkpoint(out, net.cpu(), grid, meta)
    print(format_table(metrics), flush=True)
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return metrics
