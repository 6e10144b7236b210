"""The light-atom channel: L = gain x Z Gaussians of the light atoms (Z <= 5) only, its decoder
head, and the atoms read from it (crystalstudio.core.light)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystalstudio.core.checkpoint import CrystalModel, load_checkpoint, save_checkpoint
from crystalstudio.core.density import Grid, density_field, light_field
from crystalstudio.core.light import fit_light, merge_light
from crystalstudio.core.models import CrystalNet, DensityVAE, ModelConfig
from crystalstudio.core.segment import Atoms

GRID = Grid()  # 30^3, 10 Å, sigma 1 Å
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8))


def _direct_sum(pos: np.ndarray, Z: np.ndarray, grid: Grid, gain: float, z_max: int) -> np.ndarray:
    """float64 Eq. 1 voxel by voxel, light atoms only, each weighted gain x Z."""
    c = grid.centres()
    X, Y, W = np.meshgrid(c, c, c, indexing="ij")
    out = np.zeros((grid.n,) * 3)
    for p, z in zip(pos, Z):
        if 1 <= z <= z_max:
            r2 = (X - p[0]) ** 2 + (Y - p[1]) ** 2 + (W - p[2]) ** 2
            out += gain * z * np.exp(-r2 / (2 * grid.sigma**2)) / grid.peak_scale
    return out


def test_light_field_is_eq1_of_the_light_atoms_alone_times_the_gain():
    rng = np.random.default_rng(3)
    pos = rng.uniform(2, 8, (7, 3))
    Z = np.array([1, 3, 8, 5, 26, 1, 0])  # O, Fe and padding add nothing
    L = light_field(torch.as_tensor(pos)[None], torch.as_tensor(Z)[None], GRID, gain=4.0, z_max=5)[0]
    ref = _direct_sum(pos, Z, GRID, 4.0, 5)
    assert L.shape == (30, 30, 30) and L.dtype == torch.float32
    assert np.abs(L.numpy() - ref).max() < 1e-5 * ref.max()
    # an H in L is half as tall as an O in M (gain 4 x Z 1 against Z 8)
    H = light_field(torch.tensor([[[5.0, 5.0, 5.0]]]), torch.tensor([[1]]), GRID)[0]
    O = torch.as_tensor(density_field(np.array([[5.0, 5.0, 5.0]]), np.array([8]), GRID, species=False)[0])
    assert float(H.max()) == pytest.approx(0.5 * float(O.max()), rel=1e-5)


def test_decoder_light_head_added_to_an_m_only_vae_leaves_m_alone_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(grid_n=16, **TINY)
    net = CrystalNet(cfg).eval()
    z = torch.randn(3, cfg.latent)
    with torch.no_grad():
        M0 = net.vae.decode(z)
        assert net.vae.decode_fields(z)[1] is None
        net.vae.add_light_head()
        M1, L1 = net.vae.decode_fields(z)
    assert net.cfg.light_channel and torch.equal(M0, M1)
    assert torch.allclose(L1, torch.full_like(L1, 0.01))  # zero weights, bias 0.01: near zero, gradient flows
    with torch.no_grad():
        net.vae.out_light.weight.normal_()
        L2 = net.vae.decode_fields(z)[1]
    path = tmp_path / "light.safetensors"
    save_checkpoint(path, net, Grid(n=16), {"representation": "unit_cell"})
    for jit in (False, True):  # the eager and the traced decoder give both fields
        model = load_checkpoint(path, jit=jit)
        assert model.has_light
        M, L = model.decode_fields(z.numpy())
        assert np.allclose(M, M0.numpy(), atol=1e-5) and np.allclose(L, L2.numpy(), atol=1e-5)
        assert np.array_equal(model.decode(z.numpy()), M)
    plain = CrystalModel(CrystalNet(ModelConfig(grid_n=16, **TINY)), Grid(n=16), {"representation": "unit_cell"},
                         jit=False)
    assert not plain.has_light and plain.decode_fields(np.zeros(8, np.float32))[1] is None


def test_a_vae_without_the_head_cannot_load_one_with_it():
    cfg = ModelConfig(grid_n=16, light_channel=True, **TINY)
    sd = DensityVAE(cfg).state_dict()
    with pytest.raises(RuntimeError, match="out_light"):
        DensityVAE(ModelConfig(grid_n=16, **TINY)).load_state_dict(sd)


def test_fit_light_reads_light_atoms_and_their_z_from_a_true_light_field():
    # LiBH4-like cluster: B with four H at 1.2 Å, a Li 2.6 Å away, an O (not light) beside it
    B = np.array([5.0, 5.0, 5.0])
    d = 1.2 / np.sqrt(3)
    H = B + d * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    pos = np.vstack([B, H, [7.6, 5.0, 5.0], [5.0, 7.5, 5.0]])
    Z = np.array([5, 1, 1, 1, 1, 3, 8])
    L = light_field(torch.as_tensor(pos)[None], torch.as_tensor(Z)[None], GRID, gain=4.0)[0].numpy()
    atoms = fit_light(L, GRID, gain=4.0, z_max=5)
    assert len(atoms) == 6
    order = [int(np.argmin(np.linalg.norm(atoms.positions - p, axis=1))) for p in pos[:6]]
    assert sorted(order) == list(range(6))
    assert np.linalg.norm(atoms.positions[order] - pos[:6], axis=1).max() < 0.1
    assert atoms.Z[order].tolist() == [5, 1, 1, 1, 1, 3]
    assert np.allclose(atoms.amplitude[order], Z[:6], atol=0.1)  # amplitudes in Z units
    assert len(fit_light(np.zeros((30, 30, 30), np.float32), GRID, 4.0, 5)) == 0
    with pytest.raises(ValueError, match="gain"):
        fit_light(L, GRID, gain=0.0, z_max=5)


def test_fit_light_reads_a_low_amplitude_as_the_more_frequent_light_element():
    # a decoded L draws its atoms low: a Li at 0.8 of its height fits to amplitude ~2.4, which
    # rounds to He; with the training split's counts (Li 100x He) the prior reads Li
    pos = np.array([[3.0, 3.0, 3.0], [7.0, 7.0, 7.0]])
    Z = np.array([3, 5])
    L = 0.8 * light_field(torch.as_tensor(pos)[None], torch.as_tensor(Z)[None], GRID, gain=4.0)[0].numpy()
    counts = np.zeros(10)
    counts[[1, 2, 3, 4, 5, 8]] = [1000, 1, 100, 5, 500, 5000]  # H, He, Li, Be, B, O
    plain = fit_light(L, GRID, gain=4.0, z_max=5)
    prior = fit_light(L, GRID, gain=4.0, z_max=5, species_prior=counts)
    order = np.argsort(plain.positions[:, 0])
    assert np.allclose(plain.amplitude[order], 0.8 * Z, atol=0.1)
    assert plain.Z[order].tolist() == [2, 4]  # rounded: He, Be
    assert prior.Z[np.argsort(prior.positions[:, 0])].tolist() == [3, 5]  # Li, B; never O (z_max 5)


def test_merge_light_adds_only_atoms_the_m_field_did_not_read():
    heavy = Atoms(np.array([[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]]), np.array([8, 26]), None,
                  np.array([7.8, 25.0]), np.array([0.1, 0.2]))
    light = Atoms(np.array([[1.3, 1.0, 1.0], [2.0, 1.0, 1.0], [8.0, 8.0, 8.0]]), np.array([3, 1, 1]), None,
                  np.array([3.1, 0.9, 1.1]), np.array([0.05, 0.05, 0.05]))
    out = merge_light(heavy, light, min_separation=0.7)
    assert out.Z.tolist() == [8, 26, 1, 1]  # the Li 0.3 Å from the O is the O's own reading
    assert np.allclose(out.positions[2:], light.positions[1:])
    assert np.allclose(out.amplitude, [7.8, 25.0, 0.9, 1.1])
    assert merge_light(heavy, Atoms.empty()) is heavy
    assert merge_light(Atoms.empty(), light).Z.tolist() == [3, 1, 1]


def test_a_session_reads_the_light_atoms_of_a_decoded_frame():
    from crystalstudio.session import Session

    net = CrystalNet(ModelConfig(grid_n=30, light_channel=True, **TINY))
    model = CrystalModel(net, GRID, {"representation": "unit_cell", "draw_gate": 0.0}, jit=False)
    heavy = np.array([[3.0, 3.0, 3.0], [6.0, 6.0, 6.0]])
    M = density_field(heavy, np.array([11, 17]), GRID, species=False)[0]
    L = light_field(torch.tensor([[[3.0, 3.0, 4.0], [8.0, 2.0, 5.0]]]), torch.tensor([[1, 3]]), GRID)[0].numpy()
    model.decode_fields = lambda z, cond=None: (M, L)
    frame = Session(model=model).decode(np.zeros(model.latent, np.float32))
    assert sorted(frame.atoms.Z.tolist()) == [1, 3, 11, 17]
    k = int(np.flatnonzero(frame.atoms.Z == 3)[0])
    assert np.linalg.norm(frame.atoms.positions[k] - [8.0, 2.0, 5.0]) < 0.1
    assert sorted(model.segment(M, gate=0.0).Z.tolist()) == [11, 17]  # without L: the heavy atoms only
    # a checkpoint whose draws were chosen without their light atoms (draw_light false): a
    # latent's frame and the export's frames read M_hat alone, a reconstruction still merges L
    from crystalstudio.render.export import segment_batch

    model.info["draw_light"] = False
    frame = Session(model=model).decode(np.zeros(model.latent, np.float32))
    assert sorted(frame.atoms.Z.tolist()) == [11, 17]
    assert [sorted(a.Z.tolist()) for a in segment_batch(model, M[None], L[None])] == [[11, 17]]
    assert sorted(model.segment(M, gate=0.0, light=L).Z.tolist()) == [1, 3, 11, 17]


def test_refinement_fits_the_latent_to_m_and_to_the_light_field_of_the_input():
    from crystalstudio.core.light import light_target, refine_problem
    from crystalstudio.core.refine import frozen, refine_latent

    torch.manual_seed(1)
    pos = np.array([[3.0, 3.0, 3.0], [3.0, 3.0, 4.05], [6.5, 6.0, 5.5], [6.0, 3.5, 7.0]])
    Z = np.array([8, 1, 3, 26])  # an OH pair, a Li, an Fe
    M = density_field(pos, Z, GRID, species=False)[0]
    cfg = ModelConfig(grid_n=30, light_channel=True, **TINY)
    truth = light_field(torch.as_tensor(pos)[None], torch.as_tensor(Z)[None], GRID, cfg.light_gain)[0].numpy()
    L = light_target(M, GRID, cfg)  # from the field alone, by the exact Eq. 1 fit
    assert np.abs(L - truth).max() < 1e-3 * truth.max()
    vae = DensityVAE(cfg).eval()
    with torch.no_grad():  # both outputs above zero, so the ReLUs pass gradient to z
        vae.out.bias.fill_(0.05)
        vae.out_light.bias.fill_(0.05)
    Mt = torch.as_tensor(M)[None]
    decode, target = refine_problem(vae, Mt, GRID)
    assert target.shape == (1, 2, 30, 30, 30) and torch.equal(target[:, 0], Mt)
    assert np.allclose(target[0, 1].numpy(), L)
    z0 = torch.zeros(1, cfg.latent)
    assert decode(z0).shape == (1, 2, 30, 30, 30)
    with frozen(vae):
        z = refine_latent(decode, target, z0, steps=20, lr=(0.05, 0.1))
    err = lambda zz: float(((decode(zz) - target) ** 2).sum())  # noqa: E731
    with torch.no_grad():
        assert err(z) < err(z0)
    plain = DensityVAE(ModelConfig(grid_n=30, **TINY))
    d2, t2 = refine_problem(plain, Mt, GRID)
    assert t2 is Mt and d2 == plain.decode


def test_a_light_model_refines_a_reconstruction_on_m_and_l(monkeypatch):
    from crystalstudio.core import refine as refine_mod

    net = CrystalNet(ModelConfig(grid_n=30, light_channel=True, **TINY))
    model = CrystalModel(net, GRID, {"representation": "unit_cell"}, jit=False)
    seen = []
    real = refine_mod.refine_latent

    def spy(decode, M, z0, *a, **k):
        seen.append(tuple(M.shape))
        return real(decode, M, z0, *a, **k)

    monkeypatch.setattr(refine_mod, "refine_latent", spy)
    M = density_field(np.array([[5.0, 5.0, 5.0], [5.0, 5.0, 6.0]]), np.array([8, 1]), GRID, species=False)[0]
    z = model.refine(M, np.zeros(model.latent, np.float32), steps=3)
    assert seen == [(1, 2, 30, 30, 30)] and z.shape == (model.latent,) and np.isfinite(z).all()


def test_light_subtract_keeps_a_light_neighbour_out_of_the_heavy_atom():
    """A Li 1.6 Å from an F (LiF's bond): fitted on M_hat as it is, the Li's density (below the
    decoded-field amplitude floor) is read into the F, which comes back as Na 0.29 Å off; with
    the checkpoint's ``light_subtract`` the heavy atoms of a refined field are fitted on M - L / gain,
    which is the F's own Eq. 1 field, and the F is exact; an encoder-only field is read as it is.
    The light atom is read from L either way."""
    from crystalstudio.core.light import heavy_field

    pos = np.array([[4.0, 5.0, 5.0], [5.6, 5.0, 5.0]])
    Z = np.array([9, 3])
    M = density_field(pos, Z, GRID, species=False)[0]
    cfg = ModelConfig(grid_n=30, light_channel=True, **TINY)
    L = light_field(torch.as_tensor(pos)[None], torch.as_tensor(Z)[None], GRID, cfg.light_gain,
                    cfg.light_z_max)[0].numpy()
    F_alone = density_field(pos[:1], Z[:1], GRID, species=False)[0]
    H = heavy_field(M, L, cfg.light_gain)
    assert H.dtype == np.float32 and np.abs(H - F_alone).max() < 1e-6 * F_alone.max()
    net = CrystalNet(cfg)
    read = {}
    for on in (False, True):
        model = CrystalModel(net, GRID, {"representation": "unit_cell", "light_subtract": on}, jit=False)
        assert model.light_subtract is on
        a = model.segment(M, gate=0.0, refined=True, light=L)
        read[on] = {int(z): (float(amp), p) for z, amp, p in zip(a.Z, a.amplitude, a.positions)}
    assert sorted(read[False]) == [3, 11]  # F read as Na
    assert np.linalg.norm(read[False][11][1] - pos[0]) > 0.2
    assert sorted(read[True]) == [3, 9]
    assert abs(read[True][9][0] - 9.0) < 0.01 and np.linalg.norm(read[True][9][1] - pos[0]) < 0.01
    model = CrystalModel(net, GRID, {"representation": "unit_cell", "light_subtract": True}, jit=False)
    # an encoder-only field (not refined) is read as it is: its L_hat is not trusted
    enc = model.segment(M, gate=0.0, refined=False, light=L)
    heavy = np.argmax(enc.amplitude)
    assert abs(enc.amplitude[heavy] - read[False][11][0]) < 1e-6
    # without a light field there is nothing to subtract
    assert sorted(model.segment(M, gate=0.0, refined=True).Z.tolist()) == [11]
    with pytest.raises(ValueError, match="shape"):
        heavy_field(M, L[:-1], cfg.light_gain)
    with pytest.raises(ValueError, match="positive"):
        heavy_field(M, L, 0.0)
