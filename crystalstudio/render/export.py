"""Exports: latent paths to video (MP4, GIF), frames to PNG, density fields to NPY / VTI.

Pure pyvista + imageio (no Qt): the CLI (``crystalstudio interpolate|sweep|sample|
export-density``) and the GUI's export dialog call the same functions.

* :class:`FrameRenderer` draws one decoded :class:`~crystalstudio.session.Frame` off-screen
  (density volume + atoms in Jmol colours + cube outline, optional title and camera orbit)
  and returns the image as ``(H, W, 3)`` uint8.
* :class:`VideoWriter` / :func:`write_video` stream images into an MP4 (H.264, yuv420p,
  exactly the requested size) or GIF.
* :func:`export_path` decodes a latent path ``(T, latent)`` with a session, renders every
  frame and writes the video, reporting ``progress(i, total)`` (return False to cancel).
* :func:`save_png`, :func:`save_density_npy`, :func:`save_density_vti`: still exports.

Every file is written under a temporary name beside the target (``.<name>.part-XXXX<suffix>``)
and moved into place with ``os.replace`` only when complete: a cancelled or failed export
leaves nothing behind, and an existing file of that name is only replaced by a whole one.

Rendering runs on whichever thread calls it; create a :class:`FrameRenderer` in the thread
that uses it (a GUI runs exports in a worker thread with its own off-screen plotter).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "ExportCancelled",
    "FrameRenderer",
    "VideoWriter",
    "write_video",
    "export_path",
    "decode_frames",
    "segment_batch",
    "decode_fields",
    "video_format",
    "parse_size",
    "save_png",
    "save_density_npy",
    "save_density_vti",
    "density_image",
    "atom_style",
    "software_opengl",
    "atomic_path",
    "VOLUME_MODES",
    "VIDEO_SUFFIXES",
    "DEFAULT_BACKGROUND",
    "DEFAULT_ATOM_SCALE",
]

#: Output suffix -> format of :class:`VideoWriter`.
VIDEO_SUFFIXES = {".mp4": "mp4", ".gif": "gif"}
DEFAULT_BACKGROUND = "#1b1b1f"
#: Sphere radius = pymatgen atomic radius (Å) times this (full radii overlap in a crystal).
DEFAULT_ATOM_SCALE = 0.4
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_MAX_SIDE = 8192

ProgressFn = Callable[[int, int], Any]


class ExportCancelled(Exception):
    """The progress callback asked to stop; the partial output has been removed."""


# --------------------------------------------------------------------------- helpers


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """``"1280x720"`` (or ``(1280, 720)``) -> ``(1280, 720)``.

    Raises:
        ValueError: not two positive integers ``WxH`` up to 8192.
    """
    if isinstance(text, str):
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"size must look like 1280x720 (width x height in pixels), got {text!r}")
        w, h = int(m.group(1)), int(m.group(2))
    else:
        try:
            w, h = (int(v) for v in text)
        except (TypeError, ValueError):
            raise ValueError(f"size must be (width, height), got {text!r}") from None
    if not (1 <= w <= _MAX_SIDE and 1 <= h <= _MAX_SIDE):
        raise ValueError(f"size must be between 1x1 and {_MAX_SIDE}x{_MAX_SIDE} pixels, got {w}x{h}")
    return w, h


def video_format(path: str | os.PathLike) -> str:
    """``"mp4"`` or ``"gif"`` from the file suffix (case-insensitive).

    Raises:
        ValueError: any other suffix.
    """
    p = Path(path)
    fmt = VIDEO_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p.name}: unsupported video format {p.suffix or '(no suffix)'!r}; use .mp4 or .gif")
    return fmt


def _check_video_size(fmt: str, size: tuple[int, int], name: str) -> None:
    w, h = size
    if fmt == "mp4" and (w % 2 or h % 2 or w < 16 or h < 16):
        raise ValueError(f"{name}: MP4 (H.264, yuv420p) needs an even width and height of at least 16, "
                         f"got {w}x{h}")


def _check_suffix(path: Path, *suffixes: str) -> None:
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path.name}: expected a {' or '.join(suffixes)} file name")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success move it onto ``path``.

    The temporary file is ``.<name>.part-XXXX<suffix>`` in the target folder (so writers that
    look at the suffix pick the right format and ``os.replace`` stays on one file system). On
    any exception, :class:`ExportCancelled` and ``KeyboardInterrupt`` included, it is deleted
    and the target is left untouched.

    Raises:
        OSError: the folder does not exist or is not writable.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.part-", suffix=p.suffix)
    os.close(fd)
    t = Path(tmp)
    try:
        yield t
        os.chmod(t, 0o644)
        os.replace(t, p)
    except BaseException:
        with contextlib.suppress(OSError):
            t.unlink()
        raise


@functools.lru_cache(maxsize=None)
def _radius(Z: int) -> float:
    from ..io.structures import element_radius

    return element_radius(Z)


@functools.lru_cache(maxsize=None)
def _colour(Z: int) -> tuple[float, float, float]:
    from ..io.structures import element_colors

    return tuple(element_colors(np.array([Z]))[0])


def atom_style(Z: np.ndarray, scale: float = DEFAULT_ATOM_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Jmol colours ``(K, 3)`` and sphere radii ``(K,)`` (pymatgen atomic radius times ``scale``)."""
    Z = np.asarray(Z, np.int64).reshape(-1)
    colors = np.array([_colour(int(z)) for z in Z], np.float64).reshape(-1, 3)
    radii = np.array([_radius(int(z)) for z in Z], np.float64) * float(scale)
    return colors, radii


