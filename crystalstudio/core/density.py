"""Density fields M and species matrices S of crystals (Hoffmann et al. 2019, Sec. 3.1).

Units: lengths in Å, the density field in the paper's Eq. 1 normalisation (an isolated
atom of atomic number Z peaks at ``Z / (sigma^3 (2 pi)^{3/2})``; with sigma = 1 Å that is
``Z * 0.0635``). Multiply by :func:`Grid.peak_scale` to read the peak as Z.

Convention (recorded in every checkpoint): the cube spans ``[0, length]^3`` Å and is cut
into ``n^3`` voxels; voxel ``(i, j, k)`` is sampled at its centre
``((i + 0.5) h, (j + 0.5) h, (k + 0.5) h)`` with ``h = length / n`` (0.333 Å for the
default 30 voxels over 10 Å, the paper's "0.33 Å per voxel"). Axis order of every field is
``(x, y, z)``. The species matrix S labels a voxel with the Z of the nearest atom whose
centre lies within ``species_radius`` (0.5 Å, the paper's value) of the voxel centre.

Everything here needs only numpy, scipy and torch, so it runs on the GPU machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.spatial.transform import Rotation

__all__ = [
    "Grid",
    "Crystal",
    "cell_positions",
    "lattice_positions",
    "random_rotations",
    "density_fields",
    "light_field",
    "density_field",
    "pad_batch",
    "fits_in_cube",
    "fits_rotated",
    "fitting_rotation",
    "cube_input",
]

REPRESENTATIONS = ("unit_cell", "repeating_lattice")


@dataclass(frozen=True)
class Grid:
    """The voxel grid a density field lives on.

    Attributes:
        n: voxels along each edge (default 30).
        length: edge of the cube in Å (default 10.0).
        sigma: width of each atom's Gaussian in Å (Eq. 1; default 1.0).
        species_radius: a voxel gets an atom's Z in S when its centre is within this
            many Å of the atom (default 0.5, the paper's value).
    """

    n: int = 30
    length: float = 10.0
    sigma: float = 1.0
    species_radius: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and 4 <= self.n <= 256):
            raise ValueError(f"grid size n must be an int in 4..256, got {self.n!r}")
        for name in ("length", "sigma", "species_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"grid {name} must be a positive number, got {v!r}")

    @property
    def spacing(self) -> float:
        """Voxel edge h in Å."""
        return self.length / self.n

    @property
    def peak_scale(self) -> float:
        """``sigma^3 (2 pi)^{3/2}``: multiply M by this to read an isolated peak as Z."""
        return self.sigma**3 * (2.0 * math.pi) ** 1.5

    def centres(self) -> np.ndarray:
        """Voxel-centre coordinates along one axis, shape (n,), float64, Å."""
        return (np.arange(self.n, dtype=np.float64) + 0.5) * self.spacing

    def to_dict(self) -> dict:
        """JSON-ready ``{n, length, sigma, species_radius}`` (lengths in Å), as stored in checkpoint metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        """The inverse of :meth:`to_dict` (other keys are ignored; a missing one raises KeyError)."""
        return cls(n=int(d["n"]), length=float(d["length"]), sigma=float(d["sigma"]),
                   species_radius=float(d["species_radius"]))


@dataclass
class Crystal:
    """A periodic crystal as plain arrays (no pymatgen).

    Attributes:
        lattice: (3, 3) float64, rows are the lattice vectors a, b, c in Å.
        frac: (N, 3) float64 fractional coordinates (wrapped into [0, 1) on use).
        Z: (N,) int64 atomic numbers, 1..118.
        name: a label, e.g. the reduced formula or the file name.
        occupancy: (N,) float64 in (0, 1], or None for an ordered crystal (all 1). A
            disordered site is one entry per occupant at the same coordinates (for example
            Al 0.5 and Nb 0.5); a vacancy is an entry with occupancy below 1. Eq. 1 then
            weighs each entry's Gaussian by Z x occupancy (the site's mean scattering).
    """

    lattice: np.ndarray
    frac: np.ndarray
    Z: np.ndarray
    name: str = ""
    meta: dict = field(default_factory=dict)
    occupancy: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.lattice = np.asarray(self.lattice, dtype=np.float64).reshape(3, 3)
        self.frac = np.asarray(self.frac, dtype=np.float64).reshape(-1, 3)
        self.Z = np.asarray(self.Z, dtype=np.int64).reshape(-1)
        if len(self.frac) != len(self.Z):
            raise ValueError(f"{len(self.frac)} fractional coordinates but {len(self.Z)} atomic numbers")
        if self.occupancy is not None:
            self.occupancy = np.asarray(self.occupancy, np.float64).reshape(-1)
            if len(self.occupancy) != len(self.Z):
                raise ValueError(f"{len(self.occupancy)} occupancies for {len(self.Z)} atoms")
            if not np.all((self.occupancy > 0) & (self.occupancy <= 1 + 1e-6)):
                raise ValueError("occupancies must lie in (0, 1]")
            if np.all(self.occupancy == 1.0):
                self.occupancy = None

    @property
    def disordered(self) -> bool:
        """True when some site is shared or partly vacant (any occupancy below 1)."""
        return self.occupancy is not None

    @property
    def weights(self) -> np.ndarray:
        """(N,) float64 Eq. 1 weights: Z x occupancy."""
        return self.Z * (1.0 if self.occupancy is None else self.occupancy)

    def site_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Entries grouped into sites (within 1e-4 in wrapped fractional coordinates):
        (first entry of each site (S,), site of each entry (N,)), both int64."""
        key = np.round(np.mod(self.frac, 1.0) / 1e-4).astype(np.int64) % 10000
        _, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
        return first, inv.reshape(-1)

    def sites(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct sites with their dominant occupant: (frac (S, 3), Z (S,)); entries
        within 1e-4 of each other in fractional coordinates are one site, and its species
        is the occupant of largest occupancy (ties: larger Z). An ordered crystal: its atoms."""
        if self.occupancy is None:
            return self.frac.copy(), self.Z.copy()
        first, inv = self.site_index()
        Zs = np.zeros(len(first), np.int64)
        best = np.full(len(first), -1.0)
        for i, s in enumerate(inv):
            score = self.occupancy[i] + 1e-6 * self.Z[i]
            if score > best[s]:
                best[s], Zs[s] = score, self.Z[i]
        return self.frac[first], Zs

    @property
    def num_atoms(self) -> int:
        """Number of sites in the cell."""
        return int(len(self.Z))

    def cartesian(self) -> np.ndarray:
        """(N, 3) Cartesian positions in Å of the atoms, fractional coordinates wrapped to [0, 1)."""
        return np.mod(self.frac, 1.0) @ self.lattice


def _centred(crystal: Crystal) -> np.ndarray:
    """(N, 3) float64 Å: the atoms (wrapped into the cell) relative to the cell centre 0.5 (a + b + c)."""
    return crystal.cartesian() - 0.5 * crystal.lattice.sum(axis=0)


def cell_positions(crystal: Crystal, grid: Grid, rotation: Rotation | np.ndarray | None = None) -> np.ndarray:
    """Representation 1 of the paper: the unit cell centred in the cube and rotated.

    The atoms (fractional coordinates wrapped into [0, 1)) are moved so the centre of the
    cell, ``0.5 (a + b + c)``, sits at the centre of the cube, then rotated about it.

    Args:
        crystal: the crystal.
        grid: the cube.
        rotation: a scipy ``Rotation``, a (3, 3) rotation matrix, or None (no rotation).

    Returns:
        (N, 3) float64 Cartesian positions in Å in the cube frame ``[0, length]^3``.
    """
    cart = _centred(crystal)
    if rotation is not None:
        R = rotation.as_matrix() if isinstance(rotation, Rotation) else np.asarray(rotation, np.float64)
        cart = cart @ R.T
    return cart + 0.5 * grid.length


def fits_in_cube(crystal: Crystal, grid: Grid, margin: float = 0.0) -> bool:
    """True when every atom of the centred cell stays inside the cube under *any* rotation.

    That is, every atom lies within ``length/2 - margin`` Å of the cell centre, so the
    random rotations of training never push an atom out of the cube.
    """
    r = np.linalg.norm(_centred(crystal), axis=1)
    return bool(len(r) > 0 and r.max() <= 0.5 * grid.length - margin)


def fits_rotated(crystal: Crystal, grid: Grid, rotations: np.ndarray) -> np.ndarray:
    """Whether every atom of the centred cell lies inside the cube under each rotation.

    Representation 1 (:func:`cell_positions`) with a given rotation: each atom's rotated
    position lies in ``[0, length]^3`` (the inside test of ``training.data.voxelise``). A cell
    that :func:`fits_in_cube` fits under every rotation; a larger one may fit under some.

    Args:
        crystal: the crystal.
        grid: the cube.
        rotations: (K, 3, 3) rotation matrices (or one (3, 3)).

    Returns:
        (K,) bool.
    """
    R = np.asarray(rotations, np.float64).reshape(-1, 3, 3)
    cart = _centred(crystal)
    rotated = np.einsum("kij,nj->kni", R, cart)
    return np.all(np.abs(rotated) <= 0.5 * grid.length, axis=(1, 2))


def fitting_rotation(crystal: Crystal, grid: Grid, tries: int = 512, seed: int = 0) -> np.ndarray | None:
    """An orientation in which the centred cell fits the cube (representation 1).

    The identity when the cell fits unrotated (every cell that :func:`fits_in_cube` does);
    else, among ``tries`` uniform rotations drawn from ``seed`` (the same ones every call), the
    one that leaves the widest margin between its atoms and the cube's faces.

    Returns:
        (3, 3) float64 rotation matrix, or None when none of them fits.
    """
    if fits_rotated(crystal, grid, np.eye(3))[0]:
        return np.eye(3)
    cart = _centred(crystal)
    if np.linalg.norm(cart, axis=1).max() > 0.5 * grid.length * np.sqrt(3.0):
        return None  # farther from the centre than the cube's corners: no orientation fits
    R = random_rotations(tries, seed)
    margin = np.concatenate([0.5 * grid.length - np.abs(np.einsum("kij,nj->kni", R[k:k + 64], cart)).max(axis=(1, 2))
                             for k in range(0, len(R), 64)])  # 64 rotations at a time: bounded memory
    best = int(np.argmax(margin))
    return R[best] if margin[best] >= 0 else None


def lattice_positions(crystal: Crystal, grid: Grid, rotation: Rotation | np.ndarray | None = None,
                      origin: np.ndarray | None = None, cutoff: float | None = None, occupancy: bool = False):
    """Representation 2: every periodic image whose Gaussian reaches the cube.

    The lattice vectors are rotated (about the cell origin) and the cell origin is placed
    at ``origin`` (Å, cube frame; default the cube's corner ``(0, 0, 0)``). All images
    within ``cutoff`` Å of the cube (default ``4 sigma``) are returned, so the field inside
    the cube is the full periodic sum of Eq. 1 to within ``exp(-8)`` of a peak.

    Returns:
        (positions (K, 3) float64 Å, Z (K,) int64), and occupancies (K,) float64 as a third
        item when ``occupancy`` is True.

    Raises:
        ValueError: when the cell is degenerate or so small that more than 20000 images
            would be needed.
    """
    cutoff = 4.0 * grid.sigma if cutoff is None else float(cutoff)
    L = crystal.lattice
    if rotation is not None:
        R = rotation.as_matrix() if isinstance(rotation, Rotation) else np.asarray(rotation, np.float64)
        L = L @ R.T
    if abs(np.linalg.det(L)) < 1e-6:
        raise ValueError("degenerate lattice (zero cell volume)")
    origin = np.zeros(3) if origin is None else np.asarray(origin, np.float64)
    base = np.mod(crystal.frac, 1.0) @ L + origin
    lo, hi = -cutoff, grid.length + cutoff
    corners = np.array([[x, y, z] for x in (lo, hi) for y in (lo, hi) for z in (lo, hi)])
    f = (corners - origin) @ np.linalg.inv(L)
    nmin = np.floor(f.min(axis=0)).astype(int) - 1
    nmax = np.ceil(f.max(axis=0)).astype(int) + 1
    count = np.prod(nmax - nmin + 1) * len(base)
    if count > 2_000_000:
        raise ValueError(f"cell too small for a {grid.length} Å cube ({count} candidate images)")
    shifts = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(nmin, nmax)], indexing="ij"), -1)
    shifts = shifts.reshape(-1, 3) @ L
    pos = (base[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    Z = np.tile(crystal.Z, len(shifts))
    keep = np.all((pos >= lo) & (pos <= hi), axis=1)
    if keep.sum() > 20000:
        raise ValueError(f"cell too small for a {grid.length} Å cube ({int(keep.sum())} images)")
    if occupancy:
        occ = np.ones(len(crystal.Z)) if crystal.occupancy is None else crystal.occupancy
        return pos[keep], Z[keep], np.tile(occ, len(shifts))[keep]
    return pos[keep], Z[keep]


def random_rotations(n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """(n, 3, 3) float64 rotation matrices drawn uniformly from SO(3) (scipy Rotation)."""
    rng = np.random.default_rng(rng)
    return Rotation.random(n, random_state=rng).as_matrix()


def pad_batch(positions: list[np.ndarray], Zs: list[np.ndarray]):
    """Pad ragged atom lists into (B, Nmax, 3) float64 positions and (B, Nmax) int64 Z (0 = padding)."""
    B = len(positions)
    nmax = max(1, max((len(p) for p in positions), default=1))
    P = np.zeros((B, nmax, 3), np.float64)
    Zp = np.zeros((B, nmax), np.int64)
    for b, (p, z) in enumerate(zip(positions, Zs)):
        P[b, : len(p)] = p
        Zp[b, : len(z)] = z
    return P, Zp


def density_fields(positions: torch.Tensor, Z: torch.Tensor, grid: Grid, species: bool = True,
                   atom_chunk: int = 64, occupancy: torch.Tensor | None = None):
    """Batched density fields M (Eq. 1) and species matrices S on CPU or GPU.

    The Gaussian of Eq. 1 factorises over x, y and z, so ``M[b,i,j,k] = sum_m w_m
    gx[b,m,i] gy[b,m,j] gz[b,m,k]``: an einsum of cost ``B N n^3`` instead of a
    distance per atom and voxel. Padding atoms have Z = 0 and add nothing.

    Args:
        positions: (B, N, 3) float tensor, Cartesian Å in the cube frame.
        Z: (B, N) integer tensor of atomic numbers, 0 for padding.
        grid: the voxel grid.
        species: also build S.
        atom_chunk: atoms processed at a time (bounds memory for S).
        occupancy: optional (B, N) float tensor: each Gaussian weighs Z x occupancy
            (partial occupancy and vacancies); S keeps the species of the nearest entry.

    Returns:
        ``(M, S)``: M (B, n, n, n) float32 in Eq. 1 units; S (B, n, n, n) int64 atomic
        numbers (0 = no atom within ``species_radius``), or None when ``species`` is False.
    """
    dev = positions.device
    pos = positions.to(torch.float32)
    Zf = Z.to(torch.float32)
    if occupancy is not None:
        Zf = Zf * occupancy.to(device=Zf.device, dtype=torch.float32)
    # voxel centres (i + 0.5) h, made on the device (no host-to-device copy per batch)
    c = (torch.arange(grid.n, dtype=torch.float64, device=dev) + 0.5).mul_(grid.spacing).to(torch.float32)
    B, N, _ = pos.shape
    n = grid.n
    M = torch.zeros((B, n, n, n), dtype=torch.float32, device=dev)
    norm = 1.0 / grid.peak_scale
    for s in range(0, N, atom_chunk):
        p = pos[:, s:s + atom_chunk]  # (B, m, 3)
        z = Zf[:, s:s + atom_chunk]
        d = c.view(1, 1, n, 1) - p.unsqueeze(2)  # (B, m, n, 3): per-axis offsets
        g = torch.exp(-(d * d) / (2.0 * grid.sigma**2))  # (B, m, n, 3)
        M += torch.einsum("bm,bmi,bmj,bmk->bijk", z * norm, g[..., 0], g[..., 1], g[..., 2])
    S = _species_matrix(pos, Z.to(dev), Zf > 0, c, grid) if species else None
    return M, S


def light_field(positions: torch.Tensor, Z: torch.Tensor, grid: Grid, gain: float = 4.0,
                z_max: int = 5) -> torch.Tensor:
    """The light-atom field L: Eq. 1's Gaussians of the atoms with 1 <= Z <= ``z_max`` only, each
    weighted by ``gain`` x Z (with gain 4 an H peaks half as high as an O does in M, a Li 1.5
    times as high). The second output of a decoder with ``ModelConfig.light_channel``.

    Args: positions (B, N, 3) float Å in the cube frame; Z (B, N) integer, 0 = padding.

    Returns: L (B, n, n, n) float32, Eq. 1 units.
    """
    Zl = torch.where((Z > 0) & (Z <= z_max), Z, torch.zeros_like(Z))
    occ = torch.full(Z.shape, float(gain), dtype=torch.float32, device=Z.device)
    return density_fields(positions, Zl, grid, species=False, occupancy=occ)[0]


def _species_matrix(pos: torch.Tensor, Z: torch.Tensor, present: torch.Tensor, c: torch.Tensor,
                    grid: Grid) -> torch.Tensor:
    """S of :func:`density_fields`: each voxel takes the Z of its nearest atom within
    ``species_radius`` (ties to the lower atom index), 0 elsewhere.

    Only the K^3 voxels around each atom can lie within the radius (K = ceil(2 r / h) + 2,
    5 for the default grid), so the cost is B N K^3 instead of B N n^3: a lattice batch of
    16 cubes with ~400 images each takes milliseconds, not seconds. Distances use the same
    float32 arithmetic as the voxel centres ``c``, so the result does not depend on chunking.

    Args:
        pos: (B, N, 3) float32 Å; Z: (B, N) int64; present: (B, N) bool (padding and
            zero-occupancy entries False); c: (n,) float32 voxel centres.
    """
    dev = pos.device
    B, N, _ = pos.shape
    n, h, r = grid.n, grid.spacing, grid.species_radius
    K = int(math.ceil(2.0 * r / h)) + 2
    lo = torch.floor((pos - r) / h - 0.5).to(torch.int64)  # (B, N, 3): first candidate index
    idx = lo.unsqueeze(-1) + torch.arange(K, device=dev)  # (B, N, 3, K)
    inside = (idx >= 0) & (idx < n)
    idx = idx.clamp_(0, n - 1)
    d = c[idx] - pos.unsqueeze(-1)  # (B, N, 3, K), as c - p in float32
    d2 = d * d
    dist2 = (d2[:, :, 0, :, None, None] + d2[:, :, 1, None, :, None]
             + d2[:, :, 2, None, None, :])  # (B, N, K, K, K)
    ok = (inside[:, :, 0, :, None, None] & inside[:, :, 1, None, :, None] & inside[:, :, 2, None, None, :]
          & (dist2 <= r * r) & present.view(B, N, 1, 1, 1))
    vox = ((torch.arange(B, device=dev).view(B, 1, 1, 1, 1) * n + idx[:, :, 0, :, None, None]) * n
           + idx[:, :, 1, None, :, None]) * n + idx[:, :, 2, None, None, :]  # (B, N, K, K, K) flat voxel
    atom = torch.arange(B * N, device=dev).view(B, N, 1, 1, 1).expand_as(vox)  # flat index into Z
    vox, dist2, atom = vox[ok], dist2[ok], atom[ok]
    best = torch.full((B * n**3,), float("inf"), device=dev).scatter_reduce(0, vox, dist2, "amin")
    tie = dist2 == best[vox]
    first = torch.full((B * n**3,), B * N, dtype=torch.int64, device=dev).scatter_reduce(
        0, vox[tie], atom[tie], "amin")
    S = torch.cat([Z.reshape(-1), Z.new_zeros(1)])[first]  # B * N (no atom) -> 0
    return S.view(B, n, n, n)


def density_field(positions: np.ndarray, Z: np.ndarray, grid: Grid, species: bool = True,
                  occupancy: np.ndarray | None = None):
    """Single-crystal convenience wrapper of :func:`density_fields` on the CPU.

    Args:
        positions: (N, 3) Cartesian Å in the cube frame.
        Z: (N,) atomic numbers.
        occupancy: optional (N,) site occupancies (Eq. 1 weight Z x occupancy).

    Returns:
        ``(M, S)`` as numpy arrays, (n, n, n) float32 and (n, n, n) int64 (S None if not asked).
    """
    P = torch.as_tensor(np.asarray(positions, np.float64).reshape(1, -1, 3))
    Zt = torch.as_tensor(np.asarray(Z, np.int64).reshape(1, -1))
    occ = None if occupancy is None else torch.as_tensor(np.asarray(occupancy, np.float64).reshape(1, -1))
    M, S = density_fields(P, Zt, grid, species=species, occupancy=occ)
    return M[0].numpy(), (S[0].numpy() if S is not None else None)


def cube_input(crystal: Crystal, grid: Grid, representation: str = "unit_cell", rotation: np.ndarray | None = None,
               window_origin: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a model of ``representation`` encodes for ``crystal``, and the atoms its output
    is compared with (Sec. 3.1, representations 1 and 2).

    * ``"unit_cell"``: the cell's atoms, lattice rotated by ``rotation`` and centred in the
      cube (:func:`cell_positions`).
    * ``"repeating_lattice"``: the cube filled with the rotated lattice, the cell's
      fractional point ``window_origin`` (3,) at the cube's corner
      (:func:`lattice_positions`); the atoms compared are those inside the cube.

    A disordered crystal's field holds every occupant (Eq. 1 weight Z x occupancy); the
    atoms compared are its sites with their dominant occupant (:meth:`Crystal.sites`).

    Args:
        rotation: (3, 3) float64 applied to the lattice (None: identity).
        window_origin: (3,) fractional coordinates (None: the cell origin); repeating lattice only.
    Returns:
        ``(M, positions, Z)``: (n, n, n) float32 density field (Eq. 1 units), (K, 3) float64
        Cartesian Å in the cube frame, (K,) int64.
    Raises:
        ValueError: an unknown representation, or a cell :func:`lattice_positions` refuses.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r} (one of {', '.join(REPRESENTATIONS)})")
    R = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
    sites = Crystal(crystal.lattice, *crystal.sites(), name=crystal.name) if crystal.disordered else crystal
    if representation == "unit_cell":
        M, _ = density_field(cell_positions(crystal, grid, R), crystal.Z, grid, species=False,
                             occupancy=crystal.occupancy)
        return M, cell_positions(sites, grid, R), sites.Z.copy()
    uvw = np.zeros(3) if window_origin is None else np.asarray(window_origin, np.float64).reshape(3)
    origin = -(uvw @ (crystal.lattice @ R.T))
    allpos, allZ, occ = lattice_positions(crystal, grid, R, origin=origin, occupancy=True)
    M, _ = density_field(allpos, allZ, grid, species=False, occupancy=occ)
    spos, sZ = lattice_positions(sites, grid, R, origin=origin) if sites is not crystal else (allpos, allZ)
    inside = np.all((spos >= 0) & (spos <= grid.length), axis=1)
    return M, spos[inside], sZ[inside]
