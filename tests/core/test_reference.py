"""The NumPy oracle checked against definitions it does not share code with: loops and finite differences."""

import itertools

import numpy as np
import pytest

from xnorm import reference, reference_orthogonal, reference_spectral
from xnorm.spec import SpectralNorm

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


# -- spectral norm --------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dim"), [((4, 6), 0), ((4, 6), 1), ((6, 2, 3), 0), ((3, 4, 2, 2), 1), ((7,), 0)])
def test_spectral_gradient_matches_finite_differences(shape, dim):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape)
    grad_w = rng.standard_normal(shape)
    if len(shape) > 1:
        h, w = reference_spectral.matrix_view(weight, dim).shape
        u, v = reference_spectral.init_state(weight, rng.standard_normal(h), rng.standard_normal(w), dim, 1e-12)
    else:
        u = v = None

    def loss(W):  # u and v are constants: the spec detaches them
        return np.sum(reference_spectral.spectral_norm(W, u, v, dim, 1e-12) * grad_w)

    numeric = np.zeros(shape)
    step = 1e-6
    for index in np.ndindex(shape):
        bump = np.zeros(shape)
        bump[index] = step
        numeric[index] = (loss(weight + bump) - loss(weight - bump)) / (2 * step)
    analytic = reference_spectral.spectral_norm_grad(weight, u, v, grad_w, dim, 1e-12)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_spectral_matrix_view_round_trips_and_puts_dim_first():
    weight = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    matrix = reference_spectral.matrix_view(weight, 1)
    assert matrix.shape == (3, 8)
    np.testing.assert_array_equal(matrix[1], weight[:, 1, :].ravel())
    np.testing.assert_array_equal(reference_spectral.from_matrix_view(matrix, weight.shape, 1), weight)


def test_power_iteration_converges_to_the_top_singular_pair():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 8))
    u, v = reference_spectral.power_iteration(weight, rng.standard_normal(5), rng.standard_normal(8), 0, 300, 1e-12)
    left, singular, right = np.linalg.svd(weight)
    np.testing.assert_allclose(reference_spectral.sigma(weight, u, v, 0), singular[0], rtol=1e-12)
    np.testing.assert_allclose(abs(u @ left[:, 0]), 1.0, rtol=1e-10)
    np.testing.assert_allclose(abs(v @ right[0]), 1.0, rtol=1e-10)


def test_a_zero_weight_gives_zero_state_and_nan_weight():
    weight = np.zeros((3, 4))
    w, u, v = reference_spectral.training_call(weight, np.ones(3) / 3**0.5, np.ones(4) / 2, 0, 1, 1e-12)
    assert not u.any() and not v.any() and np.isnan(w).all()


def test_spectral_training_call_iterates_n_times_and_eval_not_at_all():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3))
    u0, v0 = rng.standard_normal(4), rng.standard_normal(3)
    _, u3, v3 = reference_spectral.training_call(weight, u0, v0, 0, 3, 1e-12)
    u, v = u0, v0
    for _ in range(3):
        u = reference_spectral.normalize(weight @ v, 1e-12)
        v = reference_spectral.normalize(weight.T @ u, 1e-12)
    np.testing.assert_array_equal(u3, u)
    np.testing.assert_array_equal(v3, v)
    eval_w = reference_spectral.spectral_norm(weight, u0, v0, 0, 1e-12)
    np.testing.assert_allclose(eval_w, weight / (u0 @ weight @ v0), rtol=1e-15)


def test_spectral_spec_defaults_follow_torch():
    assert SpectralNorm().resolved_dim(3, "conv_transpose1d") == 1
    assert SpectralNorm().resolved_dim(3, "conv1d") == 0
    assert SpectralNorm(dim=-1).resolved_dim(4, "conv2d") == 3  # unlike weight norm, -1 is the last axis
    assert SpectralNorm().tensor_names("kernel") == ("kernel_orig",)
    assert SpectralNorm().state_names("weight") == ("weight_u", "weight_v")


@pytest.mark.parametrize("orthogonal_map", reference_orthogonal.MAPS)
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (2, 3, 4, 4), (2, 6, 3)])
@pytest.mark.parametrize("trivialized", [False, True])
def test_orthogonal_gradient_is_the_adjoint_of_the_directional_derivative(orthogonal_map, shape, trivialized):
    """The gradient (each step of the map backwards) against one exact directional derivative per entry."""
    rng = np.random.default_rng(7)
    original = rng.standard_normal(shape) * 0.7
    for i in range(min(shape[-2:])):  # householder: the columns whose diagonal entry truncates to +-1
        original[..., i, i] = rng.choice([-1.0, 1.0], size=shape[:-2]) * (1.0 + rng.random(shape[:-2]))
    grad_weight = rng.standard_normal(shape)
    n = max(shape[-2:])
    base = np.linalg.qr(rng.standard_normal(shape[:-2] + (n, n)))[0] if trivialized else None
    by_entry = np.zeros(shape)
    for index in np.ndindex(shape):
        direction = np.zeros(shape)
        direction[index] = 1.0
        derivative = reference_orthogonal.directional_derivative(original, direction, orthogonal_map, base)
        by_entry[index] = np.sum(grad_weight * derivative)
    gradient = reference_orthogonal.gradient(original, grad_weight, orthogonal_map, base)
    np.testing.assert_allclose(gradient, by_entry, rtol=0, atol=1e-13 * np.max(np.abs(by_entry)))
