"""What two tests run in child processes to show that a process-wide MindSpore switch changes only the speed
(test_pynative_launch.py: synchronous launching; test_host_blocking_run.py: the front end on the calling
thread): each child trains the same three wrapped layers and saves every step's output and every parameter,
and the tests compare two children's arrays to the bit.
"""

import os
import subprocess
import sys
from typing import Dict, Optional

import numpy as np

from xnorm.conformance.adapters.mindspore import HOST_BLOCKING_RUN

#: A child script's middle part: a weight-normed Conv1d, a spectral-normed Dense (u and v written in place
#: every step) and an orthogonal Dense (matrix_exp), filled from a seeded generator, as ``models`` (name ->
#: (cell, input shape)); ``saved`` to be filled and ``rng`` to draw the inputs from. The child imports
#: ``numpy as np``, ``mindspore as ms``, ``Tensor``, ``nn`` and ``xnorm`` before it.
MODELS = r"""
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
"""



def run_child(script: str, name: str, folder, *, host_blocking_run: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Run ``script`` (a file, since ``mindspore.jit`` reads its functions' source) with the path of an
    ``.npz`` as its only argument, from ``folder`` (where the repository's source xnorm/ cannot shadow the
    installed package), one OpenMP thread, and ``MS_DEV_HOST_BLOCKING_RUN`` set to ``host_blocking_run``
    (None: unset, whatever this process has); the arrays it saved."""
    path, out = os.path.join(folder, f"{name}.py"), os.path.join(folder, f"{name}.npz")
    with open(path, "w") as handle:
        handle.write(script)
    env = {key: value for key, value in os.environ.items() if key != HOST_BLOCKING_RUN}
    env["OMP_NUM_THREADS"] = "1"
    if host_blocking_run is not None:
        env[HOST_BLOCKING_RUN] = host_blocking_run
    done = subprocess.run([sys.executable, path, out], env=env, capture_output=True, text=True, timeout=300,
                          cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return dict(arrays)


def assert_trained_alike(reparametrization: str, first: Dict[str, np.ndarray], second: Dict[str, np.ndarray]):
    """Both children saved the same keys for ``reparametrization`` (spectral norm's u among them), bit-equal,
    and the training moved the outputs (a run that trained nothing would agree trivially)."""
    keys = sorted(k for k in first if k.startswith(reparametrization + "/"))
    assert keys and keys == sorted(k for k in second if k.startswith(reparametrization + "/"))
    assert any(k.endswith("_u") for k in keys) or reparametrization != "spectral_norm"
    for key in keys:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)
    assert not np.array_equal(first[f"{reparametrization}/output0"], first[f"{reparametrization}/output7"])
