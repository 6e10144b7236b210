"""Learning curves: validation accuracy against CPU time and samples seen (issue 13).

``python -m training curve --run "LABEL=GLOB[,GLOB...]" [--run ...] --out curve.json --png curve.png``

Each ``--run`` is one recipe: the checkpoints it left (its snapshots
``<out>.step<N>.safetensors`` and final checkpoints, or the commits of a shipped one), in
any order. Every checkpoint is measured on the same crystals of one split (default ``val``)
with the same rotations (``--seed``) and the same atom reader (``--atoms``, default
``fit-amplitude``: the Eq. 1 fit with Z from its amplitude, so a VAE-only run whose U-Net
was never trained is measured the same way as a joint one).

**CPU time** is core-seconds: a checkpoint's training metadata gives the wall seconds of
its run segment, the torch threads it used and the samples it drew; the cost of one step
of that segment is ``seconds * threads / steps_in_segment``. Within a run the points are
chained in step order: the first point costs ``steps * cost`` (exactly ``seconds *
threads`` for a run from scratch), each next one adds ``(steps - previous steps) * cost``
of its own segment. A fine-tune therefore continues the curve of the run it started from
when that run's checkpoints are listed in the same ``--run``; listed alone, its steps before
its first segment are charged at that segment's cost per step, unless ``--own-time LABEL``
starts the run's axis at zero where its first segment began (the fine-tune's own minutes).
Wall seconds count the whole process (data, voxelisation, periodic evaluation), so a run that
shared its cores is charged for the wait: the comparison errs against the slower-looking recipe.

``--include earlier.json`` carries over the runs of an earlier output of this command
(measured on another day, perhaps on another CPU, whose checkpoints are gone): its points
are kept as they are and drawn beside the new runs. It must have been measured the same way
(split, seed, limit, atom reader), else it is refused.

Measures are cached in ``--cache`` (keyed by file size, mtime, split, seed, limit and atom
reader), so adding a snapshot re-measures only that one.

Output: a JSON with every point and, per run, the measures interpolated at 15, 30 and 60
CPU-minutes and the CPU time at which ``--reach`` (atoms within 0.5 Å) is first met; a PNG
with four panels (atoms within 0.5 Å, exact count, species, voxel MSE against CPU hours).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["checkpoint_cost", "chain_points", "measure", "curve", "include_runs", "plot_curve", "add_arguments",
           "run"]

MEASURES = ("atoms_within_tol", "exact_count", "species_accuracy", "voxel_mse")
MILESTONES_MIN = (15, 30, 60)


def checkpoint_cost(meta: dict) -> dict:
    """Training bookkeeping of one checkpoint's metadata.

    Args:
        meta: the checkpoint's ``crystalstudio`` metadata (``training`` block as written by
            :func:`training.train.train`).

    Returns:
        dict: ``steps`` (total optimizer steps of the weights), ``segment_steps`` (steps of
        the run segment that wrote it), ``batch`` (global), ``threads``, ``seconds`` (wall
        seconds of the segment) and ``cpu_per_step`` (core-seconds per step).

    Raises:
        ValueError: the metadata has no training block with steps, samples and seconds.
    """
    t = meta.get("training") or {}
    cfg = t.get("config") or {}
    try:
        steps, samples, seconds = int(t["steps"]), int(t["samples"]), float(t["seconds"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("no training steps/samples/seconds in its metadata") from None
    batch = int(cfg.get("batch", 8)) * int(t.get("world_size") or 1)
    threads = int(cfg.get("threads") or 0) or (os.cpu_count() or 1)
    seg = max(1, round(samples / max(batch, 1)))
    return {"steps": steps, "segment_steps": seg, "batch": batch, "threads": threads, "seconds": seconds,
            "cpu_per_step": seconds * threads / seg}


def chain_points(costs: list[dict], own_time: bool = False) -> list[dict]:
    """Cumulative ``cpu_seconds`` and ``samples`` of a run's points (see the module docstring).

    A checkpoint's own cost is its segment's wall seconds x threads (the segment began at step
    ``steps - segment_steps``, from its ``--init`` or from scratch); it is added to the
    cumulative cost at the segment's first step: that of the point there, or of the last
    earlier point plus the missing steps at this segment's average cost per step.

    Args:
        costs: :func:`checkpoint_cost` dicts (any order; each may carry other keys).
        own_time: count from the step where the earliest segment began (a fine-tune's own
            cost and samples; the run it started from is not charged), not from step 0.

    Returns:
        The dicts sorted by ``steps``, each with ``cpu_seconds`` (float, core-seconds) and
        ``samples`` (int) added. Points at the same step keep the first.
    """
    out: list[dict] = []
    origin = min((max(0, c["steps"] - c["segment_steps"]) for c in costs), default=0) if own_time else 0
    for c in sorted(costs, key=lambda c: c["steps"]):
        if out and c["steps"] == out[-1]["steps"]:
            continue
        start = max(0, c["steps"] - c["segment_steps"])
        before = [p for p in out if p["steps"] <= start]
        p = before[-1] if before else {"steps": origin, "cpu_seconds": 0.0, "samples": 0}
        base = p["cpu_seconds"] + (start - p["steps"]) * c["cpu_per_step"]
        samples = p["samples"] + (c["steps"] - p["steps"]) * c["batch"]
        out.append({**c, "cpu_seconds": base + c["seconds"] * c["threads"], "samples": samples})
    return out


def _key(path: str, split: str, seed: int, limit: int, atoms: str) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{int(st.st_mtime)}|{split}|{seed}|{limit}|{atoms}"


def measure(path: str, data, grid, split: str = "val", seed: int = 0, limit: int = 0, atoms: str = "fit-amplitude",
            cache: dict | None = None) -> dict:
    """The Sec. 4.1 measures of one checkpoint on ``split`` of ``data`` (:class:`CrystalArrays` on
    ``grid``): ``{measure: float}`` of :data:`MEASURES` plus ``n_crystals``, from ``cache`` when it
    holds them (the cache is updated).

    Raises:
        CheckpointError: an unreadable checkpoint. ValueError: it was trained on another grid.
    """
    key = _key(path, split, seed, limit, atoms)
    if cache is not None and key in cache:
        return cache[key]
    from crystalstudio.core.checkpoint import load_checkpoint

    from .evaluate import evaluate

    model = load_checkpoint(path)
    arrays = data
    if model.grid != grid:
        raise ValueError(f"{Path(path).name}: trained on {model.grid}, the data are on {grid}")
    idx = arrays.indices(split)
    idx = idx[:limit] if limit else idx
    res = evaluate(model.net, arrays, idx, model.grid, seed=seed, representation=model.representation, atoms=atoms,
                   gate=model.unet_gate)
    out = {k: float(res[k]) for k in MEASURES}
    out["n_crystals"] = int(res["n_crystals"])
    if cache is not None:
        cache[key] = out
    return out


def _interp(x: np.ndarray, y: np.ndarray, at: float):
    if len(x) == 0 or at < x[0] or at > x[-1]:
        return None
    return float(np.interp(at, x, y))


def _reach(x: np.ndarray, y: np.ndarray, target: float):
    """First CPU time at which ``y`` reaches ``target`` (linear between points), or None."""
    for i in range(len(x)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            f = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return None


def curve(runs: dict[str, list[str]], data: str, split: str = "val", seed: int = 0, limit: int = 0,
          atoms: str = "fit-amplitude", reach: float | None = None, cache_path: str = "",
          progress: bool = True, own_time: tuple[str, ...] = ()) -> dict:
    """Measure every checkpoint of every run and chain their costs.

    Args:
        runs: ``{label: [checkpoint paths]}``.
        data: the prepared ``.npz``.
        reach: an atoms-within-0.5-Å level whose first CPU time is reported per run.
        cache_path: JSON cache of measures ("" = none).
        own_time: labels of runs (fine-tunes) whose CPU time starts at zero where their first
            segment began (:func:`chain_points`); their result has ``"own_time": true``.

    Returns:
        dict with ``split``, ``seed``, ``atoms``, ``n_crystals``, ``runs``: ``[{label, points:
        [{file, steps, cpu_seconds, cpu_hours, samples, <measures>}], at_cpu_minutes, reach}]``.

    Raises:
        ValueError: a run without checkpoints, one whose metadata lacks the bookkeeping, or an
            ``own_time`` label that names no run.
    """
    unknown = sorted(set(own_time) - set(runs))
    if unknown:
        raise ValueError(f"--own-time {', '.join(unknown)}: no --run with that label")
    from crystalstudio.core.checkpoint import read_metadata
    from tqdm import tqdm

    from .data import CrystalArrays

    cache = json.loads(Path(cache_path).read_text()) if cache_path and Path(cache_path).is_file() else {}
    arrays, grid = CrystalArrays.load(data), CrystalArrays.load_grid(data)
    out = {"split": split, "seed": seed, "limit": limit, "atoms": atoms, "data": data, "runs": [],
           "cpu_time": "core-seconds = wall seconds x torch threads, chained in step order (training/curve.py)"}
    todo = [(label, p) for label, paths in runs.items() for p in paths]
    bar = tqdm(todo, desc="curve", unit="checkpoint", disable=not progress)
    measured: dict[str, dict] = {}
    for label, p in bar:
        bar.set_postfix_str(Path(p).name)
        measured[p] = measure(p, arrays, grid, split, seed, limit, atoms, cache)
        if cache_path:
            tmp = Path(cache_path).with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)
    for label, paths in runs.items():
        if not paths:
            raise ValueError(f"run {label!r}: no checkpoints")
        costs = []
        for p in paths:
            try:
                costs.append({**checkpoint_cost(read_metadata(p)), "file": str(p)})
            except ValueError as exc:
                raise ValueError(f"{Path(p).name}: {exc}") from None
        pts = []
        for c in chain_points(costs, own_time=label in own_time):
            m = measured[c["file"]]
            out["n_crystals"] = m["n_crystals"]
            pts.append({"file": c["file"], "steps": c["steps"], "cpu_seconds": round(c["cpu_seconds"], 3),
                        "cpu_hours": round(c["cpu_seconds"] / 3600, 3), "samples": c["samples"],
                        **{k: m[k] for k in MEASURES}})
        x = np.array([q["cpu_seconds"] for q in pts]) / 60
        at = {str(t): {k: _interp(x, np.array([q[k] for q in pts]), t) for k in MEASURES} for t in MILESTONES_MIN}
        r = {"label": label, "points": pts, "at_cpu_minutes": at}
        if label in own_time:
            r["own_time"] = True
        if reach is not None:
            hit = _reach(x, np.array([q["atoms_within_tol"] for q in pts]), reach)
            r["reach"] = {"atoms_within_tol": reach, "cpu_minutes": None if hit is None else round(hit, 1)}
        out["runs"].append(r)
    return out


def plot_curve(res: dict, path: str) -> None:
    """Four panels (atoms within 0.5 Å, exact count, species exact, voxel MSE) against CPU hours,
    one line per run; matplotlib's Agg canvas only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    titles = {"atoms_within_tol": "atoms within 0.5 Å", "exact_count": "exact atom count",
              "species_accuracy": "species exact (matched atoms)", "voxel_mse": "voxel MSE"}
    for i, k in enumerate(MEASURES):
        ax = fig.add_subplot(2, 2, i + 1)
        n = len(res["runs"])
        for j, r in enumerate(res["runs"]):  # earlier runs drawn wider and on top: a run that
            x = [q["cpu_hours"] for q in r["points"]]  # continues another must not hide it
            y = [q[k] for q in r["points"]]
            name = r["label"] + (" (own time)" if r.get("own_time") else "")
            ax.plot(x, y, "o-", label=name, ms=3 + 2.5 * (n - 1 - j), lw=1 + 1.5 * (n - 1 - j),
                    zorder=2 + n - j, alpha=0.85)
        if k == "voxel_mse":
            ax.set_yscale("log")
        ax.set_title(titles[k])
        ax.set_xlabel("CPU core-hours of training")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"{res['split']} split, {res.get('n_crystals', '?')} crystals, atoms read by {res['atoms']}")
    fig.tight_layout()
    fig.savefig(path)