# --------------------------------------------------------------------------- rendering

#: FrameRenderer volume modes (see there).
VOLUME_MODES = ("auto", "cpu", "gpu", "scene")
#: Ray step of the CPU ray caster in voxels.
CPU_SAMPLE_STEP = 0.75

_SOFTWARE_GL = ("llvmpipe", "softpipe", "swrast", "software rasterizer", "swr", "lavapipe")


def frame_shape(mapper) -> tuple[int, ...]:
    """Dimensions of the image a volume mapper reads."""
    return tuple(mapper.GetInput().GetDimensions())


def software_opengl(plotter) -> bool:
    """Whether ``plotter``'s OpenGL context (after a first render) is a software renderer."""
    try:
        caps = plotter.ren_win.ReportCapabilities()
    except Exception:  # noqa: BLE001 - no context: assume hardware
        return False
    for line in caps.splitlines():
        if "renderer string" in line.lower():
            return any(k in line.lower() for k in _SOFTWARE_GL)
    return False



def image_sample_distance(size: Sequence[int], n: int) -> float:
    """Pixels between cast rays of the CPU volume ray caster (VTK's ImageSampleDistance).

    A 30^3 field seen across 720 pixels spans about 20 pixels per voxel: a ray every 2
    pixels (4x fewer rays, the image interpolated between them) changes the frame by
    0.05 grey levels on average and renders 2.5x faster. Small videos keep one ray per
    pixel: ``clip(min(width, height) / (12 n), 1, 2)``.
    """
    return float(np.clip(min(parse_size(size)) / (12.0 * max(int(n), 1)), 1.0, 2.0))


