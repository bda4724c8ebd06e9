"""The orthogonal parametrization in MindSpore: equal to torch's own ``parametrizations.orthogonal`` (its
``original`` and ``base`` ported in) in weight, output and gradients, under GRAPH_MODE; registration by the
reference's rules; training that stays orthogonal with ``base`` untouched; the Conv1d unit axis; the
matrix exponential's squarings; checkpoints; removal; and every refusal leaving the layer as it was."""

import os
import tempfile

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn
from torch.nn.utils import parametrizations

import xnorm
from xnorm import reference_orthogonal
from xnorm._backends.mindspore.orthogonal import _THETA13, MAX_SQUARINGS, OrthogonalCell
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, OptionError

MAPS = ("matrix_exp", "cayley", "householder")
SHAPES = {"square": (5, 5), "tall": (6, 3), "wide": (3, 6)}
DTYPES = {"float32": (ms.float32, torch.float32, np.float32), "float64": (ms.float64, torch.float64, np.float64)}


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield


def _copy(param) -> np.ndarray:
    return np.array(param.asnumpy(), dtype=np.float64, copy=True)


def _gram_error(w: np.ndarray) -> float:
    """max |Q^T Q - I| over the batch, Q each tall matrix of ``w``'s last two axes."""
    q = w if w.shape[-2] >= w.shape[-1] else np.swapaxes(w, -1, -2)
    return float(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(q.shape[-1])).max())


def _torch_and_mindspore(shape, orthogonal_map, use_trivialization, dtype, seed=0):
    """A torch Linear under torch's own orthogonal and a MindSpore Dense under xnorm's, holding the same
    ``original`` (moved off -I, so that the map is not at the identity) and the same ``base``."""
    ms_dtype, torch_dtype, host = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch_dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
    parametrizations.orthogonal(linear, orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
    original = linear.parametrizations.weight.original
    with torch.no_grad():
        original.add_(torch.from_numpy(0.3 * rng.standard_normal(shape)).to(torch_dtype))
    dense = nn.Dense(shape[1], shape[0], has_bias=False, dtype=ms_dtype)
    dense.weight.set_data(Tensor(weight.astype(host)))
    wrapped = xnorm.orthogonal(dense, orthogonal_map, use_trivialization=use_trivialization)
    wrapped.weight_orig.set_data(Tensor(original.detach().numpy()))
    if use_trivialization:
        wrapped.weight_base.set_data(Tensor(linear.parametrizations.weight[0].base.numpy()))
    return linear, wrapped, rng


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_trivialization", [True, False], ids=["trivialized", "direct"])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_weight_output_and_gradient_equal_torchs_own(shape, orthogonal_map, use_trivialization, dtype):
    linear, wrapped, rng = _torch_and_mindspore(shape, orthogonal_map, use_trivialization, dtype)
    _, torch_dtype, host = DTYPES[dtype]
    x = rng.standard_normal((4, shape[1])).astype(host)
    seed = rng.standard_normal((4, shape[0])).astype(host)

    y_torch = linear(torch.from_numpy(x))
    (y_torch * torch.from_numpy(seed)).sum().backward()
    y = wrapped(Tensor(x))

    def objective(data, weight_of_output):
        return (wrapped(data) * weight_of_output).sum()

    grad = ms.jit(ms.grad(objective, grad_position=None, weights=[wrapped.weight_orig]))(Tensor(x), Tensor(seed))[0]

    assert_close(_copy(wrapped.compute_weight()), linear.weight.detach().double().numpy(), dtype, "weight",
                 what="weight")
    assert_close(y.asnumpy(), y_torch.detach().double().numpy(), dtype, "forward", what="output")
    assert_close(grad.asnumpy(), linear.parametrizations.weight.original.grad.double().numpy(), dtype, "gradient",
                 what="dL/doriginal")


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_registration_follows_the_reference(shape, orthogonal_map):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(shape)
    dense = nn.Dense(shape[1], shape[0], has_bias=False, dtype=ms.float64)
    dense.weight.set_data(Tensor(weight))
    np.random.seed(7)
    wrapped = xnorm.orthogonal(dense, orthogonal_map)
    n, k = max(shape), min(shape)
    np.random.seed(7)  # the completion is NumPy's global draw of the same shape
    completion = np.random.standard_normal((n, n - k)) if n != k else None
    original, base = reference_orthogonal.register(weight, orthogonal_map, completion=completion)
    assert_close(_copy(wrapped.weight_orig), original, "float64", "exact", what="original (-I)")
    assert_close(_copy(wrapped.weight_base), base, "float64", "weight", what="base")
    assert _gram_error(_copy(wrapped.compute_weight())) < 1e-14


def test_an_orthogonal_square_weight_is_kept_and_wrapping_changes_any_other():
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((4, 4)))
    dense = nn.Dense(4, 4, has_bias=False, dtype=ms.float64)
    dense.weight.set_data(Tensor(q))
    kept = xnorm.orthogonal(dense)
    np.testing.assert_array_equal(_copy(kept.weight_base), q)
    assert_close(_copy(kept.compute_weight()), q, "float64", "weight", what="an orthogonal weight after wrap")

    weight = np.random.default_rng(3).standard_normal((4, 4))
    other = nn.Dense(4, 4, has_bias=False, dtype=ms.float64)
    other.weight.set_data(Tensor(weight))
    changed = _copy(xnorm.orthogonal(other).compute_weight())
    assert _gram_error(changed) < 1e-14 and np.abs(changed - weight).max() > 0.1


