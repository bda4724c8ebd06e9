"""torch's part of checkpoint conversion (:mod:`xnorm.porting`): reading state dicts and files, describing a
torch model, building and saving a state dict, running a model in inference mode.

Every conversion plug-in (``xnorm._backends.<framework>.convert``) offers the same functions:

``accepts_source(obj)``, ``accepts_like(obj)``, ``accepts_model(obj)``
    whether ``obj`` is a source / a target model / a runnable model of this framework.
``read(source) -> {key: ArrayRef}``
    the source's tensors, indexed without copying their data.
``describe(like) -> [LayerInfo]``
    the target model's layers: path, kind and every tensor it needs.
``candidate_keys(info, name) -> [key]``
    (MindSpore and Flax only) the keys a torch layer's parameter ``name`` (already in this framework's
    naming) may have in a source of this framework.
``build(like, arrays, load) -> result`` and ``save(result, path)``
    the conversion's result, and writing it atomically.
``run_eval(model, inputs) -> [(path, ndarray)]``
    outputs in inference mode as :func:`xnorm.porting.output_leaves` lists them (nested outputs
    flattened, each array with its path), the model's mode restored afterwards.
"""

from __future__ import annotations

import os
import pickle
import re
import traceback
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

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
    pick_entry,
    read_safetensors,
    write_safetensors,
)
from xnorm.spec import LayerKind

from . import dtype_name

_KINDS = {
    nn.Linear: LayerKind.LINEAR,
    nn.Embedding: LayerKind.EMBEDDING,
    nn.LayerNorm: LAYERNORM,
    nn.GroupNorm: GROUPNORM,
    **{getattr(nn, f"Conv{n}d"): f"conv{n}d" for n in (1, 2, 3)},
    **{getattr(nn, f"ConvTranspose{n}d"): f"conv_transpose{n}d" for n in (1, 2, 3)},
    **{getattr(nn, f"BatchNorm{n}d"): BATCHNORM for n in (1, 2, 3)},
}


