"""How strongly a conditional checkpoint's target sets the decoded field's magnitude (Sec. 4.5).

    python benchmarks/conditioning.py CHECKPOINT [CHECKPOINT ...] [--data data/mp.npz] [--n 48]

For the first N crystals of the validation split (the harness's seed-0 rotations), each
crystal's encoder mean mu is decoded at 0.8, 1 and 1.25 times its own largest density c0.
Prints per checkpoint the mean ratio of the decoded maxima to the one at c0, the slope of
log(max) on log(target) (1: the maximum follows the target exactly; 0: the target is
ignored) and the smallest ratio max(1.25 c0) / max(0.8 c0) over the crystals (below 1: the
control runs backwards for some crystal).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crystalstudio.core.checkpoint import load_checkpoint  # noqa: E402
from crystalstudio.core.density import random_rotations  # noqa: E402
from crystalstudio.core.models import max_density  # noqa: E402
from training.data import CrystalArrays, voxelise  # noqa: E402

LOW, HIGH = 0.8, 1.25


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default="data/mp.npz")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = CrystalArrays.load(a.data)
    grid = CrystalArrays.load_grid(a.data)
    idx = data.indices("val")[: a.n]
    M, _, _, _ = voxelise(data, idx, grid, random_rotations(len(idx), 0), "cpu")
    c0 = max_density(M)
    print(f"first {len(idx)} validation crystals, encoder mean decoded at x{LOW}, x1 and x{HIGH} of c0\n")
    print(f"| checkpoint | max at x{LOW} | max at x{HIGH} | slope of log max on log target | "
          f"smallest max(x{HIGH}) / max(x{LOW}) |")
    print("|---|---|---|---|---|")
    for path in a.checkpoints:
        model = load_checkpoint(path, jit=False)
        if not model.config.conditional:
            print(f"| {Path(path).name} | not a conditional checkpoint | | | |")
            continue
        vae = model.net.vae.eval()
        with torch.no_grad():
            mu, _ = vae.encode(M, c0)
            top = {k: vae.decode(mu, k * c0).flatten(1).amax(1).double() for k in (LOW, 1.0, HIGH)}
        r = (top[HIGH] / top[LOW]).numpy()
        slope = float(np.log(r).mean() / np.log(HIGH / LOW))
        print(f"| {Path(path).name} | x{(top[LOW] / top[1.0]).mean():.3f} | x{(top[HIGH] / top[1.0]).mean():.3f} | "
              f"{slope:.2f} | {r.min():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