def test_householder_without_trivialization_stores_the_qr_reflectors():
    weight = np.random.default_rng(4).standard_normal((6, 3))
    dense = nn.Dense(3, 6, has_bias=False, dtype=ms.float64)
    dense.weight.set_data(Tensor(weight))
    wrapped = xnorm.orthogonal(dense, "householder", use_trivialization=False)
    original, _ = reference_orthogonal.register(weight, "householder", use_trivialization=False)
    assert_close(_copy(wrapped.weight_orig), original, "float64", "weight", what="reflectors")
    q = reference_orthogonal.make_orthogonal(weight)
    assert_close(_copy(wrapped.compute_weight()), q, "float64", "weight", what="the weight's Q")


@pytest.mark.parametrize("scale", [40.0, 3000.0])
def test_matrix_exp_squarings_for_large_norms(scale):
    """``||A||_1`` from about 1e2 to 1e4 needs 5 to 12 squarings of the approximant; a bug in choosing them
    (one too few or too many) is far outside the tolerance."""
    rng = np.random.default_rng(5)
    dense = nn.Dense(6, 6, has_bias=False, dtype=ms.float64)
    wrapped = xnorm.orthogonal(dense, "matrix_exp", use_trivialization=False)
    original = scale * rng.standard_normal((6, 6))
    wrapped.weight_orig.set_data(Tensor(original))
    assert_close(_copy(wrapped.compute_weight()), reference_orthogonal.forward(original, "matrix_exp"), "float64",
                 "weight", what=f"exp(A), ||A|| ~ {scale:g}")


def test_matrix_exp_beyond_the_compiled_squarings_stays_orthogonal():
    dense = nn.Dense(4, 4, has_bias=False, dtype=ms.float64)
    wrapped = xnorm.orthogonal(dense, "matrix_exp", use_trivialization=False)
    huge = 10.0 * 5.4 * 2.0 ** MAX_SQUARINGS
    wrapped.weight_orig.set_data(Tensor(huge * np.random.default_rng(6).standard_normal((4, 4))))
    assert _gram_error(_copy(wrapped.compute_weight())) < 1e-9


def _squarings(original: np.ndarray) -> int:
    """How many squarings the scaling and squaring of ``exp(T - T^T)`` needs, T the lower triangle."""
    lower = np.tril(original)
    norm = np.abs(lower - lower.T).sum(axis=0).max()
    return int(np.clip(np.ceil(np.log2(norm / _THETA13)), 0, MAX_SQUARINGS))


