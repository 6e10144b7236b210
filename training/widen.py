"""``python -m training widen``: a trained VAE's decoder made wider without changing what it
decodes, to be fine-tuned with the extra capacity (issue 13: the decoder underfits; its
fields are no better on training crystals than on new ones, docs/cpu_recipe.md session 25).

Each decoder block (Conv3d without bias, BatchNorm3d, LeakyReLU) gets new output channels:
random incoming weights (PyTorch's default initialisation, scaled by ``init_scale``), BatchNorm
weight 1, bias 0, running mean 0 and variance 1. Every weight *from* a new channel into the
next block and into the output heads is zero, so the widened network computes exactly the
same M_hat (and L_hat) as the original, in training and in evaluation mode; the zero weights
receive gradients at the first step and the new channels start to contribute from there
(the zero-initialised expansion of Net2Net, Chen et al. 2016, Sec. 2.3, without the
symmetry-breaking noise that a copy of channels would need).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from crystalstudio.core.models import CrystalNet, ModelConfig

__all__ = ["widen_decoder", "add_arguments", "run"]


def _grow_conv(conv: nn.Conv3d, cin: int, cout: int, gen: torch.Generator, init_scale: float) -> nn.Conv3d:
    """``conv`` with ``cin`` inputs and ``cout`` outputs: old block copied, weights from new
    inputs zero, weights of new outputs random (default init x ``init_scale``)."""
    new = nn.Conv3d(cin, cout, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    bias=conv.bias is not None)
    o, i = conv.out_channels, conv.in_channels
    with torch.no_grad():
        w = torch.empty_like(new.weight)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5, generator=gen)  # nn.Conv3d's own default
        w *= init_scale
        w[:, i:] = 0.0
        w[:o, :i] = conv.weight.float()
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[:o] = conv.bias.float()
    return new


def _grow_bn(bn: nn.BatchNorm3d, c: int) -> nn.BatchNorm3d:
    new = nn.BatchNorm3d(c, eps=bn.eps, momentum=bn.momentum)
    o = bn.num_features
    with torch.no_grad():
        new.weight[:o] = bn.weight.float()
        new.bias[:o] = bn.bias.float()
        new.running_mean[:o] = bn.running_mean.float()
        new.running_var[:o] = bn.running_var.float()
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def widen_decoder(net: CrystalNet, dec_channels: tuple[int, ...], seed: int = 0,
                  init_scale: float = 1.0) -> CrystalNet:
    """A copy of ``net`` whose decoder blocks have ``dec_channels`` output channels; it decodes
    the same fields (float32, up to rounding) as ``net``. Encoder and U-Net are copied unchanged.

    Args:
        net: a trained network (any device; the copy is on the CPU, float32).
        dec_channels: new channels per decoder block, each >= the old one, e.g. (96, 48, 24)
            for the default's (64, 32, 16).
        seed: seed of the new channels' incoming weights.
        init_scale: factor on those weights (1 = PyTorch's default initialisation).

    Returns:
        The widened :class:`~crystalstudio.core.models.CrystalNet` (its ``cfg.dec_channels`` set).

    Raises:
        ValueError: a different number of blocks, or a block narrower than before.
    """
    old = tuple(net.cfg.dec_channels)
    dec_channels = tuple(int(c) for c in dec_channels)
    if len(dec_channels) != len(old) or any(n < o for n, o in zip(dec_channels, old)):
        raise ValueError(f"dec_channels must have {len(old)} entries, each at least {old}; got {dec_channels}")
    cfg = ModelConfig.from_dict({**net.cfg.to_dict(), "dec_channels": list(dec_channels)})
    src = copy.deepcopy(net).cpu().float()
    wide = CrystalNet(cfg)
    wide.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("vae.dec_blocks.")
                          and not k.startswith("vae.out")}, strict=False)
    gen = torch.Generator().manual_seed(seed)
    cin = cfg.bottleneck_channels
    for b, (block, c) in enumerate(zip(src.vae.dec_blocks, dec_channels)):
        conv, bn, act = block
        wide.vae.dec_blocks[b] = nn.Sequential(_grow_conv(conv, cin, c, gen, init_scale), _grow_bn(bn, c), act)
        cin = c
    wide.vae.out = _grow_conv(src.vae.out, cin, 1, gen, init_scale)
    if cfg.light_channel:
        wide.vae.out_light = _grow_conv(src.vae.out_light, cin, 1, gen, init_scale)
    return wide


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (.safetensors)")
    p.add_argument("--dec-channels", required=True, help="new decoder channels, comma-separated (e.g. 96,48,24)")
    p.add_argument("--out", required=True, help="widened checkpoint (fine-tune it with train --init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new channels' weights")
    return p


def run(a: argparse.Namespace) -> int:
    """``python -m training widen``: writes the widened checkpoint with the source's metadata
    (training block kept, so step counts continue); exit 0, or 2 with a one-line error."""
    import sys

    from crystalstudio.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    try:
        model = load_checkpoint(a.checkpoint, jit=False)
        wide = widen_decoder(model.net, tuple(int(c) for c in a.dec_channels.split(",") if c), a.seed)
        meta = {k: v for k, v in model.info.items()
                if k not in ("format", "version", "model_config", "grid", "classes", "weights_dtype", "prior")}
        meta["widened_from"] = {"checkpoint": str(a.checkpoint), "dec_channels": list(model.config.dec_channels)}
        save_checkpoint(a.out, wide, model.grid, meta, model.prior)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.out}: decoder channels {tuple(model.config.dec_channels)} -> {tuple(wide.cfg.dec_channels)}, "
          f"{sum(p.numel() for p in wide.parameters())} parameters")
    return 0
