"""Shipping a checkpoint (issue 13, step 4): ``python -m training ship`` and ``results-table``.

``ship`` puts an evaluated checkpoint into ``assets/``: it checks that the evaluation JSON
measures *this* file on the whole test split with the reading stored in it, then writes the
checkpoint to ``--out`` with the JSON's top-level measures as its ``metrics`` metadata (what
the app's checkpoint list and About box show) and the JSON beside it as
``<name>.metrics.json`` (its ``checkpoint`` field set to the shipped path).

``results-table`` writes README's table of held-out results from the shipped JSONs (between
the two ``results-table`` markers), so the numbers in the README are the evaluation
command's; ``--check`` fails when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crystalstudio.core.checkpoint import (CheckpointError, evaluation_path, load_checkpoint, update_metadata,
                                          weights_fingerprint)
from crystalstudio.core.metrics import MEASURE_KEYS

__all__ = ["ShipError", "ship", "check_evaluation", "metrics_path", "results_table", "update_readme",
           "METRIC_KEYS", "READING_KEYS", "ASSETS", "BEGIN", "END", "OPTIM_LIMIT"]

#: top-level measures of an evaluation JSON copied into the checkpoint's ``metrics`` metadata
METRIC_KEYS = MEASURE_KEYS

#: reading settings an evaluation JSON records; each must equal the shipped checkpoint's
READING_KEYS = ("representation", "latent", "unet_gate", "draw_gate", "draw_light", "light_subtract",
                "lattice_fold", "refine_lr", "species_prior")

#: largest optimizer side file shipped beside a checkpoint (bytes)
OPTIM_LIMIT = 16 * 2**20

#: the shipped checkpoints, in the order of the README table's columns
ASSETS = ("unit_cell", "unit_cell_conditional", "repeating_lattice")
BEGIN = "<!-- results-table: written by `python -m training results-table`; do not edit by hand -->"
END = "<!-- /results-table -->"


class ShipError(ValueError):
    """An evaluation that does not belong to the checkpoint, or a README out of step with the
    shipped JSONs. One-line message naming the file."""


def metrics_path(checkpoint: str | Path) -> Path:
    """``assets/unit_cell.safetensors`` -> ``assets/unit_cell.metrics.json``."""
    return evaluation_path(checkpoint)


def check_evaluation(checkpoint: str | Path, evaluation: str | Path) -> dict:
    """The evaluation JSON ``evaluation`` (``python -m training evaluate --json``), checked to
    measure the checkpoint ``checkpoint`` as it would ship.

    Checked: the whole test split (no ``--limit``, ``n_crystals == n_split``, the split's ids
    those the checkpoint was trained without when it records them); the JSON's
    ``weights_sha256`` equals :func:`~crystalstudio.core.checkpoint.weights_fingerprint` of the
    file (a JSON written before fingerprints were recorded must name the same path instead);
    each of :data:`READING_KEYS` the JSON records equals the checkpoint's.

    Returns:
        The JSON as a dict.

    Raises:
        ShipError: a check fails, or the JSON is missing or not JSON.
        CheckpointError: the checkpoint does not load.
    """
    evaluation = Path(evaluation)
    try:
        res = json.loads(evaluation.read_text())
    except OSError as exc:
        raise ShipError(f"{evaluation.name}: cannot read the evaluation ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ShipError(f"{evaluation.name}: not an evaluation JSON ({exc.msg})") from None
    if not isinstance(res, dict) or "atoms_within_tol" not in res:
        raise ShipError(f"{evaluation.name}: not an evaluation JSON of python -m training evaluate")
    fail = (lambda why: ShipError(f"{evaluation.name}: {why}"))  # noqa: E731
    if res.get("split") != "test":
        raise fail(f"measures the {res.get('split')!r} split; a shipped checkpoint carries its test measures")
    if res.get("limit") or res.get("n_crystals") != res.get("n_split"):
        raise fail(f"measures {res.get('n_crystals')} of the {res.get('n_split')} test crystals (--limit); "
                   "ship the whole split")
    if res.get("split_matches_checkpoint_test_ids") is False:
        raise fail("its test crystals are not the ones the checkpoint was trained without")
    model = load_checkpoint(checkpoint, jit=False)
    if res.get("weights_sha256") is not None:
        if res["weights_sha256"] != weights_fingerprint(checkpoint):
            raise fail(f"measures other weights than {Path(checkpoint).name} (weights_sha256 differs)")
    elif Path(str(res.get("checkpoint", ""))).resolve() != Path(checkpoint).resolve():
        raise fail(f"measures {res.get('checkpoint')!r}, not {checkpoint} (and records no weights_sha256)")
    mine = model.reading
    for k in READING_KEYS:
        if k in res and res[k] != mine[k]:
            raise fail(f"was measured with {k} = {res[k]!r}, {Path(checkpoint).name} has {mine[k]!r}")
    return res


def ship(checkpoint: str | Path, evaluation: str | Path, out: str | Path,
         optimizer_of: str | Path | None = None) -> Path:
    """Write ``checkpoint`` to ``out`` with the test measures of ``evaluation`` as its
    ``metrics`` metadata (:data:`METRIC_KEYS`), and the JSON to :func:`metrics_path` of ``out``
    with its ``checkpoint`` field set to ``out``. Weights, prior and reading are unchanged.

    ``optimizer_of``: the training run (a checkpoint with ``.optim.safetensors`` beside it)
    whose weights these are; its Adam state is written beside ``out`` with bfloat16 moments
    (:func:`training.train.compact_train_state`, at most :data:`OPTIM_LIMIT` bytes), so a
    fresh checkout can fine-tune the shipped file with ``--init out --init-optimizer``.
    Without it, a side file left beside ``out`` by an earlier ship is removed (it belonged to
    other weights).

    Returns:
        ``out``.

    Raises:
        ShipError: see :func:`check_evaluation`; ``optimizer_of`` has other weights than
            ``checkpoint``, no optimizer state, or one over :data:`OPTIM_LIMIT` even compacted.
        CheckpointError: the checkpoint does not load or cannot be written.
    """
    from training.train import compact_train_state, optim_path

    res = check_evaluation(checkpoint, evaluation)
    out = Path(out)
    if optimizer_of is not None:
        if weights_fingerprint(optimizer_of, prior=False) != weights_fingerprint(checkpoint, prior=False):
            raise ShipError(f"{Path(optimizer_of).name}: other weights than {Path(checkpoint).name}; "
                            "its optimizer state would not belong to the shipped file")
        if not optim_path(optimizer_of).is_file():
            raise ShipError(f"{Path(optimizer_of).name}: no {optim_path(optimizer_of).name} beside it")
    metrics = {k: res[k] for k in METRIC_KEYS if k in res}
    metrics["evaluated_by"] = "python -m training evaluate (the .metrics.json beside the checkpoint)"
    update_metadata(checkpoint, {"metrics": metrics}, out)
    res = {**res, "checkpoint": str(out)}
    tmp = metrics_path(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    tmp.replace(metrics_path(out))
    side = optim_path(out)
    if optimizer_of is None:
        side.unlink(missing_ok=True)
    else:
        compact_train_state(optimizer_of, out)
        if side.stat().st_size > OPTIM_LIMIT:
            side.unlink()
            raise ShipError(f"{side.name}: the optimizer state of {Path(optimizer_of).name} is over "
                            f"{OPTIM_LIMIT // 2**20} MiB even in bfloat16; shipped without it")
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _angstrom(v) -> str:
    return "-" if v is None else f"{v:.3f} Å"


def results_table(assets: str | Path = "assets") -> str:
    """README's Markdown table of held-out results: one column per shipped checkpoint of
    :data:`ASSETS` (from its ``.metrics.json``) beside the paper's Sec. 4.1 and 4.2 numbers
    (Hoffmann et al. 2019).

    Raises:
        ShipError: a shipped checkpoint's JSON is missing or unreadable.
    """
    cols = {}
    for name in ASSETS:
        path = Path(assets) / f"{name}.metrics.json"
        try:
            cols[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShipError(f"{path}: cannot read the shipped evaluation ({exc})") from None
    tol = cols[ASSETS[0]].get("tol_A", 0.5)

    def head(name: str) -> str:
        how = "refined latent" if cols[name].get("refine_steps") else "encoder alone"
        return f"`{name}` ({how}{', default' if name == 'unit_cell' else ''})"

    def p2t(r: dict):
        return ((r.get("distances") or {}).get("pred_to_true") or {}).get("percentiles", {}).get("50")

    rows = [  # label, value of a column, paper Sec. 4.1, paper Sec. 4.2
        (f"true atoms with a predicted atom within {tol:g} Å", lambda r: _pct(r.get("atoms_within_tol")), "~99%", "-"),
        (f"predicted atoms within {tol:g} Å of a true atom", lambda r: _pct(r.get("pred_within_tol")), "-", "-"),
        ("median distance, predicted atom to nearest true atom", lambda r: _angstrom(p2t(r)), "-", "0.2 Å"),
        ("crystals with the exact atom count", lambda r: _pct(r.get("exact_count")), "~90%", "-"),
        ("crystals within ±2 atoms", lambda r: _pct(r.get("within2_count")), "97%", "-"),
        ("species exact (matched atoms)", lambda r: _pct(r.get("species_accuracy")), "66%", "65.4%"),
        ("species within ±2 Z (matched atoms)", lambda r: _pct(r.get("species_within2")), "98%", "-"),
        ("median position error (true atom to nearest predicted)", lambda r: _angstrom(r.get("median_error_A")),
         "-", "-"),
        ("voxel MSE (Eq. 1 units)", lambda r: "-" if r.get("voxel_mse") is None else f"{r['voxel_mse']:.2e}", "-", "-"),
        ("held-out crystals", lambda r: f"{r.get('n_crystals')} ({r.get('n_true_atoms')} atoms)", "-", "-"),
    ]
    lat = ASSETS[2]
    out = ["| measure | " + " | ".join(head(n) for n in ASSETS[:2]) + " | paper (Sec. 4.1) | " + head(lat)
           + " | paper (Sec. 4.2) |", "|---" * 6 + "|"]
    for label, cell, p41, p42 in rows:
        out.append(f"| {label} | {cell(cols[ASSETS[0]])} | {cell(cols[ASSETS[1]])} | {p41} | {cell(cols[lat])} | {p42} |")
    return "\n".join(out)


def update_readme(readme: str | Path = "README.md", assets: str | Path = "assets", check: bool = False) -> bool:
    """Write :func:`results_table` between :data:`BEGIN` and :data:`END` of ``readme``.

    Returns:
        True when the README's table differed (with ``check``, the file is left unchanged).

    Raises:
        ShipError: the markers are missing, or see :func:`results_table`.
    """
    readme = Path(readme)
    text = readme.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ShipError(f"{readme}: no results-table markers ({BEGIN} ... {END})")
    new = text[: i + len(BEGIN)] + "\n" + results_table(assets) + "\n" + text[j:]
    if new != text and not check:
        readme.write_text(new)
    return new != text


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="the evaluated checkpoint (.safetensors)")
    p.add_argument("--evaluation", required=True, help="its test evaluation (python -m training evaluate --json)")
    p.add_argument("--out", required=True, help="where it ships, e.g. assets/unit_cell.safetensors")
    p.add_argument("--optimizer-of", default=None, metavar="RUN",
                   help="the training run (checkpoint with .optim.safetensors beside it) of these weights: "
                        "its Adam state ships beside --out in bfloat16, for --init-optimizer fine-tunes")
    return p


def add_table_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--readme", default="README.md", help="README holding the results-table markers")
    p.add_argument("--assets", default="assets", help="folder of the shipped checkpoints' .metrics.json")
    p.add_argument("--check", action="store_true", help="exit 1 when the README's table differs; change nothing")
    return p


def run(a: argparse.Namespace) -> int:
    """``python -m training ship``: exit 0, or 2 with a one-line ``error: ...``."""
    try:
        out = ship(a.checkpoint, a.evaluation, a.out, getattr(a, "optimizer_of", None))
    except (ShipError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = load_checkpoint(out, jit=False).info["metrics"]
    from training.train import optim_path

    side = optim_path(out)
    beside = metrics_path(out).name + (f" and {side.name}" if side.is_file() else "")
    print(f"{out} ({beside} beside it): test atoms within 0.5 Å {_pct(m.get('atoms_within_tol'))}, "
          f"exact count {_pct(m.get('exact_count'))}, species {_pct(m.get('species_accuracy'))}")
    return 0


def run_table(a: argparse.Namespace) -> int:
    """``python -m training results-table``: exit 0; 1 when ``--check`` finds the table out of
    date; 2 with a one-line ``error: ...``."""
    try:
        changed = update_readme(a.readme, a.assets, check=a.check)
    except (ShipError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.check and changed:
        print(f"{a.readme}: the results table differs from {a.assets}/*.metrics.json "
              "(run python -m training results-table)", file=sys.stderr)
        return 1
    print(f"{a.readme}: results table {'rewritten' if changed else 'up to date'}")
    return 0
