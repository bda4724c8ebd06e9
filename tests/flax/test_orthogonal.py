"""The orthogonal parametrization in Flax (linen and NNX) against torch's own
``parametrizations.orthogonal`` and the float64 NumPy reference: weight, output and gradient of
``original`` from the same ``original`` and ``base``, the registration rules, the completion's RNG,
training that keeps the weight orthogonal and never trains ``base``, jit, removal, and every refusal.

Torch runs in float64 from the values the Flax layer holds (float32 ones included), so a float32 Flax
result is checked against an exact one, with the float32 tolerance. The canonical (torch) view of each
Flax kernel is written out here, not taken from the backend.
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
from xnorm import reference_orthogonal as ref
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, NonFloatingParameterError, OptionError

MAPS = ("matrix_exp", "cayley", "householder")
#: canonical (torch) weight shapes: square, tall, wide, and a Conv2d's batch of six 3x3 kernels
SHAPES = {"linear-square": (5, 5), "linear-tall": (6, 3), "linear-wide": (3, 6), "conv2d": (3, 2, 3, 3)}
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


# ------------------------------------------------------------------------------------------------
# Layouts and layers, by hand
# ------------------------------------------------------------------------------------------------
def to_flax(weight) -> np.ndarray:
    """torch's Linear (out, in) -> Dense (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out)."""
    weight = np.asarray(weight)
    return weight.T if weight.ndim == 2 else np.transpose(weight, (2, 3, 1, 0))


def to_canonical(kernel) -> np.ndarray:
    kernel = np.asarray(kernel, np.float64)
    return kernel.T if kernel.ndim == 2 else np.transpose(kernel, (3, 2, 0, 1))


def matrices_orthogonal(canonical: np.ndarray) -> np.ndarray:
    """``Q^T Q`` (tall view) of every matrix of a canonical weight, to compare with I."""
    tall = canonical if canonical.shape[-2] >= canonical.shape[-1] else np.swapaxes(canonical, -1, -2)
    return np.swapaxes(tall, -1, -2) @ tall


def torch_layer(label: str) -> torch.nn.Module:
    shape = SHAPES[label]
    if len(shape) == 2:
        return torch.nn.Linear(shape[1], shape[0]).double()
    return torch.nn.Conv2d(shape[1], shape[0], 3, padding=1).double()


def linen_layer(label: str, dtype) -> nn.Module:
    shape = SHAPES[label]
    common = dict(dtype=dtype, param_dtype=dtype)
    if len(shape) == 2:
        return nn.Dense(shape[0], **common)
    return nn.Conv(shape[0], (3, 3), padding=[(1, 1), (1, 1)], **common)


def nnx_layer(label: str, dtype) -> nnx.Module:
    shape = SHAPES[label]
    common = dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if len(shape) == 2:
        return nnx.Linear(shape[1], shape[0], **common)
    return nnx.Conv(shape[1], shape[0], (3, 3), padding=[(1, 1), (1, 1)], **common)


def torch_input(label: str, rng) -> np.ndarray:
    shape = SHAPES[label]
    return rng.standard_normal((2, shape[1]) if len(shape) == 2 else (2, shape[1], 4, 4))


def to_flax_io(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else np.moveaxis(array, 1, -1)


def to_torch_io(array) -> np.ndarray:
    array = np.asarray(array, np.float64)
    return array if array.ndim == 2 else np.moveaxis(array, -1, 1)


def rounded(array: np.ndarray, dtype) -> np.ndarray:
    return np.array(jnp.asarray(array, dtype), np.float64)  # a writable copy: torch.from_numpy wants one


# ------------------------------------------------------------------------------------------------
# Against torch: the same original and base give the same weight, output and gradient
# ------------------------------------------------------------------------------------------------
def _torch_case(label, orthogonal_map, trivialization, dtype, seed=0):
    """torch's own parametrization (float64) on a weight exactly representable in ``dtype``, and the
    values every framework continues from: ``(layer, weight, bias, original, base, x, grad_y)``."""
    rng = np.random.default_rng(seed)
    layer = torch_layer(label)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rounded(rng.standard_normal(SHAPES[label]), dtype)))
        layer.bias.copy_(torch.from_numpy(rounded(rng.standard_normal(layer.bias.shape), dtype)))
    weight, bias = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    torch.manual_seed(seed)
    parametrizations.orthogonal(layer, orthogonal_map=orthogonal_map, use_trivialization=trivialization)
    parametrization = layer.parametrizations.weight
    # Training moves original away from -I (where every map is I): a random original exercises the maps
    with torch.no_grad():
        parametrization.original.copy_(
            torch.from_numpy(rounded(0.5 * rng.standard_normal(SHAPES[label]), dtype))
        )
    base = parametrization[0].base.detach().numpy().copy() if trivialization else None
    if base is not None:
        base = rounded(base, dtype)
        with torch.no_grad():
            parametrization[0].base.copy_(torch.from_numpy(base))
    original = parametrization.original.detach().numpy().copy()
    x = rounded(torch_input(label, rng), dtype)
    with torch.no_grad():
        y_shape = layer(torch.from_numpy(x)).shape
    grad_y = rounded(rng.standard_normal(tuple(y_shape)), dtype)
    return layer, weight, bias, original, base, x, grad_y


