"""What reading a repeating-lattice field by its periodicity costs (``lattice_fold``).

``python benchmarks/bench_fold.py [--checkpoint assets/repeating_lattice.safetensors] [--runs 3] [--threads 1]``

For each bundled sample (the repeating-lattice field of the cube at the cell origin, encoded,
decoded from the encoder's mu) the table gives the median wall time of:

* ``decode``: z -> M_hat (:meth:`CrystalModel.decode`), the baseline every frame pays;
* ``find lattice``: :func:`~crystalstudio.core.lattice_fold.decoded_lattice` (FFT overlap of the
  field with its translates, sub-voxel refinement of the low-misfit shifts);
* ``fold``: :func:`~crystalstudio.core.lattice_fold.fold_field` over that lattice (spline
  resampling of every image);
* ``atoms, folded`` and ``atoms, not folded``: :meth:`CrystalModel.segment_batch` with
  ``lattice_fold`` on (find + fold + U-Net + fit) and off (U-Net + fit);

and the ratio of the folded reading to the unfolded one. Timings are rounds over the samples
(a background load hits all alike); note the machine's load.
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
from crystalstudio.core.density import density_field, lattice_positions  # noqa: E402
from crystalstudio.core.lattice_fold import decoded_lattice, fold_field  # noqa: E402
from crystalstudio.io.structures import read_structure  # noqa: E402
from crystalstudio.session import lattice_checkpoint, sample_files  # noqa: E402


def _median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(lattice_checkpoint() or "assets/repeating_lattice.safetensors"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint)
    if model.representation != "repeating_lattice":
        print(f"error: {a.checkpoint} is a {model.representation} checkpoint, not repeating_lattice", file=sys.stderr)
        return 2
    grid = model.grid
    print(f"{Path(a.checkpoint).name}, {a.threads} thread(s), median of {a.runs}\n")
    print("| sample | atoms in the cube | decode | find lattice | fold | atoms, folded | atoms, not folded | folded / not |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sample_files():
        crystal = read_structure(path, grid, require_fit=False)
        pos, Z = lattice_positions(crystal, grid)
        M = density_field(pos, Z, grid, species=False)
        M = M[0] if isinstance(M, tuple) else M
        mu, _ = model.encode(M)
        M_hat = model.decode(mu)
        t_dec = _median_s(lambda: model.decode(mu), a.runs)
        lattice = decoded_lattice(M_hat, grid)
        t_find = _median_s(lambda: decoded_lattice(M_hat, grid), a.runs)
        t_fold = _median_s(lambda: fold_field(M_hat, grid, lattice), a.runs) if lattice is not None else float("nan")
        model.info["lattice_fold"] = True
        t_on = _median_s(lambda: model.segment_batch(M_hat[None]), a.runs)
        model.info["lattice_fold"] = False
        t_off = _median_s(lambda: model.segment_batch(M_hat[None]), a.runs)
        inside = int(np.all((pos >= 0) & (pos < grid.length), axis=1).sum())
        ms = (lambda s: f"{1000 * s:.0f} ms")  # noqa: E731
        print(f"| {path.stem} | {inside} | {ms(t_dec)} | {ms(t_find)} | "
              f"{ms(t_fold) if lattice is not None else 'no lattice'} | {ms(t_on)} | {ms(t_off)} | {t_on / t_off:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
