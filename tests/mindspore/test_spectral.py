"""Spectral normalization in MindSpore: equal to torch's own ``parametrizations.spectral_norm`` (its W, u
and v ported in) through training, eval and removal, equal to the float64 NumPy reference, the state's
updates under GRAPH_MODE and ``mindspore.jit``, recompilation after ``set_train`` and ``remove``, names,
checkpoints, seeds, float16, and every refusal."""

import os
import re
import runpy
import tempfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import xnorm
from xnorm import reference_spectral
from xnorm.conformance import layers
from xnorm.conformance.adapters.mindspore import build_mindspore_layer, storage_layout
from xnorm.conformance.adapters.torch import build_torch_layer
from xnorm.conformance.cases import LAYERS, LayerCase
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, NonFloatingParameterError, OptionError
from xnorm.spec import SPECTRAL_INIT_ITERATIONS, LayerKind

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
CASES = {case.label: case for case in LAYERS}


def _copy(param) -> np.ndarray:
    # asnumpy() of a Parameter can be a view of its memory, which the next training-mode call overwrites
    return np.array(param.asnumpy(), dtype=np.float64, copy=True)


def _state(cell):
    return _copy(cell.weight_u if hasattr(cell, "weight_u") else cell.embedding_table_u), _copy(
        cell.weight_v if hasattr(cell, "weight_v") else cell.embedding_table_v)


def _weight_name(case) -> str:
    return "embedding_table" if case.kind == LayerKind.EMBEDDING else "weight"


def _inputs(case, rng, dtype=np.float32):
    if case.kind == LayerKind.EMBEDDING:
        return rng.integers(0, case.weight_shape[0], size=case.input_shape)
    return rng.standard_normal(case.input_shape).astype(dtype)


def _ms_input(case, x):
    return Tensor(np.asarray(x, np.int32)) if case.kind == LayerKind.EMBEDDING else Tensor(x)


def _train_step(cell, lr, mode):
    """A MindSpore training step (value_and_grad, nn.SGD; jit in GRAPH_MODE) returning (loss, grads)."""
    optimizer = nn.SGD(cell.trainable_params(), learning_rate=lr)

    def loss_fn(x, target):
        diff = cell(x) - target
        return 0.5 * (diff * diff).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    def step(x, target):
        loss, grads = grad_fn(x, target)
        optimizer(grads)
        return loss, grads

    return ms.jit(step) if mode == ms.GRAPH_MODE else step


# -- against torch's own spectral norm ------------------------------------------------------------------
TORCH_LAYERS = ["linear", "conv1d-g2-s2-d2", "conv2d-g2-s2-nobias", "conv3d", "conv_transpose1d-g2-s2-op1",
                "conv_transpose2d-s2", "embedding"]


