"""MindSpore's part of checkpoint conversion (:mod:`xnorm.porting`): reading Cells, parameter dicts and
``.ckpt`` files, describing a Cell, building a ``{name: Parameter}`` dict for ``load_param_into_net``,
saving it as ``.ckpt``, running a Cell in inference mode.

The functions are the plug-in interface documented in ``xnorm._backends.torch.convert``.

Keys
    Every tensor is keyed by its ``Parameter.name``: the key of ``Cell.parameters_dict()``, of a ``.ckpt``
    file and of ``mindspore.load_param_into_net``. The torch key a parameter is paired with is built
    from the path of the Cell that holds it (``cells_and_names``) and the torch name of the attribute
    (``gamma`` -> ``weight``); MindSpore names a parameter after that same path unless a Cell was
    built with ``auto_prefix=False`` or a Parameter was given its own name, where ``rename=`` bridges
    the difference.

Layer kinds
    From the Cell's class: ``Dense``, ``Conv1d/2d/3d``, ``Conv1dTranspose/2d/3d``, ``Embedding``,
    ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``, or a subclass of one of them (its base's
    ``__init__`` creates the parameters; one that stores them differently fails the shape check). Any
    other Cell is generic: its parameters keep their names and layout. A
    an xnorm wrapper (:class:`~xnorm._backends.mindspore.ReparametrizedCell`: weight norm, fused or not,
    and spectral norm) has its wrapped layer's kind and its own parameters (``<name>_g``, ``<name>_v``;
    ``<name>_orig``, ``<name>_u``, ``<name>_v``) plus the layer's others. ``BatchNorm3d`` keeps
    its parameters in an inner ``bn2d`` Cell (``bn.bn2d.gamma``); they are paired with torch's
    ``bn.weight``.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn

from xnorm.errors import CheckpointFileError, ConversionError, OptionError
from xnorm.porting import (
    BATCHNORM,
    GROUPNORM,
    LAYERNORM,
    ArrayRef,
    LayerInfo,
    TensorSpec,
    atomic_write,
    file_format,
    output_leaves,
)
from xnorm.spec import LayerKind

from . import ReparametrizedCell

#: Exact Cell class -> layer kind (:class:`xnorm.spec.LayerKind` values and xnorm.porting's norm kinds).
_KINDS: Dict[type, str] = {
    nn.Dense: LayerKind.LINEAR,
    nn.Embedding: LayerKind.EMBEDDING,
    nn.LayerNorm: LAYERNORM,
    nn.GroupNorm: GROUPNORM,
    **{getattr(nn, f"Conv{n}d"): f"conv{n}d" for n in (1, 2, 3)},
    **{getattr(nn, f"Conv{n}dTranspose"): f"conv_transpose{n}d" for n in (1, 2, 3)},
    **{getattr(nn, f"BatchNorm{n}d"): BATCHNORM for n in (1, 2, 3)},
}

# MindSpore's BatchNorm3d holds its parameters in this child Cell (a BatchNorm2d).
_BATCHNORM3D_INNER = "bn2d"


_DTYPE_NAMES = {
    getattr(mindspore, name): name
    for name in ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_")
}


def _dtype_name(dtype) -> str:
    """``mindspore.float32`` -> ``"float32"`` (the names xnorm.porting uses; ``bool_`` -> ``"bool"``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).lower()).rstrip("_")


def _to_numpy(tensor: Tensor) -> np.ndarray:
    # asnumpy() shares the Tensor's memory on the CPU: the copy keeps the source untouchable through the result.
    return np.array(tensor.asnumpy(), copy=True)


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def accepts_source(obj: Any) -> bool:
    """A Cell, or a non-empty mapping of names to MindSpore Tensors (``parameters_dict()``, ``load_checkpoint``)."""
    return isinstance(obj, nn.Cell) or _is_tensor_mapping(obj)


def accepts_like(obj: Any) -> bool:
    return isinstance(obj, nn.Cell)


accepts_model = accepts_like


