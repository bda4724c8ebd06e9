"""Spectral normalization in Flax (linen and NNX) against torch's own ``parametrizations.spectral_norm``
and the float64 NumPy reference: outputs, gradients and u, v over several training-mode calls, eval
mode leaving the state alone, the initial draws, low precision, removal, and every refusal.

Torch's weights and state are put into the Flax wrapper, so both run from the same W, u and v; the
canonical (torch) view of each Flax kernel is written out here, not taken from the backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx
from flax_trees import assert_same, snapshot
from torch.nn.utils import parametrizations

import xnorm
from xnorm import reference_spectral
from xnorm._backends.flax import spectral as spectral_module
from xnorm.conformance.adapters.flax import linen_layer, nnx_layer
from xnorm.conformance.adapters.torch import build_torch_layer
from xnorm.conformance.cases import LAYERS, LayerCase
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, NonFloatingParameterError, OptionError
from xnorm.spec import SPECTRAL_INIT_ITERATIONS, LayerKind

CASES = {layer.label: layer for layer in LAYERS}
TORCH_LABELS = ("linear", "conv1d", "conv2d-g2-s2-nobias", "conv_transpose1d", "embedding")
# torch's spectral_norm options: the default dim (1 for ConvTranspose), and the other channel axis with 3 iterations
OPTIONS = {"default": {}, "other-dim-n3": {"n_power_iterations": 3}}
LR = 0.1
STEPS = 3
X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)), jnp.float64)
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


# ------------------------------------------------------------------------------------------------
# Layouts and data, by hand
# ------------------------------------------------------------------------------------------------
def to_canonical(layer: LayerCase, kernel) -> np.ndarray:
    """A Flax kernel as torch's weight: Dense (in, out) -> (out, in); Conv (*k, in/g, out) and
    ConvTranspose(transpose_kernel=True) (*k, out, in) -> the last two axes first, swapped."""
    kernel = np.asarray(kernel, np.float64)
    if layer.kind == LayerKind.EMBEDDING:
        return kernel
    n = kernel.ndim - 2
    return np.transpose(kernel, (n + 1, n) + tuple(range(n)))


def to_flax(layer: LayerCase, weight: np.ndarray) -> np.ndarray:
    if layer.kind == LayerKind.EMBEDDING:
        return weight
    n = weight.ndim - 2
    return np.transpose(weight, tuple(range(2, n + 2)) + (1, 0))


def options_for(layer: LayerCase, label: str) -> dict:
    options = dict(OPTIONS[label])
    if label != "default":
        options["dim"] = 0 if layer.kind in LayerKind.CONV_TRANSPOSE else 1
    return options


def inputs(layer: LayerCase, seed: int = 1):
    """``(x, grad_y)`` in torch's layout (N, C, *spatial), integer indices for Embedding."""
    rng = np.random.default_rng(seed)
    if layer.kind == LayerKind.EMBEDDING:
        x = rng.integers(0, layer.weight_shape[0], size=layer.input_shape)
    else:
        x = rng.standard_normal(layer.input_shape)
    with torch.no_grad():
        y = build_torch_layer(layer).double()(torch.from_numpy(x))
    return x, rng.standard_normal(tuple(y.shape))


def channels_last(layer: LayerCase, array):
    if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
        array = np.moveaxis(np.asarray(array), 1, -1)
    return jnp.asarray(array)


def channels_first(layer: LayerCase, array) -> np.ndarray:
    array = np.asarray(array, np.float64)
    if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
        array = np.moveaxis(array, -1, 1)
    return array


def torch_twin(layer: LayerCase, options: dict) -> torch.nn.Module:
    """torch's own spectral norm on a float64 layer of ``layer``, in training mode."""
    torch.manual_seed(0)
    module = build_torch_layer(layer).double()
    parametrizations.spectral_norm(module, **options)
    return module


def torch_state(module: torch.nn.Module) -> dict:
    sn = module.parametrizations.weight[0]
    return {"u": sn._u.detach().numpy().copy(), "v": sn._v.detach().numpy().copy()}


