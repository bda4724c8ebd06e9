"""Parameter names and the dim mapping: dim is read in torch's layout for every Flax layer kind.

The canonical view of each Flax kernel is written out by hand here (not taken from the backend), and
g is checked against xnorm.reference and against torch's own weight_norm on the same weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm
from xnorm import reference
from xnorm.conformance.tolerances import assert_close


def canonical(kind: str, kernel: np.ndarray) -> np.ndarray:
    """Flax kernel -> torch's weight, by hand."""
    n = kernel.ndim - 2
    spatial = tuple(range(n))
    if kind == "dense":  # (in, out) -> (out, in)
        return kernel.T
    if kind in (
        "conv",
        "conv2d",
        "conv_transpose_t",
    ):  # (*k, in/g, out) -> (out, in/g, *k); (*k, out, in) -> (in, out, *k)
        return np.transpose(kernel, (n + 1, n) + spatial)
    if kind == "conv_transpose":  # (*k, in, out), used unflipped by lax -> torch's flipped (in, out, *k)
        return np.flip(np.transpose(kernel, (n, n + 1) + spatial), axis=tuple(range(2, n + 2)))
    return kernel  # embed: (num, features) both ways


def canonical_g(kind: str, g: np.ndarray) -> np.ndarray:
    return g if g.ndim == 0 else canonical(kind, g)


# kind -> (linen module, NNX module, input shape (Flax layout), torch module)
LAYERS = {
    "dense": (lambda: nn.Dense(4), lambda: nnx.Linear(6, 4, rngs=nnx.Rngs(0)), (3, 6), lambda: torch.nn.Linear(6, 4)),
    "conv": (
        lambda: nn.Conv(6, (3,), padding=[(1, 1)]),
        lambda: nnx.Conv(4, 6, (3,), padding=[(1, 1)], rngs=nnx.Rngs(0)),
        (2, 9, 4),
        lambda: torch.nn.Conv1d(4, 6, 3, padding=1),
    ),
    "conv2d": (
        lambda: nn.Conv(4, (3, 2), padding="VALID"),
        lambda: nnx.Conv(3, 4, (3, 2), padding="VALID", rngs=nnx.Rngs(0)),
        (2, 6, 5, 3),
        lambda: torch.nn.Conv2d(3, 4, (3, 2)),
    ),
    "conv_transpose": (
        lambda: nn.ConvTranspose(6, (3,), padding="VALID"),
        lambda: nnx.ConvTranspose(4, 6, (3,), padding="VALID", rngs=nnx.Rngs(0)),
        (2, 7, 4),
        lambda: torch.nn.ConvTranspose1d(4, 6, 3),
    ),
    "conv_transpose_t": (
        lambda: nn.ConvTranspose(6, (3,), padding=[(2, 2)], transpose_kernel=True),
        lambda: nnx.ConvTranspose(4, 6, (3,), padding=[(2, 2)], transpose_kernel=True, rngs=nnx.Rngs(0)),
        (2, 7, 4),
        lambda: torch.nn.ConvTranspose1d(4, 6, 3),
    ),
    "embed": (
        lambda: nn.Embed(10, 5),
        lambda: nnx.Embed(10, 5, rngs=nnx.Rngs(0)),
        (3, 4),
        lambda: torch.nn.Embedding(10, 5),
    ),
}
NDIM = {"dense": 2, "conv": 3, "conv2d": 4, "conv_transpose": 3, "conv_transpose_t": 3, "embed": 2}
WEIGHT = {"embed": "embedding"}


def flax_input(kind):
    shape = LAYERS[kind][2]
    if kind == "embed":
        return jnp.asarray(np.random.default_rng(0).integers(0, 10, shape), jnp.int32)
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float64)


def linen_plain(kind):
    module = LAYERS[kind][0]()
    variables = module.init(jax.random.key(1), flax_input(kind))
    return module, jax.tree.map(lambda a: a.astype(jnp.float64), variables)


def dims(kind):
    ndim = NDIM[kind]
    return sorted({0, 1, ndim - 1, -2, -1}) + [None]


CASES = [(kind, dim) for kind in LAYERS for dim in dims(kind)]
IDS = [f"{kind}-dim{dim}" for kind, dim in CASES]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_parameter_names(kind):
    name = WEIGHT.get(kind, "kernel")
    bias = {"bias"} if kind != "embed" else set()
    module, variables = linen_plain(kind)
    _, wrapped = xnorm.wrap(module, variables=variables)
    assert set(wrapped["params"]) == {f"{name}_g", f"{name}_v"} | bias
    fresh = xnorm.wrap(LAYERS[kind][0]()).init(jax.random.key(0), flax_input(kind))
    assert set(fresh["params"]) == {f"{name}_g", f"{name}_v"} | bias
    layer = xnorm.wrap(LAYERS[kind][1]())
    assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {f"{name}_g", f"{name}_v"} | bias


@pytest.mark.parametrize("kind, dim", CASES, ids=IDS)
def test_g_is_the_reference_norm_along_the_canonical_dim(kind, dim):
    name = WEIGHT.get(kind, "kernel")
    module, variables = linen_plain(kind)
    kernel = np.asarray(variables["params"][name])
    expected_g, _ = reference.init(canonical(kind, kernel), dim)

    _, wrapped = xnorm.wrap(module, dim=dim, variables=variables)
    g = np.asarray(wrapped["params"][f"{name}_g"])
    assert canonical_g(kind, g).shape == expected_g.shape
    assert_close(canonical_g(kind, g), expected_g, "float64", "weight", what="linen g")
    np.testing.assert_array_equal(np.asarray(wrapped["params"][f"{name}_v"]), kernel)

    layer = LAYERS[kind][1]()
    getattr(layer, name).set_value(jnp.asarray(kernel))
    g_nnx = np.asarray(getattr(xnorm.wrap(layer, dim=dim), f"{name}_g").get_value())
    assert_close(canonical_g(kind, g_nnx), expected_g, "float64", "weight", what="NNX g")


@pytest.mark.parametrize(
    "kind, dim",
    [c for c in CASES if c[0] != "embed" or c[1] is not None],
    ids=[i for c, i in zip(CASES, IDS, strict=True) if c[0] != "embed" or c[1] is not None],
)
def test_g_matches_torch_weight_norm_and_outputs_match_torch(kind, dim):
    name = WEIGHT.get(kind, "kernel")
    module, variables = linen_plain(kind)
    weight = canonical(kind, np.asarray(variables["params"][name]))
    torch_layer = LAYERS[kind][3]().double()
    with torch.no_grad():
        torch_layer.weight.copy_(torch.from_numpy(weight.copy()))
        if kind != "embed":
            torch_layer.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    torch_weight_norm(torch_layer, dim=-1 if dim is None else dim)
    wrapped_module, wrapped = xnorm.wrap(module, dim=dim, variables=variables)
    torch_g = torch_layer.parametrizations.weight.original0.detach().numpy()
    assert_close(
        canonical_g(kind, np.asarray(wrapped["params"][f"{name}_g"])), torch_g, "float64", "weight", what="g vs torch"
    )

    x = flax_input(kind)
    y = np.asarray(wrapped_module.apply(wrapped, x))
    torch_x = (
        torch.from_numpy(np.asarray(x)) if kind == "embed" else torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1))
    )
    torch_y = torch_layer(torch_x).detach().numpy()
    if kind not in ("dense", "embed"):
        torch_y = np.moveaxis(torch_y, 1, -1)
    assert_close(y, torch_y, "float64", "forward", what="wrapped output vs torch")
