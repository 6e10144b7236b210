"""Reading and writing crystal structures: the one module of crystalstudio that imports pymatgen.

Files become :class:`crystalstudio.core.density.Crystal` objects (plain numpy arrays, lengths
in Å) after checks that the rest of the program relies on: one ordered element per site,
at most 500 atoms, and (by default) a cell whose atoms all stay inside the cube of a
:class:`~crystalstudio.core.density.Grid` under any rotation. Every refusal is a
:class:`StructureError` whose message is one line, ``"<file name>: <reason>"``.

Reconstructed atoms (Cartesian Å in the cube frame, no lattice) are written as a cubic cell
whose edge is the cube's edge ``grid.length``.

Run ``python -m crystalstudio.io.structures --write-samples assets/samples`` to (re)write
the sample CIFs.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
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
    "build_prototypes",
    "write_samples",
    "MAX_ATOMS",
    "MAX_FILE_BYTES",
]

MAX_ATOMS = 500
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


def _guarded(name: str, what: str, fn):
    """Run ``fn()`` with warnings recorded; any exception becomes a StructureError.

    Returns ``(result, warning messages)``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except StructureError:
            raise
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


def read_structure(path: str | os.PathLike, grid: Grid | None = None, require_fit: bool = True) -> Crystal:
    """Read a crystal from a file into a :class:`Crystal`.

    ``.cif``/``.mcif`` files go through pymatgen's ``CifParser`` with the symmetry operations
    applied (``primitive=False``, so the cell is the one written in the file); other formats
    that pymatgen's ``Structure.from_file`` recognises by name (``POSCAR``, ``CONTCAR``,
    ``*.vasp``, ``*.json``, ...) are read with it. Only the first structure of a file is used.

    Args:
        path: the file.
        grid: the cube the cell must fit (default ``Grid()``, a 10 Å cube).
        require_fit: refuse cells with an atom farther than ``grid.length / 2`` Å from the
            cell centre (see :func:`fits_in_cube`).

    Returns:
        Crystal with lattice (3, 3) float64 rows a, b, c in Å, frac (N, 3) float64,
        Z (N,) int64, name the reduced formula, meta ``{"path": absolute path str,
        "formula": reduced formula, "warnings": [pymatgen warning messages]}``.

    Raises:
        StructureError: missing or unreadable file, larger than 20 MB, empty, not
            parseable, no structure, partial occupancy, vacancies, unknown elements or
            dummy species, no atoms, more than 500 atoms, degenerate cell, or (with
            ``require_fit``) a cell too large for the cube.
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
        return read_cif_text(text, name, grid=grid, require_fit=require_fit, _meta=meta)
    structure, warns = _guarded(name, "file", lambda: Structure.from_file(p, primitive=False))
    return _to_crystal(structure, name, grid, require_fit, {**meta, "warnings": warns})


def read_cif_text(text: str, name: str = "<string>", grid: Grid | None = None, require_fit: bool = True,
                  _meta: dict | None = None) -> Crystal:
    """Parse CIF text (symmetry expanded, ``primitive=False``) into a validated :class:`Crystal`.

    Same checks, return value and errors as :func:`read_structure`; ``name`` labels the
    errors, and ``meta["path"]`` is None.
    """
    if not text.strip():
        raise StructureError(name, "empty file")

    def parse():
        return CifParser.from_str(text).parse_structures(primitive=False, on_error="raise")

    structures, warns = _guarded(name, "CIF", parse)
    if not structures:
        raise StructureError(name, "no crystal structure found in the CIF")
    if len(structures) > 1:
        warns.append(f"{len(structures)} data blocks; only the first was read")
    meta = {"path": None, **(_meta or {}), "warnings": warns}
    return _to_crystal(structures[0], name, grid, require_fit, meta)


def _to_crystal(structure: Structure, name: str, grid: Grid | None, require_fit: bool, meta: dict) -> Crystal:
    """Validate a pymatgen structure and convert it (errors labelled with ``name``)."""
    n = len(structure)
    if n == 0:
        raise StructureError(name, "no atoms")
    if n > MAX_ATOMS:
        raise StructureError(name, f"too many atoms ({n}; limit {MAX_ATOMS})")
    Z = np.empty(n, np.int64)
    for i, site in enumerate(structure):
        label = getattr(site, "label", None) or f"#{i + 1}"
        comp = site.species
        if len(comp) != 1:
            raise StructureError(name, f"partial occupancy (disordered site {label}: {comp.formula})")
        (sp, occu), = comp.items()
        el = getattr(sp, "element", sp)  # Species -> Element; DummySpecies has none
        if not isinstance(el, Element) or not 1 <= el.Z <= 118:
            raise StructureError(name, f"unknown element or dummy species {sp.symbol!r} (site {label})")
        if occu < 1 - _OCCU_TOL:
            raise StructureError(name, f"vacancies (site {label} {el.symbol} has occupancy {occu:g})")
        if occu > 1 + _OCCU_TOL:
            raise StructureError(name, f"site {label} has occupancy {occu:g} > 1")
        Z[i] = el.Z
    lattice = np.array(structure.lattice.matrix, np.float64)
    if not np.all(np.isfinite(lattice)) or abs(np.linalg.det(lattice)) < 1e-3:
        raise StructureError(name, "degenerate cell (zero volume)")
    formula = structure.composition.reduced_formula
    crystal = Crystal(lattice, np.array(structure.frac_coords, np.float64), Z, name=formula,
                      meta={**meta, "formula": formula})
    if require_fit:
        grid = grid or Grid()
        if not fits_in_cube(crystal, grid):
            r = np.linalg.norm(crystal.cartesian() - 0.5 * lattice.sum(axis=0), axis=1).max()
            raise StructureError(name, f"cell too large for the {grid.length:g} Å cube (atom {r:.1f} Å "
                                       f"from the cell centre; limit {0.5 * grid.length:.1f} Å)")
    return crystal


# --------------------------------------------------------------------------- conversion


def crystal_to_structure(crystal: Crystal) -> Structure:
    """The pymatgen ``Structure`` of a :class:`Crystal` (same lattice, fractional coordinates, Z)."""
    return Structure(Lattice(crystal.lattice), [Element.from_Z(int(z)) for z in crystal.Z], crystal.frac)


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
