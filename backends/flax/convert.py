"""Flax's part of checkpoint conversion (:mod:`xnorm.porting`): linen variables and NNX modules.

The plug-in interface is defined in ``xnorm._backends.torch.convert``'s docstring; this module implements
it for Flax.

Keys. Every Flax tensor is named by its path joined with ``/``:

* linen variables: the collection first, then the module path, then the variable:
  ``params/ups_0/kernel_v``, ``batch_stats/bn/mean``;
* NNX modules and ``nnx.State``: the state path, ``nnx.List`` items by their index:
  ``ups/0/kernel_v``, ``bn/mean``;
* ``.msgpack`` files (:mod:`flax.serialization`): the nested mapping they hold, read the same way, so
  a file of linen variables gives linen keys and a file of an NNX pure state dict gives NNX keys.

Which variables are converted. linen: every collection except ``intermediates`` and ``cache``
(which hold no weights; the result keeps them as they are). NNX: every ``nnx.Variable`` except
``nnx.RngState`` (random keys and counts), ``nnx.Intermediate`` and ``nnx.Cache``.

Layer kinds (they pick torch's names and the layout change, :data:`xnorm.porting.NAMES`):

* NNX, from the module type: ``Linear``, ``Conv``, ``ConvTranspose``, ``Embed``, ``BatchNorm``,
  ``LayerNorm``/``RMSNorm`` (scale and bias), ``GroupNorm``, and xnorm's NNX wrapper around any of
  them. A module of another Flax type (``LinearGeneral``, ``Einsum``...) keeps its names and axes;
  a user-defined module is read by the linen rules below.
* linen (variables say nothing about the module type), from names and ranks: a ``kernel`` (or
  ``kernel_v``) of rank 2 is a linear layer, of rank 3 to 5 a convolution (which is also right for a
  ``ConvTranspose(transpose_kernel=True)``: both keep torch's two channel axes last, reversed); an
  ``embedding`` is an embedding; ``scale``/``bias`` next to ``batch_stats`` ``mean``/``var`` a batch
  norm; ``scale``/``bias`` alone a layer norm. Anything else keeps its names and axes. A linen
  ``DenseGeneral`` with a kernel of rank 3 or more would be read as a convolution: use an NNX target,
  or a model whose variables follow these rules.

Flax's ``ConvTranspose`` must be built with ``transpose_kernel=True``: that form's kernel is torch's
weight with its axes reversed. With ``transpose_kernel=False`` the kernel is also flipped along its
spatial axes, which variables cannot reveal: for an NNX target this is detected and refused; for linen
variables it cannot be, so a linen model must use ``transpose_kernel=True`` (its outputs would differ
from torch's otherwise, which :func:`xnorm.compare` shows).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import linen as nn
from flax import nnx, serialization
from flax.core import FrozenDict

from xnorm.errors import CheckpointFileError, ConversionError, OptionError
from xnorm.porting import (
    BATCHNORM,
    GROUPNORM,
    LAYERNORM,
    ArrayRef,
    LayerInfo,
    TensorSpec,
    atomic_write,
    output_leaves,
    pick_entry,
)
from xnorm.spec import REPARAMETRIZATIONS, LayerKind

from . import NNXLayerCopy, NNXWeightNorm

__all__ = [
    "accepts_source",
    "accepts_like",
    "accepts_model",
    "read",
    "describe",
    "candidate_keys",
    "build",
    "save",
    "run_eval",
]

#: linen collections that hold no weights: never read, never filled, kept as they are by build().
SKIPPED_COLLECTIONS = ("intermediates", "cache")
#: NNX variable types that hold no weights (random streams, sown values, decoding caches).
_SKIPPED_VARIABLES = (nnx.RngState, nnx.Intermediate, nnx.Cache)
#: The linen collection of batch statistics; every other converted variable is in ``params``.
_BATCH_STATS = "batch_stats"
_BATCH_STAT_NAMES = ("mean", "var")
#: Names ending so may be a reparametrization's state (spectral norm's ``kernel_u``, ``kernel_v``; the orthogonal
#: ``kernel_base``), which linen keeps in batch_stats.
_STATE_SUFFIXES = tuple(dict.fromkeys(spec.suffixes[entry] for spec in REPARAMETRIZATIONS.values()
                                      for entry in spec.state))
SEPARATOR = "/"

_NNX_KINDS: Tuple[Tuple[type, str], ...] = (
    (nnx.Linear, LayerKind.LINEAR),
    (nnx.Embed, LayerKind.EMBEDDING),
    (nnx.BatchNorm, BATCHNORM),
    (nnx.LayerNorm, LAYERNORM),
    (nnx.RMSNorm, LAYERNORM),  # one "scale": torch's RMSNorm "weight", as a LayerNorm without bias
    (nnx.GroupNorm, GROUPNORM),
)


# -- what is a Flax object -------------------------------------------------------------------------


def _is_array(value: Any) -> bool:
    # NumPy scalars count: flax.serialization restores some 0-d arrays as them.
    return isinstance(value, (jax.Array, np.ndarray, np.number, np.bool_))


def _leaves(tree: Mapping, prefix: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], Any]]:
    """``(path, leaf)`` of a nested mapping, depth first in the mapping's order (keys as str)."""
    out: List[Tuple[Tuple[str, ...], Any]] = []
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping) and not isinstance(value, nnx.Variable):
            out += _leaves(value, path)
        else:
            out.append((path, value))
    return out