def _load_ckpt(path: Path) -> Mapping[str, Any]:
    where = repr(os.fspath(path))
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {where} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"checkpoint file {where} is empty (0 bytes); it was not written completely.")
    try:
        if path.suffix == ".ckpt":
            # crc_check verifies the CRC that xnorm's save writes; files saved without one load as before.
            return mindspore.load_checkpoint(os.fspath(path), crc_check=True)
        # mindspore.load_checkpoint refuses a name without .ckpt (released checkpoints often have none):
        # read the file through a link that has the suffix
        with tempfile.TemporaryDirectory() as folder:
            link = Path(folder) / "checkpoint.ckpt"
            os.symlink(os.path.abspath(path), link)
            return mindspore.load_checkpoint(os.fspath(link), crc_check=True)
    except (ValueError, RuntimeError, TypeError, OSError, EOFError) as error:
        # MindSpore reports a truncated or corrupt protobuf, and a CRC mismatch, as a ValueError.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFileError(
            f"{where} cannot be read as a MindSpore checkpoint (truncated or corrupt?): {first_line} "
            "Save it again with mindspore.save_checkpoint, or pass the Cell or its parameters_dict() instead "
            "(an encrypted checkpoint: load it with mindspore.load_checkpoint(path, dec_key=...) and pass the dict)."
        ) from None


def read(source: Any, *, entry: Optional[str] = None) -> Dict[str, ArrayRef]:
    """The tensors of a Cell, a ``{name: Tensor/Parameter}`` mapping or a ``.ckpt`` file, by parameter name.

    Nothing is copied until an :class:`ArrayRef` is loaded, and each load returns a fresh NumPy copy,
    so the source is never modified, now or through the conversion's result.

    Raises:
        CheckpointFileError: a missing, empty, truncated or corrupt ``.ckpt`` file.
        ConversionError: an object that is none of these, or entries that are not tensors.
    """
    if entry is not None:
        raise OptionError(
            f"entry={entry!r}: a MindSpore checkpoint is one flat mapping of parameters, with no entries to pick. "
            "Leave entry out."
        )
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if file_format(path) != "ckpt":
            raise CheckpointFileError(
                f"{os.fspath(path)!r} is not a MindSpore checkpoint (.ckpt, or a file holding one); load it with "
                "its own framework, or pass mindspore.load_checkpoint's dict."
            )
        source = _load_ckpt(path)
        where = repr(os.fspath(path))
    else:
        where = "the source"
    if isinstance(source, nn.Cell):
        source = source.parameters_dict()
        if not source:
            raise ConversionError("the source Cell has no parameters; pass the Cell that holds the weights.")
    if not isinstance(source, Mapping):
        raise ConversionError(
            f"{where} is a {type(source).__qualname__}; a MindSpore source is a Cell, its parameters_dict() "
            "or a .ckpt path."
        )
    if not source:
        raise ConversionError(f"{where} holds no tensors; pass the Cell or the parameters_dict() with the weights.")
    others = {k: type(v).__qualname__ for k, v in source.items() if not isinstance(v, Tensor)}
    if others:
        listed = ", ".join(f"{k!r}: {t}" for k, t in list(others.items())[:8])
        raise ConversionError(
            f"{where} is not a plain parameter dict: entries {listed} are not tensors (values saved with "
            "save_checkpoint(append_dict=...)?). Leave them out: pass "
            "mindspore.load_checkpoint(path, choice_func=lambda name: name not in {...}) instead of the path."
        )
    refs: Dict[str, ArrayRef] = {}
    for key, tensor in source.items():
        if not isinstance(key, str):
            raise ConversionError(f"{where} has a key {key!r} that is not a string; parameter names are strings.")
        refs[key] = ArrayRef(key, tuple(tensor.shape), _dtype_name(tensor.dtype), lambda t=tensor: _to_numpy(t))
    return refs


def _kind(cell: nn.Cell) -> str:
    layer = cell.layer if isinstance(cell, ReparametrizedCell) else cell
    for cls in type(layer).__mro__:
        # A subclass takes its nearest supported base's kind: the base's __init__ creates the parameters,
        # and a subclass storing them otherwise fails the plan's shape check rather than converting wrongly.
        if cls in _KINDS:
            return _KINDS[cls]
    return cell.kind if isinstance(cell, ReparametrizedCell) else LayerKind.GENERIC


