"""``python -m training ready``: make a trained run a shipping candidate (issue 13, step 4).

Everything a checkpoint needs before its one test evaluation, chosen on training and
validation data only, in the order the readings depend on each other:

1. copy the run to ``--out`` (the run itself is never rewritten: a resumed run and
   ``ship --optimizer-of`` need its network tensors as they are);
2. give the copy the reading of a reference checkpoint (``--like``, the shipped default):
   :data:`LIKE_KEYS`, the refinement's learning rates and the light-atom subtraction, which
   were chosen on val for that default and carry over to its fine-tunes;
3. ``fit-prior``: the aggregate prior of random draws and the species prior;
4. ``choose-gate --draws N``: the draw gate and ``draw_light`` (needs the prior);
5. ``choose-gate``: the U-Net gate on the validation split.

It ends by printing the test evaluation and ``ship`` commands that follow, so a fresh
session repeats the whole path from a checkout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crystalstudio.core.checkpoint import CheckpointError, read_metadata, update_metadata

__all__ = ["ready", "add_arguments", "run", "LIKE_KEYS"]

#: reading settings copied from the reference checkpoint (chosen on val for it)
LIKE_KEYS = ("refine_lr", "light_subtract")


def ready(run: str | Path, out: str | Path, data: str, like: str | Path | None = None, draws: int = 1000,
          threads: int = 0, log=print) -> Path:
    """Copy the run to ``out`` and give the copy its reading and priors (module docstring).

    Args:
        run: the trained checkpoint (.safetensors), left as it is.
        out: the candidate to write (not the run itself).
        data: the prepared .npz with the run's splits.
        like: reference checkpoint whose :data:`LIKE_KEYS` the candidate takes (None: none).
        draws: aggregate-prior draws that choose the draw gate (0: no draw gate).
        threads: torch threads (0: torch's default).
    Returns:
        ``out``.
    Raises:
        ValueError: ``out`` is the run, or the reference is a model of another representation.
        CheckpointError: the run or the reference cannot be read (one line naming the file).
    """
    from .gate import add_arguments as gate_arguments
    from .gate import run as run_gate
    from .prior import add_arguments as prior_arguments
    from .prior import run as run_prior

    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: the candidate must be another file than the run (the run stays as trained)")
    meta = read_metadata(run)
    reading = {}
    if like is not None:
        ref = read_metadata(like)
        if ref.get("representation") != meta.get("representation"):
            raise ValueError(f"{like}: a {ref.get('representation')} model, the run is {meta.get('representation')}")
        reading = {k: ref[k] for k in LIKE_KEYS if k in ref}
    out.parent.mkdir(parents=True, exist_ok=True)
    update_metadata(run, reading, out)  # the checkpoint writer's own copy, metadata updated
    t0 = time.time()
    steps = [("fit-prior", run_prior, prior_arguments, ["--threads", str(threads)])]
    if draws >= 1:
        steps.append(("choose-gate --draws", run_gate, gate_arguments, ["--draws", str(draws), "--write"]))
    steps.append(("choose-gate", run_gate, gate_arguments, ["--write"]))
    for name, fn, arguments, extra in steps:
        log(f"ready: {name} ({time.time() - t0:.0f} s)")
        fn(arguments(argparse.ArgumentParser()).parse_args(["--checkpoint", str(out), "--data", data, *extra]))
    log(f"ready: {out} in {time.time() - t0:.0f} s; reading {reading or 'its own'}. Next, on the test split once:")
    log(f"  python -m training evaluate --checkpoint {out} --data {data} --split test --draws 1000 --json TEST.json")
    log(f"  python -m training ship --checkpoint {out} --evaluation TEST.json --optimizer-of {run}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="the trained run (.safetensors), left as it is")
    p.add_argument("--out", required=True, help="the candidate to write")
    p.add_argument("--data", default="data/mp.npz", help="prepared .npz with the run's splits")
    p.add_argument("--like", default="assets/unit_cell.safetensors",
                   help=f"take {', '.join(LIKE_KEYS)} from this checkpoint ('' for none)")
    p.add_argument("--draws", type=int, default=1000, help="draws that choose the draw gate (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p


def run(a: argparse.Namespace) -> int:
    """The command: 0, or ``SystemExit`` with one line naming the file."""
    try:
        ready(a.checkpoint, a.out, a.data, a.like or None, a.draws, a.threads)
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(str(exc)) from None
    return 0