def accepts_source(obj: Any) -> bool:
    """An NNX module, an ``nnx.State``, or a nested mapping holding JAX or NumPy arrays (linen variables, a
    pure state dict). A mapping with other values too (a training checkpoint) is accepted here so that
    :func:`read` can say which entries are not arrays."""
    if isinstance(obj, (nnx.Module, nnx.State, nn.Module)):  # a linen module: read() says to pass its variables
        return True
    if not isinstance(obj, Mapping) or not obj:
        return False
    return any(_is_array(leaf) for _, leaf in _leaves(obj))


def accepts_like(obj: Any) -> bool:
    """An NNX module, or a nested mapping of arrays or ``jax.ShapeDtypeStruct`` (linen variables)."""
    if isinstance(obj, nnx.Module):
        return True
    if not isinstance(obj, Mapping) or not obj or isinstance(obj, nnx.State):
        return False
    leaves = _leaves(obj)
    return bool(leaves) and all(_is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct) for _, leaf in leaves)


def accepts_model(obj: Any) -> bool:
    """An NNX module, or a linen ``(module, variables)`` pair."""
    if isinstance(obj, nnx.Module):
        return True
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module) and isinstance(obj[1], Mapping)


def _dtype_name(value: Any) -> str:
    return np.dtype(value.dtype).name


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


# -- NNX variables ---------------------------------------------------------------------------------


def _nnx_variables(obj: Any) -> List[Tuple[Tuple[Any, ...], nnx.Variable]]:
    """The converted variables of an NNX module or State: ``(state path, Variable)``, in state order."""
    state = nnx.state(obj) if isinstance(obj, nnx.Module) else obj
    out = []
    for path, variable in nnx.to_flat_state(state):
        if isinstance(variable, nnx.Variable) and not isinstance(variable, _SKIPPED_VARIABLES):
            out.append((tuple(path), variable))
    return out


def _key(path: Sequence[Any]) -> str:
    return SEPARATOR.join(str(part) for part in path)


# -- read ------------------------------------------------------------------------------------------


