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


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """HiFi-GAN's multi-scale discriminator: ``scales`` scale discriminators, the first spectral-normed and the
    others weight-normed, each fed the audio average-pooled once more than the previous one
    (``AvgPool1d(4, stride 2, padding 2)``, padding counted in the mean, as torch's default).

    A scale discriminator is ``len(channels)`` grouped, strided Conv1d layers, each followed by a leaky ReLU
    (``leaky_slope``), then ``conv_post`` (one channel, kernel 3, padding 1). Layer ``i`` maps
    ``channels[i - 1]`` (1 for the first) to ``channels[i]`` channels with ``kernel_sizes[i]`` (padding
    ``(k - 1) // 2``), ``strides[i]`` and ``groups[i]``. It returns the flattened ``conv_post`` output (the
    logits) and the output of every layer (the feature maps).
    """

    channels: Tuple[int, ...] = (128, 128, 256, 512, 1024, 1024, 1024)
    kernel_sizes: Tuple[int, ...] = (15, 41, 41, 41, 41, 41, 5)
    strides: Tuple[int, ...] = (1, 2, 2, 4, 4, 1, 1)
    groups: Tuple[int, ...] = (1, 4, 16, 16, 16, 16, 1)
    scales: int = 3
    leaky_slope: float = 0.1

    def layers(self):
        """``(in_channels, out_channels, kernel, stride, groups, padding)`` per layer, ``conv_post`` excluded."""
        ins = (1,) + self.channels[:-1]
        return [
            (i, o, k, s, g, (k - 1) // 2)
            for i, o, k, s, g in zip(ins, self.channels, self.kernel_sizes, self.strides, self.groups, strict=True)
        ]


#: The discriminator the tests port: HiFi-GAN's structure (spectral norm on the first scale, groups, strides,
#: pooling between scales) at widths that keep CI fast.
SMALL_DISCRIMINATOR = DiscriminatorConfig(
    channels=(8, 16, 16, 16), kernel_sizes=(5, 9, 9, 3), strides=(1, 2, 2, 1), groups=(1, 4, 4, 1)
)
#: HiFi-GAN V1's multi-scale discriminator.
DEFAULT_DISCRIMINATOR = DiscriminatorConfig()

DISCRIMINATOR_CONFIGS = {"small": SMALL_DISCRIMINATOR, "default": DEFAULT_DISCRIMINATOR}
POOL = {"kernel": 4, "stride": 2, "padding": 2}
