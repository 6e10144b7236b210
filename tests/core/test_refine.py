"""crystalstudio.core.refine: latent refinement against a closed-form reference (a linear
decoder, whose objective is a quadratic with a float64 least-squares minimiser), and on a
real (tiny) model through CrystalModel.refine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystalstudio.core.checkpoint import CrystalModel
from crystalstudio.core.density import Grid
from crystalstudio.core.models import CrystalNet, ModelConfig
from crystalstudio.core.refine import frozen, refine_latent, refine_objective

N, L = 6, 5  # a 6^3 "field" decoded linearly from a 5-d latent


def _linear_problem(seed: int, B: int = 3):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(N**3, L)) / np.sqrt(N**3)
    z_true = rng.normal(size=(B, L))
    M = np.clip(z_true @ A.T, 0, None) + rng.uniform(0, 0.05, size=(B, N**3))
    return A, M


def _closed_form(A: np.ndarray, m: np.ndarray, peak_weight: float, prior_weight: float) -> np.ndarray:
    """argmin_z sum w (A z - m)^2 + lambda/2 |z|^2, in float64: (A^T W A + lambda/2 I) z = A^T W m."""
    w = 1.0 + peak_weight * m / m.max()
    H = A.T @ (w[:, None] * A) + 0.5 * prior_weight * np.eye(A.shape[1])
    return np.linalg.solve(H, A.T @ (w * m))


@pytest.mark.parametrize("peak_weight,prior_weight", [(0.0, 0.0), (1.0, 0.01), (1.0, 0.5)])
def test_linear_decoder_reaches_the_least_squares_minimiser(peak_weight, prior_weight):
    A, M = _linear_problem(1)
    At = torch.tensor(A, dtype=torch.float32)
    decode = lambda z: (z @ At.T).view(-1, N, N, N)  # noqa: E731
    Mt = torch.tensor(M, dtype=torch.float32).view(-1, N, N, N)
    z0 = torch.zeros(len(M), L)
    z = refine_latent(decode, Mt, z0, steps=1500, lr=0.05, peak_weight=peak_weight, prior_weight=prior_weight)
    for b in range(len(M)):
        ref = _closed_form(A, M[b], peak_weight, prior_weight)
        assert np.allclose(z[b].numpy(), ref, atol=2e-3), (z[b].numpy(), ref)
    # the objective matches an explicit float64 sum at the result
    f = refine_objective(decode(z), Mt, z, peak_weight, prior_weight).numpy()
    for b in range(len(M)):
        zb = z[b].numpy().astype(np.float64)
        w = 1.0 + peak_weight * M[b] / M[b].max()
        ref = (w * (A @ zb - M[b]) ** 2).sum() + 0.5 * prior_weight * (zb**2).sum()
        assert f[b] == pytest.approx(ref, rel=1e-4)


def test_never_worse_than_the_start_and_zero_steps_is_the_start():
    A, M = _linear_problem(2)
    At = torch.tensor(A, dtype=torch.float32)
    decode = lambda z: (z @ At.T).view(-1, N, N, N)  # noqa: E731
    Mt = torch.tensor(M, dtype=torch.float32).view(-1, N, N, N)
    start = torch.tensor(np.stack([_closed_form(A, m, 1.0, 0.01) for m in M]), dtype=torch.float32)
    # from the optimum, a huge learning rate only overshoots: the start must be kept
    z = refine_latent(decode, Mt, start, steps=5, lr=50.0)
    assert torch.equal(z, start)
    assert torch.equal(refine_latent(decode, Mt, start, steps=0), start)


def test_progress_and_early_stop():
    A, M = _linear_problem(3, B=1)
    At = torch.tensor(A, dtype=torch.float32)
    decode = lambda z: (z @ At.T).view(-1, N, N, N)  # noqa: E731
    calls = []
    refine_latent(decode, torch.tensor(M, dtype=torch.float32).view(-1, N, N, N), torch.zeros(1, L), steps=50,
                  progress=lambda d, t: calls.append((d, t)) or d >= 7)
    assert calls == [(d, 50) for d in range(1, 8)]


def test_bad_input_is_refused():
    decode = lambda z: z.view(-1, 1, 1, 1).expand(-1, N, N, N)  # noqa: E731
    M = torch.zeros(1, N, N, N)
    M[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refine_latent(decode, M, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="needs M"):
        refine_latent(decode, torch.zeros(2, N, N, N), torch.zeros(1, 1))


def test_crystal_model_refine_lowers_the_objective_and_leaves_the_decoder_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(grid_n=30, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4,
                      dec_channels=(4, 4, 4), unet_channels=(4, 8))
    net = CrystalNet(cfg)
    model = CrystalModel(net, Grid(), {"representation": "unit_cell"}, jit=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # a target the decoder can make: the decoded field of another latent
    z_target = np.linspace(-1, 1, cfg.latent).astype(np.float32)
    M = model.decode(z_target)
    mu, _ = model.encode(M)
    z = model.refine(M, mu, steps=40)
    assert z.shape == mu.shape and z.dtype == np.float32
    f = lambda zz: float(refine_objective(torch.tensor(model.decode(zz))[None], torch.tensor(M)[None],  # noqa: E731
                                          torch.tensor(zz)[None]))
    assert f(z) < f(mu)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())  # flags restored by frozen()
    assert np.array_equal(model.refine(M, mu, steps=0), mu)
    model.refine_steps = 0
    assert np.array_equal(model.refine(M, mu), mu)


def test_frozen_restores_flags_after_an_error():
    lin = torch.nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(lin):
            assert not any(p.requires_grad for p in lin.parameters())
            raise RuntimeError("boom")
    assert lin.weight.requires_grad and not lin.bias.requires_grad


def test_session_refines_by_default_and_the_choice_is_validated():
    from crystalstudio.io.structures import read_structure
    from crystalstudio.session import ASSETS, Session

    s = Session()
    events = []
    s.subscribe(lambda e, v: events.append((e, v)))
    crystal = read_structure(ASSETS / "samples" / "NaCl.cif", s.grid)
    steps0 = s.refine_steps
    assert steps0 > 0
    rec = s.reconstruct(crystal)
    assert not np.array_equal(rec.z, rec.mu)
    np.testing.assert_allclose(rec.M_hat, s.model.decode(rec.z), atol=1e-5)
    s.set_refine_steps(0)
    assert ("refine_steps", 0) in events
    assert np.array_equal(s.current.z, s.current.mu)  # redone with the encoder alone
    np.testing.assert_allclose(s.current.M_hat, s.model.decode(s.current.mu), atol=1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="whole number"):
            s.set_refine_steps(bad)
    assert s.refine_steps == 0


def test_multi_start_keeps_per_field_the_best_of_its_single_starts():
    """Each field refined at K rates in one batch gives, per field, exactly the objective of the
    best of K separate single-rate runs (the reference), and every row moves like Adam at its rate."""
    A, M = _linear_problem(4, B=3)
    At = torch.tensor(A, dtype=torch.float32)
    decode = lambda z: (z @ At.T).view(-1, N, N, N)  # noqa: E731
    Mt = torch.tensor(M, dtype=torch.float32).view(-1, N, N, N)
    z0 = torch.zeros(len(M), L)
    lrs = (0.01, 0.05, 0.3)
    f = lambda z: refine_objective(decode(z), Mt, z).detach().numpy()  # noqa: E731
    singles = np.stack([f(refine_latent(decode, Mt, z0, steps=20, lr=lr)) for lr in lrs])  # (K, B)
    multi = f(refine_latent(decode, Mt, z0, steps=20, lr=lrs))
    np.testing.assert_allclose(multi, singles.min(0), rtol=1e-4)
    # a single rate given as a list is the plain single-start path
    assert torch.equal(refine_latent(decode, Mt, z0, steps=20, lr=[0.05]), refine_latent(decode, Mt, z0, 20, 0.05))
    for bad in ((), (0.1, 0.0), (-1.0,)):
        with pytest.raises(ValueError, match="positive"):
            refine_latent(decode, Mt, z0, steps=5, lr=bad)


def test_checkpoint_refine_lr_metadata(tmp_path):
    cfg = ModelConfig(grid_n=30, latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4,
                      dec_channels=(4, 4, 4), unet_channels=(4, 8))
    net = CrystalNet(cfg)
    from crystalstudio.core.checkpoint import CheckpointError
    from crystalstudio.core.refine import REFINE_LR

    assert CrystalModel(net, Grid(), {"representation": "unit_cell"}, jit=False).refine_lr == (REFINE_LR,)
    m = CrystalModel(net, Grid(), {"representation": "unit_cell", "refine_lr": [0.05, 0.2]}, jit=False)
    assert m.refine_lr == (0.05, 0.2)
    assert CrystalModel(net, Grid(), {"representation": "unit_cell", "refine_lr": 0.3}, jit=False).refine_lr == (0.3,)
    for bad in ("fast", [0.1, -0.1], []):
        with pytest.raises(CheckpointError, match="refine_lr"):
            CrystalModel(net, Grid(), {"representation": "unit_cell", "refine_lr": bad}, jit=False)
    # in a file: kept through save and load; a corrupt value is refused in one line naming the file
    from crystalstudio.core.checkpoint import load_checkpoint, save_checkpoint, update_metadata

    path = tmp_path / "ms.safetensors"
    save_checkpoint(path, net, Grid(), {"representation": "unit_cell", "refine_lr": [0.05, 0.1, 0.2, 0.4]})
    assert load_checkpoint(path, jit=False).refine_lr == (0.05, 0.1, 0.2, 0.4)
    # update_metadata refuses to write what the loader would refuse; the file stays as it was
    for bad in ("fast", [0.1, 0.0]):
        with pytest.raises(CheckpointError, match=r"^ms\.safetensors: metadata refine_lr"):
            update_metadata(path, {"refine_lr": bad})
    assert load_checkpoint(path, jit=False).refine_lr == (0.05, 0.1, 0.2, 0.4)
    update_metadata(path, {"refine_lr": [0.2, 0.1]})
    assert load_checkpoint(path, jit=False).refine_lr == (0.2, 0.1)
    save_checkpoint(path, net, Grid(), {"representation": "unit_cell", "refine_lr": "fast"})  # written by hand
    with pytest.raises(CheckpointError, match=r"^ms\.safetensors: metadata refine_lr") as err:
        load_checkpoint(path, jit=False)
    assert "\n" not in str(err.value)
