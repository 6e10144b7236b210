"""What a crystallographer expects drawn over the density: the input's unit cell as its
lattice vectors, bonds, and a legend of the elements present.

Everything is a plain pyvista actor in the plotter of a
:class:`~crystalstudio.render.scene.CrystalScene`, replaced in place on update (never
stacked). Geometry helpers (:func:`cell_edges`, :func:`bond_pairs`) are numpy only and
tested on their own.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyvista as pv

__all__ = ["cell_edges", "bond_pairs", "atom_bounds", "Overlays", "BOND_TOLERANCE"]

BOND_TOLERANCE = 1.15  # bonded when closer than 1.15 x the sum of covalent radii (VESTA-like rule)
_AXIS_COLOURS = ((0.90, 0.25, 0.25), (0.25, 0.80, 0.30), (0.30, 0.50, 0.95))  # a, b, c as VESTA draws them


def cell_edges(origin: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The 12 edges of the parallelepiped spanned by ``vectors`` (3, 3) rows a, b, c (Å)
    from ``origin`` (3,): (12, 2, 3) float64 end points."""
    o = np.asarray(origin, np.float64).reshape(3)
    a, b, c = np.asarray(vectors, np.float64).reshape(3, 3)
    corner = {(i, j, k): o + i * a + j * b + k * c for i in (0, 1) for j in (0, 1) for k in (0, 1)}
    edges = []
    for (i, j, k), p in corner.items():
        for d in range(3):
            q = [i, j, k]
            if q[d] == 0:
                q[d] = 1
                edges.append((p, corner[tuple(q)]))
    return np.array(edges)


def bond_pairs(positions: np.ndarray, radii: np.ndarray, tolerance: float = BOND_TOLERANCE,
               min_distance: float = 0.4) -> np.ndarray:
    """Pairs (i, j), i < j, closer than ``tolerance`` x (r_i + r_j) and farther than
    ``min_distance`` Å (overlapping atoms are not bonds): (P, 2) int64.

    ``radii``: (N,) covalent radii in Å (the io layer reads them from pymatgen).
    """
    from scipy.spatial import cKDTree

    p = np.asarray(positions, np.float64).reshape(-1, 3)
    r = np.asarray(radii, np.float64).reshape(-1)
    if len(p) < 2:
        return np.zeros((0, 2), np.int64)
    pairs = np.array(sorted(cKDTree(p).query_pairs(tolerance * 2 * r.max())), np.int64).reshape(-1, 2)
    if not len(pairs):
        return pairs
    d = np.linalg.norm(p[pairs[:, 0]] - p[pairs[:, 1]], axis=1)
    keep = (d < tolerance * (r[pairs[:, 0]] + r[pairs[:, 1]])) & (d > min_distance)
    return pairs[keep]


def atom_bounds(positions: np.ndarray, margin: float, fallback: Sequence[float]) -> tuple:
    """(xmin, xmax, ymin, ymax, zmin, zmax) of the atoms widened by ``margin`` Å, or
    ``fallback`` when there are none."""
    p = np.asarray(positions, np.float64).reshape(-1, 3)
    if not len(p):
        return tuple(fallback)
    lo, hi = p.min(0) - margin, p.max(0) + margin
    return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


