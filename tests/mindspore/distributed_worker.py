"""One process of the MindSpore data-parallel tests (tests/mindspore/test_distributed.py).

MindSpore's dynamic cluster decides the role from environment variables, the same script for every
process: ``MS_ROLE=MS_SCHED`` (the scheduler: ``init()`` serves the cluster until the workers leave, then
the process exits) or ``MS_ROLE=MS_WORKER`` with ``MS_NODE_ID`` (its rank), and in both ``MS_WORKER_NUM``,
``MS_SCHED_HOST``, ``MS_SCHED_PORT``. Without ``MS_ROLE`` the same steps run in one process on the whole
batch, the run the test compares the ranks with:

    python tests/mindspore/distributed_worker.py OUT_DIR {graph,pynative}

Every scenario trains a model whose layers carry every xnorm reparametrization for a few SGD steps, each
rank on its half of the batch, and saves every Parameter of the model (trainable ones and the state:
spectral norm's u and v, the orthogonal base) into ``OUT_DIR/<mode>-<scenario>-rank<r>.npz``, or the error a
step raised into ``OUT_DIR/<mode>-<scenario>-rank<r>.error``. The single process writes
``<mode>-<scenario>-single.npz``, and the model's values before training in ``initial.npz``.
Kept apart from the test module so that the ranks import nothing of pytest.
"""

from __future__ import annotations

import os
import sys
import traceback

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

import xnorm

STEPS = 3
LR = 0.1
BATCH = 8  # the whole batch; each of the two ranks takes half


def build_model(seed: int = 0) -> nn.Cell:
    """Every reparametrization xnorm has, in one small model. Every rank must start from the same values
    (unless parameters are broadcast): the weights come from a NumPy generator, and the draws of the
    wrappers themselves (spectral norm's u and v, the orthogonal completion) from NumPy's global RNG, both
    seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    layers = [
        nn.Conv1d(3, 6, 3, pad_mode="valid", has_bias=True),
        nn.Conv1d(6, 6, 3, pad_mode="valid", has_bias=True),
        nn.Dense(6 * 4, 8),
        nn.Dense(8, 8),
        nn.Dense(8, 2),
    ]
    for layer in layers:
        for param in layer.get_parameters():
            scale = 0.5 if param.ndim > 1 else 0.1
            param.set_data(Tensor((scale * rng.standard_normal(param.shape)).astype(np.float32)))
    np.random.seed(seed)
    return nn.SequentialCell(
        xnorm.weight_norm(layers[0]),
        nn.Tanh(),
        xnorm.weight_norm(layers[1], fused=True),
        nn.Flatten(),
        xnorm.spectral_norm(layers[2]),
        nn.Tanh(),
        xnorm.orthogonal(layers[3]),
        layers[4],
    )


def data(step: int):
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((BATCH, 3, 8)).astype(np.float32)
    fake = rng.standard_normal((BATCH, 3, 8)).astype(np.float32)
    target = rng.standard_normal((BATCH, 2)).astype(np.float32)
    return x, fake, target


class Supervised(nn.Cell):
    """One forward: 0.5 * mean((y - target)^2)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # the model's parameter names stay those of the model
        self.model = model

    def construct(self, x, fake, target):
        return 0.5 * ((self.model(x) - target) ** 2).mean()


class Gan(nn.Cell):
    """A discriminator's loss: two forwards (real, fake) in one step, so spectral norm iterates twice."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, x, fake, target):
        return ops.softplus(-self.model(x)).mean() + ops.softplus(self.model(fake)).mean()


LOSSES = {"supervised": Supervised, "gan": Gan}

SCENARIOS = {
    # name: (loss, how the step is written)
    # value_and_grad, DistributedGradReducer and the optimizer in one mindspore.jit function
    "functional-supervised": ("supervised", "functional"),
    "functional-gan": ("gan", "functional"),
    # nn.TrainOneStepCell, which builds its DistributedGradReducer from the auto-parallel context
    "train-one-step-supervised": ("supervised", "train-one-step"),
    # each rank builds its model from its own seed, and parameter_broadcast=True asks for rank 0's values
    "train-one-step-broadcast": ("supervised", "train-one-step-broadcast"),
}


def train(model: nn.Cell, loss: str, how: str, rank: int, world: int) -> None:
    """STEPS SGD steps; rank r takes rows r * BATCH / world ... of each batch (world 1: all of them)."""
    net = LOSSES[loss](model)
    optimizer = nn.SGD(model.trainable_params(), learning_rate=LR)
    if how.startswith("train-one-step"):
        step = nn.TrainOneStepCell(net, optimizer)
        step.set_train()
    else:
        grad_fn = ms.value_and_grad(net, None, optimizer.parameters)
        # with world 1 there is no cluster to reduce over (and no parallel context asking for it)
        reducer = nn.DistributedGradReducer(optimizer.parameters) if world > 1 else None

        def step(x, fake, target):
            value, grads = grad_fn(x, fake, target)
            if reducer is not None:
                grads = reducer(grads)
            optimizer(grads)
            return value

        if ms.get_context("mode") == ms.GRAPH_MODE:
            step = ms.jit(step)
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    for index in range(STEPS):
        x, fake, target = (Tensor(array[rows]) for array in data(index))
        step(x, fake, target)


def state(model: nn.Cell) -> dict:
    """Every Parameter by name: g, v, W (``_orig``), biases, and the state u, v, base."""
    return {param.name: param.asnumpy().copy() for param in model.get_parameters()}


def main(out_dir: str, mode: str) -> None:
    ms.set_context(mode={"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}[mode])
    ms.set_device("CPU")
    distributed = "MS_ROLE" in os.environ
    if distributed:
        from mindspore.communication import get_group_size, get_rank, init

        init()  # the scheduler serves the cluster here and its process exits when the workers are done
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        rank, world, tag = get_rank(), get_group_size(), f"rank{get_rank()}"
    else:
        rank, world, tag = 0, 1, "single"
        np.savez(os.path.join(out_dir, "initial.npz"), **state(build_model()))
    for name, (loss, how) in SCENARIOS.items():
        path = os.path.join(out_dir, f"{mode}-{name}-{tag}")
        broadcast = how.endswith("broadcast") and distributed
        try:
            model = build_model(seed=rank if broadcast else 0)
            if broadcast:
                ms.set_auto_parallel_context(parameter_broadcast=True)
            train(model, loss, how, rank, world)
            np.savez(path + ".npz", **state(model))
        except Exception as error:  # the test reports it with the scenario's name
            with open(path + ".error", "w") as file:
                file.write(f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}")
        finally:
            if broadcast:
                ms.set_auto_parallel_context(parameter_broadcast=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
