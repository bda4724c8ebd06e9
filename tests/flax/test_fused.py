"""``xnorm.wrap(..., fused=True)`` for linen and NNX (backends/flax/fused.py).

Every value is checked against the float64 NumPy reference (xnorm.reference, conformance.layers) and
against the non-fused wrapper, with the conformance tolerances: outputs, dL/dg, dL/dv, dL/dbias and
one jitted SGD step, both where the scale moves to the output/input/rows and where w is materialised
(dim on a kernel axis). The traced forward proves that w is never built where the algebra applies:
no kernel-shaped product of two different arrays exists in it (v * v of the norm is the only one).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, serialization

import xnorm
from xnorm import reference
from xnorm._backends.flax import fused as fused_module
from xnorm.conformance import layers
from xnorm.conformance.adapters.flax import _layout, linen_layer, nnx_layer
from xnorm.conformance.cases import LAYERS
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, MissingParameterError, OptionError
from xnorm.spec import FUSED_INPUT, FUSED_OUTPUT, FUSED_ROWS, LayerKind

CASES = {layer.label: layer for layer in LAYERS}
LR = 0.25

# (catalogue layer, dim, where s goes: the table of xnorm.spec.fused_scale_side, written out for Flax)
SCENARIOS = [
    ("linear", 0, FUSED_OUTPUT),
    ("linear", 1, FUSED_INPUT),
    ("linear", None, FUSED_OUTPUT),
    ("linear-nobias", -1, FUSED_OUTPUT),
    ("conv1d-g2-s2-d2", 0, FUSED_OUTPUT),
    ("conv1d-g2-s2-d2", 1, FUSED_INPUT),  # in/groups scale tiled over the 2 groups
    ("conv1d-g2-s2-d2", 2, None),  # kernel axis: w materialised
    ("conv2d", 1, FUSED_INPUT),
    ("conv2d", 3, None),
    ("conv2d-g2-s2-nobias", None, FUSED_OUTPUT),
    ("conv_transpose2d-s2", 0, FUSED_INPUT),
    ("conv_transpose2d-s2", 1, FUSED_OUTPUT),
    ("conv_transpose2d-s2", -2, None),
    ("embedding", 0, FUSED_ROWS),
    ("embedding", 1, FUSED_OUTPUT),
    ("embedding", None, FUSED_OUTPUT),
]
IDS = [f"{label}-dim{dim}" for label, dim, _ in SCENARIOS]


# ------------------------------------------------------------------------------------------------
# helpers: canonical (torch) NumPy arrays <-> the Flax layer
# ------------------------------------------------------------------------------------------------
def data(layer, seed=0):
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(layer.weight_shape[1:]))
    weight = rng.standard_normal(layer.weight_shape) / np.sqrt(fan_in)
    bias = rng.standard_normal(layer.bias_size) if layer.bias else None
    if layer.kind == LayerKind.EMBEDDING:
        x = rng.integers(0, layer.weight_shape[0], size=layer.input_shape)
    else:
        x = rng.standard_normal(layer.input_shape)
    grad_y = rng.standard_normal(layers.output_shape(layer))
    return weight, bias, x, grad_y


def channels_last(layer, array):
    spatial = layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE
    return np.moveaxis(array, 1, -1) if spatial else array


def channels_first(layer, array):
    spatial = layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE
    return np.moveaxis(np.asarray(array, dtype=np.float64), -1, 1) if spatial else np.asarray(array, np.float64)


def flax_input(layer, x, dtype=jnp.float64):
    if layer.kind == LayerKind.EMBEDDING:
        return jnp.asarray(x, dtype=jnp.int32)
    return jnp.asarray(channels_last(layer, x), dtype=dtype)


def canonical(layer, array):
    array = np.asarray(jnp.asarray(array, jnp.float64))
    return array if array.ndim == 0 else _layout(layer).to_canonical(array)


def weight_name(layer):
    return "embedding" if layer.kind == LayerKind.EMBEDDING else "kernel"


def linen_plain(layer, weight, bias, dtype="float64"):
    jdtype = jnp.dtype(dtype)
    params = {weight_name(layer): jnp.asarray(_layout(layer).to_storage(weight), jdtype)}
    if bias is not None:
        params["bias"] = jnp.asarray(bias, jdtype)
    return linen_layer(layer, dtype), {"params": params}


def nnx_plain(layer, weight, bias, dtype="float64"):
    module = nnx_layer(layer, dtype)
    getattr(module, weight_name(layer)).set_value(jnp.asarray(_layout(layer).to_storage(weight), jnp.dtype(dtype)))
    if bias is not None:
        module.bias.set_value(jnp.asarray(bias, jnp.dtype(dtype)))
    return module


def reference_values(layer, weight, bias, x, grad_y, dim):
    """Float64 output, gradients for L = sum(y * grad_y), and the parameters after one SGD step."""
    g, v = reference.init(weight, dim)
    w = reference.weight_norm(g, v, dim)
    y = layers.forward(layer, w, bias, x)
    grad_w, grad_b = layers.backward(layer, w, x, grad_y)
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
    grads = {"g": grad_g, "v": grad_v, **({"bias": grad_b} if bias is not None else {})}
    params = {"g": g, "v": v, **({"bias": bias} if bias is not None else {})}
    stepped = {key: params[key] - LR * grads[key] for key in params}
    return y, grads, stepped


def protocol(layer, values):
    """``{g, v[, bias]}`` in the canonical layout from a wrapper's parameter mapping."""
    name = weight_name(layer)
    out = {"g": canonical(layer, values[name + "_g"]), "v": canonical(layer, values[name + "_v"])}
    if "bias" in values:
        out["bias"] = np.asarray(values["bias"], np.float64)
    return out