@pytest.mark.parametrize("scale", [0.05, 40.0, 3000.0, 10.0 * 5.4 * 2.0 ** MAX_SQUARINGS])
def test_pynative_squares_only_as_often_as_needed(scale, monkeypatch):
    """Run op by op, the matrix exponential stops squaring after the largest number the batch needs
    (from none to all of them), with the output, gradient and weight bit-equal to those of the fixed
    sequence of squarings, also run op by op; a graph (``mindspore.jit`` in PYNATIVE_MODE, GRAPH_MODE)
    never takes the eager path."""
    from xnorm._backends.mindspore import orthogonal

    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager_squarings = []
    square_eagerly = OrthogonalCell._square_eagerly

    def spy(self, R, steps):
        eager_squarings.append(int(steps.max()))
        return square_eagerly(self, R, steps)

    monkeypatch.setattr(OrthogonalCell, "_square_eagerly", spy)
    rng = np.random.default_rng(11)
    original = scale * rng.standard_normal((6, 6))
    dense = nn.Dense(6, 6, has_bias=False, dtype=ms.float64)
    wrapped = xnorm.orthogonal(dense, "matrix_exp", use_trivialization=False)
    wrapped.weight_orig.set_data(Tensor(original))
    x = Tensor(rng.standard_normal((3, 6)))

    def objective(data):
        return (wrapped(data) * data).sum()

    gradient = ms.grad(objective, None, wrapped.trainable_params())

    def run():
        return wrapped(x).asnumpy(), gradient(x)[0].asnumpy(), wrapped.compute_weight().asnumpy()

    eager = run()
    assert eager_squarings == [_squarings(original)] * 3
    with monkeypatch.context() as fixed:
        fixed.setattr(orthogonal, "_runs_eagerly", lambda: False)
        every_squaring = run()
    for got, expected in zip(eager, every_squaring, strict=True):
        np.testing.assert_array_equal(got, expected)

    def compiled_forward(data):
        return wrapped(data)

    ms.jit(compiled_forward)(x)
    assert len(eager_squarings) == 3, "a compiled graph took the eager path"
    assert orthogonal._runs_eagerly()
    ms.set_context(mode=ms.GRAPH_MODE)
    assert not orthogonal._runs_eagerly(), "GRAPH_MODE would take the eager path"
    if scale < 1e5:  # beyond the compiled squarings the result is orthogonal but no longer exp(A)
        assert_close(eager[2], reference_orthogonal.forward(original, "matrix_exp"), "float64", "weight",
                     what=f"exp(A), ||A|| ~ {scale:g}, op by op")


