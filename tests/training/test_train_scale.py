"""Training at scale: device-side batcher, bf16/channels-last flags, resume, DDP (torchrun, gloo on CPU).

The data set is a synthetic ``.npz`` in the layout of ``training.data.prepare`` (no pymatgen).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crystalstudio.core.checkpoint import load_checkpoint, read_metadata
from crystalstudio.core.density import Grid, random_rotations
from crystalstudio.core.models import CrystalNet, ModelConfig, scale_grad, unet_loss, vae_loss
import training.train as train_mod
from training.__main__ import main
from training.batcher import GPUCrystalBatcher, random_rotations_torch
from training.data import CrystalArrays, voxelise
from training.train import TrainConfig, _lr_at, load_train_state, optim_path, train

ORIGINAL_CPU_PROBE = train_mod.cpu_bf16_fast  # tests/training/conftest.py stubs it per test

ROOT = Path(__file__).resolve().parents[2]
GRID = Grid(n=16, length=10.0)
TINY = dict(latent=8, enc_channels=(4, 4, 4, 4), bottleneck_channels=4, dec_channels=(4, 4, 4),
            unet_channels=(4, 8), grid_n=16)


def make_npz(path: Path, n: int = 12, seed: int = 0) -> Path:
    """Random small cells (1-7 atoms, edges 3-5 Å, so every rotation fits the 10 Å cube)."""
    rng = np.random.default_rng(seed)
    lattices, fracs, Zs = [], [], []
    for _ in range(n):
        a, b, c = rng.uniform(3.0, 5.0, 3)
        L = np.array([[a, 0, 0], [0.3 * rng.uniform(-1, 1), b, 0], [0, 0.4 * rng.uniform(-1, 1), c]])
        k = int(rng.integers(1, 8))
        lattices.append(L.astype(np.float32))
        fracs.append(rng.random((k, 3)).astype(np.float32))
        Zs.append(rng.integers(1, 90, k).astype(np.uint8))
    split = np.array(([0, 0, 0, 0, 1, 2] * n)[:n], np.uint8)
    np.savez_compressed(
        path, lattice=np.stack(lattices), offsets=np.concatenate([[0], np.cumsum([len(z) for z in Zs])]).astype(np.int64),
        frac=np.concatenate(fracs), Z=np.concatenate(Zs), split=split, ids=np.array([f"x{i}" for i in range(n)]),
        formula=np.array([f"F{i}" for i in range(n)]), source=np.array(["synthetic"] * n),
        grid=np.array([GRID.n, GRID.length, GRID.sigma, GRID.species_radius]))
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("scale") / "syn.npz")


def tiny_cfg(npz: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(npz), out=str(out), steps=2, batch=2, eval_every=1000, eval_n=2, test_n=2, warmup=1,
                device="cpu", save_every_min=1e6, model=dict(TINY))
    return TrainConfig(**{**base, **kw})


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------- batcher

@pytest.mark.parametrize("grid", [GRID, Grid()])
def test_batcher_matches_voxelise(npz, grid):
    data = CrystalArrays.load(str(npz))
    batcher = GPUCrystalBatcher(data, grid, "cpu")
    rng = np.random.default_rng(3)
    for rot in (True, False):
        idx = rng.choice(len(data), 5, replace=False)
        R = random_rotations(5, rng) if rot else None
        M, S, P, Z = voxelise(data, idx, grid, R)
        # numpy indices: padded to the batch's largest crystal, as voxelise
        M2, S2, P2, Z2 = batcher(idx, R)
        assert M2.shape == M.shape and M2.dtype == M.dtype and S2.dtype == S.dtype
        torch.testing.assert_close(S2, S, rtol=0, atol=0)
        torch.testing.assert_close(M2, M, rtol=1e-6, atol=1e-7 * float(M.max()))
        np.testing.assert_array_equal(Z2.numpy(), Zp := Z)
        np.testing.assert_allclose(P2.numpy(), P, rtol=0, atol=1e-12)
        # device indices: padded to the largest crystal of the set, same fields
        M3, S3, P3, Z3 = batcher(torch.as_tensor(idx), None if R is None else torch.as_tensor(R))
        assert P3.shape[1] == batcher.nmax >= P.shape[1]
        torch.testing.assert_close(S3, S, rtol=0, atol=0)
        torch.testing.assert_close(M3, M, rtol=1e-6, atol=1e-7 * float(M.max()))
        assert (Z3[:, Zp.shape[1]:] == 0).all()


def test_batcher_sample_and_rotations(npz):
    data = CrystalArrays.load(str(npz))
    pool = data.indices("train")
    batcher = GPUCrystalBatcher(data, GRID, "cpu", pool=pool)
    g = torch.Generator().manual_seed(0)
    idx, R = batcher.sample(len(pool), g)
    assert sorted(idx.tolist()) == sorted(pool.tolist())  # without replacement when the pool suffices
    idx, R = batcher.sample(len(pool) + 3, g)
    assert set(idx.tolist()) <= set(pool.tolist()) and len(idx) == len(pool) + 3
    R = random_rotations_torch(500, torch.Generator().manual_seed(1))
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=R.dtype).expand(500, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(500, dtype=R.dtype))
    assert abs(float(R[:, 2, 2].mean())) < 0.1  # uniform: E[R_zz] = 0


def test_gpu_batcher_flag_trains_on_cpu(npz, tmp_path):
    m = train(tiny_cfg(npz, tmp_path / "b.safetensors", gpu_batcher=True, final_split="test"))
    assert read_metadata(tmp_path / "b.safetensors")["training"]["steps"] == 2 and m["split"] == "test"


# ------------------------------------------------------------------------- amp flag off on CPU

def reference_run(cfg: TrainConfig):
    """The loop of training/train.py before the scale-up (single process, CPU, fp32): losses and net."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = CrystalArrays.load(cfg.data)
    raw = np.load(cfg.data)["grid"]
    grid = Grid(int(raw[0]), float(raw[1]), float(raw[2]), float(raw[3]))
    train_idx = data.indices("train")
    net = CrystalNet(ModelConfig(**{"grid_n": grid.n, "n_classes": max(95, int(data.Z.max()) + 1), **cfg.model}))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step, 0.0)
        b = rng.choice(train_idx, size=cfg.batch, replace=len(train_idx) < cfg.batch)
        M, S, _, _ = voxelise(data, b, grid, random_rotations(len(b), rng), "cpu")
        net.train()
        M_hat, mu, logvar = net.vae(M)
        ce = unet_loss(net.unet(scale_grad(M_hat, cfg.gamma)), S, cfg.background_weight)
        L = vae_loss(M, M_hat, mu, logvar, None, cfg.beta, cfg.gamma)
        opt.zero_grad(set_to_none=True)
        (L["loss"] + ce).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt.step()
        losses.append(f"{(L['loss'] + ce).item():.4f}")
    return losses, net