def nnx_values(state):
    return {str(key): state[key].get_value() for key in state}


# ------------------------------------------------------------------------------------------------
# the two APIs behind one interface: forward, gradients of L = sum(y * grad_y), one SGD step
# ------------------------------------------------------------------------------------------------
def run_linen(layer, dim, weight, bias, x, grad_y, *, fused):
    plain, variables = linen_plain(layer, weight, bias)
    module, wrapped = xnorm.wrap(plain, dim=dim, variables=variables, **({"fused": True} if fused else {}))
    xs, gy = flax_input(layer, x), jnp.asarray(channels_last(layer, grad_y))
    params = wrapped["params"]
    tx = optax.sgd(LR)

    @jax.jit  # one compile: output, gradients and a whole training step (forward, backward, update)
    def run(p, opt_state):
        y, vjp = jax.vjp(lambda p: module.apply({"params": p}, xs), p)
        grads = vjp(gy)[0]  # dL/dp for L = sum(y * grad_y)
        updates, _ = tx.update(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, xs) * gy))(p), opt_state, p)
        return y, grads, optax.apply_updates(p, updates)

    y, grads, stepped = run(params, tx.init(params))
    return channels_first(layer, y), protocol(layer, grads), protocol(layer, stepped)


def run_nnx(layer, dim, weight, bias, x, grad_y, *, fused):
    module = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim, **({"fused": True} if fused else {}))
    xs, gy = flax_input(layer, x), jnp.asarray(channels_last(layer, grad_y))
    optimizer = nnx.Optimizer(module, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit  # one compile: output, gradients and a whole training step (forward, backward, update)
    def run(m, opt):
        y = m(xs)
        grads = nnx.grad(lambda m: jnp.sum(m(xs) * gy))(m)
        opt.update(m, grads)
        return y, grads

    y, grads = run(module, optimizer)
    return (
        channels_first(layer, y),
        protocol(layer, nnx_values(grads)),
        protocol(layer, nnx_values(nnx.state(module, nnx.Param))),
    )


RUNNERS = {"linen": run_linen, "nnx": run_nnx}


# ------------------------------------------------------------------------------------------------
# where the scale goes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("label", "dim", "side"), SCENARIOS, ids=IDS)
def test_side_follows_the_spec_table(label, dim, side):
    layer = CASES[label]
    ndim = len(layer.weight_shape)
    canonical_dim = None if dim in (None, -1) else dim % ndim
    assert fused_module.fused_side(linen_layer(layer, "float32"), weight_name(layer), canonical_dim) == side
    assert fused_module.fused_side(nnx_layer(layer, "float32"), weight_name(layer), canonical_dim) == side


def test_modules_that_may_not_be_linear_in_the_weight_fall_back():
    class Doubled(nn.Dense):  # a subclass may change __call__: its output need not be linear in w
        def __call__(self, x):
            return 2 * super().__call__(x)

    assert fused_module.fused_side(Doubled(4), "kernel", 0) is None
    assert fused_module.fused_side(nn.Dense(4), "bias", None) is None  # not the weight: generic
    assert fused_module.fused_side(nn.DenseGeneral(4), "kernel", None) is None

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)))
    module = Doubled(4, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x)
    wrapped, wrapped_vars = xnorm.wrap(module, dim=0, variables=variables, fused=True)
    assert_close(wrapped.apply(wrapped_vars, x), module.apply(variables, x), "float64", "forward")


