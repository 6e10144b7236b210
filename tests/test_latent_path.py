"""The explorer's latent path (crystalstudio.latent_path): endpoints, t, keyframes, events."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.latent_path import LatentPath


class Rec:  # the one thing the path reads of a Reconstruction: its input field M
    def __init__(self, peak):
        self.M = np.array([[[0.0, peak]]], np.float32)


def path_with_events(latent=4):
    events = []
    return LatentPath(latent, lambda e, v: events.append((e, v))), events


def test_between_reaches_both_ends_exactly_and_interpolates_in_float64_agreement():
    path, events = path_with_events()
    za = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    zb = np.array([-1.0, 4.0, 0.25, 0.0], np.float32)
    with pytest.raises(ValueError, match="endpoints A and B"):
        path.between(0.5)
    path.set_endpoint("A", "NaCl", za)
    path.set_endpoint("B", "SrTiO3", zb.tolist())  # any array-like, stored as float32
    assert [e for e, _ in events] == ["endpoint", "endpoint"] and events[1][1][0] == "B"
    assert path.endpoints["B"].z.dtype == np.float32 and path.ready()
    for mode in ("linear", "spherical"):
        np.testing.assert_array_equal(path.between(0.0, mode), za)
        np.testing.assert_array_equal(path.between(1.0, mode), zb)
    ref = 0.7 * za.astype(np.float64) + 0.3 * zb.astype(np.float64)
    np.testing.assert_allclose(path.between(0.3), ref, rtol=0, atol=1e-6)
    assert path.t == pytest.approx(0.3)
    path.between(7.0)  # clipped
    assert path.t == 1.0
    # spherical: unit-norm ends stay on the unit sphere in between (lerp would not)
    path.set_endpoint("A", "x", np.array([1, 0, 0, 0]))
    path.set_endpoint("B", "y", np.array([0, 1, 0, 0]))
    assert np.linalg.norm(path.between(0.5, "spherical")) == pytest.approx(1.0, abs=1e-6)
    assert np.linalg.norm(path.between(0.5, "linear")) == pytest.approx(np.sqrt(0.5), abs=1e-6)
    with pytest.raises(ValueError, match="unknown interpolation mode"):
        path.between(0.5, "cubic")


def test_bad_vectors_and_names_are_refused_without_changing_the_path():
    path, events = path_with_events()
    with pytest.raises(ValueError, match="'A' or 'B'"):
        path.set_endpoint("C", "x", np.zeros(4))
    with pytest.raises(ValueError, match="4 finite numbers"):
        path.set_endpoint("A", "x", np.zeros(5))
    with pytest.raises(ValueError, match="4 finite numbers"):
        path.add_keyframe(np.array([0, np.nan, 0, 0]))
    with pytest.raises(ValueError, match="nothing to add"):
        path.add_keyframe(None)
    assert path.endpoints == {"A": None, "B": None} and path.keyframes == [] and events == []


def test_keyframes_are_copies_counted_in_events_and_cleared():
    path, events = path_with_events()
    z = np.ones(4, np.float32)
    assert path.add_keyframe(z) == 1
    z[:] = 5.0  # the caller's array changing later does not move the keyframe
    assert path.add_keyframe(np.zeros(4)) == 2
    np.testing.assert_array_equal(path.keyframes[0], np.ones(4))
    path.clear_keyframes()
    assert path.keyframes == [] and events == [("keyframes", 1), ("keyframes", 2), ("keyframes", 0)]


def test_resize_forgets_only_what_no_longer_fits():
    path, _ = path_with_events(latent=4)
    path.set_endpoint("A", "a", np.zeros(4))
    path.add_keyframe(np.zeros(4))
    path.resize(4)
    assert path.endpoints["A"] is not None and len(path.keyframes) == 1
    path.resize(6)
    assert path.endpoints["A"] is None and path.keyframes == [] and path.latent == 6
    path.set_endpoint("A", "a", np.zeros(6))  # the new size is what is accepted now


def test_endpoint_maxima_need_two_encoded_crystals():
    path, _ = path_with_events()
    path.set_endpoint("A", "NaCl", np.zeros(4), Rec(2.5))
    path.set_endpoint("B", "seed 3", np.ones(4))  # a draw: no input field
    assert path.endpoint_maxima() is None
    path.set_endpoint("B", "SrTiO3", np.ones(4), Rec(7.0))
    assert path.endpoint_maxima() == (2.5, 7.0)


def test_the_session_and_the_path_refuse_a_latent_vector_alike():
    from types import SimpleNamespace

    from crystalstudio.core.latent import latent_vector
    from crystalstudio.session import Session

    session = Session(model=SimpleNamespace(latent=4))  # set_latent reads only the latent size
    events = []
    session.subscribe(lambda e, v: events.append(e))
    for bad in (np.zeros(5), [0.0, np.inf, 0.0, 0.0], "abcd"):
        with pytest.raises(ValueError):
            session.set_latent(bad)
        with pytest.raises(ValueError):
            session.path.set_endpoint("A", "x", bad)
    with pytest.raises(ValueError, match=r"^z must be 4 finite numbers, got shape \(5,\)$"):
        session.set_latent(np.zeros((5, 1)))
    assert session.z is None and events == []
    z = np.arange(4, dtype=np.float64).reshape(2, 2)
    out = session.set_latent(z)
    z[0, 0] = 9.0  # a copy: the caller's array changing later does not move the explored z
    assert out.dtype == np.float32 and out.tolist() == [0, 1, 2, 3] and session.z is out and events == ["latent"]
    assert latent_vector(range(3), 3, "endpoint").tolist() == [0, 1, 2]