@pytest.mark.parametrize("options", [{}, {"n_power_iterations": 3, "other_dim": True}], ids=["default", "n3-other-dim"])
@pytest.mark.parametrize("label", TORCH_LAYERS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_equal_to_torch_through_training_eval_and_remove(mode, label, options):
    """torch's W, u, v and bias ported into the MindSpore cell: outputs, dL/dW, dL/dbias, W, bias, u and v
    after each of 4 SGD steps, the eval output and the removed weight agree within the float32 tolerances."""
    ms.set_context(mode=MODES[mode])
    case = CASES[label]
    n = options.get("n_power_iterations", 1)
    dim = None
    if options.get("other_dim"):
        dim = 0 if case.kind in LayerKind.CONV_TRANSPOSE else 1
    torch.manual_seed(0)
    theirs = build_torch_layer(case)
    parametrizations.spectral_norm(theirs, n_power_iterations=n, dim=dim)
    sn = theirs.parametrizations.weight[0]
    original = theirs.parametrizations.weight.original

    layout = storage_layout(case)
    ours = build_mindspore_layer(case, ms.float32)
    params = dict(ours.parameters_and_names())
    params[_weight_name(case)].set_data(Tensor(layout.to_storage(original.detach().numpy())))
    if case.bias:
        params["bias"].set_data(Tensor(theirs.bias.detach().numpy()))
    ours = xnorm.spectral_norm(ours, n_power_iterations=n, dim=dim)
    prefix = _weight_name(case)
    assert [p.name for p in ours.get_parameters()] == [f"{prefix}_orig", f"{prefix}_u", f"{prefix}_v"] + (
        ["bias"] if case.bias else [])
    ours_u, ours_v = getattr(ours, f"{prefix}_u"), getattr(ours, f"{prefix}_v")
    ours_u.set_data(Tensor(sn._u.numpy()))
    ours_v.set_data(Tensor(sn._v.numpy()))

    rng = np.random.default_rng(1)
    x = _inputs(case, rng)
    x_torch = torch.from_numpy(x)
    target = rng.standard_normal(layers.output_shape(case)).astype(np.float32)
    lr = 0.5
    step = _train_step(ours, lr, MODES[mode])
    optimizer = torch.optim.SGD(theirs.parameters(), lr=lr)
    for i in range(4):
        optimizer.zero_grad()
        loss_theirs = 0.5 * ((theirs(x_torch) - torch.from_numpy(target)) ** 2).mean()
        loss_theirs.backward()
        loss_ours, grads = step(_ms_input(case, x), Tensor(target))
        assert_close(loss_ours.asnumpy(), loss_theirs.item(), "float32", "forward", what=f"loss at step {i}")
        assert_close(layout.to_canonical(grads[0].asnumpy()), original.grad.numpy(), "float32", "gradient",
                     what=f"dL/dW at step {i}")
        if case.bias:
            assert_close(grads[1].asnumpy(), theirs.bias.grad.numpy(), "float32", "gradient",
                         what=f"dL/dbias at step {i}")
        optimizer.step()
        W = getattr(ours, f"{prefix}_orig")
        assert_close(layout.to_canonical(W.asnumpy()), original.detach().numpy(), "float32", "training",
                     what=f"W after step {i}")
        if case.bias:
            assert_close(ours.bias.asnumpy(), theirs.bias.detach().numpy(), "float32", "training",
                         what=f"bias after step {i}")
        assert_close(ours_u.asnumpy(), sn._u.numpy(), "float32", "training", what=f"u after step {i}")
        assert_close(ours_v.asnumpy(), sn._v.numpy(), "float32", "training", what=f"v after step {i}")

    ours.set_train(False)
    theirs.eval()
    with torch.no_grad():
        y_theirs = theirs(x_torch).numpy()
    assert_close(ours(_ms_input(case, x)).asnumpy(), y_theirs, "float32", "forward", what="eval output")
    ours.set_train(True)
    theirs.train()
    parametrize.remove_parametrizations(theirs, "weight")  # training mode: one more iteration
    plain = xnorm.remove(ours)
    assert type(plain) is type(build_mindspore_layer(case, ms.float32))
    assert [p.name for p in plain.get_parameters()] == [prefix] + (["bias"] if case.bias else [])
    assert_close(layout.to_canonical(getattr(plain, prefix).asnumpy()), theirs.weight.detach().numpy(), "float32",
                 "weight", what="weight after remove")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_forwards_before_one_backward_as_in_a_gan_discriminator(mode):
    """Each call iterates and uses its own sigma; the gradient of the sum is torch's."""
    ms.set_context(mode=MODES[mode])
    case = CASES["linear"]
    torch.manual_seed(2)
    theirs = parametrizations.spectral_norm(build_torch_layer(case))
    ours = build_mindspore_layer(case, ms.float32)
    ours.weight.set_data(Tensor(theirs.parametrizations.weight.original.detach().numpy()))
    ours.bias.set_data(Tensor(theirs.bias.detach().numpy()))
    ours = xnorm.spectral_norm(ours)
    ours.weight_u.set_data(Tensor(theirs.parametrizations.weight[0]._u.numpy()))
    ours.weight_v.set_data(Tensor(theirs.parametrizations.weight[0]._v.numpy()))
    rng = np.random.default_rng(3)
    real, fake = (rng.standard_normal(case.input_shape).astype(np.float32) for _ in range(2))

    def objective(a, b):
        return ours(a).sum() - 2.0 * ours(b).sum()

    grad_fn = ms.grad(objective, grad_position=None, weights=[ours.weight_orig])

    def gradient(a, b):
        return grad_fn(a, b)

    gradient = ms.jit(gradient) if mode == "graph" else gradient
    (grad,) = gradient(Tensor(real), Tensor(fake))
    (theirs(torch.from_numpy(real)).sum() - 2.0 * theirs(torch.from_numpy(fake)).sum()).backward()
    assert_close(grad.asnumpy(), theirs.parametrizations.weight.original.grad.numpy(), "float32", "gradient",
                 what="dL/dW of two calls")
    assert_close(ours.weight_u.asnumpy(), theirs.parametrizations.weight[0]._u.numpy(), "float32", "weight",
                 what="u after two training-mode calls")


# -- against the float64 reference ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("label", ["linear", "embedding"])  # MindSpore's CPU convolutions have no float64
@pytest.mark.parametrize("mode", sorted(MODES))
def test_equal_to_the_float64_reference_over_training_mode_calls(mode, label, n):
    """Every training-mode call (a forward, a gradient) iterates n times exactly: u, v, w and dL/dW agree
    with the reference to the float64 tolerance after each; eval calls and compute_weight() do not move
    the state."""
    ms.set_context(mode=MODES[mode])
    case = CASES[label]
    rng = np.random.default_rng(4)
    weight = rng.standard_normal(case.weight_shape) / np.sqrt(case.weight_shape[1])
    cell = build_mindspore_layer(case, ms.float64)
    getattr(cell, _weight_name(case)).set_data(Tensor(weight))
    bias = None
    if case.bias:
        bias = rng.standard_normal(case.bias_size)
        cell.bias.set_data(Tensor(bias))
    cell = xnorm.spectral_norm(cell, n_power_iterations=n)
    u, v = _state(cell)
    x = _inputs(case, rng, np.float64)
    grad_output = rng.standard_normal(layers.output_shape(case))

    def objective(data, seed):
        return (cell(data) * seed).sum()

    grad_fn = ms.grad(objective, grad_position=None, weights=[getattr(cell, _weight_name(case) + "_orig")])

    def gradient(data, seed):
        return grad_fn(data, seed)

    gradient = ms.jit(gradient) if mode == "graph" else gradient
    for call in range(3):
        y = cell(_ms_input(case, x)).asnumpy()
        w_ref, u, v = reference_spectral.training_call(weight, u, v, 0, n, 1e-12)
        assert_close(_state(cell)[0], u, "float64", "weight", what=f"u after forward {call}")
        assert_close(_state(cell)[1], v, "float64", "weight", what=f"v after forward {call}")
        assert_close(y, layers.forward(case, w_ref, bias, x), "float64", "forward", what=f"output {call}")

        (grad,) = gradient(_ms_input(case, x), Tensor(grad_output))
        w_ref, u, v = reference_spectral.training_call(weight, u, v, 0, n, 1e-12)
        grad_w, _ = layers.backward(case, w_ref, x, grad_output)
        expected = reference_spectral.spectral_norm_grad(weight, u, v, grad_w, 0, 1e-12)
        assert_close(grad.asnumpy(), expected, "float64", "gradient", what=f"dL/dW at call {call}")
        assert_close(_state(cell)[0], u, "float64", "weight", what=f"u after gradient {call}")

    before = _state(cell)
    cell.set_train(False)
    y_eval = cell(_ms_input(case, x)).asnumpy()
    w = cell.compute_weight().asnumpy()
    for after, start, what in zip(_state(cell), before, "uv", strict=True):
        np.testing.assert_array_equal(after, start, err_msg=f"{what} after an eval-mode call and compute_weight()")
    assert_close(w, reference_spectral.spectral_norm(weight, u, v, 0, 1e-12), "float64", "weight", what="eval w")
    assert_close(y_eval, layers.forward(case, w, bias, x), "float64", "forward", what="eval output")


# -- training mode, recompilation ----------------------------------------------------------------------------
class TwoLayers(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = xnorm.spectral_norm(nn.Conv1d(2, 3, 3, pad_mode="valid", has_bias=True))
        self.head = xnorm.spectral_norm(nn.Dense(3 * 5, 2))

    def construct(self, x):
        return self.head(self.conv(x).reshape(x.shape[0], -1))


def _eval_reference(model, x):
    """The model's output with w = W / sigma from the current state, computed in NumPy (eval semantics)."""
    conv_w = reference_spectral.spectral_norm(_copy(model.conv.weight_orig)[:, :, 0, :], *_state(model.conv), 0, 1e-12)
    head_w = reference_spectral.spectral_norm(_copy(model.head.weight_orig), *_state(model.head), 0, 1e-12)
    conv_case = LayerCase("c", "conv1d", conv_w.shape, x.shape, stride=(1,), padding=(0,), dilation=(1,),
                          output_padding=(0,))
    conv = layers.forward(conv_case, conv_w, _copy(model.conv.bias), x)
    return conv.reshape(x.shape[0], -1) @ head_w.T + _copy(model.head.bias)


def test_a_fresh_model_iterates_and_set_train_after_a_compiled_call_takes_effect():
    """GRAPH_MODE compiles the training flag as a constant and keys a Cell's graph by its phase: a fresh
    model (phase "train") iterates, set_train(False) on the called Cell recompiles without the iteration
    (u, v stay, the output is W / sigma from them), set_train(True) runs the training graph again."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    model = TwoLayers()
    assert model.conv.training and not model.training  # the wrapper starts in training mode, as in torch
    x = np.random.default_rng(5).standard_normal((4, 2, 7)).astype(np.float32)
    before = _state(model.conv)
    y_train = model(Tensor(x)).asnumpy()  # compiles the "train" graph: iterates
    moved = _state(model.conv), _state(model.head)
    assert np.abs(moved[0][0] - before[0]).max() > 1e-6, "a training-mode call must move u"
    assert_close(y_train, _eval_reference(model, x), "float32", "forward", what="training output")

    model.set_train(True)  # the same phase: the same graph, which iterates
    model(Tensor(x))
    assert np.abs(_state(model.conv)[0] - moved[0][0]).max() > 0.0
    y_train = model(Tensor(x)).asnumpy()
    moved = _state(model.conv), _state(model.head)

    model.set_train(False)  # must not reuse the training graph
    for _ in range(2):
        y_eval = model(Tensor(x)).asnumpy()
        for layer, state in zip((model.conv, model.head), moved, strict=True):
            np.testing.assert_array_equal(_state(layer)[0], state[0])
            np.testing.assert_array_equal(_state(layer)[1], state[1])
    np.testing.assert_array_equal(y_eval, y_train)  # the same state, no iteration: the very same numbers

    model.set_train(True)  # the cached training graph again: it iterates
    model(Tensor(x))
    assert np.abs(_state(model.conv)[0] - moved[0][0]).max() > 0.0


def test_set_train_false_on_a_called_wrapper_after_jit_training_steps():
    """A wrapper trained by a jit step and then evaluated directly: the eval graph does not iterate."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell = xnorm.spectral_norm(nn.Dense(5, 3))
    x = Tensor(np.random.default_rng(6).standard_normal((4, 5)).astype(np.float32))
    step = _train_step(cell, 0.1, ms.GRAPH_MODE)
    start = _state(cell)
    for _ in range(2):
        step(x, Tensor(np.zeros((4, 3), np.float32)))
    trained = _state(cell)
    assert np.abs(trained[0] - start[0]).max() > 1e-6
    _, u, v = reference_spectral.training_call(_copy(cell.weight_orig), *trained, 0, 1, 1e-12)
    cell(x)  # training mode, called directly: one more iteration
    assert_close(_state(cell)[0], u, "float32", "weight", what="u after a direct training-mode call")
    after = _state(cell)
    cell.set_train(False)
    y = cell(x).asnumpy()
    cell(x)
    np.testing.assert_array_equal(_state(cell)[0], after[0])
    np.testing.assert_array_equal(_state(cell)[1], after[1])
    w = reference_spectral.spectral_norm(_copy(cell.weight_orig), *after, 0, 1e-12)
    assert_close(y, _copy(x) @ w.T + _copy(cell.bias), "float32", "forward", what="eval output")


# -- remove --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_remove_iterates_once_in_training_mode_and_not_in_eval_mode(mode, training):
    ms.set_context(mode=MODES[mode])
    cell = xnorm.spectral_norm(nn.Conv1dTranspose(3, 4, 3, has_bias=True), n_power_iterations=2)  # dim 1
    assert cell.training
    cell.set_train(training)
    x = Tensor(np.random.default_rng(7).standard_normal((2, 3, 5)).astype(np.float32))
    cell(x)  # a compiled graph exists before removal
    # Unit vectors far from the singular vectors, so that iterating or not changes w well beyond rounding.
    rng = np.random.default_rng(12)
    for param in (cell.weight_u, cell.weight_v):
        start = rng.standard_normal(param.shape)
        param.set_data(Tensor((start / np.linalg.norm(start)).astype(np.float32)))
    weight = _copy(cell.weight_orig)[:, :, 0, :]
    u, v = _state(cell)
    iterated = reference_spectral.power_iteration(weight, u, v, 1, 2, 1e-12)
    expected = reference_spectral.spectral_norm(weight, *(iterated if training else (u, v)), 1, 1e-12)
    other = reference_spectral.spectral_norm(weight, *((u, v) if training else iterated), 1, 1e-12)
    assert np.abs(expected - other).max() > 1e-3, "the case must tell iterating from not iterating"
    plain = xnorm.remove(cell)
    assert type(plain) is nn.Conv1dTranspose and not xnorm.is_wrapped(plain)
    assert [p.name for p in plain.get_parameters()] == ["weight", "bias"]
    assert plain.weight.requires_grad and plain.training == training
    assert_close(plain.weight.asnumpy()[:, :, 0, :], expected, "float32", "weight", what="weight after remove")


def test_remove_a_compiled_model_recompiles_with_the_plain_layers():
    ms.set_context(mode=ms.GRAPH_MODE)
    model = TwoLayers().set_train(True)
    x = Tensor(np.random.default_rng(8).standard_normal((4, 2, 7)).astype(np.float32))
    model(x)
    assert xnorm.remove(model) is model
    assert type(model.conv) is nn.Conv1d and type(model.head) is nn.Dense
    assert [p.name for p in model.get_parameters()] == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    model.head.weight.set_data(model.head.weight * 0.0)  # a reused graph would still read weight_orig
    np.testing.assert_array_equal(model(x).asnumpy(), np.broadcast_to(model.head.bias.asnumpy(), (4, 2)))


def test_mindir_export_in_eval_mode_computes_w_over_sigma(tmp_path):
    """The deployment path: an eval-mode export holds W / sigma from the current state, as the Cell does."""
    ms.set_context(mode=ms.GRAPH_MODE)
    model = TwoLayers()
    x = Tensor(np.random.default_rng(13).standard_normal((4, 2, 7)).astype(np.float32))
    model(x)  # training mode: moves the state away from the initial one
    model.set_train(False)
    ms.export(model, x, file_name=str(tmp_path / "sn"), file_format="MINDIR")
    exported = nn.GraphCell(ms.load(str(tmp_path / "sn.mindir")))
    np.testing.assert_array_equal(exported(x).asnumpy(), model(x).asnumpy())
    assert_close(model(x).asnumpy(), _eval_reference(model, x.asnumpy()), "float32", "forward", what="eval output")


# -- names, checkpoints, seeds, 1-D, float16 ---------------------------------------------------------------
def test_names_trainability_and_checkpoint_round_trip():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = TwoLayers().set_train(True)
    assert [p.name for p in model.trainable_params()] == ["conv.weight_orig", "conv.bias", "head.weight_orig",
                                                          "head.bias"]
    assert [p.name for p in model.get_parameters() if not p.requires_grad] == [
        "conv.weight_u", "conv.weight_v", "head.weight_u", "head.weight_v"]
    assert model.conv.weight_u.shape == (3,) and model.conv.weight_v.shape == (2 * 3,)
    assert model.head.weight_u.shape == (2,) and model.head.weight_v.shape == (15,)
    model(Tensor(np.ones((1, 2, 7), np.float32)))
    other = TwoLayers()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sn.ckpt")
        ms.save_checkpoint(model, path)
        not_loaded, _ = ms.load_param_into_net(other, ms.load_checkpoint(path), strict_load=True)
    assert not not_loaded
    for (name, mine), (_, theirs) in zip(model.parameters_and_names(), other.parameters_and_names(), strict=True):
        np.testing.assert_array_equal(theirs.asnumpy(), mine.asnumpy(), err_msg=name)
    emb = xnorm.spectral_norm(nn.Embedding(6, 4))
    assert [p.name for p in emb.get_parameters()] == ["embedding_table_orig", "embedding_table_u",
                                                      "embedding_table_v"]


def test_initial_state_is_numpy_draws_iterated_fifteen_times_and_a_seed_reproduces_it():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((5, 8))
    dense = nn.Dense(8, 5, dtype=ms.float64)
    dense.weight.set_data(Tensor(weight))
    ms.set_seed(11)
    first = _state(xnorm.spectral_norm(dense))
    ms.set_seed(11)
    u0, v0 = np.random.standard_normal(5), np.random.standard_normal(8)  # u first, then v
    u, v = reference_spectral.init_state(weight, u0, v0, 0, 1e-12)
    assert_close(first[0], u, "float64", "weight", what="u after wrap")
    assert_close(first[1], v, "float64", "weight", what="v after wrap")
    one_more = reference_spectral.power_iteration(weight, u, v, 0, 1, 1e-12)[0]
    assert np.abs(one_more - u).max() > 1e-6, f"{SPECTRAL_INIT_ITERATIONS} iterations do not converge here"
    ms.set_seed(11)
    np.testing.assert_array_equal(_state(xnorm.spectral_norm(dense))[0], first[0])
    ms.set_seed(12)
    assert not np.array_equal(_state(xnorm.spectral_norm(dense))[0], first[0])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_1d_parameter_is_divided_by_its_norm_and_has_no_state(mode):
    ms.set_context(mode=MODES[mode])
    dense = nn.Dense(3, 4)
    bias = np.array([3.0, -4.0, 0.0, 12.0], np.float32)
    dense.bias.set_data(Tensor(bias))
    cell = xnorm.spectral_norm(dense, name="bias")
    assert [p.name for p in cell.get_parameters()] == ["bias_orig", "weight"]
    x = np.ones((2, 3), np.float32)
    expected = x @ dense.weight.asnumpy().T + bias / 13.0
    assert_close(cell(Tensor(x)).asnumpy(), expected, "float32", "forward", what="output")
    plain = xnorm.remove(cell)
    np.testing.assert_allclose(plain.bias.asnumpy(), bias / 13.0, rtol=1e-6)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_float16_weights_keep_the_state_in_float32_and_cast_w_back_once(mode):
    """u, v float32 and iterated in float32, w = W / sigma rounded once to float16 (the reference with
    dtype="float16"), and the layer runs its float16 primitive on that w: bit-equal to the plain float16
    layer holding w (MindSpore's float16 CPU convolution itself misses the float16 forward tolerance)."""
    ms.set_context(mode=MODES[mode])
    case = CASES["conv1d"]
    rng = np.random.default_rng(10)
    weight = (rng.standard_normal(case.weight_shape) * 0.3).astype(np.float16)
    bias = (rng.standard_normal(case.bias_size) * 0.3).astype(np.float16)
    conv = build_mindspore_layer(case, ms.float16)
    conv.weight.set_data(Tensor(weight[:, :, None, :]))
    conv.bias.set_data(Tensor(bias))
    cell = xnorm.spectral_norm(conv)
    assert cell.weight_orig.dtype == ms.float16
    assert cell.weight_u.dtype == ms.float32 and cell.weight_v.dtype == ms.float32
    u, v = _state(cell)
    x = Tensor(rng.standard_normal(case.input_shape).astype(np.float16))
    y = cell(x)
    assert y.dtype == ms.float16
    w_ref, u, v = reference_spectral.training_call(weight, u, v, 0, 1, 1e-12, dtype="float16")
    assert_close(_state(cell)[0], u, "float32", "weight", what="u (float32) after a training-mode call")
    assert_close(_state(cell)[1], v, "float32", "weight", what="v (float32) after a training-mode call")
    w = cell.compute_weight()
    assert w.dtype == ms.float16
    assert_close(w.asnumpy()[:, :, 0, :], w_ref, "float16", "weight", what="w")
    plain = build_mindspore_layer(case, ms.float16)
    plain.weight.set_data(w)
    plain.bias.set_data(Tensor(bias))
    np.testing.assert_array_equal(y.asnumpy(), plain(x).asnumpy())


# -- refusals ---------------------------------------------------------------------------------------------
def _snapshot(cell):
    return [(key, p.name, str(p.dtype), p.requires_grad, p.asnumpy().copy()) for key, p in cell.parameters_and_names()]


def _assert_untouched(cell, before):
    after = _snapshot(cell)
    assert [entry[:4] for entry in after] == [entry[:4] for entry in before]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a[4], b[4])


@pytest.mark.parametrize("first", ["spectral", "weight_norm", "fused"])
@pytest.mark.parametrize("second", [xnorm.SpectralNorm(), xnorm.WeightNorm()], ids=["spectral", "weight_norm"])
def test_wrapping_a_wrapper_is_refused_and_names_the_fix(first, second):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    dense = nn.Dense(3, 2)
    if first == "spectral":
        wrapped = xnorm.spectral_norm(dense)
    else:
        wrapped = xnorm.wrap(dense, fused=first == "fused")
    before = _snapshot(wrapped)
    with pytest.raises(AlreadyWrappedError, match="xnorm.remove"):
        xnorm.wrap(wrapped, second)
    _assert_untouched(wrapped, before)


@pytest.mark.parametrize("dim", [2, -3, True, 1.0])
def test_bad_dim_is_refused(dim):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    dense = nn.Dense(3, 2)
    before = _snapshot(dense)
    draws = np.random.get_state()
    with pytest.raises(DimError):
        xnorm.spectral_norm(dense, dim=dim)
    _assert_untouched(dense, before)
    after = np.random.get_state()
    np.testing.assert_array_equal(after[1], draws[1])  # no draw either: the key and the position in it
    assert after[2:] == draws[2:]


def test_non_floating_weight_bad_options_and_fused_are_refused():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    dense = nn.Dense(3, 2)
    dense.weight = Parameter(Tensor(np.ones((2, 3), dtype=np.int32)), name="weight")
    before = _snapshot(dense)
    with pytest.raises(NonFloatingParameterError, match="floating"):
        xnorm.spectral_norm(dense)
    _assert_untouched(dense, before)
    dense = nn.Dense(3, 2)
    before = _snapshot(dense)
    for options in ({"n_power_iterations": 0}, {"eps": -1.0}):
        with pytest.raises(OptionError):
            xnorm.spectral_norm(dense, **options)
    backend = xnorm.registry.get_backend("mindspore")
    with pytest.raises(OptionError, match="fused"):
        backend.wrap(dense, xnorm.SpectralNorm(), name=None, fused=True)
    _assert_untouched(dense, before)


def test_compute_weight_and_sigma_do_not_move_the_state():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cell = xnorm.spectral_norm(nn.Dense(4, 3))
    before = _state(cell)
    w = cell.compute_weight().asnumpy()
    sigma = float(cell.sigma.asnumpy())
    np.testing.assert_array_equal(_state(cell)[0], before[0])
    weight = _copy(cell.weight_orig)
    assert_close(sigma, reference_spectral.sigma(weight, *before, 0), "float32", "weight", what="sigma")
    assert_close(w, weight / sigma, "float32", "weight", what="w")


# -- docs ---------------------------------------------------------------------------------------------------
def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_docs_example_runs_and_prints_what_it_says(tmp_path, capsys):
    """docs/mindspore.md, "Spectral normalization": the example runs as written and its comments are its output."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "mindspore.md"
    section = docs.read_text().split("\n## Spectral normalization\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "spectral_example.py"  # a real file: mindspore.jit reads the source it compiles
    script.write_text(code)
    namespace = runpy.run_path(str(script), run_name="spectral_example")
    lines = code.splitlines()
    promised = [line[2:] for before, line in zip(lines[:-1], lines[1:], strict=True)
                if before.startswith("print(") and line.startswith("# ")]
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if not _is_number(line)] == promised
    assert sum(_is_number(line) and float(line) > 0 for line in printed) == 1  # sigma
    net = namespace["net"]
    assert type(net.conv) is nn.Conv1d and type(net.head) is nn.Dense
