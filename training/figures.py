"""PNG figures of an evaluation (the JSON of :mod:`training.evaluate`), after Hoffmann et al. 2019.

* ``counts.png`` (Fig. 3B/4D): true vs predicted atom count per crystal, with the diagonal
  and the ±2 band;
* ``distances.png`` (Fig. 3D/4C): nearest-atom distances true -> predicted and
  predicted -> true, with the 0.5 Å line;
* ``species.png`` (Fig. 3C/4E): matched atoms exact / within ±2 Z / wrong, and predicted
  vs true Z;
* ``voxel_mse.png`` (Fig. 4A): per-crystal voxel MSE with its percentiles;
* ``random_draws.png`` (Fig. 9A): nearest-neighbour spacing of segmented random draws
  z ~ N(0, I) against that of the real crystals (and their reconstructions).

Everything is drawn from the result dict alone, so figures can be redrawn from a saved
JSON: ``python -m training.figures eval.json --out figs/``. matplotlib is imported lazily
and only through its Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["make_figures", "FIGURES"]

FIGURES = ("counts", "distances", "species", "voxel_mse", "random_draws", "error_budget")
BLUE, ORANGE, RED, GREY = "#1f77b4", "#ff7f0e", "#d62728", "#7f7f7f"


def _new(ncols: int = 1, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _no_data(ax, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color=GREY)


def _pc(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _suptitle(fig, res: dict, what: str) -> None:
    ck = Path(str(res.get("checkpoint", ""))).name
    fig.suptitle(f"{what} — {ck}, {res.get('split', '?')} split, {res.get('n_crystals', 0)} crystals", fontsize=9)


def _counts(res: dict, path: Path) -> None:
    fig, (ax,) = _new()
    c = res.get("counts", {})
    pairs = np.asarray(c.get("pairs", []), float).reshape(-1, 2)
    if len(pairs):
        u, n = np.unique(pairs, axis=0, return_counts=True)
        ax.scatter(u[:, 0], u[:, 1], s=12 + 18 * np.sqrt(n), alpha=0.6, color=BLUE, edgecolor="none",
                   label="crystals (size = how many)")
        top = max(pairs.max(), 1) + 1
        t = np.array([0, top])
        ax.plot(t, t, color="k", lw=1, label="predicted = true")
        ax.fill_between(t, t - 2, t + 2, color=GREY, alpha=0.15, label="±2 atoms")
        ax.set_xlim(0, top)
        ax.set_ylim(0, max(top, pairs[:, 1].max() + 1))
        ax.legend(fontsize=7, loc="upper left")
    else:
        _no_data(ax)
    ax.set_xlabel("true number of atoms")
    ax.set_ylabel("predicted number of atoms")
    ax.set_title(f"exact {_pc(c.get('exact'))}, within ±2 {_pc(c.get('within2'))} (paper ~90%, 97%)", fontsize=8)
    _suptitle(fig, res, "Atom counts (Fig. 3B/4D)")
    fig.savefig(path)


def _distances(res: dict, path: Path) -> None:
    fig, (ax,) = _new(width=6.0)
    d = res.get("distances", {})
    tol = d.get("tol_A", res.get("tol_A", 0.5))
    drawn = False
    for key, label, color in (("true_to_pred", "true → nearest predicted", BLUE),
                              ("pred_to_true", "predicted → nearest true", ORANGE)):
        h = d.get(key, {}).get("hist")
        if not h or not sum(h["counts"]):
            continue
        ax.stairs(h["counts"], h["edges"], color=color, lw=1.5,
                  label=f"{label} (n={d[key]['n']}, within {tol} Å {_pc(d[key]['within_tol'])}, "
                        f"> {h['edges'][-1]} Å: {h['overflow']})")
        drawn = True
    if drawn:
        ax.axvline(tol, color=RED, ls="--", lw=1, label=f"{tol} Å")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no atoms on one side")
    ax.set_xlabel("distance to the nearest atom of the other set (Å)")
    ax.set_ylabel("atoms")
    _suptitle(fig, res, "Nearest-atom distances (Fig. 3D/4C)")
    fig.savefig(path)


def _species(res: dict, path: Path) -> None:
    fig, (a1, a2) = _new(2, 4.5)
    s = res.get("species", {})
    if s.get("n_matched"):
        exact, within2, wrong = s["exact"], s["within2"], s["wrong"]
        vals = [exact, within2 - exact, wrong]
        bars = a1.bar(["exact", "±1–2 Z", "wrong (>2)"], vals, color=[BLUE, ORANGE, RED])
        for b, v in zip(bars, vals):
            a1.text(b.get_x() + b.get_width() / 2, v, f"{100 * v:.1f}%", ha="center", va="bottom", fontsize=8)
        a1.set_ylim(0, 1.1)
        a1.set_title(f"{s['n_matched']} matched atoms (paper: 66% exact, 98% within ±2)", fontsize=8)
        p = np.asarray(s.get("pairs", []), float).reshape(-1, 3)
        a2.scatter(p[:, 0], p[:, 1], s=8 + 20 * np.sqrt(p[:, 2]), alpha=0.6, color=BLUE, edgecolor="none")
        top = max(p[:, :2].max(), 1) + 2
        a2.plot([0, top], [0, top], color="k", lw=1)
        a2.set_xlim(0, top)
        a2.set_ylim(0, top)
    else:
        _no_data(a1, "no matched atoms")
        _no_data(a2, "no matched atoms")
    a1.set_ylabel("fraction of matched atoms")
    a2.set_xlabel("true Z")
    a2.set_ylabel("predicted Z (nearest atom)")
    acc = s.get("voxel_top1_accuracy_atoms")
    a2.set_title(f"voxel top-1 accuracy on atom voxels {_pc(acc)}", fontsize=8)
    _suptitle(fig, res, "Species (Fig. 3C/4E)")
    fig.savefig(path)


def _voxel_mse(res: dict, path: Path) -> None:
    fig, (ax,) = _new()
    v = res.get("voxel_mse_stats", {})
    h = v.get("hist")
    if h and sum(h["counts"]):
        ax.stairs(h["counts"], h["edges"], color=BLUE, fill=True, alpha=0.6)
        ax.set_xscale("log")
        for p, ls in (("5", ":"), ("50", "-"), ("95", "--")):
            x = v["percentiles"].get(p)
            if x:
                ax.axvline(x, color=RED, ls=ls, lw=1, label=f"{p}th percentile {x:.2e}")
        ax.legend(fontsize=7)
        if h.get("underflow"):
            ax.text(0.02, 0.95, f"{h['underflow']} crystals with MSE 0", transform=ax.transAxes, fontsize=7)
    else:
        _no_data(ax, f"all {h['underflow']} crystals have MSE 0" if h and h.get("underflow") else "no data")
    ax.set_xlabel("voxel MSE per crystal (Eq. 1 units)")
    ax.set_ylabel("crystals")
    _suptitle(fig, res, "Reconstruction error (Fig. 4A)")
    fig.savefig(path)


def _random_draws(res: dict, path: Path) -> None:
    fig, (ax,) = _new(width=6.0)
    r = res.get("random_draws", {})
    h = r.get("nn_hist")
    drawn = False
    if h:
        edges = np.asarray(h["edges"])
        for key, label, color, ls in (("draws", f"random draws z ~ N(0, 1) (n={r.get('n')})", BLUE, "-"),
                                      ("real", "real crystals", RED, "-"),
                                      ("reconstructed", "reconstructions", GREY, ":")):
            c = np.asarray(h.get(key, []), float)
            if c.sum():
                ax.stairs(c / c.sum() / np.diff(edges), edges, color=color, ls=ls, lw=1.5, label=label)
                drawn = True
    if drawn:
        close = r.get("close_A", 0.5)
        ax.axvline(close, color="k", ls="--", lw=1, label=f"{close} Å")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no interatomic distances")
    apd = (r.get("atoms_per_draw") or {}).get("mean")
    if r.get("n"):
        ax.set_title(f"draws with atoms closer than {r.get('close_A', 0.5)} Å: "
                     f"{_pc(r.get('frac_draws_with_close_pair'))}, empty: {_pc(r.get('frac_empty'))}, "
                     f"atoms per draw: {'n/a' if apd is None else f'{apd:.1f}'}", fontsize=8)
    ax.set_xlabel("nearest-neighbour distance (Å)")
    ax.set_ylabel("density")
    _suptitle(fig, res, "Random latent samples (Fig. 9A)")
    fig.savefig(path)


def _error_budget(res: dict, path: Path) -> None:
    fig, (ax,) = _new(width=6.0)
    eb = res.get("error_budget") or {}
    if eb:
        names = list(eb)
        x = np.arange(len(names))
        for k, (key, label, col) in enumerate((("atoms_within_tol", "atoms within 0.5 Å", BLUE),
                                                ("exact_count", "exact count", ORANGE),
                                                ("species_accuracy", "species exact", RED))):
            v = [eb[n].get(key) for n in names]
            ax.bar(x + (k - 1) * 0.27, [100 * (u or 0) for u in v], 0.27, color=col, label=label)
            for xi, u in zip(x, v):
                ax.text(xi + (k - 1) * 0.27, 100 * (u or 0) + 1, "-" if u is None else f"{100 * u:.0f}",
                        ha="center", fontsize=6)
        ax.set_xticks(x, [n.replace("_", " ") for n in names], fontsize=7)
        ax.set_ylim(0, 110)
        ax.legend(fontsize=7, loc="upper right")
    else:
        _no_data(ax)
    ax.set_ylabel("%")
    ax.set_title("peaks of the true M | U-Net on the true M | the model (U-Net on M_hat)", fontsize=8)
    _suptitle(fig, res, "Error budget")
    fig.savefig(path)


def make_figures(res: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNG figures of an evaluation result into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, f in zip(FIGURES, (_counts, _distances, _species, _voxel_mse, _random_draws,
                                  _error_budget)):
        path = out / f"{name}.png"
        f(res, path)
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="result JSON of python -m training.evaluate")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    a = p.parse_args(argv)
    try:
        res = json.loads(Path(a.json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {a.json}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for f in make_figures(res, a.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
