"""The fine-tuning case of ``xnorm.freeze`` (conformance/fine_tuning.py's script) in MindSpore, for the
``mindspore-graph`` and ``mindspore-pynative`` adapters: the case's conv net from ``mindspore.nn`` layers
(NCHW as torch), bn1 frozen with ``xnorm.freeze``, trained with a ``value_and_grad`` + ``nn.SGD`` step (a
``mindspore.jit`` function in GRAPH_MODE) built after freezing, and a new one after ``xnorm.unfreeze``."""

from __future__ import annotations

from typing import Dict, List

import mindspore
import numpy as np
from mindspore import nn

import xnorm

from .. import fine_tuning
from .mindspore import _DTYPES, _tensor, _to_numpy, build_mindspore_layer, storage_layout

__all__ = ["fine_tune"]


class _FineTuningNet(nn.Cell):
    """The model of :mod:`xnorm.conformance.fine_tuning`: ``backbone`` (conv1, bn1, relu), then conv2, bn2,
    relu, the mean over H and W, and fc."""

    def __init__(self, dtype, momentum: float, eps: float):
        super().__init__()
        channels = fine_tuning.CHANNELS
        self.backbone = nn.SequentialCell([
            build_mindspore_layer(fine_tuning.CONV1, dtype),
            nn.BatchNorm2d(channels, eps=eps, momentum=momentum, dtype=dtype),
            nn.ReLU(),
        ])
        self.conv2 = nn.Conv2d(channels, channels, 1, has_bias=True, dtype=dtype)
        self.bn2 = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, dtype=dtype)
        self.relu = nn.ReLU()
        self.fc = nn.Dense(channels, fine_tuning.CLASSES, dtype=dtype)

    def construct(self, x):
        h = self.relu(self.bn2(self.conv2(self.backbone(x))))
        return self.fc(h.mean(axis=(2, 3)))


# fine_tuning's neutral names -> the model's parameter names (torch's running_mean is moving_mean, ...)
_FINE_TUNING_LAYERS = {"conv1": "backbone.0", "bn1": "backbone.1", "conv2": "conv2", "bn2": "bn2", "fc": "fc"}
_FINE_TUNING_TENSORS = {"weight": "weight", "bias": "bias", "running_mean": "moving_mean",
                        "running_var": "moving_variance"}
_BATCHNORM_TENSORS = {"weight": "gamma", "bias": "beta"}


def _fine_tuning_name(key: str) -> str:
    layer, _, tensor = key.partition(".")
    names = _BATCHNORM_TENSORS if layer.startswith("bn") else {}
    return f"{_FINE_TUNING_LAYERS[layer]}.{names.get(tensor, _FINE_TUNING_TENSORS[tensor])}"


def fine_tune(run: fine_tuning.FineTuningRun, mode) -> List[Dict[str, np.ndarray]]:
    """The fine-tuning script with ``set_train(True)`` before each step, a train step built as
    the adapter's ``sgd_step`` (value_and_grad and nn.SGD, a ``mindspore.jit`` function in GRAPH_MODE) over
    ``trainable_params()`` after ``xnorm.freeze``, and a new one after ``xnorm.unfreeze``."""
    mindspore.set_context(mode=mode)
    momentum, eps = run.framework_settings("mindspore")
    model = _FineTuningNet(_DTYPES[run.dtype], momentum, eps)
    params = dict(model.parameters_and_names())
    conv1_layout = storage_layout(fine_tuning.CONV1)
    for key, value in run.weights.items():
        value = conv1_layout.to_storage(np.asarray(value)) if key == "conv1.weight" else value
        params[_fine_tuning_name(key)].set_data(_tensor(value, run.dtype))
    model.set_train(True)
    params["backbone.0.weight"].requires_grad = False  # the user's own freezing of the backbone's conv
    if run.freeze:
        frozen = _FINE_TUNING_LAYERS[fine_tuning.FROZEN_LAYER]
        xnorm.freeze(model, layers=lambda name, cell: name == frozen)

    def new_train_step():
        optimizer = nn.SGD(model.trainable_params(), learning_rate=run.lr)

        def loss_fn(data, target):
            diff = model(data) - target
            return 0.5 * (diff * diff).mean()

        grad_fn = mindspore.value_and_grad(loss_fn, None, optimizer.parameters)

        def train_step(data, target):
            loss, grads = grad_fn(data, target)
            optimizer(grads)
            return loss

        return mindspore.jit(train_step) if mode == mindspore.GRAPH_MODE else train_step

    test_x = _tensor(run.test_x, run.dtype)

    def record() -> Dict[str, np.ndarray]:
        model.set_train(False)
        out = {key: _to_numpy(params[_fine_tuning_name(key)]) for key in run.weights}
        out["conv1.weight"] = conv1_layout.to_canonical(out["conv1.weight"])
        out["backbone_eval"] = _to_numpy(model.backbone(test_x))
        out["output_eval"] = _to_numpy(model(test_x))
        model.set_train(True)
        return out

    def step(train_step, batch) -> None:
        model.set_train(True)  # what undoes a hand-made bn.set_train(False), every epoch
        train_step(_tensor(batch[0], run.dtype), _tensor(batch[1], run.dtype))

    return run.schedule(record=record, new_trainer=new_train_step, step=step, unfreeze=lambda: xnorm.unfreeze(model))