# ------------------------------------------------------------------------------------------------
# values: reference and non-fused wrapper
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize(("label", "dim", "side"), SCENARIOS, ids=IDS)
def test_outputs_gradients_and_sgd_step_match_the_reference_and_the_plain_wrapper(api, label, dim, side):
    layer = CASES[label]
    weight, bias, x, grad_y = data(layer)
    y_ref, grads_ref, stepped_ref = reference_values(layer, weight, bias, x, grad_y, dim)
    y, grads, stepped = RUNNERS[api](layer, dim, weight, bias, x, grad_y, fused=True)
    assert_close(y, y_ref, "float64", "forward", what=f"fused {api} output")
    assert sorted(grads) == sorted(grads_ref)
    for key in grads_ref:
        assert_close(grads[key], grads_ref[key], "float64", "gradient", what=f"fused {api} dL/d{key}")
        assert_close(stepped[key], stepped_ref[key], "float64", "training", what=f"fused {api} {key} after SGD")

    y0, grads0, stepped0 = RUNNERS[api](layer, dim, weight, bias, x, grad_y, fused=False)
    assert_close(y, y0, "float64", "forward", what="fused vs plain wrapper output")
    for key in grads0:
        assert_close(grads[key], grads0[key], "float64", "gradient", what=f"fused vs plain wrapper dL/d{key}")
        assert_close(stepped[key], stepped0[key], "float64", "training", what=f"fused vs plain wrapper {key}")


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize(("label", "dim"), [("linear", 0), ("conv2d", 1), ("embedding", 0)])
def test_low_precision_within_the_conformance_tolerances(api, label, dim):
    layer = CASES[label]
    weight, bias, x, _ = data(layer, seed=1)
    for dtype in ("float32", "bfloat16"):  # float16: Flax's plain float16 layers already miss its tolerance
        w_in = reference.round_to_dtype(weight, dtype)
        b_in = None if bias is None else reference.round_to_dtype(bias, dtype)
        x_in = x if layer.kind == LayerKind.EMBEDDING else reference.round_to_dtype(x, dtype)
        xs = flax_input(layer, x_in, jnp.dtype(dtype))
        g, v = reference.init(w_in, dim)
        expected = layers.forward(layer, reference.weight_norm(g, v, dim), b_in, x_in)
        if api == "linen":
            plain, variables = linen_plain(layer, w_in, b_in, dtype)
            module, wrapped = xnorm.wrap(plain, dim=dim, variables=variables, fused=True)
            unfused, unfused_vars = xnorm.wrap(plain, dim=dim, variables=variables)
            out, out0 = module.apply(wrapped, xs), unfused.apply(unfused_vars, xs)
        else:
            out = xnorm.wrap(nnx_plain(layer, w_in, b_in, dtype), dim=dim, fused=True)(xs)
            out0 = xnorm.wrap(nnx_plain(layer, w_in, b_in, dtype), dim=dim)(xs)
        assert out.dtype == out0.dtype == jnp.dtype(dtype)
        assert_close(channels_first(layer, out), expected, dtype, "forward", what=f"fused {dtype} output")