def torch_training_step(module: torch.nn.Module, x: np.ndarray, grad_y: np.ndarray):
    """A training-mode call, its gradients (W, bias) for dL/dy = grad_y, then SGD on them."""
    y = module(torch.from_numpy(x))
    y.backward(torch.from_numpy(grad_y))
    original = module.parametrizations.weight.original
    grads = {"weight": original.grad.numpy().copy()}
    if getattr(module, "bias", None) is not None:
        grads["bias"] = module.bias.grad.numpy().copy()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter -= LR * parameter.grad
    module.zero_grad(set_to_none=True)
    return y.detach().numpy(), grads


def assert_matches(actual, expected, what: str) -> None:
    """float64 against float64: only the order of summation differs."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-9, atol=1e-12, err_msg=what)


# ------------------------------------------------------------------------------------------------
# linen against torch
# ------------------------------------------------------------------------------------------------
def linen_twin(layer: LayerCase, module: torch.nn.Module, options: dict):
    """xnorm's linen wrapper holding torch's W, bias, u and v."""
    weight = module.parametrizations.weight.original.detach().numpy()
    name = "embedding" if layer.kind == LayerKind.EMBEDDING else "kernel"
    params = {name: jnp.asarray(to_flax(layer, weight))}
    if getattr(module, "bias", None) is not None:
        params["bias"] = jnp.asarray(module.bias.detach().numpy())
    plain = linen_layer(layer, "float64")
    wrapper, variables = xnorm.spectral_norm(plain, **options, variables={"params": params}, rngs=0)
    state = torch_state(module)
    variables["batch_stats"] = {f"{name}_u": jnp.asarray(state["u"]), f"{name}_v": jnp.asarray(state["v"])}
    return wrapper, variables, name


@pytest.mark.parametrize("option_label", sorted(OPTIONS))
@pytest.mark.parametrize("label", TORCH_LABELS)
def test_linen_training_and_eval_match_torch(label, option_label):
    layer = CASES[label]
    options = options_for(layer, option_label)
    theirs = torch_twin(layer, options)
    wrapper, variables, name = linen_twin(layer, theirs, options)
    x, grad_y = inputs(layer)
    fx, fgrad_y = channels_last(layer, x), channels_last(layer, grad_y)

    @jax.jit
    def training_step(variables):
        def call(params):
            variables_in = {"params": params, "batch_stats": variables["batch_stats"]}
            return wrapper.apply(variables_in, fx, update_stats=True, mutable=["batch_stats"])

        y, vjp, state = jax.vjp(call, variables["params"], has_aux=True)
        grads = vjp(fgrad_y)[0]
        params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
        return y, grads, {"params": params, **state}

    for step in range(1, STEPS + 1):
        y_torch, grads_torch = torch_training_step(theirs, x, grad_y)
        y, grads, variables = training_step(variables)
        assert_matches(channels_first(layer, y), y_torch, f"output, training call {step}")
        assert_matches(to_canonical(layer, grads[f"{name}_orig"]), grads_torch["weight"], f"dL/dW, call {step}")
        if "bias" in grads_torch:
            assert_matches(grads["bias"], grads_torch["bias"], f"dL/dbias, call {step}")
        state = torch_state(theirs)
        assert_matches(variables["batch_stats"][f"{name}_u"], state["u"], f"u after call {step}")
        assert_matches(variables["batch_stats"][f"{name}_v"], state["v"], f"v after call {step}")

    theirs.eval()
    with torch.no_grad():
        y_torch = theirs(torch.from_numpy(x)).numpy()
    before = jax.tree.map(np.array, variables["batch_stats"])
    y_eval = jax.jit(lambda v: wrapper.apply(v, fx, update_stats=False))(variables)
    assert_matches(channels_first(layer, y_eval), y_torch, "eval-mode output")
    for key, value in before.items():
        np.testing.assert_array_equal(variables["batch_stats"][key], value, err_msg=f"{key} moved in eval mode")


# ------------------------------------------------------------------------------------------------
# NNX against torch
# ------------------------------------------------------------------------------------------------
@nnx.jit
def nnx_training_step(model, optimizer, x, grad_y):
    def loss(m):
        y = m(x)
        return jnp.sum(y * grad_y), y

    grads, y = nnx.grad(loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return y, grads


@nnx.jit
def nnx_call(model, x):
    return model(x)


@pytest.mark.parametrize("option_label", sorted(OPTIONS))
@pytest.mark.parametrize("label", ("linear", "conv2d-g2-s2-nobias", "conv_transpose1d"))
def test_nnx_training_and_eval_match_torch(label, option_label):
    layer = CASES[label]
    options = options_for(layer, option_label)
    theirs = torch_twin(layer, options)
    plain = nnx_layer(layer, "float64")
    plain.kernel.set_value(jnp.asarray(to_flax(layer, theirs.parametrizations.weight.original.detach().numpy())))
    if layer.bias:
        plain.bias.set_value(jnp.asarray(theirs.bias.detach().numpy()))
    model = xnorm.spectral_norm(plain, **options, rngs=nnx.Rngs(0))
    state = torch_state(theirs)
    model.kernel_u.set_value(jnp.asarray(state["u"]))
    model.kernel_v.set_value(jnp.asarray(state["v"]))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)  # u and v are BatchStats: not trained
    x, grad_y = inputs(layer)
    fx, fgrad_y = channels_last(layer, x), channels_last(layer, grad_y)

    for step in range(1, STEPS + 1):
        y_torch, grads_torch = torch_training_step(theirs, x, grad_y)
        y, grads = nnx_training_step(model, optimizer, fx, fgrad_y)
        assert set(nnx.to_pure_dict(grads)) == ({"kernel_orig", "bias"} if layer.bias else {"kernel_orig"})
        assert_matches(channels_first(layer, y), y_torch, f"output, training call {step}")
        assert_matches(to_canonical(layer, grads["kernel_orig"].get_value()), grads_torch["weight"], f"dL/dW {step}")
        original = theirs.parametrizations.weight.original.detach().numpy()
        assert_matches(to_canonical(layer, model.kernel_orig.get_value()), original, f"W after step {step}")
        state = torch_state(theirs)
        assert_matches(model.kernel_u.get_value(), state["u"], f"u after call {step}")
        assert_matches(model.kernel_v.get_value(), state["v"], f"v after call {step}")

    theirs.eval()
    model.eval()
    assert model.use_running_average
    with torch.no_grad():
        y_torch = theirs(torch.from_numpy(x)).numpy()
    before = {key: np.array(getattr(model, key).get_value()) for key in ("kernel_u", "kernel_v")}
    assert_matches(channels_first(layer, nnx_call(model, fx)), y_torch, "eval-mode output")
    for key, value in before.items():
        np.testing.assert_array_equal(getattr(model, key).get_value(), value, err_msg=f"{key} moved in eval mode")


# ------------------------------------------------------------------------------------------------
# The initial state, against the NumPy reference
# ------------------------------------------------------------------------------------------------
def reference_initial_state(weight: np.ndarray, dim: int, key) -> tuple:
    """The documented draws (u from the key's first split, v from its second), normalized and iterated
    15 times, in float64 NumPy."""
    h, w = reference_spectral.matrix_view(weight, dim).shape
    key_u, key_v = jax.random.split(key)
    u0 = np.asarray(jax.random.normal(key_u, (h,), jnp.float64))
    v0 = np.asarray(jax.random.normal(key_v, (w,), jnp.float64))
    return reference_spectral.init_state(weight, u0, v0, dim, 1e-12)


def test_initial_state_is_the_keys_draws_iterated_fifteen_times():
    key = jax.random.key(7)
    layer = CASES["conv_transpose1d"]  # default dim 1: u has the out/groups entries
    kernel = jnp.asarray(np.random.default_rng(1).standard_normal(to_flax(layer, np.zeros(layer.weight_shape)).shape))
    weight = to_canonical(layer, kernel)
    u_ref, v_ref = reference_initial_state(weight, 1, key)
    # the check can tell 15 iterations from 16
    u_16, _ = reference_spectral.power_iteration(weight, u_ref, v_ref, 1, 1, 1e-12)
    assert not np.allclose(u_16, u_ref, rtol=1e-7, atol=1e-7) and SPECTRAL_INIT_ITERATIONS == 15

    plain = nnx_layer(layer, "float64")
    plain.kernel.set_value(kernel)
    nnx_model = xnorm.spectral_norm(plain, rngs=key)
    assert nnx_model.kernel_u.get_value().shape == (layer.weight_shape[1],)
    assert_close(nnx_model.kernel_u.get_value(), u_ref, "float64", "weight", what="NNX u at wrap")
    assert_close(nnx_model.kernel_v.get_value(), v_ref, "float64", "weight", what="NNX v at wrap")

    _, variables = xnorm.spectral_norm(
        linen_layer(layer, "float64"), variables={"params": {"kernel": kernel}}, rngs=key
    )
    assert_close(variables["batch_stats"]["kernel_u"], u_ref, "float64", "weight", what="linen u at wrap")
    assert_close(variables["batch_stats"]["kernel_v"], v_ref, "float64", "weight", what="linen v at wrap")


@pytest.mark.parametrize("rows, cols", [(1, 1), (5, 63), (64, 65), (127, 2), (130, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initial_draws_are_the_keys_draws_of_exactly_h_and_w_values(rows, cols, dtype):
    # the draws are made at a rounded-up size and cut; what is kept must be jax.random.normal's draw of
    # h and of w values from the key's two splits, bit for bit, on both sides of each size class's edge
    key = jax.random.key(11)
    key_u, key_v = jax.random.split(key)
    for count, draw_key in ((rows, key_u), (cols, key_v)):
        size = spectral_module._draw_size(count, key)
        assert size >= count
        drawn = np.asarray(spectral_module._standard_normal(draw_key, size, jnp.dtype(dtype)))[:count]
        np.testing.assert_array_equal(drawn, np.asarray(jax.random.normal(draw_key, (count,), jnp.dtype(dtype))))


def test_initial_draws_share_one_program_per_size_class_and_keep_exact_sizes_for_other_generators():
    spectral_module._standard_normal.clear_cache()
    for features in (3, 5, 9, 17, 33):
        xnorm.spectral_norm(nnx.Linear(7, features, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), rngs=0)
    # u of 3..33 entries and v of 7: all in the smallest size class, one float64 program
    assert spectral_module._standard_normal._cache_size() == 1
    # a generator whose draws are not prefixes of longer ones is drawn at the exact size
    assert spectral_module._draw_size(5, jax.random.key(0, impl="rbg")) == 5
    # singular values 1, 0.95, 0.9: 15 iterations leave u and v far from converged, so they tell draws apart
    left, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 3)))
    right, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((3, 3)))
    weight = left @ np.diag([1.0, 0.95, 0.9]) @ right.T
    with jax.threefry_partitionable(False):
        assert spectral_module._draw_size(5, jax.random.key(0)) == 5
        u_ref, v_ref = reference_initial_state(weight, 0, jax.random.key(2))
        model = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        model.kernel.set_value(jnp.asarray(weight.T))
        wrapped = xnorm.spectral_norm(model, rngs=jax.random.key(2))
    assert_close(wrapped.kernel_u.get_value(), u_ref, "float64", "weight", what="u at wrap, non-partitionable threefry")
    assert_close(wrapped.kernel_v.get_value(), v_ref, "float64", "weight", what="v at wrap, non-partitionable threefry")


def test_linen_init_in_training_mode_iterates_once_more():
    wrapper = xnorm.spectral_norm(nn.Dense(4, **F64), n_power_iterations=2)
    eval_init = wrapper.init(jax.random.key(0), X, update_stats=False)
    train_init = wrapper.init(jax.random.key(0), X, update_stats=True)
    np.testing.assert_array_equal(eval_init["params"]["kernel_orig"], train_init["params"]["kernel_orig"])
    weight = np.asarray(eval_init["params"]["kernel_orig"]).T
    stats = eval_init["batch_stats"]
    u_ref, v_ref = reference_spectral.power_iteration(weight, stats["kernel_u"], stats["kernel_v"], 0, 2, 1e-12)
    assert_close(train_init["batch_stats"]["kernel_u"], u_ref, "float64", "weight", what="u after a training init")
    assert_close(train_init["batch_stats"]["kernel_v"], v_ref, "float64", "weight", what="v after a training init")
    assert_close(np.linalg.norm(stats["kernel_u"]), 1.0, "float64", "weight", what="||u|| at init")


# ------------------------------------------------------------------------------------------------
# Modes, removal, precision, models
# ------------------------------------------------------------------------------------------------
def random_nnx_linear(dtype=jnp.float64, seed=0) -> nnx.Linear:
    return nnx.Linear(6, 4, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def test_nnx_eval_mode_never_iterates_and_removal_follows_the_mode():
    model = xnorm.spectral_norm(random_nnx_linear(), rngs=nnx.Rngs(1))
    weight = np.asarray(model.kernel_orig.get_value()).T
    u, v = (np.array(model.kernel_u.get_value()), np.array(model.kernel_v.get_value()))

    model.eval()
    y_eval = nnx_call(model, X)
    np.testing.assert_array_equal(model.kernel_u.get_value(), u)
    np.testing.assert_array_equal(model.kernel_v.get_value(), v)
    w_eval = reference_spectral.spectral_norm(weight, u, v, 0, 1e-12)
    assert_close(np.asarray(y_eval), np.asarray(X) @ w_eval.T + np.asarray(model.bias.get_value()), "float64",
                 "forward", what="eval output")
    assert_close(xnorm.remove(model).kernel.get_value().T, w_eval, "float64", "weight", what="removed in eval mode")
    np.testing.assert_array_equal(model.kernel_u.get_value(), u)

    model.train()
    w_train, u_next, v_next = reference_spectral.training_call(weight, u, v, 0, 1, 1e-12)
    plain = xnorm.remove(model)
    assert type(plain) is nnx.Linear and not hasattr(plain, "kernel_u")
    assert_close(plain.kernel.get_value().T, w_train, "float64", "weight", what="removed in training mode")
    assert_close(model.kernel_u.get_value(), u_next, "float64", "weight", what="u after a training-mode removal")


def test_nnx_view_and_a_parent_models_eval_reach_the_wrapper():
    class Model(nnx.Module):
        def __init__(self):
            self.fc = xnorm.spectral_norm(random_nnx_linear(), rngs=nnx.Rngs(1))
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(2), **F64)

        def __call__(self, x):
            return self.head(self.fc(x))

    model = Model()
    assert not model.fc.use_running_average
    assert nnx.view(model, use_running_average=True).fc.use_running_average
    model.eval()
    assert model.fc.use_running_average
    u = np.array(model.fc.kernel_u.get_value())
    nnx_call(model, X)
    np.testing.assert_array_equal(model.fc.kernel_u.get_value(), u)
    model.train()
    nnx_call(model, X)
    assert not np.array_equal(model.fc.kernel_u.get_value(), u)
    assert xnorm.remove(model) is model and type(model.fc) is nnx.Linear


def test_linen_in_a_compact_model_keeps_u_and_v_in_batch_stats():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = xnorm.spectral_norm(nn.Dense(4, **F64))(x, update_stats=train)
            return nn.Dense(2, **F64)(x)

    model = Model()
    variables = model.init(jax.random.key(0), X, train=False)
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes["batch_stats"] == {"Dense_0": {"kernel_u": (4,), "kernel_v": (6,)}}
    assert set(shapes["params"]["Dense_0"]) == {"kernel_orig", "bias"} and "Dense_1" in shapes["params"]
    stats = variables["batch_stats"]["Dense_0"]

    y_eval = jax.jit(lambda v: model.apply(v, X, train=False))(variables)
    _, updated = jax.jit(lambda v: model.apply(v, X, train=True, mutable=["batch_stats"]))(variables)
    weight = np.asarray(variables["params"]["Dense_0"]["kernel_orig"]).T
    u_ref, _ = reference_spectral.power_iteration(weight, stats["kernel_u"], stats["kernel_v"], 0, 1, 1e-12)
    assert_close(updated["batch_stats"]["Dense_0"]["kernel_u"], u_ref, "float64", "weight", what="u after a call")
    w = reference_spectral.spectral_norm(weight, stats["kernel_u"], stats["kernel_v"], 0, 1e-12)
    hidden = np.asarray(X) @ w.T + np.asarray(variables["params"]["Dense_0"]["bias"])
    head = variables["params"]["Dense_1"]
    assert_close(y_eval, hidden @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), "float64", "forward",
                 what="model output in eval mode")
    with pytest.raises(OptionError, match="mutable"):
        model.apply(variables, X, train=True)


def test_linen_removal_follows_update_stats():
    wrapper = xnorm.spectral_norm(nn.Dense(4, **F64))
    variables = wrapper.init(jax.random.key(0), X, update_stats=False)
    weight = np.asarray(variables["params"]["kernel_orig"]).T
    u, v = variables["batch_stats"]["kernel_u"], variables["batch_stats"]["kernel_v"]
    for update_stats, iterations in ((False, 0), (True, 1)):
        plain, plain_variables = xnorm.remove(wrapper, variables, update_stats=update_stats)
        assert type(plain) is nn.Dense and set(plain_variables) == {"params"}
        u_used, v_used = reference_spectral.power_iteration(weight, u, v, 0, iterations, 1e-12)
        expected = reference_spectral.spectral_norm(weight, u_used, v_used, 0, 1e-12)
        assert_close(np.asarray(plain_variables["params"]["kernel"]).T, expected, "float64", "weight",
                     what=f"w removed with update_stats={update_stats}")
    with pytest.raises(OptionError, match="update_stats"):
        xnorm.remove(wrapper, variables)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_keeps_the_state_in_float32_and_casts_w_once(dtype):
    jdtype = jnp.dtype(dtype)
    model = xnorm.spectral_norm(random_nnx_linear(jnp.float32), rngs=nnx.Rngs(1))
    low = xnorm.spectral_norm(random_nnx_linear(jdtype), rngs=nnx.Rngs(1))
    assert low.kernel_orig.get_value().dtype == jdtype
    assert low.kernel_u.get_value().dtype == jnp.float32 and low.kernel_v.get_value().dtype == jnp.float32
    weight = np.asarray(low.kernel_orig.get_value().astype(jnp.float32)).T
    u, v = np.asarray(low.kernel_u.get_value()), np.asarray(low.kernel_v.get_value())
    w = low.weight()
    assert w.dtype == jdtype
    expected = reference_spectral.spectral_norm(weight, u, v, 0, 1e-12, dtype=dtype)
    assert_close(np.asarray(w.astype(jnp.float32)).T, expected, dtype, "weight", what=f"{dtype} w")
    y = nnx_call(low, X.astype(jdtype))
    assert y.dtype == jdtype and model.kernel_u.get_value().dtype == jnp.float32
    _, u_next, _ = reference_spectral.training_call(weight, u, v, 0, 1, 1e-12, dtype=dtype)
    assert_close(low.kernel_u.get_value(), u_next, "float32", "weight", what=f"u after a {dtype} training call")


def test_one_dimensional_weight_is_normalized_without_state():
    wrapper = xnorm.spectral_norm(nn.Dense(4, **F64), name="bias")
    variables = wrapper.init(jax.random.key(0), X, update_stats=True)
    assert set(variables) == {"params"} and "bias_orig" in variables["params"]
    params = {**variables["params"], "bias_orig": jnp.asarray([3.0, 0.0, 4.0, 0.0])}
    y = wrapper.apply({"params": params}, X, update_stats=True, mutable=["batch_stats"])[0]
    expected = np.asarray(X) @ np.asarray(params["kernel"]) + np.array([0.6, 0.0, 0.8, 0.0])
    assert_close(y, expected, "float64", "forward", what="output with a normalized bias")


# ------------------------------------------------------------------------------------------------
# Flax's own SpectralNorm departs from the definition
# ------------------------------------------------------------------------------------------------
def test_flax_linen_spectral_norm_iterates_in_eval_mode_xnorm_does_not():
    """With ``update_stats=False`` Flax's linen SpectralNorm still runs its power iteration (from the
    stored u, without storing it), so its eval output is the *next* training call's, not the last
    one's; xnorm's eval output is exactly its last training-mode output (torch's semantics)."""
    rng = np.random.default_rng(3)
    q1, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    q2, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    kernel = jnp.asarray(q1[:, :4] @ np.diag([1.0, 0.9, 0.5, 0.2]) @ q2.T)  # slow convergence: 0.9 per iteration

    theirs = nn.SpectralNorm(nn.Dense(4, **F64))
    their_vars = theirs.init(jax.random.key(0), X, update_stats=False)
    their_vars["params"]["layer_instance"]["kernel"] = kernel
    y_train, state = theirs.apply(their_vars, X, update_stats=True, mutable=["batch_stats"])
    their_vars = {**their_vars, **state}
    y_eval = theirs.apply(their_vars, X, update_stats=False)
    y_next_train, _ = theirs.apply(their_vars, X, update_stats=True, mutable=["batch_stats"])
    assert not np.allclose(y_eval, y_train, rtol=1e-6, atol=0)  # eval moved on...
    np.testing.assert_array_equal(y_eval, y_next_train)  # ...by exactly one more iteration

    plain_variables = {"params": {"kernel": kernel, "bias": jnp.zeros(4, jnp.float64)}}
    ours, our_vars = xnorm.spectral_norm(nn.Dense(4, **F64), variables=plain_variables, rngs=0)
    y_train, state = ours.apply(our_vars, X, update_stats=True, mutable=["batch_stats"])
    our_vars = {**our_vars, **state}
    y_eval = ours.apply(our_vars, X, update_stats=False)
    np.testing.assert_array_equal(y_eval, y_train)
    stats = our_vars["batch_stats"]
    w = reference_spectral.spectral_norm(np.asarray(kernel).T, stats["kernel_u"], stats["kernel_v"], 0, 1e-12)
    expected = np.asarray(X) @ w.T
    assert_close(y_eval, expected, "float64", "forward", what="xnorm eval output")


def test_flax_nnx_spectral_norm_overwrites_the_kernel_xnorm_does_not():
    layer = random_nnx_linear()
    kernel = np.array(layer.kernel.get_value())
    theirs = nnx.SpectralNorm(nnx.clone(layer), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    theirs(X)
    assert not np.allclose(theirs.layer_instance.kernel.get_value(), kernel)  # now holds W / sigma

    ours = xnorm.spectral_norm(layer, rngs=nnx.Rngs(0))
    nnx_call(ours, X)
    np.testing.assert_array_equal(ours.kernel_orig.get_value(), kernel)
    np.testing.assert_array_equal(layer.kernel.get_value(), kernel)


# ------------------------------------------------------------------------------------------------
# Refusals: each leaves the layer and its variables as they were
# ------------------------------------------------------------------------------------------------


LINEN_REFUSALS = {
    # id: (spec options, wrap options, entries added to the params, error, message)
    "dim-out-of-range": (dict(dim=2), dict(rngs=0), (), DimError, "out of range"),
    "dim-float": (dict(dim=0.5), dict(rngs=0), (), DimError, "dim must be"),
    "spectral-wrapped-variables": ({}, dict(rngs=0), ("kernel_orig",), AlreadyWrappedError, "kernel_orig"),
    "weight-normed-variables": ({}, dict(rngs=0), ("kernel_g",), AlreadyWrappedError, "kernel_g"),
    "no-rngs": ({}, {}, (), OptionError, "rngs="),
    "bad-rngs": ({}, dict(rngs="seed"), (), OptionError, "rngs must be"),
    "fused": ({}, dict(rngs=0, fused=True), (), OptionError, "fused"),
}


@pytest.mark.parametrize("case", sorted(LINEN_REFUSALS))
def test_linen_refusals_change_nothing(case):
    spec_options, options, extra, error, message = LINEN_REFUSALS[case]
    variables = nn.Dense(4).init(jax.random.key(0), jnp.ones((2, 6), jnp.float32))
    variables = {"params": {**variables["params"], **{key: jnp.ones(()) for key in extra}}}
    saved = snapshot(variables)
    with pytest.raises(error, match=message):
        xnorm.wrap(nn.Dense(4), xnorm.SpectralNorm(**spec_options), variables=variables, **options)
    assert_same(variables, saved)


def test_linen_refusals_without_variables():
    with pytest.raises(NonFloatingParameterError, match="floating"):
        xnorm.spectral_norm(nn.Dense(4, param_dtype=jnp.int32))
    with pytest.raises(DimError):
        xnorm.spectral_norm(nn.Conv(4, (3,)), dim=3)
    with pytest.raises(OptionError, match="rngs="):
        xnorm.spectral_norm(nn.Dense(4), rngs=0)
    for wrapped in (nn.SpectralNorm(nn.Dense(4)), nn.WeightNorm(nn.Dense(4)), xnorm.spectral_norm(nn.Dense(4)),
                    xnorm.wrap(nn.Dense(4))):
        with pytest.raises(AlreadyWrappedError, match="already"):
            xnorm.spectral_norm(wrapped)
    wrapper = xnorm.spectral_norm(nn.Dense(4))
    with pytest.raises(OptionError, match="update_stats"):
        wrapper.init(jax.random.key(0), X)
    integer = {"params": {"kernel": jnp.ones((6, 4), jnp.int32), "bias": jnp.zeros(4, jnp.int32)}}
    saved = snapshot(integer)
    with pytest.raises(NonFloatingParameterError):
        xnorm.spectral_norm(nn.Dense(4), variables=integer, rngs=0)
    assert_same(integer, saved)


def test_nnx_refusals_change_nothing():
    layer = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    saved = snapshot(nnx.to_pure_dict(nnx.state(layer)))
    rngs = nnx.Rngs(5)
    rng_counts = snapshot(nnx.to_pure_dict(nnx.state(rngs, nnx.RngCount)))
    refusals = [
        (dict(dim=2, rngs=rngs), DimError),
        (dict(dim=-3, rngs=rngs), DimError),
        (dict(), OptionError),  # no rngs
        (dict(rngs=rngs, variables={}), OptionError),
    ]
    for options, error in refusals:
        with pytest.raises(error):
            xnorm.spectral_norm(layer, **options)
    with pytest.raises(OptionError, match="rngs="):
        xnorm.wrap(layer, rngs=rngs)  # weight norm draws nothing
    assert_same(nnx.to_pure_dict(nnx.state(layer)), saved)
    assert_same(nnx.to_pure_dict(nnx.state(rngs, nnx.RngCount)), rng_counts)  # no key was drawn

    integer = nnx.Linear(6, 4, param_dtype=jnp.int32, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    with pytest.raises(NonFloatingParameterError):
        xnorm.spectral_norm(integer, rngs=rngs)
    for wrapped in (nnx.SpectralNorm(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)),
                    xnorm.spectral_norm(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rngs=0),
                    xnorm.wrap(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))):
        with pytest.raises(AlreadyWrappedError, match="already"):
            xnorm.spectral_norm(wrapped, rngs=rngs)
    with pytest.raises(OptionError):
        xnorm.remove(xnorm.spectral_norm(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rngs=0), update_stats=True)

    class HoldsAnOriginal(nnx.Module):  # a layer whose kernel already has spectral norm's W beside it
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((6, 4)))
            self.kernel_orig = nnx.Param(jnp.ones((6, 4)))

    with pytest.raises(AlreadyWrappedError, match="kernel_orig"):
        xnorm.spectral_norm(HoldsAnOriginal(), rngs=rngs)


# ------------------------------------------------------------------------------------------------
# docs/flax.md
# ------------------------------------------------------------------------------------------------
def test_the_docs_spectral_norm_example_runs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "flax.md").read_text()
    section = text.split("## Spectral normalization\n", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(snippet, "docs/flax.md:spectral-normalization", "exec"), namespace)  # noqa: S102
    assert type(namespace["plain_layer"]) is nnx.Linear and type(namespace["plain"]) is nn.Dense
    assert set(namespace["plain_variables"]["params"]) == {"kernel", "bias"}
