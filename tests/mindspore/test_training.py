"""A two-layer model trained under mindspore.jit: g and v follow the float64 reference step by step.

The community wrapper (``ops.Assign(inner.weight, g * v / ||v||)`` then ``inner(x)``, the conformance
suite's ``AssignWeightNorm``) is the counter-example: its g and v receive zero gradients and never
follow the reference.
"""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import xnorm
from xnorm import reference
from xnorm.conformance import layers
from xnorm.conformance.adapters.mindspore_community import AssignWeightNorm
from xnorm.conformance.cases import LayerCase
from xnorm.conformance.tolerances import assert_close
from xnorm.reference import round_to_dtype

LR = 0.2
STEPS = 4
DIMS = (0, 1)  # first layer: one norm per output row; second: one norm per input column
FIRST = LayerCase("first", "linear", (5, 4), (6, 4))
SECOND = LayerCase("second", "linear", (3, 5), (6, 5))


def assign_wrapper(layer, dim):
    """The community wrapper on a Dense (weight (out, in)): the norm runs over the axis other than ``dim``."""
    return AssignWeightNorm(layer, axes=(1 - dim,))


def _bias(cell):
    return cell.layer.bias if isinstance(cell, AssignWeightNorm) else cell.bias


class TwoLayer(nn.Cell):
    def __init__(self, wrap):
        super().__init__()
        rng = np.random.default_rng(3)
        first, second = nn.Dense(4, 5), nn.Dense(5, 3)
        for layer, case in ((first, FIRST), (second, SECOND)):
            layer.weight.set_data(Tensor(rng.standard_normal(case.weight_shape).astype(np.float32) * 0.5))
            layer.bias.set_data(Tensor(rng.standard_normal(case.weight_shape[0]).astype(np.float32) * 0.1))
        self.first = wrap(first, DIMS[0])
        self.second = wrap(second, DIMS[1])

    def construct(self, x):
        return self.second(self.first(x))


def reference_step(state, x, target):
    """One float64 SGD step of 0.5 * mean((y - target)^2) through both layers; float32 rounding after."""
    (g1, v1, b1), (g2, v2, b2) = state
    w1, w2 = reference.weight_norm(g1, v1, DIMS[0]), reference.weight_norm(g2, v2, DIMS[1])
    h = layers.forward(FIRST, w1, b1, x)
    y = layers.forward(SECOND, w2, b2, h)
    grad_y = (y - target) / y.size
    grad_w2, grad_b2 = layers.backward(SECOND, w2, h, grad_y)
    grad_h = grad_y @ w2
    grad_w1, grad_b1 = layers.backward(FIRST, w1, x, grad_h)
    new = []
    for (g, v, b), grad_w, grad_b, dim in (((g1, v1, b1), grad_w1, grad_b1, DIMS[0]),
                                           ((g2, v2, b2), grad_w2, grad_b2, DIMS[1])):
        grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
        new.append(tuple(round_to_dtype(p - LR * d, "float32").astype(np.float64)
                         for p, d in ((g, grad_g), (v, grad_v), (b, grad_b))))
    return new


def trajectory(model):
    """Train ``model`` STEPS times with a jitted value_and_grad + nn.SGD step; compare with the reference.

    Returns the list of (step, layer, name, actual, expected) to compare.
    """
    rng = np.random.default_rng(4)
    x = rng.standard_normal(FIRST.input_shape).astype(np.float32)
    target = rng.standard_normal((6, 3)).astype(np.float32)
    optimizer = nn.SGD(model.trainable_params(), learning_rate=LR)

    def loss_fn(data, goal):
        diff = model(data) - goal
        return 0.5 * (diff * diff).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def train_step(data, goal):
        loss, grads = grad_fn(data, goal)
        optimizer(grads)
        return loss

    def current():
        return [tuple(p.asnumpy().astype(np.float64) for p in (layer.weight_g, layer.weight_v, _bias(layer)))
                for layer in (model.first, model.second)]

    state = current()
    comparisons = []
    for step in range(1, STEPS + 1):
        train_step(Tensor(x), Tensor(target))
        state = reference_step(state, x.astype(np.float64), target.astype(np.float64))
        for index, (actual, expected) in enumerate(zip(current(), state, strict=True)):
            for name, a, e in zip(("g", "v", "bias"), actual, expected, strict=True):
                comparisons.append((step, index, name, a, e))
    return comparisons


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_xnorm_wrapper_trains_g_and_v_as_the_reference(mode):
    ms.set_context(mode=mode)
    model = TwoLayer(lambda layer, dim: xnorm.wrap(layer, dim=dim))
    names = [p.name for p in model.trainable_params()]
    assert names == ["first.weight_g", "first.weight_v", "first.bias", "second.weight_g", "second.weight_v",
                     "second.bias"]
    g_before = model.first.weight_g.asnumpy().copy()
    for step, layer, name, actual, expected in trajectory(model):
        assert_close(actual, expected, "float32", "training", what=f"layer {layer} {name} after step {step}")
    assert not np.allclose(model.first.weight_g.asnumpy(), g_before)  # training did move g


def test_assign_wrapper_counter_example_does_not_train_g_and_v():
    ms.set_context(mode=ms.GRAPH_MODE)
    model = TwoLayer(assign_wrapper)
    g_before = model.first.weight_g.asnumpy().copy()
    v_before = model.first.weight_v.asnumpy().copy()
    comparisons = trajectory(model)
    for step, layer, name, actual, expected in comparisons:
        if name == "bias":
            continue  # the bias is an ordinary parameter of the inner layer: it does train
        if step == STEPS:
            with pytest.raises(AssertionError):
                assert_close(actual, expected, "float32", "training", what=f"layer {layer} {name}")
    # Exactly zero gradients: g and v never move.
    np.testing.assert_array_equal(model.first.weight_g.asnumpy(), g_before)
    np.testing.assert_array_equal(model.first.weight_v.asnumpy(), v_before)