class FrameRenderer:
    """Off-screen renderer of decoded frames: one pyvista plotter + :class:`CrystalScene`.

    Args:
        grid: the :class:`~crystalstudio.core.density.Grid` of the frames.
        size: image size ``(width, height)`` in pixels.
        show_density: draw the density volume.
        show_atoms: draw the segmented atoms (Jmol colours, radius = pymatgen atomic radius
            times ``atom_scale``).
        orbit_degrees: total camera azimuth over a whole export: frame ``i`` of ``total`` is
            seen from ``orbit_degrees * i / total`` degrees (so 360 loops seamlessly).
        background: background colour (anything pyvista accepts).
        view: starting camera view (``"iso"``, ``"xy"``, ``"xz"``, ``"yz"``).
        zoom: camera zoom after fitting the cube.
        clim: fixed colour range of the density in units of Z (None: the scene's growing
            default; :func:`export_path` pins it to the path's highest peak).
        atom_scale: factor on the atomic radii.
        scalar_bar: show the density colour bar (only with ``show_density``).
        volume_mode: how the volume is ray cast: ``"cpu"`` (VTK's fixed-point CPU ray caster,
            a step of 3/4 voxel, a ray every :func:`image_sample_distance` pixels), ``"gpu"`` (the smart mapper on the GPU ray caster), ``"scene"``
            (the scene's smart mapper as it is) or ``"auto"``: ``"cpu"`` when OpenGL is a
            software renderer such as Mesa llvmpipe (there it is 2-3x faster than the smart
            mapper and looks the same), else ``"gpu"``.
        antialias: multisample anti-aliasing of edges (outline, spheres). None: off on a
            software OpenGL, where it costs more than the atoms themselves (about 100 ms a
            frame at 1280x720), on otherwise.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, grid, size: Sequence[int] = (1280, 720), *, show_density: bool = True,
                 show_atoms: bool = True, orbit_degrees: float = 0.0, background: Any = DEFAULT_BACKGROUND,
                 view: str = "iso", zoom: float = 0.9, clim: Sequence[float] | None = None,
                 atom_scale: float = DEFAULT_ATOM_SCALE, scalar_bar: bool = True,
                 volume_mode: str = "auto", antialias: bool | None = None) -> None:
        from .scene import CrystalScene, offscreen_plotter, render_frame

        if volume_mode not in VOLUME_MODES:
            raise ValueError(f"volume_mode must be one of {', '.join(map(repr, VOLUME_MODES))}, got {volume_mode!r}")

        self.grid = grid
        self.size = parse_size(size)
        self.show_density = bool(show_density)
        self.show_atoms = bool(show_atoms)
        self.orbit_degrees = float(orbit_degrees)
        if not math.isfinite(self.orbit_degrees):
            raise ValueError(f"orbit_degrees must be finite, got {orbit_degrees!r}")
        self.view = view
        self.zoom = float(zoom)
        self.atom_scale = float(atom_scale)
        self.volume_mode = volume_mode
        self.plotter = offscreen_plotter(self.size, background=background, length=grid.length, view=view)
        try:
            self.scene = CrystalScene(self.plotter, clim=clim, scalar_bar=bool(scalar_bar) and self.show_density)
            self.scene.set_outline(grid)
            self.scene.show_density(self.show_density)
            self.scene.show_atoms(self.show_atoms)
            self.scene.reset_camera(view, self.zoom)
            if volume_mode == "auto" or antialias is None:
                render_frame(self.plotter)  # an OpenGL context to ask which renderer it is
                software = software_opengl(self.plotter)
                if volume_mode == "auto":
                    self.volume_mode = "cpu" if software else "gpu"
                if antialias is None:
                    antialias = not software
            if not antialias:
                self.plotter.ren_win.SetMultiSamples(0)
            self.antialias = bool(antialias)
        except BaseException:
            self.plotter.close()
            raise
        self._tuned = False
        self._cpu_mapper = None

    def _tune_volume(self) -> None:
        """Once the scene has created its volume: switch its mapper as ``volume_mode`` says.

        ``"cpu"`` puts a fixed-point ray-cast mapper on the scene's volume actor, reading the
        very dataset the scene updates in place (so later frames need nothing more).
        """
        if self._tuned:
            return
        import vtk

        self._tuned = True
        vol = next((a for a in self.scene.actors() if isinstance(a, vtk.vtkVolume)), None)
        if vol is None or self.volume_mode == "scene":
            return
        old = vol.GetMapper()
        if self.volume_mode == "gpu":
            if hasattr(old, "SetRequestedRenderModeToGPU"):
                old.SetRequestedRenderModeToGPU()
            return
        from pyvista.plotting.mapper import FixedPointVolumeRayCastMapper

        m = FixedPointVolumeRayCastMapper()
        m.SetInputData(old.GetInput())
        m.SetScalarMode(old.GetScalarMode())
        m.SetArrayAccessMode(old.GetArrayAccessMode())
        if old.GetArrayName():
            m.SelectScalarArray(old.GetArrayName())
        m.SetBlendMode(old.GetBlendMode())
        m.SetAutoAdjustSampleDistances(False)
        m.SetSampleDistance(CPU_SAMPLE_STEP * float(self.grid.length) / np.asarray(frame_shape(old)).max())
        m.SetImageSampleDistance(image_sample_distance(self.size, self.grid.n))
        # the scene widens its colour range through the mapper's pyvista lookup table
        m.lookup_table = getattr(old, "lookup_table", None)
        with contextlib.suppress(Exception):
            m.scalar_range = old.scalar_range
        vol.SetMapper(m)
        self._cpu_mapper = m  # keep the Python wrapper (and its lookup table) alive

    def render(self, frame, index: int = 0, total: int = 1, title: str | None = None) -> np.ndarray:
        """Draw ``frame`` (anything with ``.M_hat`` and ``.atoms``) and return ``(H, W, 3)`` uint8.

        Args:
            frame: a :class:`~crystalstudio.session.Frame` (or a Reconstruction).
            index, total: position in the export; sets the orbit angle.
            title: text at the top of the image (None keeps the previous one, "" clears it).
        """
        from .scene import render_frame

        if self.show_density:
            self.scene.set_density(frame.M_hat, self.grid)
            self._tune_volume()
        if self.show_atoms:
            atoms = frame.atoms
            colors, radii = atom_style(atoms.Z, self.atom_scale)
            self.scene.set_atoms(atoms.positions, atoms.Z, colors=colors, radii=radii)
        if title is not None:
            self.scene.set_title(title)
        if self.orbit_degrees:
            self.scene.reset_camera(self.view, self.zoom)
            cam = self.scene.renderer.camera
            cam.Azimuth(self.orbit_degrees * index / max(int(total), 1))
            cam.OrthogonalizeViewUp()
            self.scene.renderer.reset_camera_clipping_range()
        img = render_frame(self.plotter)
        w, h = self.size
        if img.shape != (h, w, 3):  # e.g. a HiDPI scale on an on-screen window: keep the contract
            raise RuntimeError(f"renderer returned a {img.shape[1]}x{img.shape[0]} image, expected {w}x{h}")
        return img

    def close(self) -> None:
        """Release the off-screen plotter."""
        if self.plotter is not None:
            self.plotter.close()
            self.plotter = None

    def __enter__(self) -> "FrameRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- video


class VideoWriter:
    """Stream ``(H, W, 3)`` uint8 images into an MP4 or GIF, atomically.

    MP4: H.264 (``libx264``, yuv420p, ``-preset`` ``preset``, constant quality ``crf``,
    ``+faststart``) via imageio's ffmpeg plugin, exactly ``W x H`` (both must be even, no
    padding). GIF: imageio's pillow plugin, ``1000 / fps`` ms per frame, looping forever; its
    frames are kept in memory until :meth:`close` (meant for short, small clips), and Pillow
    merges identical consecutive frames into one longer frame (same playback, fewer frames).

    Frames go to ``.<name>.part-XXXX<suffix>`` beside ``path``; :meth:`close` moves the
    finished file onto ``path``, :meth:`abort` (or leaving a ``with`` block by an exception)
    deletes it.

    Raises:
        ValueError: unknown suffix, fps <= 0, odd MP4 size, or a frame of another size.
        OSError: the folder does not exist or is not writable.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 30, *, crf: int = 20, preset: str = "ultrafast"):
        self.path = Path(path)
        self.format = video_format(self.path)
        self.fps = float(fps)
        if not (math.isfinite(self.fps) and 0 < self.fps <= 240):
            raise ValueError(f"fps must be in (0, 240], got {fps!r}")
        self.crf, self.preset = int(crf), str(preset)
        self.n_frames = 0
        self._size: tuple[int, int] | None = None
        self._writer = None
        self._ctx = atomic_path(self.path)
        self.tmp = self._ctx.__enter__()
        self._done = False

    def _open(self, w: int, h: int) -> None:
        import imageio.v2 as iio2
        import imageio.v3 as iio3

        if self.format == "mp4":
            _check_video_size("mp4", (w, h), self.path.name)
            self._writer = iio2.get_writer(
                self.tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264", pixelformat="yuv420p",
                quality=None, macro_block_size=1, ffmpeg_log_level="error",
                output_params=["-preset", self.preset, "-crf", str(self.crf), "-movflags", "+faststart"])
        else:
            self._writer = iio3.imopen(self.tmp, "w", extension=".gif", plugin="pillow")

    def append(self, image: np.ndarray) -> None:
        """Add one frame (``(H, W, 3)`` uint8; the first frame fixes the size)."""
        if self._done:
            raise RuntimeError("the video is already closed")
        img = np.ascontiguousarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
        h, w = img.shape[:2]
        if self._size is None:
            self._open(w, h)
            self._size = (w, h)
        elif self._size != (w, h):
            raise ValueError(f"frame {self.n_frames} is {w}x{h}, the video is {self._size[0]}x{self._size[1]}")
        if self.format == "mp4":
            self._writer.append_data(img)
        else:
            self._writer.write(img, is_batch=False, duration=1000.0 / self.fps, loop=0)
        self.n_frames += 1

    def close(self) -> Path:
        """Finish the file and move it onto ``path``; returns ``path``.

        Raises:
            ValueError: no frame was written (nothing is left behind).
        """
        if self._done:
            return self.path
        if self.n_frames == 0:
            self.abort()
            raise ValueError(f"{self.path.name}: no frames to write")
        try:
            w, self._writer = self._writer, None
            w.close()
        except BaseException as exc:
            self._finish(type(exc), exc)
            raise
        self._finish(None, None)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial file; ``path`` is untouched."""
        if self._done:
            return
        w, self._writer = self._writer, None
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()
        self._finish(ExportCancelled, ExportCancelled())

    def _finish(self, typ, exc) -> None:
        self._done = True
        if typ is None:
            self._ctx.__exit__(None, None, None)
        else:
            with contextlib.suppress(BaseException):
                self._ctx.__exit__(typ, exc, None)  # deletes the temp file, re-raises: swallowed

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, typ, exc, tb) -> None:
        if typ is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a writer dropped without close(): leave nothing behind
        with contextlib.suppress(Exception):
            if not self._done:
                self.abort()


def _report(progress: ProgressFn | None, i: int, total: int) -> None:
    if progress is not None and progress(i, total) is False:
        raise ExportCancelled(f"cancelled after {i} of {total} frames")


def write_video(images: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 30, *,
                total: int | None = None, progress: ProgressFn | None = None, **writer_kw) -> Path:
    """Write images (``(H, W, 3)`` uint8, e.g. from :meth:`FrameRenderer.render`) to MP4/GIF.

    ``progress(i, total)`` is called after each frame (``total`` from ``len(images)`` when
    not given, else 0); returning False stops and raises :class:`ExportCancelled`. Nothing is
    left at ``path`` (nor a temporary file) unless the whole video was written.
    """
    video_format(path)
    if total is None:
        total = len(images) if hasattr(images, "__len__") else 0  # type: ignore[arg-type]
    with VideoWriter(path, fps, **writer_kw) as vw:
        for i, img in enumerate(images):
            vw.append(img)
            _report(progress, i + 1, total)
    return Path(path)


# --------------------------------------------------------------------------- latent paths


def _as_path(zs: np.ndarray, latent: int) -> np.ndarray:
    zs = np.asarray(zs, np.float32)
    if zs.ndim == 1:
        zs = zs[None]
    if zs.ndim != 2 or zs.shape[1] != latent or len(zs) == 0:
        raise ValueError(f"latent path must have shape (T, {latent}) with T >= 1, got {np.shape(zs)}")
    if not np.all(np.isfinite(zs)):
        raise ValueError("latent path contains NaN or infinite values")
    return zs


def segment_batch(model, fields: np.ndarray, light: np.ndarray | None = None) -> list:
    """Segment a batch of decoded fields ``(B, n, n, n)`` -> B :class:`~crystalstudio.core.segment.Atoms`.

    The frames of a latent path have no input to compare against, so their atoms are read at
    the model's ``draw_gate`` where it has one, as the explorer reads them
    (:meth:`crystalstudio.session.Session.decode`): ``model.segment_draws`` (its draw gate
    and ``draw_light``, one U-Net call per batch) for a
    :class:`~crystalstudio.core.checkpoint.CrystalModel`, else
    ``[model.segment(M, gate=model.draw_gate) for M in fields]``. ``light`` (B, n, n, n): the
    light-atom fields decoded beside them (:func:`decode_fields`), or None.
    """
    fields = np.asarray(fields, np.float32)
    if len(fields) == 0:
        return []
    own = getattr(model, "segment_draws", None)
    if callable(own):  # a CrystalModel: its draw gate and draw_light
        return list(own(fields, None if light is None else np.asarray(light, np.float32)))
    gate = getattr(model, "draw_gate", None)
    kw = {} if gate is None else {"gate": gate}
    if light is not None:
        kw["light"] = np.asarray(light, np.float32)
    own = getattr(model, "segment_batch", None)
    if callable(own):
        return list(own(fields, **kw))
    Ls = kw.pop("light", [None] * len(fields))
    return [model.segment(M, **kw, **({} if L is None else {"light": L})) for M, L in zip(fields, Ls)]


def decode_fields(model, zs: np.ndarray, cond=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(M_hat, L_hat)`` of latent vectors (B, latent): the model's ``decode_fields`` where it has
    one (L_hat None for a decoder without a light channel), else ``(model.decode(zs, cond), None)``."""
    own = getattr(model, "decode_fields", None)
    if callable(own):
        return own(zs, cond)
    return model.decode(zs, cond), None


