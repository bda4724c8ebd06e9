"""The wrappers inside JAX/Flax machinery: jit, grad, vmap, optax, compact and setup models, nnx.jit.

Values are checked in float64 against xnorm.reference and conformance.layers (torch semantics).
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
from xnorm.conformance.tolerances import assert_close

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float64)
KEY = jax.random.key(0)


def dense_reference(params, dim, x):
    """Wrapped Dense output in float64: Flax kernel (in, out) is torch's weight transposed."""
    w = reference.weight_norm(np.asarray(params["kernel_g"]).T, np.asarray(params["kernel_v"]).T, dim)
    return np.asarray(x) @ w.T + np.asarray(params["bias"])


def test_jit_grad_and_optax_match_the_reference():
    module = xnorm.wrap(nn.Dense(4, **F64), dim=1)  # dim=1: one norm per input feature
    params = module.init(KEY, X)["params"]
    y = jax.jit(module.apply)({"params": params}, X)
    assert_close(y, dense_reference(params, 1, X), "float64", "forward", what="jitted output")

    grad_y = np.random.default_rng(1).standard_normal(y.shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, X) * grad_y)))(params)
    g, v = np.asarray(params["kernel_g"]).T, np.asarray(params["kernel_v"]).T
    grad_w = grad_y.T @ np.asarray(X)
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, 1)
    assert_close(np.asarray(grads["kernel_g"]).T, grad_g, "float64", "gradient", what="dL/dg")
    assert_close(np.asarray(grads["kernel_v"]).T, grad_v, "float64", "gradient", what="dL/dv")
    assert_close(grads["bias"], grad_y.sum(0), "float64", "gradient", what="dL/dbias")

    tx = optax.sgd(0.1)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert_close(np.asarray(new["kernel_g"]).T, g - 0.1 * grad_g, "float64", "training", what="g after optax")


def test_vmap_over_a_batch_of_parameters_and_inputs():
    module = xnorm.wrap(nn.Dense(4, **F64))
    keys = jax.random.split(KEY, 3)
    stacked = jax.vmap(lambda k: module.init(k, X))(keys)
    ys = jax.vmap(module.apply, in_axes=(0, None))(stacked, X)
    for i in range(3):
        params = jax.tree.map(lambda a, i=i: a[i], stacked["params"])
        assert_close(ys[i], dense_reference(params, 0, X), "float64", "forward", what=f"vmapped output {i}")
    per_example = jax.vmap(module.apply, in_axes=(None, 0))(module.init(KEY, X), X)
    assert_close(per_example, module.apply(module.init(KEY, X), X), "float64", "forward", what="vmap over x")


class CompactModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = xnorm.wrap(nn.Dense(8, **F64))(x)
        x = nn.relu(x)
        x = xnorm.wrap(nn.Dense(8, name="hidden", **F64), dim=None)(x)
        return nn.Dense(2, **F64)(x)


class SetupModel(nn.Module):
    def setup(self):
        self.first = xnorm.wrap(nn.Dense(8, **F64))
        self.hidden = xnorm.wrap(nn.Dense(8, **F64), dim=None)
        self.last = nn.Dense(2, **F64)

    def __call__(self, x):
        return self.last(self.hidden(nn.relu(self.first(x))))


def _model_reference(params, first, hidden, last, x):
    h = np.maximum(dense_reference(params[first], 0, x), 0)
    h = dense_reference(params[hidden], None, h)
    return h @ np.asarray(params[last]["kernel"]) + np.asarray(params[last]["bias"])


def test_compact_model_puts_g_and_v_at_the_layers_own_path():
    model = CompactModel()
    params = model.init(KEY, X)["params"]
    assert set(params) == {"Dense_0", "hidden", "Dense_1"}  # the names the unwrapped model would have
    assert set(params["Dense_0"]) == {"kernel_g", "kernel_v", "bias"}
    assert params["hidden"]["kernel_g"].shape == ()
    assert set(params["Dense_1"]) == {"kernel", "bias"}
    y = jax.jit(model.apply)({"params": params}, X)
    assert_close(
        y,
        _model_reference(params, "Dense_0", "hidden", "Dense_1", X),
        "float64",
        "forward",
        what="compact model output",
    )


def test_setup_model_and_training_with_optax():
    model = SetupModel()
    params = model.init(KEY, X)["params"]
    assert set(params) == {"first", "hidden", "last"}
    assert set(params["first"]) == {"kernel_g", "kernel_v", "bias"}
    assert_close(
        model.apply({"params": params}, X),
        _model_reference(params, "first", "hidden", "last", X),
        "float64",
        "forward",
        what="setup model output",
    )

    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    target = jnp.zeros((5, 2))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, X) - target) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(params["first"]["kernel_g"], model.init(KEY, X)["params"]["first"]["kernel_g"])


def test_nnx_jit_grad_and_optimizer_in_a_model():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.fc = xnorm.wrap(nnx.Linear(6, 8, rngs=rngs, **F64))
            self.out = nnx.Linear(8, 2, rngs=rngs, **F64)

        def __call__(self, x):
            return self.out(nnx.relu(self.fc(x)))

    model = Model(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params["fc"]) == {"kernel_g", "kernel_v", "bias"}
    h = np.maximum(dense_reference(params["fc"], 0, X), 0)
    expected = h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
    assert_close(nnx.jit(lambda m, x: m(x))(model, X), expected, "float64", "forward", what="nnx.jit output")

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.fc.kernel_g.get_value(), params["fc"]["kernel_g"])
