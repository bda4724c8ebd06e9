"""The NumPy oracle checked against definitions it does not share code with: loops and finite differences."""

import itertools

import numpy as np
import pytest

from xnorm import reference

RNG = np.random.default_rng(1234)
SHAPES_AND_DIMS = [
    ((4, 3), 0),
    ((4, 3), 1),
    ((5, 2, 3), 1),
    ((5, 2, 3), 2),
    ((5, 2, 3), -2),
    ((3, 2, 2, 2), None),
    ((3, 2), -1),
]


def _loop_norm(v, dim):
    """The norm by explicit iteration over the kept axis."""
    if dim in (None, -1):
        return np.sqrt(sum(float(x) ** 2 for x in v.ravel()))
    dim %= v.ndim
    out_shape = [1] * v.ndim
    out_shape[dim] = v.shape[dim]
    out = np.zeros(out_shape)
    for i in range(v.shape[dim]):
        index = [0] * v.ndim
        index[dim] = i
        out[tuple(index)] = np.sqrt(np.sum(np.take(v, i, axis=dim) ** 2))
    return out


@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
def test_norm_except_dim_matches_a_loop(shape, dim):
    v = RNG.standard_normal(shape)
    np.testing.assert_allclose(reference.norm_except_dim(v, dim), _loop_norm(v, dim), rtol=1e-13)


@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
def test_init_preserves_the_weight(shape, dim):
    weight = RNG.standard_normal(shape)
    g, v = reference.init(weight, dim)
    np.testing.assert_allclose(reference.weight_norm(g, v, dim), weight, rtol=1e-14, atol=1e-15)
    assert g.shape == np.shape(_loop_norm(weight, dim))


@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
@pytest.mark.parametrize("eps", [None, 0.3])
def test_analytic_gradients_match_central_differences(shape, dim, eps):
    v = RNG.standard_normal(shape)
    g = np.abs(RNG.standard_normal(np.shape(reference.norm_except_dim(v, dim)))) + 0.5
    grad_w = RNG.standard_normal(shape)

    def loss(g_, v_):
        return float(np.sum(reference.weight_norm(g_, v_, dim, eps=eps) * grad_w))

    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim, eps=eps)
    h = 1e-6
    numeric_v = np.zeros_like(v)
    for index in itertools.product(*(range(n) for n in shape)):
        step = np.zeros_like(v)
        step[index] = h
        numeric_v[index] = (loss(g, v + step) - loss(g, v - step)) / (2 * h)
    numeric_g = np.zeros_like(g)
    for index in itertools.product(*(range(n) for n in g.shape)):
        step = np.zeros_like(g)
        step[index] = h
        numeric_g[index] = (loss(g + step, v) - loss(g - step, v)) / (2 * h)
    np.testing.assert_allclose(grad_v, numeric_v, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_g, numeric_g, rtol=1e-6, atol=1e-8)


def test_zero_slice_gives_nan_without_eps_and_finite_with_it():
    v = np.array([[0.0, 0.0], [3.0, 4.0]])
    g = np.array([[1.0], [1.0]])
    assert np.isnan(reference.weight_norm(g, v, 0)[0]).all()
    np.testing.assert_allclose(reference.weight_norm(g, v, 0)[1], [0.6, 0.8])
    with_eps = reference.weight_norm(g, v, 0, eps=1e-6)
    assert np.isfinite(with_eps).all()
    np.testing.assert_allclose(with_eps[1], np.array([3.0, 4.0]) / np.sqrt(25 + 1e-6))


def test_eps_init_is_function_preserving():
    weight = RNG.standard_normal((3, 4))
    g, v = reference.init(weight, 0, eps=0.5)
    np.testing.assert_allclose(reference.weight_norm(g, v, 0, eps=0.5), weight, rtol=1e-14)


def test_bfloat16_rounding_is_to_nearest_with_16_low_bits_cleared():
    x = RNG.standard_normal(10_000) * 10.0 ** RNG.integers(-5, 5, 10_000)
    rounded = reference.round_to_dtype(x, "bfloat16")
    assert rounded.dtype == np.float32
    assert np.all(rounded.view(np.uint32) & 0xFFFF == 0)
    np.testing.assert_array_equal(reference.round_to_dtype(rounded, "bfloat16"), rounded)
    # nearest: no other bfloat16 neighbour is closer
    ulp = np.abs(np.spacing(rounded.astype(np.float32))) * 2**16
    assert np.all(np.abs(rounded - x.astype(np.float32)) <= ulp / 2 + 1e-30)
    assert reference.round_to_dtype(np.float64(1.0 + 2**-9), "bfloat16") == 1.0  # tie to even
    assert reference.round_to_dtype(np.float64(1.0 + 3 * 2**-9), "bfloat16") == np.float32(1.0 + 2**-7)


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 2e-3), ("bfloat16", 1.6e-2), ("float32", 2e-6)])
def test_low_precision_follows_float64_within_its_precision(dtype, rtol):
    v = reference.round_to_dtype(RNG.standard_normal((6, 5)), dtype)
    g = reference.round_to_dtype(np.abs(RNG.standard_normal((6, 1))) + 0.5, dtype)
    in_dtype = reference.weight_norm(g, v, 0, dtype=dtype)
    assert in_dtype.dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))
    np.testing.assert_allclose(in_dtype, reference.weight_norm(g, v, 0), rtol=rtol, atol=1e-6)
    # the norm is computed in float32 for the half types too
    assert reference.norm_except_dim(v, 0, dtype=dtype).dtype == np.float32


def test_integer_input_is_rejected_for_dtype_mode():
    with pytest.raises(TypeError, match="floating"):
        reference.round_to_dtype(np.arange(3), "int32")
