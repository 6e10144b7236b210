"""One 3-D panel of a crystal: volume-rendered density field, atoms as spheres, cube outline.

Pure pyvista (no Qt import): :class:`CrystalScene` drives any pyvista plotter it is given,
an off-screen ``pyvista.Plotter`` for headless rendering and tests, or a pyvistaqt
``QtInteractor`` in the GUI. It never subclasses a plotter.

Grid convention (see :mod:`crystalstudio.core.density`): the cube spans ``[0, length]^3``
Å, voxel ``(i, j, k)`` is sampled at ``((i + 0.5) h, (j + 0.5) h, (k + 0.5) h)`` with
``h = length / n``, field axis order ``(x, y, z)``. The volume is an ``ImageData`` whose
*points* are those voxel centres (origin ``h/2``, spacing ``h``), so the density and the
atoms drawn at their Cartesian positions line up. Densities are shown multiplied by
``grid.peak_scale`` so an isolated atom's peak reads as its atomic number Z.

Updates never add actors: the first :meth:`CrystalScene.set_density` /
:meth:`CrystalScene.set_atoms` creates one actor each; later calls overwrite the data the
mapper actually holds (``add_volume`` copies its input, pyvista#879, so the scene keeps the
mapper's own dataset) and call ``Modified()``. The colour range ``clim`` and the opacity
transfer function are pinned, so frames of an animation are comparable.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyvista as pv

__all__ = ["CrystalScene", "offscreen_plotter", "render_frame", "DEFAULT_CLIM_MAX"]

#: Upper end of the default colour range (in units of Z): densities up to ~Z = 30 use the
#: full colour map; a field with a higher peak raises it (unless ``clim`` was given).
DEFAULT_CLIM_MAX = 30.0
DEFAULT_RADIUS = 0.5  # Å
DEFAULT_ATOM_COLOR = (0.5, 0.5, 0.5)
_ARRAY = "density (Z)"


def _cube_bounds(length: float) -> tuple[float, float, float, float, float, float]:
    L = float(length)
    return (0.0, L, 0.0, L, 0.0, L)


def _set_camera_view(renderer: Any, view: str, bounds: Sequence[float]) -> None:
    """Point ``renderer``'s camera along a named view and fit ``bounds``."""
    view = view.lower()
    if view in ("iso", "isometric"):
        renderer.view_isometric(render=False, bounds=bounds)
    elif view in ("xy", "-xy", "xz", "-xz", "yz", "-yz"):
        neg = view.startswith("-")
        getattr(renderer, "view_" + view.lstrip("-"))(negative=neg, render=False, bounds=bounds)
    else:
        raise ValueError(f"unknown view {view!r}; use 'iso', 'xy', 'xz', 'yz' (or '-xy', ...)")


def offscreen_plotter(size: Sequence[int] = (600, 600), background: Any = "#1b1b1f",
                      length: float = 10.0, view: str = "iso") -> pv.Plotter:
    """An off-screen ``pyvista.Plotter`` (EGL/OSMesa or X, no window) for headless rendering.

    Args:
        size: window size ``(width, height)`` in pixels.
        background: background colour (anything pyvista accepts), dark grey by default.
        length: edge of the cube in Å the camera is fitted to (a :class:`CrystalScene`
            refits it to its grid on :meth:`CrystalScene.reset_camera`).
        view: initial camera view, ``"iso"`` (isometric) or ``"xy"``/``"xz"``/``"yz"``.
    """
    pl = pv.Plotter(off_screen=True, window_size=[int(size[0]), int(size[1])])
    pl.set_background(background)
    _set_camera_view(pl.renderer, view, _cube_bounds(length))
    return pl


def render_frame(plotter: Any) -> np.ndarray:
    """Render ``plotter`` now and return its image as ``(H, W, 3)`` uint8 RGB.

    Works for an off-screen ``pyvista.Plotter`` (also before any ``show()``) and for a
    pyvistaqt ``QtInteractor`` (whose ``write_frame``/``screenshot`` do not re-render).
    """
    if getattr(plotter, "_first_time", False) and getattr(plotter, "off_screen", False):
        plotter._on_first_render_request()  # what screenshot() does for off-screen plotters
    plotter.render()
    img = plotter.screenshot(transparent_background=False, return_img=True)
    return np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8)


