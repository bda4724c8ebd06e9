"""PYNATIVE_MODE computes the same to the bit whether MindSpore launches its operations asynchronously
(the default) or synchronously (``mindspore.runtime.launch_blocking``, which the ``mindspore-pynative``
conformance adapter uses because it is an order of magnitude faster there): forward outputs, trained
tensors and the state xnorm writes in place (spectral norm's u and v), through training steps.

Synchronous launching cannot be undone in a process, so each way runs in a child process, with MindSpore's
default dispatch whatever an adapter's setup earlier in this process put in the environment.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from training_children import MODELS, assert_trained_alike, run_child  # noqa: E402 - this folder's helper

# Trains the helper's three layers (the orthogonal one's matrix_exp squarings, run eagerly, read a tensor on
# the host) with value_and_grad and nn.SGD, op by op.
CHILD = r"""
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
import xnorm

blocking, out = BLOCKING, sys.argv[1]
ms.set_context(mode=ms.PYNATIVE_MODE)
if blocking:
    ms.runtime.launch_blocking()
""" + MODELS + r"""
for name, (cell, shape) in models.items():
    x = Tensor(rng.standard_normal(shape).astype(np.float32))

    def loss(data):
        y = cell(data)
        return (y * y).mean()

    optimizer = nn.SGD(cell.trainable_params(), learning_rate=0.3)
    grad = ms.value_and_grad(loss, None, optimizer.parameters)
    for step in range(8):
        saved[f"{name}/output{step}"] = cell(x).asnumpy()
        _, grads = grad(x)
        optimizer(grads)
    for param in cell.get_parameters():
        saved[f"{name}/{param.name}"] = param.asnumpy()
np.savez(out, **saved)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("launch")
    return {way: run_child(CHILD.replace("BLOCKING", str(way == "blocking")), way, folder)
            for way in ("async", "blocking")}


@pytest.mark.parametrize("reparametrization", ["weight_norm", "spectral_norm", "orthogonal"])
def test_synchronous_launching_computes_the_same_as_asynchronous(reparametrization, runs):
    assert_trained_alike(reparametrization, runs["async"], runs["blocking"])
