"""``xnorm.freeze`` / ``unfreeze`` / ``is_frozen`` for Flax: BatchNorm layers that normalize with their
stored statistics whatever ``train()``, ``nnx.view`` or a ``use_running_average=`` argument says.

Flax's BatchNorm (NNX and linen) takes its mode from ``use_running_average``: an attribute (NNX, set by
``model.train()`` / ``model.eval()`` / ``set_attributes`` / ``nnx.view``), a dataclass field (linen) or a
call argument (both; the argument wins in NNX, and linen refuses both at once). Each of those is written
by ordinary training code, which is the trap: ``model.train()`` undoes ``bn.eval()``, and a linen model
calls ``nn.BatchNorm(use_running_average=not train)``. So a frozen layer ignores all of them.

**NNX** (in place). A frozen ``nnx.BatchNorm`` gets a subclass of its own class (``FrozenBatchNorm`` for
``nnx.BatchNorm``, one class per base made once and cached) whose ``__call__`` calls the base's with
``use_running_average=True``; with ``affine=True`` its ``scale`` and ``bias`` variables get the type
:class:`FrozenParam`, an ``nnx.Variable`` that is not an ``nnx.Param``. Both changes assign
``__class__`` on the existing objects:

* identity is kept: references the user holds, variables shared with other modules, the attribute
  ``use_running_average`` (``train()``/``eval()`` keep writing it; :func:`unfreeze` just exposes it
  again, so the layer comes back in the mode last requested), momentum and epsilon;
* the module's type is part of its ``GraphDef``, so ``nnx.split``/``nnx.merge``, ``nnx.clone``,
  ``copy.deepcopy``, ``nnx.view`` and ``nnx.jit`` carry the frozen class (tested), and ``nnx.jit``
  retraces a function traced before ``freeze`` (the graph definition changed);
* ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` select by ``isinstance(v, nnx.Param)``, so
  a ``FrozenParam`` gets no gradient and no update, weight decay included;
* ``nnx.state(model)`` has the same paths and values, so checkpoints load both ways; only the
  variable type of a frozen scale and bias differs (``FrozenParam``). Filters that must cover every
  variable, ``nnx.split(model, nnx.Param, nnx.BatchStat)``, raise Flax's "Non-exhaustive filters"
  error for them; add ``...`` (or ``FrozenParam``) to the filters.

Why not the alternatives: ``nnx.view(model, use_running_average=True)`` and ``bn.eval()`` are undone by
the next ``model.train()`` and ignore the call argument; replacing the layer by a wrapper changes the
state paths and the references users hold; ``jax.lax.stop_gradient`` on the scale still lets an
optimizer's weight decay and momentum move it.

**linen** (functional: modules are immutable dataclasses). ``xnorm.freeze(module)`` returns a new
module of a subclass of the module's class (same fields, same methods, same variables), whose methods
run inside ``nn.intercept_methods``: every call of an ``nn.BatchNorm`` whose variables lie under the
module's own path, and that ``layers=`` selects, is made with ``use_running_average=True`` (a
``use_running_average`` field set to False is overridden by calling a clone bound to the same scope).
The interceptor is installed by overriding ``Module._call_wrapped_method`` (the one private linen hook
used, marked ``nn.nowrap``), because the BatchNorm layers of an ``nn.compact`` method do not exist until
it runs; this reaches every method (``apply(..., method=...)``, ``bind``, ``init``) and works when the
frozen module is a field of a bigger model. Variables never change, so ``apply(..., mutable=
['batch_stats'])`` returns them bit for bit. linen's parameters are trained by whatever optimizer the
user builds over ``params``, so ``affine=True`` is carried out by the optimizer:
:func:`frozen_labels` (for ``optax.multi_transform``) and :func:`frozen_mask` trace the module once
(``jax.eval_shape``, nothing computed) and label the selected layers' scale and bias.

Limits: NNX ``type(bn) is nnx.BatchNorm`` is False while frozen; a frozen subclass of a user's
BatchNorm subclass is made at freeze time, so pickling such a model to another process fails (the
``nnx.state`` checkpoint does not). linen: ``nn.jit`` inside the model caches by module fields and is
not tested.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Dict, List, Optional, Tuple

import jax
from flax import linen as nn
from flax import nnx
from flax.core.scope import Scope

from xnorm.errors import AlreadyFrozenError, NotFrozenError, OptionError, UnsupportedLayerError
from xnorm.freeze_plan import describe, nothing_to_freeze, selects, stateless_reason

__all__ = [
    "FrozenParam",
    "FrozenBatchNorm",
    "freeze",
    "unfreeze",
    "is_frozen",
    "frozen_labels",
    "frozen_mask",
]

_THAWED = "_xnorm_thawed"  # on a frozen class: the class unfreeze restores
_LINEN_CONFIG = "_xnorm_freeze"  # on a frozen linen class: its _Selection


def _optional(module: Any, *names: str) -> Tuple[type, ...]:
    return tuple(kind for kind in (getattr(module, name, None) for name in names) if kind is not None)


_BATCHNORMS: Tuple[type, ...] = (nnx.BatchNorm, nn.BatchNorm)
# Normalization layers without running statistics: the same computation in every mode.
_STATELESS: Tuple[type, ...] = _optional(nnx, "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm") + _optional(
    nn, "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm"
)
_AFFINE = ("scale", "bias")


# ------------------------------------------------------------------------------------------------
# Selection (both APIs)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Selection:
    """``layers=`` (already put in one form by xnorm.api) and ``affine``."""

    layers: Any
    affine: bool

    def selects(self, name: str, module: Any) -> bool:
        return selects(self.layers, name, module)


def _is_normalization(module: Any) -> bool:
    return isinstance(module, _BATCHNORMS + _STATELESS)


def _check_types(layers: Any) -> None:
    if not isinstance(layers, tuple):
        return
    for kind in layers:
        if not issubclass(kind, _BATCHNORMS + _STATELESS):
            raise OptionError(
                f"layers= names {kind.__module__}.{kind.__qualname__}, which is not a normalization layer; "
                "xnorm.freeze freezes nnx.BatchNorm and linen nn.BatchNorm. Name those types, or select by name "
                "pattern or predicate."
            )
    stateless = [kind for kind in layers if not issubclass(kind, _BATCHNORMS)]
    if stateless:
        raise UnsupportedLayerError(
            f"{stateless[0].__qualname__} has no running statistics: it computes the same thing in train and eval "
            "mode, so there is nothing to freeze; leave its type out of layers=. To stop training its scale and "
            "bias, leave them out of the optimizer."
        )


_STATELESS_FIX = "To stop training its scale and bias, leave them out of the optimizer"


def _frozen_class(module_or_class: Any) -> bool:
    kind = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return _THAWED in kind.__dict__


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class FrozenParam(nnx.Variable):
    """The type of a frozen NNX BatchNorm's ``scale`` and ``bias`` (``xnorm.freeze(..., affine=True)``).

    Not an ``nnx.Param``: ``nnx.grad``, ``nnx.value_and_grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
    leave it alone. Same value, same path in ``nnx.state``. ``unfreeze`` gives back the original type
    (``_xnorm_thawed``)."""

    _xnorm_thawed = nnx.Param


def _frozen_call(self, x, use_running_average=None, **kwargs):
    # The argument is accepted and ignored: a model's own forward often passes use_running_average=not train.
    return type(self)._xnorm_thawed.__call__(self, x, use_running_average=True, **kwargs)


class FrozenBatchNorm(nnx.BatchNorm):
    """An ``nnx.BatchNorm`` frozen by ``xnorm.freeze``: it always normalizes with its stored ``mean`` and
    ``var`` and never updates them. Only ever made by assigning ``__class__`` (never constructed)."""

    _xnorm_thawed = nnx.BatchNorm
    __call__ = _frozen_call


_FROZEN_CLASSES: Dict[type, type] = {nnx.BatchNorm: FrozenBatchNorm, nnx.Param: FrozenParam}
_CLASSES_LOCK = threading.Lock()


def _frozen_version(kind: type) -> type:
    """The frozen class for ``kind`` (a BatchNorm class or a Param class), made once per class so that
    a jitted function sees one type (its cache key) however many times a model is frozen."""
    with _CLASSES_LOCK:
        frozen = _FROZEN_CLASSES.get(kind)
        if frozen is None:
            if issubclass(kind, nnx.Param):
                # FrozenParam's subclass, not kind's: kind is a Param, which is what must stop matching.
                frozen = type(f"Frozen{kind.__name__}", (FrozenParam,), {_THAWED: kind, "__module__": __name__})
            else:
                namespace = {_THAWED: kind, "__call__": _frozen_call, "__module__": __name__}
                frozen = type(f"Frozen{kind.__name__}", (kind,), namespace)
            _FROZEN_CLASSES[kind] = frozen
        return frozen


def _nnx_named_modules(obj: nnx.Module) -> List[Tuple[str, nnx.Module]]:
    named = [
        (".".join(str(key) for key in path), node) for path, node in nnx.iter_graph(obj) if isinstance(node, nnx.Module)
    ]
    return sorted(named, key=lambda item: item[0])


def _affine_variables(module: nnx.Module) -> List[Tuple[str, nnx.Variable]]:
    return [(name, var) for name in _AFFINE if isinstance(var := getattr(module, name, None), nnx.Variable)]


def _plan_nnx(obj: nnx.Module, selection: _Selection) -> List[nnx.Module]:
    """The layers to freeze, or the error saying why there are none; nothing is changed here."""
    layers = selection.layers
    named = _nnx_named_modules(obj)
    chosen = [(name, module) for name, module in named if _is_normalization(module) and selection.selects(name, module)]
    to_freeze, already, stateless = [], [], []
    for name, module in chosen:
        if _frozen_class(module):
            already.append((name, module))
        elif isinstance(module, nnx.BatchNorm):
            hijax = [vname for vname, var in _affine_variables(module) if getattr(var, "hijax", False)]
            if hijax and selection.affine:
                raise UnsupportedLayerError(
                    f"{describe(name, module)} holds hijax variables ({', '.join(hijax)}), whose type xnorm.freeze "
                    "cannot change. Build the layer with ordinary variables (hijax=False), or pass affine=False."
                )
            to_freeze.append(module)
        else:
            stateless.append((name, module))
    if to_freeze:
        return to_freeze
    raise nothing_to_freeze(
        type(obj).__name__, layers, already=already, stateless=stateless, stateless_fix=_STATELESS_FIX,
        no_layer="no nnx.BatchNorm, so there is nothing to freeze (LayerNorm, GroupNorm and RMSNorm have no running "
        "statistics). Pass the model or layer that holds the BatchNorm layers.",
        candidates=[(name, module) for name, module in named if _is_normalization(module)],
        naming="names are the attribute paths joined by dots, 'blocks.0.bn'; the types are nnx types",
    )


def _freeze_nnx(obj: nnx.Module, selection: _Selection) -> nnx.Module:
    modules = _plan_nnx(obj, selection)
    # Every class is looked up before the first assignment, so an error leaves the model untouched.
    plans = []
    for module in modules:
        variables = _affine_variables(module) if selection.affine else []
        plans.append(
            (
                module,
                _frozen_version(type(module)),
                [(var, _frozen_version(type(var))) for _, var in variables if isinstance(var, nnx.Param)],
            )
        )
    for module, frozen, variables in plans:
        for var, frozen_var in variables:
            object.__setattr__(var, "__class__", frozen_var)
        object.__setattr__(module, "__class__", frozen)
    return obj


def _unfreeze_nnx(obj: nnx.Module) -> nnx.Module:
    targets = [module for _, module in _nnx_named_modules(obj) if _frozen_class(module)]
    if not targets:
        raise NotFrozenError(
            f"nothing in {type(obj).__name__} was frozen by xnorm.freeze, so there is nothing to unfreeze. "
            "Pass the model (or layer) you gave xnorm.freeze."
        )
    for module in targets:
        for _, var in _affine_variables(module):
            if _frozen_class(var):
                object.__setattr__(var, "__class__", type(var).__dict__[_THAWED])
        object.__setattr__(module, "__class__", type(module).__dict__[_THAWED])
    return obj


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class _Recorder(threading.local):
    """While :func:`frozen_labels` traces a module: what the interceptors saw."""

    def __init__(self) -> None:
        self.active: Optional[Dict[str, list]] = None


_RECORDER = _Recorder()


def _relative(path: Tuple[str, ...], root: Tuple[str, ...]) -> Optional[Tuple[str, ...]]:
    if len(path) < len(root) or tuple(path[: len(root)]) != tuple(root):
        return None
    return tuple(path[len(root) :])


def _linen_interceptor(root: nn.Module, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not _is_normalization(module) or module.scope is None:
        return next_fun(*args, **kwargs)
    relative = _relative(module.scope.path, root.scope.path if root.scope is not None else ())
    if relative is None:  # a layer called from inside but owned elsewhere: its statistics are not ours
        return next_fun(*args, **kwargs)
    selection: _Selection = getattr(type(root), _LINEN_CONFIG)
    name = ".".join(relative)
    record = _RECORDER.active
    if not isinstance(module, nn.BatchNorm):
        if record is not None and selection.layers is not None and selection.selects(name, module):
            record["stateless"].append((name, module))
        return next_fun(*args, **kwargs)
    if record is not None:
        record["seen"].append((name, module))
    if not selection.selects(name, module):
        return next_fun(*args, **kwargs)
    if record is not None:
        record["frozen"].append((tuple(module.scope.path), selection.affine))
    # use_running_average is the second positional parameter of nn.BatchNorm.__call__
    args = args[:1]
    kwargs = {key: value for key, value in kwargs.items() if key != "use_running_average"}
    if module.use_running_average is None:
        return next_fun(*args, use_running_average=True, **kwargs)
    if module.use_running_average:
        return next_fun(*args, **kwargs)
    # A field set to False cannot be overridden by the argument (linen refuses both); a clone on the
    # same scope reads and writes the very same variables.
    return module.clone(parent=module.scope, use_running_average=True)(*args, **kwargs)


@nn.nowrap
def _call_wrapped_method(self, fun, args, kwargs):
    with nn.intercept_methods(functools.partial(_linen_interceptor, self)):
        return type(self).__dict__[_THAWED]._call_wrapped_method(self, fun, args, kwargs)


def _init_fields(module: nn.Module) -> Dict[str, Any]:
    return {field.name: getattr(module, field.name) for field in dataclasses.fields(module) if field.init}


def _linen_children(value: Any) -> List[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (list, tuple)):
        return [child for item in value for child in _linen_children(item)]
    if isinstance(value, dict):
        return [child for item in value.values() for child in _linen_children(item)]
    return []


def _linen_is_frozen(module: nn.Module) -> bool:
    if _frozen_class(module):
        return True
    fields = _init_fields(module)
    return any(
        _linen_is_frozen(child)
        for key, value in fields.items()
        if key not in ("parent", "name")
        for child in _linen_children(value)
    )


def _check_unbound(module: nn.Module, what: str) -> None:
    if isinstance(module.parent, Scope):
        raise UnsupportedLayerError(
            f"{type(module).__name__} is bound to variables (module.bind, or inside apply at the top level); "
            f"{what} takes the unbound module: module.unbind()[0]."
        )


def _freeze_linen(module: nn.Module, selection: _Selection) -> nn.Module:
    _check_unbound(module, "xnorm.freeze")
    if isinstance(module, _STATELESS):
        raise UnsupportedLayerError(stateless_reason("", module, _STATELESS_FIX) + ".")
    if _frozen_class(module):
        raise AlreadyFrozenError(
            f"{type(module).__name__} is frozen already. To change the options, call xnorm.unfreeze(module) "
            "first, then xnorm.freeze(module, ...) again on the module it returns."
        )
    fields = _init_fields(module)
    children = [
        child for key, value in fields.items() if key not in ("parent", "name") for child in _linen_children(value)
    ]
    if type(module).__module__.startswith("flax.") and not isinstance(module, nn.BatchNorm) and not children:
        raise UnsupportedLayerError(
            f"{type(module).__name__} contains no nn.BatchNorm, so there is nothing to freeze. Pass the model or "
            "layer that holds the BatchNorm layers."
        )
    base = type(module)
    frozen_cls = type(
        f"Frozen{base.__name__}",
        (base,),
        {
            _THAWED: base,
            _LINEN_CONFIG: selection,
            "_call_wrapped_method": _call_wrapped_method,
            "__module__": base.__module__,
            "__doc__": base.__doc__,
        },
    )
    if module.scope is not None and isinstance(module.parent, nn.Module):
        # Made inside a parent's compact method: the layer has reserved its name and scope already, and a
        # second module of that name is refused; the frozen one takes that very scope (as xnorm.wrap does).
        fields.update(parent=module.scope, name=module.name)
    return frozen_cls(**fields)


def _thaw_linen(value: Any) -> Any:
    if isinstance(value, nn.Module):
        fields = {
            key: (item if key in ("parent", "name") else _thaw_linen(item)) for key, item in _init_fields(value).items()
        }
        cls = type(value).__dict__.get(_THAWED, type(value))
        return cls(**fields)
    if isinstance(value, (list, tuple)) and _linen_children(value):
        return type(value)(_thaw_linen(item) for item in value)
    if isinstance(value, dict) and _linen_children(value):
        return type(value)((key, _thaw_linen(item)) for key, item in value.items())
    return value


def _unfreeze_linen(module: nn.Module) -> nn.Module:
    _check_unbound(module, "xnorm.unfreeze")
    if not _linen_is_frozen(module):
        raise NotFrozenError(
            f"nothing in {type(module).__name__} was frozen by xnorm.freeze, so there is nothing to unfreeze. "
            "Pass the module xnorm.freeze returned (linen's freeze returns a new module)."
        )
    return _thaw_linen(module)


def _trace_linen(module: nn.Module, variables: Any, args, kwargs, rngs, method) -> Dict[str, list]:
    if not isinstance(module, nn.Module):
        raise OptionError(
            f"frozen_labels and frozen_mask are for linen modules (an NNX model's frozen scale and bias are "
            f"FrozenParam variables, which nnx.Optimizer(..., wrt=nnx.Param) skips); got {type(module).__name__}."
        )
    _check_unbound(module, "frozen_labels")
    if not _linen_is_frozen(module):
        raise NotFrozenError(
            f"nothing in {type(module).__name__} was frozen by xnorm.freeze; pass the module xnorm.freeze returned."
        )
    if not hasattr(variables, "keys") or "params" not in variables:
        raise OptionError(
            "variables must be the module's variables, a mapping with a 'params' collection (as init returns)."
        )
    record: Dict[str, list] = {"seen": [], "frozen": [], "stateless": []}
    previous, _RECORDER.active = _RECORDER.active, record
    try:
        # Shapes only: nothing is computed, no variable changes; mutable=True lets layers that are not frozen
        # take their training-mode path without a mutable= from the caller.
        jax.eval_shape(lambda v: module.apply(v, *args, rngs=rngs, method=method, mutable=True, **kwargs), variables)
    finally:
        _RECORDER.active = previous
    if not record["frozen"]:
        what = type(module).__name__
        if record["stateless"]:
            raise UnsupportedLayerError(
                "; ".join(stateless_reason(name, layer, _STATELESS_FIX) for name, layer in record["stateless"]) + "."
            )
        if not record["seen"]:
            raise UnsupportedLayerError(
                f"no nn.BatchNorm under {what} was called by this call, so nothing is frozen. Pass the module "
                "that holds the BatchNorm layers, and the arguments of a call that reaches them."
            )
        seen = ", ".join(sorted({describe(name, layer) for name, layer in record["seen"]}))
        raise OptionError(
            f"layers= selects none of the BatchNorm layers this call reaches ({seen}). Fix the selection (names "
            "are the module paths joined by dots, 'Backbone_0.BatchNorm_0')."
        )
    return record


def frozen_labels(
    module: nn.Module,
    variables: Any,
    *args: Any,
    rngs: Any = None,
    method: Any = None,
    frozen: Any = "frozen",
    trainable: Any = "trainable",
    **kwargs: Any,
) -> Any:
    """Labels for ``optax.multi_transform``: a tree shaped like ``variables["params"]`` holding ``frozen``
    for the scale and bias of every BatchNorm that a linen module returned by :func:`xnorm.freeze` (with
    ``affine=True``) freezes, and ``trainable`` everywhere else.

    ``*args``, ``**kwargs``, ``rngs`` and ``method`` are those of a ``module.apply`` call that reaches the
    frozen layers (a training call: a BatchNorm built in a branch that call skips is not seen); it is
    traced with ``jax.eval_shape`` (shapes only, nothing runs). Use::

        labels = frozen_labels(frozen, variables, x, train=True)
        tx = optax.multi_transform({"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)

    (``optax.masked`` would pass the masked gradients through unchanged: use ``set_to_zero``.)

    Raises:
        NotFrozenError: nothing in ``module`` is frozen.
        UnsupportedLayerError: the call reaches no BatchNorm under the module, or ``layers=`` selected only
            layers without running statistics.
        OptionError: ``layers=`` selects none of the BatchNorm layers the call reaches; bad ``variables``.
    """
    record = _trace_linen(module, variables, args, kwargs, rngs, method)
    scopes = {path for path, affine in record["frozen"] if affine}

    def label(path, _leaf):
        keys = tuple(str(getattr(entry, "key", entry)) for entry in path)
        return frozen if keys[-1:] and keys[-1] in _AFFINE and keys[:-1] in scopes else trainable

    return jax.tree_util.tree_map_with_path(label, variables["params"])


def frozen_mask(
    module: nn.Module, variables: Any, *args: Any, rngs: Any = None, method: Any = None, **kwargs: Any
) -> Any:
    """:func:`frozen_labels` as booleans: True for the frozen scale and bias, False for the rest (for
    ``optax.masked(optax.set_to_zero(), mask)`` chained after the optimizer, or to inspect)."""
    return frozen_labels(module, variables, *args, rngs=rngs, method=method, frozen=True, trainable=False, **kwargs)


# ------------------------------------------------------------------------------------------------
# The backend's entry points
# ------------------------------------------------------------------------------------------------
def freeze(obj: Any, *, affine: bool, layers: Any) -> Any:
    _check_types(layers)
    selection = _Selection(layers=layers, affine=affine)
    if isinstance(obj, nn.Module):
        return _freeze_linen(obj, selection)
    return _freeze_nnx(obj, selection)


def unfreeze(obj: Any) -> Any:
    if isinstance(obj, nn.Module):
        return _unfreeze_linen(obj)
    return _unfreeze_nnx(obj)


def is_frozen(obj: Any) -> bool:
    if isinstance(obj, nn.Module):
        return _linen_is_frozen(obj)
    if isinstance(obj, nnx.Module):
        return any(_frozen_class(module) for _, module in _nnx_named_modules(obj))
    return False
