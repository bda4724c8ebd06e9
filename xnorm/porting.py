"""Porting a model between frameworks: checkpoint conversion (:func:`convert`) and output comparison (:func:`compare`).

One mechanism serves every direction. The model given as ``like`` describes itself as a list of
:class:`LayerInfo` (its layers, their kinds, their parameters with shapes and dtypes); the tables
(:mod:`xnorm.porting_tables`) say, for each kind, what each parameter is called in torch and in the
other framework and how the other framework stores it (:data:`NAMES`, :func:`layout`); the source
checkpoint is read into :class:`ArrayRef` objects that know their shape and dtype before any data is
loaded (files: :mod:`xnorm.checkpoint_files`). A plan (:mod:`xnorm.porting_plan`) pairs every target
tensor with exactly one source tensor and is checked as a whole before anything is built, so a bad
checkpoint raises one :class:`~xnorm.errors.ConversionError` listing every missing, unexpected and
mis-shaped key, and nothing is modified. :func:`compare` lives in :mod:`xnorm.comparison`. This module
holds the public entry points and re-exports the names the backends and users import from it.

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
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .checkpoint_files import (  # noqa: F401 - re-exported: xnorm.porting is the public face
    FILE_SUFFIXES,
    FORMAT_FRAMEWORKS,
    atomic_write,
    file_format,
    pick_entry,
    read_safetensors,
    write_safetensors,
)
from .comparison import Comparison, OutputDifference, compare, output_leaves  # noqa: F401
from .conversion_hints import Leftovers, diagnose  # noqa: F401
from .errors import ConversionError, OptionError
from .porting_plan import (  # noqa: F401
    ArrayRef,
    LayerInfo,
    Plan,
    Step,
    TensorSpec,
    _ConvertedArrays,
    plan,
)
from .porting_tables import (  # noqa: F401
    BATCHNORM,
    FRAMEWORKS,
    GROUPNORM,
    LAYERNORM,
    NAMES,
    NORM_KINDS,
    REPARAMETRIZATION_SUFFIXES,
    TORCH_ONLY,
    _last,
    _linen_alternatives,
    canonical_torch_key,
    framework_name_of,
    layout,
    torch_name_of,
)

__all__ = ["convert", "compare", "Comparison", "OutputDifference", "LayerInfo", "TensorSpec", "ArrayRef"]


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


def _source_framework(source: Any, to: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        name = FORMAT_FRAMEWORKS[file_format(source)]
        if name == to:
            raise ConversionError(
                f"{os.fspath(source)!r} is a {name} checkpoint ({file_format(source)}) and to={to!r}: xnorm converts "
                f"between frameworks, not within one. Load it with {name} directly (its key styles, legacy or "
                "parametrizations, load into an xnorm-wrapped torch model as they are), or convert it to another "
                "framework."
            )
        return name
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


def save(result: Any, path: Union[str, os.PathLike], *, to: str) -> None:
    """Write a :func:`convert` result to ``path`` atomically, in the format of framework ``to``."""
    _framework(to).save(result, path)
