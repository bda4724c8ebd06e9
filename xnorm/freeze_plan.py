"""What every backend's ``xnorm.freeze`` shares: which layers ``layers=`` selects, how a layer is named in
messages, and the error a selection that leaves nothing to freeze raises. Framework-neutral: a backend
hands over its layers as ``(qualified name, layer)`` pairs and its own wording of what it freezes, and
keeps to itself what differs (which classes are normalization layers, what freezing one does).

``layers`` is what :func:`xnorm.freeze` has already put in one form: ``None`` (every normalization layer),
a tuple of classes, a compiled ``re.Pattern`` searched in the qualified name, or a predicate
``(name, layer) -> bool``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence, Tuple

from .errors import AlreadyFrozenError, OptionError, UnsupportedLayerError, XnormError

__all__ = ["selects", "describe", "show", "stateless_reason", "nothing_to_freeze"]

Named = Tuple[str, Any]


def selects(layers: Any, name: str, layer: Any) -> bool:
    """Whether ``layers`` selects ``layer``, found at ``name`` (the caller has kept normalization layers
    only, where that matters)."""
    if layers is None:
        return True
    if isinstance(layers, tuple):
        return isinstance(layer, layers)
    if isinstance(layers, re.Pattern):
        return layers.search(name) is not None
    return bool(layers(name, layer))


def describe(name: str, layer: Any) -> str:
    """``"BatchNorm2d 'backbone.1'"``, or the class alone for the model itself (name ``""``)."""
    return f"{type(layer).__name__} {name!r}" if name else type(layer).__name__


def show(layers: Any) -> str:
    """``layers=`` as a message shows it."""
    if isinstance(layers, re.Pattern):
        return repr(layers.pattern)
    if isinstance(layers, tuple):
        return "(" + ", ".join(kind.__name__ for kind in layers) + ",)"
    return getattr(layers, "__name__", repr(layers))


def stateless_reason(name: str, layer: Any, fix: str) -> str:
    """Why a normalization layer without running statistics (LayerNorm, GroupNorm...) is not frozen, and
    ``fix``, the backend's way to stop training its scale and shift; no final period."""
    return (
        f"{describe(name, layer)} has no running statistics: it computes the same thing in train and eval mode, "
        f"so there is nothing to freeze. {fix}"
    )


def nothing_to_freeze(
    what: str,
    layers: Any,
    *,
    already: Sequence[Named],
    stateless: Sequence[Named],
    stateless_fix: str,
    no_layer: str,
    candidates: Sequence[Named],
    naming: str,
) -> XnormError:
    """The error for a selection in model ``what`` (its class name) that holds no layer to freeze.

    ``already``: selected layers frozen before; ``stateless``: selected normalization layers without
    statistics; ``no_layer``: the backend's sentence after "<what> contains " when ``layers`` is None and
    the model holds nothing to freeze; ``candidates``: the model's normalization layers, which a selection
    that matched none of them is shown; ``naming``: how the backend spells the names ``layers=`` matches.

    In that order: every selected layer frozen already (:class:`AlreadyFrozenError`), only layers without
    statistics (:class:`UnsupportedLayerError`), no normalization layer at all (``layers`` None:
    :class:`UnsupportedLayerError`), a selection that matched none (:class:`OptionError`).
    """
    if already:
        names = ", ".join(describe(name, layer) for name, layer in already)
        return AlreadyFrozenError(
            f"every layer selected in {what} is frozen already ({names}). Nothing to do; to change the options, "
            "call xnorm.unfreeze(model) first, then xnorm.freeze(model, ...) again."
        )
    if stateless:
        return UnsupportedLayerError(
            "; ".join(stateless_reason(name, layer, stateless_fix) for name, layer in stateless) + "."
        )
    if layers is None:
        return UnsupportedLayerError(f"{what} contains {no_layer}")
    shown = ", ".join(describe(name, layer) for name, layer in candidates) or "none"
    return OptionError(
        f"layers={show(layers)} selects no layer in {what}; its normalization layers are {shown}. Fix the "
        f"selection ({naming})."
    )
