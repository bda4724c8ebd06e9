"""BatchNorm's formulas and each framework's conventions, in NumPy float64 (no framework imported).

The three frameworks compute the same thing and store the same tensors, but they describe the running
statistics' update differently, so a port that copies the hyperparameters verbatim is wrong:

* **momentum**: torch's ``momentum=0.1`` is the weight of the NEW batch value,
  ``running = (1 - m) * running + m * batch``; MindSpore's ``momentum=0.9`` and Flax's ``0.99`` are the
  weight of the OLD value, ``running = m * running + (1 - m) * batch``. torch's ``momentum=None``
  (a cumulative average) has no counterpart.
* **variance**: every framework normalizes a training batch with its biased variance (divided by n),
  but torch updates ``running_var`` with the UNBIASED batch variance (divided by n - 1), Flax with the
  biased one. No momentum makes the two running variances agree: they differ by ``n / (n - 1)`` on the
  batch term.
* **eps** is added to the variance under the square root in all three, so it ports unchanged.

:data:`CONVENTIONS` holds each one with its status (documented, measured, unverified) and sources;
:func:`eval_batchnorm` is the eval-mode formula a frozen layer computes; :func:`batchnorm_training_step`
is one training-mode step under a framework's convention; :func:`equivalent_batchnorm_settings` gives
the momentum and eps a port needs. docs/freeze.md has the table.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from .errors import OptionError

__all__ = [
    "Convention",
    "CONVENTIONS",
    "BatchNormSettings",
    "eval_batchnorm",
    "batchnorm_training_step",
    "equivalent_batchnorm_settings",
]


@dataclasses.dataclass(frozen=True)
class Convention:
    """How one framework's BatchNorm describes its running-statistics update.

    ``momentum_weighs`` is ``"new"`` (torch) or ``"old"`` (MindSpore, Flax): which term of the moving
    average the ``momentum`` argument multiplies. ``running_var`` is the batch variance used to update
    the running variance: ``"unbiased"`` (n - 1) or ``"biased"`` (n). ``status`` says how each fact is
    known; ``channel_axis`` is where the layer expects channels.
    """

    framework: str
    layer: str
    default_momentum: float
    default_eps: float
    momentum_weighs: str
    running_var: str
    channel_axis: int
    status: str


CONVENTIONS: Dict[str, Convention] = {
    "torch": Convention(
        framework="torch",
        layer="torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm",
        default_momentum=0.1,
        default_eps=1e-5,
        momentum_weighs="new",
        running_var="unbiased",
        channel_axis=1,
        status=(
            "documented (torch.nn.BatchNorm2d's docstring: x_new = (1 - momentum) * x_hat + momentum * x_t, and "
            "the running variance from the unbiased estimator); measured against nn.BatchNorm2d by "
            "tests/torch/test_freeze.py."
        ),
    ),
    "mindspore": Convention(
        framework="mindspore",
        layer="mindspore.nn.BatchNorm1d/2d/3d",
        default_momentum=0.9,
        default_eps=1e-5,
        momentum_weighs="old",
        running_var="unbiased",
        channel_axis=1,
        status=(
            "momentum: documented by the source (nn.BatchNorm's __init__ stores 1.0 - momentum for its primitive); "
            "momentum, the unbiased variance and the defaults measured by tests/mindspore/test_freeze.py on "
            "MindSpore 2.10 CPU in GRAPH_MODE and PYNATIVE_MODE; unverified on GPU and Ascend, and for the "
            "torch-like signature MindSpore announces after 2.9."
        ),
    ),
    "flax": Convention(
        framework="flax",
        layer="flax.linen.BatchNorm, flax.nnx.BatchNorm",
        default_momentum=0.99,
        default_eps=1e-5,
        momentum_weighs="old",
        running_var="biased",
        channel_axis=-1,
        status=(
            "documented by the source (flax/linen/normalization.py: ra_var = momentum * ra_var + "
            "(1 - momentum) * var, var from E[x^2] - E[x]^2, the biased one) and measured by tests/flax/test_freeze.py "
            "on Flax 0.12.8 and JAX 0.10.2, CPU, linen and NNX."
        ),
    ),
}


class BatchNormSettings(NamedTuple):
    """A BatchNorm's ``momentum`` and ``eps`` in one framework's convention."""

    momentum: float
    eps: float


def _convention(framework: str) -> Convention:
    if framework not in CONVENTIONS:
        raise OptionError(
            f"no BatchNorm convention is recorded for {framework!r}; pass one of {', '.join(sorted(CONVENTIONS))}."
        )
    return CONVENTIONS[framework]


def _check_momentum(momentum, framework: str) -> float:
    if momentum is None:
        raise OptionError(
            f"momentum=None is torch's cumulative average, which {framework!r} conventions here do not model and "
            "MindSpore and Flax cannot express. Pass a number in [0, 1] (torch's default is 0.1)."
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise OptionError(f"momentum must be a number in [0, 1], got {momentum!r}.")
    return float(momentum)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps) >= 0.0:
        raise OptionError(f"eps must be a number >= 0, got {eps!r}.")
    return float(eps)


def equivalent_batchnorm_settings(framework_from: str, framework_to: str, momentum, eps) -> BatchNormSettings:
    """The ``momentum`` and ``eps`` that give ``framework_to``'s BatchNorm the running-mean update and the
    normalization of ``framework_from``'s BatchNorm built with ``momentum`` and ``eps``.

    torch's momentum weighs the new batch value, MindSpore's and Flax's the old one (see
    :data:`CONVENTIONS`), so a port between the two families uses ``1 - momentum``; eps means the same
    everywhere (added to the variance under the square root). torch's default ``0.1`` is MindSpore's
    ``0.9`` and Flax's ``0.99`` is torch's ``0.01``.

    The running *variance* cannot be matched by a setting: torch (and MindSpore, measured on CPU only)
    update it with the unbiased batch variance, Flax with the biased one, so after training steps a port
    from torch to Flax (or back) keeps a running variance that differs by ``n / (n - 1)`` on each batch
    term. Eval-mode outputs from the same stored statistics are identical; frozen layers
    (:func:`xnorm.freeze`) never see the difference.

    Raises:
        OptionError: an unknown framework, ``momentum=None`` (torch's cumulative average has no
            counterpart) or a value outside [0, 1], a negative eps.
    """
    source, target = _convention(framework_from), _convention(framework_to)
    momentum = _check_momentum(momentum, framework_from)
    eps = _check_eps(eps)
    if source.momentum_weighs != target.momentum_weighs:
        momentum = 1.0 - momentum
    return BatchNormSettings(momentum=momentum, eps=eps)


def _channel_shape(x: np.ndarray, channel_axis: int) -> Tuple[int, ...]:
    shape = [1] * x.ndim
    shape[channel_axis] = x.shape[channel_axis]
    return tuple(shape)


def eval_batchnorm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> np.ndarray:
    """The eval-mode (frozen) BatchNorm, in float64:
    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, per channel.

    ``channel_axis`` is 1 in torch and MindSpore layouts (N, C, ...) and -1 in Flax's (N, ..., C).
    ``weight``/``bias`` None means 1 and 0 (``affine=False``).
    """
    x = np.asarray(x, dtype=np.float64)
    shape = _channel_shape(x, channel_axis)
    mean = np.asarray(running_mean, dtype=np.float64).reshape(shape)
    var = np.asarray(running_var, dtype=np.float64).reshape(shape)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(shape)
    return y


def batchnorm_training_step(
    framework: str,
    x,
    running_mean,
    running_var,
    *,
    momentum: Optional[float] = None,
    eps: Optional[float] = None,
    weight=None,
    bias=None,
    channel_axis: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training-mode BatchNorm step under ``framework``'s convention, in float64.

    Returns ``(y, new_running_mean, new_running_var)``: ``y`` normalizes ``x`` with the batch's mean and
    biased variance (every framework does); the running statistics move by ``momentum`` as the
    framework reads it, the variance with the framework's batch variance (:data:`CONVENTIONS`).
    ``momentum``, ``eps`` and ``channel_axis`` default to the framework's own defaults.
    """
    convention = _convention(framework)
    momentum = _check_momentum(convention.default_momentum if momentum is None else momentum, framework)
    eps = _check_eps(convention.default_eps if eps is None else eps)
    axis = convention.channel_axis if channel_axis is None else channel_axis
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    reduce = tuple(a for a in range(x.ndim) if a != axis)
    count = int(np.prod([x.shape[a] for a in reduce]))
    batch_mean = x.mean(axis=reduce)
    biased = x.var(axis=reduce)
    if convention.running_var == "unbiased":
        if count < 2:
            raise OptionError(
                f"{framework}'s update needs at least 2 values per channel (an unbiased variance), got {count}."
            )
        update_var = biased * count / (count - 1)
    else:
        update_var = biased
    new_weight = momentum if convention.momentum_weighs == "new" else 1.0 - momentum
    mean0 = np.asarray(running_mean, dtype=np.float64)
    var0 = np.asarray(running_var, dtype=np.float64)
    new_mean = (1.0 - new_weight) * mean0 + new_weight * batch_mean
    new_var = (1.0 - new_weight) * var0 + new_weight * update_var
    y = eval_batchnorm(x, batch_mean, biased, weight, bias, eps, axis)
    return y, new_mean, new_var
