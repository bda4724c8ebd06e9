"""mindspore.export to MINDIR works on a model with wrapped Cells and on the removed one."""

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

import xnorm


class Model(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = xnorm.wrap(nn.Conv1d(2, 3, 3, pad_mode="pad", padding=1, has_bias=True), dim=2)
        self.head = xnorm.wrap(nn.Dense(3 * 5, 2), dim=0)

    def construct(self, x):
        return self.head(self.conv(x).reshape(x.shape[0], -1))


def _export_and_reload(model, x, path):
    ms.export(model, x, file_name=str(path), file_format="MINDIR")
    return nn.GraphCell(ms.load(str(path) + ".mindir"))(x).asnumpy()


def test_export_wrapped_and_removed(tmp_path):
    ms.set_context(mode=ms.GRAPH_MODE)
    model = Model()
    model.conv.weight_g.set_data(model.conv.weight_g * 2.0)  # make w differ from the original weight
    x = Tensor(np.random.default_rng(5).standard_normal((2, 2, 5)).astype(np.float32))
    y = model(x).asnumpy()
    np.testing.assert_array_equal(_export_and_reload(model, x, tmp_path / "wrapped"), y)
    xnorm.remove(model)
    y_removed = model(x).asnumpy()
    np.testing.assert_allclose(y_removed, y, rtol=1.3e-6, atol=1e-5)
    np.testing.assert_array_equal(_export_and_reload(model, x, tmp_path / "removed"), y_removed)
