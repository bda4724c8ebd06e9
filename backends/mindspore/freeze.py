"""``xnorm.freeze`` / ``unfreeze`` / ``is_frozen`` for MindSpore: BatchNorm cells that keep their moving
statistics whatever ``set_train()`` says, in GRAPH_MODE and PYNATIVE_MODE.

``mindspore.nn.BatchNorm1d``/``BatchNorm2d`` (and ``SyncBatchNorm``, the same base class) choose their path
in ``construct`` from two attributes: ``use_batch_statistics`` (None, True or False) and ``self.training``.
``use_batch_statistics=None`` (the default) follows the mode: training normalizes with the batch's
statistics and updates ``moving_mean``/``moving_variance`` (the ``BatchNorm(is_training=True)`` primitive
writes them), eval uses the stored ones and writes nothing. ``False`` takes the eval path in every mode,
``True`` the training path in every mode. ``set_train()`` only sets ``training`` on every Cell of the tree,
never ``use_batch_statistics``. ``nn.BatchNorm3d`` is a Cell that reshapes its input and calls a
``BatchNorm2d`` held as ``bn2d``, which owns the parameters.

So a frozen layer is a BatchNorm whose ``use_batch_statistics`` is False:

* :func:`freeze` records the layer's ``use_batch_statistics`` and the ``requires_grad`` of ``gamma`` and
  ``beta`` in a :class:`FrozenState` attribute, sets ``use_batch_statistics = False`` and, with
  ``affine=True``, ``requires_grad = False`` on ``gamma`` and ``beta``. A ``BatchNorm3d`` is frozen through
  its ``bn2d``. :func:`unfreeze` puts the recorded values back. ``training`` is never touched, so the mode
  after ``unfreeze`` is whatever the last ``set_train()`` asked for.
* Compiled graphs. GRAPH_MODE (and ``mindspore.jit``) reads ``use_batch_statistics`` and ``training`` as
  constants when it compiles, and reuses a compiled graph under a key made of the outermost Cell's
  ``create_time`` and ``id`` (or, for a jit function, the function's creation time), without looking at
  the attributes again: a graph compiled in training mode before ``freeze`` would go on updating the
  statistics. ``freeze`` and ``unfreeze`` therefore give ``obj`` and every Cell inside it a new compile key
  (``_force_recompile``, as ``xnorm.remove`` does) and then call ``mindspore.ms_memory_recycle()``, the
  public call that drops every compiled graph of the process: a ``TrainOneStepCell`` or larger network
  that holds ``obj``, and a jit function that closes over it, are not reachable from ``obj``, and without
  it they keep running their stale graph (measured on MindSpore 2.10: both still updated the statistics).
  The price is one recompilation of each graph the process calls next, once per ``freeze``/``unfreeze``.

Why this and not the alternatives:

* The layer keeps its class, its ``construct``, its parameters and their names, so checkpoints
  (``save_checkpoint``/``load_checkpoint``/``load_param_into_net(strict_load=True)``) have the same keys
  and values as a plain model's, and a frozen layer computes what MindSpore's own eval mode computes.
* ``bn.set_train(False)`` is undone by the next ``net.set_train(True)``; ``momentum`` 1 (MindSpore's weight
  of the old value) still normalizes with the batch's statistics.
* The state is a plain dataclass attribute: ``copy.deepcopy`` of a Cell copies it with the layer (tested).

Limits: ``mindspore.mint.nn`` BatchNorm layers (torch-like, ``track_running_stats``) are refused, not
frozen; ``SyncBatchNorm`` goes the same way as ``BatchNorm2d`` but is untested (it needs a distributed
launch). Assigning ``use_batch_statistics`` by hand while a layer is frozen is not undone by ``freeze``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import mindspore
from mindspore import nn
from mindspore.nn.layer.normalization import _BatchNorm

from xnorm.errors import NotFrozenError, OptionError, UnsupportedLayerError
from xnorm.freeze_plan import describe, nothing_to_freeze, selects, stateless_reason

__all__ = ["FrozenState", "freeze", "unfreeze", "is_frozen"]

_STATE = "_xnorm_frozen"


def _mint_norms() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """``mindspore.mint.nn``'s (BatchNorm-like, stateless) normalization classes; empty where absent."""
    try:
        from mindspore.mint import nn as mint_nn
    except ImportError:  # older MindSpore: no mint
        return (), ()
    batch = tuple(
        kind for kind in (getattr(mint_nn, name, None) for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
                                                                   "SyncBatchNorm")) if isinstance(kind, type)
    )
    stateless = tuple(
        kind for kind in (getattr(mint_nn, name, None) for name in ("LayerNorm", "GroupNorm")) if isinstance(kind, type)
    )
    return batch, stateless


