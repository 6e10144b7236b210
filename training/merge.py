"""``python -m training merge-unet``: the VAE of one checkpoint with the U-Net of another.

The CPU recipe trains the two networks apart (``train --vae-only`` and ``train --unet-only``),
possibly at the same time on the two cores, from one starting checkpoint. This puts the
newer VAE and the newer U-Net in one file:

* weights ``vae.*`` and the aggregate prior (it describes the VAE's latent space) from
  ``--vae``; weights ``unet.*`` from ``--unet``;
* metadata from ``--vae``, its ``training`` block gaining ``unet_from`` (the U-Net
  checkpoint's file name, steps and training config); ``unet_gate`` and its choice are
  dropped (the gate belongs to a U-Net and is chosen again by ``choose-gate`` on val), and
  so are held-out ``metrics`` (they measured another pair of networks).

Both checkpoints must have the same model config, grid and representation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crystalstudio.core.checkpoint import CheckpointError, _write, load_checkpoint

_STRUCTURAL_KEYS = ("model_config", "grid", "representation", "classes")
_DROPPED = ("unet_gate", "unet_gate_choice", "draw_gate", "draw_light", "draw_gate_choice", "metrics")


def merge_unet(vae_path: str | Path, unet_path: str | Path, out: str | Path) -> Path:
    """Write ``out``: ``vae_path``'s VAE and prior with ``unet_path``'s U-Net.

    Args:
        vae_path: checkpoint whose VAE weights, prior and metadata are kept.
        unet_path: checkpoint whose U-Net weights are taken.
        out: the new checkpoint (written atomically; may not be either input).

    Returns:
        The path written.

    Raises:
        CheckpointError: an input does not load, the two differ in model config, grid or
            representation, or ``out`` is one of the inputs.
    """
    from safetensors.torch import load_file

    vae_path, unet_path, out = Path(vae_path), Path(unet_path), Path(out)
    if out.resolve() in (vae_path.resolve(), unet_path.resolve()):
        raise CheckpointError(f"{out.name}: the merged checkpoint must be a new file, not one of the inputs")
    a = load_checkpoint(vae_path, jit=False)
    b = load_checkpoint(unet_path, jit=False)
    for key in _STRUCTURAL_KEYS:
        if a.info.get(key) != b.info.get(key):
            raise CheckpointError(f"{unet_path.name}: its {key} differs from {vae_path.name}'s; the U-Net cannot be "
                                  "combined with that VAE")
    state_a = {k: v for k, v in load_file(str(vae_path)).items() if not k.startswith("prior.")}
    state_b = load_file(str(unet_path))
    state = {k: v for k, v in state_a.items() if not k.startswith("unet.")}
    state.update({k: v for k, v in state_b.items() if k.startswith("unet.")})
    if set(state) != set(state_a):
        raise CheckpointError(f"{unet_path.name}: its U-Net tensors do not match {vae_path.name}'s")
    if a.info.get("weights_dtype") == "bfloat16" or b.info.get("weights_dtype") == "bfloat16":
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    meta = {k: v for k, v in a.info.items()
            if k not in ("format", "version", "model_config", "grid", "classes", "weights_dtype", *_DROPPED)}
    tb = b.info.get("training", {}) or {}
    meta["training"] = {**(a.info.get("training", {}) or {}),
                        "unet_from": {"file": unet_path.name, "steps": tb.get("steps"), "config": tb.get("config")}}
    return _write(out, state, a.config, a.grid, meta, a.prior)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="checkpoint whose VAE (and aggregate prior, metadata) is kept")
    p.add_argument("--unet", required=True, help="checkpoint whose U-Net is taken")
    p.add_argument("--out", required=True, help="the merged checkpoint (a new file)")


def run(a: argparse.Namespace) -> Path:
    path = merge_unet(a.vae, a.unet, a.out)
    print(f"wrote {path}: VAE of {Path(a.vae).name}, U-Net of {Path(a.unet).name}; "
          "choose its gate with `python -m training choose-gate --write`")
    return path
