"""Time per 30^3 field: the Eq. 1 atom fit beside the U-Net path (the baseline), 1 and 2 threads.

``python benchmarks/bench_fit.py [--runs 10] [--atoms 20,100] [--checkpoint PATH]``

Fields: random crystals built here (atoms uniformly in the cube's central 8.4 Å, no pair
closer than 1.8 Å, Z uniform in 1..94), their true M (Eq. 1) and, for the decoded rows, the
shipped model's M_hat of the same crystals (encode -> decode). Rows:

* ``unet (baseline)``: the traced U-Net on the field, argmax, connected components, centres
  of mass (``CrystalModel.segment_batch(method="unet")``, what the paper does).
* ``fit, true M``: :func:`crystalstudio.core.fit.fit_atoms` with ``DEFAULT_FIT``; also
  reports the share of atoms recovered within 0.1 Å with the right Z.
* ``fit, true M, unsharpened seeds``: the same with ``sharpen_A = 0`` (the first round seeds
  from the field and its Laplacian, as before 2026-12-05 evening), for the A/B in one run.
* ``fit, decoded M`` (``CrystalModel.segment_batch(method="fit")``): the app's default on a
  decoded field, U-Net included (its species and gating).

Medians over ``--runs`` fields per size after one warm-up, each size and thread count timed
in the same run. The fit's BLAS runs on one thread by design (its matrices are small; see
``crystalstudio.core.fit._one_blas_thread``); the thread count is torch's (the U-Net).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystalstudio.core.checkpoint import load_checkpoint  # noqa: E402
from crystalstudio.core.density import Grid, density_field  # noqa: E402
from crystalstudio.core.fit import DEFAULT_FIT, fit_atoms  # noqa: E402
from dataclasses import replace  # noqa: E402
from crystalstudio.core.metrics import match_atoms  # noqa: E402
from crystalstudio.session import default_checkpoint  # noqa: E402


def random_crystal(rng: np.random.Generator, n_atoms: int, grid: Grid, dmin: float = 1.8):
    P: list[np.ndarray] = []
    lo, hi = 0.8, grid.length - 0.8
    while len(P) < n_atoms:
        p = rng.uniform(lo, hi, 3)
        if all(np.linalg.norm(p - q) >= dmin for q in P):
            P.append(p)
    return np.array(P), rng.integers(1, 95, n_atoms)


def _median_ms(fn, items) -> float:
    fn(items[0])
    t = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        t.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--atoms", default="20,100")
    p.add_argument("--checkpoint", default=str(default_checkpoint()))
    a = p.parse_args(argv)
    model = load_checkpoint(a.checkpoint)
    grid = model.grid
    rng = np.random.default_rng(0)
    print(f"checkpoint {Path(a.checkpoint).name}, grid {grid.n}^3 over {grid.length} Å, sigma {grid.sigma} Å")
    print("| atoms | threads | path | median ms per field | x baseline | recovered (0.1 Å, Z) |")
    print("|---|---|---|---|---|---|")
    for n_atoms in [int(x) for x in a.atoms.split(",")]:
        crystals = [random_crystal(rng, n_atoms, grid) for _ in range(a.runs)]
        true_M = [density_field(P, Z, grid, species=False)[0] for P, Z in crystals]
        decoded = [model.decode(model.encode(M)[0]) for M in true_M]
        unsharp = replace(DEFAULT_FIT, sharpen_A=0.0)
        ok, ok_unsharp = [], []
        for (P, Z), M in zip(crystals, true_M):
            for st, acc in ((DEFAULT_FIT, ok), (unsharp, ok_unsharp)):
                f = fit_atoms(M, grid, settings=st)
                m = match_atoms(P, Z, f.positions, f.Z, 0.1)
                acc.append(m["species_correct"] / len(Z))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            base = _median_ms(lambda M: model.segment_batch(M[None], "unet"), true_M)
            rows = [("unet (baseline), true M", base, ""),
                    ("fit, true M", _median_ms(lambda M: fit_atoms(M, grid, settings=DEFAULT_FIT), true_M),
                     f"{100 * np.mean(ok):.1f}%"),
                    ("fit, true M, unsharpened seeds", _median_ms(lambda M: fit_atoms(M, grid, settings=unsharp),
                                                                  true_M), f"{100 * np.mean(ok_unsharp):.1f}%"),
                    ("unet, decoded M", _median_ms(lambda M: model.segment_batch(M[None], "unet"), decoded), ""),
                    ("fit, decoded M (app default)", _median_ms(lambda M: model.segment_batch(M[None], "fit"),
                                                                decoded), "")]
            for name, ms, rec in rows:
                print(f"| {n_atoms} | {threads} | {name} | {ms:.1f} | {ms / base:.2f} | {rec} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
