"""remove: a plain layer of the original class, same outputs, and compiled graphs are not reused."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import xnorm
from xnorm.conformance.tolerances import assert_close


def _x(*shape):
    return Tensor(np.random.default_rng(1).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_remove_returns_plain_layer_with_same_output(mode):
    ms.set_context(mode=mode)
    wrapped = xnorm.wrap(nn.Conv1d(2, 4, 3, has_bias=True), dim=2)
    wrapped.weight_g.set_data(wrapped.weight_g * 1.5)  # w no longer equals the original weight
    x = _x(2, 2, 7)
    y = wrapped(x).asnumpy()
    w = wrapped.compute_weight().asnumpy()
    plain = xnorm.remove(wrapped)
    assert type(plain) is nn.Conv1d
    assert [p.name for p in plain.trainable_params()] == ["weight", "bias"]
    np.testing.assert_array_equal(plain.weight.asnumpy(), w)
    assert_close(plain(x).asnumpy(), y, "float32", "forward", what="removed output")
    assert not xnorm.is_wrapped(plain)


class Model(nn.Cell):
    def __init__(self):
        super().__init__()
        self.body = nn.SequentialCell([xnorm.wrap(nn.Dense(4, 5)), nn.Tanh()])
        self.head = xnorm.wrap(nn.Dense(5, 2), dim=None)

    def construct(self, x):
        return self.head(self.body(x))


def test_remove_model_in_graph_mode_recompiles():
    ms.set_context(mode=ms.GRAPH_MODE)
    model = Model()
    x = _x(3, 4)
    y_wrapped = model(x).asnumpy()  # compiles the graph of the wrapped model
    assert xnorm.remove(model) is model
    assert type(model.body[0]) is nn.Dense and type(model.head) is nn.Dense
    assert [p.name for p in model.trainable_params()] == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    assert_close(model(x).asnumpy(), y_wrapped, "float32", "forward", what="output after remove")
    # The next call must run the plain layers: change them and the output must follow. A reused graph
    # would still read the wrappers' g and v and return y_wrapped.
    model.head.weight.set_data(model.head.weight * 0.0)
    np.testing.assert_array_equal(model(x).asnumpy(), np.broadcast_to(model.head.bias.asnumpy(), (3, 2)))
