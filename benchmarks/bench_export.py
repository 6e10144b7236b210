"""Headless export speed: frames per second of latent-path videos (MP4, 1280x720, 30 frames).

    python benchmarks/bench_export.py [--size 1280x720] [--frames 30] [--checkpoint PATH]

Rows (every row renders/writes ``--frames`` frames of the NaCl -> SrTiO3 path):

* ``model: decode + segment``: the decoder and the batched U-Net segmentation alone (no rendering).
* ``render only``: :class:`FrameRenderer` on frames prepared beforehand. The frames are the
  *input* densities of NaCl and SrTiO3 blended along the path with the atoms of the nearer
  crystal, so the cost is that of a crystal-looking frame whatever the checkpoint (an
  untrained decoder gives a flat, invisible field). The baseline is the scene's own
  settings (smart volume mapper, 4x multisampling); the export's defaults on a software
  OpenGL (Mesa llvmpipe) are VTK's fixed-point CPU ray caster and no multisampling.
* ``render + encode MP4``: the same frames rendered and streamed through libx264.
* ``export_path ...``: the whole pipeline (decode, segment, render, encode, atomic write) as
  the CLI and the GUI run it; density-only skips segmentation.

Target: >= 10 frames/s at 1280x720 on 2 CPU cores (software OpenGL). Anything else running
(e.g. a training job) competes for the same cores; the script prints the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from crystalstudio.core.latent import interpolate  # noqa: E402
from crystalstudio.core.segment import Atoms  # noqa: E402
from crystalstudio.io.structures import read_structure  # noqa: E402
from crystalstudio.render.export import (FrameRenderer, VideoWriter, decode_frames, export_path,  # noqa: E402
                                         parse_size)
from crystalstudio.session import Frame, Session  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    T = a.frames

    session = Session(a.checkpoint)
    ra = session.compute(read_structure(ROOT / "assets/samples/NaCl.cif", session.grid))
    rb = session.compute(read_structure(ROOT / "assets/samples/SrTiO3.cif", session.grid))
    zs = interpolate(ra.z, rb.z, T)

    ts = np.linspace(0.0, 1.0, T)
    prepared = [Frame(z, ((1 - t) * ra.M + t * rb.M).astype(np.float32),
                      Atoms(ra.positions, ra.Z) if t < 0.5 else Atoms(rb.positions, rb.Z))
                for z, t in zip(zs, ts)]

    rows: list[tuple[str, float]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_export-"))

    # warm up: torch kernels, llvmpipe shader compilation, ffmpeg start
    list(decode_frames(session, zs[:2]))
    with FrameRenderer(session.grid, size) as r:
        r.render(prepared[0])

    rows.append(("model: decode + segment (batched, no rendering)",
                 timed(lambda: list(decode_frames(session, zs)))))

    def render_only(mode="auto", aa=None):
        with FrameRenderer(session.grid, size, volume_mode=mode, antialias=aa) as r:
            for i, f in enumerate(prepared):
                r.render(f, i, T, f"t = {ts[i]:.2f}")

    def render_encode():
        with FrameRenderer(session.grid, size) as r, VideoWriter(tmp / "re.mp4", 30) as vw:
            for i, f in enumerate(prepared):
                vw.append(r.render(f, i, T, f"t = {ts[i]:.2f}"))

    rows.append(("render only, scene defaults: smart mapper, MSAA (baseline)",
                 timed(lambda: render_only("scene", True))))
    rows.append(("render only, export defaults (auto: CPU ray caster, no MSAA)", timed(render_only)))
    rows.append(("render + encode MP4, density + atoms", timed(render_encode)))

    titles = [f"t = {t:.2f}" for t in ts]
    runs = [
        ("export_path: decode+segment+render+MP4, density + atoms", {}),
        ("export_path, no prefetch thread", {"prefetch": False}),
        ("export_path, density only (no segmentation)", {"show_atoms": False}),
        ("export_path, atoms only (no volume)", {"show_density": False}),
    ]
    for label, kw in runs:
        rows.append((label, timed(lambda kw=kw: export_path(session, zs, tmp / "e.mp4", size=size,
                                                            titles=titles, **kw))))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nheadless export, {T} frames at {size[0]}x{size[1]}, {os.cpu_count()} CPU cores, "
          f"load average {load[0]:.2f} (checkpoint {session.model.path})")
    base = rows[1][1]
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'seconds':>8}  {'frames/s':>8}  {'vs baseline':>11}")
    for label, dt in rows:
        print(f"{label:<{w}}  {dt:8.2f}  {T / dt:8.2f}  {base / dt:10.2f}x")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