def accepts_source(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def accepts_like(obj: Any) -> bool:
    return isinstance(obj, nn.Module)


accepts_model = accepts_like


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise ConversionError("bfloat16 tensors need the ml_dtypes package: pip install ml_dtypes") from None
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if str(array.dtype) == "bfloat16":
        return torch.from_numpy(_c_order(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(_c_order(array))


def _c_order(array: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array (num_batches_tracked, the g of dim=None) into shape (1,).
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _refused(error: Exception) -> str:
    """What torch's weights-only unpickler refused, in one phrase: the global it met (a pickled module, a
    custom class), else the unpickler's own line. torch's message is paragraphs of advice with terminal
    colour codes, written for someone about to unpickle anyway."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    # "Unsupported global: GLOBAL x.y was not an allowed global", or for a module torch blocks outright
    # (os, subprocess...) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
    found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", text)
    if found:
        return f"the pickled object {found[1]}"
    detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error:" in line), "")
    detail = detail.partition("WeightsUnpickler error:")[2].strip() or (text.strip().splitlines() or [""])[0]
    return f"it: {detail}" if detail else f"it ({type(error).__name__})"


def _damage_behind(error: pickle.UnpicklingError) -> Optional[BaseException]:
    """The error a damaged file raised, where torch reports it as a refusal: torch 2.4's ``torch.load(weights_only=
    True)`` turns every RuntimeError of the load into an UnpicklingError (the original kept as its context), a
    record whose size disagrees with its storage included; later releases let that RuntimeError through. The
    unpickler's own refusals (a global, a class) are raised in its module; anything raised elsewhere is damage."""
    cause = error.__context__
    if not isinstance(cause, RuntimeError) or cause.__traceback__ is None:
        return None
    frames = traceback.extract_tb(cause.__traceback__)
    if not frames or Path(frames[-1].filename).name == "_weights_only_unpickler.py":
        return None
    return cause


def _load_pt(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {os.fspath(path)!r} does not exist.")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (b"PK") or, before 1.6, a pickle (b"\x80" and its protocol); anything
    # else would reach the unpickler and be misreported as "objects other than tensors".
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointFileError(
            f"{os.fspath(path)!r} is not a torch checkpoint (truncated or corrupt?): it starts with {head!r}, "
            "not a zip archive or a pickle."
        )
    if head == b"PK":
        _check_records(path)
    try:
        try:
            # mmap keeps a large checkpoint out of memory until each tensor is converted.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped
    except pickle.UnpicklingError as error:
        damage = _damage_behind(error)
        if damage is not None:
            raise CheckpointFileError(
                f"{os.fspath(path)!r} cannot be read as a torch checkpoint (truncated or corrupt?): "
                f"{type(damage).__name__}: {str(damage).strip().splitlines()[0] if str(damage).strip() else ''}"
            ) from None
        raise CheckpointFileError(
            f"{os.fspath(path)!r} holds objects other than tensors, and xnorm never unpickles arbitrary objects "
            f"(torch.load(weights_only=True) refused {_refused(error)}). Save the state dict alone: "
            "torch.save(model.state_dict(), path)."
        ) from None
    except Exception as error:  # a damaged file fails anywhere in the unpickler: IndexError, KeyError, EOFError...
        raise CheckpointFileError(
            f"{os.fspath(path)!r} cannot be read as a torch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from None


def _check_records(path: Path) -> None:
    """Refuse a zip archive unlike torch.save's before torch.load reads it: torch.load allocates a record's
    declared size before reading its bytes, so a compressed record (torch.save stores every record
    uncompressed) or one larger than the file could claim gigabytes from a few bytes (a zip bomb)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception as error:  # zipfile reports a damaged directory as BadZipFile, EOFError, struct.error...
        raise CheckpointFileError(
            f"{os.fspath(path)!r} cannot be read as a torch checkpoint (truncated or corrupt?): its zip directory "
            f"is damaged ({type(error).__name__}: {error})."
        ) from None
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
            raise CheckpointFileError(
                f"{os.fspath(path)!r} is not a zip archive as torch.save writes it: its record {record.filename!r} "
                f"declares {record.file_size} bytes ({'compressed' if record.compress_type else 'stored'} in "
                f"{record.compress_size}) in a file of {size} bytes (a zip bomb?). Save it again with torch.save."
            )


def read(source: Any, *, entry: Optional[str] = None) -> Dict[str, ArrayRef]:
    """A torch state dict, or a ``.safetensors``/``.pt``/``.pth``/``.bin`` file (or one of these without a
    known suffix), indexed by its keys; ``entry`` picks one state dict of a checkpoint holding several."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if file_format(path) == "safetensors":
            if entry is not None:
                raise OptionError(f"{os.fspath(path)!r} is a safetensors file: a single flat state dict, with no "
                                  f"entry {entry!r} to pick. Leave entry out.")
            return read_safetensors(path)
        source = _load_pt(path)
        where = repr(os.fspath(path))
    else:
        where = "the source"
    source, where = pick_entry(source, entry, where)
    if isinstance(source, nn.Module):
        raise ConversionError(
            "source= is a torch module; pass its state dict (model.state_dict()) or a checkpoint path."
        )
    if not isinstance(source, Mapping):
        raise ConversionError(
            f"{where} holds a {type(source).__qualname__}, not a state dict (a mapping of names to tensors). "
            "Save model.state_dict() instead."
        )
    others = {k: type(v).__qualname__ for k, v in source.items() if not isinstance(v, torch.Tensor)}
    if others:
        listed = ", ".join(f"{k!r}: {t}" for k, t in list(others.items())[:8])
        nested = [k for k, v in source.items() if isinstance(v, Mapping)]
        fix = (
            f"It holds state dicts under {', '.join(map(repr, nested))}: name the one to convert, "
            f"xnorm.convert(source, ..., entry={nested[0]!r}), or --entry {nested[0]} on the command line."
            if nested else "Save model.state_dict() instead."
        )
        raise ConversionError(f"{where} is not a plain state dict: entries {listed} are not tensors. {fix}")
    refs = {}
    first_of: Dict[tuple, str] = {}  # a tensor saved under several names (a shared module) is one tensor
    for key, tensor in source.items():
        identity = _storage_identity(tensor)
        alias_of = first_of.setdefault(identity, key) if identity is not None else key
        refs[key] = ArrayRef(key, tuple(tensor.shape), dtype_name(tensor.dtype), lambda t=tensor: _to_numpy(t),
                             alias_of=None if alias_of == key else alias_of)
    return refs


def _storage_identity(tensor: torch.Tensor) -> Optional[tuple]:
    """What makes two tensors the same tensor: storage, offset, shape, strides and dtype (None for a tensor
    without storage, such as a meta tensor)."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if pointer == 0:
        return None
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _layer_path(key: str) -> tuple:
    """``ups.0.parametrizations.weight.original0`` -> (("ups", "0"), "parametrizations.weight.original0")."""
    if ".parametrizations." in f".{key}":
        head, _, tail = f".{key}".partition(".parametrizations.")
        return tuple(head[1:].split(".")) if head else (), "parametrizations." + tail
    head, _, name = key.rpartition(".")
    return (tuple(head.split(".")) if head else ()), name


def describe(like: nn.Module) -> List[LayerInfo]:
    modules = dict(like.named_modules())
    layers: Dict[tuple, LayerInfo] = OrderedDict()
    first_of: Dict[int, str] = {}  # a parameter registered under two names is filled once, the same tensor
    for key, tensor in like.state_dict(keep_vars=True).items():
        alias_of = first_of.setdefault(id(tensor), key)
        segments, name = _layer_path(key)
        if segments not in layers:
            module = modules.get(".".join(segments))
            kind = _KINDS.get(type(module), "generic")
            if kind == "generic" and module is not None and hasattr(module, "parametrizations"):
                # parametrize swaps the class for a subclass: look through it.
                kind = next((k for cls, k in _KINDS.items() if isinstance(module, cls)), "generic")
            layers[segments] = LayerInfo(segments, kind, {})
        layers[segments].params[name] = TensorSpec(key, tuple(tensor.shape), dtype_name(tensor.dtype),
                                                   alias_of=None if alias_of == key else alias_of)
    return list(layers.values())


def build(like: nn.Module, arrays: Mapping[str, np.ndarray], *, load: bool) -> OrderedDict[str, torch.Tensor]:
    order = list(like.state_dict().keys())
    state = OrderedDict((key, _from_numpy(arrays[key])) for key in order)
    if load:
        like.load_state_dict(state, strict=True)
    return state


def save(result: Mapping[str, torch.Tensor], path: Any) -> None:
    """``.safetensors`` (no pickle) or ``.pt``/``.pth``, written atomically."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors({k: _to_numpy(v) for k, v in result.items()}, path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        atomic_write(path, lambda tmp: torch.save(dict(result), tmp))
    else:
        raise OptionError(f"cannot write a torch checkpoint as {path.suffix!r}; use .safetensors or .pt.")


def run_eval(model: nn.Module, inputs: Sequence[np.ndarray]) -> List[Tuple[str, np.ndarray]]:
    training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            out = model(*(torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in inputs))
    finally:
        model.train(training)
    return [
        (path, _to_numpy(o).astype(np.float64) if o.dtype != torch.bfloat16 else o.float().cpu().numpy())
        for path, o in output_leaves(out)
    ]
