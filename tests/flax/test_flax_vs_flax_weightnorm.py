"""What Flax's own WeightNorm gets wrong, next to xnorm getting it right.

Each pair of assertions checks the same property on flax.linen.WeightNorm / flax.nnx.WeightNorm (which
fails it, flax 0.12) and on xnorm's wrapper (which has it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import xnorm
from xnorm import reference
from xnorm.conformance.tolerances import assert_close, compare, tolerance

X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)), jnp.float64)
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def close(a, b, quantity="forward"):
    return compare(np.asarray(a), np.asarray(b), *tolerance("float64", quantity))["passed"]


def test_linen_wrapping_preserves_the_function_flax_does_not():
    dense = nn.Dense(4, **F64)
    existing = dense.init(jax.random.key(0), X)  # a trained layer, say
    expected = dense.apply(existing, X)

    # flax: the only way in is to put the kernel under layer_instance; its scale is ones, so the
    # layer computes with kernel / ||kernel|| instead of kernel
    theirs = nn.WeightNorm(nn.Dense(4, **F64))
    their_vars = theirs.init(jax.random.key(1), X)
    np.testing.assert_array_equal(their_vars["params"]["layer_instance/kernel/scale"], 1.0)
    their_vars = {"params": {**their_vars["params"], "layer_instance": existing["params"]}}
    assert not close(theirs.apply(their_vars, X), expected)

    ours, our_vars = xnorm.wrap(dense, variables=existing)
    assert_close(ours.apply(our_vars, X), expected, "float64", "forward", what="wrapped output")


def test_linen_init_is_function_preserving():
    ours = xnorm.wrap(nn.Dense(4, **F64))
    params = ours.init(jax.random.key(0), X)["params"]
    assert_close(
        params["kernel_g"],
        np.linalg.norm(np.asarray(params["kernel_v"]), axis=0, keepdims=True),
        "float64",
        "weight",
        what="g = ||v||",
    )
    plain = nn.Dense(4, **F64).apply({"params": {"kernel": params["kernel_v"], "bias": params["bias"]}}, X)
    assert_close(ours.apply({"params": params}, X), plain, "float64", "forward", what="wrapped output at init")


def test_nnx_wrapping_preserves_the_function_flax_does_not():
    layer = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64)
    expected = layer(X)
    theirs = nnx.WeightNorm(nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64), rngs=nnx.Rngs(1))
    assert not close(theirs(X), expected)
    assert_close(xnorm.wrap(layer)(X), expected, "float64", "forward", what="wrapped output")


def _sgd_step(model, lr=0.1):
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer)


def test_nnx_g_is_trained_flax_scale_is_not():
    theirs = nnx.WeightNorm(nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64), rngs=nnx.Rngs(1))
    scales_before = {k: np.array(v) for k, v in theirs.scales.items()}
    assert not nnx.state(theirs, nnx.Param).get("scales")  # not Params: invisible to nnx.Optimizer
    _sgd_step(theirs)
    for key, value in theirs.scales.items():
        np.testing.assert_array_equal(np.asarray(value), scales_before[key])

    layer = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64)
    ours = xnorm.wrap(layer, dim=0)
    g, v, b = (np.asarray(getattr(ours, k).get_value()) for k in ("kernel_g", "kernel_v", "bias"))
    _sgd_step(ours)
    # float64 reference step: dL/dw of mean(y**2), then the analytic weight-norm gradients
    w = reference.weight_norm(g.T, v.T, 0)
    y = np.asarray(X) @ w.T + b
    grad_y = 2 * y / y.size
    grad_g, grad_v = reference.weight_norm_grads(g.T, v.T, grad_y.T @ np.asarray(X), 0)
    assert not np.allclose(np.asarray(ours.kernel_g.get_value()), g)
    assert_close(np.asarray(ours.kernel_g.get_value()).T, g.T - 0.1 * grad_g, "float64", "training", what="g")
    assert_close(np.asarray(ours.kernel_v.get_value()).T, v.T - 0.1 * grad_v, "float64", "training", what="v")


def test_nnx_never_writes_into_the_wrapped_layer_flax_does():
    inner = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64)
    before = np.array(inner.kernel.get_value())
    theirs = nnx.WeightNorm(inner, rngs=nnx.Rngs(1))
    theirs(X)
    assert not np.array_equal(np.asarray(inner.kernel.get_value()), before)  # overwritten by kernel/||kernel||

    layer = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64)
    kernel, bias = np.array(layer.kernel.get_value()), np.array(layer.bias.get_value())
    ours = xnorm.wrap(layer)
    v_before = np.array(ours.kernel_v.get_value())
    ours(X)
    nnx.jit(lambda m, x: m(x))(ours, X)
    _sgd_step(ours)
    np.testing.assert_array_equal(np.asarray(layer.kernel.get_value()), kernel)
    np.testing.assert_array_equal(np.asarray(layer.bias.get_value()), bias)
    # calling never writes w into v either; only the optimizer changed it
    ours2 = xnorm.wrap(nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64))
    ours2(X)
    np.testing.assert_array_equal(np.asarray(ours2.kernel_v.get_value()), v_before)


def test_no_eps_by_default_flax_adds_one():
    # a zero kernel column: torch (and xnorm) give 0/0 = NaN, Flax silently gives 0 through its eps
    layer = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **F64)
    kernel = np.array(layer.kernel.get_value())
    kernel[:, 0] = 0.0
    layer.kernel.set_value(jnp.asarray(kernel))
    assert np.isnan(np.asarray(xnorm.wrap(layer).weight())[:, 0]).all()
    assert np.isfinite(np.asarray(xnorm.wrap(layer, eps=1e-12).weight())).all()
    theirs = nnx.WeightNorm(layer, rngs=nnx.Rngs(1))
    theirs(X)
    assert np.isfinite(np.asarray(layer.kernel.get_value())).all()