@pytest.mark.parametrize("flags", [{}, {"amp": False, "channels_last": False, "gpu_batcher": False}])
def test_amp_off_on_cpu_matches_the_plain_loop(npz, tmp_path, flags):
    # {}: the defaults on a CPU without AMX (tests/training/conftest.py stubs the probe)
    cfg = tiny_cfg(npz, tmp_path / "a.safetensors", background_weight=0.3, **flags)
    train(cfg)
    ref_losses, ref_net = reference_run(cfg)
    assert [r["loss"] for r in csv_rows(tmp_path / "a.csv")] == ref_losses
    got = load_checkpoint(tmp_path / "a.safetensors").net.state_dict()
    for k, v in ref_net.state_dict().items():
        assert torch.equal(got[k], v), k
    info = read_metadata(tmp_path / "a.safetensors")["training"]
    assert info["amp"] is False and info["channels_last"] is False and info["world_size"] == 1


@pytest.mark.parametrize("amx", [True, False])
def test_amp_default_follows_the_cpu_probe(npz, tmp_path, monkeypatch, amx):
    """On a CPU with AMX (the probe says so) the defaults turn bf16 autocast and channels-last
    on; explicit flags still win."""
    monkeypatch.setattr(train_mod, "cpu_bf16_fast", lambda: amx)
    train(tiny_cfg(npz, tmp_path / "d.safetensors"))
    info = read_metadata(tmp_path / "d.safetensors")["training"]
    assert info["amp"] is amx and info["channels_last"] is amx
    assert isinstance(info["cpu"], str) and info["cpu"]  # the machine that paid the seconds
    train(tiny_cfg(npz, tmp_path / "e.safetensors", amp=False, channels_last=False))
    info = read_metadata(tmp_path / "e.safetensors")["training"]
    assert info["amp"] is False and info["channels_last"] is False


