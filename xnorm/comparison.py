"""Output comparison between a model and its port (:func:`compare`): both run in inference mode on the
same inputs, every output leaf (nested tuples, lists, dicts, dataclasses) compared by its path against
the conformance suite's forward tolerance."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Sequence, Tuple

from .errors import ConversionError


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
    from .porting import _loaded_framework_modules  # the plug-in lookup lives with convert, which imports this

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
