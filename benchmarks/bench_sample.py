"""Time N random draws decoded and read by the atom fit, per prior and thread count.

``python benchmarks/bench_sample.py [--n 64] [--checkpoint PATH]``: prints a table of seconds
for N draws (decode + atoms + validity), the aggregate prior against N(0, I) as the
baseline measured in the same run, and the share of valid draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystalstudio.io.validity import check_draw
from crystalstudio.session import Session


def run(session: Session, n: int, prior: str) -> tuple[float, float]:
    session.set_prior(prior)
    t0 = time.perf_counter()
    z, cond = session.draw(n, seed=0)
    M, L = session.model.decode_fields(z, cond)
    atoms = session.model.segment_draws(M, L)  # as the app reads a draw (draw gate, draw_light)
    valid = sum(check_draw(a.positions, a.Z).valid for a in atoms)
    return time.perf_counter() - t0, valid / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--checkpoint", default=None)
    a = p.parse_args()
    s = Session(a.checkpoint)
    s.decode(s.draw(1)[0][0])  # warm-up: traced decoder, BLAS, SMACT tables
    print(f"| threads | prior | {a.n} draws (s) | per draw (ms) | valid | ratio to N(0, I) |\n|---|---|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        base, _ = run(s, a.n, "standard")  # the baseline
        for prior in ("standard", "aggregate"):
            t, v = run(s, a.n, prior)
            print(f"| {threads} | {s.prior_in_use()} | {t:.2f} | {1000 * t / a.n:.0f} | {100 * v:.0f}% | "
                  f"{t / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
