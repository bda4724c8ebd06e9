"""Backends: which exist, whether they are installed, and which one owns a given object.

A backend is a small class (:class:`Backend`) living in ``xnorm._backends.<name>`` (the repository's
``backends/`` folder). Nothing here imports a framework: a backend module is imported only when the
user names it, or, for detection, when its framework is already in ``sys.modules`` (the user imported
it, so importing the adapter costs nothing extra). That is einops' rule, for the same reason.

Third-party backends register with :func:`register_backend`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
from typing import Any, Dict, List, Optional

from .errors import BackendDetectionError, BackendNotInstalledError, UnknownBackendError
from .spec import Reparametrization

__all__ = ["Backend", "BackendInfo", "register_backend", "get_backend", "detect_backend", "backends"]


class Backend:
    """What a framework backend implements. One instance per backend, created on first use.

    Subclasses set ``name`` and implement the methods; every method receives objects of the backend's
    own framework. ``wrap`` validates everything before changing anything, so a raised error leaves
    the layer as it was.
    """

    name: str = ""

    def owns(self, obj: Any) -> bool:
        """True when ``obj`` is a layer, model or wrapper of this framework."""
        raise NotImplementedError

    def wrap(self, layer: Any, spec: Reparametrization, *, name: Optional[str], **options: Any) -> Any:
        """Wrap ``layer``. ``options`` holds ``fused=True`` when the user asked for the fused path
        (:func:`xnorm.spec.fused_scale_side`) and any backend-specific option; an option the backend
        does not know raises :class:`~xnorm.errors.OptionError`. A ``spec`` type the backend does not
        implement raises :class:`~xnorm.errors.UnsupportedLayerError` naming the ones it does."""
        raise NotImplementedError

    def remove(self, obj: Any, *args: Any, **options: Any) -> Any:
        """Undo ``wrap`` on ``obj`` (a wrapped layer or a model holding some); ``options`` are backend-specific
        keywords (an unknown one raises :class:`~xnorm.errors.OptionError`)."""
        raise NotImplementedError

    def is_wrapped(self, obj: Any) -> bool:
        raise NotImplementedError

    def freeze(self, obj: Any, *, affine: bool, layers: Any) -> Any:
        """Freeze the normalization layers with running statistics in ``obj`` (the object itself or any
        layer inside it), in place, and return ``obj``.

        A frozen layer normalizes with its stored running statistics whatever the mode (``train()``,
        ``set_train()``, NNX ``.train()``), never updates them, and keeps the checkpoint keys and
        values it had. ``affine=True`` also stops training its scale and shift (``requires_grad=False``
        or the framework's equivalent). ``layers`` is ``None`` (every such layer), a tuple of layer
        types, a regular expression searched in the layer's qualified name, or a predicate
        ``(name, layer) -> bool``; :func:`xnorm.api.freeze` has checked only that it is one of these.

        Raises, before changing anything: UnsupportedLayerError (nothing to freeze in ``obj``, a
        selected normalization layer without running statistics, a backend that has no freeze yet),
        AlreadyFrozenError (every selected layer is frozen already), OptionError (``layers`` selects
        nothing or names a type that is not a normalization layer).
        """
        raise NotImplementedError

    def unfreeze(self, obj: Any) -> Any:
        """Undo ``freeze`` on every layer of ``obj`` it froze: the mode, momentum and trainability of the
        scale and shift are what they would have been without ``freeze``. In place; returns ``obj``.

        Raises NotFrozenError, before changing anything, when nothing in ``obj`` was frozen by xnorm.
        """
        raise NotImplementedError

    def is_frozen(self, obj: Any) -> bool:
        """True when ``obj`` or any layer inside it is frozen (by ``freeze`` or by its class, such as
        torchvision's ``FrozenBatchNorm2d``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    module: str  # import path of the module defining the Backend subclass
    class_name: str
    frameworks: tuple  # top-level modules whose presence in sys.modules enables detection
    distributions: tuple  # PyPI distributions whose versions `backends()` reports
    extra: str  # `pip install xnorm[extra]`


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`backends`."""

    name: str
    installed: bool
    versions: Dict[str, Optional[str]]
    install: str

    def __str__(self) -> str:
        if self.installed:
            found = ", ".join(f"{dist} {version}" for dist, version in self.versions.items())
            return f"{self.name}: installed ({found})"
        return f"{self.name}: not installed ({self.install})"


_ENTRIES: Dict[str, _Entry] = {}
_INSTANCES: Dict[str, Backend] = {}


def register_backend(
    name: str,
    module: str,
    class_name: str,
    *,
    frameworks: tuple,
    distributions: tuple = (),
    extra: str = "",
) -> None:
    """Make a backend known to :func:`xnorm.wrap` and friends without importing it.

    ``module:class_name`` must define a :class:`Backend` subclass; it is imported the first time the
    backend is used. ``frameworks`` are the top-level import names whose presence in ``sys.modules``
    lets ``backend=None`` consider this backend.
    """
    _ENTRIES[name] = _Entry(name, module, class_name, tuple(frameworks), tuple(distributions or frameworks), extra)
    _INSTANCES.pop(name, None)


register_backend("torch", "xnorm._backends.torch", "TorchBackend", frameworks=("torch",), extra="torch")
register_backend(
    "mindspore", "xnorm._backends.mindspore", "MindSporeBackend", frameworks=("mindspore",), extra="mindspore"
)
register_backend(
    "flax", "xnorm._backends.flax", "FlaxBackend", frameworks=("flax",), distributions=("flax", "jax"), extra="flax"
)


def _install_hint(entry: _Entry) -> str:
    if entry.extra:
        return f'pip install "xnorm[{entry.extra}]"'
    return "pip install " + " ".join(entry.distributions)


def _framework_installed(entry: _Entry) -> bool:
    return all(importlib.util.find_spec(framework) is not None for framework in entry.frameworks)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its module (and so its framework) if needed."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name not in _ENTRIES:
        raise UnknownBackendError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(_ENTRIES))}. "
            "Pass one of these, or backend=None to detect it from the layer's type."
        )
    entry = _ENTRIES[name]
    if not _framework_installed(entry):
        raise BackendNotInstalledError(
            f"backend {name!r} needs {' and '.join(entry.distributions)}, which is not installed in this "
            f"environment. Install it with: {_install_hint(entry)}"
        )
    backend_class = getattr(importlib.import_module(entry.module), entry.class_name)
    _INSTANCES[name] = backend_class()
    return _INSTANCES[name]


def _loaded_backends() -> List[Backend]:
    """Backends whose framework the user has already imported."""
    return [
        get_backend(entry.name)
        for entry in _ENTRIES.values()
        if all(framework in sys.modules for framework in entry.frameworks)
    ]


def detect_backend(obj: Any) -> Backend:
    """The backend owning ``obj``, among frameworks already imported; :class:`BackendDetectionError` otherwise."""
    for backend in _loaded_backends():
        if backend.owns(obj):
            return backend
    loaded = [entry.name for entry in _ENTRIES.values() if all(f in sys.modules for f in entry.frameworks)]
    raise BackendDetectionError(
        f"no backend recognises an object of type {type(obj).__module__}.{type(obj).__qualname__} "
        f"(frameworks imported so far: {', '.join(loaded) or 'none'}). Pass a torch.nn.Module, a "
        "mindspore.nn.Cell or a Flax module, or name the backend with backend=..."
    )


def resolve_backend(obj: Any, backend: Optional[str]) -> Backend:
    """``get_backend(backend)`` when named (checking it owns ``obj``), else :func:`detect_backend`."""
    if backend is None:
        return detect_backend(obj)
    chosen = get_backend(backend)
    if not chosen.owns(obj):
        raise BackendDetectionError(
            f"backend {backend!r} cannot handle an object of type "
            f"{type(obj).__module__}.{type(obj).__qualname__}. Pass a layer of that framework, or "
            "leave backend=None to detect the right backend."
        )
    return chosen


def backends() -> List[BackendInfo]:
    """Every registered backend, whether its framework is installed here, and the versions found.

    Imports no framework.
    """
    rows = []
    for entry in _ENTRIES.values():
        versions: Dict[str, Optional[str]] = {}
        for dist in entry.distributions:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        rows.append(BackendInfo(entry.name, _framework_installed(entry), versions, _install_hint(entry)))
    return rows
