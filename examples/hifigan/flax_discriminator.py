"""HiFi-GAN's multi-scale discriminator in Flax NNX, name for name the torch one (``torch_discriminator.py``):
the first scale ``xnorm.spectral_norm``-ed, the others ``xnorm.weight_norm``-ed. Channels-last:
``(batch, samples, 1)`` -> ``(logits, feature_maps)``, lists per scale, feature maps ``(batch, t, c)``.

torch's semantics, written out: ``Conv1d(k, stride=s, padding=p, groups=g)`` is ``nnx.Conv((k,), strides=s,
padding=[(p, p)], feature_group_count=g)``; ``AvgPool1d(4, 2, padding=2)`` counts the padding in the mean,
as ``nnx.avg_pool``'s ``count_include_pad=True`` does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xnorm

from .config import POOL, SMALL_DISCRIMINATOR, DiscriminatorConfig

__all__ = ["ScaleDiscriminator", "MultiScaleDiscriminator"]


def _normed(cin, cout, kernel, stride, groups, padding, spectral: bool, rngs: nnx.Rngs):
    conv = nnx.Conv(cin, cout, (kernel,), strides=(stride,), padding=[(padding, padding)],
                    feature_group_count=groups, rngs=rngs)
    return xnorm.spectral_norm(conv, rngs=rngs) if spectral else xnorm.weight_norm(conv)


class ScaleDiscriminator(nnx.Module):
    def __init__(self, config: DiscriminatorConfig, spectral: bool, *, rngs: nnx.Rngs) -> None:
        self.slope = config.leaky_slope
        self.convs = nnx.List([_normed(*layer, spectral, rngs) for layer in config.layers()])
        self.conv_post = _normed(config.channels[-1], 1, 3, 1, 1, 1, spectral, rngs)

    def __call__(self, x: jax.Array):
        feature_maps = []
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), self.slope)
            feature_maps.append(x)
        x = self.conv_post(x)
        feature_maps.append(x)
        return x.reshape(x.shape[0], -1), feature_maps


class MultiScaleDiscriminator(nnx.Module):
    def __init__(self, config: DiscriminatorConfig = SMALL_DISCRIMINATOR, *, rngs: Optional[nnx.Rngs] = None) -> None:
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.discriminators = nnx.List(
            [ScaleDiscriminator(config, spectral=i == 0, rngs=rngs) for i in range(config.scales)]
        )

    def __call__(self, audio: jax.Array):
        logits, feature_maps = [], []
        for i, discriminator in enumerate(self.discriminators):
            if i:
                audio = nnx.avg_pool(audio, (POOL["kernel"],), strides=(POOL["stride"],),
                                     padding=((POOL["padding"], POOL["padding"]),), count_include_pad=True)
            scale_logits, scale_maps = discriminator(audio)
            logits.append(scale_logits)
            feature_maps.append(scale_maps)
        return logits, feature_maps


#: The model takes channels-last data (``xnorm.compare(..., channels_last=CHANNELS_LAST)``).
CHANNELS_LAST = True


def train_call(model: MultiScaleDiscriminator, audio: np.ndarray):
    """One training-mode call (spectral norm iterates and updates u, v) on channels-first ``(batch, 1, samples)``
    audio; feature maps are returned channels-first, as torch's."""
    model.train()
    logits, feature_maps = model(jnp.asarray(np.moveaxis(audio, 1, -1)))
    return logits, [[jnp.moveaxis(f, -1, 1) for f in scale] for scale in feature_maps]