def test_training_keeps_the_weight_orthogonal_and_base_fixed():
    rng = np.random.default_rng(7)
    dense = nn.Dense(8, 5, dtype=ms.float32)
    wrapped = xnorm.orthogonal(dense)  # householder: wide
    base = _copy(wrapped.weight_base)
    assert [p.name for p in wrapped.trainable_params()] == ["weight_orig", "bias"]
    optimizer = nn.SGD(wrapped.trainable_params(), learning_rate=0.5)
    x = Tensor(rng.standard_normal((16, 8)).astype(np.float32))
    target = Tensor(rng.standard_normal((16, 5)).astype(np.float32))

    def loss_fn(data, goal):
        return ((wrapped(data) - goal) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(data, goal):
        loss, grads = grad_fn(data, goal)
        optimizer(grads)
        return loss

    losses = [float(step(x, target).asnumpy()) for _ in range(20)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(_copy(wrapped.weight_base), base)
    assert _gram_error(_copy(wrapped.compute_weight())) < 1e-5


def test_conv1d_kernels_are_matrices_over_torchs_in_and_k_axes():
    """MindSpore stores a Conv1d weight ``(out, in, 1, k)``; the matrices are torch's ``in x k`` slices."""
    rng = np.random.default_rng(8)
    conv = torch.nn.Conv1d(3, 2, 4, bias=False, dtype=torch.float64)
    parametrizations.orthogonal(conv, orthogonal_map="cayley")
    with torch.no_grad():
        conv.parametrizations.weight.original.add_(torch.from_numpy(0.3 * rng.standard_normal((2, 3, 4))))
    cell = nn.Conv1d(3, 2, 4, has_bias=False, pad_mode="valid", dtype=ms.float32)
    wrapped = xnorm.orthogonal(cell, "cayley")
    assert tuple(wrapped.weight_base.shape) == (2, 4, 4)
    wrapped.weight_orig.set_data(Tensor(conv.parametrizations.weight.original.detach().numpy()[:, :, None, :]
                                        .astype(np.float32)))
    wrapped.weight_base.set_data(Tensor(conv.parametrizations.weight[0].base.numpy().astype(np.float32)))
    x = rng.standard_normal((2, 3, 9))
    assert_close(wrapped(Tensor(x.astype(np.float32))).asnumpy(), conv(torch.from_numpy(x)).detach().numpy(),
                 "float32", "forward", what="Conv1d output")


def test_checkpoint_round_trip_and_remove():
    rng = np.random.default_rng(9)
    dense = nn.Dense(4, 6, dtype=ms.float32)
    wrapped = xnorm.orthogonal(dense, "cayley")
    wrapped.weight_orig.set_data(Tensor(rng.standard_normal((6, 4)).astype(np.float32)))
    x = Tensor(rng.standard_normal((3, 4)).astype(np.float32))
    y = wrapped(x).asnumpy()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "orthogonal.ckpt")
        ms.save_checkpoint(wrapped, path)
        saved = ms.load_checkpoint(path)
        assert sorted(saved) == ["bias", "weight_base", "weight_orig"]
        fresh = xnorm.orthogonal(nn.Dense(4, 6, dtype=ms.float32), "cayley")
        not_loaded, _ = ms.load_param_into_net(fresh, saved, strict_load=True)
    assert not not_loaded
    np.testing.assert_array_equal(fresh(x).asnumpy(), y)

    weight = _copy(wrapped.compute_weight())
    plain = xnorm.remove(wrapped)
    assert plain is dense and sorted(name for name, _ in plain.parameters_and_names()) == ["bias", "weight"]
    assert "_solve" not in plain._cells
    np.testing.assert_array_equal(_copy(plain.weight), weight)
    np.testing.assert_array_equal(plain(x).asnumpy(), y)


def test_remove_inside_a_compiled_model_recompiles():
    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = xnorm.orthogonal(nn.Dense(3, 3, has_bias=False, dtype=ms.float32), "cayley")

        def construct(self, x):
            return self.dense(x)

    net = Net()
    net.dense.weight_orig.set_data(Tensor(np.random.default_rng(10).standard_normal((3, 3)).astype(np.float32)))
    x = Tensor(np.eye(3, dtype=np.float32))
    before = net(x).asnumpy()
    xnorm.remove(net)
    net.dense.weight.set_data(Tensor(np.zeros((3, 3), np.float32)))
    # a stale graph would still compute with the wrapper's orthogonal weight
    assert np.abs(before).max() > 0.1
    np.testing.assert_array_equal(net(x).asnumpy(), np.zeros((3, 3), np.float32))


def _snapshot(cell):
    return {name: (param, _copy(param)) for name, param in cell.parameters_and_names()}


def _untouched(cell, before):
    after = dict(cell.parameters_and_names())
    assert sorted(after) == sorted(before)
    for name, (param, value) in before.items():
        assert after[name] is param
        np.testing.assert_array_equal(_copy(param), value)


def test_refusals_leave_the_layer_untouched():
    dense = nn.Dense(3, 4)
    before = _snapshot(dense)
    with pytest.raises(DimError, match="at least 2 axes"):
        xnorm.orthogonal(dense, name="bias")
    with pytest.raises(OptionError, match="orthogonal_map must be one of"):
        xnorm.orthogonal(dense, "qr")
    _untouched(dense, before)
    assert type(dense) is nn.Dense

    wrapped = xnorm.orthogonal(dense)
    wrapped_before = _snapshot(wrapped)
    with pytest.raises(AlreadyWrappedError, match="already orthogonalized.*xnorm.remove"):
        xnorm.orthogonal(wrapped)
    with pytest.raises(AlreadyWrappedError, match="already orthogonalized"):
        xnorm.weight_norm(wrapped)
    _untouched(wrapped, wrapped_before)


@pytest.mark.parametrize("layers", ["linear", "conv1d"])
def test_convert_carries_original_and_base_both_ways(layers):
    """torch's ``parametrizations.weight.original`` and ``parametrizations.weight.0.base`` become
    ``weight_orig`` (storage layout: a Conv1d gains its unit axis) and ``weight_base`` (canonical), and back."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    torch.manual_seed(0)
    if layers == "linear":
        source, target, x = torch.nn.Linear(3, 6), nn.Dense(3, 6), np.ones((2, 3), np.float32)
    else:
        source, target = torch.nn.Conv1d(3, 2, 4), nn.Conv1d(3, 2, 4, pad_mode="valid", has_bias=True)
        x = np.random.default_rng(11).standard_normal((2, 3, 9)).astype(np.float32)
    source = xnorm.orthogonal(source)
    with torch.no_grad():
        original = source.parametrizations.weight.original
        original.add_(0.3 * torch.randn_like(original))
    model = xnorm.orthogonal(target)
    xnorm.convert(source.state_dict(), to="mindspore", like=model, load=True)
    np.testing.assert_array_equal(model.weight_base.asnumpy(), source.parametrizations.weight[0].base.numpy())
    assert xnorm.compare(source, model, x).ok
    back = xnorm.convert(model, to="torch", like=source)
    for key, value in source.state_dict().items():
        assert torch.equal(back[key], value), key


def test_convert_refuses_a_base_of_another_size_and_changes_nothing():
    source = xnorm.orthogonal(torch.nn.Linear(3, 6))
    state = dict(source.state_dict())
    state["parametrizations.weight.0.base"] = torch.eye(5)
    model = xnorm.orthogonal(nn.Dense(3, 6))
    before = _snapshot(model)
    with pytest.raises(xnorm.ConversionError, match="weight_base"):
        xnorm.convert(state, to="mindspore", like=model, load=True)
    _untouched(model, before)
