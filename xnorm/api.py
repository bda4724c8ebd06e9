"""The public entry points: :func:`wrap` and its shorthands, :func:`remove`, :func:`is_wrapped`."""

from __future__ import annotations

from typing import Any, Optional

from . import registry
from .errors import NotWrappedError, OptionError
from .spec import Orthogonal, Reparametrization, SpectralNorm, WeightNorm

__all__ = ["wrap", "weight_norm", "spectral_norm", "remove", "is_wrapped"]


_UNSET: Any = object()


def wrap(
    layer: Any,
    spec: Optional[Reparametrization] = None,
    backend: Optional[str] = None,
    *,
    name: Optional[str] = None,
    dim: Optional[int] = _UNSET,
    eps: Optional[float] = _UNSET,
    fused: bool = False,
    **options: Any,
) -> Any:
    """Reparametrize ``layer``'s weight as ``spec`` says: weight norm by default, spectral norm with
    ``xnorm.SpectralNorm(...)`` (or the shorthands :func:`weight_norm` and :func:`spectral_norm`).

    Args:
        layer: a ``torch.nn.Module``, a ``mindspore.nn.Cell`` or a Flax module.
        spec: a reparametrization (:class:`xnorm.WeightNorm`, :class:`xnorm.SpectralNorm`). ``None`` is
            ``WeightNorm(dim=dim, eps=eps)``, today's keyword form (``xnorm.wrap(layer, dim=0)``). A
            string here is read as ``backend`` (the signature before specs existed).
        backend: ``"torch"``, ``"mindspore"`` or ``"flax"``; ``None`` detects it from ``layer``'s type,
            among the frameworks already imported.
        name: the parameter to reparametrize; ``None`` picks the layer's weight (``"weight"`` in torch
            and MindSpore, ``"embedding_table"`` for a MindSpore Embedding, ``"kernel"`` in Flax).
        dim, eps: weight norm's options when ``spec`` is None (see :class:`xnorm.WeightNorm`): ``dim``
            is the axis that keeps its own norm, **in torch's layout** whatever the framework (Linear
            ``(out, in)``, ConvNd ``(out, in/groups, *k)``, ConvTransposeNd ``(in, out/groups, *k)``,
            Embedding ``(num, features)``); ``None`` or ``-1``: one norm over the whole weight (``-1``
            is *not* the last axis). Passing them together with ``spec`` is an error.
        fused: weight norm only. ``True`` computes the layer without materialising w where the algebra
            allows it: ``s = g / ||v||`` scales the layer's output (or input) instead of v
            (:func:`xnorm.spec.fused_scale_side` lists where). Parameters, names, checkpoints and
            ``remove`` are the same as without it; results differ by float rounding only.
        **options: backend-specific options, documented by each backend.

    Returns:
        the wrapped layer. Weight norm initialises g to the weight's norm and v to the weight, so the
        layer computes exactly what it did; spectral norm keeps W and draws its state (u, v) from the
        framework's RNG. torch modules are wrapped in place and returned; MindSpore and Flax return a
        new wrapper around ``layer``. A Flax linen layer given its existing ``variables=`` returns
        ``(wrapper, wrapped_variables)`` (see docs/flax.md).

    Raises:
        UnknownBackendError, BackendNotInstalledError, BackendDetectionError, UnsupportedLayerError,
        MissingParameterError, NonFloatingParameterError, DimError, AlreadyWrappedError (the weight
        already has a reparametrization, xnorm's or the framework's own), OptionError; ``layer`` is
        unchanged when any of them is raised.
    """
    if isinstance(spec, str) and backend is None:
        spec, backend = None, spec
    if not isinstance(fused, bool):
        raise OptionError(f"fused must be True or False, got {fused!r} of type {type(fused).__name__}.")
    if spec is None:
        spec = WeightNorm(dim=0 if dim is _UNSET else dim, eps=None if eps is _UNSET else eps)
    elif not isinstance(spec, Reparametrization):
        raise OptionError(
            f"spec must be a reparametrization such as xnorm.WeightNorm(dim=0) or xnorm.SpectralNorm(), got "
            f"{spec!r} of type {type(spec).__name__}."
        )
    elif dim is not _UNSET or eps is not _UNSET:
        raise OptionError(
            f"dim= and eps= belong inside the spec when one is given: write {type(spec).__name__}(dim=..., eps=...) "
            "instead of passing them to xnorm.wrap."
        )
    if fused:
        if not isinstance(spec, WeightNorm):
            raise OptionError(
                f"fused=True exists for weight norm only; {type(spec).__name__} has no fused path. Drop fused=True."
            )
        # Only passed when asked for, so a third-party backend without a fused path reports the option.
        options["fused"] = True
    return registry.resolve_backend(layer, backend).wrap(layer, spec, name=name, **options)


