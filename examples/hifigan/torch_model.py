"""The generator in torch, written as HiFi-GAN is: every convolution weight-normed.

The pre/post convolutions and the upsampling layers use torch's legacy ``torch.nn.utils.weight_norm``
(keys ``weight_g``/``weight_v``, as in the original checkpoints); the residual blocks use
``torch.nn.utils.parametrizations.weight_norm`` (keys ``parametrizations.weight.original0/1``).
xnorm.convert reads both.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from .config import DEFAULT, GeneratorConfig, padding


def _legacy_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it; old checkpoints still use it
        return torch.nn.utils.weight_norm(module)


class ResBlock(nn.Module):
    """Multi-receptive-field residual block: per dilation, lrelu -> dilated conv -> lrelu -> conv, plus the input."""

    def __init__(self, channels: int, kernel_size: int, dilations, slope: float) -> None:
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(
            parametrizations.weight_norm(
                nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=padding(kernel_size, d))
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            parametrizations.weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=padding(kernel_size)))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class Generator(nn.Module):
    """mel ``(batch, mel_channels, frames)`` -> audio ``(batch, 1, frames * hop_length)``."""

    def __init__(self, config: GeneratorConfig = DEFAULT) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv_pre = _legacy_weight_norm(nn.Conv1d(c.mel_channels, c.initial_channels, 7, padding=3))
        self.ups = nn.ModuleList(
            _legacy_weight_norm(
                nn.ConvTranspose1d(c.initial_channels // 2**i, c.stage_channels(i), k, u, padding=(k - u) // 2)
            )
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(c.stage_channels(i), k, d, c.leaky_slope)
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilations, strict=True)
        )
        self.conv_post = parametrizations.weight_norm(
            nn.Conv1d(c.stage_channels(len(c.upsample_rates) - 1), 1, 7, padding=3)
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.config
        kernels = len(c.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.leaky_slope))
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))

    def remove_weight_norm(self) -> Generator:
        """Fold every g and v into a plain weight for inference, with torch's own removal functions."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight")
            elif hasattr(module, "weight_g"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.nn.utils.remove_weight_norm(module)
        return self


def random_generator(config: GeneratorConfig = DEFAULT, seed: int = 0) -> Generator:
    """A generator with random weights and g deliberately away from ||v|| (as after training)."""
    torch.manual_seed(seed)
    model = Generator(config)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith(("weight_g", "original0")):
                tensor.mul_(torch.empty_like(tensor).uniform_(0.5, 1.5))
    return model.eval()