@pytest.mark.parametrize("dim", [0, 1, None])
def test_eps_is_added_to_the_sum_of_squares(dim):
    layer = CASES["linear"]
    weight, bias, x, _ = data(layer, seed=2)
    weight[0] = 0.0  # eps keeps the zero slice finite
    eps = 1e-3
    g, v = reference.init(weight, dim, eps=eps)
    expected = layers.forward(layer, reference.weight_norm(g, v, dim, eps=eps), bias, x)
    plain, variables = linen_plain(layer, weight, bias)
    module, wrapped = xnorm.wrap(plain, dim=dim, eps=eps, variables=variables, fused=True)
    assert_close(module.apply(wrapped, flax_input(layer, x)), expected, "float64", "forward", what="linen eps")
    nnx_module = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim, eps=eps, fused=True)
    assert_close(nnx_module(flax_input(layer, x)), expected, "float64", "forward", what="nnx eps")


@pytest.mark.parametrize(
    ("layer_dtype", "param_dtype", "x_dtype"),
    [(None, jnp.float32, jnp.bfloat16), (None, jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.float32, jnp.float32)],
)
@pytest.mark.parametrize("dim", [0, 1])
def test_mixed_dtypes_give_the_non_fused_output_dtype(layer_dtype, param_dtype, x_dtype, dim):
    # Each case has one bfloat16 side, so both outputs are compared with the float64 reference at the
    # bfloat16 tolerance (fused and non-fused round at different places, e.g. w itself).
    layer = CASES["linear"]
    weight, bias, x, _ = data(layer, seed=4)
    weight, bias = reference.round_to_dtype(weight, "bfloat16"), reference.round_to_dtype(bias, "bfloat16")
    x = reference.round_to_dtype(x, "bfloat16")
    xs = jnp.asarray(x, x_dtype)
    g, v = reference.init(weight, dim)
    expected = layers.forward(layer, reference.weight_norm(g, v, dim), bias, x)

    module = nn.Dense(4, dtype=layer_dtype, param_dtype=param_dtype)
    variables = {"params": {"kernel": jnp.asarray(weight.T, param_dtype), "bias": jnp.asarray(bias, param_dtype)}}
    fused, fused_vars = xnorm.wrap(module, dim=dim, variables=variables, fused=True)
    plain, plain_vars = xnorm.wrap(module, dim=dim, variables=variables)
    out, out0 = fused.apply(fused_vars, xs), plain.apply(plain_vars, xs)
    assert out.dtype == out0.dtype == module.apply(variables, xs).dtype
    assert_close(out, expected, "bfloat16", "forward", what="fused linen output")

    layer_nnx = nnx.Linear(6, 4, dtype=layer_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    layer_nnx.kernel.set_value(variables["params"]["kernel"])
    layer_nnx.bias.set_value(variables["params"]["bias"])
    out, out0 = xnorm.wrap(layer_nnx, dim=dim, fused=True)(xs), xnorm.wrap(layer_nnx, dim=dim)(xs)
    assert out.dtype == out0.dtype == layer_nnx(xs).dtype
    assert_close(out, expected, "bfloat16", "forward", what="fused NNX output")


# ------------------------------------------------------------------------------------------------
# w is never built where the algebra applies
# ------------------------------------------------------------------------------------------------
def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def weight_products(closed_jaxpr, kernel_shape):
    """Products/quotients shaped like the kernel whose operands differ (v * v of the norm is excluded)."""
    found = []
    for eqn in _equations(closed_jaxpr.jaxpr):
        if eqn.primitive.name not in ("mul", "div"):
            continue
        if tuple(eqn.outvars[0].aval.shape) != tuple(kernel_shape):
            continue
        a, b = eqn.invars
        if a is not b:
            found.append(str(eqn))
    return found


@pytest.mark.parametrize(("label", "dim", "side"), SCENARIOS, ids=IDS)
def test_w_is_not_materialised_where_the_algebra_applies(label, dim, side):
    layer = CASES[label]
    weight, bias, x, _ = data(layer)
    kernel_shape = _layout(layer).storage_shape(layer.weight_shape)
    xs = flax_input(layer, x)

    plain, variables = linen_plain(layer, weight, bias)
    for fused in (True, False):
        module, wrapped = xnorm.wrap(plain, dim=dim, variables=variables, **({"fused": True} if fused else {}))
        products = weight_products(jax.make_jaxpr(module.apply)(wrapped, xs), kernel_shape)
        # the non-fused wrapper always builds w (this is what makes the check able to fail)
        assert bool(products) == (not fused or side is None), (fused, products)

        nnx_module = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim, **({"fused": True} if fused else {}))
        graphdef, state = nnx.split(nnx_module)
        traced = jax.make_jaxpr(lambda s, x, gd=graphdef: nnx.merge(gd, s)(x))(state, xs)
        products = weight_products(traced, kernel_shape)
        assert bool(products) == (not fused or side is None), (fused, products)


