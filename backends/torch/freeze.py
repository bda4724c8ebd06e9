"""``xnorm.freeze`` / ``unfreeze`` / ``is_frozen`` for torch: normalization layers that keep their running
statistics whatever ``model.train()`` says.

torch's BatchNorm (and InstanceNorm with ``track_running_stats=True``) decides everything from one flag,
``module.training``: True normalizes with the batch's statistics and updates the running ones (and
``num_batches_tracked``); False normalizes with the running ones and touches nothing. ``bn.eval()`` is
therefore the right state, and the whole trap is that ``model.train()`` sets ``training=True`` on every
submodule again. A frozen layer keeps ``training`` False:

* ``module.train`` is overridden *on the instance* by ``functools.partial(_frozen_train, module)``, which
  records the requested mode (for :func:`unfreeze`), passes it on to any children and leaves the layer's
  own ``training`` False. ``model.train()`` and ``model.eval()`` reach every child through ``child.train``,
  so they meet the override; ``bn.eval()`` does too (``eval`` calls ``self.train(False)``).
* a forward pre-hook (:func:`_keep_eval`) sets ``training`` back to False if someone assigned
  ``module.training = True`` directly, which bypasses ``train()``.
* the state (the mode to restore, the ``requires_grad`` of weight and bias before freezing, the hook's
  id) is a :class:`FrozenState` attribute.

Why this and not the alternatives:

* The module keeps its class, its forward, its parameters and buffers, so ``state_dict`` keys and values
  are exactly a plain model's (``num_batches_tracked`` included): checkpoints load both ways with
  ``strict=True``, and SyncBatchNorm, InstanceNorm and subclasses compute what their own eval mode
  computes, bit for bit. Replacing the module (torchvision's ``FrozenBatchNorm2d``, timm's
  ``freeze_batch_norm_2d``) changes the keys and loses the momentum; swapping the class (as
  ``parametrize`` does) breaks ``type(m) is nn.BatchNorm2d`` checks and pickling.
* Changing ``momentum`` to 0 does not freeze: training mode still normalizes with the batch's statistics.
* A partial of a module-level function (not a closure, not a lambda) is what ``copy.deepcopy`` and
  pickle handle: deepcopy rebinds it to the copy through its memo (tested), pickle stores it by reference.
* ``torch.compile`` sees an ordinary BatchNorm with ``training`` False, the eval path it traces every
  day; it guards on ``training``, so a graph compiled before ``freeze`` in training mode is not reused
  (tested with ``backend="aot_eager"``).

Limits: code that reads ``bn.training`` sees False while the model trains (that is what the layer
does); ``torch.jit.script`` of a frozen model is not tested.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

from xnorm.errors import NotFrozenError, OptionError, UnsupportedLayerError
from xnorm.freeze_plan import describe, nothing_to_freeze, selects, stateless_reason

__all__ = ["FrozenState", "freeze", "unfreeze", "is_frozen", "is_class_frozen"]

_STATE = "_xnorm_frozen"

# Normalization layers without running statistics: the same computation in train and eval mode.
_STATELESS_NORMS: Tuple[type, ...] = tuple(
    kind
    for kind in (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
        getattr(nn, "RMSNorm", None),
    )
    if kind is not None
)


@dataclasses.dataclass
class FrozenState:
    """What :func:`unfreeze` restores. ``training``: the mode the layer would be in without ``freeze``
    (its mode at ``freeze``, then the last one ``train()``/``eval()`` asked for); ``requires_grad``: the
    flags of the parameters ``freeze`` changed (``affine=True``), as they were; ``hook_id``: the id of
    the :func:`_keep_eval` pre-hook."""

    training: bool
    requires_grad: Dict[str, bool]
    hook_id: int


def _frozen_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """``module.train(mode)`` while frozen: remember ``mode``, pass it on, stay in eval mode."""
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")  # torch's own check and message
    getattr(module, _STATE).training = mode
    module.training = False
    for child in module.children():
        child.train(mode)
    return module


def _keep_eval(module: nn.Module, args: Any) -> None:
    if module.training:  # assigned directly, bypassing train(): honour it on unfreeze, not now
        getattr(module, _STATE).training = True
        module.training = False


def xnorm_frozen(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get(_STATE), FrozenState)


def is_class_frozen(module: nn.Module) -> bool:
    """torchvision's, detectron2's and timm's ``FrozenBatchNorm2d`` (all four tensors buffers, no training
    mode), recognised by name so that none of them is imported."""
    return type(module).__name__.startswith("FrozenBatchNorm") and "running_mean" in module._buffers


def _has_running_stats(module: nn.Module) -> bool:
    return bool(module.track_running_stats) and module.running_mean is not None and module.running_var is not None


def _is_normalization(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) or isinstance(module, _STATELESS_NORMS) or is_class_frozen(module)


_STATELESS_FIX = "To stop training its scale and shift, call module.requires_grad_(False) on it"


def _select(obj: nn.Module, layers: Any) -> List[Tuple[str, nn.Module]]:
    """The layers ``layers`` selects in ``obj``, before any check of what they are."""
    named = list(obj.named_modules())
    if isinstance(layers, tuple):
        for kind in layers:
            if not (
                issubclass(kind, (_NormBase,) + _STATELESS_NORMS) or kind.__name__.startswith("FrozenBatchNorm")
            ):
                raise OptionError(
                    f"layers= names {kind.__module__}.{kind.__qualname__}, which is not a normalization layer; "
                    "xnorm.freeze freezes BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm with running "
                    "statistics. Name those types, or select by name pattern or predicate."
                )
        return [(name, module) for name, module in named if isinstance(module, layers)]
    return [(name, module) for name, module in named if _is_normalization(module) and selects(layers, name, module)]


def _plan(obj: nn.Module, layers: Any) -> List[nn.Module]:
    """The layers to freeze, or the error that says why there are none; nothing is changed here."""
    chosen = _select(obj, layers)
    to_freeze, already, stateless = [], [], []
    for name, module in chosen:
        if xnorm_frozen(module) or is_class_frozen(module):
            already.append((name, module))
        elif isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise UnsupportedLayerError(
                f"{describe(name, module)} is not materialized yet: its running statistics do not exist. "
                "Run the model once on a batch (or load a checkpoint), then freeze it."
            )
        elif isinstance(module, _NormBase) and _has_running_stats(module):
            to_freeze.append(module)
        elif isinstance(module, _BatchNorm):
            raise UnsupportedLayerError(
                f"{describe(name, module)} has track_running_stats=False: it has no stored statistics to "
                "normalize with and uses each batch's in every mode, so it cannot be frozen. Leave it out "
                "with layers=..., or build it with track_running_stats=True and fill its statistics first."
            )
        else:
            stateless.append((name, module))
    if isinstance(layers, tuple) and stateless:
        raise UnsupportedLayerError(
            stateless_reason(*stateless[0], _STATELESS_FIX) + "; leave its type out of layers=."
        )
    if to_freeze:
        return to_freeze
    raise nothing_to_freeze(
        type(obj).__name__, layers, already=already, stateless=stateless, stateless_fix=_STATELESS_FIX,
        no_layer="no normalization layer with running statistics, so there is nothing to freeze. xnorm.freeze "
        "applies to BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm with track_running_stats=True; pass the "
        "model or layer that holds them.",
        candidates=[(name, module) for name, module in obj.named_modules() if _is_normalization(module)],
        naming="names are qualified, as model.named_modules() gives them",
    )


def freeze(obj: nn.Module, *, affine: bool, layers: Optional[Any]) -> nn.Module:
    for module in _plan(obj, layers):
        changed = {}
        if affine:
            for pname in ("weight", "bias"):
                param = module._parameters.get(pname)
                if param is not None:
                    changed[pname] = param.requires_grad
                    param.requires_grad_(False)
        handle = module.register_forward_pre_hook(_keep_eval)
        setattr(module, _STATE, FrozenState(training=module.training, requires_grad=changed, hook_id=handle.id))
        module.train = functools.partial(_frozen_train, module)
        module.training = False
    return obj


def unfreeze(obj: nn.Module) -> nn.Module:
    targets = [module for module in obj.modules() if xnorm_frozen(module)]
    if not targets:
        by_class = [type(module).__name__ for module in obj.modules() if is_class_frozen(module)]
        hint = (
            f" ({', '.join(sorted(set(by_class)))} in it is frozen by its class, which xnorm.unfreeze does not undo: "
            "replace it by a BatchNorm2d holding its tensors to train it)"
            if by_class
            else ""
        )
        raise NotFrozenError(
            f"nothing in {type(obj).__name__} was frozen by xnorm.freeze{hint}, so there is nothing to unfreeze. "
            "Pass the model (or layer) you gave xnorm.freeze."
        )
    for module in targets:
        state: FrozenState = getattr(module, _STATE)
        module._forward_pre_hooks.pop(state.hook_id, None)
        del module.__dict__["train"]
        for pname, requires_grad in state.requires_grad.items():
            module._parameters[pname].requires_grad_(requires_grad)
        module.training = state.training
        delattr(module, _STATE)
    return obj


def is_frozen(obj: nn.Module) -> bool:
    return any(xnorm_frozen(module) or is_class_frozen(module) for module in obj.modules())
