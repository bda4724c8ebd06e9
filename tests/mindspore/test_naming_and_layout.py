"""Parameter names follow torch's legacy weight_norm; dim is read in the canonical (torch) layout."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import xnorm
from xnorm import reference
from xnorm.conformance.tolerances import assert_close


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = xnorm.wrap(nn.Conv2d(3, 4, 3, has_bias=True), dim=0)
        self.emb = xnorm.wrap(nn.Embedding(7, 3))

    def construct(self, x):
        return self.conv(x)


def test_names_like_torch_and_no_leftover_weight(tmp_path):
    net = Net()
    names = [p.name for p in net.trainable_params()]
    assert names == ["conv.weight_g", "conv.weight_v", "conv.bias", "emb.embedding_table_g", "emb.embedding_table_v"]
    assert [key for key, _ in net.parameters_and_names()] == names
    path = str(tmp_path / "net.ckpt")
    ms.save_checkpoint(net, path)
    assert sorted(ms.load_checkpoint(path)) == sorted(names)


def test_wrapping_after_construction_renames_relative_to_attachment():
    model = nn.SequentialCell([nn.Dense(3, 4), nn.Dense(4, 2, has_bias=False)])
    model[0] = xnorm.wrap(model[0])
    assert [p.name for p in model.trainable_params()] == ["0.weight_g", "0.weight_v", "0.bias", "1.weight"]


def test_conv1d_dim2_is_the_kernel_axis():
    conv = nn.Conv1d(2, 3, 4, has_bias=False)
    canonical = conv.weight.asnumpy()[:, :, 0, :]  # MindSpore stores (out, in, 1, k)
    wrapped = xnorm.wrap(conv, dim=2)
    g = wrapped.weight_g.asnumpy()
    assert g.shape == (1, 1, 1, 4)
    g_ref, _ = reference.init(canonical, dim=2)  # torch's Conv1d dim=2: one norm per kernel position
    assert_close(g[:, :, 0, :], g_ref, "float32", "weight", what="g")
    # dim=-2 counts from the end of the canonical (3-axis) layout: the in-channel axis.
    assert xnorm.wrap(nn.Conv1d(2, 3, 4), dim=-2).weight_g.shape == (1, 2, 1, 1)


def test_conv1d_transpose_dims_and_whole_tensor():
    layer = nn.Conv1dTranspose(2, 6, 3)
    assert xnorm.wrap(layer, dim=1).weight_g.shape == (1, 6, 1, 1)
    for dim in (None, -1):
        wrapped = xnorm.wrap(nn.Conv1dTranspose(2, 6, 3), dim=dim)
        assert wrapped.weight_g.shape == ()
        assert_close(wrapped.weight_g.asnumpy(), np.linalg.norm(wrapped.weight_v.asnumpy().astype(np.float64)),
                     "float32", "weight", what="g")


def test_wrapped_layer_keeps_its_output():
    dense = nn.Dense(5, 3, activation="tanh")
    x = Tensor(np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32))
    plain = dense(x).asnumpy()
    wrapped = xnorm.wrap(dense, dim=1)
    assert_close(wrapped(x).asnumpy(), plain, "float32", "forward", what="wrapped output")
