"""The beta-VAE and the 3-D attention U-Net of Hoffmann et al. 2019 (Sec. 3.2, 8.1).

Shapes use B = batch, n = voxels per edge (30), C = channels, K = classes (Zmax + 1).

* :class:`DensityVAE`: encoder E (Conv3d + BatchNorm + LeakyReLU, Sec. 8.1.1) to a
  diagonal Gaussian q(z|M) with a 300-d latent z; decoder D (fully connected, reshape,
  trilinear upsampling + Conv3d, Sec. 8.1.2; no transposed convolutions) back to a
  non-negative density field (ReLU output).
* :class:`AttentionUNet3D`: U-Net (Ronneberger 2015) with additive attention gates on the
  skip connections (Oktay et al. 2018), per-voxel logits over Z = 0..Zmax.
* :func:`vae_loss` and :func:`unet_loss`: Eq. 2 and Eq. 3.

Deviations from Sec. 8.1, all recorded in :class:`ModelConfig` and so in every checkpoint:
the decoder's spatial sizes follow the encoder's (n, ceil(n/2), ceil(n/4), ceil(n/8))
instead of 5 -> 10 -> 20 -> 40, so any grid size decodes exactly to n^3; one more stride-2
convolution before the fully connected layer keeps that layer (and the checkpoint) small;
decoder kernels default to 3 (paper 5, 5, 4) for CPU speed.

The conditional variant (Sec. 4.5): with ``conditional=True`` the bottleneck input (the
flattened encoder features) and output (z, before the decoder's first layer) are multiplied
by ``c = cond / cond_scale``, where ``cond`` is the crystal's largest density (Eq. 1 units)
and ``cond_scale`` a reference value fixed at training time (the median over training
crystals), so that c is about 1 and an unconditional checkpoint can be fine-tuned into a
conditional one. With ``cond_normalise`` the encoder instead sees M rescaled to the
reference maximum (and is not multiplied by c), so only the decoder's c sets the magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "DensityVAE", "AttentionUNet3D", "CrystalNet", "vae_loss", "unet_loss",
           "kl_divergence", "max_density", "scale_grad", "count_parameters", "param_bytes"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild the networks (stored in each checkpoint).

    Attributes:
        grid_n: voxels per edge of the density field.
        latent: size of z (paper: 300).
        enc_channels: channels of the four encoder convolutions (paper 16, 32, 64, 128).
        enc_kernels / enc_strides: their kernels and strides (paper 5/2, 3/1, 3/1, 3/2).
        bottleneck_channels: channels of the extra stride-2 convolution before the FC layer.
        dec_channels: channels after each upsampling (paper 64, 32, 16).
        dec_kernel: kernel of the decoder convolutions.
        unet_channels: channels per U-Net level (finest first).
        n_classes: species classes, Z = 0 (no atom) .. n_classes - 1.
        conditional: Sec. 4.5 max-density conditioning of the bottleneck.
        cond_scale: reference largest density (Eq. 1 units); the bottleneck is multiplied
            by ``cond / cond_scale``.
        cond_normalise: conditional only: the encoder sees M rescaled to the largest
            density ``cond_scale`` (its shape, not its magnitude) and its features are not
            multiplied by c, so z cannot carry the magnitude and only the condition sets it
            (the control of Sec. 4.5, Fig. 10B).
        light_channel: the decoder has a second output, the light-atom field L
            (:func:`crystalstudio.core.density.light_field`): the Gaussians of Eq. 1 of the atoms
            with Z <= ``light_z_max`` only, each weighted by ``light_gain`` x Z (gain 4: an H
            half as tall as an O is in M, a Li 1.5 times). The encoder still sees M alone, and
            M_hat is fitted for the other atoms; L lets the fit find the light atoms, which M
            draws at 1/8 of an O's height on an O's tail (a deviation from the paper, which
            has M alone; :mod:`crystalstudio.core.light`).
        light_gain / light_z_max: see ``light_channel``.
    """

    grid_n: int = 30
    latent: int = 300
    enc_channels: tuple = (16, 32, 64, 128)
    enc_kernels: tuple = (5, 3, 3, 3)
    enc_strides: tuple = (2, 1, 1, 2)
    bottleneck_channels: int = 32
    dec_channels: tuple = (64, 32, 16)
    dec_kernel: int = 3
    unet_channels: tuple = (16, 32, 64)
    n_classes: int = 95
    conditional: bool = False
    cond_scale: float = 1.0
    cond_normalise: bool = False
    light_channel: bool = False
    light_gain: float = 4.0
    light_z_max: int = 5

    def to_dict(self) -> dict:
        """JSON-ready dict of every field, as stored in checkpoint metadata."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of :meth:`to_dict`: missing keys take their defaults, unknown ones raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def max_density(M: torch.Tensor) -> torch.Tensor:
    """Largest density of each field: M (B, n, n, n) or (B, 1, n, n, n) -> (B,), the
    conditioning value of Sec. 4.5 (Eq. 1 units)."""
    return M.flatten(1).amax(1).detach()


def _block(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         nn.BatchNorm3d(cout), nn.LeakyReLU(0.2, inplace=True))


def _conv_out(n: int, k: int, s: int) -> int:
    return (n + 2 * (k // 2) - k) // s + 1


class DensityVAE(nn.Module):
    """beta-VAE on density fields. ``forward(M) -> (M_hat, mu, logvar)``.

    Input M: (B, n, n, n) or (B, 1, n, n, n) float32 in Eq. 1 units.
    Output M_hat: (B, n, n, n) float32 >= 0; mu, logvar: (B, latent).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers, cin, size = [], 1, cfg.grid_n
        sizes = [size]
        for c, k, s in zip(cfg.enc_channels, cfg.enc_kernels, cfg.enc_strides):
            layers.append(_block(cin, c, k, s))
            cin, size = c, _conv_out(size, k, s)
            if s > 1:
                sizes.append(size)
        layers.append(_block(cin, cfg.bottleneck_channels, 3, 2))
        size = _conv_out(size, 3, 2)
        sizes.append(size)
        self.encoder = nn.Sequential(*layers)
        self.flat = cfg.bottleneck_channels * size**3
        self.to_stats = nn.Linear(self.flat, 2 * cfg.latent)  # -> mu, logvar
        # decoder: sizes reversed, e.g. 4 -> 8 -> 15 -> 30 for n = 30
        self.dec_sizes = sizes[::-1][1:]
        self.dec_start = (cfg.bottleneck_channels, size)
        self.from_z = nn.Linear(cfg.latent, self.flat)
        ups, cin = [], cfg.bottleneck_channels
        for c in cfg.dec_channels:
            ups.append(_block(cin, c, cfg.dec_kernel))
            cin = c
        if len(ups) != len(self.dec_sizes):
            raise ValueError(f"decoder needs {len(self.dec_sizes)} stages for grid {cfg.grid_n}, "
                             f"got dec_channels={cfg.dec_channels}")
        self.dec_blocks = nn.ModuleList(ups)
        self.out = nn.Conv3d(cin, 1, cfg.dec_kernel, padding=cfg.dec_kernel // 2)
        if cfg.light_channel:
            self.out_light = nn.Conv3d(cin, 1, cfg.dec_kernel, padding=cfg.dec_kernel // 2)

    def add_light_head(self) -> None:
        """Give a decoder without one the light-atom output (``cfg.light_channel``) for fine-tuning
        an M-only checkpoint. The head starts at zero weights and a small positive bias (0.01,
        Eq. 1 units; an O peaks at 0.51): L_hat starts near zero, so its loss does not swamp
        M's, while its ReLU passes gradient everywhere. A no-op when the head exists."""
        if self.cfg.light_channel and hasattr(self, "out_light"):
            return
        self.cfg.light_channel = True
        self.out_light = nn.Conv3d(self.out.in_channels, 1, self.out.kernel_size, padding=self.out.padding)
        with torch.no_grad():
            self.out_light.weight.zero_()
            self.out_light.bias.fill_(0.01)
        self.out_light.to(device=self.out.weight.device, dtype=self.out.weight.dtype)

    def _cond(self, cond: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (cond.to(like.dtype) / self.cfg.cond_scale).view(-1, 1)

    def encode(self, M: torch.Tensor, cond: torch.Tensor | None = None):
        """M (B, n, n, n) -> (mu, logvar), each (B, latent).

        For a conditional model ``cond`` (B,) defaults to the largest density of each M
        (unused with ``cond_normalise``: the encoder then sees M scaled to ``cond_scale``).
        """
        if M.dim() == 4:
            M = M.unsqueeze(1)
        normalise = self.cfg.conditional and self.cfg.cond_normalise
        if normalise:  # shape only: the condition carries the magnitude
            M = M * (self.cfg.cond_scale / max_density(M).clamp_min(1e-6)).view(-1, 1, 1, 1, 1)
        h = self.encoder(M).flatten(1)
        if self.cfg.conditional and not normalise:
            if cond is None:
                cond = max_density(M)
            h = h * self._cond(cond, h)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent) -> M_hat (B, n, n, n), float32, >= 0.

        For a conditional model ``cond`` (B,) is the target largest density (Eq. 1 units);
        None decodes at the reference ``cfg.cond_scale``.
        """
        return self.decode_fields(z, cond)[0]

    def decode_fields(self, z: torch.Tensor, cond: torch.Tensor | None = None):
        """z (B, latent) -> ``(M_hat, L_hat)``: M_hat as :meth:`decode`; L_hat (B, n, n, n) >= 0
        the light-atom field (``cfg.light_channel``), or None for a decoder without one."""
        if self.cfg.conditional and cond is not None:
            z = z * self._cond(cond, z)
        c, s = self.dec_start
        h = F.leaky_relu(self.from_z(z), 0.2).view(-1, c, s, s, s)
        for size, block in zip(self.dec_sizes, self.dec_blocks):
            h = block(F.interpolate(h, size=(size,) * 3, mode="trilinear", align_corners=False))
        M_hat = F.relu(self.out(h)).squeeze(1)
        if not self.cfg.light_channel:
            return M_hat, None
        return M_hat, F.relu(self.out_light(h)).squeeze(1)

    def forward(self, M: torch.Tensor, cond: torch.Tensor | None = None, sample: bool = True,
                light: bool = False):
        """Encode, draw z = mu + exp(logvar / 2) eps (``sample``; else z = mu) and decode (Eq. 2).
        ``cond`` defaults to the fields' own largest density for a conditional model. Returns
        ``(M_hat (B, n, n, n), mu, logvar)``, and L_hat (or None) after them with ``light``."""
        if self.cfg.conditional and cond is None:
            cond = max_density(M)
        mu, logvar = self.encode(M, cond)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        M_hat, L_hat = self.decode_fields(z, cond)
        return (M_hat, mu, logvar, L_hat) if light else (M_hat, mu, logvar)


class _AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, Eq. 1-2): x * sigmoid(psi(relu(Wx x + Wg g)))."""

    def __init__(self, cx: int, cg: int, ci: int):
        super().__init__()
        self.wx = nn.Conv3d(cx, ci, 1, bias=False)
        self.wg = nn.Conv3d(cg, ci, 1)
        self.psi = nn.Conv3d(ci, 1, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.psi(F.relu(self.wx(x) + self.wg(g))))
        return x * a


class AttentionUNet3D(nn.Module):
    """3-D attention U-Net: M_hat (B, n, n, n) -> logits (B, K, n, n, n) over Z = 0..K-1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = list(cfg.unet_channels)
        self.down = nn.ModuleList()
        cin = 1
        for c in ch:
            self.down.append(nn.Sequential(_block(cin, c, 3), _block(c, c, 3)))
            cin = c
        self.gates = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.gates.append(_AttentionGate(ch[i - 1], ch[i], max(ch[i - 1] // 2, 4)))
            self.up.append(nn.Sequential(_block(ch[i] + ch[i - 1], ch[i - 1], 3), _block(ch[i - 1], ch[i - 1], 3)))
        self.head = nn.Conv3d(ch[0], cfg.n_classes, 1)

    def forward(self, M: torch.Tensor) -> torch.Tensor:
        """Species logits (B, K, n, n, n) of density fields (B, n, n, n) or (B, 1, n, n, n) (Sec. 3.2)."""
        h = M.unsqueeze(1) if M.dim() == 4 else M
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.max_pool3d(h, 2, ceil_mode=True)
            h = block(h)
            skips.append(h)
        for gate, block, skip in zip(self.gates, self.up, reversed(skips[:-1])):
            g = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([g, gate(skip, g)], dim=1))
        return self.head(h)


class CrystalNet(nn.Module):
    """The jointly trained pair: ``vae`` (E, D) and ``unet`` (U_net), Fig. 2 of the paper."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = DensityVAE(cfg)
        self.unet = AttentionUNet3D(cfg)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """D_KL(q(z|M) || N(0, I)) per latent dimension, (B, latent), nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def vae_loss(M: torch.Tensor, M_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             seg_loss: torch.Tensor | None, beta: float, gamma: float,
             weight: torch.Tensor | None = None) -> dict:
    """Eq. 2: L_VAE = L_RE(M, M_hat) + beta KL(q(z|M) || p(z)) + gamma L_seg(S, S_hat).

    L_RE is the squared error summed over voxels (mean over the batch), KL summed over
    the latent dimensions; ``seg_loss`` is the U-Net's cross entropy on the decoded field.

    ``weight`` (same shape as M, optional): per-voxel weights of the squared error (the
    peak-weighted MSE of the CPU recipe: voxels near atoms count more).

    Returns a dict of scalar tensors: ``loss``, ``recon``, ``kl``.
    """
    se = (M_hat - M).pow(2)
    if weight is not None:
        se = se * weight
    recon = se.flatten(1).sum(1).mean()
    kl = kl_divergence(mu, logvar).sum(1).mean()
    loss = recon + beta * kl
    if seg_loss is not None:
        loss = loss + gamma * seg_loss
    return {"loss": loss, "recon": recon, "kl": kl}


def unet_loss(logits: torch.Tensor, S: torch.Tensor, background_weight: float = 1.0) -> torch.Tensor:
    """Eq. 3: cross entropy between U-Net logits (B, K, n, n, n) and species S (B, n, n, n).

    The paper's "binary cross entropy over one-hot classes" is taken as the multi-class
    (softmax) cross entropy, mean over voxels; ``background_weight`` < 1 down-weights the
    dominant no-atom class.
    """
    K = logits.shape[1]
    w = None
    if background_weight != 1.0:
        w = torch.ones(K, device=logits.device, dtype=logits.dtype)
        w[0] = background_weight
    return F.cross_entropy(logits, S.clamp(0, K - 1), weight=w)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient times ``scale`` backward.

    Lets one U-Net pass serve both Eq. 3 (full gradient into the U-Net) and the
    gamma-weighted segmentation term of Eq. 2 (gradient times gamma into the decoder).
    """
    return _ScaleGrad.apply(x, scale)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (numbers) of ``module``."""
    return int(sum(p.numel() for p in module.parameters()))


def param_bytes(module: nn.Module, bytes_per: int = 4) -> int:
    """Bytes of ``module``'s state dict (parameters and buffers) at ``bytes_per`` bytes a number."""
    return int(sum(t.numel() for t in module.state_dict().values()) * bytes_per)


