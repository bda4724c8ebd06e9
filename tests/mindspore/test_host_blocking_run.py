"""The MindSpore conformance adapters run MindSpore's front-end tasks on the calling thread
(``MS_DEV_HOST_BLOCKING_RUN=1``, set by their ``setup`` unless the environment says otherwise: see
``dispatch_on_calling_thread``). That must change only the speed: GRAPH_MODE train steps compiled with
``mindspore.jit`` give outputs, trained tensors and the state xnorm writes in place (spectral norm's u and
v) bit-equal to MindSpore's default hand-over to a ``frontend_queue`` thread; and a user's own setting
wins.

MindSpore reads the switch once per process, so each way runs in a child process.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from training_children import MODELS, assert_trained_alike, run_child  # noqa: E402 - this folder's helper

# Sets the adapter up as the conformance runner does, then trains the helper's three layers with a
# mindspore.jit step of value_and_grad and nn.SGD; saves the switch's value and the names of the process's
# threads too.
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
""" + MODELS + r"""
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("the thread names are read from /proc (Linux)")
    folder = tmp_path_factory.mktemp("host-blocking")
    # "handed-over": the user's own setting, MindSpore's default behaviour
    return {"adapter-default": run_child(CHILD, "adapter-default", folder),
            "handed-over": run_child(CHILD, "handed-over", folder, host_blocking_run="0")}


def test_the_adapter_runs_the_front_end_on_the_calling_thread(runs):
    assert str(runs["adapter-default"]["switch"]) == "1"
    assert "frontend_queue" not in list(runs["adapter-default"]["threads"])


def test_a_users_setting_wins(runs):
    assert str(runs["handed-over"]["switch"]) == "0"
    # and MindSpore then hands the work over, as by default: the thread the adapter avoids is there
    assert "frontend_queue" in list(runs["handed-over"]["threads"])


@pytest.mark.parametrize("reparametrization", ["weight_norm", "spectral_norm", "orthogonal"])
def test_the_calling_thread_computes_the_same_as_the_hand_over(reparametrization, runs):
    assert_trained_alike(reparametrization, runs["handed-over"], runs["adapter-default"])
