"""Why a checkpoint does not fit a model: the "fix:" line of a :class:`~xnorm.errors.ConversionError`.

A conversion pairs every tensor of the target model with one key of the source checkpoint. When keys are
left over on either side, :func:`diagnose` tries the causes of :data:`CAUSES` in order, each a function
that looks at the keys and returns a hint only when the keys support it (a cause never guesses):

1. ``prefix``: every missing key is found in the source under one extra leading path (``module.``
   from DataParallel, ``generator.`` from a wrapper), or without one the target has;
2. ``rename``: as many keys missing as unexpected, with the same parameter names, under other paths;
3. ``configuration``: keys pair up but shapes differ: the checkpoint is of another configuration;
4. ``reparametrization``: a layer is plain, weight-normed or spectral-normed on one side and something
   else on the other (told apart by the keys' suffixes, :attr:`xnorm.spec.Reparametrization.suffixes`);
5. ``bias``: the only leftovers are biases, so one side's layers were built without them (MindSpore's
   layers default to ``has_bias=False``).

The first of 1, 2, 4, 5 that applies explains the leftover keys; 3 concerns shapes and is added beside it.

A hint is written for the caller: ``rename={...}`` in Python, ``--rename REGEX=REPLACEMENT`` on the
command line (``style="cli"``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .spec import REPARAMETRIZATIONS

__all__ = ["Leftovers", "CAUSES", "diagnose"]

_SEPARATORS = "./"


@dataclasses.dataclass(frozen=True)
class Leftovers:
    """What a conversion could not pair, in the source's naming.

    ``missing`` holds, per target tensor that nothing filled, the source keys looked for (after
    ``rename``); ``unexpected`` the source keys nothing used; ``mismatched_shapes`` the source keys that
    were found but have another shape than the target tensor.
    """

    missing: Tuple[Tuple[str, ...], ...] = ()
    unexpected: Tuple[str, ...] = ()
    mismatched_shapes: Tuple[str, ...] = ()


def _rename(pattern: str, replacement: str, style: str) -> str:
    if style == "cli":
        return f"--rename '{pattern}={replacement}'"
    return f"rename={{{pattern!r}: {replacement!r}}}"


def _split(key: str) -> Tuple[str, str]:
    """``(path up to and including the last separator, last segment)``."""
    cut = max(key.rfind(sep) for sep in _SEPARATORS) + 1
    return key[:cut], key[cut:]


def _prefix(left: Leftovers, style: str) -> Optional[str]:
    if not left.missing or not left.unexpected:
        return None
    unexpected = set(left.unexpected)
    # the source has an extra leading path: looked-for key c is there as p + c
    added = collections.Counter()
    for looked_for in left.missing:
        for key in left.unexpected:
            for candidate in looked_for:
                if key.endswith(candidate) and len(key) > len(candidate) and key[-len(candidate) - 1] in _SEPARATORS:
                    added[key[: len(key) - len(candidate)]] += 1
    for prefix, _ in added.most_common(3):
        if all(any(prefix + c in unexpected for c in looked_for) for looked_for in left.missing):
            return (f"every missing key is in the checkpoint under the prefix {prefix!r} (a DataParallel or "
                    f"wrapper checkpoint): pass {_rename('^', prefix, style)}")
    # the target has a leading path the source lacks: c = p + key
    stripped = collections.Counter()
    for looked_for in left.missing:
        for candidate in looked_for:
            for key in left.unexpected:
                if candidate.endswith(key) and len(candidate) > len(key) and candidate[-len(key) - 1] in _SEPARATORS:
                    stripped[candidate[: len(candidate) - len(key)]] += 1
    for prefix, _ in stripped.most_common(3):
        if all(any(c.startswith(prefix) and c[len(prefix):] in unexpected for c in looked_for)
               for looked_for in left.missing):
            return (f"every missing key is in the checkpoint without the prefix {prefix!r} the target's keys "
                    f"have: pass {_rename('^' + re.escape(prefix), '', style)}")
    return None


#: reparametrization kind -> the set of suffixes its keys carry (``{"_g", "_v"}``...)
_KIND_SUFFIXES = {spec.kind: frozenset(spec.suffixes.values()) for spec in REPARAMETRIZATIONS.values()}
#: the shorthand that wraps a layer with each kind: xnorm.<kind>
_SHORTHAND = {kind: f"xnorm.{kind}" for kind in _KIND_SUFFIXES}


def _stem(name: str) -> str:
    """A key's last segment without a reparametrization suffix (``weight_g`` -> ``weight``)."""
    for suffixes in _KIND_SUFFIXES.values():
        for suffix in suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name


def _kinds(keys: Sequence[str]) -> Dict[Tuple[str, str], str]:
    """``{(layer path, parameter stem): kind}`` read from key suffixes; ``"plain"`` for a bare stem."""
    found: Dict[Tuple[str, str], set] = collections.defaultdict(set)
    for key in keys:
        path, name = _split(key)
        matched = False
        for suffixes in _KIND_SUFFIXES.values():
            for suffix in suffixes:
                if name.endswith(suffix) and len(name) > len(suffix):
                    found[(path, name[: -len(suffix)])].add(suffix)
                    matched = True
        if not matched:
            found[(path, name)].add("")
    out = {}
    for layer, suffixes in found.items():
        if suffixes == {""}:
            out[layer] = "plain"
            continue
        # the kinds whose keys could be these (a leftover list may hold only some of a layer's keys)
        kinds = [kind for kind, wanted in _KIND_SUFFIXES.items() if suffixes <= wanted]
        if len(kinds) == 1:
            out[layer] = kinds[0]
    return out


