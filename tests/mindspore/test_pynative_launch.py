"""PYNATIVE_MODE computes the same to the bit whether MindSpore launches its operations asynchronously
(the default) or synchronously (``mindspore.runtime.launch_blocking``, which the ``mindspore-pynative``
conformance adapter uses because it is an order of magnitude faster there): forward outputs, trained
tensors and the state xnorm writes in place (spectral norm's u and v), through training steps.

Synchronous launching cannot be undone in a process, so each way runs in a child process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

# Trains a weight-normed Conv1d, a spectral-normed Dense (u and v written in place every step) and an
# orthogonal Dense (matrix_exp, whose eager squarings read a tensor on the host) with value_and_grad and
# nn.SGD, then saves every parameter and each step's output.
CHILD = r"""
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
import xnorm

blocking, out = sys.argv[1] == "blocking", sys.argv[2]
ms.set_context(mode=ms.PYNATIVE_MODE)
if blocking:
    ms.runtime.launch_blocking()
ms.set_seed(0)  # spectral norm draws u and v from NumPy's global RNG, which this seeds
rng = np.random.default_rng(0)

def filled(layer):
    for param in layer.trainable_params():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    return layer

models = {
    "weight_norm": (xnorm.weight_norm(filled(nn.Conv1d(3, 4, 3, pad_mode="valid", has_bias=True))), (2, 3, 9)),
    "spectral_norm": (xnorm.spectral_norm(filled(nn.Dense(6, 5)), n_power_iterations=2), (4, 6)),
    "orthogonal": (xnorm.orthogonal(filled(nn.Dense(5, 5)), "matrix_exp", use_trivialization=False), (4, 5)),
}
saved = {}
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


def _run(way: str, folder) -> dict:
    out = os.path.join(folder, f"{way}.npz")
    # MindSpore's default dispatch, whatever an adapter's setup earlier in this process put in the environment
    env = {key: value for key, value in os.environ.items() if key != "MS_DEV_HOST_BLOCKING_RUN"}
    env["OMP_NUM_THREADS"] = "1"
    # run from the temporary folder: `python -c` puts the working directory first on the path, where the
    # repository's source xnorm/ would shadow the installed package
    done = subprocess.run([sys.executable, "-c", CHILD, way, out], env=env, capture_output=True, text=True,
                          timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("launch")
    return {way: _run(way, folder) for way in ("async", "blocking")}


@pytest.mark.parametrize("reparametrization", ["weight_norm", "spectral_norm", "orthogonal"])
def test_synchronous_launching_computes_the_same_as_asynchronous(reparametrization, runs):
    asynchronous, synchronous = runs["async"], runs["blocking"]
    keys = sorted(k for k in asynchronous if k.startswith(reparametrization + "/"))
    assert keys and keys == sorted(k for k in synchronous if k.startswith(reparametrization + "/"))
    assert any(k.endswith("_u") for k in keys) or reparametrization != "spectral_norm"
    for key in keys:
        np.testing.assert_array_equal(synchronous[key], asynchronous[key], err_msg=key)
    # the steps moved the parameters: a run that trained nothing would agree trivially
    first, last = (asynchronous[f"{reparametrization}/output{step}"] for step in (0, 7))
    assert not np.array_equal(first, last)

