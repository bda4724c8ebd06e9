"""The MindSpore conformance adapters run MindSpore's front-end tasks on the calling thread
(``MS_DEV_HOST_BLOCKING_RUN=1``, set by their ``setup`` unless the environment says otherwise: see
``dispatch_on_calling_thread``). That must change only the speed: GRAPH_MODE train steps compiled with
``mindspore.jit`` give outputs, trained tensors and the state xnorm writes in place (spectral norm's u and
v) bit-equal to MindSpore's default hand-over to a ``frontend_queue`` thread; and a user's own setting
wins.

MindSpore reads the switch once per process, so each way runs in a child process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

# Sets the adapter up as the conformance runner does, then trains a weight-normed Conv1d, a spectral-normed
# Dense and an orthogonal Dense with a mindspore.jit step of value_and_grad and nn.SGD; saves every step's
# output, every parameter, the switch's value and the names of the process's threads.
CHILD = r"""
import os
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
import xnorm
from xnorm.conformance.adapters.mindspore import HOST_BLOCKING_RUN, MindSporeGraphAdapter

out = sys.argv[1]
MindSporeGraphAdapter().setup("cpu")
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

    @ms.jit
    def step(data):
        value, grads = grad(data)
        optimizer(grads)
        return value

    for index in range(8):
        saved[f"{name}/output{index}"] = cell(x).asnumpy()
        step(x)
    for param in cell.get_parameters():
        saved[f"{name}/{param.name}"] = param.asnumpy()
threads = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
np.savez(out, **saved, switch=np.array(os.environ.get(HOST_BLOCKING_RUN, "")), threads=np.array(threads))
"""


def _run(way: str, folder) -> dict:
    out = os.path.join(folder, f"{way}.npz")
    env = {key: value for key, value in os.environ.items() if key != "MS_DEV_HOST_BLOCKING_RUN"}
    env["OMP_NUM_THREADS"] = "1"
    if way == "handed-over":
        env["MS_DEV_HOST_BLOCKING_RUN"] = "0"  # the user's own setting: MindSpore's default behaviour
    # a file, since mindspore.jit reads its function's source; run from the temporary folder, where the
    # repository's source xnorm/ cannot shadow the installed package
    script = os.path.join(folder, "child.py")
    with open(script, "w") as handle:
        handle.write(CHILD)
    done = subprocess.run([sys.executable, script, out], env=env, capture_output=True, text=True,
                          timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("the thread names are read from /proc (Linux)")
    folder = tmp_path_factory.mktemp("host-blocking")
    return {way: _run(way, folder) for way in ("adapter-default", "handed-over")}


def test_the_adapter_runs_the_front_end_on_the_calling_thread(runs):
    assert str(runs["adapter-default"]["switch"]) == "1"
    assert "frontend_queue" not in list(runs["adapter-default"]["threads"])


def test_a_users_setting_wins(runs):
    assert str(runs["handed-over"]["switch"]) == "0"
    # and MindSpore then hands the work over, as by default: the thread the adapter avoids is there
    assert "frontend_queue" in list(runs["handed-over"]["threads"])


@pytest.mark.parametrize("reparametrization", ["weight_norm", "spectral_norm", "orthogonal"])
def test_the_calling_thread_computes_the_same_as_the_hand_over(reparametrization, runs):
    calling, handed_over = runs["adapter-default"], runs["handed-over"]
    keys = sorted(k for k in handed_over if k.startswith(reparametrization + "/"))
    assert keys and keys == sorted(k for k in calling if k.startswith(reparametrization + "/"))
    assert any(k.endswith("_u") for k in keys) or reparametrization != "spectral_norm"
    for key in keys:
        np.testing.assert_array_equal(calling[key], handed_over[key], err_msg=key)
    # the steps moved the parameters: a run that trained nothing would agree trivially
    first, last = (handed_over[f"{reparametrization}/output{index}"] for index in (0, 7))
    assert not np.array_equal(first, last)