def _read_msgpack(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {os.fspath(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        return serialization.msgpack_restore(data)
    except Exception as error:  # msgpack and flax's ndarray decoder raise several unrelated types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointFileError(
            f"{os.fspath(path)!r} cannot be read as a flax.serialization msgpack file (truncated or corrupt?): "
            f"{type(error).__name__}: {detail}. Write it again with flax.serialization.to_bytes(variables) "
            "or xnorm.porting.save(result, path, to='flax')."
        ) from None


def _array_ref(key: str, value: Any, where: str) -> ArrayRef:
    if isinstance(value, jax.ShapeDtypeStruct):
        raise ConversionError(
            f"{where} entry {key!r} is abstract (a jax.ShapeDtypeStruct, from jax.eval_shape or nnx.eval_shape) "
            "and holds no values to convert. Pass a model or variables with real arrays."
        )
    return ArrayRef(key, _shape(value), _dtype_name(value), lambda value=value: np.asarray(value))


def read(source: Any, *, entry: Optional[str] = None) -> Dict[str, ArrayRef]:
    """The tensors of a Flax source, indexed by ``/``-joined path (module docstring), data read lazily.

    Accepts an NNX module, an ``nnx.State``, linen variables (a nested dict or FrozenDict) or a nested
    mapping of arrays such as ``nnx.to_pure_dict(state)``, and ``.msgpack`` paths holding either;
    ``entry`` picks one of them out of a mapping holding several (a training checkpoint's ``"model"``).
    Never modifies ``source``.

    Raises:
        CheckpointFileError: the file is missing, truncated or corrupt.
        ConversionError: the object is not one of the above, holds values that are not arrays (a
            training checkpoint with a step count or optimizer state), or abstract arrays.
    """
    where = "the source"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = repr(os.fspath(path))
        source = _read_msgpack(path)
        if not isinstance(source, Mapping):
            raise ConversionError(
                f"{where} holds a {type(source).__qualname__}, not a mapping of arrays (Flax variables or a state "
                "dict). Save the model's variables: flax.serialization.to_bytes(variables)."
            )
    if entry is not None and isinstance(source, (nnx.Module, nnx.State)):
        raise OptionError(f"entry={entry!r} picks a state dict out of a checkpoint holding several; "
                          f"{type(source).__qualname__} is one model's state. Leave entry out.")
    source, where = pick_entry(source, entry, where)
    if isinstance(source, (nnx.Module, nnx.State)):
        refs = {}
        for path, variable in _nnx_variables(source):
            key = _key(path)
            refs[key] = _array_ref(key, variable.get_value(), where)
        return refs
    if isinstance(source, nn.Module):
        raise ConversionError(
            f"source= is a linen {type(source).__qualname__}, which holds no variables; pass its variables "
            "(what module.init returned, {'params': ...})."
        )
    if not isinstance(source, Mapping):
        raise ConversionError(
            f"{where} is a {type(source).__qualname__}; a Flax source is an NNX module, an nnx.State, linen "
            "variables ({'params': ...}) or a .msgpack path."
        )
    linen = "params" in source  # linen variables: their non-weight collections are not read
    leaves = [(path, leaf) for path, leaf in _leaves(source) if not (linen and path[0] in SKIPPED_COLLECTIONS)]
    others = [(path, leaf) for path, leaf in leaves if not (_is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct))]
    if others:
        listed = ", ".join(f"{_key(path)!r}: {type(leaf).__qualname__}" for path, leaf in others[:8])
        raise ConversionError(
            f"{where} is not a mapping of arrays: entries {listed} are not arrays. If it is a training "
            "checkpoint (a TrainState with step and opt_state, or {'model': ..., 'step': ...}), name the entry "
            "holding the model's variables (entry='model', --entry model), or pass them alone, e.g. "
            "{'params': checkpoint['params']}."
        )
    if not leaves:
        raise ConversionError(f"{where} holds no arrays to convert.")
    return {_key(path): _array_ref(_key(path), leaf, where) for path, leaf in leaves}


# -- describe --------------------------------------------------------------------------------------


def _rank(spec_by_name: Mapping[str, TensorSpec], name: str) -> Optional[int]:
    # spectral norm's W (``_orig``) before ``_v``: its ``kernel_v`` is the 1-D power-iteration vector
    for candidate in (name, name + "_orig", name + "_v"):
        if candidate in spec_by_name:
            return len(spec_by_name[candidate].shape)
    return None


def _kind_from_names(params: Mapping[str, TensorSpec], batch_stats: Sequence[str]) -> str:
    """A layer's kind from its parameter names and ranks alone (linen, user-defined NNX modules)."""
    kernel = _rank(params, "kernel")
    if kernel is not None:
        if kernel == 2:
            return LayerKind.LINEAR
        if 3 <= kernel <= 5:
            return f"conv{kernel - 2}d"
        return LayerKind.GENERIC
    if _rank(params, "embedding") == 2:
        return LayerKind.EMBEDDING
    own = set(params) - set(batch_stats)
    if set(_BATCH_STAT_NAMES) <= set(batch_stats) and own <= {"scale", "bias"}:
        return BATCHNORM  # also without scale and bias (torch's affine=False)
    if own and own <= {"scale", "bias"} and not batch_stats:
        return LAYERNORM
    return LayerKind.GENERIC


def _describe_linen(like: Mapping) -> List[LayerInfo]:
    if not isinstance(like.get("params"), Mapping):
        raise ConversionError(
            "like= looks like linen variables but has no 'params' collection (top-level keys: "
            f"{', '.join(map(str, like)) or 'none'}). Pass the whole variables, as module.init returns them "
            "({'params': ..., 'batch_stats': ...}), or jax.eval_shape(module.init, ...) to skip the random init."
        )
    layers: Dict[Tuple[str, ...], LayerInfo] = {}
    stats: Dict[Tuple[str, ...], List[str]] = {}
    for path, leaf in _leaves(like):
        collection, segments, name = path[0], path[1:-1], path[-1]
        if collection in SKIPPED_COLLECTIONS:
            continue
        info = layers.setdefault(segments, LayerInfo(segments, LayerKind.GENERIC, {}))
        if name in info.params:
            raise ConversionError(
                f"like= holds {name!r} at {_key(segments) or 'the top level'} in two collections "
                f"({info.params[name].key!r} and {_key(path)!r}); xnorm cannot tell which torch tensor goes where. "
                "Convert the collections one at a time, or rename one of the variables."
            )
        info.params[name] = TensorSpec(_key(path), _shape(leaf), _dtype_name(leaf))
        if collection == _BATCH_STATS:
            stats.setdefault(segments, []).append(name)
    for segments, info in layers.items():
        info.kind = _kind_from_names(info.params, stats.get(segments, ()))
    return list(layers.values())


def _nnx_kind(module: Any, params: Mapping[str, TensorSpec], batch_stats: Sequence[str]) -> Tuple[str, Optional[str]]:
    """``(kind, problem)`` of an NNX module holding ``params``; ``problem`` explains a layer xnorm refuses."""
    layer_type = type(module)
    layer = module
    if isinstance(module, NNXLayerCopy):  # an xnorm wrapper, of any reparametrization
        layer_type = module._xnorm_layer_type
        if issubclass(layer_type, nnx.ConvTranspose):
            # The wrapper keeps the layer as a GraphDef; rebuilding it (with a kernel-shaped tensor: weight
            # norm's v, spectral norm's W) gives its options.
            kernel_like = module._xnorm_names[1] if isinstance(module, NNXWeightNorm) else module._xnorm_names[0]
            layer = module._layer_with(getattr(module, kernel_like).get_value(), share=False)
    weight = _rank(params, "kernel")
    if issubclass(layer_type, (nnx.Conv, nnx.ConvTranspose)) and weight is not None:
        n = weight - 2
        if issubclass(layer_type, nnx.Conv):
            return f"conv{n}d", None
        if not layer.transpose_kernel:
            return LayerKind.GENERIC, (
                "an nnx.ConvTranspose with transpose_kernel=False: its kernel is torch's weight flipped along "
                "the spatial axes, which a checkpoint conversion cannot express. Build it with "
                "transpose_kernel=True (and padding (d*(k-1)-p, d*(k-1)-p+output_padding) per axis for "
                "torch's output size)"
            )
        return f"conv_transpose{n}d", None
    for cls, kind in _NNX_KINDS:
        if issubclass(layer_type, cls):
            return kind, None
    if layer_type.__module__.split(".")[0] == "flax":
        return LayerKind.GENERIC, None  # LinearGeneral, Einsum...: no torch counterpart with a known layout
    return _kind_from_names(params, batch_stats), None


def _describe_nnx(like: nnx.Module) -> List[LayerInfo]:
    modules = {tuple(path): node for path, node in nnx.iter_graph(like) if isinstance(node, nnx.Module)}
    layers: Dict[Tuple[Any, ...], LayerInfo] = {}
    stats: Dict[Tuple[Any, ...], List[str]] = {}
    for path, variable in _nnx_variables(like):
        parent, name = path[:-1], str(path[-1])
        info = layers.setdefault(parent, LayerInfo(tuple(str(p) for p in parent), LayerKind.GENERIC, {}))
        value = variable.get_value()
        info.params[name] = TensorSpec(_key(path), _shape(value), _dtype_name(value))
        if isinstance(variable, nnx.BatchStat):
            stats.setdefault(parent, []).append(name)
    problems = []
    for parent, info in layers.items():
        module = modules.get(parent)
        if module is None:  # variables inside a plain pytree attribute: no layer to read a kind from
            continue
        info.kind, problem = _nnx_kind(module, info.params, stats.get(parent, ()))
        if problem:
            problems.append(f"{_key(parent) or 'the model'} is {problem}")
    if problems:
        raise ConversionError(
            "like= has layers xnorm cannot convert into; nothing was converted or modified:\n"
            + "\n".join(f"  {p}." for p in problems),
            mismatched=problems,
        )
    return list(layers.values())


def describe(like: Any) -> List[LayerInfo]:
    """The target's layers: path segments, kind, and every variable it needs (module docstring).

    Raises:
        ConversionError: linen variables without ``params``; an NNX ``ConvTranspose`` with
            ``transpose_kernel=False`` (all such layers are listed).
    """
    if isinstance(like, nnx.Module):
        return _describe_nnx(like)
    return _describe_linen(like)


def _linen_segments(segments: Sequence[str]) -> Tuple[str, ...]:
    """torch's ``("ups", "0")`` as linen names list members: ``("ups_0",)``."""
    out: List[str] = []
    for segment in segments:
        if segment.isdigit() and out:
            out[-1] = f"{out[-1]}_{segment}"
        else:
            out.append(segment)
    return tuple(out)


def candidate_keys(info: LayerInfo, name: str) -> List[str]:
    """Keys a torch layer's parameter (``name`` already in Flax's naming) may have in a Flax source.

    ``info.segments`` is torch's module path. A linen source names it with its collection first and
    list members as ``ups_0`` (``params/ups_0/kernel_v``, ``batch_stats/bn/mean``); an NNX source by its
    state path (``ups/0/kernel_v``); both spellings of the path are offered to both.
    """
    if info.kind == BATCHNORM and name in _BATCH_STAT_NAMES:
        collections = [_BATCH_STATS]
    elif name.endswith(_STATE_SUFFIXES):
        # spectral norm's u and v and the orthogonal base are batch_stats, weight norm's v a param: a layer has
        # one or the other
        collections = ["params", _BATCH_STATS]
    else:
        collections = ["params"]
    paths = list(dict.fromkeys((tuple(info.segments), _linen_segments(info.segments))))
    keys = [_key((collection, *path, name)) for collection in collections for path in paths]
    keys += [_key((*path, name)) for path in paths]
    return list(dict.fromkeys(keys))


# -- build and save --------------------------------------------------------------------------------


def _placed(array: np.ndarray, template: Any):
    """``array`` as a jax array placed as ``template`` is: on its sharding where the template is committed
    to one (a sharded model, an abstract one with shardings), else uncommitted on the default device, as
    Flax's own initializers create parameters. A committed array where the model's were not changes the
    signature of a jitted training step after its first call (its outputs follow the committed inputs),
    so the second step compiled again."""
    sharding = getattr(template, "sharding", None)
    committed = isinstance(template, jax.ShapeDtypeStruct) or getattr(template, "committed", False)
    if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None and committed:
        return jax.device_put(array, sharding)
    return jnp.asarray(array)


def _checked(key: str, array: np.ndarray, template: Any) -> np.ndarray:
    """The plan already matched shapes and dtypes; this guards build() against a caller that did not."""
    if _shape(array) != _shape(template) or _dtype_name(array) != _dtype_name(template):
        raise ConversionError(
            f"{key!r}: the converted array is {_dtype_name(array)}{list(array.shape)} but the target needs "
            f"{_dtype_name(template)}{list(template.shape)}; nothing was modified."
        )
    return array


def _rebuild(tree: Mapping, prefix: Tuple[str, ...], placed: Mapping[str, Any]) -> Any:
    out = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, path, placed)
        else:
            out[key] = placed.get(_key(path), value)
    return FrozenDict(out) if isinstance(tree, FrozenDict) else out