def decode_frames(session, zs: np.ndarray, cond: float | None = None, segment: bool = True,
                  batch: int = 8) -> Iterator:
    """Decode a latent path ``(T, latent)`` lazily into :class:`~crystalstudio.session.Frame` s,
    ``batch`` vectors per decoder / segmentation call (atoms empty unless ``segment``)."""
    from ..core.segment import Atoms
    from ..session import Frame, readouts

    model = session.model
    zs = _as_path(zs, model.latent)
    for s in range(0, len(zs), batch):
        Ms, Ls = decode_fields(model, zs[s:s + batch], cond)
        atoms = segment_batch(model, Ms, Ls) if segment else [Atoms.empty() for _ in Ms]
        for z, M, at in zip(zs[s:s + batch], Ms, atoms):
            yield Frame(z.copy(), M, at, readouts(at, M, model.grid.peak_scale))


def _cond_slice(cond, s: int, batch: int, total: int):
    if cond is None or np.ndim(cond) == 0:
        return cond
    c = np.asarray(cond, np.float32).reshape(-1)
    if len(c) != total:
        raise ValueError(f"{len(c)} conditioning values for {total} frames")
    return c[s:s + batch]


def export_path(session, zs: np.ndarray, path: str | os.PathLike, fps: float = 30,
                size: Sequence[int] | str = (1280, 720), orbit_degrees: float = 0.0,
                show_density: bool = True, show_atoms: bool = True, cond: float | None = None,
                progress: ProgressFn | None = None, titles: Sequence[str] | Callable[[int], str] | None = None,
                *, background: Any = DEFAULT_BACKGROUND, clim: Sequence[float] | None = None,
                batch: int = 8, prefetch: bool = True, volume_mode: str = "auto",
                antialias: bool | None = None, **writer_kw) -> Path:
    """Render the latent path ``zs`` decoded by ``session`` into a video at ``path``.

    Args:
        session: a :class:`~crystalstudio.session.Session` (only ``session.model`` is used).
        zs: ``(T, latent)`` latent vectors, one per frame (see :mod:`crystalstudio.core.latent`).
        path: ``.mp4`` (H.264) or ``.gif``; the format follows the suffix.
        fps: frames per second.
        size: ``(width, height)`` or ``"1280x720"``; the video is exactly this size (MP4 needs
            even sides).
        orbit_degrees: camera azimuth turned over the whole video.
        show_density, show_atoms: what to draw (atoms are only segmented when shown).
        cond: target largest density of a conditional decoder (Sec. 4.5, Eq. 1 units): one
            value, or one per frame (e.g. A's and B's own maxima interpolated); None otherwise.
        progress: ``progress(i, total)`` with ``i`` frames written so far (0 before the
            first, and while decoding); returning False cancels.
        titles: one string per frame, or ``titles(i) -> str``; None draws none.
        background, clim, volume_mode, antialias: see :class:`FrameRenderer`; ``clim`` None pins the colour
            range for the whole video to ``(0, max(30, highest peak))`` in units of Z.
        batch: latent vectors per decoder / segmentation call.
        prefetch: segment the next batch in a worker thread while this one is rendered.
        writer_kw: ``crf``, ``preset`` of :class:`VideoWriter`.

    Returns:
        ``path`` as a Path.

    Raises:
        ExportCancelled: ``progress`` returned False; nothing is left behind.
        ValueError: bad suffix, size, fps or path shape (before anything is written).
        OSError: the folder does not exist or is not writable.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..core.segment import Atoms
    from ..session import Frame
    from .scene import DEFAULT_CLIM_MAX

    fmt = video_format(path)
    size = parse_size(size)
    _check_video_size(fmt, size, Path(path).name)
    model = session.model
    zs = _as_path(zs, model.latent)
    total = len(zs)
    if titles is not None and not callable(titles) and len(titles) != total:
        raise ValueError(f"{len(titles)} titles for {total} frames")
    if not (math.isfinite(float(fps)) and float(fps) > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    batch = max(1, int(batch))

    _report(progress, 0, total)
    # All densities first (cheap, batched): a colour range fixed for the whole video keeps the
    # frames comparable.
    fields, lights = [], []
    for s in range(0, total, batch):
        Ms, Ls = decode_fields(model, zs[s:s + batch], _cond_slice(cond, s, batch, total))
        fields.append(np.asarray(Ms, np.float32))
        lights.append(Ls)
        _report(progress, 0, total)
    M_all = np.concatenate(fields)
    L_all = None if any(L is None for L in lights) else np.concatenate(lights).astype(np.float32)
    if clim is None and show_density:
        peak = float(np.nan_to_num(M_all).max()) * model.grid.peak_scale
        clim = (0.0, max(DEFAULT_CLIM_MAX, math.ceil(peak / 10.0) * 10.0))

    starts = list(range(0, total, batch))

    def atoms_of(s: int) -> list:
        if not show_atoms:
            return [Atoms.empty()] * len(M_all[s:s + batch])
        return segment_batch(model, M_all[s:s + batch], None if L_all is None else L_all[s:s + batch])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-segment") as pool, \
            FrameRenderer(model.grid, size, show_density=show_density, show_atoms=show_atoms,
                          orbit_degrees=orbit_degrees, background=background, clim=clim,
                          volume_mode=volume_mode, antialias=antialias) as renderer, \
            VideoWriter(path, fps, **writer_kw) as vw:
        pending = pool.submit(atoms_of, starts[0]) if prefetch else None
        try:
            for k, s in enumerate(starts):
                chunk = pending.result() if prefetch else atoms_of(s)
                if prefetch and k + 1 < len(starts):
                    pending = pool.submit(atoms_of, starts[k + 1])
                for j, atoms in enumerate(chunk):
                    i = s + j
                    title = None if titles is None else (titles(i) if callable(titles) else str(titles[i]))
                    vw.append(renderer.render(Frame(zs[i], M_all[i], atoms), i, total, title))
                    _report(progress, i + 1, total)
        finally:
            if pending is not None:
                pending.cancel()
    return Path(path)


# --------------------------------------------------------------------------- stills


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(H, W, 3|4)`` uint8 image as PNG (atomically)."""
    import imageio.v3 as iio

    p = Path(path)
    _check_suffix(p, ".png")
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3|4) uint8, got {img.shape} {img.dtype}")
    with atomic_path(p) as tmp:
        iio.imwrite(tmp, img, extension=".png")
    return p


