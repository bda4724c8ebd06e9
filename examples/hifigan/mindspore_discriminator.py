"""HiFi-GAN's multi-scale discriminator in MindSpore, name for name the torch one (``torch_discriminator.py``):
the first scale ``xnorm.spectral_norm``-ed, the others ``xnorm.weight_norm``-ed, so ``xnorm.convert`` pairs a
torch checkpoint's ``weight_orig``/``weight_u``/``weight_v`` and ``weight_g``/``weight_v`` without ``rename=``.
Channels-first, as in torch: ``(batch, 1, samples)`` -> ``(logits, feature_maps)``, lists per scale.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

import xnorm

from .config import POOL, SMALL_DISCRIMINATOR, DiscriminatorConfig

__all__ = ["ScaleDiscriminator", "MultiScaleDiscriminator"]


def _normed(cin: int, cout: int, kernel: int, stride: int, groups: int, padding: int, spectral: bool) -> nn.Cell:
    conv = nn.Conv1d(cin, cout, kernel, stride=stride, pad_mode="pad", padding=padding, group=groups, has_bias=True)
    return xnorm.spectral_norm(conv) if spectral else xnorm.weight_norm(conv)


class ScaleDiscriminator(nn.Cell):
    def __init__(self, config: DiscriminatorConfig, spectral: bool) -> None:
        super().__init__()
        self.slope = config.leaky_slope
        self.convs = nn.CellList([_normed(*layer, spectral) for layer in config.layers()])
        self.conv_post = _normed(config.channels[-1], 1, 3, 1, 1, 1, spectral)
        self.count = len(config.channels)

    def construct(self, x):
        feature_maps = []
        for i in range(self.count):
            x = ops.leaky_relu(self.convs[i](x), self.slope)
            feature_maps.append(x)
        x = self.conv_post(x)
        feature_maps.append(x)
        return x.reshape(x.shape[0], -1), feature_maps


class MultiScaleDiscriminator(nn.Cell):
    def __init__(self, config: DiscriminatorConfig = SMALL_DISCRIMINATOR) -> None:
        super().__init__()
        self.discriminators = nn.CellList([ScaleDiscriminator(config, spectral=i == 0) for i in range(config.scales)])
        self.pool = nn.AvgPool1d(POOL["kernel"], POOL["stride"], pad_mode="pad", padding=POOL["padding"])
        self.scales = config.scales

    def construct(self, audio):
        logits, feature_maps = [], []
        for i in range(self.scales):
            if i:
                audio = self.pool(audio)
            scale_logits, scale_maps = self.discriminators[i](audio)
            logits.append(scale_logits)
            feature_maps.append(scale_maps)
        return logits, feature_maps


#: Channels-first data, as the torch discriminator takes.
CHANNELS_LAST = False


def train_call(model: nn.Cell, audio: np.ndarray):
    """One training-mode call (spectral norm iterates and updates u, v) on ``(batch, 1, samples)`` audio."""
    model.set_train(True)
    return model(Tensor(audio))
