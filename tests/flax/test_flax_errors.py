"""Bad inputs raise the documented xnorm errors and leave the module and its variables as they were."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax_trees import assert_same, snapshot

import xnorm
from xnorm.errors import (
    AlreadyWrappedError,
    BackendDetectionError,
    DimError,
    MissingParameterError,
    NonFloatingParameterError,
    NotWrappedError,
    OptionError,
    UnsupportedLayerError,
)
from xnorm.spec import Reparametrization

X = jnp.ones((2, 3), jnp.float32)




def linen_dense():
    module = nn.Dense(4)
    return module, module.init(jax.random.key(0), X)


def nnx_linear():
    return nnx.Linear(3, 4, rngs=nnx.Rngs(0))


def nnx_snapshot(module):
    return nnx.graphdef(module), snapshot(nnx.to_pure_dict(nnx.state(module)))


def assert_nnx_same(module, saved):
    graphdef, values = saved
    assert nnx.graphdef(module) == graphdef
    assert_same(nnx.to_pure_dict(nnx.state(module)), values)


BAD_LINEN = {
    "missing-name": (dict(name="weight"), MissingParameterError),
    "dim-too-big": (dict(dim=2), DimError),
    "dim-too-small": (dict(dim=-3), DimError),
    "dim-bool": (dict(dim=True), DimError),
    "dim-float": (dict(dim=1.0), DimError),
    "dim-str": (dict(dim="0"), DimError),
    "unknown-option": (dict(bogus=True), OptionError),
    "negative-eps": (dict(eps=-1.0), OptionError),
}


@pytest.mark.parametrize("with_variables", [False, True], ids=["module", "module+variables"])
@pytest.mark.parametrize("case", sorted(BAD_LINEN))
def test_linen_bad_inputs_raise_and_change_nothing(case, with_variables):
    kwargs, error = BAD_LINEN[case]
    module, variables = linen_dense()
    saved = snapshot(variables)
    before = repr(module)
    extra = dict(variables=variables) if with_variables else {}
    with pytest.raises(error):
        xnorm.wrap(module, backend="flax", **kwargs, **extra)
    assert repr(module) == before
    assert_same(variables, saved)


@pytest.mark.parametrize(
    "case",
    [
        "missing-name",
        "dim-too-big",
        "dim-too-small",
        "dim-bool",
        "dim-float",
        "unknown-option",
        "negative-eps",
        "variables-option",
    ],
)
def test_nnx_bad_inputs_raise_and_change_nothing(case):
    kwargs, error = {**BAD_LINEN, "variables-option": (dict(variables={}), OptionError)}[case]
    layer = nnx_linear()
    saved = nnx_snapshot(layer)
    with pytest.raises(error):
        xnorm.wrap(layer, **kwargs)
    assert_nnx_same(layer, saved)


def test_nnx_static_attribute_is_not_a_parameter():
    layer = nnx_linear()
    with pytest.raises(MissingParameterError):
        xnorm.wrap(layer, name="in_features")


def test_orthogonal_is_implemented_here_and_wrapping_leaves_the_layer_as_it_was():
    # tests/flax/test_orthogonal.py checks the math; here: wrapping copies, the plain layer is not written
    module, variables = linen_dense()
    saved = snapshot(variables)
    wrapper, wrapped = xnorm.orthogonal(module, variables=variables, rngs=0)
    assert xnorm.is_wrapped(wrapper) and set(wrapped["params"]) == {"kernel_orig", "bias"}
    assert set(wrapped["batch_stats"]) == {"kernel_base"}
    assert_same(variables, saved)
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    saved_layer = nnx_snapshot(layer)
    assert xnorm.is_wrapped(xnorm.orthogonal(layer))
    assert_nnx_same(layer, saved_layer)


@dataclasses.dataclass(frozen=True)
class _Unknown(Reparametrization):
    kind: ClassVar[str] = "unknown"


def test_a_reparametrization_this_backend_does_not_implement_changes_nothing():
    module, variables = linen_dense()
    saved = snapshot(variables)
    implemented = "does not implement _Unknown; it implements WeightNorm, SpectralNorm and Orthogonal"
    with pytest.raises(UnsupportedLayerError, match=implemented):
        xnorm.wrap(module, _Unknown(), variables=variables)
    assert_same(variables, saved)
    layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    saved_layer = nnx_snapshot(layer)
    with pytest.raises(UnsupportedLayerError, match="does not implement _Unknown"):
        xnorm.wrap(layer, _Unknown())
    assert_nnx_same(layer, saved_layer)


@pytest.mark.parametrize("obj", [object(), np.ones((3, 4)), jnp.ones((3, 4))], ids=["object", "numpy", "jax"])
def test_not_a_flax_module(obj):
    with pytest.raises(BackendDetectionError):
        xnorm.wrap(obj, backend="flax")


def test_conv_dim_range_is_the_canonical_rank():
    module = nn.Conv(4, (3, 3))
    xnorm.wrap(module, dim=3)  # (out, in, k0, k1): 4 axes
    with pytest.raises(DimError):
        xnorm.wrap(module, dim=4)
    with pytest.raises(DimError):
        xnorm.wrap(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)), dim=-5)


def test_integer_weights_are_rejected():
    with pytest.raises(NonFloatingParameterError):
        xnorm.wrap(nn.Dense(4, param_dtype=jnp.int32))
    module, variables = linen_dense()
    int_vars = {"params": {**variables["params"], "kernel": jnp.ones((3, 4), jnp.int32)}}
    saved = snapshot(int_vars)
    with pytest.raises(NonFloatingParameterError):
        xnorm.wrap(module, variables=int_vars)
    assert_same(int_vars, saved)
    layer = nnx_linear()
    layer.kernel.set_value(jnp.ones((3, 4), jnp.int32))
    saved = nnx_snapshot(layer)
    with pytest.raises(NonFloatingParameterError):
        xnorm.wrap(layer)
    assert_nnx_same(layer, saved)


def test_wrapping_twice_linen():
    module, variables = linen_dense()
    wrapped, wrapped_vars = xnorm.wrap(module, variables=variables)
    saved = snapshot(wrapped_vars)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped, variables=wrapped_vars)
    # variables that are already wrapped, given with the plain module
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(module, variables={"params": {**wrapped_vars["params"], "kernel": variables["params"]["kernel"]}})
    assert_same(wrapped_vars, saved)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(nn.WeightNorm(nn.Dense(4)))


def test_wrapping_twice_nnx():
    wrapped = xnorm.wrap(nnx_linear())
    saved = nnx_snapshot(wrapped)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped)
    assert_nnx_same(wrapped, saved)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(nnx.WeightNorm(nnx_linear(), rngs=nnx.Rngs(0)))


def test_removing_an_unwrapped_module():
    module, variables = linen_dense()
    saved = snapshot(variables)
    with pytest.raises(NotWrappedError):
        xnorm.remove(module, variables)
    assert_same(variables, saved)

    layer = nnx_linear()
    saved_layer = nnx_snapshot(layer)
    with pytest.raises(NotWrappedError):
        xnorm.remove(layer)
    assert_nnx_same(layer, saved_layer)

    model = nnx.Sequential(nnx_linear(), nnx.relu)
    saved_model = nnx_snapshot(model)
    with pytest.raises(NotWrappedError):
        xnorm.remove(model)
    assert_nnx_same(model, saved_model)


def test_linen_remove_needs_the_wrappers_variables():
    module, variables = linen_dense()
    wrapped, wrapped_vars = xnorm.wrap(module, variables=variables)
    with pytest.raises(OptionError):
        xnorm.remove(wrapped)
    saved = snapshot(variables)
    with pytest.raises(MissingParameterError):
        xnorm.remove(wrapped, variables)  # the plain layer's variables, not the wrapper's
    assert_same(variables, saved)


def test_variables_must_hold_the_parameter():
    module = nn.Dense(4)
    with pytest.raises(MissingParameterError):
        xnorm.wrap(module, variables={"params": {"bias": jnp.zeros(4)}})
    with pytest.raises(MissingParameterError):
        xnorm.wrap(module, variables=jnp.zeros(4))


def test_generic_linen_module_reports_at_init():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.ones, (x.shape[-1], 2))
            return x @ w

    wrapped = xnorm.wrap(Custom(), name="kernel")
    with pytest.raises(MissingParameterError):
        wrapped.init(jax.random.key(0), X)
    with pytest.raises(DimError):
        xnorm.wrap(Custom(), name="w", dim=5).init(jax.random.key(0), X)
