"""HiFi-GAN's multi-scale discriminator in torch, as HiFi-GAN writes it: the first scale spectral-normed, the
others weight-normed, with torch's own ``torch.nn.utils`` functions (legacy hooks, as in the original
checkpoints: keys ``weight_orig``/``weight_u``/``weight_v`` and ``weight_g``/``weight_v``).

``MultiScaleDiscriminator(config)(audio)`` takes ``(batch, 1, samples)`` and returns ``(logits, feature_maps)``:
a list of ``(batch, n)`` logits per scale and a list per scale of the feature maps ``(batch, c, t)``.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import xnorm

from .config import POOL, SMALL_DISCRIMINATOR, DiscriminatorConfig

__all__ = ["ScaleDiscriminator", "MultiScaleDiscriminator", "xnorm_discriminator", "train_call"]


def legacy_norm(conv: nn.Conv1d, spectral: bool) -> nn.Conv1d:
    """torch's legacy hooks, as HiFi-GAN uses them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates weight_norm; checkpoints still use it
        return nn.utils.spectral_norm(conv) if spectral else nn.utils.weight_norm(conv)


def xnorm_norm(conv: nn.Conv1d, spectral: bool) -> nn.Conv1d:
    """xnorm's wrappers: torch's parametrization keys, and legacy checkpoints load."""
    return xnorm.spectral_norm(conv) if spectral else xnorm.weight_norm(conv)


class ScaleDiscriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig, spectral: bool, normed=legacy_norm) -> None:
        super().__init__()
        self.slope = config.leaky_slope
        self.convs = nn.ModuleList(
            normed(nn.Conv1d(i, o, k, s, groups=g, padding=p), spectral) for i, o, k, s, g, p in config.layers()
        )
        self.conv_post = normed(nn.Conv1d(config.channels[-1], 1, 3, 1, padding=1), spectral)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feature_maps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self.slope)
            feature_maps.append(x)
        x = self.conv_post(x)
        feature_maps.append(x)
        return torch.flatten(x, 1, -1), feature_maps


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig = SMALL_DISCRIMINATOR, normed=legacy_norm) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(config, spectral=i == 0, normed=normed) for i in range(config.scales)
        )
        self.pool = nn.AvgPool1d(POOL["kernel"], POOL["stride"], padding=POOL["padding"])

    def forward(self, audio: torch.Tensor):
        logits, feature_maps = [], []
        for i, discriminator in enumerate(self.discriminators):
            if i:
                audio = self.pool(audio)
            scale_logits, scale_maps = discriminator(audio)
            logits.append(scale_logits)
            feature_maps.append(scale_maps)
        return logits, feature_maps


def xnorm_discriminator(config: DiscriminatorConfig = SMALL_DISCRIMINATOR) -> MultiScaleDiscriminator:
    """The same discriminator with xnorm's wrappers instead of torch's legacy hooks. Its training-mode
    behaviour is the spec's, which the MindSpore and Flax ports follow: the reference for training-mode calls."""
    return MultiScaleDiscriminator(config, normed=xnorm_norm)


def train_call(model: nn.Module, audio):
    """One training-mode call (spectral norm iterates) on NumPy audio ``(batch, 1, samples)``; NumPy outputs."""
    model.train()
    with torch.no_grad():
        return model(torch.from_numpy(audio))
