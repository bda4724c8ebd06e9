"""Partitioning metadata for the tensors a reparametrization puts in place of a weight.

A user shards a Flax model by annotating its weights: NNX ``nnx.with_partitioning`` (the Variable's
``out_sharding`` metadata, flax 0.12's name; ``sharding`` and ``sharding_names`` before), linen
``nn.with_partitioning`` / ``nn.with_logical_partitioning`` (``nn.Partitioned`` /
``LogicallyPartitioned`` boxes around the value). ``nnx.get_partition_spec``, ``nn.get_partition_spec``
and ``nn.logical_to_mesh_sharding`` read those annotations, so every tensor xnorm derives from the
weight carries the weight's, mapped axis by axis:

* same layout as the weight (weight norm's v, ``<name>_orig``, a removed layer's kernel): the weight's
  names as they are;
* weight norm's g: the name of each axis g keeps, None on its size-1 axes, ``()`` for a 0-d g;
* spectral norm's u: the name of the ``dim`` axis (u has one entry per slice along it); v: the name of
  the first axis flattened into it when the other flattened axes are unsharded (a block of that axis is
  then a contiguous block of v), else None;
* the orthogonal ``<name>_base`` (torch's layout, ``batch + (n, n)``): the batch axes' names, the name
  of the larger matrix axis on its rows (``base @ Q`` then keeps w's rows where the weight had them),
  None on its columns (a contraction axis).

A mapping is a function from the weight's names, padded with None to its rank, to the derived tensor's.
Values are placed as well: when the weight is a concrete array with a ``NamedSharding`` (eager sharding
under ``jax.set_mesh``, or a ``jax.device_put``), each derived tensor is put on the same mesh with the
mapped spec of the weight's actual spec, so wrapping a sharded layer gives sharded tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import jax
from flax import nnx
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

Names = Tuple[Any, ...]
Mapping = Optional[Callable[[Names], Names]]  # None: the same layout as the weight

# Set by the Variable constructor itself; hooks are the weight's own behaviour, not its layout.
_CONSTRUCTOR_METADATA = ("hijax", "ref", "eager_sharding")


def padded(names: Sequence[Any], ndim: int) -> Names:
    """``names`` as a tuple of exactly ``ndim`` entries (a PartitionSpec may leave trailing axes out)."""
    names = tuple(names)
    return names + (None,) * (ndim - len(names)) if len(names) < ndim else names


def kept_axes(axes: Tuple[int, ...], keepdims: bool) -> Mapping:
    """Weight norm's g: reduced over storage ``axes`` (kept as size 1 with ``keepdims``, else a 0-d g)."""
    if not keepdims:
        return lambda names: ()
    return lambda names: tuple(None if axis in axes else name for axis, name in enumerate(names))


def one_axis(axis: int) -> Mapping:
    """A vector with one entry per slice of the weight along storage ``axis`` (spectral norm's u)."""
    return lambda names: (names[axis],)


def flattened_axes(axes: Sequence[int]) -> Mapping:
    """A vector flattening storage ``axes`` in this order, the first the slowest (spectral norm's v)."""
    first, rest = axes[0], tuple(axes[1:])
    return lambda names: (names[first] if all(names[axis] is None for axis in rest) else None,)


def orthogonal_base(storage_axes: Sequence[int], rows: int) -> Mapping:
    """The orthogonal base ``batch + (n, n)``: ``storage_axes`` are the weight's storage axes of the
    canonical batch axes, ``rows`` the storage axis of the larger matrix axis."""
    batch = tuple(storage_axes)
    return lambda names: tuple(names[axis] for axis in batch) + (names[rows], None)


def _mapped(sharding: Any, mapping: Mapping, ndim: int) -> Any:
    """An ``out_sharding`` (tuple, PartitionSpec or NamedSharding) mapped, keeping its kind."""
    if mapping is None:
        return sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*mapping(padded(sharding.spec, ndim))))
    names = mapping(padded(sharding, ndim))
    return PartitionSpec(*names) if isinstance(sharding, PartitionSpec) else names


