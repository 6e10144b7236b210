"""``crystalstudio`` command line.

* ``crystalstudio [FILE ...]`` or ``crystalstudio gui [FILE ...]``: the desktop app.
* ``crystalstudio reconstruct FILE.cif [--checkpoint PATH] [--out recon.cif] [--json]``:
  encode, decode and segment one crystal and print the Sec. 4.1 measures.
* ``crystalstudio interpolate A.cif B.cif --frames 60 --fps 30 --size 1280x720 --out movie.mp4
  [--mode linear|spherical] [--orbit DEG] [--no-density] [--no-atoms]``: render the latent
  interpolation between two crystals (posterior means) off-screen to MP4 or GIF.
* ``crystalstudio sweep FILE.cif --dim K --frames N --out movie.mp4``: sweep latent
  dimension K from -3 to 3 around the encoded crystal.
* ``crystalstudio sample --n 8 --seed 0 --out DIR [--prior aggregate|standard] [--report]``:
  decode random draws (from the checkpoint's aggregate prior when it has one, else
  z ~ N(0, I)); write ``sample_000.cif`` / ``.png`` / ``.npy`` per draw; ``--report`` adds
  each draw's validity, a summary table and ``report.json``.
* ``crystalstudio export-density FILE.cif --out field.vti|field.npy``: the decoded density.

Bad input exits with status 2 and one line on stderr naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
COMMANDS = ("reconstruct", "interpolate", "sweep", "sample", "export-density", "gui")


def _fail(msg: str) -> int:
    print(f"crystalstudio: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _reconstruct(a: argparse.Namespace) -> int:
    from .core.checkpoint import CheckpointError
    from .io.structures import StructureError, write_cif, write_xyz
    from .session import Session

    try:
        session = Session(a.checkpoint, device=a.device)
        session.model.atoms_method = a.atoms
        if a.refine_steps is not None:
            session.model.refine_steps = a.refine_steps
        if a.window_origin is not None:
            try:
                session.set_window_origin([float(x) for x in a.window_origin.split(",")])
            except ValueError as exc:
                return _fail(f"--window-origin {a.window_origin}: {exc}")
        rec = session.reconstruct(session.read(a.file, block=a.block))
    except (StructureError, CheckpointError) as exc:
        return _fail(str(exc))
    meta = rec.crystal.meta
    m = dict(rec.metrics, file=a.file, formula=rec.crystal.name, atoms_method=a.atoms,
             refine_steps=session.model.refine_steps, checkpoint=str(session.model.path) if session.model.path else None,
             representation=session.model.representation, warnings=meta.get("warnings", []),
             block=meta.get("block"), n_blocks=meta.get("n_blocks", 1), disorder=meta.get("disorder"),
             note=meta.get("note"), window_origin=[float(x) for x in rec.window_origin])
    if rec.atoms.amplitude is not None:
        m["atoms"] = [{"Z": int(z), "position_A": [round(float(x), 4) for x in p], "amplitude": round(float(amp), 3),
                       "amplitude_sigma": round(float(sd), 3)}
                      for z, p, amp, sd in zip(rec.atoms.Z, rec.atoms.positions, rec.atoms.amplitude,
                                               rec.atoms.amplitude_sigma)]
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
        if m["note"]:
            print(f"note: {m['note']}", file=sys.stderr)
        for w in m["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
        med = "n/a" if m["median_error_A"] is None else f"{m['median_error_A']:.3f} Å"
        print(f"{m['formula']} ({a.file})\n"
              f"  atoms in / out              {m['n_true']} / {m['n_pred']}\n"
              f"  true atoms within 0.5 Å     {pct(m['atoms_within_tol'])}\n"
              f"  predicted within 0.5 Å      {pct(m['pred_within_tol'])}\n"
              f"  exact atom count            {'yes' if m['exact_count'] else 'no'}\n"
              f"  species accuracy (matched)  {pct(m['species_accuracy'])}\n"
              f"  median position error       {med}\n"
              f"  voxel MSE                   {m['voxel_mse']:.3e}\n"
              f"  checkpoint                  {Path(m['checkpoint']).name if m['checkpoint'] else '-'} "
              f"({m['representation']})")
        if m["disorder"]:
            d = m["disorder"]
            print(f"  input is disordered         {d['mixed_sites']} mixed and {d['vacant_sites']} partly vacant "
                  f"of {d['sites']} sites (compared with each site's dominant species)")
        if a.out:
            print(f"  written                     {a.out}")
    return 0


# --------------------------------------------------------------------------- headless exports


class _BadInput(Exception):
    """One-line message for :func:`_fail`."""


def _headless_gl() -> None:
    """Without a display, ask VTK for its EGL window directly (it would fall back to it anyway,
    after printing a warning about the missing X server)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def _size(text: str) -> tuple[int, int]:
    from .render.export import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise _BadInput(f"--size: {exc}") from None


