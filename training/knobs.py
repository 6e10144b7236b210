"""Knob study: which training knob moves which measure (issue 5, "a table of what moved what").

Every variant is a short fine-tune from the same checkpoint, with the same seed, the same
number of steps and the same batches, that differs from a baseline in exactly one knob of
Hoffmann et al. 2019 (Eq. 2: beta, gamma; Adam learning rate and schedule) or Court et al.
2020 (Table 5), or one of ours (cross-entropy weight of the empty class, the fraction of
each batch the U-Net segments from the true field). Each is then measured on the
validation split (never on the test split, which stays for the shipped numbers), and the
table gives each measure's change against the baseline in points::

    python -m training knobs --data data/mp.npz --init assets/unit_cell.safetensors \\
        --steps 200 --out runs/knobs [--only beta_x10,gamma_1] [--threads 1]

Writes ``<out>/<variant>.safetensors`` and ``.json`` per variant (reused on a second run,
so an interrupted study resumes), ``<out>/knobs.json`` and ``<out>/knobs.md`` (the table).

Knobs that change the data (sigma, the ionic-radius sigma of Court et al.) or the network's
shape (U-Net width) cannot start from a checkpoint trained without them: they need a run
from scratch each, which is GPU work (see the README's training commands).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from .train import TrainConfig, train

#: (name, what changes, TrainConfig overrides); the first row is the baseline.
VARIANTS: list[tuple[str, str, dict]] = [
    ("baseline", "lr 3e-4 cosine, beta 0.01, gamma 0.1, empty-class weight 0.3, U-Net on true M 25%", {}),
    ("seed_1", "none: the baseline with seed 1 (the noise floor of this table)", {"seed": 1}),
    ("beta_x10", "beta 0.01 -> 0.1 (KL weight, Eq. 2)", {"beta": 0.1}),
    ("beta_div10", "beta 0.01 -> 0.001 (the paper's beta/10, Fig. 12)", {"beta": 0.001}),
    ("gamma_0.33", "gamma 0.1 -> 0.33 (segmentation loss into the decoder, Eq. 2; the paper's other value)",
     {"gamma": 0.33}),
    ("lr_1e-3", "learning rate 3e-4 -> 1e-3", {"lr": 1e-3}),
    ("lr_constant", "cosine decay -> constant 3e-4 (schedule)", {"schedule": "constant"}),
    ("bg_weight_1", "cross-entropy weight of the empty class 0.3 -> 1", {"background_weight": 1.0}),
    ("unet_true_0", "U-Net on the true M 25% -> 0% of each batch", {"unet_true_frac": 0.0}),
]

#: measures of the table: (key in the metrics, column title, scale to points)
MEASURES = [
    ("atoms_within_tol", "atoms ≤0.5 Å", 100),
    ("exact_count", "count exact", 100),
    ("species_accuracy", "species exact", 100),
    ("species_within2", "species ±2 Z", 100),
    ("median_error_A", "median error Å", 1),
    ("voxel_mse", "voxel MSE ×1e3", 1000),
]


def run_study(base: TrainConfig, out: Path, only: list[str] | None = None) -> list[dict]:
    """Train and measure each variant (skipping those already measured in ``out``).

    Returns:
        list of ``{"name", "change", "overrides", "metrics"}``: ``start`` (the ``base.init``
        checkpoint itself, when there is one), then the variants in :data:`VARIANTS` order.
    Raises:
        ValueError: an unknown variant name in ``only``.
    """
    names = [v[0] for v in VARIANTS]
    bad = sorted(set(only or []) - set(names))
    if bad:
        raise ValueError(f"unknown knob variant(s) {', '.join(bad)}; known: {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if base.init:  # the starting checkpoint itself, measured the same way: what fine-tuning changed at all
        start_path = out / "start.json"
        if start_path.exists():
            start = json.loads(start_path.read_text())
        else:
            start = measure_checkpoint(base.init, base.data, base.device)
            start_path.write_text(json.dumps(start, indent=1))
        rows.append({"name": "start", "change": "no fine-tuning: the starting checkpoint", "overrides": {},
                     "metrics": start})
    for name, change, over in VARIANTS:
        if only and name not in only and name != "baseline":
            continue
        res_path = out / f"{name}.json"
        if res_path.exists():
            metrics = json.loads(res_path.read_text())
        else:
            cfg = replace(base, out=str(out / f"{name}.safetensors"), final_split="val", test_n=0, **over)
            metrics = train(cfg)
            res_path.write_text(json.dumps(metrics, indent=1))
        rows.append({"name": name, "change": change, "overrides": over, "metrics": metrics})
    return rows


def measure_checkpoint(path: str, data_path: str, device: str = "auto") -> dict:
    """The validation table of a checkpoint exactly as :func:`training.train.train` measures
    a finished run with ``final_split="val"`` (same crystals, rotations and seed)."""
    from crystalstudio.core.checkpoint import load_checkpoint

    from .data import CrystalArrays
    from .evaluate import evaluate

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_checkpoint(path, dev, jit=False)
    data = CrystalArrays.load(data_path)
    res = evaluate(model.net, data, data.indices("val"), model.grid, seed=0, device=dev,
                   representation=model.representation)
    metrics = {k: v for k, v in res.items() if k not in ("latent_kl", "latent_rank")}
    metrics["split"] = "val"
    return metrics


def _value(m: dict, key: str):
    return m.get(key)


def format_markdown(rows: list[dict], base: TrainConfig) -> str:
    """The table: baseline values, then each variant's change against it (points, Å, 1e-3)."""
    head = "| variant | change | " + " | ".join(t for _, t, _ in MEASURES) + " |"
    lines = [head, "|" + "---|" * (len(MEASURES) + 2)]
    ref = next(r for r in rows if r["name"] == "baseline")
    b = ref["metrics"]
    for r in rows:
        cells = []
        for key, _, scale in MEASURES:
            v, v0 = _value(r["metrics"], key), _value(b, key)
            if v is None:
                cells.append("n/a")
            elif r is ref or v0 is None:
                cells.append(f"{v * scale:.2f}" if key != "median_error_A" else f"{v:.3f}")
            else:
                d = (v - v0) * scale
                cells.append(f"{d:+.2f}" if key != "median_error_A" else f"{d:+.3f}")
        lines.append(f"| {r['name']} | {r['change']} | " + " | ".join(cells) + " |")
    n = b.get("n_crystals", "?")
    lines.append("")
    lines.append(f"Each variant: {base.steps} steps of batch {base.batch} fine-tuned from `{base.init}`, seed "
                 f"{base.seed}, measured on the {n} validation crystals. The baseline row gives values, the "
                 "others (the starting checkpoint too) the change against it (percentage points; Å; 1e-3 for the MSE). Lower is better "
                 "for the median error and the MSE.")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/mp.npz", help="prepared .npz (python -m training prepare)")
    p.add_argument("--init", default="assets/unit_cell.safetensors", help="checkpoint every variant starts from")
    p.add_argument("--out", default="runs/knobs", help="folder for the variants' checkpoints and the table")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="baseline learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default="", help="comma-separated variant names (the baseline always runs)")


def run(a: argparse.Namespace) -> list[dict]:
    base = TrainConfig(data=a.data, init=a.init, steps=a.steps, batch=a.batch, lr=a.lr, warmup=10,
                       seed=a.seed, threads=a.threads, device=a.device, unet_true_frac=0.25, background_weight=0.3,
                       eval_every=10 ** 9, save_every_min=10 ** 6, progress=False)
    out = Path(a.out)
    rows = run_study(base, out, [s for s in a.only.split(",") if s] or None)
    (out / "knobs.json").write_text(json.dumps(rows, indent=1))
    md = format_markdown(rows, base)
    (out / "knobs.md").write_text(md)
    print(md, flush=True)
    return rows


__all__ = ["VARIANTS", "MEASURES", "run_study", "measure_checkpoint", "format_markdown", "add_arguments", "run"]
