"""Checkpoint files without a framework: the format of a file (:func:`file_format`, by suffix or by its
first bytes), safetensors read lazily and written without a copy, atomic writes, and picking one state
dict out of a checkpoint holding several (:func:`pick_entry`).

The safetensors reader and writer stay hand-written, checked against the ``safetensors`` library on the same
files (tests/core/test_hostile_files.py): the library's NumPy API reads every tensor into memory at once, where
conversion maps each tensor only while it is converted, and writes from one dict of ready arrays, where conversion
produces them one at a time; that keeps a conversion's peak memory within its target (twice the checkpoint)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .errors import CheckpointFileError, ConversionError
from .porting_plan import ArrayRef, _itemsize, _numpy_dtype

#: file format -> the framework whose reader reads it
FORMAT_FRAMEWORKS = {"safetensors": "torch", "pt": "torch", "ckpt": "mindspore", "msgpack": "flax"}


#: file suffix -> file format
FILE_SUFFIXES = {
    ".safetensors": "safetensors",
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
    ".ckpt": "ckpt",
    ".msgpack": "msgpack",
}


def file_format(path: Union[str, os.PathLike]) -> str:
    """The format of a checkpoint file: from its suffix when it has a known one, else from its first bytes
    (released checkpoints are often named ``g_02500000``): a zip archive (torch.save) or a pickle with its
    protocol byte (torch before 1.6) is ``"pt"``; an 8-byte little-endian header length followed by ``{`` is
    ``"safetensors"``; a MessagePack map (flax.serialization) is ``"msgpack"``; a protobuf message opening
    with field 1 (MindSpore's Checkpoint) is ``"ckpt"``.

    Raises:
        CheckpointFileError: the file does not exist, or its content is none of these.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointFileError(_directory_message(path))
    if path.suffix in FILE_SUFFIXES:
        return FILE_SUFFIXES[path.suffix]
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {os.fspath(path)!r} does not exist.")
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pt"
    if len(head) > 8 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    # a non-empty map (fixmap, map16, map32) whose first key is a string (fixstr, str8/16/32), as
    # flax.serialization writes them
    key_at = None
    if head and 0x81 <= head[0] <= 0x8F:
        key_at = 1
    elif head[:1] in (b"\xde", b"\xdf"):
        key_at = 3 if head[0] == 0xDE else 5
    if key_at is not None and len(head) > key_at and (0xA0 <= head[key_at] <= 0xBF or 0xD9 <= head[key_at] <= 0xDB):
        return "msgpack"
    if head[:1] == b"\x0a":
        return "ckpt"
    raise CheckpointFileError(
        f"cannot tell the format of {os.fspath(path)!r}: its suffix {path.suffix!r} is none of "
        f"{', '.join(sorted(FILE_SUFFIXES))} and its first bytes {head[:8]!r} are not those of a torch, safetensors, "
        "MindSpore or Flax checkpoint (truncated or corrupt?)."
    )


def _directory_message(path: Path) -> str:
    if (path / ".metadata").is_file():
        # torch.distributed.checkpoint reads .metadata with an unrestricted pickle.load: reading it would run
        # whatever code a hostile directory holds, which xnorm never does (it reads .pt files with
        # weights_only=True), so the gathering is left to the user, on a directory they trust.
        return (
            f"{os.fspath(path)!r} is a sharded torch.distributed.checkpoint (DCP) directory, which xnorm does not "
            "read: its .metadata is an arbitrary pickle. Gather it into one file first, then convert that file: "
            "when saving, on every rank, full = get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)) and torch.save(full, 'model.pt') on rank 0; or, for a "
            "directory you trust, python -m torch.distributed.checkpoint.format_utils dcp_to_torch "
            f"{os.fspath(path)} model.pt (docs/distributed.md)."
        )
    return f"{os.fspath(path)!r} is a directory, not a checkpoint file: name the file inside it to convert."


def pick_entry(source: Any, entry: Optional[str], where: str) -> Tuple[Any, str]:
    """``source[entry]`` and where it came from, for a checkpoint holding several state dicts; ``source``
    itself when ``entry`` is None. Raises ConversionError naming the entries there are."""
    if entry is None:
        return source, where
    if not isinstance(source, Mapping) or entry not in source:
        entries = [repr(k) for k, v in source.items() if isinstance(v, Mapping)] if isinstance(source, Mapping) else []
        raise ConversionError(
            f"{where} has no entry {entry!r}"
            + (f"; its entries holding state dicts are {', '.join(entries)}." if entries else
               ": it is a single state dict. Leave entry out.")
        )
    return source[entry], f"{where}[{entry!r}]"


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_safetensors(path: Union[str, os.PathLike]) -> Dict[str, ArrayRef]:
    """Index a ``.safetensors`` file without reading its data; each ArrayRef maps its bytes only when loaded.

    Raises CheckpointFileError for a missing, truncated or corrupt file (header length, JSON, dtypes,
    offsets and sizes are all checked against the file before anything is returned).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint file {os.fspath(path)!r} does not exist.")
    size = path.stat().st_size
    corrupt = f"{os.fspath(path)!r} is not a valid .safetensors file (truncated or corrupt): "
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(corrupt + f"it is {size} bytes long, shorter than the 8-byte header length.")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointFileError(corrupt + f"its header claims {header_len} bytes but the file has {size - 8}.")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as error:  # also non-UTF-8, a duplicate key, nesting past the stack
            raise CheckpointFileError(corrupt + f"its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(corrupt + "its header is not a JSON object.")
    data_start = 8 + header_len
    refs: Dict[str, ArrayRef] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = _sizes(entry["shape"])
            begin, end = _sizes(entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(corrupt + f"entry {key!r} has no valid dtype/shape/data_offsets.") from None
        if math.prod(n or 1 for n in shape) * _itemsize(dtype) > _MAX_SIZE:
            raise CheckpointFileError(corrupt + f"entry {key!r} has a shape {list(shape)} too large for any array.")
        if end - begin != math.prod(shape) * _itemsize(dtype) or begin < 0 or data_start + end > size:
            raise CheckpointFileError(
                corrupt + f"entry {key!r} ({dtype}{list(shape)}) needs bytes {begin}..{end} of "
                f"a data section of {size - data_start} bytes."
            )
        spans.append((begin, end, key))

        def load(path=path, dtype=dtype, shape=shape, offset=data_start + begin):
            if math.prod(shape) == 0:
                return np.zeros(shape, dtype=_numpy_dtype(dtype))
            # A memmap per tensor: its pages leave memory when the view is dropped after conversion.
            return np.memmap(path, dtype=_numpy_dtype(dtype), mode="r", offset=offset, shape=shape)

        refs[key] = ArrayRef(key, shape, dtype, load)
    # As the safetensors library requires: tensors tile the data section, so none shares bytes with another
    # (writing through one would change the other) and no bytes are hidden between them.
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            raise CheckpointFileError(
                corrupt + f"entry {key!r} starts at byte {begin} of the data section, not at {covered} where the "
                "previous tensor ends: tensors overlap or leave a gap."
            )
        covered = end
    if covered != size - data_start:
        raise CheckpointFileError(
            corrupt + f"its tensors cover {covered} bytes of a data section of {size - data_start} bytes."
        )
    return refs


#: the largest array NumPy can address, in bytes (its sizes are signed 64-bit)
_MAX_SIZE = 2**63 - 1


def _sizes(values: Any) -> Tuple[int, ...]:
    """A JSON list of sizes: only non-negative integers (``int()`` would take 1.5, true or "3" as sizes)."""
    if not isinstance(values, list) or not all(type(n) is int and 0 <= n <= _MAX_SIZE for n in values):
        raise ValueError(values)
    return tuple(values)


def _unique_keys(pairs: Any) -> Dict[str, Any]:
    """A JSON object whose keys are all different: ``json.loads`` would keep the last of two silently."""
    header: Dict[str, Any] = {}
    for key, value in pairs:
        if key in header:
            raise ValueError(f"the key {key!r} appears twice")
        header[key] = value
    return header


def write_safetensors(arrays: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write NumPy arrays as ``.safetensors`` (atomically: a temporary file renamed over ``path``)."""
    import numpy as np

    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header: Dict[str, Any] = {}
    offset = 0
    for key, array in arrays.items():
        if key == "__metadata__":
            # the format's reserved header entry: readers (this one, the safetensors library) skip it
            raise ConversionError("a tensor named '__metadata__' cannot be written to .safetensors (the name is the "
                                  "format's reserved header entry); rename it.")
        dtype = "bfloat16" if str(array.dtype) == "bfloat16" else np.dtype(array.dtype).name
        if dtype not in names:
            raise ConversionError(f"{key!r} has dtype {dtype}, which .safetensors cannot hold.")
        header[key] = {
            "dtype": names[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for array in arrays.values():
                # safetensors is little-endian; a big-endian array's bytes would be read back as other numbers
                f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())

    atomic_write(path, write)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path`` and rename it over ``path`` only on success.

    The temporary name keeps ``path``'s suffix (MindSpore's ``save_checkpoint`` appends ``.ckpt`` otherwise).
    On any error the temporary file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointFileError(
            f"cannot write {os.fspath(path)!r}: folder {os.fspath(path.parent)!r} does not exist."
        )
    tmp = path.with_name(f".{path.stem}.xnorm-partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