def build(like: Any, arrays: Mapping[str, np.ndarray], *, load: bool, place: bool = True) -> Any:
    """The converted variables, shaped like ``like``.

    ``arrays`` maps each target key to its converted NumPy array; each is read once and turned into a
    JAX array at once (the core may compute them on demand, so no second copy is kept).

    linen: a new nested dict (FrozenDict where ``like`` has one) with ``like``'s structure, every
    converted leaf replaced and the skipped collections kept. NNX: an ``nnx.State`` of the converted
    variables (same types and metadata as ``like``'s) for ``nnx.update(like, state)``; ``load=True``
    applies it, after every array has been checked and placed, so a failure leaves ``like`` untouched.

    Raises:
        OptionError: ``load=True`` for linen variables (immutable: use the returned variables).
        ConversionError: an array whose shape or dtype does not fit ``like`` (nothing is modified).
    """
    if isinstance(like, nnx.Module):
        flat = []
        for path, variable in _nnx_variables(like):
            key = _key(path)
            value = variable.get_value()
            array = _checked(key, arrays[key], value)
            flat.append((path, variable.replace(value=_placed(array, value) if place else array)))
        state = nnx.from_flat_state(flat)
        if load:
            nnx.update(like, state)
        return state
    if load:
        raise OptionError(
            "load=True cannot load into linen variables: JAX arrays and FrozenDicts are immutable. Use the "
            "returned variables instead: variables = xnorm.convert(source, to='flax', like=variables)."
        )
    placed = {}
    for path, leaf in _leaves(like):
        key = _key(path)
        if path[0] not in SKIPPED_COLLECTIONS:
            array = _checked(key, arrays[key], leaf)
            placed[key] = _placed(array, leaf) if place else array
    return _rebuild(like, (), placed)


