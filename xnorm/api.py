"""The public entry points: :func:`wrap` and its shorthands, :func:`remove`, :func:`is_wrapped`, and
:func:`freeze`, :func:`unfreeze`, :func:`is_frozen` for normalization layers' running statistics."""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional, Union

from . import registry
from .errors import NotWrappedError, OptionError
from .spec import Orthogonal, Reparametrization, SpectralNorm, WeightNorm, check_fused_option, check_fused_spec

__all__ = ["wrap", "weight_norm", "spectral_norm", "remove", "is_wrapped", "freeze", "unfreeze", "is_frozen"]


_UNSET: Any = object()


def wrap(
    layer: Any,
    spec: Optional[Reparametrization] = None,
    backend: Optional[str] = None,
    *,
    name: Optional[str] = None,
    dim: Optional[int] = _UNSET,
    eps: Optional[float] = _UNSET,
    fused: Union[bool, str] = False,
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
            ``"auto"`` (torch only) decides per call: fused where the weight is large next to the
            activation it would scale, the default path elsewhere (:func:`xnorm.spec.fused_pays`).
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
    check_fused_option(fused, "", auto=True)  # which backend takes "auto" is the backend's to say
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
    check_fused_spec(fused, spec)
    if fused:
        # Only passed when asked for, so a third-party backend without a fused path reports the option.
        options["fused"] = fused
    return registry.resolve_backend(layer, backend).wrap(layer, spec, name=name, **options)


def weight_norm(
    layer: Any,
    dim: Optional[int] = 0,
    *,
    eps: Optional[float] = None,
    name: Optional[str] = None,
    backend: Optional[str] = None,
    fused: Union[bool, str] = False,
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
    resolved = registry.resolve_backend(obj, backend)
    try:
        inspect.signature(resolved.remove).bind(obj, *args, **options)
    except TypeError as error:
        # A backend whose remove() has no room for them would raise Python's TypeError from the call itself;
        # the mistake is the caller's options, so it is the OptionError every backend gives (docs/errors.md).
        raise OptionError(
            f"xnorm.remove for the {resolved.name} backend does not take these arguments ({error}); "
            "call xnorm.remove(obj), with the extra arguments that backend documents (Flax linen: the variables)."
        ) from None
    return resolved.remove(obj, *args, **options)


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


def freeze(model_or_layer: Any, *, affine: bool = True, layers: Any = None, backend: Optional[str] = None) -> Any:
    """Freeze the normalization layers' running statistics, so that they survive ``model.train()``.

    Every normalization layer with running statistics in ``model_or_layer``, or those ``layers``
    selects, normalizes with its stored running mean and variance in every mode (the eval-mode formula,
    :func:`xnorm.batchnorm.eval_batchnorm`) and never updates them. torch: BatchNorm1d/2d/3d,
    SyncBatchNorm, a materialized Lazy BatchNorm, an InstanceNorm with ``track_running_stats=True``,
    through ``train()``, ``copy.deepcopy``, pickle and ``torch.compile``; layers frozen by their class
    (torchvision's ``FrozenBatchNorm2d``) are left alone. MindSpore: ``nn.BatchNorm1d/2d/3d``, through
    ``set_train()`` and graphs compiled before the call (every compiled graph of the process is dropped
    once). Flax: ``nnx.BatchNorm`` in place, through ``train()``, ``nnx.view``, ``nnx.jit``, clone and
    split/merge; linen ``nn.BatchNorm`` by returning a new module (linen modules are immutable).
    Checkpoint keys and values are unchanged (torch's ``num_batches_tracked`` included), so a frozen
    model loads a normal checkpoint and the other way round strictly. See docs/freeze.md.

    Args:
        model_or_layer: a torch module, a MindSpore Cell, an NNX module or a linen module (unbound).
        affine: also stop training the layers' scale and shift (torch and MindSpore:
            ``requires_grad=False``; NNX: the variables become ``FrozenParam``, not ``nnx.Param``; linen:
            give ``xnorm._backends.flax.freeze.frozen_labels`` to ``optax.multi_transform``). An
            optimizer built before ``freeze`` still holds them: docs/freeze.md says what each does.
        layers: ``None`` (every normalization layer with running statistics), a type or a tuple of
            types (``(torch.nn.BatchNorm2d,)``), a regular expression (a string or compiled pattern)
            searched in each layer's qualified name (``"^backbone[.]"``), or a predicate
            ``(name, layer) -> bool``. Layers already frozen among those selected are skipped.
        backend: ``"torch"``, ``"mindspore"`` or ``"flax"``; ``None`` detects it from the object's type.

    Returns:
        ``model_or_layer``, frozen in place; for a linen module, a new frozen module (the argument is
        unchanged).

    Raises:
        UnsupportedLayerError: nothing to freeze (no normalization layer with running statistics), a
            selected layer without running statistics (LayerNorm, GroupNorm, a BatchNorm with
            ``track_running_stats=False``), a Lazy layer not yet materialized, a MindSpore
            ``mint.nn`` BatchNorm, a bound linen module.
        AlreadyFrozenError: every selected layer is frozen already.
        OptionError: ``affine`` is not a bool, ``layers`` is none of the forms above, an invalid
            pattern, a type that is not a normalization layer, or it selects no layer.
        BackendDetectionError, UnknownBackendError, BackendNotInstalledError.
        Nothing is changed when any of them is raised.
    """
    if not isinstance(affine, bool):
        raise OptionError(f"affine must be True or False, got {affine!r} of type {type(affine).__name__}.")
    layers = _layer_selector(layers)
    return registry.resolve_backend(model_or_layer, backend).freeze(model_or_layer, affine=affine, layers=layers)


def unfreeze(obj: Any, *, backend: Optional[str] = None) -> Any:
    """Undo :func:`freeze` on every layer of ``obj`` it froze, in place, and return ``obj`` (for a frozen
    linen module: the plain module it was made from).

    Each layer gets back the behaviour it would have had without ``freeze``: its mode is the one the
    last ``train()``/``eval()`` asked for while it was frozen (the mode it had before ``freeze`` if
    none did), its scale and shift are as trainable as before ``freeze``, its momentum is untouched
    (``freeze`` never changes it), and its running statistics update again in training mode.

    Raises:
        NotFrozenError: nothing in ``obj`` was frozen by ``xnorm.freeze`` (a layer frozen by its class,
            such as torchvision's ``FrozenBatchNorm2d``, is not undone). Nothing is changed.
    """
    return registry.resolve_backend(obj, backend).unfreeze(obj)


def is_frozen(obj: Any) -> bool:
    """True when ``obj`` or any layer inside it is frozen (by :func:`freeze`, or by its class, such as
    torchvision's ``FrozenBatchNorm2d``); False for anything else, of any type."""
    for backend in registry._loaded_backends():
        if backend.owns(obj):
            return bool(backend.is_frozen(obj))
    return False


def _layer_selector(layers: Any) -> Any:
    """``layers=`` checked and put in one of four forms: None, a tuple of types, a compiled pattern, a
    callable; an OptionError naming the accepted forms otherwise."""
    forms = (
        "layers= takes None (every normalization layer with running statistics), a type or a tuple of types, "
        "a regular expression searched in each layer's qualified name, or a predicate (name, layer) -> bool"
    )
    if layers is None or isinstance(layers, re.Pattern):
        return layers
    if isinstance(layers, type):
        return (layers,)
    if isinstance(layers, (tuple, list)):
        if not layers or not all(isinstance(kind, type) for kind in layers):
            raise OptionError(f"{forms}; got {layers!r}. A tuple must hold layer classes, at least one.")
        return tuple(layers)
    if isinstance(layers, str):
        try:
            return re.compile(layers)
        except re.error as error:
            raise OptionError(
                f"layers={layers!r} is not a valid regular expression ({error}). Fix the pattern."
            ) from None
    if callable(layers):
        return layers
    raise OptionError(f"{forms}; got {layers!r} of type {type(layers).__name__}.")