def include_runs(res: dict, earlier: dict, reach: float | None = None, name: str = "earlier curve") -> dict:
    """``res`` with the runs of ``earlier`` (an earlier output of :func:`curve`) put first; a run
    of ``res`` with the same label replaces the earlier one. ``reach`` recomputes their reach.

    Raises:
        ValueError: ``earlier`` was measured on another split, seed, limit or atom reader.
    """
    for k in ("split", "seed", "limit", "atoms"):
        if earlier.get(k) != res.get(k):
            raise ValueError(f"{name}: measured with {k} {earlier.get(k)!r}, this curve with {res.get(k)!r}")
    labels = {r["label"] for r in res["runs"]}
    kept = []
    for r in earlier.get("runs", []):
        if r["label"] in labels:
            continue
        r = dict(r)
        if reach is not None:
            x = np.array([q["cpu_seconds"] for q in r["points"]]) / 60
            hit = _reach(x, np.array([q["atoms_within_tol"] for q in r["points"]]), reach)
            r["reach"] = {"atoms_within_tol": reach, "cpu_minutes": None if hit is None else round(hit, 1)}
        kept.append(r)
    return {**res, "runs": kept + res["runs"]}


def _parse_run(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"--run {spec!r}: expected LABEL=GLOB[,GLOB...]")
    label, pats = spec.split("=", 1)
    files: list[str] = []
    for pat in pats.split(","):
        hits = sorted(glob.glob(pat.strip())) or ([pat.strip()] if Path(pat.strip()).is_file() else [])
        files += [h for h in hits if not h.endswith(".optim.safetensors") and h not in files]
    return label.strip(), files


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--run", action="append", required=True, type=_parse_run, metavar="LABEL=GLOB[,GLOB...]",
                   help="one recipe and its checkpoints (repeat for each recipe)")
    p.add_argument("--data", default="data/mp.npz", help="prepared .npz")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the rotations")
    p.add_argument("--limit", type=int, default=0, help="first N crystals of the split (0 = all)")
    p.add_argument("--atoms", default="fit-amplitude", choices=("fit-amplitude", "fit", "unet"))
    p.add_argument("--own-time", action="append", default=[], metavar="LABEL",
                   help="this run's CPU time starts at zero where its first segment began (a fine-tune "
                        "listed without the run it started from); repeat for each run")
    p.add_argument("--reach", type=float, default=None, help="report the CPU time to this atoms-within level")
    p.add_argument("--cache", default="runs/curve_cache.json", help="JSON cache of measures ('' = none)")
    p.add_argument("--include", default="", metavar="JSON",
                   help="also draw the runs of an earlier curve JSON (same split, seed, limit and atoms)")
    p.add_argument("--out", default="", help="write the curve JSON here")
    p.add_argument("--png", default="", help="write the figure here")
    return p