def test_the_scale_is_computed_without_calling_the_materialising_function(monkeypatch):
    import xnorm._backends.flax as backend

    calls = []
    original = backend._materialize

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "_materialize", counting)
    layer = CASES["conv2d"]
    weight, bias, x, _ = data(layer)
    plain, variables = linen_plain(layer, weight, bias)
    for dim, expected in ((0, 0), (1, 0), (None, 0), (2, 1)):
        calls.clear()
        module, wrapped = xnorm.wrap(plain, dim=dim, variables=variables, fused=True)
        module.apply(wrapped, flax_input(layer, x))
        assert len(calls) == expected, dim


# ------------------------------------------------------------------------------------------------
# same parameters, checkpoints, remove, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("label", "dim"), [("conv1d-g2-s2-d2", 0), ("conv2d", 3), ("embedding", 0)])
def test_linen_checkpoints_load_both_ways(label, dim):
    layer = CASES[label]
    weight, bias, x, _ = data(layer)
    other, other_bias, _, _ = data(layer, seed=9)
    xs = flax_input(layer, x)
    plain, variables = linen_plain(layer, weight, bias)
    fused, fused_vars = xnorm.wrap(plain, dim=dim, variables=variables, fused=True)
    unfused, unfused_vars = xnorm.wrap(plain, dim=dim, variables=variables)
    assert jax.tree.map(jnp.shape, fused_vars) == jax.tree.map(jnp.shape, unfused_vars)
    assert list(fused_vars["params"]) == list(unfused_vars["params"])

    other_plain, other_vars = linen_plain(layer, other, other_bias)
    _, template_vars = xnorm.wrap(other_plain, dim=dim, variables=other_vars)  # a fresh wrapper's variables
    into_unfused = serialization.from_bytes(template_vars, serialization.to_bytes(fused_vars))
    into_fused = serialization.from_bytes(template_vars, serialization.to_bytes(unfused_vars))
    g, v = reference.init(weight, dim)
    expected = layers.forward(layer, reference.weight_norm(g, v, dim), bias, x)
    assert_close(channels_first(layer, unfused.apply(into_unfused, xs)), expected, "float64", "forward")
    assert_close(channels_first(layer, fused.apply(into_fused, xs)), expected, "float64", "forward")