def _torch_results(layer, x, grad_y):
    """``(w, y, dL/doriginal)`` of torch's own layer for ``L = sum(y * grad_y)``."""
    layer.zero_grad()
    y = layer(torch.from_numpy(x))
    (y * torch.from_numpy(grad_y)).sum().backward()
    w = layer.weight.detach().numpy()
    return w, y.detach().numpy(), layer.parametrizations.weight.original.grad.numpy()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("trivialization", [True, False], ids=["trivialized", "direct"])
@pytest.mark.parametrize("orthogonal_map", (*MAPS, None), ids=(*MAPS, "default"))
@pytest.mark.parametrize("label", list(SHAPES))
def test_linen_and_nnx_match_torch_and_the_reference(label, orthogonal_map, trivialization, dtype):
    jdtype = DTYPES[dtype]
    layer, weight, bias, original, base, x, grad_y = _torch_case(label, orthogonal_map, trivialization, dtype)
    w_torch, y_torch, grad_torch = _torch_results(layer, x, grad_y)
    # None: torch's default, read from torch's shape (matrix_exp for the Conv's square 3x3 kernels)
    assert_close(w_torch, ref.forward(original, orthogonal_map, base), "float64", "weight", what="torch's w")
    params = {"kernel": jnp.asarray(to_flax(weight), jdtype), "bias": jnp.asarray(bias, jdtype)}
    xf, gyf = jnp.asarray(to_flax_io(x), jdtype), jnp.asarray(to_flax_io(grad_y), jdtype)

    # linen: the registered variables, then torch's original and base put in
    module, variables = xnorm.orthogonal(
        linen_layer(label, jdtype), orthogonal_map, use_trivialization=trivialization,
        variables={"params": params}, rngs=0,
    )
    params = {**variables["params"], "kernel_orig": jnp.asarray(to_flax(original), jdtype)}
    variables = {**variables, "params": params}
    if trivialization:
        variables["batch_stats"] = {"kernel_base": jnp.asarray(base, jdtype)}
    w = xnorm._backends.flax.linen_weight(module, variables)
    y, vjp = jax.vjp(lambda p: module.apply({**variables, "params": p}, xf), params)
    grads = vjp(gyf)[0]
    linen = (w, y, grads["kernel_orig"])

    # NNX: the same
    wrapper = xnorm.orthogonal(nnx_layer(label, jdtype), orthogonal_map, use_trivialization=trivialization, rngs=0)
    wrapper.kernel_orig.set_value(jnp.asarray(to_flax(original), jdtype))
    wrapper.bias.set_value(jnp.asarray(bias, jdtype))
    if trivialization:
        wrapper.kernel_base.set_value(jnp.asarray(base, jdtype))
    y = wrapper(xf)
    grads = nnx.grad(lambda m: jnp.sum(m(xf) * gyf))(wrapper)
    nnx_results = (wrapper.weight(), y, grads["kernel_orig"].get_value())

    for api, (w, y, grad) in (("linen", linen), ("nnx", nnx_results)):
        assert w.dtype == jdtype and y.dtype == jdtype
        assert_close(to_canonical(w), w_torch, dtype, "weight", what=f"{api} w")
        assert_close(to_torch_io(y), y_torch, dtype, "forward", what=f"{api} output")
        assert_close(to_canonical(grad), grad_torch, dtype, "gradient", what=f"{api} dL/doriginal")


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def _registered_nnx(label, orthogonal_map, trivialization, weight, dtype=jnp.float64, rngs=0):
    layer = nnx_layer(label, dtype)
    layer.kernel.set_value(jnp.asarray(to_flax(weight), dtype))
    wrapper = xnorm.orthogonal(layer, orthogonal_map, use_trivialization=trivialization, rngs=rngs)
    original = to_canonical(wrapper.kernel_orig.get_value())
    base = np.asarray(wrapper.kernel_base.get_value(), np.float64) if trivialization else None
    return wrapper, original, base