class Overlays:
    """Unit cell, bonds and element legend of one panel.

    Args:
        plotter: the panel's pyvista plotter / ``QtInteractor``.
        tag: unique prefix of the actor names.
    """

    def __init__(self, plotter: Any, tag: str) -> None:
        self.plotter = plotter
        self.tag = tag
        self.bonds_visible = False
        self.cell_visible = True
        self.n_bonds = 0
        self.legend_visible = True
        self._legend: list[tuple[str, tuple]] = []

    def _remove(self, name: str) -> None:
        self.plotter.remove_actor(self.tag + name, render=False)

    def set_cell(self, origin: np.ndarray | None, vectors: np.ndarray | None) -> None:
        """Draw the cell edges (a red, b green, c blue from the origin; the rest grey); None removes it."""
        for n in ("-cell", "-cell-a", "-cell-b", "-cell-c"):
            self._remove(n)
        if origin is None or vectors is None or not self.cell_visible:
            return
        edges = cell_edges(origin, vectors)
        o = np.asarray(origin, np.float64)
        axis = [i for i, (p, q) in enumerate(edges) if np.allclose(p, o)]
        rest = [e for i, e in enumerate(edges) if i not in axis]
        self.plotter.add_mesh(_lines(np.array(rest)), color=(0.65, 0.65, 0.7), line_width=1.2,
                              name=self.tag + "-cell", reset_camera=False, render=False, pickable=False)
        for n, i, col in zip("abc", axis, _AXIS_COLOURS):
            self.plotter.add_mesh(_lines(edges[i:i + 1]), color=col, line_width=3.0, name=self.tag + f"-cell-{n}",
                                  reset_camera=False, render=False, pickable=False)

    def set_bonds(self, positions: np.ndarray, radii: np.ndarray, colors: np.ndarray) -> None:
        """Draw bonds by :func:`bond_pairs` as two-coloured lines (each half in its atom's colour)."""
        self._remove("-bonds")
        self.n_bonds = 0
        if not self.bonds_visible:
            return
        p = np.asarray(positions, np.float64).reshape(-1, 3)
        pairs = bond_pairs(p, radii)
        self.n_bonds = len(pairs)
        if not len(pairs):
            return
        mid = 0.5 * (p[pairs[:, 0]] + p[pairs[:, 1]])
        seg = np.concatenate([np.stack([p[pairs[:, 0]], mid], 1), np.stack([mid, p[pairs[:, 1]]], 1)])
        col = np.concatenate([np.asarray(colors)[pairs[:, 0]], np.asarray(colors)[pairs[:, 1]]])
        mesh = _lines(seg)
        mesh.cell_data["rgb"] = np.round(np.clip(col, 0, 1) * 255).astype(np.uint8)
        self.plotter.add_mesh(mesh, scalars="rgb", rgb=True, line_width=4.0, name=self.tag + "-bonds",
                              reset_camera=False, render=False, pickable=False, show_scalar_bar=False)

    def set_site_labels(self, positions: np.ndarray, labels: list[str]) -> None:
        """Text labels at disordered sites (e.g. "Al0.50 Nb0.50"); empty removes them."""
        self._remove("-sites")
        if len(labels):
            self.plotter.add_point_labels(np.asarray(positions, np.float64).reshape(-1, 3), list(labels),
                                          name=self.tag + "-sites", font_size=11, point_size=1,
                                          shape_opacity=0.6, always_visible=True, render=False,
                                          reset_camera=False, text_color="white", shape_color="#404048")

    def show_legend(self, visible: bool) -> None:
        """Legend on or off (it follows the atoms)."""
        self.legend_visible = bool(visible)
        entries, self._legend = self._legend, None
        self.set_legend(entries or [])

    def set_legend(self, entries: list[tuple[str, tuple]]) -> None:
        """A legend of (element symbol, RGB) in the lower-left corner; empty removes it."""
        if entries == self._legend:
            return
        self._legend = list(entries)
        try:
            self.plotter.remove_legend(render=False)
        except (AttributeError, TypeError):
            pass
        if entries and self.legend_visible:
            self.plotter.add_legend(labels=[[s, c] for s, c in entries], bcolor=None, face="circle",
                                    loc="lower left", size=(0.12, 0.05 * min(len(entries), 8)), border=False)


def _lines(segments: np.ndarray) -> pv.PolyData:
    seg = np.asarray(segments, np.float64).reshape(-1, 2, 3)
    pts = seg.reshape(-1, 3)
    n = len(seg)
    lines = np.column_stack([np.full(n, 2), 2 * np.arange(n), 2 * np.arange(n) + 1]).ravel()
    return pv.PolyData(pts, lines=lines)