def _pure(result: Any) -> Any:
    """A nested dict of NumPy arrays for flax.serialization, from linen variables, a State or an NNX module."""
    if isinstance(result, nnx.Module):
        result = nnx.state(result)
    if isinstance(result, nnx.State):
        result = nnx.to_pure_dict(nnx.from_flat_state(_nnx_variables(result)))
    if not isinstance(result, Mapping):
        raise OptionError(
            f"cannot save a {type(result).__qualname__} as Flax variables; pass what xnorm.convert(..., to='flax') "
            "returned (linen variables or an nnx.State)."
        )
    leaves = _leaves(result)
    bad = [_key(path) for path, leaf in leaves if not _is_array(leaf)]
    if bad:
        raise OptionError(f"cannot save entries {', '.join(map(repr, bad[:8]))}: they are not arrays.")
    return jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(result))


def save(result: Any, path: Any) -> None:
    """Write linen variables or an ``nnx.State`` as a ``.msgpack`` file (flax.serialization), atomically.

    The file holds the nested mapping of arrays (NNX: ``nnx.to_pure_dict`` of the state); reading it
    back: ``flax.serialization.msgpack_restore(Path(path).read_bytes())``, or pass the path to
    ``xnorm.convert(path, to="torch", like=torch_model)``.
    """
    path = Path(path)
    if path.suffix != ".msgpack":
        raise OptionError(f"cannot write Flax variables as {path.suffix!r}; use a .msgpack path.")
    tree = _pure(result)  # before the file is opened: errors leave it alone
    atomic_write(path, lambda tmp: _write_msgpack(tree, tmp))


