"""The generator in Flax NNX, layer for layer the torch one (examples/hifigan/torch_model.py).

The attribute names are torch's (``conv_pre``, ``ups.N``, ``resblocks.N.convs1.M``,
``resblocks.N.convs2.M``, ``conv_post``), lists are ``nnx.List``, so xnorm.convert's default name
mapping pairs every tensor without a ``rename=``. Flax is channels-last: the model takes mel
``(batch, frames, mel_channels)`` and returns audio ``(batch, frames * hop_length, 1)``.

torch's semantics, written out:

* ``Conv1d(padding=p, dilation=d)``: ``nnx.Conv(padding=[(p, p)], kernel_dilation=d)``;
* ``ConvTranspose1d(k, stride=u, padding=p)``: ``nnx.ConvTranspose(strides=u, transpose_kernel=True,
  padding=[(k - 1 - p, k - 1 - p)])`` (``transpose_kernel=True`` makes the kernel torch's weight with its
  axes reversed; the padding gives torch's output length ``(L - 1) * u - 2p + k``);
* leaky ReLU slopes ``config.leaky_slope`` everywhere but 0.01 before ``conv_post``, then tanh.

``wrapped_generator`` is the ``like=`` of a conversion (``xnorm convert g.safetensors --to flax --like
examples.hifigan.flax_model:wrapped_generator -o g.msgpack``): every convolution wrapped with
``xnorm.wrap(..., dim=0)``, as HiFi-GAN's are weight-normed in torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

import xnorm
from xnorm.porting import atomic_write

from .config import DEFAULT, SMALL, GeneratorConfig, padding

__all__ = ["CHANNELS_LAST", "ResBlock", "Generator", "wrapped_generator", "export", "load_exported"]

#: The model takes and returns channels-last data (``xnorm.compare(..., channels_last=CHANNELS_LAST)``).
CHANNELS_LAST = True


class ResBlock(nnx.Module):
    """Multi-receptive-field residual block: per dilation, lrelu -> dilated conv -> lrelu -> conv, plus the input.

    ``(batch, frames, channels)`` in and out.
    """

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], slope: float, *, rngs: nnx.Rngs):
        self.slope = slope
        self.convs1 = nnx.List(
            [
                nnx.Conv(
                    channels,
                    channels,
                    (kernel_size,),
                    kernel_dilation=(d,),
                    padding=[(padding(kernel_size, d),) * 2],
                    rngs=rngs,
                )
                for d in dilations
            ]
        )
        self.convs2 = nnx.List(
            [
                nnx.Conv(channels, channels, (kernel_size,), padding=[(padding(kernel_size),) * 2], rngs=rngs)
                for _ in dilations
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            x = x + conv2(jax.nn.leaky_relu(conv1(jax.nn.leaky_relu(x, self.slope)), self.slope))
        return x


class Generator(nnx.Module):
    """mel ``(batch, frames, mel_channels)`` -> audio ``(batch, frames * hop_length, 1)``, plain layers.

    ``rngs`` initialises the weights (``nnx.Rngs(0)`` when None); a conversion overwrites them all.
    """

    def __init__(self, config: GeneratorConfig = DEFAULT, *, rngs: Optional[nnx.Rngs] = None) -> None:
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        c = config
        self.conv_pre = nnx.Conv(c.mel_channels, c.initial_channels, (7,), padding=[(3, 3)], rngs=rngs)
        ups = []
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)):
            p = (k - u) // 2
            ups.append(
                nnx.ConvTranspose(
                    c.initial_channels // 2**i,
                    c.stage_channels(i),
                    (k,),
                    strides=(u,),
                    padding=[(k - 1 - p, k - 1 - p)],
                    transpose_kernel=True,
                    rngs=rngs,
                )
            )
        self.ups = nnx.List(ups)
        self.resblocks = nnx.List(
            [
                ResBlock(c.stage_channels(i), k, d, c.leaky_slope, rngs=rngs)
                for i in range(len(c.upsample_rates))
                for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilations, strict=True)
            ]
        )
        self.conv_post = nnx.Conv(c.stage_channels(len(c.upsample_rates) - 1), 1, (7,), padding=[(3, 3)], rngs=rngs)

    def __call__(self, mel: jax.Array) -> jax.Array:
        c = self.config
        kernels = len(c.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(jax.nn.leaky_relu(x, c.leaky_slope))
            # sum() starts from 0 as torch's does, so the additions happen in the same order.
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        return jnp.tanh(self.conv_post(jax.nn.leaky_relu(x, 0.01)))


def wrapped_generator(
    config: GeneratorConfig = DEFAULT, *, rngs: Optional[nnx.Rngs] = None, abstract: bool = False
) -> Generator:
    """A :class:`Generator` whose every convolution is wrapped with ``xnorm.wrap(..., dim=0)``.

    Its state holds ``kernel_g``/``kernel_v`` where torch's weight-normed generator holds
    ``weight_g``/``weight_v`` (or ``parametrizations.weight.original0/1``): the ``like=`` of a conversion.

    ``abstract=True`` builds it under ``nnx.eval_shape``: every variable is a ``jax.ShapeDtypeStruct``
    (names, shapes and dtypes, no values), which is all a conversion target needs and skips the random
    initialisation (seconds for the DEFAULT config on a CPU). Such a model runs only once
    ``xnorm.convert(..., like=model, load=True)`` (or ``nnx.update``) has filled every variable.
    """
    if abstract:
        return nnx.eval_shape(lambda: wrapped_generator(config, rngs=rngs))
    model = Generator(config, rngs=rngs)
    model.conv_pre = xnorm.wrap(model.conv_pre, dim=0)
    for i in range(len(model.ups)):
        model.ups[i] = xnorm.wrap(model.ups[i], dim=0)
    for block in model.resblocks:
        for convs in (block.convs1, block.convs2):
            for j in range(len(convs)):
                convs[j] = xnorm.wrap(convs[j], dim=0)
    model.conv_post = xnorm.wrap(model.conv_post, dim=0)
    return model


def _state_filter():
    return nnx.Not(nnx.RngState)


def export(model: Generator, example_input: np.ndarray, path: Union[str, os.PathLike]) -> Optional[Path]:
    """Save ``model``'s inference variables as a flax.serialization ``.msgpack`` file; return its path.

    Flax has no graph format like MINDIR: what deploys is the model's code plus this file (reload it
    with :func:`load_exported`). ``example_input`` (``(batch, frames, mel_channels)``, channels last) is
    run through the model first, so a model that cannot run is reported before anything is written; an
    input of another shape is a ValueError. ``.msgpack`` is appended to ``path`` unless it already ends
    so; the file is written atomically.
    """
    example_input = np.asarray(example_input)
    mel_channels = model.config.mel_channels
    if example_input.ndim != 3 or example_input.shape[-1] != mel_channels:
        raise ValueError(
            f"example_input must be a channels-last mel spectrogram (batch, frames, {mel_channels}); got shape "
            f"{example_input.shape}. Move the channel axis last: np.moveaxis(mel, 1, -1)."
        )
    path = Path(path)
    if path.suffix != ".msgpack":
        path = path.with_name(path.name + ".msgpack")
    # The generator has no dropout or batch norm: its output does not depend on an eval/train mode.
    model(jnp.asarray(example_input))
    state = nnx.to_pure_dict(nnx.state(model, _state_filter()))
    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, state))
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def wrapped_small_generator() -> Generator:
    """:func:`wrapped_generator` of the SMALL configuration, the one ``python -m examples.hifigan.port`` saves,
    built abstract (a conversion needs names, shapes and dtypes only): the ``--like`` of
    ``xnorm convert hifigan-port/generator.safetensors --to flax``."""
    return wrapped_generator(SMALL, abstract=True)


def load_exported(path: Union[str, os.PathLike], config: GeneratorConfig = DEFAULT) -> Generator:
    """A plain :class:`Generator` holding the variables :func:`export` wrote to ``path``.

    The file must come from a model without weight norm (after ``xnorm.remove``) of the same ``config``;
    a file that leaves a variable unfilled, or fills it with another shape or dtype, is a ValueError.
    """
    model = nnx.eval_shape(lambda: Generator(config))  # no random init: the file fills every variable
    state = nnx.state(model, _state_filter())
    needed = {key: (v.get_value().shape, v.get_value().dtype) for key, v in nnx.to_flat_state(state)}
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(Path(path).read_bytes()))
    wrong = [
        "/".join(map(str, key))
        for key, variable in nnx.to_flat_state(state)
        if isinstance(variable.get_value(), jax.ShapeDtypeStruct)
        or (variable.get_value().shape, variable.get_value().dtype) != needed[key]
    ]
    if wrong:
        raise ValueError(
            f"{os.fspath(path)!r} has no values, or values of another shape or dtype, for "
            f"{', '.join(wrong[:8])}: it was not exported from a plain generator of this config. Pass the "
            "config it was made with, and export after xnorm.remove."
        )
    nnx.update(model, state)
    return model
