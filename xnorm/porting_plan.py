"""The conversion planner: every target tensor paired with exactly one source tensor, checked as a whole
before anything is built (:func:`plan`), and what it pairs (:class:`TensorSpec`, :class:`ArrayRef`,
:class:`LayerInfo`, :class:`Step`, :class:`Plan`). A plan that does not fit raises one
:class:`~xnorm.errors.ConversionError` listing every problem, with the fix :mod:`xnorm.conversion_hints`
finds. No framework is imported here."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .conversion_hints import Leftovers, diagnose
from .errors import ConversionError, OptionError
from .porting_tables import _last
from .spec import StorageLayout


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