def _write_msgpack(tree: Any, path: Path) -> None:
    """Write ``flax.serialization.msgpack_serialize(tree)``'s exact bytes, one leaf at a time.

    msgpack is compositional (a map is its header, then each key and value), so serializing leaf by
    leaf gives the same bytes; but msgpack's packer holds the whole output twice while it grows, so
    serializing the tree at once would peak at three times the checkpoint's size.
    """
    packer = msgpack.Packer()
    with open(path, "wb") as f:

        def emit(node: Any) -> None:
            if isinstance(node, dict):
                f.write(packer.pack_map_header(len(node)))
                for key in sorted(node):  # flax's tree_map sorts keys; so do we, for the same bytes
                    f.write(packer.pack(key))
                    emit(node[key])
            else:
                f.write(serialization.msgpack_serialize(node))

        emit(tree)


def write(like: Any, arrays: Mapping[str, np.ndarray], path: Any) -> None:
    """What ``xnorm convert`` does: the converted arrays straight into a ``.msgpack`` file, as :func:`save` of
    :func:`build`'s result would write it, but without making JAX arrays: the peak memory is the NumPy
    arrays plus the serialized bytes, instead of those plus a JAX copy of every tensor."""
    if Path(path).suffix != ".msgpack":
        raise OptionError(f"cannot write Flax variables as {Path(path).suffix!r}; use a .msgpack path.")
    save(build(like, arrays, load=False, place=False), path)