def _registered_linen(label, orthogonal_map, trivialization, weight, dtype=jnp.float64, rngs=0):
    params = {"kernel": jnp.asarray(to_flax(weight), dtype), "bias": jnp.zeros(SHAPES[label][0], dtype)}
    module, variables = xnorm.orthogonal(
        linen_layer(label, dtype), orthogonal_map, use_trivialization=trivialization,
        variables={"params": params}, rngs=rngs,
    )
    original = to_canonical(variables["params"]["kernel_orig"])
    base = np.asarray(variables["batch_stats"]["kernel_base"], np.float64) if trivialization else None
    return (module, variables), original, base


REGISTER = {"nnx": _registered_nnx, "linen": _registered_linen}


@pytest.mark.parametrize("api", list(REGISTER))
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("label", list(SHAPES))
def test_trivialized_registration_sets_minus_identity_and_the_qr_of_the_weight(api, label, orthogonal_map):
    weight = np.random.default_rng(3).standard_normal(SHAPES[label])
    _, original, base = REGISTER[api](label, orthogonal_map, True, weight)
    tall = weight if weight.shape[-2] >= weight.shape[-1] else np.swapaxes(weight, -1, -2)
    n, k = tall.shape[-2:]
    minus_eye = np.zeros(weight.shape)
    minus_eye[..., np.arange(min(n, k)), np.arange(min(n, k))] = -1.0
    np.testing.assert_array_equal(original, minus_eye)
    assert base.shape == weight.shape[:-2] + (n, n)
    assert_close(np.swapaxes(base, -1, -2) @ base, np.broadcast_to(np.eye(n), base.shape), "float64", "weight",
                 what="base^T base")
    # the first k columns are the weight's own QR Q; the completion only fills the others
    assert_close(base[..., :k], ref.make_orthogonal(tall)[..., :k], "float64", "weight", what="base[:, :k]")


@pytest.mark.parametrize("api", list(REGISTER))
def test_a_square_orthogonal_weight_is_kept_as_base_and_a_square_weight_matches_torchs_base(api):
    q = ref.make_orthogonal(np.random.default_rng(4).standard_normal((5, 5)))
    # a kept base is the weight itself, not a QR of it (whose signs and rounding would differ)
    flipped = q * np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    _, _, base = REGISTER[api]("linear-square", "cayley", True, flipped)
    np.testing.assert_array_equal(base, flipped)
    weight = np.random.default_rng(5).standard_normal((5, 5))
    layer = torch_layer("linear-square")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    parametrizations.orthogonal(layer, orthogonal_map="cayley")
    _, _, base = REGISTER[api]("linear-square", "cayley", True, weight)
    assert_close(base, layer.parametrizations.weight[0].base.numpy(), "float64", "weight", what="base vs torch's")


@pytest.mark.parametrize("api", list(REGISTER))
@pytest.mark.parametrize("label", list(SHAPES))
def test_direct_registration_is_torchs(api, label):
    """householder stores the weight's QR reflectors (the weight becomes its Q); matrix_exp and cayley keep
    the weight as original."""
    weight = np.random.default_rng(6).standard_normal(SHAPES[label])
    for orthogonal_map in MAPS:
        layer = torch_layer(label)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
        parametrizations.orthogonal(layer, orthogonal_map=orthogonal_map, use_trivialization=False)
        wrapped, original, base = REGISTER[api](label, orthogonal_map, False, weight)
        assert base is None
        expected = layer.parametrizations.weight.original.detach().numpy()
        assert_close(original, expected, "float64", "weight", what=f"{orthogonal_map} original vs torch's")
        assert_close(original, ref.register(weight, orthogonal_map, use_trivialization=False)[0], "float64",
                     "weight", what=f"{orthogonal_map} original vs the reference")
        w = wrapped.weight() if api == "nnx" else xnorm._backends.flax.linen_weight(*wrapped)
        assert_close(to_canonical(w), layer.weight.detach().numpy(), "float64", "weight", what=f"{orthogonal_map} w")