@pytest.mark.parametrize(("label", "dim"), [("linear", 1), ("conv_transpose2d-s2", 2), ("embedding", 1)])
def test_nnx_state_loads_both_ways(label, dim):
    layer = CASES[label]
    weight, bias, x, _ = data(layer)
    other, other_bias, _, _ = data(layer, seed=9)
    xs = flax_input(layer, x)
    fused = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim, fused=True)
    unfused = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim)
    fused_state, unfused_state = nnx.state(fused), nnx.state(unfused)
    assert [str(key) for key in fused_state] == [str(key) for key in unfused_state]
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(fused_state)) == jax.tree.map(
        jnp.shape, nnx.to_pure_dict(unfused_state)
    )
    g, v = reference.init(weight, dim)
    expected = layers.forward(layer, reference.weight_norm(g, v, dim), bias, x)
    for source, target in ((fused, False), (unfused, True)):
        fresh = xnorm.wrap(nnx_plain(layer, other, other_bias), dim=dim, **({"fused": True} if target else {}))
        data_bytes = serialization.to_bytes(nnx.to_pure_dict(nnx.state(source)))
        state = nnx.state(fresh)
        nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), data_bytes))
        nnx.update(fresh, state)
        assert_close(channels_first(layer, fresh(xs)), expected, "float64", "forward", what=f"loaded, fused={target}")


@pytest.mark.parametrize(("label", "dim"), [("linear", 0), ("conv2d", 1), ("conv2d", 3), ("embedding", 0)])
def test_remove_gives_the_plain_layer_holding_w(label, dim):
    layer = CASES[label]
    weight, bias, x, _ = data(layer)
    xs = flax_input(layer, x)
    plain, variables = linen_plain(layer, weight, bias)
    module, wrapped = xnorm.wrap(plain, dim=dim, variables=variables, fused=True)
    assert xnorm.is_wrapped(module)
    params = dict(wrapped["params"])
    params[weight_name(layer) + "_g"] = params[weight_name(layer) + "_g"] * 1.5  # w != the original weight
    g = canonical(layer, params[weight_name(layer) + "_g"])
    v = canonical(layer, params[weight_name(layer) + "_v"])
    w = reference.weight_norm(g, v, dim)
    removed, removed_vars = xnorm.remove(module, {"params": params})
    assert type(removed) is type(plain) and not xnorm.is_wrapped(removed)
    assert sorted(removed_vars["params"]) == sorted(variables["params"])
    assert_close(canonical(layer, removed_vars["params"][weight_name(layer)]), w, "float64", "weight")
    expected = layers.forward(layer, w, bias, x)
    assert_close(channels_first(layer, removed.apply(removed_vars, xs)), expected, "float64", "forward")

    nnx_module = xnorm.wrap(nnx_plain(layer, weight, bias), dim=dim, fused=True)
    assert xnorm.is_wrapped(nnx_module)
    g_param = getattr(nnx_module, weight_name(layer) + "_g")
    g_param.set_value(g_param.get_value() * 1.5)
    removed_nnx = xnorm.remove(nnx_module)
    assert type(removed_nnx) is type(nnx_layer(layer, "float64")) and not xnorm.is_wrapped(removed_nnx)
    assert_close(canonical(layer, getattr(removed_nnx, weight_name(layer)).get_value()), w, "float64", "weight")
    assert_close(channels_first(layer, removed_nnx(xs)), expected, "float64", "forward")


def test_linen_model_trains_like_the_non_fused_one():
    class MLP(nn.Module):
        fused: bool

        @nn.compact
        def __call__(self, x):
            options = {"fused": True} if self.fused else {}
            x = jnp.tanh(xnorm.wrap(nn.Dense(8, param_dtype=jnp.float64), dim=0, **options)(x))
            return xnorm.wrap(nn.Dense(3, param_dtype=jnp.float64), dim=1, **options)(x)

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 6)))
    target = jnp.asarray(rng.standard_normal((4, 3)))
    params = MLP(False).init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, MLP(True).init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, params)
    tx = optax.sgd(0.1)
    trained = {}
    for fused in (False, True):
        model = MLP(fused)

        @jax.jit
        def step(p, opt_state, model=model):
            grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2))(p)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        p, opt_state = params, tx.init(params)
        for _ in range(5):
            p, opt_state = step(p, opt_state)
        trained[fused] = p
    for a, b in zip(jax.tree.leaves(trained[True]), jax.tree.leaves(trained[False]), strict=True):
        assert_close(a, b, "float64", "training", what="fused vs plain MLP after 5 steps")


