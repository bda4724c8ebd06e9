"""float16 weights: g and v stay float16, the norm and w are computed in float32, w is cast back once."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import xnorm
from xnorm import reference
from xnorm.conformance import layers
from xnorm.conformance.cases import LayerCase
from xnorm.conformance.tolerances import assert_close


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_float16_conv2d(mode):
    ms.set_context(mode=mode)
    case = LayerCase("c", "conv2d", (4, 3, 3, 3), (2, 3, 5, 5), bias=False, stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1), output_padding=(0, 0))
    rng = np.random.default_rng(6)
    weight = (rng.standard_normal(case.weight_shape) * 0.3).astype(np.float16)
    x = rng.standard_normal(case.input_shape).astype(np.float16)
    conv = nn.Conv2d(3, 4, 3, pad_mode="valid", dtype=ms.float16)
    conv.weight.set_data(Tensor(weight))
    wrapped = xnorm.wrap(conv, dim=0)
    assert wrapped.weight_g.dtype == ms.float16 and wrapped.weight_v.dtype == ms.float16
    g = wrapped.weight_g.asnumpy()
    g_ref, _ = reference.init(weight, 0, dtype="float16")
    assert_close(g, g_ref, "float16", "weight", what="g")
    w = wrapped.compute_weight()
    assert w.dtype == ms.float16
    # Exactly what the spec computes: float32 norm and product, one rounding to float16.
    np.testing.assert_array_equal(w.asnumpy(), reference.weight_norm(g, weight, 0, dtype="float16"))
    y = wrapped(Tensor(x))
    assert y.dtype == ms.float16
    assert_close(y.asnumpy(), layers.forward(case, w.asnumpy(), None, x), "float16", "forward", what="output")
