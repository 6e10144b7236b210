"""The latent explorer: move z and watch the decoded crystal (Hoffmann et al. 2019, Sec. 4.3-4.5).

A panel (the main window puts it in a dock) with three pages:

* **Sliders**: every latent dimension from -3 to 3 (Fig. 10D), most informative first
  (``model.latent_rank``). Twelve slider rows show a window of the ranking; "from rank"
  pages through it and "jump to dim" brings any dimension's slider to the top. "Reset to
  encoded" returns to mu of the current reconstruction.
* **Interpolate**: endpoints A and B (the current z, or a shipped sample encoded on the
  fly), a t slider in [0, 1], linear or spherical, play/pause with loop and frames per
  sweep. t = 0 and t = 1 decode A's and B's z exactly.
* **Sample**: a draw from a seed ("Randomise"; "Sample" = next seed) from the prior of
  choice: the checkpoint's aggregate prior (a Gaussian mixture fitted where the training
  crystals encode; the default when the checkpoint has one) or z ~ N(0, I) (Sec. 4.4);
  each draw's validity (all pairs >= 0.5 Å, SMACT charge balance) beside it; "Draw until
  valid" searches seed after seed with a progress bar; and the Sec. 4.5 max-density
  conditioning (only for a conditional checkpoint; an aggregate prior draws its value
  from the training crystals unless the user sets one).

Below the pages: live readouts of the frame (atoms, composition, closest pair, largest
density) and, for an encoded crystal, the match figures against its input.

All model work runs in one :class:`~crystalstudio.gui.workers.LatestRunner`: the newest
request wins, so dragging a slider never queues up decodes. While a slider is dragged only
the density is decoded; 250 ms after the last move (or on release) the frame is decoded
and segmented. Frames leave through :attr:`LatentExplorer.frame_ready`; the window draws
them in its right-hand view.

The pages live in their own modules: :mod:`.explorer_sliders` (:class:`~.explorer_sliders.LatentSliders`),
:mod:`.explorer_interpolation` (:class:`~.explorer_interpolation.InterpolationPanel`),
:mod:`.explorer_sampling` (:class:`~.explorer_sampling.SamplingPanel` and its
:class:`~.explorer_sampling.ConditionBox`); the worker requests in :mod:`.explorer_requests`
(:class:`~.explorer_requests.DecodeRequests`). :class:`LatentExplorer` composes them: it keeps
the explored z, its caption and the conditioning passed to the decoder, and shows the frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from ..session import Frame, Reconstruction, Session
from .explorer_interpolation import PLAY_INTERVAL_MS, T_STEPS, InterpolationPanel
from .explorer_readouts import CLOSE_A, FrameReadouts, composition_text, readouts_html
from .explorer_requests import DEBOUNCE_MS, DecodeRequests
from .explorer_sampling import NOT_CONDITIONAL, SamplingPanel
from .explorer_sliders import ROWS, SLIDER_STEPS, LatentSliders, SliderRow
from .slices import SliceView

__all__ = ["LatentExplorer", "composition_text", "readouts_html", "SLIDER_STEPS", "ROWS", "DEBOUNCE_MS",
           "T_STEPS", "PLAY_INTERVAL_MS", "CLOSE_A", "NOT_CONDITIONAL"]

_SliderRow = SliderRow  # its former name


class LatentExplorer(QWidget):
    """Latent sliders, A-B interpolation, random draws and conditioning for one session.

    Args:
        parent: parent widget.
        session: the session to explore (None: everything is disabled until
            :meth:`set_session`).

    Attributes:
        sliders, interpolation, sampling: the three pages (:class:`LatentSliders`,
            :class:`InterpolationPanel`, :class:`SamplingPanel`); their controls are also
            attributes of the explorer under the same names (``rows``, ``t_slider``,
            ``seed_spin``, ``cond_group``, ...).
        requests: the worker requests (:class:`DecodeRequests`); ``runner`` is its worker.

    Signals:
        frame_ready(Frame, str, bool): a decoded frame to draw, its caption, and whether it
            was segmented (False: density only, keep the atoms on screen).
        frame_shown(Frame, bool): emitted after ``frame_ready`` (the frame is on screen).
        failed(str, str): title and one-line message of a failure.
        endpoint_set(str): endpoint "A" or "B" has a new z.
    """

    frame_ready = Signal(object, str, bool)
    frame_shown = Signal(object, bool)
    failed = Signal(str, str)
    endpoint_set = Signal(str)

    def __init__(self, parent: QWidget | None = None, session: Session | None = None) -> None:
        super().__init__(parent)
        self.session: Session | None = None
        self.requests = DecodeRequests(self)
        self.runner = self.requests.runner
        self.frame: Frame | None = None  # the frame on screen (last result)
        self.segmented = True
        self._source = "z = 0"
        self._path_cond: float | None = None  # conditioning of an A -> B frame

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.tabs = QTabWidget(self)
        self.sliders = LatentSliders(self, lambda: self.z)
        self.interpolation = InterpolationPanel(self, lambda: self.session, lambda: self.z, lambda: self._source,
                                                lambda: self.runner.busy)
        self.sampling = SamplingPanel(self, lambda: self.session)
        self.tabs.addTab(self.sliders, "Sliders")
        self.tabs.addTab(self.interpolation, "Interpolate")
        self.tabs.addTab(self.sampling, "Sample")
        layout.addWidget(self.tabs)
        self._adopt_controls()

        self.readouts = FrameReadouts(self)
        self.status_label, self.readout_label = self.readouts.status_label, self.readouts.readout_label
        layout.addWidget(self.readouts)
        layout.addStretch(1)
        self._connect()

        # The slice panel belongs to the explorer; the window docks it where it likes.
        self.slice_view = SliceView(None)
        self.set_session(session)

    # ------------------------------------------------------------------ construction
    def _adopt_controls(self) -> None:
        """The pages' controls as attributes of the explorer (tests and scripts use them)."""
        for page, names in ((self.sliders, "rows first_spin jump_spin page_label reset_button zero_button"),
                            (self.interpolation, "set_a_button set_b_button a_combo b_combo a_label b_label "
                                                 "t_slider t_label mode_combo play_button loop_check steps_spin"),
                            (self.interpolation.keyframes, "add_key_button clear_keys_button keys_label"),
                            (self.sampling, "prior_combo prior_note seed_spin randomise_button sample_button "
                                            "validity_label search cond_group"),
                            (self.sampling.cond_group, "cond_spin cond_z_label")):
            for name in names.split():
                setattr(self, name, getattr(page, name))

    def _connect(self) -> None:
        self.requests.decoded.connect(self._on_decoded)
        self.requests.encoded.connect(self.interpolation.set_encoded)
        self.requests.failed.connect(self._on_failed)
        self.requests.settled.connect(lambda: self.request(segment=True))
        self.runner.busy_changed.connect(self.readouts.show_busy)
        self.sliders.moved.connect(self._on_dim_slider)
        self.sliders.released.connect(self._on_release)
        self.reset_button.clicked.connect(self.reset_to_encoded)
        self.zero_button.clicked.connect(lambda: self.set_z(np.zeros(self._latent(), np.float32), "z = 0"))
        ip = self.interpolation
        ip.moved.connect(lambda z, source, dragging, cond: self._set_z(z, source, dragging=dragging, path_cond=cond))
        ip.released.connect(self._on_release)
        ip.encode_requested.connect(lambda which, path: self.requests.encode(self.session, which, path))
        ip.endpoint_set.connect(self.endpoint_set)
        self.sampling.drawn.connect(self.set_z)
        self.cond_group.switched.connect(lambda: self.request(segment=True))
        self.cond_group.target_changed.connect(self._on_cond_changed)

    # ------------------------------------------------------------------ session / model
    def _latent(self) -> int:
        return self.session.model.latent if self.session is not None else 0

    def set_session(self, session: Session | None) -> None:
        """Explore ``session`` (None: nothing to explore, the panel is disabled)."""
        self.session = session
        self.model_changed()

    def model_changed(self) -> None:
        """Adopt the session's (new) model: ranking, slider ranges, conditioning."""
        s = self.session
        self.setEnabled(s is not None)
        self.requests.new_model()
        if s is None:
            self.sliders.set_ranking([])
            self.status_label.setText("No model loaded.")
            self.interpolation.keyframes.show_keyframes()
            return
        s.reset_latent_state()
        m = s.model
        self.sliders.set_ranking(m.latent_rank)
        self.slice_view.peak_scale = float(m.grid.peak_scale)
        self.cond_group.set_conditional(bool(m.config.conditional))
        self.sampling.sync_prior()
        self.sliders.show_page(0)
        self.interpolation.update_endpoints()
        self.interpolation.keyframes.show_keyframes()
        self.status_label.setText("")

    @property
    def z(self) -> np.ndarray:
        """The latent vector being explored (zeros before anything was encoded)."""
        s = self.session
        if s is None:
            return np.zeros(0, np.float32)
        if s.z is None or s.z.shape != (s.model.latent,):
            s.z = np.zeros(s.model.latent, np.float32)
        return s.z

    def explicit_cond(self) -> float | None:
        """The control's target largest density when conditioning is switched on, else None."""
        return self.cond_group.explicit()

    def cond(self) -> float | None:
        """The target largest density passed to the decoder (Eq. 1 units): the control's value
        when conditioning is on; else, between A and B, :meth:`~Session.cond_between`; else the
        session's :meth:`~Session.natural_cond` (None for an unconditional model)."""
        c = self.explicit_cond()
        if c is None and self._source.startswith("random"):
            c = self.sampling.draw_cond  # an aggregate-prior draw's own value
        if c is None:
            c = self._path_cond  # between A and B: their largest densities interpolated
        if c is None and self.session is not None:
            c = self.session.natural_cond()
        return c

    # ------------------------------------------------------------------ the pages' actions
    def add_keyframe(self) -> int:
        """Append the explored z to the session's keyframe path; returns the count."""
        return self.interpolation.keyframes.add_keyframe()

    def clear_keyframes(self) -> None:
        """Empty the session's keyframe path."""
        self.interpolation.keyframes.clear_keyframes()

    def show_dimension(self, dim: int) -> SliderRow:
        """Bring latent dimension ``dim``'s slider into view (highlighted) and return its row."""
        return self.sliders.show_dimension(dim)

    def row_for(self, dim: int) -> SliderRow | None:
        """The slider row showing ``dim`` now (None when it is not on the page)."""
        return self.sliders.row_for(dim)

    def randomise(self) -> np.ndarray | None:
        """The draw of the seed in the seed box (see :meth:`SamplingPanel.randomise`)."""
        return self.sampling.randomise()

    def show_seed(self, seed: int) -> None:
        """Put ``seed`` in the seed box and show its draw."""
        self.sampling.show_seed(seed)

    def sample(self) -> np.ndarray | None:
        """Next seed, then :meth:`randomise`."""
        return self.sampling.sample()

    def set_endpoint_current(self, which: str) -> None:
        """Endpoint ``which`` = the z explored now (the reconstruction's μ unless it was moved)."""
        self.interpolation.set_endpoint_current(which)

    def set_endpoint_sample(self, which: str, path: str | Path) -> None:
        """Encode the structure file ``path`` in the background and make it endpoint ``which``."""
        self.interpolation.set_endpoint_sample(which, path)

    def set_t(self, t: float) -> None:
        """Move to ``t`` in [0, 1] between A and B (decoded and segmented)."""
        self.interpolation.set_t(t)

    def play(self, on: bool = True) -> None:
        """Start / stop stepping t through ``frames`` values from A to B."""
        self.interpolation.play(on)

    @property
    def playing(self) -> bool:
        """True while A -> B playback runs."""
        return self.interpolation.playing

    # ------------------------------------------------------------------ setting z
    def _on_dim_slider(self, row: SliderRow, value: int) -> None:
        if self.session is None:
            return
        z = self.z.copy()
        z[row.dim] = value / SLIDER_STEPS
        row.value.setText(f"{z[row.dim]:+.2f}")
        base = self._source.split(" · ")[0]
        self._set_z(z, f"{base} · z[{row.dim}] = {z[row.dim]:+.2f}", dragging=row.slider.isSliderDown(),
                    refresh=False)

    def _on_release(self) -> None:
        self.requests.stop_waiting()
        self.request(segment=True)

    def _set_z(self, z: np.ndarray, source: str, dragging: bool = False, refresh: bool = True,
               path_cond: float | None = None) -> None:
        self.session.set_latent(z)
        self._source = source
        self._path_cond = path_cond
        if refresh:
            self.sliders.refresh()
        if dragging:  # density only now, atoms when the slider rests
            self.request(segment=False)
            self.requests.segment_later()
        else:
            self.requests.stop_waiting()
            self.request(segment=True)

    def set_z(self, z: np.ndarray, source: str = "z") -> None:
        """Explore ``z`` (decoded and segmented in the background)."""
        if self.session is None:
            return
        self._set_z(np.asarray(z, np.float32), source)

    def reset_to_encoded(self) -> None:
        """z = mu of the current reconstruction."""
        rec = self.session.current if self.session is not None else None
        if rec is None:
            self.status_label.setText("Nothing encoded yet: open a structure first.")
            return
        self.set_z(rec.z, f"{rec.crystal.name} {'μ' if np.array_equal(rec.z, rec.mu) else 'z*'}")

    def _on_cond_changed(self) -> None:
        if self.cond() is not None:
            self.request(segment=False)
            self.requests.segment_later()

    # ------------------------------------------------------------------ requests and results
    def refresh(self) -> None:
        """Decode and segment the current z again, even where it was the last request (the
        way atoms are read changed, so the same z now gives other atoms)."""
        self.requests.last_request = None
        self.request(segment=True)

    def request(self, segment: bool = True) -> None:
        """Decode the current z (and segment it) in the worker; the newest request wins."""
        s = self.session
        if s is None or self.requests.closed:
            return
        self.requests.decode(s, self.z.copy(), self.cond(), segment, self._source)

    def _on_decoded(self, frame: Frame, metrics: dict | None, tag: dict) -> None:
        self.frame, self.segmented = frame, bool(tag["segment"])
        caption = tag["source"] + ("" if self.segmented else " (density only)")
        self.frame_ready.emit(frame, caption, self.segmented)
        rec = self.session.current
        if rec is not None:
            self.slice_view.set_fields(rec.M, frame.M_hat, rec.crystal.name)
        else:
            self.slice_view.set_fields(None, frame.M_hat)
        self.readouts.show_readouts(frame.readouts, self.segmented, metrics, tag["target"])
        why = frame.readouts.get("validity")
        if self.segmented and why is not None:
            self.sampling.show_validity(why)
        self.frame_shown.emit(frame, self.segmented)

    def _on_failed(self, exc: BaseException, tag: dict) -> None:
        if tag.get("kind") == "endpoint":
            self.interpolation.update_endpoints()
        msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        self.failed.emit("Latent explorer", msg)

    # ------------------------------------------------------------------ reconstruction
    def on_reconstruction(self, rec: Reconstruction) -> None:
        """A new reconstruction is on screen: z = its μ; in-flight decodes are dropped."""
        self.requests.new_reconstruction(rec.z)
        self.play(False)
        self._source = f"{rec.crystal.name} μ"
        if self.session is not None and (self.session.z is None or not np.array_equal(self.session.z, rec.z)):
            self.session.set_latent(rec.z)
        self.sliders.refresh()
        self.frame = Frame(np.asarray(rec.z, np.float32), rec.M_hat, rec.atoms, {})
        self.segmented = True
        self.frame.readouts = self.readouts.show_reconstruction(
            rec, self.session.grid.peak_scale if self.session else 1.0)
        self.slice_view.set_fields(rec.M, rec.M_hat, rec.crystal.name)
        if self.cond_group.isEnabled():
            self.cond_group.set_target(float(rec.M.max()))

    def shutdown(self) -> None:
        """Stop timers and wait for the worker (window closing)."""
        self.requests.close()
        self.interpolation.stop_timer()
        self.search.shutdown()
        self.requests.shutdown()
