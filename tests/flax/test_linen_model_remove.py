"""xnorm.remove(model, variables) on a whole linen model (issue 13): the wrappers a setup-style model holds
are found at any depth, their variables become the plain model's, and the returned view computes with
them exactly what the same model written without xnorm computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import xnorm
from xnorm.errors import NotWrappedError, OptionError

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 3)), jnp.float32)


class Block(nn.Module):
    wrap: bool = True

    def setup(self):
        conv, disc = nn.Conv(4, (3,)), nn.Dense(2)
        self.conv = xnorm.wrap(conv, dim=0) if self.wrap else conv
        self.disc = xnorm.spectral_norm(disc) if self.wrap else disc
        self.out = nn.Dense(3)

    def __call__(self, x, train=False):
        h = self.conv(x)
        logits = self.disc(h, update_stats=train) if self.wrap else self.disc(h)
        return self.out(h), logits


class Model(nn.Module):
    wrap: bool = True

    def setup(self):
        self.blocks = [Block(self.wrap), Block(self.wrap)]

    def __call__(self, x, train=False):
        return [block(x, train) for block in self.blocks]


def _wrapped():
    model = Model()
    return model, model.init(jax.random.key(0), X)


def test_a_setup_style_model_gives_the_plain_models_variables_and_outputs():
    model, variables = _wrapped()
    plain_view, plain_variables = xnorm.remove(model, variables, update_stats=False)
    # the variables are exactly those of the same model written without xnorm: names and shapes
    written_plain = Model(wrap=False).init(jax.random.key(1), X)
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(plain_variables) == shapes(written_plain) and "batch_stats" not in plain_variables
    expected = model.apply(variables, X)  # eval mode: no power iteration
    for got in (plain_view.apply(plain_variables, X), Model(wrap=False).apply(plain_variables, X)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_plain_view_initialises_plain_variables():
    model, _ = _wrapped()
    plain_view, _ = xnorm.remove(model, model.init(jax.random.key(0), X), update_stats=False)
    fresh = plain_view.init(jax.random.key(2), X)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, Model(wrap=False).init(jax.random.key(2), X))


def test_wrappers_held_as_fields_are_found_too():
    class Holder(nn.Module):
        layer: nn.Module

        def __call__(self, x):
            return self.layer(x)

    holder = Holder(xnorm.wrap(nn.Dense(3), dim=0))
    variables = holder.init(jax.random.key(0), X)
    plain_view, plain_variables = xnorm.remove(holder, variables)
    assert set(plain_variables["params"]["layer"]) == {"kernel", "bias"}
    np.testing.assert_array_equal(np.asarray(plain_view.apply(plain_variables, X)),
                                  np.asarray(holder.apply(variables, X)))


def test_what_cannot_be_removed_says_why_and_changes_nothing():
    class Inline(nn.Module):
        @nn.compact
        def __call__(self, x):
            return xnorm.wrap(nn.Dense(3), dim=0)(x)

    inline = Inline()
    variables = inline.init(jax.random.key(0), X)
    with pytest.raises(NotWrappedError, match="created inline in an @nn.compact method"):
        xnorm.remove(inline, variables)
    model, variables = _wrapped()
    before = jax.tree.map(np.asarray, variables)
    with pytest.raises(OptionError, match="update_stats=True"):
        xnorm.remove(model, variables)  # it holds spectral norm: the mode must be said
    with pytest.raises(OptionError, match="needs its variables"):
        xnorm.remove(model)
    only_weight_norm = _OnlyWeightNorm()
    with pytest.raises(OptionError, match="update_stats= is for spectral norm"):
        xnorm.remove(only_weight_norm, only_weight_norm.init(jax.random.key(0), X), update_stats=False)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


class _OnlyWeightNorm(nn.Module):
    def setup(self):
        self.dense = xnorm.wrap(nn.Dense(3), dim=0)

    def __call__(self, x):
        return self.dense(x)