# -- run -------------------------------------------------------------------------------------------

_MODE_ATTRIBUTES = ("deterministic", "use_running_average")


def _as_numpy(output: Any) -> np.ndarray:
    array = jnp.asarray(output)
    if array.dtype in (jnp.bfloat16, jnp.float16):
        array = array.astype(jnp.float32)
    return np.asarray(array).astype(np.float64)


def run_eval(model: Any, inputs: Sequence[np.ndarray]) -> List[Tuple[str, np.ndarray]]:
    """The model's outputs on ``inputs`` in inference mode, as float64 NumPy arrays.

    NNX: ``model.eval()`` for the call, then every ``deterministic``/``use_running_average`` flag is put
    back as it was. linen ``(module, variables)``: ``module.apply(variables, *inputs)``; the module must
    be built for inference (``use_running_average=True``, ``deterministic=True``), linen has no mode.
    """
    arrays = tuple(jnp.asarray(x) for x in inputs)
    if isinstance(model, nnx.Module):
        saved = [
            (module, attribute, getattr(module, attribute))
            for _, module in nnx.iter_graph(model)
            if isinstance(module, nnx.Module)
            for attribute in _MODE_ATTRIBUTES
            if hasattr(module, attribute)
        ]
        try:
            model.eval()
            out = model(*arrays)
        finally:
            for module, attribute, value in saved:
                setattr(module, attribute, value)
    else:
        module, variables = model
        out = module.apply(variables, *arrays)
    return [(path, _as_numpy(o)) for path, o in output_leaves(out)]