def _kind_differences(left: Leftovers) -> List[Tuple[Tuple[str, str], str, str]]:
    """``[((layer path, stem), kind in the source, kind in the target)]`` where they differ. A key found on
    both sides with another shape (spectral norm's v against weight norm's v) counts on both."""
    source = _kinds(left.unexpected + left.mismatched_shapes)
    # the target's kind from its looked-for keys (each tensor's first candidate names it in the source's style)
    target = _kinds([looked_for[0] for looked_for in left.missing if looked_for] + list(left.mismatched_shapes))
    return [(layer, source[layer], target[layer]) for layer in target
            if layer in source and source[layer] != target[layer]]


def _reparametrization(left: Leftovers, style: str) -> Optional[str]:
    differ = _kind_differences(left)
    if not differ:
        return None
    (path, stem), in_source, in_target = differ[0]
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    if in_target == "plain":
        fix = (f"wrap the target's layer with {_SHORTHAND[in_source]}, or remove the reparametrization from the "
               "source model before saving it")
    elif in_source == "plain":
        fix = (f"remove the target's reparametrization (xnorm.remove), or wrap the source model's layer with "
               f"{_SHORTHAND[in_target]} before saving it")
    else:
        fix = f"wrap the target's layer with {_SHORTHAND[in_source]} instead of {_SHORTHAND[in_target]}"
    words = lambda kind: kind.replace("_", " ") + ("ed" if kind != "plain" else "")  # noqa: E731
    return f"{path}{stem} is {words(in_source)} in the checkpoint but {words(in_target)} in the target{more}: {fix}"


def _bias(left: Leftovers, style: str) -> Optional[str]:
    is_bias = lambda key: _split(key)[1] == "bias"  # noqa: E731
    if left.unexpected and not left.missing and all(is_bias(k) for k in left.unexpected):
        return ("only biases are left over: the target's layers were built without bias (MindSpore's layers "
                "default to has_bias=False; Flax use_bias=False): build them with a bias")
    if left.missing and not left.unexpected and all(is_bias(c[0]) for c in left.missing if c):
        return ("only biases are missing: the checkpoint's layers have none; build the target's layers without "
                "bias (bias=False, has_bias=False, use_bias=False)")
    return None


def _renamed(left: Leftovers, style: str) -> Optional[str]:
    if not left.missing or len(left.missing) != len(left.unexpected):
        return None
    names_missing = collections.Counter(_split(c[0])[1] for c in left.missing if c)
    names_unexpected = collections.Counter(_split(k)[1] for k in left.unexpected)
    if names_missing != names_unexpected:
        return None
    example_missing = left.missing[0][0]
    example = next(k for k in left.unexpected if _split(k)[1] == _split(example_missing)[1])
    return (f"the same parameters sit under other names (e.g. the target looks for {example_missing!r}, the "
            f"checkpoint has {example!r}): map the target's names to the checkpoint's with "
            f"{_rename('REGEX', 'REPLACEMENT', style)}, applied to each key the target gives; converting back "
            "needs the inverse mapping")


def _configuration(left: Leftovers, style: str) -> Optional[str]:
    # a key of a layer reparametrized differently on each side (weight_v of weight and spectral norm) is
    # that cause's, not another configuration's
    other_kind = {layer for layer, _, _ in _kind_differences(left)}
    mismatched = [key for key in left.mismatched_shapes
                  if (_split(key)[0], _stem(_split(key)[1])) not in other_kind]
    if not mismatched:
        return None
    return (f"{len(mismatched)} tensor(s) pair up by name but not by shape (e.g. "
            f"{mismatched[0]!r}): the checkpoint is of another configuration of the model (channels, "
            "kernel sizes); build the target with the checkpoint's configuration")


#: The causes tried in order: (name, what it explains, function of (leftovers, style) -> hint or None). The
#: first cause that explains the leftover keys is the hint for them (a prefix is also a rename, and the more
#: precise one); a shape cause is reported beside it.
CAUSES: List[Tuple[str, str, Callable[[Leftovers, str], Optional[str]]]] = [
    ("prefix", "keys", _prefix),
    ("rename", "keys", _renamed),
    ("configuration", "shapes", _configuration),
    ("reparametrization", "keys", _reparametrization),
    ("bias", "keys", _bias),
]


def diagnose(left: Leftovers, *, style: str = "python") -> List[Tuple[str, str]]:
    """``[(cause, hint)]``: the first cause of :data:`CAUSES` the keys support for the leftover keys, and the
    shape cause if it applies, in table order (``style``: ``"python"`` or ``"cli"``)."""
    if style not in ("python", "cli"):
        raise ValueError(f"style must be 'python' or 'cli', got {style!r}")
    out, explained = [], set()
    for name, explains, cause in CAUSES:
        if explains in explained:
            continue
        hint = cause(left, style)
        if hint:
            out.append((name, hint))
            explained.add(explains)
    return out