def _out_file(path: str, check) -> Path:
    """Validate an output file name (suffix via ``check``, existing folder) before any work."""
    p = Path(path)
    try:
        check(p)
    except ValueError as exc:
        raise _BadInput(str(exc)) from None
    if not p.parent.is_dir():
        raise _BadInput(f"{p}: folder {str(p.parent)!r} does not exist")
    if p.is_dir():
        raise _BadInput(f"{p}: is a folder")
    return p


def _video_out(a: argparse.Namespace) -> tuple[Path, tuple[int, int]]:
    from .render.export import _check_video_size, video_format

    size = _size(a.size)
    out = _out_file(a.out, video_format)
    try:
        _check_video_size(video_format(out), size, out.name)
    except ValueError as exc:
        raise _BadInput(str(exc)) from None
    if a.frames < 2:
        raise _BadInput(f"--frames must be at least 2, got {a.frames}")
    if not 0 < a.fps <= 240:
        raise _BadInput(f"--fps must be in (0, 240], got {a.fps:g}")
    return out, size


def _session(a: argparse.Namespace):
    from .session import Session

    s = Session(a.checkpoint, device=a.device)
    s.model.atoms_method = getattr(a, "atoms", s.model.atoms_method)
    if getattr(a, "refine_steps", None) is not None:
        s.model.refine_steps = a.refine_steps
    return s


def _progress_bar(total: int, quiet: bool, desc: str):
    """``(callback(i, total) -> True, close())`` drawing a tqdm bar on stderr."""
    if quiet:
        return (lambda i, n: True), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="frame", desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def cb(i: int, n: int) -> bool:
        if i > bar.n:
            bar.update(i - bar.n)
        return True

    return cb, bar.close


def _cond(a: argparse.Namespace, session):
    """``--max-density`` checked against the model: a value for a conditional model, else None."""
    value = getattr(a, "max_density", None)
    if value is None:
        return None
    if not session.model.config.conditional:
        name = session.model.path.name if session.model.path else "the model"
        raise _BadInput(f"--max-density: {name} is not a conditional checkpoint (Sec. 4.5)")
    if not value > 0:
        raise _BadInput(f"--max-density must be positive, got {value:g}")
    return float(value)


def _render_video(a: argparse.Namespace, session, zs, out: Path, size, titles, cond=None) -> int:
    from .render.export import export_path

    cb, close = _progress_bar(len(zs), a.quiet, "rendering")
    try:
        export_path(session, zs, out, fps=a.fps, size=size, orbit_degrees=a.orbit, cond=cond,
                    show_density=not a.no_density, show_atoms=not a.no_atoms, progress=cb, titles=titles)
    finally:
        close()
    print(out)
    return 0