def describe(like: nn.Cell) -> List[LayerInfo]:
    """Every Cell of ``like`` that holds parameters, with its kind and its parameters keyed by attribute name.

    Raises:
        ConversionError: two different Parameters of ``like`` share a name (``load_param_into_net``
            could not tell them apart).
    """
    if not isinstance(like, nn.Cell):
        raise ConversionError(f"like= must be a mindspore.nn.Cell, got {type(like).__qualname__}.")
    layers: List[LayerInfo] = []
    owners: Dict[str, Tuple[str, int]] = {}  # parameter name -> (where it was found, id of the Parameter)
    clashes: List[str] = []
    inner_of_batchnorm3d = set()
    for path, cell in like.cells_and_names():
        if id(cell) in inner_of_batchnorm3d:
            continue
        kind = _kind(cell)
        holder = cell
        if isinstance(cell, nn.BatchNorm3d):
            holder = getattr(cell, _BATCHNORM3D_INNER)
            inner_of_batchnorm3d.add(id(holder))
        params: Dict[str, TensorSpec] = {}
        for attr, param in holder._params.items():
            if param is None:  # has_bias=False keeps bias = None
                continue
            where = ".".join(p for p in (path, attr) if p)
            seen = owners.get(param.name)
            if seen is not None:
                if seen[1] != id(param):
                    clashes.append(f"{param.name!r} names both {seen[0]} and {where}")
                continue  # a shared Parameter is filled once
            owners[param.name] = (where, id(param))
            params[attr] = TensorSpec(param.name, tuple(param.shape), _dtype_name(param.dtype))
        if params:
            layers.append(LayerInfo(tuple(path.split(".")) if path else (), kind, params))
    if clashes:
        raise ConversionError(
            "like= has different Parameters under one name, which load_param_into_net cannot tell apart: "
            + "; ".join(clashes)
            + ". Give each Cell its own attribute (MindSpore then names its parameters after it)."
        )
    return layers


def candidate_keys(info: LayerInfo, name: str) -> List[str]:
    """Keys a torch layer's parameter may have in a MindSpore source; ``name`` is already MindSpore's name.

    A torch BatchNorm3d's parameters live in MindSpore's inner ``bn2d`` Cell; the torch layer does not
    say whether it is 1-, 2- or 3-d, so a batch norm offers both keys (the plan rejects a source holding both).
    """
    keys = [".".join(info.segments + (name,))]
    if info.kind == BATCHNORM:
        keys.append(".".join(info.segments + (_BATCHNORM3D_INNER, name)))
    return keys


