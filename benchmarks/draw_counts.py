"""How close the draws' atom counts come to real crystals', and what limits them (issue 14).

``python benchmarks/draw_counts.py [--checkpoint PATH] [--data data/mp.npz] [--n 500] [--seed 1]``

Prints one table: the mean atom count and the Wasserstein distance of the count distribution
against ``--n`` rotated training fields (the harness's reference, ``training.evaluate``) for

* draws from the checkpoint's aggregate prior at temperature tau (z = mean + tau L eps of
  the chosen Gaussian; tau = 1 is what the app draws) and each U-Net gate;
* the decoder's own reconstructions (encoder mu, no refinement) of other training crystals,
  read the same way: the count distribution the decoder gives when the latent is right.

Atoms are read as ``CrystalModel.segment_batch`` reads encoder-only fields (the Eq. 1 fit with
``DECODED_FIT``, then the U-Net gate); one fit per field, every gate applied to it. The test
split is never read. One torch thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystalstudio.core.checkpoint import load_checkpoint  # noqa: E402
from crystalstudio.core.density import random_rotations  # noqa: E402
from crystalstudio.session import default_checkpoint  # noqa: E402
from training.data import CrystalArrays, voxelise  # noqa: E402
from training.evaluate import _reference_fields  # noqa: E402
from training.gate import atoms_per_gate  # noqa: E402

GATES = (0.05, 0.1, 0.15, 0.2)


@torch.no_grad()
def counts_of(model, fields: torch.Tensor, gates=GATES) -> dict[float, list[int]]:
    """Atom counts of decoded fields (B, n, n, n) under each gate (one fit per field)."""
    probs = torch.softmax(model.net.unet(fields).float(), 1).numpy()
    return {g: [len(a.Z) for a in found]
            for g, found in atoms_per_gate(model, fields.float().numpy(), probs, gates).items()}


@torch.no_grad()
def main(argv=None) -> None:
    from scipy.stats import wasserstein_distance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(default_checkpoint()))
    p.add_argument("--data", default="data/mp.npz")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--taus", default="0.8,1.0")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint, jit=False)
    prior = model.prior
    if prior is None or model.config.conditional:
        raise SystemExit(f"{a.checkpoint}: needs an unconditional checkpoint with an aggregate prior")
    data = CrystalArrays.load(a.data)
    ref, _, _ = _reference_fields(model, data, 1000, a.seed)
    vae = model.net.vae
    rows = []
    for tau in [float(t) for t in a.taus.split(",")]:
        z = prior.sample(a.n, a.seed, temperature=tau)
        z = torch.as_tensor(z, dtype=torch.float32)
        per: dict[float, list[int]] = {g: [] for g in GATES}
        for s in range(0, a.n, 16):
            for g, c in counts_of(model, vae.decode(z[s:s + 16], None)).items():
                per[g] += c
        rows += [(f"aggregate-prior draws, tau {tau:g}", g, np.array(c)) for g, c in per.items()]
    train = data.indices("train")
    pick = np.random.default_rng(a.seed + 1000).choice(train, size=min(a.n, len(train)), replace=False)
    rot = random_rotations(len(pick), a.seed + 1000)
    per = {g: [] for g in GATES}
    true_counts: list[int] = []
    for s in range(0, len(pick), 16):
        M, _, _, Zp = voxelise(data, pick[s:s + 16], model.grid, rot[s:s + 16], "cpu", model.representation)
        true_counts += [int((np.asarray(z) > 0).sum()) for z in Zp]
        for g, c in counts_of(model, vae.decode(vae.encode(M, None)[0], None)).items():
            per[g] += c
    rows.append(("the same training crystals, true counts", None, np.array(true_counts)))
    rows += [("reconstructions of training crystals (encoder mu)", g, np.array(c)) for g, c in per.items()]
    print(f"{Path(a.checkpoint).name}: {a.n} per row, seed {a.seed}; reference: 1000 training fields, "
          f"{ref.mean():.2f} atoms each")
    print("| fields | U-Net gate | atoms per field | count Wasserstein |")
    print("|---|---|---|---|")
    for name, g, c in rows:
        print(f"| {name} | {'-' if g is None else f'{g:g}'} | {c.mean():.2f} | {wasserstein_distance(c, ref):.2f} |")


if __name__ == "__main__":
    main()