def test_the_completion_comes_from_the_rng():
    weight = np.random.default_rng(7).standard_normal((6, 3))
    bases = {}
    for api in REGISTER:
        for seed in (0, 1):
            bases[api, seed] = REGISTER[api]("linear-tall", "householder", True, weight, rngs=seed)[2]
    # the same seed draws the same columns (an int seed is jax.random.key(seed) for both APIs) ...
    np.testing.assert_array_equal(bases["nnx", 0], bases["linen", 0])
    _, _, from_key = _registered_nnx("linear-tall", "householder", True, weight, rngs=jax.random.key(0))
    np.testing.assert_array_equal(from_key, bases["nnx", 0])
    # ... which are drawn N(0, 1) as jax.random.normal draws them
    completion = np.asarray(jax.random.normal(jax.random.key(0), (6, 3), jnp.float64))
    expected = ref.make_orthogonal(np.concatenate([weight, completion], axis=-1))
    assert_close(bases["nnx", 0], expected, "float64", "weight", what="base from the key's draws")
    # another seed, other columns
    assert not np.allclose(bases["nnx", 0][:, 3:], bases["nnx", 1][:, 3:])
    # an nnx.Rngs gives the next key of its params stream, as Flax layers take it
    rngs = nnx.Rngs(params=0)
    _, _, from_rngs = _registered_nnx("linear-tall", "householder", True, weight, rngs=rngs)
    completion = np.asarray(jax.random.normal(nnx.Rngs(params=0).params(), (6, 3), jnp.float64))
    expected = ref.make_orthogonal(np.concatenate([weight, completion], axis=-1))
    assert_close(from_rngs, expected, "float64", "weight", what="base from the nnx.Rngs' params stream")
    assert int(rngs.params.count.get_value()) == 1


def test_linen_init_registers_the_layers_initial_weight_drawing_from_the_params_rng():
    x = jnp.ones((2, 3), jnp.float64)
    module = xnorm.orthogonal(nn.Dense(6, param_dtype=jnp.float64))  # canonical (6, 3): tall
    variables = module.init(jax.random.key(0), x)
    again = module.init(jax.random.key(0), x)
    other = module.init(jax.random.key(1), x)
    assert set(variables["params"]) == {"kernel_orig", "bias"} and set(variables["batch_stats"]) == {"kernel_base"}
    assert_same(again, snapshot(variables))
    assert not np.allclose(variables["batch_stats"]["kernel_base"], other["batch_stats"]["kernel_base"])
    base = np.asarray(variables["batch_stats"]["kernel_base"])
    assert_close(np.swapaxes(base, -1, -2) @ base, np.eye(6), "float64", "weight", what="base^T base")
    w = to_canonical(xnorm._backends.flax.linen_weight(module, variables))
    assert_close(w, base[:, :3], "float64", "weight", what="w right after init (the map of -I is I)")


# ------------------------------------------------------------------------------------------------
# Training, state, jit
# ------------------------------------------------------------------------------------------------
def _target(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float64)