_MINT_BATCHNORMS, _MINT_STATELESS = _mint_norms()

# Normalization layers that compute the same thing in train and eval mode. MindSpore's InstanceNorm
# holds moving_mean/moving_variance parameters but its primitive normalizes each instance with its own
# statistics in every mode, so it has nothing to freeze either.
_STATELESS_NORMS: Tuple[type, ...] = tuple(
    kind
    for kind in (
        nn.LayerNorm,
        getattr(nn, "LayerNormExt", None),
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    )
    if kind is not None
) + _MINT_STATELESS

_FREEZABLE: Tuple[type, ...] = (_BatchNorm, nn.BatchNorm3d)
_NORMS: Tuple[type, ...] = _FREEZABLE + _STATELESS_NORMS + _MINT_BATCHNORMS


@dataclasses.dataclass
class FrozenState:
    """What :func:`unfreeze` restores on the layer that holds it: its ``use_batch_statistics`` before
    ``freeze`` (None, True or False) and the ``requires_grad`` of the parameters ``freeze`` changed
    (``gamma`` and ``beta`` with ``affine=True``), as they were."""

    use_batch_statistics: Optional[bool]
    requires_grad: Dict[str, bool]


def _target(cell: nn.Cell) -> nn.Cell:
    """The Cell that owns the statistics and the ``use_batch_statistics`` switch."""
    return cell.bn2d if isinstance(cell, nn.BatchNorm3d) else cell


def _xnorm_frozen(cell: nn.Cell) -> bool:
    return isinstance(cell.__dict__.get(_STATE), FrozenState)


_STATELESS_FIX = "To stop training its scale and shift, set requires_grad=False on its parameters"


def _normalization_layers(obj: nn.Cell) -> List[Tuple[str, nn.Cell]]:
    """Every normalization layer in ``obj`` with its qualified name, a BatchNorm3d's inner ``bn2d`` left
    out (it is the BatchNorm3d's implementation, selected and frozen through it)."""
    named = list(obj.cells_and_names())
    inner = {id(cell.bn2d) for _, cell in named if isinstance(cell, nn.BatchNorm3d)}
    return [(name, cell) for name, cell in named if isinstance(cell, _NORMS) and id(cell) not in inner]


def _select(obj: nn.Cell, layers: Any) -> List[Tuple[str, nn.Cell]]:
    named = _normalization_layers(obj)
    if isinstance(layers, tuple):
        for kind in layers:
            if not issubclass(kind, _NORMS):
                raise OptionError(
                    f"layers= names {kind.__module__}.{kind.__qualname__}, which is not a normalization layer; "
                    "xnorm.freeze freezes mindspore.nn.BatchNorm1d/2d/3d. Name those types, or select by name "
                    "pattern or predicate."
                )
    return [(name, cell) for name, cell in named if selects(layers, name, cell)]


