"""The shipped conditional checkpoint (Sec. 4.5): the target largest density scales the
decoded field's magnitude and leaves its geometry alone.

Geometry is read from the density peaks of M_hat (:func:`density_peaks`: sub-voxel local
maxima, independent of the U-Net), against the decode at the crystal's own largest
density, for the shipped samples with the target scaled by 0.8 and 1.25.

What the shipped checkpoint (cond21, fine-tuned from the light20 default; its encoder sees M
rescaled to the reference maximum, ``cond_normalise``, so only the condition carries the
magnitude) delivers, measured when it shipped: the largest density follows the target almost
exactly (x0.787..0.801 and x1.245..1.268; cond16n before it x0.76..0.80 and x1.24..1.29, the
checkpoint before that x0.88..0.93 and x1.05..1.13), and all 84 peak-to-peak distances stay
within 0.33 Å (largest 0.24 Å, median 0.02 Å; cond16n: largest 0.26 Å, median 0.03 Å).
"""

from __future__ import annotations

import numpy as np
import pytest

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.core.metrics import worst_nearest
from crystalstudio.core.segment import density_peaks
from crystalstudio.io.structures import read_structure
from crystalstudio.session import ASSETS, Session, sample_files

CONDITIONAL = ASSETS / "unit_cell_conditional.safetensors"
SCALES = (0.8, 1.25)
TOL_A = 0.33


@pytest.fixture(scope="module")
def session():
    model = load_checkpoint(CONDITIONAL)
    assert model.config.conditional and model.representation == "unit_cell"
    return Session(model=model)


def crystals(session):
    return [read_structure(p, session.grid) for p in sample_files()]


def test_scaling_changes_magnitude_not_geometry(session):
    model, grid = session.model, session.grid
    shifts = []
    for crystal in crystals(session):
        rec = session.compute(crystal)
        c0 = float(rec.M.max())
        M0 = model.decode(rec.z, c0)
        np.testing.assert_allclose(M0, rec.M_hat, rtol=1e-5, atol=1e-6)  # the reconstruction is at c0
        assert len(density_peaks(M0, grid, 0.3)) > 0, crystal.name
        maxima = []
        for k in SCALES:
            Mk = model.decode(rec.z, k * c0)
            maxima.append(float(Mk.max()))
            # geometry: each strong peak (> 0.3 max) of either field to the nearest peak of the other
            for A, B in ((M0, Mk), (Mk, M0)):
                P, Q = density_peaks(A, grid, 0.3), density_peaks(B, grid, 0.15)
                shifts += [worst_nearest(p[None], Q) for p in P]
        # magnitude: follows the target, in order, by a visible amount
        assert maxima[0] < float(M0.max()) < maxima[1], (crystal.name, maxima)
        assert maxima[1] / maxima[0] > 1.4, (crystal.name, maxima)  # the target ratio is 1.5625
    shifts = np.asarray(shifts)
    # every peak stays within 0.33 Å (module docstring)
    assert np.median(shifts) <= 0.1, np.round(np.sort(shifts), 2)
    assert (shifts <= TOL_A).all(), np.round(np.sort(shifts), 2)


def test_unconditional_model_ignores_the_target():
    model = load_checkpoint(ASSETS / "unit_cell.safetensors")
    assert not model.config.conditional
    z = np.random.default_rng(0).standard_normal(model.latent).astype(np.float32)
    np.testing.assert_array_equal(model.decode(z, 0.5), model.decode(z, 5.0))
