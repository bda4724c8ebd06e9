"""The fine-tuning case of ``xnorm.freeze`` (conformance/fine_tuning.py's script) in torch, for the
``torch`` adapter: the case's conv net from ``torch.nn`` layers, bn1 frozen with ``xnorm.freeze``, conv1 out
of training with ``requires_grad_(False)``, plain SGD."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import nn

import xnorm

from .. import fine_tuning
from .torch import _DTYPES, _to_numpy

__all__ = ["fine_tune"]


def fine_tune(run: fine_tuning.FineTuningRun, device: str) -> List[Dict[str, np.ndarray]]:
    """The fine-tuning script on ``device`` ("cpu", "cuda"): ``model.train()`` before each step, an SGD
    optimizer over the parameters that require grad, built after ``xnorm.freeze`` and again after
    ``xnorm.unfreeze``."""

    def tensor(array, dtype):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)

    dtype = _DTYPES[run.dtype]
    momentum, eps = run.framework_settings("torch")
    channels = fine_tuning.CHANNELS
    backbone = nn.Sequential(
        nn.Conv2d(fine_tuning.IN_CHANNELS, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels, eps=eps, momentum=momentum),
        nn.ReLU(),
    )
    model = nn.Sequential(
        backbone,
        nn.Conv2d(channels, channels, 1),
        nn.BatchNorm2d(channels, eps=eps, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, fine_tuning.CLASSES),
    ).to(device, dtype)
    # neutral name -> torch's; state_dict keys hold parameters and running statistics alike
    names = {"conv1": "0.0", "bn1": "0.1", "conv2": "1", "bn2": "2", "fc": "6"}

    def torch_key(key: str) -> str:
        layer, _, tensor = key.partition(".")
        return f"{names[layer]}.{tensor}"

    state = model.state_dict()
    with torch.no_grad():
        for key, value in run.weights.items():
            state[torch_key(key)].copy_(tensor(value, dtype))
    model.train()
    backbone[0].requires_grad_(False)  # the user's own freezing of the backbone's convolution
    if run.freeze:
        xnorm.freeze(model, layers=lambda name, layer: name == names[fine_tuning.FROZEN_LAYER])

    def new_optimizer():
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=run.lr)

    test_x = tensor(run.test_x, dtype)

    def record() -> Dict[str, np.ndarray]:
        model.eval()
        with torch.no_grad():
            out = {key: _to_numpy(state[torch_key(key)]) for key in run.weights}
            out["backbone_eval"] = _to_numpy(backbone(test_x))
            out["output_eval"] = _to_numpy(model(test_x))
        model.train()
        return out

    def step(optimizer, batch) -> None:
        model.train()  # what undoes a hand-made bn.eval(), every epoch
        optimizer.zero_grad()
        y = model(tensor(batch[0], dtype))
        (0.5 * ((y - tensor(batch[1], dtype)) ** 2).mean()).backward()
        optimizer.step()

    return run.schedule(record=record, new_trainer=new_optimizer, step=step, unfreeze=lambda: xnorm.unfreeze(model))