@pytest.mark.parametrize("trivialization", [True, False], ids=["trivialized", "direct"])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("label", ["linear-wide", "conv2d"])
def test_nnx_training_keeps_every_matrix_orthogonal_and_never_trains_base(label, orthogonal_map, trivialization):
    rng = np.random.default_rng(8)
    wrapper = xnorm.orthogonal(nnx_layer(label, jnp.float64), orthogonal_map, use_trivialization=trivialization,
                               rngs=0)
    x = jnp.asarray(to_flax_io(torch_input(label, rng)), jnp.float64)
    target = _target(rng, wrapper(x).shape)
    assert set(nnx.state(wrapper, nnx.Param)) == {"kernel_orig", "bias"}
    base = np.asarray(wrapper.kernel_base.get_value()) if trivialization else None
    start = np.asarray(wrapper.kernel_orig.get_value())
    optimizer = nnx.Optimizer(wrapper, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(wrapper, optimizer)) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert not np.allclose(np.asarray(wrapper.kernel_orig.get_value()), start)
    if trivialization:
        np.testing.assert_array_equal(np.asarray(wrapper.kernel_base.get_value()), base)
    w = to_canonical(wrapper.weight())
    product = matrices_orthogonal(w)
    assert_close(product, np.broadcast_to(np.eye(product.shape[-1]), product.shape), "float64", "weight",
                 what="Q^T Q after training")
    assert_close(w, ref.forward(to_canonical(wrapper.kernel_orig.get_value()), orthogonal_map, base), "float64",
                 "weight", what="w after training vs the reference")


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_linen_training_with_optax_keeps_the_weight_orthogonal_and_base_read_only(orthogonal_map):
    rng = np.random.default_rng(9)
    module = xnorm.orthogonal(nn.Conv(3, (3, 3), param_dtype=jnp.float64), orthogonal_map)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 2)), jnp.float64)
    variables = module.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    saved_stats = snapshot(stats)
    target = _target(rng, module.apply(variables, x).shape)
    tx = optax.adam(0.05)
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state):
        # no mutable=: a call only reads base
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((module.apply({"params": p, "batch_stats": stats}, x) - target) ** 2)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert_same(stats, saved_stats)
    w = to_canonical(xnorm._backends.flax.linen_weight(module, {"params": params, "batch_stats": stats}))
    product = matrices_orthogonal(w)  # every 3x3 kernel slice of torch's (out, in) batch
    assert product.shape == (3, 2, 3, 3)
    assert_close(product, np.broadcast_to(np.eye(3), product.shape), "float64", "weight", what="Q^T Q")


def test_nnx_train_and_eval_change_nothing_and_jit_matches_eager():
    rng = np.random.default_rng(10)
    wrapper = xnorm.orthogonal(nnx_layer("conv2d", jnp.float32), "cayley", rngs=0)
    wrapper.kernel_orig.set_value(jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 2)), jnp.float32)
    eager = np.asarray(wrapper(x))
    wrapper.eval()
    np.testing.assert_array_equal(np.asarray(wrapper(x)), eager)
    wrapper.train()
    jitted = np.asarray(nnx.jit(lambda m, x: m(x))(wrapper, x))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_linen_under_jit_init_and_apply():
    x = jnp.ones((2, 5), jnp.float32)
    module = xnorm.orthogonal(nn.Dense(5), "matrix_exp")
    variables = jax.jit(module.init)(jax.random.key(0), x)
    eager = module.apply(variables, x)
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)(variables, x)), np.asarray(eager), rtol=1e-6,
                               atol=1e-6)
    w = to_canonical(xnorm._backends.flax.linen_weight(module, variables))
    assert_close(w @ w.T, np.eye(5), "float32", "weight", what="w w^T")


def test_linen_in_a_compact_model_keeps_base_in_batch_stats():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return xnorm.orthogonal(nn.Dense(4, param_dtype=jnp.float64), "householder")(x)

    x = jnp.ones((2, 6), jnp.float64)
    variables = Model().init(jax.random.key(0), x)
    assert set(variables["params"]["Dense_0"]) == {"kernel_orig", "bias"}
    assert set(variables["batch_stats"]["Dense_0"]) == {"kernel_base"}
    assert variables["batch_stats"]["Dense_0"]["kernel_base"].shape == (6, 6)  # canonical (4, 6): n = 6
    Model().apply(variables, x)


def test_low_precision_computes_in_float32_and_casts_w_once():
    wrapper = xnorm.orthogonal(nnx_layer("linear-tall", jnp.bfloat16), "cayley", rngs=0)
    assert wrapper.kernel_orig.get_value().dtype == jnp.bfloat16
    assert wrapper.kernel_base.get_value().dtype == jnp.float32
    original = np.asarray(wrapper.kernel_orig.get_value(), np.float64)
    base = np.asarray(wrapper.kernel_base.get_value(), np.float64)
    w = wrapper.weight()
    assert w.dtype == jnp.bfloat16
    expected = rounded(ref.forward(to_canonical(original), "cayley", base), jnp.bfloat16)
    np.testing.assert_allclose(to_canonical(w), expected, atol=np.finfo(np.float32).eps * 8)