def save_density_npy(M: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a density field (``(n, n, n)``, Eq. 1 units, axis order x, y, z) as float32 ``.npy``."""
    p = Path(path)
    _check_suffix(p, ".npy")
    arr = np.asarray(M, np.float32)
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return p


def density_image(M: np.ndarray, grid):
    """The field as a ``pyvista.ImageData``: points at the voxel centres (origin ``h/2``,
    spacing ``h`` Å), point arrays ``"density"`` (Eq. 1 units) and ``"density_Z"`` (times
    ``grid.peak_scale``, an isolated peak reads as Z), grid parameters as field data."""
    import pyvista as pv

    M = np.asarray(M, np.float32)
    if M.ndim != 3 or len(set(M.shape)) != 1:
        raise ValueError(f"density must have shape (n, n, n), got {M.shape}")
    n = M.shape[0]
    h = float(grid.length) / n
    img = pv.ImageData(dimensions=(n, n, n), spacing=(h, h, h), origin=(0.5 * h,) * 3)
    img.point_data["density"] = M.ravel(order="F")
    img.point_data["density_Z"] = (M * np.float32(grid.peak_scale)).ravel(order="F")
    img.set_active_scalars("density")
    for k in ("length", "sigma", "peak_scale"):
        img.field_data[f"grid_{k}"] = np.array([float(getattr(grid, k))])
    return img


def save_density_vti(M: np.ndarray, grid, path: str | os.PathLike) -> Path:
    """Write a density field as a VTK XML image (``.vti``, opens in ParaView); see
    :func:`density_image` for the arrays. Written atomically."""
    p = Path(path)
    _check_suffix(p, ".vti")
    img = density_image(M, grid)
    with atomic_path(p) as tmp:
        img.save(tmp, binary=True)
    return p