def weight_norm(
    layer: Any,
    dim: Optional[int] = 0,
    *,
    eps: Optional[float] = None,
    name: Optional[str] = None,
    backend: Optional[str] = None,
    fused: bool = False,
    **options: Any,
) -> Any:
    """``xnorm.wrap(layer, xnorm.WeightNorm(dim, eps), ...)``, named and ordered as torch's ``weight_norm``."""
    return wrap(layer, WeightNorm(dim=dim, eps=eps), backend, name=name, fused=fused, **options)


def spectral_norm(
    layer: Any,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: Optional[int] = None,
    *,
    name: Optional[str] = None,
    backend: Optional[str] = None,
    **options: Any,
) -> Any:
    """``xnorm.wrap(layer, xnorm.SpectralNorm(n_power_iterations, eps, dim), ...)``, named and ordered as
    torch's ``parametrizations.spectral_norm``: ``w = W / sigma(W)`` (see :class:`xnorm.SpectralNorm`).
    ``dim=None`` is 1 for ConvTranspose layers and 0 otherwise."""
    spec = SpectralNorm(n_power_iterations=n_power_iterations, eps=eps, dim=dim)
    return wrap(layer, spec, backend, name=name, **options)


def orthogonal(
    layer: Any,
    orthogonal_map: Optional[str] = None,
    *,
    use_trivialization: bool = True,
    name: Optional[str] = None,
    backend: Optional[str] = None,
    **options: Any,
) -> Any:
    """``xnorm.wrap(layer, xnorm.Orthogonal(orthogonal_map, use_trivialization), ...)``, named and ordered as
    torch's ``parametrizations.orthogonal``: the weight (every matrix of its last two axes) stays
    orthogonal (see :class:`xnorm.Orthogonal`; wrapping replaces a weight that is not orthogonal by its
    QR's Q). Implemented by the torch, MindSpore and Flax (linen and NNX) backends."""
    spec = Orthogonal(orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
    return wrap(layer, spec, backend, name=name, **options)


def remove(obj: Any, *args: Any, backend: Optional[str] = None, **options: Any) -> Any:
    """Undo :func:`wrap`, whatever the reparametrization: materialise ``w`` once and make the layer plain again.

    Spectral norm in training mode first runs the iterations a training-mode use would (torch's
    behaviour), so the weight left behind is the one the next training step would have used; in eval
    mode it does not iterate. Call ``eval()`` (``set_train(False)``) first to keep the current sigma.

    Given a wrapped layer, returns the plain layer whose parameter (under its original name) holds
    ``w``; given a model containing wrapped layers, replaces every one of them in place and returns the
    model. Extra arguments are backend-specific (Flax linen takes the variables and returns
    ``(module, variables)``; a backend rejects keywords it does not know with OptionError).

    Raises:
        NotWrappedError: ``obj`` is not wrapped and contains no wrapped layer (nothing is changed).
    """
    return registry.resolve_backend(obj, backend).remove(obj, *args, **options)


def is_wrapped(obj: Any) -> bool:
    """True when ``obj`` is a layer wrapped by :func:`wrap`; False for anything else, of any type."""
    for backend in registry._loaded_backends():
        if backend.owns(obj):
            return bool(backend.is_wrapped(obj))
    return False


def _not_wrapped(obj: Any, hint: str = "") -> NotWrappedError:
    """The error every backend raises from ``remove`` when there is nothing to remove (``hint``: what the
    backend adds about where it looked)."""
    return NotWrappedError(
        f"{type(obj).__qualname__} is not wrapped by xnorm and contains no wrapped layer, so there is "
        "nothing to remove. Check that you pass the object xnorm.wrap returned (or the model holding it)"
        + (f"; {hint}." if hint else ".")
    )