# ------------------------------------------------------------------------------------------------
# remove
# ------------------------------------------------------------------------------------------------
def test_linen_remove_gives_the_plain_layer_with_the_orthogonal_weight():
    rng = np.random.default_rng(11)
    (module, variables), _, _ = _registered_linen("linear-wide", "matrix_exp", True, rng.standard_normal((3, 6)))
    variables = {**variables, "params": {**variables["params"],
                                         "kernel_orig": jnp.asarray(rng.standard_normal((6, 3)), jnp.float64)}}
    x = jnp.asarray(rng.standard_normal((2, 6)), jnp.float64)
    w = xnorm._backends.flax.linen_weight(module, variables)
    with pytest.raises(OptionError, match="no keyword options"):
        xnorm.remove(module, variables, update_stats=True)
    plain, plain_variables = xnorm.remove(module, variables)
    assert isinstance(plain, nn.Dense) and not xnorm.is_wrapped(plain)
    assert set(plain_variables) == {"params"} and set(plain_variables["params"]) == {"kernel", "bias"}
    np.testing.assert_array_equal(np.asarray(plain_variables["params"]["kernel"]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(plain.apply(plain_variables, x)), np.asarray(module.apply(variables, x)))
    canonical = to_canonical(w)
    assert_close(canonical @ canonical.T, np.eye(3), "float64", "weight", what="rows orthonormal")


def test_nnx_remove_gives_the_plain_layer_with_the_orthogonal_weight():
    class Model(nnx.Module):
        def __init__(self):
            self.fc = xnorm.orthogonal(nnx_layer("linear-tall", jnp.float64), "cayley", rngs=0)

    model = Model()
    model.fc.kernel_orig.set_value(jnp.asarray(np.random.default_rng(12).standard_normal((3, 6)), jnp.float64))
    w = np.asarray(model.fc.weight())
    assert xnorm.remove(model) is model
    assert isinstance(model.fc, nnx.Linear) and set(nnx.state(model.fc)) == {"kernel", "bias"}
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()), w)
    product = matrices_orthogonal(to_canonical(w))
    assert_close(product, np.eye(3), "float64", "weight", what="Q^T Q after remove")


def test_the_whole_model_linen_remove_handles_orthogonal_wrappers():
    class Model(nn.Module):
        wrap: bool = True

        def setup(self):
            dense = nn.Dense(4, param_dtype=jnp.float64)
            self.fc = xnorm.orthogonal(dense, "cayley") if self.wrap else dense

        def __call__(self, x):
            return self.fc(x)

    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 4)), jnp.float64)
    model = Model()
    variables = model.init(jax.random.key(0), x)
    view, plain_variables = xnorm.remove(model, variables)
    assert "batch_stats" not in plain_variables
    assert jax.tree.map(jnp.shape, plain_variables) == jax.tree.map(jnp.shape, Model(wrap=False).init(
        jax.random.key(0), x))
    expected = np.asarray(model.apply(variables, x))
    np.testing.assert_array_equal(np.asarray(view.apply(plain_variables, x)), expected)
    np.testing.assert_array_equal(np.asarray(Model(wrap=False).apply(plain_variables, x)), expected)


# ------------------------------------------------------------------------------------------------
# Refusals: each leaves the layer and its variables as they were
# ------------------------------------------------------------------------------------------------
def _linen_plain(label="linear-tall", dtype=jnp.float64):
    module = linen_layer(label, dtype)
    shape = SHAPES[label]
    x = jnp.ones((1, shape[1]) if len(shape) == 2 else (1, 4, 4, shape[1]), dtype)
    return module, module.init(jax.random.key(0), x)


def test_linen_refusals_change_nothing():
    module, variables = _linen_plain()
    saved = snapshot(variables)
    with pytest.raises(DimError, match="at least 2 axes"):
        xnorm.orthogonal(module, name="bias", variables=variables, rngs=0)
    with pytest.raises(OptionError, match="orthogonal_map must be one of"):
        xnorm.orthogonal(module, "qr", variables=variables, rngs=0)
    with pytest.raises(OptionError, match="pass rngs="):
        xnorm.orthogonal(module, variables=variables)  # a tall weight needs its completion drawn
    with pytest.raises(OptionError, match="completing a non-square weight"):
        xnorm.orthogonal(module, variables=variables, rngs="seed")
    with pytest.raises(NonFloatingParameterError):
        complex_params = {**variables["params"], "kernel": variables["params"]["kernel"].astype(jnp.complex64)}
        xnorm.orthogonal(module, "householder", variables={"params": complex_params}, rngs=0)
    assert_same(variables, saved)
    wrapper, wrapped = xnorm.orthogonal(module, variables=variables, rngs=0)
    saved_wrapped = snapshot(wrapped)
    with pytest.raises(AlreadyWrappedError):
        xnorm.orthogonal(wrapper, variables=wrapped, rngs=0)
    with pytest.raises(AlreadyWrappedError, match="kernel_orig"):
        xnorm.orthogonal(module, variables=wrapped, rngs=0)
    assert_same(wrapped, saved_wrapped)
    assert_same(variables, saved)
    # a square weight draws nothing, so it needs no rngs
    square, square_variables = _linen_plain("linear-square")
    xnorm.orthogonal(square, variables=square_variables)