def placed(weight: Any, value: Any, mapping: Mapping) -> Any:
    """``value`` on the weight's mesh with the mapped spec when the weight is a concrete array with a
    ``NamedSharding``; as it is otherwise (a tracer: the caller's jit decides the shardings)."""
    if isinstance(weight, jax.core.Tracer) or not isinstance(weight, jax.Array):
        return value
    sharding = weight.sharding
    if not isinstance(sharding, NamedSharding) or isinstance(value, jax.core.Tracer):
        return value
    return jax.device_put(value, _mapped(sharding, mapping, weight.ndim))


def explicit_sharding(x: Any) -> Optional[NamedSharding]:
    """The sharding in ``x``'s type when it is sharded over Explicit mesh axes (``jax.make_mesh``'s
    default since jax 0.7), else None."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.explicit_axes:
        return None
    return sharding if any(name is not None for name in sharding.spec) else None


def auto_axes_call(fun: Callable, args: tuple, weight: Any, mappings: Sequence[Mapping]) -> Any:
    """``fun(*args)``; when ``weight`` is sharded over Explicit axes, with those axes Auto inside.

    Under Explicit axes every op must know its output's sharding, and the matrix products of power
    iteration and of the orthogonal maps contract sharded axes, which JAX refuses as ambiguous. The
    partitioner places such intermediates itself when the axes are Auto; ``fun``'s outputs get back
    the weight's spec mapped by ``mappings`` (one per output; None: the weight's own).
    """
    sharding = explicit_sharding(weight)
    if sharding is None:
        return fun(*args)
    names = padded(sharding.spec, weight.ndim)
    specs = tuple(
        NamedSharding(sharding.mesh, PartitionSpec(*(names if mapping is None else mapping(names))))
        for mapping in mappings
    )
    return jax.sharding.auto_axes(fun, out_sharding=specs if len(specs) > 1 else specs[0])(*args)


# ------------------------------------------------------------------------------------------------
# NNX: Variable metadata
# ------------------------------------------------------------------------------------------------
def nnx_variable(like: nnx.Variable, value: Any, var_type: type, mapping: Mapping = None) -> nnx.Variable:
    """A ``var_type`` holding ``value`` with the metadata of ``like`` (the weight's Variable), its
    ``out_sharding`` mapped. The value is placed here (:func:`placed`) rather than by eager sharding,
    which would need the mesh the weight was created under to still be the current one."""
    weight = like.get_value()
    ndim = getattr(weight, "ndim", 0)
    metadata = {
        key: item
        for key, item in like.get_metadata().items()
        if key not in _CONSTRUCTOR_METADATA and not key.startswith("on_")
    }
    if metadata.get("out_sharding"):
        metadata["out_sharding"] = _mapped(metadata["out_sharding"], mapping, ndim)
    return var_type(placed(weight, value, mapping), eager_sharding=False, **metadata)


# ------------------------------------------------------------------------------------------------
# linen: AxisMetadata boxes
# ------------------------------------------------------------------------------------------------
def unbox(value: Any) -> Any:
    """The array inside a linen box (``nn.Partitioned``...), or ``value`` itself."""
    return meta.unbox(value)


def linen_boxed(like: Any, value: Any, mapping: Mapping = None) -> Any:
    """``value`` in a box like ``like`` (the weight's, possibly no box) with its names mapped.

    A same-layout tensor keeps any box (``replace_boxed``); a mapped one keeps a ``Partitioned`` (and its
    subclass ``LogicallyPartitioned``) with the mapped names, and is left unboxed for a box of another
    kind, whose axis semantics xnorm cannot know."""
    weight = like.value if isinstance(like, meta.AxisMetadata) and hasattr(like, "value") else like
    value = placed(weight, value, mapping)
    if not isinstance(like, meta.AxisMetadata):
        return value
    if mapping is None:
        return like.replace_boxed(value)
    if isinstance(like, meta.Partitioned):
        return like.replace(value=value, names=mapping(padded(like.names, weight.ndim)))
    return value


def linen_reboxed(stored: Any, value: Any) -> Any:
    """A new ``value`` for a variable stored as ``stored``: in the same box when it has one."""
    return stored.replace_boxed(value) if isinstance(stored, meta.AxisMetadata) else value