def test_input_given_by_keyword():
    layer = CASES["linear"]
    weight, bias, x, _ = data(layer)
    g, v = reference.init(weight, 1)
    expected = layers.forward(layer, reference.weight_norm(g, v, 1), bias, x)
    plain, variables = linen_plain(layer, weight, bias)
    module, wrapped = xnorm.wrap(plain, dim=1, variables=variables, fused=True)
    assert_close(module.apply(wrapped, inputs=flax_input(layer, x)), expected, "float64", "forward")
    nnx_module = xnorm.wrap(nnx_plain(layer, weight, bias), dim=1, fused=True)
    assert_close(nnx_module(inputs=flax_input(layer, x)), expected, "float64", "forward")


BAD = {
    "dim-too-big": (dict(dim=2), DimError),
    "dim-bool": (dict(dim=True), DimError),
    "missing-name": (dict(name="weight"), MissingParameterError),
    "negative-eps": (dict(eps=-1.0), OptionError),
    "unknown-option": (dict(bogus=1), OptionError),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_errors_are_the_non_fused_ones_and_change_nothing(case):
    kwargs, error = BAD[case]
    x = jnp.ones((2, 3), jnp.float32)
    module = nn.Dense(4)
    variables = module.init(jax.random.key(0), x)
    saved = jax.tree.map(np.array, variables)
    messages = []
    for fused in ({}, {"fused": True}):
        with pytest.raises(error) as raised:
            xnorm.wrap(module, variables=variables, **kwargs, **fused)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)

    layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    before = np.array(layer.kernel.get_value())
    messages = []
    for fused in ({}, {"fused": True}):
        with pytest.raises(error) as raised:
            xnorm.wrap(layer, **kwargs, **fused)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    np.testing.assert_array_equal(np.asarray(layer.kernel.get_value()), before)


def test_wrapping_a_fused_wrapper_twice_and_a_bad_fused_value():
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(xnorm.wrap(nn.Dense(4), fused=True), fused=True)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(xnorm.wrap(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), fused=True))
    with pytest.raises(OptionError, match="fused"):
        xnorm.wrap(nn.Dense(4), fused="yes")
    from xnorm._backends.flax import FlaxBackend
    from xnorm.spec import WeightNorm

    with pytest.raises(OptionError, match="fused"):  # the backend checks it too when called directly
        FlaxBackend().wrap(nn.Dense(4), WeightNorm(), fused=1)


def test_the_docs_fused_snippet_runs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "flax.md").read_text()
    section = text.split("## Fused path", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "docs/flax.md's 'Fused path' section has one python snippet"
    exec(compile(blocks[0], "docs/flax.md:fused", "exec"), {})  # noqa: S102


def test_benchmark_smoke_run(tmp_path, monkeypatch):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_flax.py"
    spec = importlib.util.spec_from_file_location("bench_flax", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "platforms", lambda: ["cpu"])
    assert bench.main(["--quick", "--sizes", "linear-64", "--orthogonal-sizes", "linear-256", "--spectral-sizes",
                       "linear-64", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "flax.json").read_text())["rows"]
    found = {(row["group"], row["task"], row["variant"]) for row in rows}
    for api, native in (("linen", "native:linen.WeightNorm"), ("nnx", "native:nnx.WeightNorm")):
        for variant in ("plain", "xnorm", "xnorm-fused", native):
            assert (f"{api}/cpu", "train", variant) in found
        for variant in ("plain", "removed", "xnorm", "xnorm-fused", native):
            assert (f"{api}/cpu", "inference", variant) in found
        for orthogonal_map in ("matrix_exp", "cayley", "householder"):
            for variant in ("plain", "xnorm"):
                assert (f"{api}/cpu/orth-{orthogonal_map}", "train", variant) in found
        for variant in ("plain", "xnorm", native.replace("WeightNorm", "SpectralNorm")):
            assert (f"{api}/cpu/spectral", "train", variant) in found
    assert all(len(row["per_call_ms"]) == 2 and min(row["per_call_ms"]) > 0 for row in rows)
