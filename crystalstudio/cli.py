"""``crystalstudio`` command line.

* ``crystalstudio [FILE ...]`` or ``crystalstudio gui [FILE ...]``: the desktop app.
* ``crystalstudio reconstruct FILE.cif [--checkpoint PATH] [--out recon.cif] [--json]``:
  encode, decode and segment one crystal and print the Sec. 4.1 measures.

Bad input exits with status 2 and one line on stderr naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> int:
    print(f"crystalstudio: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _reconstruct(a: argparse.Namespace) -> int:
    from .core.checkpoint import CheckpointError
    from .io.structures import StructureError, write_cif, write_xyz
    from .session import Session

    try:
        session = Session(a.checkpoint, device=a.device)
        rec = session.open(a.file)
    except (StructureError, CheckpointError) as exc:
        return _fail(str(exc))
    m = dict(rec.metrics, file=a.file, formula=rec.crystal.name,
             checkpoint=str(session.model.path) if session.model.path else None)
    if a.out:
        try:
            writer = write_xyz if a.out.lower().endswith(".xyz") else write_cif
            if len(rec.atoms) == 0:
                return _fail(f"{a.out}: no atoms were segmented, nothing to write")
            writer(rec.atoms.positions, rec.atoms.Z, a.out, **({} if writer is write_xyz else {"grid": session.grid}))
            m["out"] = a.out
        except OSError as exc:
            return _fail(f"{a.out}: {exc.strerror or exc}")
    if a.json:
        print(json.dumps(m))
    else:
        pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
        med = "n/a" if m["median_error_A"] is None else f"{m['median_error_A']:.3f} Å"
        print(f"{m['formula']} ({a.file})\n"
              f"  atoms in / out              {m['n_true']} / {m['n_pred']}\n"
              f"  true atoms within 0.5 Å     {pct(m['atoms_within_tol'])}\n"
              f"  predicted within 0.5 Å      {pct(m['pred_within_tol'])}\n"
              f"  exact atom count            {'yes' if m['exact_count'] else 'no'}\n"
              f"  species accuracy (matched)  {pct(m['species_accuracy'])}\n"
              f"  median position error       {med}\n"
              f"  voxel MSE                   {m['voxel_mse']:.3e}")
        if a.out:
            print(f"  written                     {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("reconstruct", "gui", "-h", "--help", "--version"):
        argv = ["gui", *argv]
    p = argparse.ArgumentParser(prog="crystalstudio", description="Explore learned 3-D crystal representations.")
    p.add_argument("--version", action="version", version=f"crystalstudio {__import__('crystalstudio').__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gui", help="open the desktop app (default)")
    g.add_argument("files", nargs="*", help="structure files to open")
    g.add_argument("--checkpoint", default=None, help="model checkpoint (.safetensors)")
    r = sub.add_parser("reconstruct", help="encode, decode and segment one crystal; print the measures")
    r.add_argument("file", help="CIF (or POSCAR / pymatgen JSON) file")
    r.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    r.add_argument("--out", default=None, help="write the reconstructed atoms (.cif or .xyz)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    a = p.parse_args(argv)
    if a.cmd == "reconstruct":
        return _reconstruct(a)
    from .gui.app import main as gui_main

    return gui_main(a.files, a.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
