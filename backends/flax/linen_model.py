"""``xnorm.remove(model, variables)`` on a whole linen model.

A linen model is a description: the wrappers a setup-style model creates in ``setup()`` come from its
own code, which xnorm cannot rewrite. So removal returns

* the **variables of the plain model**: every wrapper's parameters replaced by the weight it computes
  (``<name>``, as the plain layer holds it) and spectral norm's u and v dropped, at the wrapper's path;
* a **plain view** of the model (:class:`LinenPlainModel`): the model itself, run in its own scope
  (``nn.share_scope``), with every xnorm wrapper inside it computing as its plain layer from those
  variables: no norm, no power iteration, the plain layer's parameter names.

Wrappers are found where linen keeps submodules: attributes assigned in ``setup()`` and dataclass
fields, nested in lists, tuples and dicts, at any depth. A wrapper created inline in an ``@nn.compact``
method exists only while that method runs, so it is not found; remove such a wrapper alone
(``xnorm.remove(wrapper, its_variables)``) or create it in ``setup()``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from flax import linen as nn

from xnorm import api
from xnorm.errors import OptionError

__all__ = ["LinenPlainModel", "plain_wrappers", "remove_linen_model"]

_PLAIN = contextvars.ContextVar("xnorm_linen_wrappers_are_plain", default=False)


def plain_wrappers() -> bool:
    """True while a :class:`LinenPlainModel` runs: xnorm's linen wrappers then compute as their plain layer."""
    return _PLAIN.get()


@contextlib.contextmanager
def _plain() -> Iterator[None]:
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


class LinenPlainModel(nn.Module):
    """``model`` with every xnorm wrapper inside it computing as its plain layer (module docstring).

    It shares ``model``'s scope, so its variables are exactly the plain model's; ``apply``, ``init`` and
    being a submodule of another model work as for ``model``. Calls go to ``model.__call__``.
    """

    model: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        with _plain():
            return self.model(*args, **kwargs)


def plain_call(wrapper: nn.Module, args: tuple, kwargs: Dict[str, Any]):
    """What an xnorm linen wrapper computes inside a :class:`LinenPlainModel`: its layer, from the plain
    parameters in the wrapper's own scope (created at ``init`` as the layer's initializers give them)."""
    from . import linen_initial_params

    template = wrapper.layer.clone()
    if not wrapper.has_variable("params", wrapper.param_name) and wrapper.is_mutable_collection("params"):
        initial = linen_initial_params(wrapper, template, args, kwargs)
        values = {key: wrapper.param(key, lambda _, value=value: value) for key, value in initial.items()}
    else:
        values = dict(wrapper.variables.get("params", {}))
    return template.apply({"params": values}, *args, **kwargs)


def _modules_in(value: Any) -> Iterator[nn.Module]:
    if isinstance(value, nn.Module):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _modules_in(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _modules_in(item)


def _wrappers_in(bound: nn.Module, wrapper_types: tuple) -> List[Tuple[Tuple[str, ...], nn.Module]]:
    """``[(scope path, bound wrapper)]`` of every xnorm wrapper held by ``bound`` or its submodules."""
    found: List[Tuple[Tuple[str, ...], nn.Module]] = []
    seen = set()

    def visit(module: nn.Module) -> None:
        getattr(module, "_xnorm_run_setup", None)  # an unknown attribute makes linen run setup() first
        for name in list(vars(module)):
            if name.startswith("_") or name in ("parent", "name", "scope"):
                continue
            for child in _modules_in(getattr(module, name, None)):
                if id(child) in seen or child.scope is None:
                    continue
                seen.add(id(child))
                if isinstance(child, wrapper_types):
                    found.append((tuple(child.scope.path), child))
                else:
                    visit(child)

    visit(bound)
    return found


def _subtree(tree: Any, path: Tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _replaced(tree: Mapping, path: Tuple[str, ...], value: Any) -> Dict[str, Any]:
    """A copy of nested ``tree`` with the entry at ``path`` replaced by ``value`` (removed when None)."""
    out = dict(tree)
    if len(path) == 1:
        if value is None:
            out.pop(path[0], None)
        else:
            out[path[0]] = value
        return out
    out[path[0]] = _replaced(tree[path[0]], path[1:], value)
    return out


def remove_linen_model(backend, model: nn.Module, variables: Any, wrapper_types: tuple, **options: Any):
    """``(LinenPlainModel(model), plain variables)``; every wrapper's removal as :func:`xnorm.remove` does
    it for the wrapper alone (``update_stats=`` is needed when the model holds spectral norm)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise OptionError(
            "xnorm.remove on a linen model needs its variables: plain_model, plain_variables = "
            "xnorm.remove(model, variables)."
        )
    found = _wrappers_in(model.bind(variables), wrapper_types)
    if not found:
        raise api._not_wrapped(
            model,
            hint="a linen model's wrappers are found in setup() attributes and fields; one created inline in an "
            "@nn.compact method exists only while it runs: remove it alone with xnorm.remove(wrapper, variables)",
        )
    from .spectral import LinenSpectralNorm

    spectral = [wrapper for _, wrapper in found if isinstance(wrapper, LinenSpectralNorm)]
    if "update_stats" in options and not spectral:
        raise OptionError("update_stats= is for spectral norm, and this model holds none of its wrappers: drop it.")
    out = {collection: values for collection, values in variables.items()}
    for path, wrapper in found:
        own = {collection: _subtree(values, path) for collection, values in variables.items()}
        own = {collection: values for collection, values in own.items() if values is not None}
        own_options = dict(options)
        if not isinstance(wrapper, LinenSpectralNorm):
            own_options.pop("update_stats", None)
        _, plain = backend._remove_linen(wrapper.clone(parent=None), own, **own_options)
        for collection in own:
            out[collection] = _replaced(out[collection], path, plain.get(collection))
    out = {collection: pruned for collection, values in out.items() if (pruned := _pruned(values))}
    return LinenPlainModel(model), _same_type(variables, out)


def _pruned(tree: Any) -> Any:
    """``tree`` without the mappings that removing u and v left empty (a collection may go entirely)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {key: _pruned(value) for key, value in tree.items()}
    return {key: value for key, value in out.items() if not (isinstance(value, Mapping) and not value)}


def _same_type(like: Any, value: Dict[str, Any]) -> Any:
    from . import _same_mapping_type

    return _same_mapping_type(like, value)
