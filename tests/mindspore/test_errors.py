"""Bad inputs raise the documented error classes and leave the Cell exactly as it was."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

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


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def snapshot(cell):
    """Structural names, framework names, dtypes and values of every parameter, and the child cells."""
    params = [(key, p.name, str(p.dtype), p.requires_grad, p.asnumpy().copy())
              for key, p in cell.parameters_and_names()]
    return params, [(key, type(child)) for key, child in cell.cells_and_names()]


def assert_untouched(cell, before):
    after = snapshot(cell)
    assert [p[:4] for p in after[0]] == [p[:4] for p in before[0]]
    for (_, _, _, _, a), (_, _, _, _, b) in zip(after[0], before[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert after[1] == before[1]


def test_not_a_cell():
    with pytest.raises(BackendDetectionError):
        xnorm.wrap(np.ones((3, 2)), backend="mindspore")
    backend = xnorm.registry.get_backend("mindspore")
    with pytest.raises(BackendDetectionError):
        backend.wrap(object(), xnorm.WeightNorm(), name=None)


def test_missing_parameter():
    dense = nn.Dense(3, 2)
    before = snapshot(dense)
    with pytest.raises(MissingParameterError, match="'weight'"):
        xnorm.wrap(dense, name="kernel")
    assert_untouched(dense, before)
    no_bias = nn.Dense(3, 2, has_bias=False)
    before = snapshot(no_bias)
    with pytest.raises(MissingParameterError):
        xnorm.wrap(no_bias, name="bias")
    assert_untouched(no_bias, before)


def test_unsupported_layer_lists_supported_layers():
    norm = nn.BatchNorm1d(3)
    before = snapshot(norm)
    with pytest.raises(UnsupportedLayerError) as info:
        xnorm.wrap(norm)
    for listed in ("Dense", "Conv1d", "Conv3dTranspose", "Embedding"):
        listed = "mindspore.nn." + listed
        assert listed in str(info.value)
    assert_untouched(norm, before)


def test_subclass_is_unsupported():
    # A subclass may override construct; the wrapper only reproduces the listed classes' construct.
    class MyDense(nn.Dense):
        pass

    layer = MyDense(3, 2)
    before = snapshot(layer)
    with pytest.raises(UnsupportedLayerError):
        xnorm.wrap(layer)
    assert_untouched(layer, before)


def test_integer_weight():
    dense = nn.Dense(3, 2)
    dense.weight = Parameter(Tensor(np.ones((2, 3), dtype=np.int32)), name="weight")
    before = snapshot(dense)
    with pytest.raises(NonFloatingParameterError):
        xnorm.wrap(dense)
    assert_untouched(dense, before)


def test_wrapping_twice():
    wrapped = xnorm.wrap(nn.Dense(3, 2))
    before = snapshot(wrapped)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped)
    assert_untouched(wrapped, before)


@pytest.mark.parametrize("dim", [2, -3, True, 1.0, "0"])
def test_bad_dim(dim):
    dense = nn.Dense(3, 2)
    before = snapshot(dense)
    with pytest.raises(DimError):
        xnorm.wrap(dense, dim=dim)
    assert_untouched(dense, before)


def test_unknown_option_and_bad_eps():
    dense = nn.Dense(3, 2)
    before = snapshot(dense)
    with pytest.raises(OptionError):
        xnorm.wrap(dense, colour="red")
    with pytest.raises(OptionError):
        xnorm.wrap(dense, eps=-1.0)
    assert_untouched(dense, before)


def test_remove_unwrapped():
    dense = nn.Dense(3, 2)
    before = snapshot(dense)
    with pytest.raises(NotWrappedError):
        xnorm.remove(dense)
    assert_untouched(dense, before)
    model = nn.SequentialCell([nn.Dense(3, 2), nn.ReLU()])
    before = snapshot(model)
    with pytest.raises(NotWrappedError):
        xnorm.remove(model)
    assert_untouched(model, before)


def test_is_wrapped():
    dense = nn.Dense(3, 2)
    assert not xnorm.is_wrapped(dense)
    wrapped = xnorm.wrap(dense)
    assert xnorm.is_wrapped(wrapped)
    assert not xnorm.is_wrapped(nn.SequentialCell([wrapped]))
    assert not xnorm.is_wrapped(object())
