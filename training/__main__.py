"""``python -m training {prepare,train,evaluate,fit-prior,choose-gate,ready,ship,results-table,widen,knobs,curve,separability} ...``:
see ``--help`` of each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("prepare", help="CSV (cif column) / CIF folders -> compact .npz (CPU, pymatgen)")
    pp.add_argument("inputs", nargs="+", help="CSV files in the CDVAE layout, CIF files or folders of CIFs")
    pp.add_argument("--out", required=True, help="output .npz")
    pp.add_argument("--grid", type=int, default=30, help="voxels per edge (default 30)")
    pp.add_argument("--length", type=float, default=10.0, help="cube edge in Å (default 10)")
    pp.add_argument("--sigma", type=float, default=1.0, help="Gaussian width in Å (Eq. 1, default 1)")
    pp.add_argument("--test", type=float, default=0.10, help="test fraction, by composition")
    pp.add_argument("--val", type=float, default=0.05, help="validation fraction, by composition")
    pp.add_argument("--all-cells", action="store_true",
                    help="keep cells larger than the cube (for --representation repeating_lattice)")
    pp.add_argument("--fit", choices=("every", "some"), default="every",
                    help="representation 1: keep cells that fit the cube under every rotation (default), or also "
                         "training cells that fit under some (their rotations are then drawn by rejection; "
                         "val and test unchanged)")
    pp.add_argument("--min-fit", type=float, default=0.02,
                    help="with --fit some: the least fraction of random rotations a kept cell fits under (default 0.02)")
    pp.add_argument("--partial-splits", default="train",
                    help="with --fit some: the splits that keep such cells (default train; 'train,val' makes a "
                         "measuring set of larger cells, not a data set to ship a model from)")

    from .train import TrainConfig

    pt = sub.add_parser("train", help="train the VAE + U-Net; writes a safetensors checkpoint")
    from dataclasses import fields

    for f in fields(TrainConfig):
        name, default = f.name, getattr(TrainConfig(), f.name)
        if name == "model":
            pt.add_argument("--model", type=json.loads, default={}, help="ModelConfig overrides as JSON")
        elif "bool" in str(f.type):  # --flag / --no-flag; a None default means "decide by device"
            pt.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            pt.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)

    from .evaluate import add_arguments as evaluate_arguments

    pe = sub.add_parser("evaluate", help="held-out measures of a checkpoint (same as python -m training.evaluate)")
    evaluate_arguments(pe)

    from .prior import add_arguments as prior_arguments

    pf = sub.add_parser("fit-prior", help="fit the aggregate-posterior prior (Gaussian mixture on the training "
                                          "crystals' encoded means) and store it in the checkpoint")
    prior_arguments(pf)

    from .knobs import add_arguments as knob_arguments

    pk = sub.add_parser("knobs", help="one-knob-at-a-time fine-tunes measured on the validation split")
    knob_arguments(pk)

    from .curve import add_arguments as curve_arguments

    pc = sub.add_parser("curve", help="learning curves: validation accuracy of each run's checkpoints against "
                                      "CPU core-hours (JSON + PNG)")
    curve_arguments(pc)

    from .gate import add_arguments as gate_arguments

    pg = sub.add_parser("choose-gate", help="choose the U-Net gate of the fit + U-Net atoms on the validation "
                                           "split and store it in the checkpoint")
    gate_arguments(pg)

    from .merge import add_arguments as merge_arguments

    pm = sub.add_parser("merge-unet", help="the VAE (and prior) of one checkpoint with the U-Net of another")
    merge_arguments(pm)

    from .ship import add_arguments as ship_arguments
    from .ship import add_table_arguments

    ship_arguments(sub.add_parser("ship", help="put an evaluated checkpoint into assets/: its test measures as "
                                               "metadata and its evaluation JSON beside it (checked to be of it)"))
    add_table_arguments(sub.add_parser("results-table", help="write README's table of held-out results from the "
                                                             "shipped checkpoints' .metrics.json"))

    from .widen import add_arguments as widen_arguments

    widen_arguments(sub.add_parser("widen", help="a checkpoint's decoder made wider, decoding the same fields "
                                                 "(fine-tune it with train --init)"))

    from .ready import add_arguments as ready_arguments

    ready_arguments(sub.add_parser("ready", help="a trained run made a shipping candidate: the reference's reading, "
                                                 "fit-prior and both gates (training and val data only)"))
    ps = sub.add_parser("separability", help="atoms that are separate peaks of the true M, per sigma (no model)")
    ps.add_argument("--data", default="data/mp.npz", help="prepared .npz")
    ps.add_argument("--split", default="val", choices=["train", "val", "test"])
    ps.add_argument("--sigmas", default="0.4,0.5,0.6,0.7,0.8,1.0", help="comma-separated Gaussian widths in Å")
    ps.add_argument("--limit", type=int, default=0, help="first N crystals of the split (0 = all)")
    ps.add_argument("--seed", type=int, default=0, help="seed of the rotations")
    ps.add_argument("--json", default="", help="also write the rows to this JSON file")

    a = p.parse_args(argv)
    if a.cmd == "prepare":
        from crystalstudio.core.density import Grid

        from .data import prepare

        print(json.dumps(prepare(a.inputs, a.out, Grid(a.grid, a.length, a.sigma), a.val, a.test,
                                 require_fit=not a.all_cells, fit=a.fit, min_fit=a.min_fit,
                                 partial_splits=tuple(a.partial_splits.split(","))), indent=1))
    elif a.cmd == "train":
        from .train import train

        kw = {k: v for k, v in vars(a).items() if k != "cmd"}
        train(TrainConfig(**kw))
    elif a.cmd == "separability":
        _separability(a)
    elif a.cmd == "fit-prior":
        from .prior import run as run_prior

        run_prior(a)
    elif a.cmd == "choose-gate":
        from .gate import run as run_gate

        run_gate(a)
    elif a.cmd == "widen":
        from .widen import run as run_widen

        return run_widen(a)
    elif a.cmd in ("ship", "results-table"):
        from .ship import run as run_ship
        from .ship import run_table

        return (run_ship if a.cmd == "ship" else run_table)(a)
    elif a.cmd == "ready":
        from .ready import run as run_ready

        return run_ready(a)
    elif a.cmd == "merge-unet":
        from .merge import run as run_merge

        run_merge(a)
    elif a.cmd == "curve":
        from .curve import run as run_curve

        run_curve(a)
    elif a.cmd == "knobs":
        from .knobs import run as run_knobs

        run_knobs(a)
    else:
        from .evaluate import run as run_evaluation

        run_evaluation(a)  # errors propagate (CheckpointError / HarnessError, one-line messages)
    return 0


def _separability(a: argparse.Namespace) -> list[dict]:
    from .data import CrystalArrays
    from .evaluate import peak_separability

    data = CrystalArrays.load(a.data)
    grid = CrystalArrays.load_grid(a.data)
    idx = data.indices(a.split)
    idx = idx[: a.limit] if a.limit else idx
    rows = peak_separability(data, idx, [float(s) for s in a.sigmas.split(",") if s], grid, a.seed)
    print(f"Atoms that are separate local maxima of the true M ({len(idx)} {a.split} crystals, "
          f"{rows[0]['n_true_atoms'] if rows else 0} atoms; peaks above Z 0.5, matched within 0.5 Å):\n")
    print("| sigma (Å) | atoms at a peak | peaks at an atom | exact count | median error (Å) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sigma']:.2f} | {100 * r['atoms_within_tol']:.1f}% | {100 * r['pred_within_tol']:.1f}% | "
              f"{100 * r['exact_count']:.1f}% | {r['median_error_A'] if r['median_error_A'] is not None else float('nan'):.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(main())
