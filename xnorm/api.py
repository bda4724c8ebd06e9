"""The public entry points: :func:`wrap`, :func:`remove`, :func:`is_wrapped`."""

from __future__ import annotations

from typing import Any, Optional

from . import registry
from .errors import NotWrappedError, OptionError
from .spec import WeightNorm

__all__ = ["wrap", "remove", "is_wrapped"]


def wrap(
    layer: Any,
    backend: Optional[str] = None,
    *,
    name: Optional[str] = None,
    dim: Optional[int] = 0,
    eps: Optional[float] = None,
    fused: bool = False,
    **options: Any,
) -> Any:
    """Reparametrize ``layer``'s weight as ``w = v * (g / ||v||)`` (weight normalization).

    Args:
        layer: a ``torch.nn.Module``, a ``mindspore.nn.Cell`` or a Flax module.
        backend: ``"torch"``, ``"mindspore"`` or ``"flax"``; ``None`` detects it from ``layer``'s type,
            among the frameworks already imported.
        name: the parameter to reparametrize; ``None`` picks the layer's weight (``"weight"`` in torch
            and MindSpore, ``"embedding_table"`` for a MindSpore Embedding, ``"kernel"`` in Flax).
        dim: the axis that keeps its own norm, **in torch's layout** whatever the framework
            (Linear ``(out, in)``, ConvNd ``(out, in/groups, *k)``, ConvTransposeNd
            ``(in, out/groups, *k)``, Embedding ``(num, features)``). ``None`` or ``-1``: one norm over
            the whole weight (``-1`` is *not* the last axis); other negative values count from the end.
        eps: ``None`` (torch's behaviour, a zero slice gives NaN) or a value added to the sum of
            squares under the square root.
        fused: ``True`` computes the layer without materialising w where the algebra allows it:
            ``s = g / ||v||`` scales the layer's output (or input) instead of v
            (:func:`xnorm.spec.fused_scale_side` lists where; elsewhere w is materialised as usual).
            Parameters, names, checkpoints and ``remove`` are the same as without it; results differ
            by float rounding only. ``False`` (the default) is bit-equal to torch's own weight norm.
        **options: backend-specific options, documented by each backend.

    Returns:
        the wrapped layer. g is initialised to the weight's norm and v to the weight, so the wrapped
        layer computes exactly what ``layer`` did. torch modules are wrapped in place and returned;
        MindSpore and Flax return a new wrapper around ``layer``. A Flax linen layer given its
        existing ``variables=`` returns ``(wrapper, wrapped_variables)`` (see docs/flax.md).

    Raises:
        UnknownBackendError, BackendNotInstalledError, BackendDetectionError, UnsupportedLayerError,
        MissingParameterError, NonFloatingParameterError, DimError, AlreadyWrappedError, OptionError;
        ``layer`` is unchanged when any of them is raised.
    """
    if not isinstance(fused, bool):
        raise OptionError(f"fused must be True or False, got {fused!r} of type {type(fused).__name__}.")
    spec = WeightNorm(dim=dim, eps=eps)
    if fused:
        # Only passed when asked for, so a third-party backend without a fused path reports the option.
        options["fused"] = True
    return registry.resolve_backend(layer, backend).wrap(layer, spec, name=name, **options)


def remove(obj: Any, *args: Any, backend: Optional[str] = None) -> Any:
    """Undo :func:`wrap`: materialise ``w`` once and make the layer plain again.

    Given a wrapped layer, returns the plain layer whose parameter (under its original name) holds
    ``w``; given a model containing wrapped layers, replaces every one of them in place and returns the
    model. Extra positional arguments are backend-specific (Flax linen takes the variables and
    returns ``(module, variables)``).

    Raises:
        NotWrappedError: ``obj`` is not wrapped and contains no wrapped layer (nothing is changed).
    """
    return registry.resolve_backend(obj, backend).remove(obj, *args)


def is_wrapped(obj: Any) -> bool:
    """True when ``obj`` is a layer wrapped by :func:`wrap`; False for anything else, of any type."""
    for backend in registry._loaded_backends():
        if backend.owns(obj):
            return bool(backend.is_wrapped(obj))
    return False


def _not_wrapped(obj: Any) -> NotWrappedError:
    """The error every backend raises from ``remove`` when there is nothing to remove."""
    return NotWrappedError(
        f"{type(obj).__qualname__} is not wrapped by xnorm and contains no wrapped layer, so there is "
        "nothing to remove. Check that you pass the object xnorm.wrap returned (or the model holding it)."
    )