def _interpolate(a: argparse.Namespace) -> int:
    import numpy as np

    from .core.latent import interpolate

    out, size = _video_out(a)
    session = _session(a)
    cond = _cond(a, session)
    ra, rb = session.open(a.a), session.open(a.b)
    session.path.set_endpoint("A", ra.crystal.name, ra.z, ra)
    session.path.set_endpoint("B", rb.crystal.name, rb.z, rb)
    zs = interpolate(ra.z, rb.z, a.frames, a.mode)
    label = f"{ra.crystal.name} -> {rb.crystal.name}"
    titles = [f"{label}   t = {t:.2f}" for t in np.linspace(0.0, 1.0, a.frames)]
    if cond is None:  # a conditional model: A's and B's own largest densities, interpolated
        cond = session.endpoint_conds(a.frames)
    return _render_video(a, session, zs, out, size, titles, cond)


def _sweep(a: argparse.Namespace) -> int:
    from .core.latent import sweep

    out, size = _video_out(a)
    if not a.lo < a.hi:
        raise _BadInput(f"--range: need LO < HI, got {a.lo:g} {a.hi:g}")
    session = _session(a)
    if not 0 <= a.dim < session.model.latent:
        raise _BadInput(f"--dim {a.dim} out of range 0..{session.model.latent - 1}")
    cond = _cond(a, session)
    rec = session.open(a.file)
    zs = sweep(rec.z, a.dim, a.frames, a.lo, a.hi)
    titles = [f"{rec.crystal.name}   z[{a.dim}] = {v:+.2f}" for v in zs[:, a.dim]]
    return _render_video(a, session, zs, out, size, titles, session.natural_cond() if cond is None else cond)


def _formula(composition: dict) -> str:
    from .io.structures import element_symbol

    return "".join(f"{element_symbol(z)}{c if c > 1 else ''}" for z, c in sorted(composition.items())) or "-"


