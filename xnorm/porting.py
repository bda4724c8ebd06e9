"""Porting a model between frameworks: checkpoint conversion (:func:`convert`) and output comparison (:func:`compare`).

One mechanism serves every direction. The model given as ``like`` describes itself as a list of
:class:`LayerInfo` (its layers, their kinds, their parameters with shapes and dtypes); the tables of
this module say, for each kind, what each parameter is called in torch and in the other framework and
how the other framework stores it (:data:`NAMES`, :func:`layout`); the source checkpoint is read into
:class:`ArrayRef` objects that know their shape and dtype before any data is loaded. A plan pairs every
target tensor with exactly one source tensor and is checked as a whole before anything is built, so a
bad checkpoint raises one :class:`~xnorm.errors.ConversionError` listing every missing, unexpected and
mis-shaped key, and nothing is modified.

torch is the hub: ``to`` is "mindspore" or "flax" with a torch source, or "torch" with a MindSpore or
Flax source. torch's two key styles of every reparametrization are read alike: the legacy
``<layer>.weight_g``/``weight_v`` (``torch.nn.utils.weight_norm``) and ``weight_orig``/``weight_u``/
``weight_v`` (``torch.nn.utils.spectral_norm``), and the parametrization keys
``<layer>.parametrizations.weight.original0``/``original1`` and ``.original``/``.0._u``/``.0._v``
(``torch.nn.utils.parametrizations`` and xnorm).

What each framework contributes lives in ``xnorm._backends.<framework>.convert`` and is imported only
when that framework is used: reading a source, describing a model, building the result, saving a file,
running a model in inference mode. This module imports no framework.

Layouts (canonical = torch's; see :class:`xnorm.spec.StorageLayout`):

=======================  ==========================================  =====================================
kind                     MindSpore                                   Flax
=======================  ==========================================  =====================================
linear                   weight (out, in)                            kernel (in, out)
conv1d, conv_transpose1d weight with a unit axis: (a, b, 1, k)        kernel (k, b, a)
conv2d/3d, transposes    weight as torch                             kernel (*k, b, a)
embedding                embedding_table                             embedding
batchnorm                gamma, beta, moving_mean, moving_variance   scale, bias, batch_stats mean, var
layernorm, groupnorm     gamma, beta                                 scale, bias
=======================  ==========================================  =====================================

(a, b) are torch's first two axes: (out, in/groups) for a conv, (in, out/groups) for a transposed conv.
Flax's ConvTranspose must use ``transpose_kernel=True``, the torch-equivalent form whose kernel is
torch's with the axes reversed; with ``transpose_kernel=False`` the kernel would also be flipped, and
Flax variables alone cannot tell the two apart. g follows its weight's layout (it keeps size-1 axes);
a 0-d g (``dim=None``) stays 0-d.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .conversion_hints import Leftovers, diagnose
from .errors import CheckpointFileError, ConversionError, OptionError
from .spec import REPARAMETRIZATIONS, LayerKind, SpectralNorm, StorageLayout, WeightNorm

__all__ = ["convert", "compare", "Comparison", "OutputDifference", "LayerInfo", "TensorSpec", "ArrayRef"]

FRAMEWORKS = ("torch", "mindspore", "flax")
BATCHNORM = "batchnorm"
LAYERNORM = "layernorm"
GROUPNORM = "groupnorm"
NORM_KINDS = (BATCHNORM, LAYERNORM, GROUPNORM)

#: torch parameter name -> the other framework's name, per framework and layer kind.
NAMES: Dict[str, Dict[str, Dict[str, str]]] = {
    "mindspore": {
        LayerKind.LINEAR: {"weight": "weight", "bias": "bias"},
        **{kind: {"weight": "weight", "bias": "bias"} for kind in LayerKind.CONV + LayerKind.CONV_TRANSPOSE},
        LayerKind.EMBEDDING: {"weight": "embedding_table"},
        BATCHNORM: {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"},
        LAYERNORM: {"weight": "gamma", "bias": "beta"},
        GROUPNORM: {"weight": "gamma", "bias": "beta"},
    },
    "flax": {
        LayerKind.LINEAR: {"weight": "kernel", "bias": "bias"},
        **{kind: {"weight": "kernel", "bias": "bias"} for kind in LayerKind.CONV + LayerKind.CONV_TRANSPOSE},
        LayerKind.EMBEDDING: {"weight": "embedding"},
        BATCHNORM: {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
        LAYERNORM: {"weight": "scale", "bias": "bias"},
        GROUPNORM: {"weight": "scale", "bias": "bias"},
    },
}

#: torch state_dict entries with no counterpart elsewhere: skipped when reading torch, zero-filled when writing it.
TORCH_ONLY = ("num_batches_tracked",)

#: Every reparametrization's tensor and state suffixes (``_g``, ``_v``, ``_orig``, ``_u``): its tensors take
#: the wrapped parameter's name plus these, in every framework (:attr:`xnorm.spec.Reparametrization.suffixes`).
REPARAMETRIZATION_SUFFIXES = tuple(
    dict.fromkeys(suffix for spec in REPARAMETRIZATIONS.values() for suffix in spec.suffixes.values())
)

#: torch's parametrization key tails (after ``parametrizations.<name>.``) and the legacy suffix each stands for:
#: weight norm's ``original0``/``original1`` (g, v), spectral norm's ``original`` and its buffers ``0._u``/``0._v``.
_TORCH_PARAMETRIZATION_TAILS = {
    "original0": WeightNorm.suffixes["g"],
    "original1": WeightNorm.suffixes["v"],
    "original": SpectralNorm.suffixes["original"],
    "0._u": SpectralNorm.suffixes["u"],
    "0._v": SpectralNorm.suffixes["v"],
}
_TORCH_PARAMETRIZATION = re.compile(
    r"^(?P<prefix>.*?)parametrizations\.(?P<name>[^.]+)\.(?P<tail>"
    + "|".join(re.escape(tail) for tail in _TORCH_PARAMETRIZATION_TAILS)
    + ")$"
)


def canonical_torch_key(key: str) -> str:
    """torch's parametrization key style mapped to the legacy one: ``a.parametrizations.weight.original0`` ->
    ``a.weight_g`` (``original1`` -> ``a.weight_v``; spectral norm's ``original`` -> ``a.weight_orig``,
    ``0._u`` -> ``a.weight_u``, ``0._v`` -> ``a.weight_v``); every other key is returned unchanged."""
    match = _TORCH_PARAMETRIZATION.match(key)
    if match is None:
        return key
    return f"{match['prefix']}{match['name']}{_TORCH_PARAMETRIZATION_TAILS[match['tail']]}"


def layout(framework: str, kind: str, torch_name: str, canonical_ndim: int) -> StorageLayout:
    """How ``framework`` stores torch parameter ``torch_name`` (plain, or a reparametrization's tensor) of a
    layer of ``kind``. Vectors (spectral norm's u and v, a 1-D weight) and scalars are stored as they are."""
    base = _strip_reparametrization(torch_name)[0]
    if base != "weight" or canonical_ndim <= 1:
        return StorageLayout.identity(canonical_ndim)
    spatial = LayerKind.spatial_dims(kind)
    # MindSpore keeps 1-d convolutions as 2-d ones: (a, b, k) is stored (a, b, 1, k), whatever ndim says.
    if framework == "mindspore" and kind in ("conv1d", "conv_transpose1d"):
        return StorageLayout(perm=(0, 1, 2), unit_axes=(2,))
    if framework == "flax":
        if kind == LayerKind.LINEAR:
            return StorageLayout((1, 0))
        if spatial:
            return StorageLayout(tuple(range(2, 2 + spatial)) + (1, 0))
    return StorageLayout.identity(canonical_ndim)


def _strip_reparametrization(name: str) -> Tuple[str, str]:
    for suffix in REPARAMETRIZATION_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def torch_name_of(framework: str, kind: str, framework_name: str) -> Optional[str]:
    """The torch name of ``framework``'s parameter ``framework_name`` in a layer of ``kind`` (None: unknown)."""
    base, suffix = _strip_reparametrization(framework_name)
    table = NAMES[framework].get(kind)
    if table is None:
        return framework_name  # a generic layer keeps its names
    for torch_name, name in table.items():
        if name == base:
            return torch_name + suffix
        if name == framework_name:
            return torch_name
    return None


def framework_name_of(framework: str, kind: str, torch_name: str) -> Optional[str]:
    """The inverse of :func:`torch_name_of`."""
    table = NAMES[framework].get(kind)
    if table is None:
        return torch_name
    if torch_name in table:
        return table[torch_name]
    base, suffix = _strip_reparametrization(torch_name)
    return table[base] + suffix if base in table and suffix else None


# -- what the frameworks exchange -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor the target model needs: its key in the target's own naming, shape and dtype name.
    ``alias_of`` names another target key holding the very same tensor (a torch module registered under
    two names, as a TCN block keeps ``conv1`` and ``net.0``): it is filled with that key's values."""

    key: str
    shape: Tuple[int, ...]
    dtype: str
    alias_of: Optional[str] = None


@dataclasses.dataclass
class LayerInfo:
    """One layer of a model, as its framework describes it for conversion.

    ``segments`` is the layer's path (``("ups", "0")``; linen's ``("ups_0",)``), ``kind`` a
    :class:`~xnorm.spec.LayerKind` value, one of :data:`NORM_KINDS`, or ``"generic"`` (names and
    layout kept as they are), and ``params`` maps the parameter's name *in its own framework*
    (``"weight_g"``, ``"kernel_v"``, ``"gamma"``, ``"running_mean"``) to the tensor it needs.
    """

    segments: Tuple[str, ...]
    kind: str
    params: Dict[str, TensorSpec]


@dataclasses.dataclass
class ArrayRef:
    """A source tensor whose data is read only when :meth:`load` is called (at most once per conversion)."""

    key: str
    shape: Tuple[int, ...]
    dtype: str
    load: Callable[[], Any]
    #: the source key of the tensor this one shares its storage with (the same torch tensor saved under two
    #: names); such a key is used through that one and is never "unexpected"
    alias_of: Optional[str] = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    digits = re.findall(r"\d+", dtype)
    return int(digits[-1]) // 8 if digits else 1


# -- framework plug-ins ---------------------------------------------------------------------------------


def _framework(name: str):
    if name not in FRAMEWORKS:
        raise OptionError(f"to={name!r} is not a framework xnorm converts to; choose one of {', '.join(FRAMEWORKS)}.")
    from . import registry

    registry.get_backend(name)  # BackendNotInstalledError with the pip extra when the framework is missing
    return importlib.import_module(f"xnorm._backends.{name}.convert")


def _loaded_framework_modules() -> List[Tuple[str, Any]]:
    """Conversion modules of the frameworks the user has already imported."""
    out = []
    for name in FRAMEWORKS:
        top = {"torch": "torch", "mindspore": "mindspore", "flax": "flax"}[name]
        if top in sys.modules:
            out.append((name, importlib.import_module(f"xnorm._backends.{name}.convert")))
    return out


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


def _source_framework(source: Any, to: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return FORMAT_FRAMEWORKS[file_format(source)]
    if to != "torch":
        return "torch"
    for name, module in _loaded_framework_modules():
        if name != "torch" and module.accepts_source(source):
            return name
    raise ConversionError(
        f"to='torch' needs a MindSpore or Flax source (a Cell, its parameters_dict(), a .ckpt path, Flax variables, "
        f"an NNX module or a .msgpack path); got {type(source).__qualname__}. Import the framework it comes from "
        "first, or pass a path."
    )


def _model_framework(like: Any, to: str) -> None:
    for name, module in _loaded_framework_modules():
        if module.accepts_like(like):
            if name != to:
                raise ConversionError(
                    f"like= is a {name} model but to={to!r}; pass a {to} model as like= (it gives the target's "
                    "names and shapes)."
                )
            return
    raise ConversionError(
        f"like= must be the target {to} model (it gives the names, shapes and dtypes to fill); got "
        f"{type(like).__qualname__}."
    )


# -- plan -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One target tensor and where it comes from."""

    target: TensorSpec
    source: ArrayRef
    layout: StorageLayout
    to_storage: bool  # True: torch -> framework; False: framework -> torch
    cast: bool

    def describe(self) -> str:
        changes = []
        if _path(self.source.key) != _path(self.target.key):
            changes.append("renamed")
        if self.layout.unit_axes:
            changes.append("reshaped")
        if self.layout.perm != tuple(range(len(self.layout.perm))):
            changes.append("transposed")
        if self.cast:
            changes.append(f"cast {self.source.dtype}->{self.target.dtype}")
        return ", ".join(changes) or "copied"

    def run(self):
        import numpy as np

        array = np.asarray(self.source.load())
        if array.ndim and self.layout.canonical_ndim:
            array = self.layout.to_storage(array) if self.to_storage else self.layout.to_canonical(array)
        array = array.reshape(self.target.shape)
        if self.cast:
            array = array.astype(_numpy_dtype(self.target.dtype))
        # Not np.ascontiguousarray: it turns a 0-d array (the g of dim=None) into shape (1,).
        return array if array.flags.owndata and array.flags.c_contiguous else np.array(array, order="C")


@dataclasses.dataclass
class Plan:
    steps: List[Step]
    skipped: List[str]  # source keys deliberately not used (torch-only entries)
    filled: List[TensorSpec]  # target tensors with no counterpart, zero-filled (torch-only entries)
    aliases: List[TensorSpec] = dataclasses.field(default_factory=list)  # targets filled from their alias_of
    shared: List[str] = dataclasses.field(default_factory=list)  # source keys read through the tensor they share

    @property
    def nbytes(self) -> int:
        return sum(step.source.nbytes for step in self.steps)

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for step in self.steps:
            counts[step.describe()] = counts.get(step.describe(), 0) + 1
        lines = [f"mapped {len(self.steps)} tensors ({self.nbytes / 2**20:.1f} MiB):"]
        lines += [f"  {n:5d} {what}" for what, n in sorted(counts.items())]
        if self.skipped:
            names = ", ".join(sorted({_last(k) for k in self.skipped}))
            lines.append(f"  skipped {len(self.skipped)} torch-only entries ({names})")
        if self.filled:
            names = ", ".join(sorted({_last(t.key) for t in self.filled}))
            lines.append(f"  zero-filled {len(self.filled)} torch-only entries ({names})")
        if self.shared:
            lines.append(f"  {len(self.shared)} source keys name a tensor already mapped under another key "
                         f"(shared modules, e.g. {self.shared[0]})")
        if self.aliases:
            lines.append(f"  {len(self.aliases)} target keys are the same tensor as another (shared modules, e.g. "
                         f"{self.aliases[0].key} = {self.aliases[0].alias_of})")
        return "\n".join(lines)


def _last(key: str) -> str:
    return key.rsplit(".", 1)[-1]


#: Flax variable collections a key may start with; they name where a tensor lives, not the tensor
_COLLECTIONS = ("params", "batch_stats")


def _path(key: str) -> Tuple[str, ...]:
    """A key's segments whatever the framework's separator, without a leading Flax collection: torch's
    ``fc.bias`` and Flax's ``params/fc/bias`` are the same name."""
    segments = tuple(re.split(r"[./]", key))
    return segments[1:] if len(segments) > 1 and segments[0] in _COLLECTIONS else segments


def _numpy_dtype(name: str):
    import numpy as np

    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ConversionError("bfloat16 tensors need the ml_dtypes package: pip install ml_dtypes") from None
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _linen_alternatives(segments: Sequence[str]) -> List[Tuple[str, ...]]:
    """linen names list members ``ups_0``; torch ``ups.0``: both spellings of a path, the exact one first."""
    exact = tuple(segments)
    split = tuple(part for segment in segments for part in _split_index(segment))
    return [exact] if split == exact else [exact, split]


def _split_index(segment: str) -> Tuple[str, ...]:
    match = re.fullmatch(r"(.+)_(\d+)", segment)
    return (match[1], match[2]) if match else (segment,)


def _renamer(rename: Union[None, Mapping[str, str], Callable[[str], str]]) -> Callable[[str], str]:
    if rename is None:
        return lambda key: key
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        try:
            rules = [(re.compile(pattern), replacement) for pattern, replacement in rename.items()]
        except re.error as error:
            raise OptionError(
                f"rename= holds an invalid regular expression: {error}. Escape it with re.escape."
            ) from None

        def apply(key: str) -> str:
            for pattern, replacement in rules:
                key = pattern.sub(replacement, key)
            return key

        return apply
    raise OptionError(
        f"rename= must be None, a dict {{regex: replacement}} or a function of a key; got {type(rename).__qualname__}."
    )


def plan(
    source: Mapping[str, ArrayRef],
    targets: Sequence[Tuple[TensorSpec, List[str], StorageLayout, bool]],
    *,
    source_name: str,
    cast: bool = False,
    rename: Any = None,
    ignorable: Callable[[str], bool] = lambda key: False,
    fill: Callable[[TensorSpec], bool] = lambda spec: False,
    hint_style: str = "python",
) -> Plan:
    """Pair every target with exactly one source tensor, or raise one ConversionError listing every problem.

    ``targets`` holds ``(spec, candidate source keys, layout, to_storage)``; the first candidate found
    in ``source`` (after ``rename``) wins, and two candidates both present is an ambiguity error. The
    error's "fix:" line comes from :func:`xnorm.conversion_hints.diagnose`, written for Python callers or,
    with ``hint_style="cli"``, for the command line.
    """
    rename_key = _renamer(rename)
    missing: List[str] = []
    looked_for: List[Tuple[str, ...]] = []
    shape_mismatches: List[str] = []
    mismatched: List[str] = []
    used: Dict[str, str] = {}
    steps: List[Step] = []
    filled: List[TensorSpec] = []
    aliases: List[TensorSpec] = []
    # a shared tensor is filled once, from whichever of its names the source has
    alias_candidates: Dict[str, List[str]] = {}
    for spec, candidates, _, _ in targets:
        if spec.alias_of is not None:
            alias_candidates.setdefault(spec.alias_of, []).extend(candidates)
    for spec, candidates, storage, to_storage in targets:
        if spec.alias_of is not None:
            aliases.append(spec)
            continue
        candidates = [*candidates, *alias_candidates.get(spec.key, ())]
        keys = list(dict.fromkeys(rename_key(c) for c in candidates))
        found = [k for k in keys if k in source]
        if not found:
            if fill(spec):
                filled.append(spec)
                continue
            missing.append(f"{spec.key} (looked for {' or '.join(repr(k) for k in keys)} in {source_name})")
            looked_for.append(tuple(keys))
            continue
        if len(found) > 1:
            mismatched.append(f"{spec.key}: ambiguous, {source_name} has both {found[0]!r} and {found[1]!r}")
            continue
        ref = source[found[0]]
        if ref.key in used:
            mismatched.append(f"{spec.key}: {ref.key!r} already fills {used[ref.key]!r} (each entry is used once)")
            continue
        used[ref.key] = spec.key
        expected = _converted_shape(ref.shape, storage, to_storage)
        if expected is None or tuple(expected) != tuple(spec.shape):
            shape_mismatches.append(ref.key)
            mismatched.append(
                f"{spec.key}: shape {tuple(spec.shape)} but {ref.key!r} has shape {tuple(ref.shape)}"
                + (
                    f" (would become {tuple(expected)})"
                    if expected is not None and tuple(expected) != tuple(ref.shape)
                    else ""
                )
            )
            continue
        needs_cast = ref.dtype != spec.dtype
        if needs_cast and not cast:
            how = "--cast" if hint_style == "cli" else "cast=True"
            mismatched.append(f"{spec.key}: dtype {spec.dtype} but {ref.key!r} is {ref.dtype} (pass {how} to cast)")
            continue
        if needs_cast and not (_is_float(ref.dtype) and _is_float(spec.dtype)):
            mismatched.append(f"{spec.key}: cannot cast {ref.dtype} to {spec.dtype}; only floating dtypes are cast")
            continue
        steps.append(Step(spec, ref, storage, to_storage, needs_cast))
    skipped = [k for k in source if k not in used and ignorable(k)]
    # keys of one shared tensor form a group (rooted at the first key); a group that filled a target is used
    root = lambda key: source[key].alias_of or key  # noqa: E731
    used_roots = {root(k) for k in used}
    shared = [k for k in source if k not in used and root(k) in used_roots]
    leftover = [k for k in source if k not in used and not ignorable(k) and k not in shared]
    unexpected = [f"{k} {tuple(source[k].shape)}" for k in leftover]
    if missing or unexpected or mismatched:
        hints = diagnose(Leftovers(tuple(looked_for), tuple(leftover), tuple(shape_mismatches)), style=hint_style)
        raise ConversionError(
            _conversion_message(missing, unexpected, mismatched, source_name, [hint for _, hint in hints]),
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    return Plan(steps, skipped, filled, aliases, shared)


def _is_float(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32", "float64")


def _converted_shape(shape: Sequence[int], storage: StorageLayout, to_storage: bool) -> Optional[Tuple[int, ...]]:
    shape = tuple(shape)
    if storage.canonical_ndim == 0 or len(shape) == 0:
        return shape
    if to_storage:
        return storage.storage_shape(shape) if len(shape) == storage.canonical_ndim else None
    if len(shape) != storage.storage_ndim or any(shape[a] != 1 for a in storage.unit_axes):
        return None
    return storage.canonical_shape(shape)


def _conversion_message(missing, unexpected, mismatched, source_name: str, hints: Sequence[str]) -> str:
    parts = [
        f"the checkpoint does not fit the target model ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} mismatched); nothing was converted or modified."
    ]
    for title, items in (
        ("missing from " + source_name, missing),
        ("unexpected in " + source_name, unexpected),
        ("mismatched", mismatched),
    ):
        if items:
            parts.append(f"{title}:")
            parts += [f"  {item}" for item in items[:50]]
            if len(items) > 50:
                parts.append(f"  ... and {len(items) - 50} more")
    if hints:
        parts.append("fix: " + "; ".join(hints) + ".")
    return "\n".join(parts)


# -- public API ------------------------------------------------------------------------------------------


def _targets_from_framework_model(framework: str, layers: Iterable[LayerInfo]):
    """Targets when converting torch -> framework: like= is a framework model."""
    out = []
    for info in layers:
        for name, spec in info.params.items():
            torch_name = torch_name_of(framework, info.kind, name) or name
            storage = layout(framework, info.kind, torch_name, len(spec.shape))
            candidates = [".".join(path + (torch_name,)) for path in _linen_alternatives(info.segments)]
            out.append((spec, candidates, storage, True))
    return out


def _targets_for_torch_model(framework: str, module, layers: Iterable[LayerInfo]):
    """Targets when converting framework -> torch: like= is a torch model, ``module`` the source's plug-in."""
    out = []
    for info in layers:
        for torch_name, spec in info.params.items():
            canonical_name = canonical_torch_key(torch_name)
            name = framework_name_of(framework, info.kind, canonical_name) or canonical_name
            storage = layout(framework, info.kind, canonical_name, len(spec.shape))
            out.append((spec, module.candidate_keys(info, name), storage, False))
    return out


def convert(
    source: Any,
    *,
    to: str,
    like: Any,
    rename: Union[None, Mapping[str, str], Callable[[str], str]] = None,
    cast: bool = False,
    load: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    entry: Optional[str] = None,
) -> Any:
    """Convert a checkpoint between torch and MindSpore or Flax, strictly.

    Args:
        source: for ``to="mindspore"``/``"flax"``: a torch state_dict, or a path to a ``.safetensors``
            or ``.pt``/``.pth``/``.bin`` file (read with ``weights_only=True``: nothing but tensors is
            ever unpickled). For ``to="torch"``: a MindSpore Cell, its ``parameters_dict()`` or a
            ``.ckpt`` path; or Flax variables, an NNX module, its ``nnx.state`` or a ``.msgpack`` path.
            torch's legacy (``weight_g``/``weight_v``) and parametrization
            (``parametrizations.weight.original0/1``) weight-norm keys are both read.
        to: ``"mindspore"``, ``"flax"`` or ``"torch"``.
        like: the target model, which gives every name, shape and dtype: a MindSpore Cell; Flax linen
            variables (``{"params": ..., "batch_stats": ...}``) or an NNX module; a torch module.
        rename: ``{regex: replacement}`` (applied in order with ``re.sub``) or a function, applied to
            each key as derived from ``like`` (in the source's naming) to give the key to read in
            ``source``, for models whose attribute names differ.
        cast: ``False`` (default): a dtype difference is an error. ``True``: floating tensors are cast
            to the target's dtype.
        load: ``True`` also loads the result into ``like`` (MindSpore: ``load_param_into_net``,
            strictly; NNX: ``nnx.update``; torch: ``load_state_dict(strict=True)``); linen variables
            are immutable, so it is an error there.
        progress: called as ``progress(bytes_done, bytes_total)`` after each tensor.
        entry: the state dict to convert when ``source`` holds several (a torch checkpoint such as
            ``{"generator": ..., "optimizer": ...}``, a Flax training checkpoint): its key. A file
            without a known suffix (``g_02500000``) is read by its content, so only the entry is needed.

    Returns:
        MindSpore: ``{name: Parameter}`` ready for ``mindspore.load_param_into_net(like, result)``.
        Flax: new variables (linen: the same nested structure as ``like``; NNX: an ``nnx.State``
        for ``nnx.update(like, result)``). torch: a state_dict with ``like``'s own keys.

    Raises:
        ConversionError: listing every target tensor missing from ``source``, every source entry
            left unused, every shape and dtype mismatch (torch's ``num_batches_tracked`` is the one
            entry with no counterpart: skipped, or zero-filled into a torch target).
        CheckpointFileError: the file is missing, truncated, corrupt or holds more than tensors.
        OptionError, BackendNotInstalledError.
        ``like``, ``source`` and any file are unchanged whenever an error is raised.
    """
    plan_, target_module = _plan(source, to=to, like=like, rename=rename, cast=cast, entry=entry)
    return _execute(plan_, target_module, like, load=load, progress=progress)


def _plan(source: Any, *, to: str, like: Any, rename: Any = None, cast: bool = False, hint_style: str = "python",
          entry: Optional[str] = None):
    if not isinstance(cast, bool):
        raise OptionError(f"cast must be True or False, got {cast!r}.")
    if entry is not None and not isinstance(entry, str):
        raise OptionError(f"entry must be the key of one state dict in the source (a str), got {entry!r}.")
    target_module = _framework(to)
    _model_framework(like, to)
    source_name = _source_framework(source, to)
    source_module = _framework(source_name)
    refs = source_module.read(source) if entry is None else source_module.read(source, entry=entry)
    if to == "torch":
        layers = target_module.describe(like)
        targets = _targets_for_torch_model(source_name, source_module, layers)
        return plan(
            refs,
            targets,
            source_name=_describe_source(source),
            cast=cast,
            rename=rename,
            hint_style=hint_style,
            fill=lambda spec: _last(spec.key) in TORCH_ONLY,
        ), target_module
    layers = target_module.describe(like)
    targets = _targets_from_framework_model(to, layers)
    by_canonical: Dict[str, ArrayRef] = {}
    clashes = []
    for key, ref in refs.items():
        canonical = canonical_torch_key(key)
        if canonical in by_canonical:
            first = by_canonical[canonical].key
            clashes.append(f"{canonical}: {_describe_source(source)} has both {first!r} and {key!r}")
        by_canonical[canonical] = ref
    if clashes:
        raise ConversionError(
            "the checkpoint holds some reparametrization tensors under both torch key styles (weight_g/weight_v "
            "or weight_orig/weight_u/weight_v, and parametrizations.weight.*); nothing was converted or modified:"
            "\n  " + "\n  ".join(clashes)
            + "\nfix: keep one key of each pair.",
            mismatched=clashes,
        )
    refs = {
        canonical: dataclasses.replace(
            ref, key=canonical, alias_of=None if ref.alias_of is None else canonical_torch_key(ref.alias_of)
        )
        for canonical, ref in by_canonical.items()
    }
    return plan(
        refs,
        targets,
        source_name=_describe_source(source),
        cast=cast,
        hint_style=hint_style,
        rename=rename,
        ignorable=lambda key: _last(key) in TORCH_ONLY,
    ), target_module


def _describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return "the source"


class _ConvertedArrays(Mapping):
    """The converted tensors, each computed when the target plug-in asks for it and not kept here.

    A plug-in that turns each array into its framework's tensor as it goes (and drops the array) holds
    one converted tensor at a time on top of its result: the conversion's peak memory stays near the
    result's size instead of twice it. Asking twice for a key converts it twice (same values).
    """

    def __init__(self, plan_: Plan, progress) -> None:
        self._steps = {step.target.key: step for step in plan_.steps}
        self._filled = {spec.key: spec for spec in plan_.filled}
        self._aliases = {spec.key: spec.alias_of for spec in plan_.aliases}
        self._progress = progress
        self._total = plan_.nbytes
        self._done = 0

    def __getitem__(self, key: str):
        key = self._aliases.get(key, key)
        if key in self._filled:
            import numpy as np

            spec = self._filled[key]
            return np.zeros(spec.shape, dtype=_numpy_dtype(spec.dtype))
        step = self._steps[key]
        array = step.run()
        self._done = min(self._done + step.source.nbytes, self._total)
        if self._progress is not None:
            self._progress(self._done, self._total)
        return array

    def __contains__(self, key) -> bool:  # Mapping's default would convert the tensor to answer
        return key in self._steps or key in self._filled or key in self._aliases

    def __iter__(self):
        return iter([*self._steps, *self._filled, *self._aliases])

    def __len__(self) -> int:
        return len(self._steps) + len(self._filled) + len(self._aliases)


def _execute(plan_: Plan, target_module, like: Any, *, load: bool, progress=None):
    if not isinstance(load, bool):
        raise OptionError(f"load must be True or False, got {load!r}.")
    return target_module.build(like, _ConvertedArrays(plan_, progress), load=load)


def _write(plan_: Plan, target_module, like: Any, path: Any, *, progress=None) -> None:
    """Convert and write the result file, the way with the lowest peak memory the plug-in offers."""
    arrays = _ConvertedArrays(plan_, progress)
    if hasattr(target_module, "write"):
        target_module.write(like, arrays, path)
    else:
        target_module.save(target_module.build(like, arrays, load=False), path)


# -- files ----------------------------------------------------------------------------------------------

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
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointFileError(corrupt + f"its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(corrupt + "its header is not a JSON object.")
    data_start = 8 + header_len
    refs: Dict[str, ArrayRef] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(corrupt + f"entry {key!r} has no valid dtype/shape/data_offsets.") from None
        if end - begin != math.prod(shape) * _itemsize(dtype) or begin < 0 or data_start + end > size:
            raise CheckpointFileError(
                corrupt + f"entry {key!r} ({dtype}{list(shape)}) needs bytes {begin}..{end} of "
                f"a data section of {size - data_start} bytes."
            )

        def load(path=path, dtype=dtype, shape=shape, offset=data_start + begin):
            if math.prod(shape) == 0:
                return np.zeros(shape, dtype=_numpy_dtype(dtype))
            # A memmap per tensor: its pages leave memory when the view is dropped after conversion.
            return np.memmap(path, dtype=_numpy_dtype(dtype), mode="r", offset=offset, shape=shape)

        refs[key] = ArrayRef(key, shape, dtype, load)
    return refs


def write_safetensors(arrays: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write NumPy arrays as ``.safetensors`` (atomically: a temporary file renamed over ``path``)."""
    import numpy as np

    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header: Dict[str, Any] = {}
    offset = 0
    for key, array in arrays.items():
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
                f.write(np.ascontiguousarray(array).tobytes())

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


def save(result: Any, path: Union[str, os.PathLike], *, to: str) -> None:
    """Write a :func:`convert` result to ``path`` atomically, in the format of framework ``to``."""
    _framework(to).save(result, path)


# -- compare --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OutputDifference:
    """How one output array of the ported model differs from the reference's. ``path`` locates it in a
    nested output (:func:`output_leaves`); ``index`` is its position among all output arrays."""

    index: int
    path: str
    shape: Tuple[int, ...]
    max_abs: float
    max_rel: float
    worst_index: Tuple[int, ...]
    reference_value: float
    ported_value: float
    error_over_allowed: float  # max over elements of |a - r| / (atol + rtol * |r|), float32 forward tolerance


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare`: one :class:`OutputDifference` per output."""

    outputs: List[OutputDifference]
    dtype: str

    @property
    def ok(self) -> bool:
        return all(o.error_over_allowed <= 1.0 for o in self.outputs)

    def __str__(self) -> str:
        width = max([6] + [len(o.path or str(o.index)) for o in self.outputs])
        lines = [
            f"{'output':>{width}} {'shape':>20} {'max abs':>11} {'max rel':>11} {'err/allowed':>11}  worst element"
        ]
        for o in self.outputs:
            lines.append(
                f"{o.path or o.index:>{width}} {str(o.shape):>20} {o.max_abs:>11.3e} {o.max_rel:>11.3e} "
                f"{o.error_over_allowed:>11.3f}  {o.worst_index}: ref {o.reference_value:.7g}, "
                f"ported {o.ported_value:.7g}"
            )
        lines.append(f"within the {self.dtype} forward tolerance: {'yes' if self.ok else 'NO'}")
        return "\n".join(lines)

    def assert_close(self) -> None:
        if not self.ok:
            raise AssertionError(
                f"the ported model's outputs differ beyond the {self.dtype} forward tolerance:\n{self}"
            )


def output_leaves(out: Any, path: str = "") -> List[Tuple[str, Any]]:
    """The arrays of a model's output, whatever its nesting: ``[(path, array)]`` in order.

    Tuples, lists and dicts (keys in insertion order) are walked; anything else is a leaf. The path
    reads as Python indexing from the output: ``""`` for a single array, ``"[0]"``, ``"[1][2]"``,
    ``"['logits']"`` (a GAN discriminator's ``(logits, [feature maps])`` gives ``[0]``, ``[1][0]``...).
    """
    if isinstance(out, (tuple, list)):
        return [leaf for i, item in enumerate(out) for leaf in output_leaves(item, f"{path}[{i}]")]
    if isinstance(out, Mapping):
        return [leaf for key, item in out.items() for leaf in output_leaves(item, f"{path}[{key!r}]")]
    return [(path, out)]


def _run_eval(model: Any, inputs: Sequence[Any]) -> List[Tuple[str, Any]]:
    for _, module in _loaded_framework_modules():
        if module.accepts_model(model):
            return module.run_eval(model, inputs)
    raise ConversionError(
        f"compare() cannot run a {type(model).__qualname__}; pass a torch module, a MindSpore Cell, an NNX module, "
        "or a linen (module, variables) pair (import its framework first)."
    )


def compare(
    reference_model: Any,
    ported_model: Any,
    inputs: Any,
    *,
    channels_last: bool = False,
    dtype: str = "float32",
) -> Comparison:
    """Run both models in inference mode on the same inputs and measure how far the ported outputs are.

    Args:
        reference_model, ported_model: a torch module, a MindSpore Cell, an NNX module, or a linen
            ``(module, variables)`` pair. Each is switched to inference mode (torch ``eval()`` under
            ``no_grad``, MindSpore ``set_train(False)``, NNX ``eval()``) and restored afterwards; a
            linen module must already be built for inference.
        inputs: a NumPy array or a tuple of them, given to both models. The outputs may be an array or
            any nesting of tuples, lists and dicts of arrays (a discriminator's ``(logits, [feature
            maps])``); both models must return the same structure, and every array is compared.
        channels_last: the ported model takes and returns channels-last data (Flax's convention):
            its inputs are moved from ``(N, C, ...)`` to ``(N, ..., C)`` and its outputs back.
        dtype: the tolerance row the result is judged against (``Comparison.ok``).

    Returns:
        a :class:`Comparison` (``print`` it; ``.ok``; ``.assert_close()``).
    """
    import numpy as np

    from .conformance.tolerances import tolerance

    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    inputs = tuple(np.asarray(x) for x in inputs)
    ported_inputs = tuple(np.moveaxis(x, 1, -1) if channels_last and x.ndim > 2 else x for x in inputs)
    reference = _run_eval(reference_model, inputs)
    ported = _run_eval(ported_model, ported_inputs)
    if channels_last:
        ported = [(path, np.moveaxis(y, -1, 1) if y.ndim > 2 else y) for path, y in ported]
    reference_paths, ported_paths = [path for path, _ in reference], [path for path, _ in ported]
    if reference_paths != ported_paths:
        raise ConversionError(
            f"the models' outputs are structured differently: the reference returns {len(reference)} array(s) at "
            f"{reference_paths or ['(none)']}, the ported model {len(ported)} at {ported_paths or ['(none)']}. "
            "Return the same nesting of tuples, lists and dicts from both."
        )
    rtol, atol = tolerance(dtype, "forward")
    diffs = []
    for index, ((path, r), (_, p)) in enumerate(zip(reference, ported, strict=True)):
        r = np.asarray(r, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        where = f"output{path}" if path else f"output {index}"
        if r.shape != p.shape:
            raise ConversionError(f"{where}: the reference has shape {r.shape}, the ported model {p.shape}.")
        err = np.abs(p - r)
        rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
        allowed = atol + rtol * np.abs(r)
        worst = np.unravel_index(int(np.argmax(err / allowed)), r.shape) if r.size else ()
        diffs.append(
            OutputDifference(
                index=index,
                path=path,
                shape=r.shape,
                max_abs=float(err.max()) if r.size else 0.0,
                max_rel=float(rel.max()) if r.size else 0.0,
                worst_index=tuple(int(i) for i in worst),
                reference_value=float(r[worst]) if r.size else 0.0,
                ported_value=float(p[worst]) if r.size else 0.0,
                error_over_allowed=float((err / allowed).max()) if r.size else 0.0,
            )
        )
    return Comparison(diffs, dtype)
