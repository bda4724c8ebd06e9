"""What every framework calls each tensor and how it stores it: the name and layout tables of
:mod:`xnorm.porting` (its module docstring has the layout table), and torch's two key styles of
every reparametrization (:func:`canonical_torch_key`). Pure data and small functions; no framework."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from .spec import REPARAMETRIZATIONS, LayerKind, Orthogonal, SpectralNorm, StorageLayout, WeightNorm

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
#: weight norm's ``original0``/``original1`` (g, v), spectral norm's and the orthogonal parametrization's
#: ``original``, spectral norm's buffers ``0._u``/``0._v`` and the orthogonal ``0.base``.
_TORCH_PARAMETRIZATION_TAILS = {
    "original0": WeightNorm.suffixes["g"],
    "original1": WeightNorm.suffixes["v"],
    "original": SpectralNorm.suffixes["original"],
    "0._u": SpectralNorm.suffixes["u"],
    "0._v": SpectralNorm.suffixes["v"],
    "0.base": Orthogonal.suffixes["base"],
}

#: Suffixes of tensors every framework stores in the canonical (torch) layout, whatever the weight's layout:
#: the orthogonal ``base``, a batch of ``n x n`` matrices over the weight's canonical batch axes.
CANONICAL_LAYOUT_SUFFIXES = (Orthogonal.suffixes["base"],)


_TORCH_PARAMETRIZATION = re.compile(
    r"^(?P<prefix>.*?)parametrizations\.(?P<name>[^.]+)\.(?P<tail>"
    + "|".join(re.escape(tail) for tail in _TORCH_PARAMETRIZATION_TAILS)
    + ")$"
)


def canonical_torch_key(key: str) -> str:
    """torch's parametrization key style mapped to the legacy one: ``a.parametrizations.weight.original0`` ->
    ``a.weight_g`` (``original1`` -> ``a.weight_v``; spectral norm's ``original`` -> ``a.weight_orig``,
    ``0._u`` -> ``a.weight_u``, ``0._v`` -> ``a.weight_v``; the orthogonal ``0.base`` -> ``a.weight_base``);
    every other key is returned unchanged."""
    match = _TORCH_PARAMETRIZATION.match(key)
    if match is None:
        return key
    return f"{match['prefix']}{match['name']}{_TORCH_PARAMETRIZATION_TAILS[match['tail']]}"


def layout(framework: str, kind: str, torch_name: str, canonical_ndim: int) -> StorageLayout:
    """How ``framework`` stores torch parameter ``torch_name`` (plain, or a reparametrization's tensor) of a
    layer of ``kind``. Vectors (spectral norm's u and v, a 1-D weight), scalars and the orthogonal ``base``
    (:data:`CANONICAL_LAYOUT_SUFFIXES`) are stored as they are."""
    base, suffix = _strip_reparametrization(torch_name)
    if base != "weight" or canonical_ndim <= 1 or suffix in CANONICAL_LAYOUT_SUFFIXES:
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


def _last(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _linen_alternatives(segments: Sequence[str]) -> List[Tuple[str, ...]]:
    """linen names list members ``ups_0``; torch ``ups.0``: both spellings of a path, the exact one first."""
    exact = tuple(segments)
    split = tuple(part for segment in segments for part in _split_index(segment))
    return [exact] if split == exact else [exact, split]


def _split_index(segment: str) -> Tuple[str, ...]:
    match = re.fullmatch(r"(.+)_(\d+)", segment)
    return (match[1], match[2]) if match else (segment,)