def test_linen_refusals_without_variables():
    with pytest.raises(DimError, match="at least 2 axes"):
        xnorm.orthogonal(nn.Dense(3), name="bias")
    with pytest.raises(OptionError, match="rngs= is for xnorm.wrap"):
        xnorm.orthogonal(nn.Dense(3), rngs=0)
    with pytest.raises(NonFloatingParameterError):
        xnorm.orthogonal(nn.Dense(3, param_dtype=jnp.complex64))
    with pytest.raises(AlreadyWrappedError):
        xnorm.orthogonal(xnorm.orthogonal(nn.Dense(3)))
    module, variables = _linen_plain("linear-tall")
    wrapper, wrapped = xnorm.orthogonal(module, variables=variables, rngs=0)
    with pytest.raises(xnorm.errors.MissingParameterError, match="batch_stats"):
        wrapper.apply({"params": wrapped["params"]}, jnp.ones((1, 3), jnp.float64))


def test_nnx_refusals_change_nothing():
    layer = nnx_layer("linear-tall", jnp.float64)
    saved = snapshot(nnx.to_pure_dict(nnx.state(layer)))

    def unchanged():
        assert_same(nnx.to_pure_dict(nnx.state(layer)), saved)

    with pytest.raises(DimError, match="at least 2 axes"):
        xnorm.orthogonal(layer, name="bias", rngs=0)
    with pytest.raises(OptionError, match="orthogonal_map must be one of"):
        xnorm.orthogonal(layer, "qr", rngs=0)
    rngs = nnx.Rngs(0)
    with pytest.raises(OptionError, match="pass rngs="):
        xnorm.orthogonal(layer)
    with pytest.raises(OptionError, match="variables= is for linen"):
        xnorm.orthogonal(layer, variables={}, rngs=rngs)
    with pytest.raises(DimError):
        xnorm.orthogonal(layer, name="bias", rngs=rngs)
    assert int(rngs.params.count.get_value()) == 0  # nothing drawn before a refusal
    unchanged()
    complex_layer = nnx.Linear(3, 6, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))
    with pytest.raises(NonFloatingParameterError):
        xnorm.orthogonal(complex_layer, "householder", rngs=0)
    wrapper = xnorm.orthogonal(layer, rngs=0)
    unchanged()  # wrapping copies: the layer keeps its own kernel
    with pytest.raises(AlreadyWrappedError):
        xnorm.orthogonal(wrapper, rngs=0)
    # a square weight draws nothing, so it needs no rngs: torch's square 3x3 kernels too, whatever Flax's
    # last two axes (in, out) are
    xnorm.orthogonal(nnx_layer("linear-square", jnp.float64))
    xnorm.orthogonal(nnx_layer("conv2d", jnp.float64))


# ------------------------------------------------------------------------------------------------
# docs/flax.md
# ------------------------------------------------------------------------------------------------
def test_the_docs_orthogonal_example_runs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "flax.md").read_text()
    section = text.split("## Orthogonal parametrization\n", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(snippet, "docs/flax.md:orthogonal-parametrization", "exec"), namespace)  # noqa: S102
    assert type(namespace["plain"]) is nn.Dense and type(namespace["plain_conv"]) is nnx.Conv
    assert set(namespace["plain_variables"]) == {"params"}
    assert set(namespace["plain_variables"]["params"]) == {"kernel", "bias"}


def test_no_gradient_reaches_base_even_when_differentiating_every_collection():
    module = xnorm.orthogonal(nn.Dense(4, param_dtype=jnp.float64), "matrix_exp")
    x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 6)), jnp.float64)
    variables = module.init(jax.random.key(0), x)
    grads = jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
    np.testing.assert_array_equal(np.asarray(grads["batch_stats"]["kernel_base"]), 0.0)
    assert np.any(np.asarray(grads["params"]["kernel_orig"]) != 0.0)
