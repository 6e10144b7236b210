"""crystalstudio.core.lattice_fold: a roughly repeating field's lattice and its periodic average,
checked against lattices built in the test (images from lattice_positions, fields as a direct
float64 sum over atoms and voxels)."""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core.lattice_fold import decoded_lattice, fold_field

from .test_fit import direct_field
from .test_lattice_fit import GRID, cube, same_lattice


def _noisy(F: np.ndarray, level: float, seed: int) -> np.ndarray:
    """F plus smooth noise (voxel noise blurred over about a voxel, as a decoder's errors are),
    scaled to ``level`` x the field's largest value (RMS)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    e = ndimage.gaussian_filter(rng.normal(size=F.shape), 1.0)
    return F + e * (level * F.max() / e.std())


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _interior(n: int, m: int = 3) -> tuple:
    return (slice(m, n - m),) * 3


@pytest.mark.parametrize("seed", range(2))
def test_a_field_that_repeats_comes_back_as_it_was(seed):
    P, Zi, L = cube(seed)
    F = direct_field(P, Zi, GRID)
    out = fold_field(F, GRID, L)
    assert out.shape == F.shape and out.dtype == np.float32
    # the spline's error, largest near the faces; inside, the average of equal values
    assert _rms(out[_interior(GRID.n)], F[_interior(GRID.n)]) < 1e-3 * F.max()
    assert _rms(out, F) < 1e-2 * F.max()


@pytest.mark.parametrize("seed", range(2))
def test_folding_averages_out_noise_that_differs_between_images(seed):
    P, Zi, L = cube(seed)
    F = direct_field(P, Zi, GRID)
    noisy = _noisy(F, 0.05, seed)
    out = fold_field(noisy, GRID, L)
    # a cell of ~134 Å^3 in a 1000 Å^3 cube: about 7 images per voxel on average, so the
    # noise's RMS falls by more than half
    assert _rms(out, F) < 0.5 * _rms(noisy, F)
    # and the result repeats with the lattice: the value at x equals the value at x + a
    h = GRID.length / GRID.n
    a = L[np.argmin(np.abs(L).max(1))]
    from scipy import ndimage

    g = np.arange(8, 22, dtype=float)
    x = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    y = x + a / h
    ok = np.all((y >= 1) & (y <= GRID.n - 2), axis=1)

    def repeat_misfit(X):
        X = X.astype(np.float64)
        return _rms(ndimage.map_coordinates(X, x[ok].T, order=3), ndimage.map_coordinates(X, y[ok].T, order=3))

    # (both read between voxels by a spline, whose error on the noise stays)
    assert ok.sum() > 100 and repeat_misfit(out) < 0.25 * repeat_misfit(noisy)


@pytest.mark.parametrize("seed", range(3))
def test_the_lattice_of_a_noisy_field_is_found(seed):
    P, Zi, L = cube(seed)
    noisy = _noisy(direct_field(P, Zi, GRID), 0.05, seed)
    found = decoded_lattice(noisy, GRID)
    assert found is not None and same_lattice(found, L, 0.05)


def test_a_field_that_does_not_repeat_has_no_lattice():
    rng = np.random.default_rng(3)
    P = rng.uniform(0.5, 9.5, (12, 3))
    F = direct_field(P, rng.integers(1, 90, 12), GRID)
    assert decoded_lattice(F, GRID) is None
    assert decoded_lattice(np.zeros((GRID.n,) * 3), GRID) is None


def test_bad_input_is_refused_with_a_reason():
    F = np.zeros((GRID.n,) * 3)
    with pytest.raises(ValueError, match="degenerate"):
        fold_field(F, GRID, np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="finite"):
        fold_field(np.full((GRID.n,) * 3, np.nan), GRID, np.eye(3) * 4)
    with pytest.raises(ValueError, match="too small"):
        fold_field(F, GRID, np.eye(3) * 0.05)


def test_a_lattice_checkpoint_reads_its_atoms_from_the_folded_field():
    """CrystalModel.segment with the checkpoint's ``lattice_fold``: on noisy lattice fields
    (smooth noise at a tenth of the largest value, as a decoder's errors), reading the folded
    field finds more of the true atoms in the cube and reads far more species right (amplitudes
    averaged over the images) than reading the field as it is. A unit-cell checkpoint never folds."""
    from crystalstudio.core.checkpoint import CrystalModel
    from crystalstudio.core.metrics import match_atoms
    from crystalstudio.core.models import CrystalNet, ModelConfig

    from .test_light import TINY

    net = CrystalNet(ModelConfig(grid_n=30, **TINY))
    found = {False: [0, 0], True: [0, 0]}
    for seed in range(3):
        P, Zi, _ = cube(seed)
        inside = np.all((P >= 0) & (P <= GRID.length), axis=1)
        F = _noisy(direct_field(P, Zi, GRID), 0.1, seed).astype(np.float32)
        for on in (False, True):
            model = CrystalModel(net, GRID, {"representation": "repeating_lattice", "lattice_fold": on}, jit=False)
            assert model.lattice_fold is on
            a = model.segment(F, gate=0.0, refined=True)
            m = match_atoms(P[inside], Zi[inside], a.positions, a.Z, 0.5)
            found[on][0] += m["true_matched"]
            found[on][1] += m["species_correct"]
    # measured: 49 -> 64 of 100 atoms within 0.5 Å, species 12 -> 28
    assert found[True][0] >= found[False][0] + 10
    assert found[True][1] >= found[False][1] + 10
    assert not CrystalModel(net, GRID, {"representation": "unit_cell", "lattice_fold": True}, jit=False).lattice_fold
