"""The generator in MindSpore, layer for layer and name for name the torch one (``torch_model.py``).

Attribute names match torch's (``conv_pre``, ``ups.N``, ``resblocks.N.convs1.M``, ``resblocks.N.convs2.M``,
``conv_post``), so ``xnorm.convert`` pairs the parameters without ``rename=``. Convolutions use
``pad_mode="pad"`` with torch's padding and ``has_bias=True`` (MindSpore's defaults are ``"same"`` and no
bias). MindSpore stores the 1-d convolutions' weights as ``(out, in, 1, k)`` and ``(in, out, 1, k)``;
the conversion inserts the unit axis.

Data is channels-first, as in torch: mel ``(batch, mel_channels, frames)`` -> audio
``(batch, 1, frames * hop_length)``.

Porting a torch checkpoint (random weights here; a trained one works the same way)::

    xnorm convert g.safetensors --to mindspore --like examples.hifigan.mindspore_model:wrapped_generator -o g.ckpt
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mindspore
import numpy as np
from mindspore import Tensor, nn, ops

import xnorm

from .config import DEFAULT, SMALL, GeneratorConfig, padding

#: The model takes and returns channels-first data, as the torch generator does.
CHANNELS_LAST = False


def _conv1d(cin: int, cout: int, kernel: int, dilation: int, weight_norm: bool) -> nn.Cell:
    conv = nn.Conv1d(cin, cout, kernel, pad_mode="pad", padding=padding(kernel, dilation), dilation=dilation,
                     has_bias=True)
    return xnorm.wrap(conv, dim=0) if weight_norm else conv


class ResBlock(nn.Cell):
    """Multi-receptive-field residual block: per dilation, lrelu -> dilated conv -> lrelu -> conv, plus the input.

    ``(batch, channels, time)`` -> same shape.
    """

    def __init__(self, channels: int, kernel_size: int, dilations, slope: float, weight_norm: bool = False) -> None:
        super().__init__()
        self.slope = slope
        self.convs1 = nn.CellList([_conv1d(channels, channels, kernel_size, d, weight_norm) for d in dilations])
        self.convs2 = nn.CellList([_conv1d(channels, channels, kernel_size, 1, weight_norm) for _ in dilations])
        self.count = len(dilations)

    def construct(self, x: Tensor) -> Tensor:
        for i in range(self.count):
            x = x + self.convs2[i](ops.leaky_relu(self.convs1[i](ops.leaky_relu(x, self.slope)), self.slope))
        return x


class Generator(nn.Cell):
    """mel ``(batch, mel_channels, frames)`` float32 -> audio ``(batch, 1, frames * hop_length)`` in [-1, 1].

    Args:
        config: the shape (:class:`~examples.hifigan.config.GeneratorConfig`).
        weight_norm: wrap every convolution with ``xnorm.wrap(..., dim=0)`` (what HiFi-GAN trains and
            what its torch checkpoints hold); ``False`` builds plain layers.
    """

    def __init__(self, config: GeneratorConfig = DEFAULT, weight_norm: bool = False) -> None:
        super().__init__()
        c = config
        self.slope = c.leaky_slope
        self.num_upsamples = len(c.upsample_rates)
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.conv_pre = _conv1d(c.mel_channels, c.initial_channels, 7, 1, weight_norm)
        ups = []
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)):
            up = nn.Conv1dTranspose(c.initial_channels // 2**i, c.stage_channels(i), k, stride=u, pad_mode="pad",
                                    padding=(k - u) // 2, has_bias=True)
            ups.append(xnorm.wrap(up, dim=0) if weight_norm else up)
        self.ups = nn.CellList(ups)
        self.resblocks = nn.CellList([
            ResBlock(c.stage_channels(i), k, d, c.leaky_slope, weight_norm)
            for i in range(self.num_upsamples)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilations, strict=True)
        ])
        self.conv_post = _conv1d(c.stage_channels(self.num_upsamples - 1), 1, 7, 1, weight_norm)

    def construct(self, mel: Tensor) -> Tensor:
        x = self.conv_pre(mel)
        for i in range(self.num_upsamples):
            x = self.ups[i](ops.leaky_relu(x, self.slope))
            # torch's sum() starts at 0: 0 + r0 == r0, then the same additions in the same order.
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        return ops.tanh(self.conv_post(ops.leaky_relu(x, 0.01)))


def wrapped_generator(config: GeneratorConfig = DEFAULT) -> Generator:
    """A :class:`Generator` whose every convolution is wrapped with ``xnorm.wrap(..., dim=0)``: the ``like=``
    of a conversion from a torch HiFi-GAN checkpoint (weights are placeholders until loaded)."""
    return Generator(config, weight_norm=True)


def wrapped_small_generator() -> Generator:
    """:func:`wrapped_generator` of the SMALL configuration, the one ``python -m examples.hifigan.port`` saves:
    the ``--like`` of ``xnorm convert hifigan-port/generator.safetensors``."""
    return wrapped_generator(SMALL)


def export(model: nn.Cell, example_input: np.ndarray, path: Union[str, Path]) -> Optional[Path]:
    """Export ``model`` as MINDIR with ``mindspore.export``, traced on ``example_input`` (float32 mel).

    ``path`` may end in ``.mindir`` or not (MindSpore appends it); returns the written file's path.
    Works on a wrapped model and on one after ``xnorm.remove``; reload with
    ``mindspore.nn.GraphCell(mindspore.load(str(path)))``.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".mindir" else path
    training = model.training
    try:
        model.set_train(False)
        mindspore.export(model, Tensor(np.ascontiguousarray(example_input)), file_name=str(stem),
                         file_format="MINDIR")
    finally:
        model.set_train(training)
    return stem.with_name(stem.name + ".mindir")
