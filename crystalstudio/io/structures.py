"""Reading and writing crystal structures: the one module of crystalstudio that imports pymatgen.

Files become :class:`crystalstudio.core.density.Crystal` objects (plain numpy arrays, lengths
in Å) after checks that the rest of the program relies on: real elements, occupancies in
(0, 1] that sum to at most 1 per site (disordered and partly vacant sites are kept, one
entry per occupant, never silently ordered), at most 20,000 entries, and (when asked) a
cell whose atoms all stay inside the cube of a :class:`~crystalstudio.core.density.Grid`
under any rotation. pymatgen's warnings are kept in ``meta["warnings"]``; a CIF with
several data blocks reads the one asked for (:func:`cif_blocks` lists them). Parsing has a
time limit (:data:`PARSE_SECONDS`, main thread only). Every refusal is a
:class:`StructureError` whose message is one line, ``"<file name>: <reason>"``.

Reconstructed atoms (Cartesian Å in the cube frame, no lattice) are written as a cubic cell
whose edge is the cube's edge ``grid.length``.

Run ``python -m crystalstudio.io.structures --write-samples assets/samples`` to (re)write
the sample CIFs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
from monty.serialization import loadfn
from pymatgen.core import Element, Lattice, Structure
from pymatgen.io.cif import CifParser, CifWriter

from crystalstudio.core.density import Crystal, Grid, fits_in_cube

__all__ = [
    "StructureError",
    "read_structure",
    "read_cif_text",
    "crystal_to_structure",
    "structure_to_crystal",
    "atoms_to_structure",
    "write_cif",
    "write_xyz",
    "element_colors",
    "element_symbol",
    "element_radius",
    "covalent_radius",
    "build_prototypes",
    "write_samples",
    "MAX_ATOMS",
    "MAX_FILE_BYTES",
    "cif_blocks",
    "PARSE_SECONDS",
]

MAX_ATOMS = 20000  # entries (sites x occupants) per cell; only the atoms that reach the cube are used
PARSE_SECONDS = 20.0  # per file (enforced with SIGALRM in the main thread)
OCCUPANCY_TOLERANCE = 1.05  # pymatgen scales site occupancy sums in (1, 1.05] down to 1
MAX_FILE_BYTES = 20 * 1024 * 1024
_OCCU_TOL = 1e-3  # occupancies within this of 1 count as full
_GREY = (0.5, 0.5, 0.5)


class StructureError(ValueError):
    """A structure that cannot be read or used. ``str(err)`` is one line ``"<name>: <reason>"``.

    Attributes:
        name: the file name (or label) of the structure.
        reason: why it was refused, one line.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = str(name)
        reason = " ".join(str(reason).split()) or "unknown error"
        self.reason = reason if len(reason) <= 300 else reason[:297] + "..."
        super().__init__(f"{self.name}: {self.reason}")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_Timeout` after ``seconds`` (SIGALRM; a no-op off the main thread or on Windows)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _guarded(name: str, what: str, fn):
    """Run ``fn()`` with warnings recorded and a time limit; any exception becomes a StructureError.

    Returns ``(result, warning messages)``.
    """
    with warnings.catch_warnings(record=True) as caught, _time_limit(PARSE_SECONDS):
        warnings.simplefilter("always")
        try:
            out = fn()
        except StructureError:
            raise
        except _Timeout:
            raise StructureError(name, f"parsing the {what} took longer than {PARSE_SECONDS:g} s") from None
        except Exception as exc:  # pymatgen raises many kinds; none may escape raw
            msg = str(exc)
            if "no structures" in msg.lower():
                raise StructureError(name, f"no crystal structure found in the {what}") from exc
            if "unrecognized extension" in msg.lower():
                raise StructureError(name, "unsupported file type (read .cif, POSCAR/CONTCAR/.vasp, "
                                           "pymatgen .json)") from exc
            raise StructureError(name, f"cannot parse the {what} ({type(exc).__name__}: {msg})") from exc
    return out, list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


# --------------------------------------------------------------------------- reading


def read_structure(path: str | os.PathLike, grid: Grid | None = None, require_fit: bool = True,
                   block: int | None = None) -> Crystal:
    """Read a crystal from a file into a :class:`Crystal`.

    ``.cif``/``.mcif`` files go through pymatgen's ``CifParser`` with the symmetry operations
    applied (``primitive=False``, so the cell is the one written in the file); other formats
    that pymatgen's ``Structure.from_file`` recognises by name (``POSCAR``, ``CONTCAR``,
    ``*.vasp``, ``*.json``, ...) are read with it. A CIF's structure ``block`` (0-based, among
    the data blocks that hold a structure; default the first) is read.

    Args:
        path: the file.
        grid: the cube the cell must fit (default ``Grid()``, a 10 Å cube).
        require_fit: refuse cells with an atom farther than ``grid.length / 2`` Å from the
            cell centre (see :func:`fits_in_cube`).

    Returns:
        Crystal with lattice (3, 3) float64 rows a, b, c in Å, frac (N, 3) float64,
        Z (N,) int64, occupancy (N,) or None, name the reduced formula, meta ``{"path":
        absolute path str, "formula": reduced formula, "warnings": [pymatgen warning
        messages], "block": data block name, "n_blocks": structures in the file,
        "disorder": {"sites", "mixed_sites", "vacant_sites"} (disordered crystals only),
        "fit_reason": why the cell does not fit the cube (only when it does not)}``.

    Raises:
        StructureError: missing or unreadable file, larger than 20 MB, empty, not
            parseable, parsing slower than 20 s, no structure, a block that is not there,
            occupancies summing above 1, unknown elements or dummy species, no atoms, more
            than 20,000 entries, degenerate cell, or (with ``require_fit``) a cell too
            large for the cube.
    """
    p = Path(path)
    name = p.name or str(p)
    try:
        if not p.exists():
            raise StructureError(name, "file not found")
        if not p.is_file():
            raise StructureError(name, "not a regular file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise StructureError(name, f"file too large ({size / 2**20:.1f} MB; limit {MAX_FILE_BYTES // 2**20} MB)")
        if size == 0:
            raise StructureError(name, "empty file")
        if p.suffix.lower() in (".cif", ".mcif"):
            raw = p.read_bytes()
        else:
            raw = None
    except OSError as exc:
        raise StructureError(name, f"cannot read the file ({exc.strerror or exc})") from exc
    meta = {"path": str(p.resolve())}
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return read_cif_text(text, name, grid=grid, require_fit=require_fit, _meta=meta, block=block)
    structure, warns = _guarded(name, "file", lambda: Structure.from_file(p, primitive=False))
    return _to_crystal(structure, name, grid, require_fit, {**meta, "warnings": warns})


def _parse_cif(text: str, name: str) -> tuple[list[tuple[str, Structure]], list[str]]:
    """(block name, structure) of every data block of ``text`` that holds a structure, and
    pymatgen's warnings; blocks without one (or that fail) are left out with a warning."""
    def parse():
        parser = CifParser.from_str(text, occupancy_tolerance=OCCUPANCY_TOLERANCE)
        out = []
        for key, block in parser._cif.data.items():  # noqa: SLF001 - the block names of the parsed file
            try:
                s = parser._get_structure(block, primitive=False, symmetrized=False,  # noqa: SLF001
                                          check_occu=True)
            except Exception as exc:  # noqa: BLE001 - one bad block must not hide the others
                why = (f"lacks {exc.args[0]}" if isinstance(exc, KeyError) and exc.args
                       else " ".join(str(exc).split())[:160])
                warnings.warn(f"data block {key}: {why}")
                continue
            if s is not None:
                out.append((key, s))
        return out

    return _guarded(name, "CIF", parse)


def cif_blocks(path: str | os.PathLike) -> list[str]:
    """Names of the data blocks of a CIF file that hold a structure (in file order).

    Raises:
        StructureError: unreadable or unparseable file.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise StructureError(p.name, f"cannot read the file ({exc.strerror or exc})") from exc
    return [k for k, _ in _parse_cif(text, p.name)[0]]


def read_cif_text(text: str, name: str = "<string>", grid: Grid | None = None, require_fit: bool = True,
                  _meta: dict | None = None, block: int | None = None) -> Crystal:
    """Parse CIF text (symmetry expanded, ``primitive=False``) into a validated :class:`Crystal`.

    Same checks, return value and errors as :func:`read_structure`; ``name`` labels the
    errors, and ``meta["path"]`` is None.
    """
    if not text.strip():
        raise StructureError(name, "empty file")
    structures, warns = _parse_cif(text, name)
    if not structures:
        why = next((w for w in warns if w.startswith("data block")), "")
        raise StructureError(name, f"cannot parse the CIF ({why})" if why else "no crystal structure found in the CIF")
    k = 0 if block is None else int(block)
    if not 0 <= k < len(structures):
        raise StructureError(name, f"no structure block {k} (the file has {len(structures)}: "
                                   f"{', '.join(b for b, _ in structures[:5])})")
    if len(structures) > 1 and block is None:
        warns.append(f"{len(structures)} data blocks; the first ({structures[0][0]}) was read")
    meta = {"path": None, **(_meta or {}), "warnings": warns, "block": structures[k][0], "n_blocks": len(structures)}
    return _to_crystal(structures[k][1], name, grid, require_fit, meta)


def _to_crystal(structure: Structure, name: str, grid: Grid | None, require_fit: bool, meta: dict) -> Crystal:
    """Validate a pymatgen structure and convert it (errors labelled with ``name``)."""
    n = len(structure)
    if n == 0:
        raise StructureError(name, "no atoms")
    if n > MAX_ATOMS:
        raise StructureError(name, f"too many atoms ({n}; limit {MAX_ATOMS})")
    Z, occ, frac = [], [], []
    mixed = vacant = 0
    for i, site in enumerate(structure):
        label = getattr(site, "label", None) or f"#{i + 1}"
        comp = site.species
        total = 0.0
        for sp, occu in comp.items():
            el = getattr(sp, "element", sp)  # Species -> Element; DummySpecies has none
            if not isinstance(el, Element) or not 1 <= el.Z <= 118:
                raise StructureError(name, f"unknown element or dummy species {sp.symbol!r} (site {label})")
            if not occu > 0:
                continue
            Z.append(el.Z)
            occ.append(min(float(occu), 1.0))
            frac.append(site.frac_coords)
            total += float(occu)
        if total > 1 + _OCCU_TOL:
            raise StructureError(name, f"site {label} has occupancies summing to {total:g} > 1 ({comp.formula})")
        mixed += len(comp) > 1
        vacant += total < 1 - _OCCU_TOL
    if not Z:
        raise StructureError(name, "no atoms")
    if len(Z) > MAX_ATOMS:
        raise StructureError(name, f"too many atoms ({len(Z)}; limit {MAX_ATOMS})")
    lattice = np.array(structure.lattice.matrix, np.float64)
    if not np.all(np.isfinite(lattice)) or abs(np.linalg.det(lattice)) < 1e-3:
        raise StructureError(name, "degenerate cell (zero volume)")
    formula = structure.composition.reduced_formula
    occ = np.array(occ)
    occ[occ > 1 - _OCCU_TOL] = 1.0
    meta = {**meta, "formula": formula}
    if mixed or vacant:
        meta["disorder"] = {"sites": n, "mixed_sites": int(mixed), "vacant_sites": int(vacant)}
    crystal = Crystal(lattice, np.array(frac, np.float64), np.array(Z, np.int64), name=formula, meta=meta,
                      occupancy=occ)
    grid = grid or Grid()
    if not fits_in_cube(crystal, grid):
        r = np.linalg.norm(crystal.cartesian() - 0.5 * lattice.sum(axis=0), axis=1).max()
        reason = (f"cell too large for the {grid.length:g} Å cube (atom {r:.1f} Å from the cell centre; "
                  f"limit {0.5 * grid.length:.1f} Å)")
        if require_fit:
            raise StructureError(name, reason)
        crystal.meta["fit_reason"] = reason
    return crystal


# --------------------------------------------------------------------------- conversion


def crystal_to_structure(crystal: Crystal) -> Structure:
    """The pymatgen ``Structure`` of a :class:`Crystal` (same lattice, fractional coordinates, Z;
    a disordered crystal's occupants at one site become one site of mixed occupancy)."""
    if crystal.occupancy is None:
        return Structure(Lattice(crystal.lattice), [Element.from_Z(int(z)) for z in crystal.Z], crystal.frac)
    first, inv = crystal.site_index()
    species = [{Element.from_Z(int(z)): float(o) for z, o in zip(crystal.Z[inv == s], crystal.occupancy[inv == s])}
               for s in range(len(first))]
    return Structure(Lattice(crystal.lattice), species, crystal.frac[first])


def structure_to_crystal(structure: Structure, name: str | None = None, grid: Grid | None = None,
                         require_fit: bool = False) -> Crystal:
    """A validated :class:`Crystal` from a pymatgen ``Structure``.

    Args:
        structure: an ordered structure of real elements (at most 500 sites).
        name: the crystal's name and the label of errors (default the reduced formula).
        grid, require_fit: as in :func:`read_structure` (no fit check by default).

    Raises:
        StructureError: as :func:`read_structure` does for the structure's content.
    """
    label = name or structure.composition.reduced_formula
    crystal = _to_crystal(structure, label, grid, require_fit, {"path": None, "warnings": []})
    crystal.name = label
    return crystal


def atoms_to_structure(positions: np.ndarray, Z: np.ndarray, grid: Grid | None = None) -> Structure:
    """Reconstructed atoms as a pymatgen ``Structure``.

    The atoms have no lattice of their own, so they are placed in a cubic cell of edge
    ``grid.length`` Å whose origin is the cube's corner: fractional coordinates are
    ``positions / grid.length`` (atoms outside the cube keep coordinates outside [0, 1)).

    Args:
        positions: (N, 3) Cartesian Å in the cube frame ``[0, length]^3``.
        Z: (N,) atomic numbers; entries with Z == 0 (padding/empty) are skipped.
        grid: the cube (default ``Grid()``).

    Raises:
        ValueError: mismatched shapes, Z outside 0..118, or no atoms left.
    """
    grid = grid or Grid()
    pos, Z = _atoms(positions, Z)
    if len(Z) == 0:
        raise ValueError("no atoms (all Z are 0)")
    return Structure(Lattice.cubic(grid.length), [Element.from_Z(int(z)) for z in Z], pos,
                     coords_are_cartesian=True)


def _atoms(positions, Z) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(positions, np.float64).reshape(-1, 3)
    Z = np.asarray(Z, np.int64).reshape(-1)
    if len(pos) != len(Z):
        raise ValueError(f"{len(pos)} positions but {len(Z)} atomic numbers")
    if np.any((Z < 0) | (Z > 118)):
        raise ValueError(f"atomic numbers must be in 0..118, got {sorted(set(Z[(Z < 0) | (Z > 118)].tolist()))}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions must be finite")
    keep = Z > 0
    return pos[keep], Z[keep]


# --------------------------------------------------------------------------- writing


def _atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write text to a temp file beside ``path`` and ``os.replace`` it, so no broken file is left."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def write_cif(positions: np.ndarray, Z: np.ndarray, path: str | os.PathLike, grid: Grid | None = None) -> Path:
    """Write reconstructed atoms as a P1 CIF (pymatgen ``CifWriter``) in a cubic cell of edge ``grid.length``.

    Args: as :func:`atoms_to_structure`; ``path`` the CIF to write (replaced atomically).

    Returns:
        the path written.

    Raises:
        ValueError: as :func:`atoms_to_structure`; OSError when the folder is not writable.
    """
    return _atomic_write(path, str(CifWriter(atoms_to_structure(positions, Z, grid))))


def write_xyz(positions: np.ndarray, Z: np.ndarray, path: str | os.PathLike, comment: str = "") -> Path:
    """Write atoms as a plain XYZ file: count, comment line, then ``symbol x y z`` in Å.

    Args:
        positions: (N, 3) Cartesian Å; Z: (N,) atomic numbers (Z == 0 skipped).
        path: the file to write (replaced atomically).
        comment: the second line (line breaks become spaces).

    Raises:
        ValueError: mismatched shapes or Z outside 0..118; OSError when not writable.
    """
    pos, Z = _atoms(positions, Z)
    lines = [str(len(Z)), " ".join(str(comment).split())]
    lines += [f"{element_symbol(z):<2s} {x:14.8f} {y:14.8f} {w:14.8f}" for z, (x, y, w) in zip(Z, pos)]
    return _atomic_write(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- elements


@functools.lru_cache(maxsize=1)
def _color_tables() -> dict:
    """pymatgen's ``ElementColorSchemes.yaml``: {"Jmol"|"VESTA": {symbol: [r, g, b] 0..255}}."""
    return loadfn(str(resources.files("pymatgen.vis") / "ElementColorSchemes.yaml"))


def element_colors(Z: np.ndarray, scheme: str = "jmol") -> np.ndarray:
    """RGB colours of atomic numbers from pymatgen's Jmol or VESTA table.

    Args:
        Z: (K,) atomic numbers (any int array-like).
        scheme: "jmol" or "vesta" (case-insensitive).

    Returns:
        (K, 3) float64 in 0..1; neutral grey (0.5, 0.5, 0.5) for Z missing from the table.

    Raises:
        ValueError: unknown scheme.
    """
    key = {"jmol": "Jmol", "vesta": "VESTA"}.get(str(scheme).lower())
    if key is None:
        raise ValueError(f"colour scheme must be 'jmol' or 'vesta', got {scheme!r}")
    table = _color_tables()[key]
    Z = np.asarray(Z, np.int64).reshape(-1)
    out = np.empty((len(Z), 3), np.float64)
    for i, z in enumerate(Z):
        rgb = table.get(element_symbol(z))
        out[i] = np.asarray(rgb, np.float64) / 255.0 if rgb is not None else _GREY
    return out


def element_symbol(Z: int) -> str:
    """Element symbol of atomic number Z (1..118); "X" for anything else."""
    z = int(Z)
    return Element.from_Z(z).symbol if 1 <= z <= 118 else "X"


def covalent_radius(Z: int) -> float:
    """Covalent radius in Å (pymatgen's table, Cordero et al. 2008); the atomic radius when
    the table has none."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    z = int(Z)
    if 1 <= z <= 118:
        r = CovalentRadius.radius.get(Element.from_Z(z).symbol)
        if r:
            return float(r)
    return element_radius(z)


def element_radius(Z: int) -> float:
    """Atomic radius in Å from pymatgen (empirical, else calculated); 1.0 when unknown."""
    z = int(Z)
    if 1 <= z <= 118:
        el = Element.from_Z(z)
        with warnings.catch_warnings():  # pymatgen warns when it has no data
            warnings.simplefilter("ignore")
            for r in (el.atomic_radius, el.atomic_radius_calculated):
                if r is not None:
                    return float(r)
    return 1.0


# --------------------------------------------------------------------------- prototypes


def build_prototypes() -> dict[str, Structure]:
    """Four textbook crystals that fit the default 10 Å cube, built with ``Structure.from_spacegroup``.

    - ``NaCl``: rock salt, Fm-3m, a = 5.64 Å, conventional cell (8 atoms; the corner atoms are
      4.88 Å from the cell centre, just inside the 5 Å limit).
    - ``Si``: diamond, Fd-3m, a = 5.431 Å, conventional cell (8 atoms).
    - ``SrTiO3``: cubic perovskite, Pm-3m, a = 3.905 Å (5 atoms).
    - ``Ti2MnIn``: full Heusler, L2_1 type (Fm-3m; Ti 8c, Mn 4a, In 4b), a = 6.39 Å. The
      conventional cell (16 atoms, corners 5.53 Å from the centre) does not fit, nor does the
      primitive rhombohedral cell with an atom on its corner (also 5.53 Å), so this is the
      4-atom primitive cell with its origin shifted by (1/8, 1/8, 1/8): all atoms then lie
      on the body diagonal, at most 4.15 Å from the centre.

    Returns:
        {name: Structure}, keys ``NaCl``, ``Si``, ``SrTiO3``, ``Ti2MnIn``.
    """
    cubic = Lattice.cubic
    heusler = Structure.from_spacegroup("Fm-3m", cubic(6.39), ["Ti", "Mn", "In"],
                                        [[0.25, 0.25, 0.25], [0, 0, 0], [0.5, 0.5, 0.5]])
    heusler = heusler.get_primitive_structure()
    heusler.translate_sites(range(len(heusler)), [0.125] * 3, frac_coords=True, to_unit_cell=True)
    return {
        "NaCl": Structure.from_spacegroup("Fm-3m", cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "Si": Structure.from_spacegroup("Fd-3m", cubic(5.431), ["Si"], [[0, 0, 0]]),
        "SrTiO3": Structure.from_spacegroup("Pm-3m", cubic(3.905), ["Sr", "Ti", "O"],
                                            [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]]),
        "Ti2MnIn": heusler,
    }


def write_samples(folder: str | os.PathLike) -> list[Path]:
    """Write ``NaCl.cif``, ``Si.cif``, ``SrTiO3.cif`` and ``Ti2MnIn.cif`` (P1, CifWriter) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [_atomic_write(folder / f"{name}.cif", str(CifWriter(s))) for name, s in build_prototypes().items()]


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crystalstudio.io.structures")
    ap.add_argument("--write-samples", metavar="FOLDER", required=True, help="write the sample CIFs here")
    for p in write_samples(ap.parse_args(argv).write_samples):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