def _sample(a: argparse.Namespace) -> int:
    from .io.structures import write_cif
    from .io.validity import check_draw, reference_of, validity_report
    from .render.export import FrameRenderer, save_density_npy, save_png

    size = _size(a.size)
    if a.n < 1:
        raise _BadInput(f"--n must be at least 1, got {a.n}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise _BadInput(f"{out}: exists and is not a folder")
    session = _session(a)
    cond = _cond(a, session)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _BadInput(f"{out}: cannot create the folder ({exc.strerror or exc})") from None
    session.set_prior(a.prior)
    used = session.prior_in_use()
    if a.prior == "aggregate" and used != "aggregate":
        print(f"note: {session.model.path.name if session.model.path else 'the model'} has no aggregate prior "
              "(python -m training fit-prior adds one): drawing z ~ N(0, I)", file=sys.stderr)
    zs, conds = session.draw(a.n, a.seed)
    rows, n_cif, found = [], 0, []
    cb, close = _progress_bar(a.n, a.quiet, "sampling")
    try:
        with FrameRenderer(session.grid, size, show_density=not a.no_density, show_atoms=not a.no_atoms) as r:
            for i, z in enumerate(zs):
                f = session.decode(z, cond if cond is not None or conds is None else float(conds[i]))
                found.append((f.atoms.positions, f.atoms.Z))
                stem = out / f"sample_{i:03d}"
                save_density_npy(f.M_hat, stem.with_suffix(".npy"))
                save_png(r.render(f, title=f"sample {i}  (seed {a.seed})"), stem.with_suffix(".png"))
                note = ""
                if len(f.atoms):
                    write_cif(f.atoms.positions, f.atoms.Z, stem.with_suffix(".cif"), grid=session.grid)
                    n_cif += 1
                else:
                    note = "  (no atoms segmented: no CIF)"
                rd = f.readouts
                dmin = "n/a" if rd["min_distance_A"] is None else f"{rd['min_distance_A']:.2f} Å"
                why = f"  {check_draw(f.atoms.positions, f.atoms.Z).reason}" if a.report else ""
                rows.append(f"  {stem.name}  {rd['n_atoms']:3d} atoms  {_formula(rd['composition']):<16s} "
                            f"min distance {dmin}{note}{why}")
                cb(i + 1, a.n)
    finally:
        close()
    print(f"{a.n} samples (seed {a.seed}, {used} prior) in {out}: {a.n} PNG, {a.n} NPY, {n_cif} CIF")
    print("\n".join(rows))
    if a.report:
        counts, nel, forms = reference_of(session.model.prior.info if session.model.prior else None)
        rep = {"prior": used, "seed": a.seed, "checkpoint": str(session.model.path),
               **validity_report(found, counts, nel, forms)}
        print("\n" + format_validity(rep))
        (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
        print(f"report written to {out / 'report.json'}")
    return 0


def format_validity(rep: dict) -> str:
    """Markdown table of a :func:`~crystalstudio.io.validity.validity_report` dict."""
    pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
    num = (lambda v: "-" if v is None else f"{v:.2f}")
    lines = [f"| measure ({rep['n']} draws, {rep.get('prior', '?')} prior) | value |", "|---|---|",
             f"| structurally valid (all pairs >= 0.5 Å) | {pct(rep['structural_valid'])} |",
             f"| compositionally valid (SMACT) | {pct(rep['compositional_valid'])} |",
             f"| both | {pct(rep['valid'])} |",
             f"| atoms per draw (training fields) | {num(rep['atoms_per_draw'])} ({num(rep['real_atoms_per_crystal'])}) |",
             f"| atom-count Wasserstein distance | {num(rep['count_wasserstein'])} |",
             f"| element-count Wasserstein distance | {num(rep['n_elements_wasserstein'])} |",
             f"| unique (among valid) | {pct(rep['uniqueness'])} |",
             f"| novel formula (among valid unique) | {pct(rep['novelty'])} |"]
    return "\n".join(lines)


def _export_density(a: argparse.Namespace) -> int:
    from .render.export import save_density_npy, save_density_vti

    def check(p: Path) -> None:
        if p.suffix.lower() not in (".vti", ".npy"):
            raise ValueError(f"{p.name}: unsupported format {p.suffix or '(no suffix)'!r}; use .vti or .npy")

    out = _out_file(a.out, check)
    session = _session(a)
    rec = session.open(a.file)
    M = rec.M if a.input else rec.M_hat
    if out.suffix.lower() == ".vti":
        save_density_vti(M, session.grid, out)
    else:
        save_density_npy(M, out)
    print(out)
    return 0


def _headless(a: argparse.Namespace) -> int:
    """Run an export subcommand; bad input of any kind -> one line on stderr, exit 2."""
    from .core.checkpoint import CheckpointError
    from .io.structures import StructureError

    _headless_gl()
    run = {"interpolate": _interpolate, "sweep": _sweep, "sample": _sample, "export-density": _export_density}[a.cmd]
    try:
        return run(a)
    except (_BadInput, StructureError, CheckpointError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        name = exc.filename or getattr(a, "out", "")
        return _fail(f"{name}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("crystalstudio: interrupted (nothing written)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _add_render_args(sp: argparse.ArgumentParser, size: str = "1280x720") -> None:
    sp.add_argument("--size", default=size, help=f"image size WIDTHxHEIGHT in pixels (default {size})")
    sp.add_argument("--no-density", action="store_true", help="do not draw the density volume")
    sp.add_argument("--no-atoms", action="store_true", help="do not draw the segmented atoms")


def _add_common_args(sp: argparse.ArgumentParser, cond: bool = False) -> None:
    if cond:
        sp.add_argument("--max-density", type=float, default=None, metavar="RHO",
                        help="conditional checkpoints (Sec. 4.5): decode at this largest density "
                             "(Eq. 1 units; default: the crystals' own)")
    sp.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    sp.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_atoms_arg(sp)


def _add_atoms_arg(sp: argparse.ArgumentParser) -> None:
    from .core.checkpoint import ATOM_METHODS, DEFAULT_ATOMS_METHOD

    sp.add_argument("--atoms", choices=ATOM_METHODS, default=DEFAULT_ATOMS_METHOD,
                    help="how atoms are read from a decoded field: fit (least squares of Eq. 1, species "
                         "from the U-Net) or unet (the paper's argmax + connected components); "
                         f"default {DEFAULT_ATOMS_METHOD}")


def _steps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return n


def _add_refine_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--refine-steps", type=_steps, default=None, metavar="N",
                    help="Adam steps polishing the encoder's latent so that the decoder reproduces the input "
                         "(semi-amortised inference; 0 = the encoder alone, the paper's path; default: the "
                         "checkpoint's choice, 50)")


def _add_video_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--out", required=True, help="output video: .mp4 (H.264) or .gif")
    sp.add_argument("--frames", type=int, default=60, help="number of frames (default 60)")
    sp.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    sp.add_argument("--orbit", type=float, default=0.0, metavar="DEG",
                    help="turn the camera by DEG degrees over the video (default 0)")
    _add_render_args(sp)
    _add_common_args(sp, cond=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crystalstudio`` command: parse ``argv`` (None: ``sys.argv``), run the
    sub-command (``gui`` when none is given) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
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
    r.add_argument("--block", type=int, default=None, metavar="N",
                   help="the Nth structure (0-based) of a CIF with several data blocks (default the first)")
    r.add_argument("--window-origin", default=None, metavar="U,V,W",
                   help="repeating-lattice model: fractional coordinates of the cell at the cube's corner "
                        "(which 10 Å window of the lattice; default 0,0,0)")
    _add_atoms_arg(r)
    _add_refine_arg(r)

    i = sub.add_parser("interpolate", help="render the latent interpolation between two crystals to MP4/GIF")
    i.add_argument("a", metavar="A.cif", help="start crystal")
    i.add_argument("b", metavar="B.cif", help="end crystal")
    i.add_argument("--mode", choices=("linear", "spherical"), default="linear", help="interpolation (default linear)")
    _add_video_args(i)
    _add_refine_arg(i)
    w = sub.add_parser("sweep", help="render one latent dimension swept from -3 to 3 around a crystal")
    w.add_argument("file", help="CIF (or POSCAR / pymatgen JSON) file")
    w.add_argument("--dim", type=int, required=True, metavar="K", help="latent dimension to sweep")
    w.add_argument("--range", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LO", "HI"), dest="range_",
                   help="values of z[K] at the first and last frame (default -3 3)")
    _add_video_args(w)
    _add_refine_arg(w)
    s = sub.add_parser("sample", help="decode random latent draws to CIF, PNG and NPY")
    s.add_argument("--n", type=int, default=8, help="number of draws (default 8)")
    s.add_argument("--prior", choices=("aggregate", "standard"), default="aggregate",
                   help="aggregate: the checkpoint's Gaussian mixture fitted on the training crystals' "
                        "encodings (default; N(0, I) when it has none); standard: z ~ N(0, I) (Sec. 4.4)")
    s.add_argument("--report", action="store_true",
                   help="validity of each draw, a summary table and DIR/report.json")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    _add_render_args(s, "640x480")
    _add_common_args(s, cond=True)
    e = sub.add_parser("export-density", help="write the decoded density of a crystal as .vti (ParaView) or .npy")
    e.add_argument("file", help="CIF (or POSCAR / pymatgen JSON) file")
    e.add_argument("--out", required=True, help="output field: .vti or .npy")
    e.add_argument("--input", action="store_true", help="write the input field M instead of the decoded one")
    _add_common_args(e)
    _add_refine_arg(e)

    a = p.parse_args(argv)
    if a.cmd == "reconstruct":
        return _reconstruct(a)
    if a.cmd == "sweep":
        a.lo, a.hi = a.range_
    if a.cmd in ("interpolate", "sweep", "sample", "export-density"):
        return _headless(a)
    from .gui.app import main as gui_main

    return gui_main(a.files, a.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
