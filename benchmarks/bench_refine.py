"""Latent refinement: time and quality per reconstruction, against the encoder alone.

``python benchmarks/bench_refine.py [--checkpoint PATH] [--steps 0,30,50,100] [--threads 1,2]
[--lrs "0.1;0.05,0.1,0.2,0.4"]``

For each shipped sample (NaCl, Si, SrTiO3, Ti2MnIn), the whole of ``Session.compute``
(encode, refine, decode, Eq. 1 fit): wall time per crystal at each step count and thread
count, and the quality against the input (voxel MSE, atoms within 0.5 Å, exact count). The
baseline is 0 steps (the encoder's mu, the paper's path), measured in the same run; each
``--lrs`` set (``;``-separated) is a row per step count: one rate, or several (a multi-start,
all refined in one batch, ``CrystalModel.refine_lr``); the ratio
column is time / baseline time. Medians over ``--runs`` repeats after one warm-up. The machine's
load matters: on a shared 2-core box a background job makes every number larger.
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

from crystalstudio.io.structures import read_structure  # noqa: E402
from crystalstudio.session import Session, sample_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--steps", default="0,30,50,100")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lrs", default=None, help="';'-separated sets of comma-separated learning rates "
                                               "(default: the checkpoint's)")
    a = p.parse_args(argv)
    session = Session(a.checkpoint)
    crystals = [read_structure(f, session.grid) for f in sample_files()]
    print(f"checkpoint {session.model.path}, {len(crystals)} samples, {a.runs} runs each; "
          f"CPU {torch.backends.cpu.get_cpu_capability()}")
    lr_sets = ([tuple(float(x) for x in part.split(",")) for part in a.lrs.split(";")] if a.lrs
               else [session.model.refine_lr])
    print("| threads | refine steps | learning rates | s per crystal (median) | x encoder alone | voxel MSE (mean) "
          "| atoms within 0.5 Å | exact count |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        base = None
        runs = [(steps, lrs) for steps in (int(s) for s in a.steps.split(","))
                for lrs in (lr_sets[:1] if steps == 0 else lr_sets)]
        for steps, lrs in runs:
            session.model.refine_steps = steps
            session.model.refine_lr = lrs
            session.compute(crystals[0])  # warm-up
            times, mse, found, n, exact = [], [], 0, 0, 0
            for c in crystals:
                per = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    rec = session.compute(c)
                    per.append(time.perf_counter() - t0)
                times.append(statistics.median(per))
                m = rec.metrics
                mse.append(m["voxel_mse"])
                found += round(m["atoms_within_tol"] * m["n_true"])
                n += m["n_true"]
                exact += bool(m["exact_count"])
            t = statistics.median(times)
            base = t if steps == 0 else base
            ratio = f"{t / base:.1f}" if base else "-"
            rates = "-" if steps == 0 else ", ".join(f"{x:g}" for x in lrs)
            print(f"| {threads} | {steps} | {rates} | {t:.2f} | {ratio} | {np.mean(mse):.2e} | {found}/{n} "
                  f"| {exact}/{len(crystals)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
