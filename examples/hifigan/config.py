"""The generator's shape, shared by the three implementations (one place for these numbers)."""

from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """HiFi-GAN's generator hyper-parameters.

    The mel spectrogram ``(batch, mel_channels, frames)`` goes through ``conv_pre`` (k=7), then per
    upsampling stage a leaky ReLU, a ConvTranspose1d (stride ``rate``, kernel ``kernel``, padding
    ``(kernel - rate) // 2``) halving the channels, and the mean of one multi-receptive-field residual
    block per entry of ``resblock_kernel_sizes`` (dilations from ``resblock_dilations``); then a leaky
    ReLU with slope 0.01 (torch's default, as in HiFi-GAN), ``conv_post`` (k=7, one channel) and tanh:
    audio ``(batch, 1, frames * prod(rates))``. Every other leaky ReLU uses ``leaky_slope``.
    """

    mel_channels: int = 80
    initial_channels: int = 128
    upsample_rates: Tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: Tuple[int, ...] = (16, 16, 4, 4)
    resblock_kernel_sizes: Tuple[int, ...] = (3, 7, 11)
    resblock_dilations: Tuple[Tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_slope: float = 0.1

    def stage_channels(self, stage: int) -> int:
        """Channels after upsampling stage ``stage`` (0-based)."""
        return self.initial_channels // 2 ** (stage + 1)

    @property
    def hop_length(self) -> int:
        out = 1
        for rate in self.upsample_rates:
            out *= rate
        return out


#: What the tests port: every structural feature of the full model, small enough for CI.
SMALL = GeneratorConfig(
    mel_channels=16,
    initial_channels=32,
    upsample_rates=(4, 2),
    upsample_kernel_sizes=(8, 4),
    resblock_kernel_sizes=(3, 5),
    resblock_dilations=((1, 3), (1, 3)),
)

#: HiFi-GAN V2's widths with V1's blocks (about 0.9 M parameters).
DEFAULT = GeneratorConfig()

CONFIGS = {"small": SMALL, "default": DEFAULT}


def padding(kernel_size: int, dilation: int = 1) -> int:
    """'same' padding of a stride-1 convolution."""
    return (kernel_size * dilation - dilation) // 2
