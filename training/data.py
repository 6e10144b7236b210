"""Crystal data sets as compact arrays, and on-the-fly voxelisation.

``prepare`` (CPU, needs pymatgen through ``crystalstudio.io``) turns CSV files in the
CDVAE layout (a ``cif`` column) or folders of CIFs into one ``.npz`` file:

* ``lattice`` (C, 3, 3) float32 Å, ``offsets`` (C + 1,) int64 into the atom arrays,
* ``frac`` (A, 3) float32, ``Z`` (A,) uint8,
* ``split`` (C,) uint8 (0 train, 1 val, 2 test), ``ids`` / ``formula`` / ``source`` strings.

Splits are drawn per reduced formula (a hash of it), so one composition never sits on
both sides, and duplicates across the source files (same formula, site count and volume
per atom to 0.1 Å^3) are kept once. Only crystals whose cell fits the cube under every
rotation are kept (:func:`crystalstudio.core.density.fits_in_cube`), unless ``fit="some"``:
then a training crystal whose cell fits under at least ``min_fit`` of random rotations is
kept too, with that fraction in ``fit_fraction`` (C,) float32 (1 for the others), and
:func:`cube_rotations` draws its rotations by rejection, among those under which it fits.
Validation and test crystals are the same either way (a larger cell there is left out as
before), so the two splits, and every number measured on them, do not move.

The ``.npz`` needs only numpy to read, so it travels to the GPU machine, where
:class:`CrystalArrays` + :func:`voxelise` build M and S on the GPU with a fresh random
rotation each time a crystal is drawn.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crystalstudio.core.density import (Crystal, Grid, cell_positions, density_fields, fits_in_cube, fits_rotated,
                                       lattice_positions, pad_batch, random_rotations)

SPLITS = {"train": 0, "val": 1, "test": 2}


def _split_of(formula: str, val: float, test: float) -> int:
    h = int(hashlib.sha1(formula.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return 2 if h < test else (1 if h < test + val else 0)


def _iter_sources(paths: list[str]):
    """Yield (source, id, cif_text) from CSV files and folders/files of CIFs."""
    csv.field_size_limit(sys.maxsize)
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.glob("*.cif")):
                yield p.name, f.stem, f.read_text(errors="replace")
        elif p.suffix.lower() == ".csv":
            with open(p, newline="") as fh:
                for i, row in enumerate(csv.DictReader(fh)):
                    yield f"{p.parent.name}/{p.name}", row.get("material_id") or f"row{i}", row["cif"]
        else:
            yield p.parent.name, p.stem, p.read_text(errors="replace")


FIT_PROBES = 256  #: random rotations per crystal with which ``prepare(fit="some")`` measures its fit fraction


def prepare(paths: list[str], out: str, grid: Grid = Grid(), val: float = 0.05, test: float = 0.1,
            max_atoms: int = 64, require_fit: bool = True, fit: str = "every", min_fit: float = 0.02,
            partial_splits: tuple[str, ...] = ("train",)) -> dict:
    """Convert structures to the compact ``.npz`` described in the module docstring.

    ``require_fit=False`` keeps cells larger than the cube (for representation 2, where
    the cube is filled with the lattice whatever the cell size). ``fit="some"`` also keeps a
    training crystal whose centred cell fits the cube under at least ``min_fit`` of
    :data:`FIT_PROBES` random rotations (seeded by its formula, so a rerun keeps the same
    crystals); validation and test crystals still need every rotation, unless named in
    ``partial_splits`` (a measuring set of larger cells; never the file a model ships with).

    Returns a summary dict (counts per split, rejections by reason, ``partial_fit``: crystals
    kept that fit some rotations only).

    Raises:
        ValueError: ``fit`` is not "every" or "some", ``min_fit`` is not in (0, 1], or
            ``partial_splits`` names an unknown split.
    """
    from tqdm import tqdm

    from crystalstudio.io.structures import StructureError, read_cif_text

    if fit not in ("every", "some"):
        raise ValueError(f"fit must be 'every' or 'some', not {fit!r}")
    if not 0.0 < min_fit <= 1.0:
        raise ValueError(f"min_fit must be in (0, 1], not {min_fit!r}")
    if not set(partial_splits) <= set(SPLITS):
        raise ValueError(f"partial_splits must be among {sorted(SPLITS)}, not {list(partial_splits)}")
    partial_codes = {SPLITS[s] for s in partial_splits}
    some = fit == "some" and require_fit
    seen = set()
    lattices, fracs, Zs, ids, formulas, sources, splits, fractions = [], [], [], [], [], [], [], []
    rejected: dict[str, int] = {}

    def reject(reason: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1

    for source, mid, text in tqdm(list(_iter_sources(paths)), desc="reading CIFs", unit="crystal"):
        try:
            c = read_cif_text(text, name=str(mid), grid=grid, require_fit=require_fit and not some)
        except StructureError as exc:
            reject(str(exc).split(": ", 1)[-1].split("(")[0].strip()[:40])
            continue
        if c.num_atoms > max_atoms:
            reject("too many atoms")
            continue
        formula = c.meta.get("formula", c.name)
        split = _split_of(formula, val, test)
        fraction = 1.0
        if some and not fits_in_cube(c, grid):
            if split not in partial_codes:
                reject("cell too large for the cube (val/test)")
                continue
            seed = int(hashlib.sha1(formula.encode()).hexdigest()[:8], 16)
            fraction = float(fits_rotated(c, grid, random_rotations(FIT_PROBES, seed)).mean())
            if fraction < min_fit:
                reject("cell fits too few rotations")
                continue
        key = (formula, c.num_atoms, round(abs(np.linalg.det(c.lattice)) / c.num_atoms, 1))
        if key in seen:
            reject("duplicate")
            continue
        seen.add(key)
        fractions.append(fraction)
        lattices.append(c.lattice.astype(np.float32))
        fracs.append(np.mod(c.frac, 1.0).astype(np.float32))
        Zs.append(c.Z.astype(np.uint8))
        ids.append(str(mid))
        formulas.append(formula)
        sources.append(source)
        splits.append(split)
    offsets = np.concatenate([[0], np.cumsum([len(z) for z in Zs])]).astype(np.int64)
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # `--out data/mp.npz` on a fresh clone
    np.savez_compressed(
        out, lattice=np.stack(lattices), offsets=offsets, frac=np.concatenate(fracs), Z=np.concatenate(Zs),
        split=np.array(splits, np.uint8), ids=np.array(ids), formula=np.array(formulas), source=np.array(sources),
        grid=np.array([grid.n, grid.length, grid.sigma, grid.species_radius]),
        **({"fit_fraction": np.array(fractions, np.float32)} if some else {}),
    )
    counts = {k: int((np.array(splits) == v).sum()) for k, v in SPLITS.items()}
    return {"kept": len(ids), "splits": counts, "rejected": rejected, "out": str(out),
            "partial_fit": int(sum(f < 1.0 for f in fractions))}


@dataclass
class CrystalArrays:
    """The ``.npz`` of :func:`prepare`, loaded (numpy only)."""

    lattice: np.ndarray
    offsets: np.ndarray
    frac: np.ndarray
    Z: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    formula: np.ndarray
    source: np.ndarray
    #: (C,) fraction of random rotations under which each cell fits the cube (``prepare(fit="some")``),
    #: or None: every cell fits under every rotation
    fit_fraction: np.ndarray | None = None

    @classmethod
    def load(cls, path: str) -> "CrystalArrays":
        d = np.load(path, allow_pickle=False)
        return cls(d["lattice"].astype(np.float64), d["offsets"], d["frac"].astype(np.float64), d["Z"].astype(np.int64),
                   d["split"], d["ids"], d["formula"], d["source"],
                   d["fit_fraction"].astype(np.float64) if "fit_fraction" in d.files else None)

    def partial_fit(self, idx: np.ndarray) -> np.ndarray:
        """(B,) bool: which of the crystals ``idx`` fit the cube under some rotations only."""
        idx = np.asarray(idx, np.int64)
        if self.fit_fraction is None:
            return np.zeros(len(idx), bool)
        return self.fit_fraction[idx] < 1.0

    def __len__(self) -> int:
        return len(self.lattice)

    @staticmethod
    def load_grid(path: str) -> Grid:
        """The :class:`Grid` (n, length Å, sigma Å, species radius Å) a prepared ``.npz`` was made on."""
        raw = np.load(path, allow_pickle=False)["grid"]
        return Grid(int(raw[0]), float(raw[1]), float(raw[2]), float(raw[3]))

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS[split])

    def crystal(self, i: int) -> Crystal:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Crystal(self.lattice[i], self.frac[a:b], self.Z[a:b], name=str(self.formula[i]),
                       meta={"id": str(self.ids[i]), "source": str(self.source[i])})

    @property
    def sources(self) -> dict:
        u, c = np.unique(self.source, return_counts=True)
        return {str(k): int(v) for k, v in zip(u, c)}


def random_origins(data: CrystalArrays, idx: np.ndarray, rotations: np.ndarray | None,
                   rng: np.random.Generator, p_cell_origin: float = 0.5) -> np.ndarray:
    """(B, 3) Å cube-frame positions of the lattice origin for representation 2: the cube
    starts at the cell origin (origin = 0) with probability ``p_cell_origin``, else at a
    uniformly random point of the (rotated) cell."""
    out = np.zeros((len(idx), 3))
    for b, i in enumerate(idx):
        if rng.random() >= p_cell_origin:
            L = data.lattice[int(i)] if rotations is None else data.lattice[int(i)] @ rotations[b].T
            out[b] = -(rng.random(3) @ L)
    return out


MAX_ROTATION_TRIES = 4096  #: rotations tried per crystal by :func:`cube_rotations` before giving up


def cube_rotations(data: CrystalArrays, idx: np.ndarray, grid: Grid, rng: np.random.Generator | int | None = None,
                   representation: str = "unit_cell") -> np.ndarray:
    """(B, 3, 3) float64 rotations for the crystals ``idx``: uniform on SO(3), and for a cell
    that fits the cube under some rotations only (``prepare(fit="some")``) drawn again until
    it fits (rejection sampling: uniform among the rotations under which it fits). For a data
    set whose cells all fit, and for representation 2, this is ``random_rotations(B, rng)``
    exactly, so earlier runs and evaluations are unchanged.

    Raises:
        ValueError: a cell fits none of :data:`MAX_ROTATION_TRIES` rotations.
    """
    rots = random_rotations(len(idx), rng)
    partial = data.partial_fit(idx) if representation == "unit_cell" else np.zeros(len(idx), bool)
    if not partial.any():
        return rots
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(None if rng is None else [rng, 1])
    for b in np.flatnonzero(partial):
        c = data.crystal(int(idx[b]))
        if fits_rotated(c, grid, rots[b])[0]:
            continue
        for _ in range(MAX_ROTATION_TRIES // 32):
            cand = random_rotations(32, gen)
            ok = np.flatnonzero(fits_rotated(c, grid, cand))
            if len(ok):
                rots[b] = cand[ok[0]]
                break
        else:
            raise ValueError(f"crystal {data.ids[int(idx[b])]} ({data.formula[int(idx[b])]}) fits the "
                             f"{grid.length:g} Å cube under none of {MAX_ROTATION_TRIES} rotations")
    return rots


def voxelise(data: CrystalArrays, idx: np.ndarray, grid: Grid, rotations: np.ndarray | None,
             device: torch.device | str = "cpu", representation: str = "unit_cell",
             origins: np.ndarray | None = None):
    """Density fields of a batch in either representation of Sec. 3.1.

    * ``"unit_cell"`` (1): the unit cell centred in the cube and rotated.
    * ``"repeating_lattice"`` (2): the rotated lattice filling the cube, the cell origin at
      ``origins[b]`` (Å, cube frame; default the cube corner), every periodic image whose
      Gaussian reaches the cube summed (:func:`~crystalstudio.core.density.lattice_positions`).

    Args:
        data: the crystals.
        idx: (B,) crystal indices.
        grid: the grid.
        rotations: (B, 3, 3) rotation matrices, or None for no rotation.
        representation: see above.
        origins: (B, 3) lattice origins for representation 2.

    Returns:
        ``(M, S, positions, Z)``: M (B, n, n, n) float32, S (B, n, n, n) int64 on ``device``;
        positions (B, Nmax, 3) float64 Å and Z (B, Nmax) int64 numpy (0 = padding) of the
        atoms inside the cube (the true atoms a reconstruction is compared with).
    """
    if representation not in ("unit_cell", "repeating_lattice"):
        raise ValueError(f"unknown representation {representation!r}")
    pos, zs, inside_pos, inside_z = [], [], [], []
    for b, i in enumerate(idx):
        c = data.crystal(int(i))
        R = None if rotations is None else rotations[b]
        if representation == "unit_cell":
            p, z = cell_positions(c, grid, R), c.Z
        else:
            p, z = lattice_positions(c, grid, R, None if origins is None else origins[b])
        pos.append(p)
        zs.append(z)
        keep = np.all((p >= 0) & (p <= grid.length), axis=1)
        inside_pos.append(p[keep])
        inside_z.append(z[keep])
    P, Zp = pad_batch(pos, zs)
    M, S = density_fields(torch.as_tensor(P, device=device), torch.as_tensor(Zp, device=device), grid)
    if representation == "unit_cell":
        return M, S, P, Zp
    Pin, Zin = pad_batch(inside_pos, inside_z)
    return M, S, Pin, Zin


__all__ = ["prepare", "CrystalArrays", "voxelise", "cube_rotations", "random_origins", "random_rotations", "SPLITS",
           "FIT_PROBES", "MAX_ROTATION_TRIES"]