def _plan(obj: nn.Cell, layers: Any) -> List[nn.Cell]:
    """The Cells to freeze (each owning its statistics), or the error that says why there are none;
    nothing is changed here."""
    chosen = _select(obj, layers)
    to_freeze: Dict[int, nn.Cell] = {}
    already, stateless = [], []
    for name, cell in chosen:
        if isinstance(cell, _MINT_BATCHNORMS):
            raise UnsupportedLayerError(
                f"{describe(name, cell)} ({type(cell).__module__}) is a mindspore.mint BatchNorm, which "
                "xnorm.freeze does not support yet (it freezes mindspore.nn.BatchNorm1d/2d/3d). Leave it out "
                "with layers=..., or build the model with mindspore.nn.BatchNorm layers."
            )
        if isinstance(cell, _FREEZABLE):
            target = _target(cell)
            if _xnorm_frozen(target):
                already.append((name, cell))
            else:
                to_freeze[id(target)] = target  # a layer shared by two parents is frozen once
        else:
            stateless.append((name, cell))
    if isinstance(layers, tuple) and stateless:
        raise UnsupportedLayerError(
            stateless_reason(*stateless[0], _STATELESS_FIX) + "; leave its type out of layers=."
        )
    if to_freeze:
        return list(to_freeze.values())
    raise nothing_to_freeze(
        type(obj).__name__, layers, already=already, stateless=stateless, stateless_fix=_STATELESS_FIX,
        no_layer="no normalization layer with running statistics, so there is nothing to freeze. xnorm.freeze "
        "applies to mindspore.nn.BatchNorm1d/2d/3d; pass the model or layer that holds them.",
        candidates=_normalization_layers(obj),
        naming="names are qualified, as model.cells_and_names() gives them",
    )


#: An upper bound on ms_memory_recycle's passes (see _drop_compiled_graphs); each pass that trips has
#: emptied at least one Cell's graph cache, so a process would need this many compiled Cells to reach it.
_RECYCLE_ATTEMPTS = 10_000


def _drop_compiled_graphs(obj: nn.Cell) -> None:
    """Make every graph that may have read ``use_batch_statistics`` compile again on its next call:
    ``obj``'s own (new compile keys) and those of Cells and jit functions outside it. Called before the
    flags change (nothing runs in between), so that a failure here leaves the model as it was.

    MindSpore 2.10's ``ms_memory_recycle`` iterates its per-Cell graph cache while clearing entries; a
    cleared graph can hold the last reference to a Cell, whose ``__del__`` removes that Cell's entry:
    "RuntimeError: dictionary changed size during iteration" (seen in full test runs with many models
    alive, several times in a row). The entry being cleared when that happens has been cleared, and later
    passes skip empty caches, so every pass gets further: the call is repeated until one completes."""
    from . import _force_recompile  # the package imports this module

    for attempt in range(1, _RECYCLE_ATTEMPTS + 1):
        try:
            mindspore.ms_memory_recycle()
            break
        except RuntimeError as error:
            if "changed size during iteration" not in str(error) or attempt == _RECYCLE_ATTEMPTS:
                raise
    _force_recompile(obj)


def freeze(obj: nn.Cell, *, affine: bool, layers: Optional[Any]) -> nn.Cell:
    selected = _plan(obj, layers)
    _drop_compiled_graphs(obj)
    for cell in selected:
        changed = {}
        if affine:
            for pname in ("gamma", "beta"):
                param = cell._params.get(pname)
                if param is not None:
                    changed[pname] = bool(param.requires_grad)
                    param.requires_grad = False
        object.__setattr__(cell, _STATE, FrozenState(cell.use_batch_statistics, changed))
        cell.use_batch_statistics = False
    return obj


def unfreeze(obj: nn.Cell) -> nn.Cell:
    targets = {id(cell): cell for _, cell in obj.cells_and_names() if _xnorm_frozen(cell)}
    if not targets:
        raise NotFrozenError(
            f"nothing in {type(obj).__name__} was frozen by xnorm.freeze, so there is nothing to unfreeze. "
            "Pass the model (or layer) you gave xnorm.freeze."
        )
    _drop_compiled_graphs(obj)
    for cell in targets.values():
        state: FrozenState = cell.__dict__[_STATE]
        for pname, requires_grad in state.requires_grad.items():
            cell._params[pname].requires_grad = requires_grad
        cell.use_batch_statistics = state.use_batch_statistics
        object.__delattr__(cell, _STATE)
    return obj


def is_frozen(obj: nn.Cell) -> bool:
    return any(_xnorm_frozen(cell) for _, cell in obj.cells_and_names())