class CrystalScene:
    """The actors of one crystal panel in an existing pyvista plotter.

    Args:
        plotter: a ``pyvista.Plotter`` (e.g. :func:`offscreen_plotter`) or a pyvistaqt
            ``QtInteractor``.
        subplot: ``(row, col)`` of the plotter's renderer to draw in (None: the active one).
        cmap: matplotlib colour map of the density.
        clim: fixed colour range ``(lo, hi)`` in units of Z. None: ``(0, max(30, highest
            peak seen))``; it only ever grows, and only when a field exceeds it.
        opacity_start: fraction of ``clim`` below which the density is fully transparent.
        max_opacity: opacity (0..1 per ``opacity_unit_distance``) at the top of ``clim``.
        atom_scale: factor applied to every sphere radius.
        sphere_resolution: theta/phi resolution of the sphere glyph.
        scalar_bar: show a colour bar of the density.
    """

    def __init__(self, plotter: Any, *, subplot: tuple[int, int] | None = None,
                 cmap: str = "magma", clim: Sequence[float] | None = None,
                 opacity_start: float = 0.05, max_opacity: float = 0.8,
                 atom_scale: float = 1.0, sphere_resolution: int = 16,
                 scalar_bar: bool = True) -> None:
        self.plotter = plotter
        self._subplot = tuple(subplot) if subplot is not None else None
        self._activate()
        self.renderer = plotter.renderer
        self.cmap = cmap
        self._fixed_clim = clim is not None
        self._clim = (float(clim[0]), float(clim[1])) if clim is not None else (0.0, DEFAULT_CLIM_MAX)
        if not self._clim[1] > self._clim[0]:
            raise ValueError(f"clim must satisfy lo < hi, got {clim!r}")
        if not 0.0 <= opacity_start < 1.0 or not 0.0 < max_opacity <= 1.0:
            raise ValueError("need 0 <= opacity_start < 1 and 0 < max_opacity <= 1")
        self.opacity_start = float(opacity_start)
        self.max_opacity = float(max_opacity)
        self.atom_scale = float(atom_scale)
        self._sphere = pv.Sphere(radius=1.0, theta_resolution=int(sphere_resolution),
                                 phi_resolution=int(sphere_resolution))
        self._sphere_faces = self._sphere.faces.reshape(-1, 4)  # all triangles: (3, a, b, c)
        self._scalar_bar = bool(scalar_bar)
        self._tag = f"crystalscene-{id(self):x}"

        self.grid = None  # the last Grid seen
        self._vol_data: pv.ImageData | None = None  # the dataset the volume mapper holds
        self._vol_actor = None
        self._lut: pv.LookupTable | None = None
        self._bar = None  # the colour bar actor, if any
        self._atoms_mesh: pv.PolyData | None = None
        self._atoms_actor = None
        self._n_atoms = 0
        self._outline: pv.PolyData | None = None
        self._outline_actor = None
        self._title_actor = None
        self._title = ""
        self._has_density = False
        self._density_visible = True
        self._atoms_visible = True

    # ------------------------------------------------------------------ helpers
    def _activate(self) -> None:
        if self._subplot is not None:
            self.plotter.subplot(*self._subplot)

    def _foreground(self) -> tuple[float, float, float]:
        try:
            r, g, b = pv.Color(self.renderer.background_color).float_rgb
        except Exception:  # noqa: BLE001 - any odd background: assume dark
            r = g = b = 0.0
        return (0.1, 0.1, 0.1) if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else (0.9, 0.9, 0.9)

    def _opacity_values(self) -> np.ndarray:
        """uint8 alpha of the 256-entry lookup table: 0 up to ``opacity_start``, then a ramp."""
        x = np.linspace(0.0, 1.0, 256)
        a = np.clip((x - self.opacity_start) / (1.0 - self.opacity_start), 0.0, 1.0) * self.max_opacity
        return np.round(a * 255.0).astype(np.uint8)

    @staticmethod
    def _image(values: np.ndarray, grid) -> pv.ImageData:
        n = values.shape[0]
        h = float(grid.length) / n
        img = pv.ImageData(dimensions=(n, n, n), spacing=(h, h, h), origin=(0.5 * h,) * 3)
        img.point_data[_ARRAY] = values.ravel(order="F")  # x fastest, as VTK wants
        img.set_active_scalars(_ARRAY)
        return img

    def _set_clim(self, clim: tuple[float, float]) -> None:
        self._clim = clim
        if self._lut is not None:
            self._lut.scalar_range = clim  # the volume property re-applies the LUT (observer)
            self._vol_actor.mapper.scalar_range = clim
            self._vol_actor.prop.apply_lookup_table(self._lut)

    def _update_visibility(self) -> None:
        if self._vol_actor is not None:
            vis = self._density_visible and self._has_density
            self._vol_actor.SetVisibility(vis)
            if self._bar is not None:
                self._bar.SetVisibility(vis)
        if self._atoms_actor is not None:
            self._atoms_actor.SetVisibility(self._atoms_visible and self._n_atoms > 0)

    # ------------------------------------------------------------------ public API
    @property
    def clim(self) -> tuple[float, float]:
        """The colour range of the density in units of Z."""
        return self._clim

    def set_max_opacity(self, value: float) -> None:
        """Opacity of the densest voxels, 0 < value <= 1 (lower shows the atoms through the
        density); re-applied to the volume in place.

        Raises:
            ValueError: value outside (0, 1].
        """
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"opacity must lie in (0, 1], got {value!r}")
        self.max_opacity = float(value)
        if self._lut is not None:
            self._lut.values[:, 3] = self._opacity_values()
            self._vol_actor.prop.apply_lookup_table(self._lut)

    def set_clim(self, clim: tuple[float, float] | None) -> None:
        """Pin the density colour range to ``clim`` = (low, high) in units of Z, or None:
        back to the default (0, 30) that grows with the fields shown. The colour bar's
        labels get decimals for a weak range (high < 10).

        Raises:
            ValueError: high is not above low.
        """
        if clim is None:
            self._fixed_clim = False
            self._set_clim((0.0, DEFAULT_CLIM_MAX))
        else:
            lo, hi = float(clim[0]), float(clim[1])
            if not hi > lo:
                raise ValueError(f"clim must be (low, high) with high > low, got {clim}")
            self._fixed_clim = True
            self._set_clim((lo, hi))
        hi = self._clim[1]
        if self._bar is not None:
            self._bar.SetLabelFormat("%.0f" if clim is None or hi >= 10 else "%.1f" if hi >= 1 else "%.2f")

    @property
    def n_atoms(self) -> int:
        """Number of atoms drawn."""
        return self._n_atoms

    def actors(self) -> list:
        """The actors this scene has added (volume, atoms, outline, title; those that exist)."""
        return [a for a in (self._vol_actor, self._atoms_actor, self._outline_actor, self._title_actor)
                if a is not None]

    def set_density(self, M: np.ndarray | None, grid) -> None:
        """Show the density field ``M`` (shape ``(n, n, n)``, Eq. 1 units) of ``grid``.

        The field is drawn times ``grid.peak_scale`` (values read as Z). ``None`` hides the
        volume. The first call adds the volume actor; later calls overwrite its data in place.
        """
        self.grid = grid
        if M is None:
            self._has_density = False
            self._update_visibility()
            return
        M = np.asarray(M)
        if M.ndim != 3 or len(set(M.shape)) != 1:
            raise ValueError(f"density must have shape (n, n, n), got {M.shape}")
        values = np.nan_to_num(M.astype(np.float32) * np.float32(grid.peak_scale), copy=False)
        vmax = float(values.max()) if values.size else 0.0
        if not self._fixed_clim and vmax > self._clim[1]:
            self._set_clim((self._clim[0], float(math.ceil(vmax / 10.0) * 10.0)))

        if self._vol_actor is None:
            self._activate()
            lut = pv.LookupTable(cmap=self.cmap, n_values=256)
            lut.values[:, 3] = self._opacity_values()
            lut.scalar_range = self._clim
            self._lut = lut
            kw: dict[str, Any] = dict(scalars=_ARRAY, cmap=lut, clim=self._clim, name=self._tag + "-volume",
                                      show_scalar_bar=self._scalar_bar, reset_camera=False, render=False,
                                      shade=False, mapper="smart")
            if self._scalar_bar:
                fg = self._foreground()
                kw["scalar_bar_args"] = dict(title=_ARRAY, color=fg, vertical=True, position_x=0.84,
                                             position_y=0.03, height=0.32, width=0.05, n_labels=4,
                                             fmt="%.0f", title_font_size=12, label_font_size=11)
            self._vol_actor = self.plotter.add_volume(self._image(values, grid), **kw)
            # add_volume works on a copy: keep the dataset the mapper actually renders.
            self._vol_data = self._vol_actor.mapper.dataset
            bars = getattr(self.plotter, "scalar_bars", None)
            self._bar = bars[_ARRAY] if self._scalar_bar and bars is not None and _ARRAY in bars else None
        else:
            img = self._vol_data
            n = values.shape[0]
            h = float(grid.length) / n
            if tuple(img.dimensions) == (n, n, n):
                arr = img.point_data[_ARRAY]
                arr[:] = values.ravel(order="F")
                img.spacing = (h, h, h)
                img.origin = (0.5 * h,) * 3
                img.GetPointData().GetArray(_ARRAY).Modified()
            else:
                img.copy_from(self._image(values, grid), deep=True)
                img.set_active_scalars(_ARRAY)
            img.Modified()
        self._has_density = True
        self._update_visibility()

    def set_atoms(self, positions: np.ndarray, Z: np.ndarray, colors: np.ndarray | None = None,
                  radii: np.ndarray | None = None) -> None:
        """Show atoms as spheres.

        Args:
            positions: ``(K, 3)`` Cartesian positions in Å, cube frame.
            Z: ``(K,)`` atomic numbers (kept as cell data ``"Z"`` for picking).
            colors: ``(K, 3)`` RGB in 0..1 (e.g. Jmol colours from the io layer); grey if None.
            radii: ``(K,)`` sphere radii in Å (0.5 Å if None); times ``atom_scale``.
        """
        pos = np.asarray(positions, np.float64).reshape(-1, 3)
        K = len(pos)
        Zs = np.asarray(Z, np.int64).reshape(-1)
        if len(Zs) != K:
            raise ValueError(f"{K} positions but {len(Zs)} atomic numbers")
        if colors is None:
            col = np.tile(np.asarray(DEFAULT_ATOM_COLOR, np.float64), (K, 1))
        else:
            col = np.asarray(colors, np.float64).reshape(-1, 3)
            if len(col) != K:
                raise ValueError(f"{K} positions but {len(col)} colours")
        r = np.full(K, DEFAULT_RADIUS) if radii is None else np.asarray(radii, np.float64).reshape(-1)
        if len(r) != K:
            raise ValueError(f"{K} positions but {len(r)} radii")
        r = r * self.atom_scale

        self._n_atoms = K
        if K == 0:  # keep the last mesh (pyvista refuses empty arrays), just hide it
            self._update_visibility()
            return
        sp = self._sphere
        npts, ntri = sp.n_points, len(self._sphere_faces)
        pts = (pos[:, None, :] + r[:, None, None] * sp.points[None, :, :]).reshape(-1, 3)
        tri = self._sphere_faces[None, :, 1:] + (np.arange(K) * npts)[:, None, None]
        faces = np.concatenate([np.full((K * ntri, 1), 3, np.int64), tri.reshape(-1, 3)], axis=1).ravel()
        mesh = pv.PolyData(pts, faces=faces)
        rgb = np.round(np.clip(col, 0.0, 1.0) * 255.0).astype(np.uint8)
        mesh.point_data["rgb"] = np.repeat(rgb, npts, axis=0)
        mesh.point_data["Normals"] = np.tile(sp.point_normals, (K, 1))
        mesh.point_data.active_normals_name = "Normals"
        mesh.cell_data["Z"] = np.repeat(Zs, ntri)
        mesh.point_data.active_scalars_name = "rgb"

        if self._atoms_actor is None:
            self._atoms_mesh = mesh
            self._activate()
            self._atoms_actor = self.plotter.add_mesh(
                mesh, scalars="rgb", rgb=True, smooth_shading=True, specular=0.3, name=self._tag + "-atoms",
                reset_camera=False, render=False, show_scalar_bar=False)
        else:
            self._atoms_mesh.copy_from(mesh, deep=True)
            self._atoms_mesh.point_data.active_scalars_name = "rgb"
            self._atoms_mesh.Modified()
        self._update_visibility()

    def set_outline(self, grid) -> None:
        """Draw the cube ``[0, length]^3`` as a wire-frame box (one actor, updated in place)."""
        self.grid = grid
        box = pv.Box(bounds=_cube_bounds(grid.length)).outline()
        if self._outline_actor is None:
            self._outline = box
            self._activate()
            self._outline_actor = self.plotter.add_mesh(
                box, color=self._foreground(), line_width=1.5, name=self._tag + "-outline",
                reset_camera=False, render=False, show_scalar_bar=False, pickable=False)
        else:
            self._outline.copy_from(box, deep=True)
            self._outline.Modified()

    def set_title(self, text: str) -> None:
        """Text at the upper edge of the panel (replaced, never stacked)."""
        self._title = str(text)
        if self._title_actor is None:
            self._activate()
            self._title_actor = self.plotter.add_text(self._title, position="upper_edge", font_size=11,
                                                      color=self._foreground(), name=self._tag + "-title")
        else:
            self._title_actor.SetText(7, self._title)  # 7 = vtkCornerAnnotation.UpperEdge

    def show_density(self, visible: bool) -> None:
        """Density volume on or off (no render)."""
        self._density_visible = bool(visible)
        self._update_visibility()

    def show_atoms(self, visible: bool) -> None:
        """Atom spheres on or off (no render)."""
        self._atoms_visible = bool(visible)
        self._update_visibility()

    def reset_camera(self, view: str | None = "iso", zoom: float = 0.9) -> None:
        """Fit the camera to the cube (to all actors if no grid is known yet).

        Args:
            view: ``"iso"``, ``"xy"`` (looking down -z, x right, y up), ``"xz"``, ``"yz"``
                (prefix ``"-"`` for the opposite side), or None to keep the direction.
            zoom: camera zoom after the fit (< 1 leaves a margin around the cube).
        """
        bounds = _cube_bounds(self.grid.length) if self.grid is not None else None
        if view is None:
            self.renderer.reset_camera(render=False, bounds=bounds)
        else:
            _set_camera_view(self.renderer, view, bounds)
        if zoom != 1.0:
            self.renderer.camera.zoom(zoom)
        self.renderer.reset_camera_clipping_range()

    def frame(self, bounds: Sequence[float], view: str = "iso", turn: tuple[float, float] = (18.0, 12.0)) -> None:
        """Point the camera along ``view``, turn it by ``turn`` = (azimuth, elevation) degrees
        (off the exact isometric axis, along which a cubic cell's corner hides behind its
        centre), and fit ``bounds`` (xmin, xmax, ymin, ymax, zmin, zmax; Å)."""
        _set_camera_view(self.renderer, view, bounds)
        cam = self.renderer.camera
        cam.azimuth += turn[0]
        cam.elevation += turn[1]
        self.renderer.reset_camera(render=False, bounds=bounds)
        self.renderer.reset_camera_clipping_range()

    def clear(self) -> None:
        """Remove every actor of this scene from the plotter."""
        for a in self.actors():
            self.renderer.remove_actor(a, render=False)
        if self._vol_actor is not None and self._scalar_bar:
            try:
                self.plotter.remove_scalar_bar(_ARRAY, render=False)
            except (KeyError, ValueError, AttributeError):
                pass
        self.__init_state()

    def __init_state(self) -> None:
        self._vol_data = self._vol_actor = self._lut = self._bar = None
        self._atoms_mesh = self._atoms_actor = None
        self._outline = self._outline_actor = self._title_actor = None
        self._n_atoms = 0
        self._has_density = False