def format_curve(res: dict) -> str:
    """Markdown table: per run, the measures at 15/30/60 CPU-minutes, the last point and ``reach``."""
    lines = ["| run | CPU-min | steps | atoms within 0.5 Å | exact count | species | voxel MSE |",
             "|---|---|---|---|---|---|---|"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for r in res["runs"]:
        for t, m in r["at_cpu_minutes"].items():
            if m["atoms_within_tol"] is not None:
                lines.append(f"| {r['label']} | {t} (interp.) | - | {pct(m['atoms_within_tol'])} | "
                             f"{pct(m['exact_count'])} | {pct(m['species_accuracy'])} | {m['voxel_mse']:.2e} |")
        q = r["points"][-1]
        lines.append(f"| {r['label']} | {q['cpu_seconds'] / 60:.0f} (last) | {q['steps']} | "
                     f"{pct(q['atoms_within_tol'])} | {pct(q['exact_count'])} | {pct(q['species_accuracy'])} | "
                     f"{q['voxel_mse']:.2e} |")
    reach = [r for r in res["runs"] if "reach" in r]
    if reach:
        lines.append("")
        for r in reach:
            m = r["reach"]["cpu_minutes"]
            lines.append(f"- {r['label']}: atoms within 0.5 Å reach {100 * r['reach']['atoms_within_tol']:.1f}% "
                         + ("not within the run" if m is None else f"after {m:.0f} CPU-minutes"))
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict:
    runs = dict(a.run)
    earlier = None
    if getattr(a, "include", ""):  # read first: a bad file fails before hours of measuring
        try:
            earlier = json.loads(Path(a.include).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{Path(a.include).name}: not a curve JSON ({exc})") from None
    res = curve(runs, a.data, a.split, a.seed, a.limit, a.atoms, a.reach, a.cache,
                own_time=tuple(getattr(a, "own_time", []) or ()))
    if earlier is not None:
        res = include_runs(res, earlier, a.reach, Path(a.include).name)
    print(format_curve(res))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.png:
        Path(a.png).parent.mkdir(parents=True, exist_ok=True)
        plot_curve(res, a.png)
    return res
