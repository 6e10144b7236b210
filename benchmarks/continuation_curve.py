"""Where continuing the CPU recipe leads: validation mean against CPU-hours, and two projections.

Each point is one continuation of the default checkpoint (docs/cpu_recipe.md), measured on the
whole validation split (165 crystals) by

    python -m training evaluate --checkpoint CKPT --data data/mp.npz --split val --draws 0 [--json J]

where "mean" is the mean of atoms within 0.5 Å, exact count and species exact (the three
floors of issue 13: 0.99, 0.90 and 0.66, mean 0.85). Pass the JSONs as NAME=HOURS=PATH, where
HOURS is the cumulative one-thread CPU-hours of the CPU recipe at that checkpoint (from the
checkpoints' recorded training seconds). NAME=HOURS=PATH=SERIES names the series; by default it
is "multi-start refinement" when the JSON's refine_lr holds several rates, else "one rate".
`--include docs/continuation.json` puts the recorded points first; with no points and no
`--include`, the recorded points alone are used. Two fits per series of three or more points
project the hours to the floor's mean: a straight line in hours (optimistic: the rate so far
holds) and a straight line in log-hours (each doubling of the CPU time gains the same). Prints a
table; writes a JSON and a PNG.

    python benchmarks/continuation_curve.py --out docs/continuation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

FLOOR_MEAN = (0.99 + 0.90 + 0.66) / 3
MIN_POINTS = 3  # a series is projected from three points or more; two give a line through both


def _point(spec: str) -> dict:
    try:
        name, hours, path, *series = spec.split("=", 3)
        d = json.loads(Path(path).read_text())
        point = {"name": name, "cpu_hours": float(hours), "refine_lr": d.get("refine_lr"),
                 "atoms": d["atoms_within_tol"], "count": d["exact_count"], "species": d["species_accuracy"],
                 "source": path}
    except (ValueError, KeyError, OSError) as e:
        raise SystemExit(f"{spec}: expected NAME=HOURS=EVALUATION.json[=SERIES] ({e})")
    if series:
        point["series"] = series[0]
    return point


def projections(points: list[dict], series: str) -> dict:
    """Least-squares lines of the mean against hours and log-hours over one series' points;
    the hours at which each reaches the floor's mean (None when the slope is not positive)."""
    pts = [p for p in points if p["series"] == series]
    h = np.array([p["cpu_hours"] for p in pts])
    m = np.array([p["mean"] for p in pts])
    out = {"series": series, "points": len(pts)}
    for kind, x in (("linear", h), ("log", np.log(h))):
        slope, icpt = np.polyfit(x, m, 1)
        reach = (FLOOR_MEAN - icpt) / slope if slope > 0 else None
        out[kind] = {"slope_per_" + ("hour" if kind == "linear" else "ln_hour"): float(slope),
                     "hours_to_floor": None if reach is None else float(reach if kind == "linear" else math.exp(reach))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("points", nargs="*", help="NAME=HOURS=EVALUATION.json (default: docs/continuation.json)")
    ap.add_argument("--out", default="", help="write OUT.json and OUT.png")
    ap.add_argument("--include", default="", help="an earlier OUT.json whose points come first (their "
                    "evaluation JSONs need not exist any more)")
    a = ap.parse_args(argv)
    recorded = Path(__file__).resolve().parents[1] / "docs" / "continuation.json"
    include = a.include or ("" if a.points else recorded)
    points = json.loads(Path(include).read_text())["points"] if include else []
    points += [_point(s) for s in a.points]
    for p in points:
        p["mean"] = (p["atoms"] + p["count"] + p["species"]) / 3
        if "series" not in p:
            p["series"] = "multi-start refinement" if p.get("refine_lr") and len(p["refine_lr"]) > 1 else "one rate"
    print("| checkpoint | refinement | CPU-hours | atoms within 0.5 Å | exact count | species | mean |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['name']} | {p['series']} | {p['cpu_hours']:.1f} | {100 * p['atoms']:.1f}% | "
              f"{100 * p['count']:.1f}% | {100 * p['species']:.1f}% | {p['mean']:.3f} |")
    series = sorted({p["series"] for p in points})
    proj = [projections(points, s) for s in series if sum(q["series"] == s for q in points) >= MIN_POINTS]
    print(f"\nfloor mean {FLOOR_MEAN:.3f}; CPU-hours to reach it:")
    for pr in proj:
        lin, log = pr["linear"]["hours_to_floor"], pr["log"]["hours_to_floor"]
        print(f"  {pr['series']} ({pr['points']} points): straight line {lin and f'{lin:.0f}'} h, "
              f"log-hours {log and f'{log:.0f}'} h")
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps({"floor_mean": FLOOR_MEAN, "points": points,
                                                        "projections": proj}, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        hh = np.linspace(min(p["cpu_hours"] for p in points), 120, 300)
        for name, colour in zip(series, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            pts = [p for p in points if p["series"] == name]
            ax.plot([p["cpu_hours"] for p in pts], [p["mean"] for p in pts], "o-", color=colour,
                    label=f"{name} (val)")
            if len(pts) < MIN_POINTS:
                continue
            for kind, style in (("linear", "--"), ("log", ":")):
                x = np.array([p["cpu_hours"] for p in pts])
                xx = x if kind == "linear" else np.log(x)
                slope, icpt = np.polyfit(xx, [p["mean"] for p in pts], 1)
                ax.plot(hh, icpt + slope * (hh if kind == "linear" else np.log(hh)), style, color=colour, lw=1,
                        label=f"  {'straight line' if kind == 'linear' else 'line in log-hours'}")
        ax.axhline(FLOOR_MEAN, color="k", lw=0.8)
        ax.text(hh[-1], FLOOR_MEAN + 0.004, "paper floor (mean of 99 / 90 / 66%)", ha="right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("CPU-hours of the CPU recipe (one thread)")
        ax.set_ylabel("val mean of atoms, exact count, species")
        ax.set_ylim(0.6, 0.9)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("Continuing the default checkpoint: where it leads", fontsize=10)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