def _c_order(array: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array (the g of dim=None) into shape (1,).
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _as_tensor(array: np.ndarray) -> Tensor:
    array = _c_order(np.asarray(array))
    if str(array.dtype) == "bfloat16":
        # ml_dtypes' and MindSpore's bfloat16 NumPy types differ; float32 holds every bfloat16 value exactly.
        return Tensor(array.astype(np.float32), dtype=mindspore.bfloat16)
    # from_numpy shares the array's memory; the Parameter built from it makes the one copy.
    return Tensor.from_numpy(array)


def build(like: nn.Cell, arrays: Mapping[str, np.ndarray], *, load: bool) -> OrderedDict[str, Parameter]:
    """``{name: Parameter}`` in ``like``'s order, with each Parameter's ``requires_grad`` taken from ``like``.

    With ``load=True`` the dict is also loaded into ``like`` with ``mindspore.load_param_into_net``, after
    every name, shape and dtype has been checked against ``like`` (nothing is written when one differs),
    and a parameter left unloaded is an error.
    """
    targets = like.parameters_dict()
    missing = [k for k in targets if k not in arrays]
    unexpected = [k for k in arrays if k not in targets]
    if missing or unexpected:
        raise ConversionError(
            f"the converted tensors do not match like= ({len(missing)} missing: {missing[:8]}, "
            f"{len(unexpected)} unexpected: {unexpected[:8]}); nothing was loaded. "
            "Pass the same like= to convert as the model you load into.",
            missing=missing,
            unexpected=unexpected,
        )
    result: OrderedDict[str, Parameter] = OrderedDict()
    mismatched = []
    for key, param in targets.items():
        tensor = _as_tensor(arrays[key])
        if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
            mismatched.append(
                f"{key}: like= has {_dtype_name(param.dtype)}{tuple(param.shape)}, the converted tensor is "
                f"{_dtype_name(tensor.dtype)}{tuple(tensor.shape)}"
            )
            continue
        result[key] = Parameter(tensor, name=key, requires_grad=param.requires_grad)
    if mismatched:
        raise ConversionError(
            "the converted tensors do not match like=; nothing was loaded:\n  " + "\n  ".join(mismatched),
            mismatched=mismatched,
        )
    if load:
        param_not_load, ckpt_not_load = mindspore.load_param_into_net(like, result, strict_load=True)
        if param_not_load or ckpt_not_load:
            raise ConversionError(
                f"load_param_into_net left parameters of like= unloaded ({param_not_load}) or entries unused "
                f"({ckpt_not_load}) although names, shapes and dtypes were checked; the model is partly loaded. "
                "Please report this with the model's definition."
            )
    return result


def save(result: Mapping[str, Tensor], path: Any) -> None:
    """Write a ``{name: Parameter/Tensor}`` dict as a ``.ckpt`` file, atomically (no half-written file on error).

    The file carries a CRC (``save_checkpoint(crc_check=True)``), so that :func:`read` reports damaged
    data instead of loading it; ``mindspore.load_checkpoint`` reads it as any other checkpoint.

    Raises:
        OptionError: ``path`` does not end in ``.ckpt``.
        ConversionError: ``result`` is not a non-empty mapping of names to Tensors.
        CheckpointFileError: the folder does not exist.
    """
    path = Path(path)
    if path.suffix != ".ckpt":
        raise OptionError(f"cannot write a MindSpore checkpoint as {path.suffix!r}; use a .ckpt path.")
    if not _is_tensor_mapping(result) or not all(isinstance(k, str) for k in result):
        raise ConversionError(
            f"save needs the {{name: Parameter}} dict xnorm.convert(..., to='mindspore') returns; got "
            f"{type(result).__qualname__}" + (" with non-tensor values." if isinstance(result, Mapping) else ".")
        )
    # Named entries, not the Parameters' own names: the dict's keys are what load_param_into_net matches.
    entries = [{"name": key, "data": value} for key, value in result.items()]

    def write(tmp: Path) -> None:
        # With a CRC, read() (load_checkpoint(crc_check=True)) detects damaged tensor data too.
        mindspore.save_checkpoint(entries, os.fspath(tmp), crc_check=True)
        if not tmp.is_file():
            raise CheckpointFileError(f"mindspore.save_checkpoint did not write {os.fspath(path)!r}.")

    atomic_write(path, write)


def write(like: nn.Cell, arrays: Mapping[str, np.ndarray], path: Any) -> None:
    """What ``xnorm convert`` does: the converted arrays straight into a ``.ckpt`` file, with ``like``'s
    names, without making Parameters (each Tensor shares its array's memory, so the peak is the arrays
    plus what ``save_checkpoint`` buffers)."""
    targets = like.parameters_dict()
    if set(targets) != set(arrays):
        raise ConversionError("the converted tensors do not match like=; pass the same like= to convert and write.")
    save(OrderedDict((key, _as_tensor(arrays[key])) for key in targets), path)


def _training_flags(model: nn.Cell) -> List[Tuple[nn.Cell, bool]]:
    return [(cell, bool(cell.training)) for _, cell in model.cells_and_names()]


def run_eval(model: nn.Cell, inputs: Sequence[np.ndarray]) -> List[Tuple[str, np.ndarray]]:
    """``model``'s outputs in inference mode (``set_train(False)``) as float64 NumPy arrays.

    Every Cell's own training flag is restored afterwards, mixed modes included. Runs in whatever
    execution mode the context is in (GRAPH_MODE compiles a ``predict`` graph on the first call).
    """
    flags = _training_flags(model)
    try:
        model.set_train(False)
        out = model(*(Tensor(_c_order(np.asarray(x))) for x in inputs))
    finally:
        model.set_train(flags[0][1])
        if any(flag != flags[0][1] for _, flag in flags):
            for cell, flag in flags:  # parents first: each call resets the Cells below it, fixed by later calls
                cell.set_train(flag)
    results = []
    for path, o in output_leaves(out):
        if o.dtype == mindspore.bfloat16:
            o = o.astype(mindspore.float32)
        results.append((path, o.asnumpy().astype(np.float64)))
    return results