@pytest.mark.parametrize("amx,avx512_bf16,native", [(True, False, True), (False, True, True),
                                                     (False, False, False)])
def test_cpu_probe_accepts_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    """bf16 is native on AMX (Xeon) and on AVX-512 BF16 (AMD Zen 4+): either turns the probe
    on; neither (AVX2 only) keeps float32. A probe that raises counts as absent."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert ORIGINAL_CPU_PROBE() is native

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert ORIGINAL_CPU_PROBE() is avx512_bf16


def test_amp_and_channels_last_run_on_cpu(npz, tmp_path):
    """bf16 autocast + channels-last also work on the CPU (slow there, so off by default)."""
    m = train(tiny_cfg(npz, tmp_path / "c.safetensors", amp=True, channels_last=True))
    rows = csv_rows(tmp_path / "c.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows) and m["split"] == "val"
    assert load_checkpoint(tmp_path / "c.safetensors").net.vae.to_stats.weight.dtype == torch.float32


# ------------------------------------------------------------------------- resume

def test_resume_continues_the_step_count(npz, tmp_path):
    out = tmp_path / "r.safetensors"
    train(tiny_cfg(npz, out, steps=2))
    side = optim_path(out)
    assert side.name == "r.optim.safetensors" and side.is_file()
    assert not any(p.suffix == ".pt" for p in tmp_path.iterdir())
    state, info = load_train_state(out)
    assert info["step"] == 2 and info["samples"] == 4 and info["prior_steps"] == 0
    assert all(float(s["step"]) == 2 for s in state["state"].values())
    assert len(state["state"]) == sum(1 for _ in load_checkpoint(out).net.parameters())
    first = csv_rows(tmp_path / "r.csv")
    # continue to 4 steps through the CLI (--resume is a boolean flag)
    rc = main(["train", "--data", str(npz), "--out", str(out), "--steps", "4", "--batch", "2", "--eval-every", "1000",
               "--test-n", "2", "--warmup", "1", "--device", "cpu", "--save-every-min", "1e6", "--model",
               json.dumps(TINY), "--resume"])
    assert rc == 0
    rows = csv_rows(tmp_path / "r.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first  # the first run's rows kept
    cfg4 = tiny_cfg(npz, out, steps=4)
    assert rows[2]["lr"] == f"{_lr_at(cfg4, 2, 0.0):.2e}"  # the schedule goes on from step 2
    meta = read_metadata(out)["training"]
    assert meta["steps"] == 4 and meta["samples"] == 8 and meta["resumed_at"] == 2
    state, info = load_train_state(out)
    assert info["step"] == 4 and all(float(s["step"]) == 4 for s in state["state"].values())
    # nothing to resume from: a clear error
    with pytest.raises(FileNotFoundError, match="optim.safetensors"):
        train(tiny_cfg(npz, tmp_path / "none.safetensors", resume=True))


def test_init_optimizer_keeps_the_moments_and_restarts_the_schedule(npz, tmp_path):
    """A fine-tune with --init-optimizer starts at step 0 of its own schedule with the Adam
    moments of the run it starts from (Adam's own step counter goes on), not fresh ones."""
    first = tmp_path / "a.safetensors"
    train(tiny_cfg(npz, first, steps=2))
    moments, _ = load_train_state(first)
    second = tmp_path / "b.safetensors"
    train(tiny_cfg(npz, second, steps=1, init=str(first), init_optimizer=True))
    state, info = load_train_state(second)
    assert info["step"] == 1 and info["prior_steps"] == 2
    assert all(float(s["step"]) == 3 for s in state["state"].values())
    assert csv_rows(tmp_path / "b.csv")[0]["lr"] == f"{_lr_at(tiny_cfg(npz, second, steps=1), 0, 0.0):.2e}"
    # the second moments after one more step: beta2 * v_old + (1 - beta2) g^2 >= beta2 * v_old
    for pid, st in state["state"].items():
        assert torch.all(st["exp_avg_sq"] >= 0.999 * moments["state"][pid]["exp_avg_sq"] * (1 - 1e-6))
    plain = tmp_path / "c.safetensors"
    train(tiny_cfg(npz, plain, steps=1, init=str(first)))
    assert all(float(s["step"]) == 1 for s in load_train_state(plain)[0]["state"].values())
    with pytest.raises(ValueError, match="--init-optimizer"):
        train(tiny_cfg(npz, tmp_path / "d.safetensors", init_optimizer=True))


def test_freeze_bn_keeps_the_running_statistics_and_trains_the_affine_weights(npz, tmp_path):
    """--freeze-bn: the VAE's BatchNorm layers normalise with their running statistics while
    training (as the app decodes), so those stay bit-equal to the start; their weights, and the
    convolutions, still learn. Without it the same two steps move the statistics."""
    first = tmp_path / "a.safetensors"
    train(tiny_cfg(npz, first, steps=2, vae_only=True))
    start = load_checkpoint(first).net
    bns = [(n, m) for n, m in start.vae.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns
    for flag, name in ((True, "f.safetensors"), (False, "g.safetensors")):
        out = tmp_path / name
        train(tiny_cfg(npz, out, steps=2, vae_only=True, init=str(first), freeze_bn=flag, lr=1e-2))
        after = dict(load_checkpoint(out).net.vae.named_modules())
        for n, m in bns:
            same = (torch.equal(after[n].running_mean, m.running_mean)
                    and torch.equal(after[n].running_var, m.running_var))
            assert same == flag, (n, flag)
        # the affine weights learn either way (the encoder's: this two-step decoder's ReLU output
        # is still dead everywhere under its running statistics, so no gradient reaches it)
        learnt = [n for n, m in bns if not torch.equal(after[n].weight, m.weight)]
        assert [n for n in learnt if n.startswith("encoder")] == [n for n, _ in bns if n.startswith("encoder")]
        assert read_metadata(out)["training"]["config"]["freeze_bn"] is flag
    assert train_mod.freeze_batchnorm(CrystalNet(ModelConfig(**TINY)).vae) == len(bns)


# ------------------------------------------------------------------------- DDP

@pytest.mark.skipif(shutil.which("torchrun") is None and not torch.distributed.is_available(),
                    reason="torch.distributed / torchrun not available")
def test_ddp_two_processes_gloo(npz, tmp_path):
    out = tmp_path / "d.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
           "train", "--data", str(npz), "--out", str(out), "--steps", "2", "--batch", "2", "--minutes", "30",
           "--eval-every", "1", "--eval-n", "2", "--test-n", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
           "--save-every-min", "1e6", "--model", json.dumps(TINY)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("device cpu x 2") == 1  # only the master logs
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["d.csv", "d.json", "d.optim.safetensors", "d.safetensors"]  # one checkpoint, no per-rank files
    model = load_checkpoint(out)
    assert model.config.enc_channels == (4, 4, 4, 4)
    info = read_metadata(out)["training"]
    assert info["steps"] == 2 and info["world_size"] == 2 and info["samples"] == 2 * 2 * 2
    rows = csv_rows(tmp_path / "d.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and rows[0]["val_atoms_within"] != ""


# ------------------------------------------------------------------------- loss weights

def test_light_atom_weight_against_a_direct_float64_sum():
    """--light-weight adds light_weight * min(4, (8 / Z)^2) to the squared error of each atom
    voxel of S (on top of the peak weight): checked against an explicit float64 loop."""
    from training.train import forward_losses

    rng = np.random.default_rng(3)
    M = torch.tensor(rng.random((2, 4, 4, 4)), dtype=torch.float32)
    M_hat = torch.tensor(rng.random((2, 4, 4, 4)), dtype=torch.float32)
    S = torch.tensor(rng.choice([0, 0, 0, 1, 3, 6, 8, 26, 56], (2, 4, 4, 4)), dtype=torch.int64)
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)

    class Stub(torch.nn.Module):
        def forward(self, x, gamma, n_true, vae_only, unet_only):
            return M_hat, mu, logvar, None, None

    cfg = TrainConfig(peak_weight=1.0, light_weight=4.0, vae_only=True, beta=0.0)
    got = float(forward_losses(Stub(), M, S, cfg)["recon"])
    Md, Mhd, Sn = M.double().numpy(), M_hat.double().numpy(), S.numpy()
    total = 0.0
    for b in range(2):
        top = Md[b].max()
        for idx in np.ndindex(4, 4, 4):
            z = Sn[b][idx]
            w = 1.0 + Md[b][idx] / top + (4.0 * min(4.0, (8.0 / z) ** 2) if z > 0 else 0.0)
            total += w * (Mhd[b][idx] - Md[b][idx]) ** 2
    assert got == pytest.approx(total / 2, rel=1e-5)
    plain = float(forward_losses(Stub(), M, S, TrainConfig(peak_weight=1.0, vae_only=True))["recon"])
    assert plain < got  # the light atoms' voxels count more


def test_cond_jitter_rescales_each_field_of_a_conditional_model(npz, tmp_path, monkeypatch):
    """--cond-jitter j: each training field M is the voxelised one times a factor in
    [exp(-j), exp(j)] (one per field, not all 1); it needs a conditional model."""
    import training.train as tt

    seen: dict[str, list] = {}
    real = tt.forward_losses

    def spy(model, M, S, cfg, *a, **k):
        seen.setdefault(cfg.out, []).append(M.detach().flatten(1).amax(1).clone())
        return real(model, M, S, cfg, *a, **k)

    monkeypatch.setattr(tt, "forward_losses", spy)
    plain, jit = str(tmp_path / "p.safetensors"), str(tmp_path / "j.safetensors")
    train(tiny_cfg(npz, Path(plain), steps=1, batch=4, conditional=True, seed=3))
    train(tiny_cfg(npz, Path(jit), steps=1, batch=4, conditional=True, seed=3, cond_jitter=0.5))
    ratio = (seen[jit][0] / seen[plain][0]).numpy()  # step 1: same crystals and rotations
    assert np.all(ratio >= np.exp(-0.5) - 1e-6) and np.all(ratio <= np.exp(0.5) + 1e-6)
    assert np.abs(np.log(ratio)).max() > 0.01
    assert not np.allclose(ratio, ratio[0])
    with pytest.raises(ValueError, match="--cond-jitter"):
        train(tiny_cfg(npz, tmp_path / "u.safetensors", steps=1, cond_jitter=0.2))


def test_cond_normalise_is_stored_and_needs_a_conditional_model(npz, tmp_path):
    """--cond-normalise turns a conditional checkpoint's encoder scale-free; the setting is
    saved in the checkpoint (so the app encodes the same way) and kept by a later fine-tune
    that does not repeat the flag; an unconditional model is refused."""
    from crystalstudio.core.checkpoint import load_checkpoint

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(tiny_cfg(npz, a, steps=1, batch=2, conditional=True, cond_normalise=True, seed=1))
    assert load_checkpoint(a).config.cond_normalise
    train(tiny_cfg(npz, b, steps=1, batch=2, init=str(a), seed=1))
    assert load_checkpoint(b).config.cond_normalise
    with pytest.raises(ValueError, match="--cond-normalise"):
        train(tiny_cfg(npz, tmp_path / "u.safetensors", steps=1, cond_normalise=True))
