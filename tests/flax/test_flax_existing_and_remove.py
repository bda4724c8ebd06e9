"""Wrapping layers whose parameters exist, removing, eps and bfloat16, against conformance.layers / reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import xnorm
from xnorm import reference
from xnorm.conformance import layers
from xnorm.conformance.cases import LAYERS
from xnorm.conformance.tolerances import assert_close
from xnorm.reference import round_to_dtype

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
CONV = next(layer for layer in LAYERS if layer.label == "conv1d")  # (6, 4, 3), padding 1


def conv_case():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal(CONV.weight_shape) / 3
    bias = rng.standard_normal(CONV.bias_size)
    x = rng.standard_normal(CONV.input_shape)
    return weight, bias, x


def to_flax(weight):  # (out, in, k) -> (k, in, out)
    return np.transpose(weight, (2, 1, 0))


def from_flax(kernel):
    return np.transpose(np.asarray(kernel), (2, 1, 0))


def nlc(x):
    return jnp.asarray(np.moveaxis(x, 1, -1))


def ncl(y):
    return np.moveaxis(np.asarray(y), -1, 1)


@pytest.mark.parametrize("dim", [0, 1, 2, None])
def test_linen_checkpoint_wrap_preserves_outputs_and_remove_gives_the_plain_layer(dim):
    weight, bias, x = conv_case()
    module = nn.Conv(6, (3,), padding=[(1, 1)], **F64)
    variables = {"params": {"kernel": jnp.asarray(to_flax(weight)), "bias": jnp.asarray(bias)}}
    expected = layers.forward(CONV, weight, bias, x)
    assert_close(ncl(module.apply(variables, nlc(x))), expected, "float64", "forward", what="plain conv")

    wrapped, wrapped_vars = xnorm.wrap(module, dim=dim, variables=variables)
    assert xnorm.is_wrapped(wrapped) and not xnorm.is_wrapped(module)
    assert_close(ncl(wrapped.apply(wrapped_vars, nlc(x))), expected, "float64", "forward", what="wrapped conv")

    # change g and v, then remove: the plain layer holds w and computes with it
    params = dict(wrapped_vars["params"])
    params["kernel_g"] = params["kernel_g"] * 1.5
    params["kernel_v"] = params["kernel_v"] + 0.1
    g, v = params["kernel_g"], params["kernel_v"]
    plain, plain_vars = xnorm.remove(wrapped, {"params": params})
    assert type(plain) is nn.Conv and set(plain_vars["params"]) == {"kernel", "bias"}
    g_canonical = np.asarray(g) if dim is None else from_flax(g)
    w = reference.weight_norm(g_canonical, from_flax(v), dim)
    assert_close(from_flax(plain_vars["params"]["kernel"]), w, "float64", "weight", what="w after remove")
    assert_close(
        ncl(plain.apply(plain_vars, nlc(x))),
        layers.forward(CONV, w, bias, x),
        "float64",
        "forward",
        what="removed conv output",
    )


@pytest.mark.parametrize("dim", [0, 1, None])
def test_nnx_existing_layer_wrap_preserves_outputs_and_remove(dim):
    weight, bias, x = conv_case()
    layer = nnx.Conv(4, 6, (3,), padding=[(1, 1)], rngs=nnx.Rngs(0), **F64)
    layer.kernel.set_value(jnp.asarray(to_flax(weight)))
    layer.bias.set_value(jnp.asarray(bias))
    expected = layers.forward(CONV, weight, bias, x)
    wrapped = xnorm.wrap(layer, dim=dim)
    assert_close(ncl(wrapped(nlc(x))), expected, "float64", "forward", what="wrapped NNX conv")

    wrapped.kernel_g.set_value(wrapped.kernel_g.get_value() * 2.0)
    g, v = wrapped.kernel_g.get_value(), wrapped.kernel_v.get_value()
    plain = xnorm.remove(wrapped)
    assert type(plain) is nnx.Conv and not xnorm.is_wrapped(plain)
    assert set(nnx.to_pure_dict(nnx.state(plain, nnx.Param))) == {"kernel", "bias"}
    w = reference.weight_norm(np.asarray(g) if dim is None else from_flax(g), from_flax(v), dim)
    assert_close(from_flax(plain.kernel.get_value()), w, "float64", "weight", what="w after remove")
    assert_close(ncl(plain(nlc(x))), layers.forward(CONV, w, bias, x), "float64", "forward", what="removed output")
    np.testing.assert_array_equal(layer.kernel.get_value(), to_flax(weight))  # the original is untouched


def test_nnx_remove_on_a_whole_model_replaces_every_wrapper():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = xnorm.wrap(nnx.Linear(6, 5, rngs=rngs, **F64))
            self.blocks = nnx.List(
                [xnorm.wrap(nnx.Linear(5, 5, rngs=rngs, **F64), dim=None), nnx.Linear(5, 5, rngs=rngs, **F64)]
            )
            self.seq = nnx.Sequential(xnorm.wrap(nnx.Linear(5, 3, rngs=rngs, **F64), dim=1), nnx.relu)

        def __call__(self, x):
            x = self.a(x)
            for block in self.blocks:
                x = block(x)
            return self.seq(x)

    model = Model(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    expected = model(x)
    assert xnorm.remove(model) is model
    assert not any(xnorm.is_wrapped(node) for _, node in nnx.iter_graph(model))
    assert type(model.a) is nnx.Linear and type(model.blocks[0]) is nnx.Linear
    assert type(model.seq.layers[0]) is nnx.Linear
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names == {f"{m}.{k}" for m in ("a", "blocks.0", "blocks.1", "seq.layers.0") for k in ("kernel", "bias")}
    assert_close(model(x), expected, "float64", "forward", what="model output after remove")


@pytest.mark.parametrize("dim", [0, None])
def test_eps_is_added_under_the_square_root(dim):
    weight, bias, x = conv_case()
    layer = nnx.Conv(4, 6, (3,), padding=[(1, 1)], rngs=nnx.Rngs(0), **F64)
    layer.kernel.set_value(jnp.asarray(to_flax(weight)))
    layer.bias.set_value(jnp.asarray(bias))
    wrapped = xnorm.wrap(layer, dim=dim, eps=0.5)
    g_ref, _ = reference.init(weight, dim, eps=0.5)
    g = wrapped.kernel_g.get_value()
    assert_close(np.asarray(g) if dim is None else from_flax(g), g_ref, "float64", "weight", what="g with eps")
    assert_close(
        ncl(wrapped(nlc(x))),
        layers.forward(CONV, weight, bias, x),
        "float64",
        "forward",
        what="eps keeps wrapping function-preserving",
    )
    module, variables = xnorm.wrap(
        nn.Conv(6, (3,), padding=[(1, 1)], **F64),
        dim=dim,
        eps=0.5,
        variables={"params": {"kernel": jnp.asarray(to_flax(weight)), "bias": jnp.asarray(bias)}},
    )
    np.testing.assert_array_equal(variables["params"]["kernel_g"], g)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_bfloat16_norm_in_float32_and_w_cast_once(dim):
    weight, bias, x = conv_case()
    w16 = round_to_dtype(weight, "bfloat16")
    layer = nnx.Conv(4, 6, (3,), padding=[(1, 1)], rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    layer.kernel.set_value(jnp.asarray(to_flax(w16), jnp.bfloat16))
    wrapped = xnorm.wrap(layer, dim=dim)
    g = wrapped.kernel_g.get_value()
    assert g.dtype == jnp.bfloat16 and wrapped.kernel_v.get_value().dtype == jnp.bfloat16
    g_ref, _ = reference.init(w16, dim, dtype="bfloat16")
    g32 = np.asarray(g.astype(jnp.float32))
    np.testing.assert_array_equal(g32 if dim is None else from_flax(g32), g_ref)  # float32 norm, rounded once
    w = wrapped.weight()
    assert w.dtype == jnp.bfloat16
    w_ref = reference.weight_norm(g_ref, w16, dim, dtype="bfloat16")
    np.testing.assert_array_equal(from_flax(np.asarray(w.astype(jnp.float32))), w_ref)
