"""Run the catalogue through an adapter, check every quantity against the NumPy reference, save results.

Each case goes through one life cycle, and every step is compared with :mod:`xnorm.reference` and
:mod:`xnorm.conformance.layers` in float64:

====================  =========================================================================  ==========
check                 what is compared                                                           quantity
====================  =========================================================================  ==========
``plain_forward``     the unwrapped layer's output vs the reference layer (the adapter builds    forward
                      the layer it claims to)
``init``              g and v right after wrapping vs ``reference.init(W)``                      weight
``weight``            the weight the wrapped layer computes with vs ``weight_norm(g, v)``         weight
``preserves``         wrapped output vs the plain layer's output (wrapping is function-          forward
                      preserving)
``forward``           wrapped output vs the reference layer with the reference w                 forward
``gradient``          dL/dg, dL/dv, dL/dbias for a random dL/dy vs the analytic gradients        gradient
``eval``              inference-mode output vs training-mode output                              exact
``training``          g, v, bias after each of 20 SGD steps vs the reference trajectory          training
``state``             parameters and output after a save/load round trip into a fresh layer     exact
``remove``            plain structure again (same parameter names as the original layer),        forward
                      weight and output vs the reference
====================  =========================================================================  ==========

The training reference starts from the backend's own g and v (so the init error is not counted
twice), computes each step in float64 and rounds g, v and bias to the case's dtype after each update,
as a framework storing them in that dtype does.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import platform
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tomllib

from xnorm import reference
from xnorm.reference import round_to_dtype

from . import layers
from .adapter import Adapter
from .cases import Case, catalogue
from .tolerances import TOLERANCE_VERSION, compare, tolerance

__all__ = [
    "TRAINING_STEPS",
    "LEARNING_RATE",
    "CheckResult",
    "CaseResult",
    "ExpectedFailure",
    "load_expected_failures",
    "run_case",
    "SuiteRun",
    "run_suite",
]

TRAINING_STEPS = 20
LEARNING_RATE = 0.5

# check name -> quantity in the tolerance table
CHECK_QUANTITY = {
    "plain_forward": "forward",
    "init": "weight",
    "weight": "weight",
    "preserves": "forward",
    "forward": "forward",
    "gradient": "gradient",
    "eval": "exact",
    "training": "training",
    "state": "exact",
    "remove": "forward",
}
CHECKS = tuple(CHECK_QUANTITY)


class ConformanceError(Exception):
    """A misuse of the suite itself (bad expected-failure file, adapter breaking the protocol)."""


@dataclasses.dataclass
class CheckResult:
    check: str
    quantity: str
    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    ratio: float = 0.0
    passed: bool = True
    detail: str = ""

    def add(self, actual, expected, what: str) -> None:
        """Fold one comparison into this check, keeping the worst errors."""
        try:
            result = compare(actual, expected, self.rtol, self.atol)
        except ValueError as error:
            self.passed = False
            self.ratio = float("inf")
            self.detail = f"{what}: {error}"
            return
        if result["ratio"] > self.ratio or not self.detail:
            self.detail = what if result["passed"] else f"{what} out of tolerance"
        self.max_abs = max(self.max_abs, result["max_abs"])
        self.max_rel = max(self.max_rel, result["max_rel"])
        self.ratio = max(self.ratio, result["ratio"])
        self.passed = self.passed and result["passed"]

    def fail(self, detail: str) -> None:
        self.passed = False
        self.ratio = float("inf")
        self.detail = detail


@dataclasses.dataclass
class CaseResult:
    case: Case
    adapter: str
    #: passed | failed | xfail | xpass | not-run | error
    status: str
    checks: Dict[str, CheckResult] = dataclasses.field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0
    arrays: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Neither a failure nor an unexpected pass."""
        return self.status in ("passed", "xfail", "not-run")

    def failures(self) -> List[str]:
        return [
            f"{c.check}: {c.detail} (worst error/allowed {c.ratio:.3g})" for c in self.checks.values() if not c.passed
        ]

    def to_json(self) -> dict:
        return {
            "id": self.case.id,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "checks": {name: dataclasses.asdict(check) for name, check in self.checks.items()},
        }


@dataclasses.dataclass(frozen=True)
class ExpectedFailure:
    """One entry of ``expected_failures/<adapter>.toml``: cases matching ``case`` (fnmatch pattern over
    case ids) are expected to fail ``check`` (or any check when empty), for ``reason``."""

    case: str
    reason: str
    check: str = ""

    def matches(self, case_id: str) -> bool:
        return fnmatch.fnmatchcase(case_id, self.case)


def load_expected_failures(adapter: Adapter, *, path: Optional[Path] = None) -> List[ExpectedFailure]:
    """Read the adapter's expected-failure list and check every entry against the catalogue.

    The file is ``expected_failures/<adapter name>.toml`` shipped with the suite (or ``path``; an
    adapter may also define ``expected_failures_path``). Each ``[[expected_failure]]`` table has
    ``case`` (an fnmatch pattern over case ids), ``reason`` (required, non-empty) and optionally
    ``check``. An entry that matches no case of the adapter's full catalogue (all its dtypes and
    devices) raises :class:`ConformanceError`: stale entries would hide nothing and mislead.
    """
    if path is None:
        path = getattr(adapter, "expected_failures_path", None)
    if path is None:
        candidate = resources.files("xnorm.conformance").joinpath("expected_failures", f"{adapter.name}.toml")
        if not candidate.is_file():
            return []
        text = candidate.read_text()
        where = f"expected_failures/{adapter.name}.toml"
    else:
        text = Path(path).read_text()
        where = str(path)
    entries = []
    for raw in tomllib.loads(text).get("expected_failure", []):
        unknown = set(raw) - {"case", "reason", "check"}
        if unknown or not raw.get("case") or not str(raw.get("reason", "")).strip():
            raise ConformanceError(f"{where}: each entry needs 'case' and a non-empty 'reason' (got {raw!r})")
        if raw.get("check", "") not in ("", *CHECKS):
            raise ConformanceError(f"{where}: unknown check {raw['check']!r}; checks are {', '.join(CHECKS)}")
        entries.append(ExpectedFailure(raw["case"], raw["reason"].strip(), raw.get("check", "")))
    every_id = [case.id for case in catalogue(adapter.dtypes, adapter.devices)]
    stale = [entry.case for entry in entries if not any(entry.matches(case_id) for case_id in every_id)]
    if stale:
        raise ConformanceError(f"{where}: entries match no case of the catalogue: {', '.join(stale)}")
    return entries


def _expected(case: Case, entries: Sequence[ExpectedFailure]) -> List[ExpectedFailure]:
    return [entry for entry in entries if entry.matches(case.id)]


def _reference_step(case: Case, g, v, bias, x, target, dim):
    """One float64 SGD step on 0.5 * mean((y - target)^2), parameters rounded to the case's dtype after."""
    w = reference.weight_norm(g, v, dim)
    y = layers.forward(case.layer, w, bias, x)
    grad_y = (y - np.asarray(target, dtype=np.float64)) / y.size
    grad_w, grad_b = layers.backward(case.layer, w, x, grad_y)
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
    g = round_to_dtype(g - LEARNING_RATE * grad_g, case.dtype).astype(np.float64)
    v = round_to_dtype(v - LEARNING_RATE * grad_v, case.dtype).astype(np.float64)
    if bias is not None:
        bias = round_to_dtype(bias - LEARNING_RATE * grad_b, case.dtype).astype(np.float64)
    return g, v, bias


def run_case(adapter: Adapter, case: Case, expected_failures: Sequence[ExpectedFailure] = ()) -> CaseResult:
    """Run one case's whole life cycle; never raises for a backend's failure (it is recorded)."""
    start = time.perf_counter()
    result = CaseResult(case, adapter.name, "passed")
    checks = {name: CheckResult(name, q, *tolerance(case.dtype, q)) for name, q in CHECK_QUANTITY.items()}
    result.checks = checks
    saved = result.arrays
    stage = ["plain_forward"]
    try:
        _life_cycle(adapter, case, checks, saved, stage)
    except Exception as error:  # a backend crash is a result, not a suite crash
        message = f"raised {type(error).__name__}: {error}"
        checks[stage[0]].fail(message)
        result.status = "error"
        result.reason = message + "\n" + traceback.format_exc(limit=6)
    result.seconds = time.perf_counter() - start
    failed = {name for name, check in checks.items() if not check.passed}
    expected = _expected(case, expected_failures)
    if expected:
        covered = all(any(not e.check or e.check == name for e in expected) for name in failed)
        if failed and covered:
            result.status = "xfail"
            result.reason = "; ".join(e.reason for e in expected)
        elif not failed:
            result.status = "xpass"
            result.reason = "listed as an expected failure but passed: remove the entry (" + expected[0].case + ")"
        else:
            result.status = "failed" if result.status != "error" else "error"
    elif failed and result.status != "error":
        result.status = "failed"
    return result


def _life_cycle(
    adapter: Adapter, case: Case, checks: Dict[str, CheckResult], saved: Dict[str, np.ndarray], stage: List[str]
):
    """The steps of :func:`run_case`; ``stage[0]`` names the check in progress, to blame a crash on."""
    data = case.arrays()
    layer, dim, dtype = case.layer, case.dim, case.dtype
    x, bias0 = data["x"], data.get("bias")

    plain = adapter.build(layer, data["weight"], bias0, dtype)
    plain_names = sorted(adapter.parameter_names(plain))
    y_plain = adapter.forward(plain, x)
    checks["plain_forward"].add(y_plain, layers.forward(layer, data["weight"], bias0, x), "plain layer output")

    stage[0] = "init"
    wrapped = adapter.wrap(plain, dim)
    params = adapter.parameters(wrapped)
    g_ref, v_ref = reference.init(data["weight"], dim)
    checks["init"].add(params["g"], g_ref, "g after wrap")
    checks["init"].add(params["v"], v_ref, "v after wrap")
    g, v, bias = (np.asarray(params[k], dtype=np.float64) if k in params else None for k in ("g", "v", "bias"))

    stage[0] = "weight"
    w_ref = reference.weight_norm(g, v, dim)
    w = adapter.weight(wrapped)
    checks["weight"].add(w, w_ref, "w = v * (g / ||v||)")
    saved["weight"] = np.asarray(w, dtype=np.float64)

    stage[0] = "forward"
    y = adapter.forward(wrapped, x)
    checks["preserves"].add(y, y_plain, "wrapped output vs plain output")
    checks["forward"].add(y, layers.forward(layer, w_ref, bias, x), "wrapped output")
    saved["forward"] = np.asarray(y, dtype=np.float64)

    stage[0] = "eval"
    y_eval = adapter.forward(wrapped, x, training=False)
    checks["eval"].add(y_eval, y, "eval-mode output vs training-mode output")

    stage[0] = "gradient"
    grad_output = data["grad_output"]
    grads = adapter.gradients(wrapped, x, grad_output)
    grad_w, grad_b = layers.backward(layer, w_ref, x, grad_output)
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
    checks["gradient"].add(grads["g"], grad_g, "dL/dg")
    checks["gradient"].add(grads["v"], grad_v, "dL/dv")
    saved["grad_g"], saved["grad_v"] = np.asarray(grads["g"], np.float64), np.asarray(grads["v"], np.float64)
    if layer.bias:
        checks["gradient"].add(grads["bias"], grad_b, "dL/dbias")
        saved["grad_bias"] = np.asarray(grads["bias"], np.float64)

    stage[0] = "training"
    trained = wrapped
    ref_g, ref_v, ref_b = g, v, bias
    for step in range(1, TRAINING_STEPS + 1):
        trained = adapter.sgd_step(trained, x, data["target"], LEARNING_RATE)
        ref_g, ref_v, ref_b = _reference_step(case, ref_g, ref_v, ref_b, x, data["target"], dim)
        now = adapter.parameters(trained)
        checks["training"].add(now["g"], ref_g, f"g after step {step}")
        checks["training"].add(now["v"], ref_v, f"v after step {step}")
        if layer.bias:
            checks["training"].add(now["bias"], ref_b, f"bias after step {step}")
    final = adapter.parameters(trained)
    for key, value in final.items():
        saved[f"trained_{key}"] = np.asarray(value, dtype=np.float64)

    stage[0] = "state"
    fresh = adapter.wrap(adapter.build(layer, data["other_weight"], data.get("other_bias"), dtype), dim)
    y_trained = adapter.forward(trained, x)
    loaded = adapter.state_roundtrip(trained, fresh)
    for key, value in adapter.parameters(loaded).items():
        checks["state"].add(value, final[key], f"{key} after save/load")
    checks["state"].add(adapter.forward(loaded, x), y_trained, "output after save/load")

    stage[0] = "remove"
    removed = adapter.remove(trained)
    removed_names = sorted(adapter.parameter_names(removed))
    if removed_names != plain_names:
        checks["remove"].fail(f"parameters after remove are {removed_names}, the plain layer had {plain_names}")
        return
    w_final = reference.weight_norm(final["g"], final["v"], dim)
    removed_params = adapter.parameters(removed)
    checks["remove"].add(removed_params["weight"], w_final, "weight after remove")
    y_removed = adapter.forward(removed, x)
    checks["remove"].add(y_removed, layers.forward(layer, w_final, final.get("bias"), x), "output after remove")
    saved["removed_forward"] = np.asarray(y_removed, dtype=np.float64)


class SuiteRun:
    """The results of one adapter over a set of cases; saves them and renders its report.

    ``run`` may be called case by case (pytest does) or through :func:`run_suite`.
    """

    def __init__(self, adapter: Adapter, *, expected_failures: Optional[Sequence[ExpectedFailure]] = None):
        self.adapter = adapter
        self.expected_failures = list(
            load_expected_failures(adapter) if expected_failures is None else expected_failures
        )
        self.results: List[CaseResult] = []
        self._ready_device: Optional[str] = None

    def run(self, case: Case) -> CaseResult:
        if not self.adapter.supports_device(case.device):
            result = CaseResult(case, self.adapter.name, "not-run", reason=f"device {case.device!r} is not available")
        else:
            if self._ready_device != case.device or _ACTIVE.get("adapter") is not self.adapter:
                self.adapter.setup(case.device)
                self._ready_device = case.device
                _ACTIVE["adapter"] = self.adapter
            result = run_case(self.adapter, case, self.expected_failures)
        self.results.append(result)
        return result

    def summary(self) -> dict:
        counts: Dict[str, int] = {}
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        return {
            "adapter": self.adapter.name,
            "backend": self.adapter.backend,
            "versions": self.adapter.versions(),
            "dtypes": list(self.adapter.dtypes),
            "devices": sorted({r.case.device for r in self.results}),
            "tolerance_version": TOLERANCE_VERSION,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counts": counts,
            "cases": [result.to_json() for result in self.results],
        }

    def save(self, results_dir: Path) -> Path:
        """Write ``<results_dir>/<adapter>/summary.json``, ``arrays.npz`` and ``report.md``; returns the folder."""
        from .report import adapter_report

        folder = Path(results_dir) / self.adapter.name
        folder.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
        arrays = {f"{r.case.id}::{key}": value for r in self.results for key, value in r.arrays.items()}
        np.savez_compressed(folder / "arrays.npz", **arrays)
        (folder / "report.md").write_text(adapter_report(summary))
        return folder


# The adapter whose setup() ran last: switching adapters in one process (MindSpore's graph and
# PyNative modes) must re-run setup.
_ACTIVE: Dict[str, Adapter] = {}


def run_suite(
    adapter: Adapter, *, devices: Iterable[str] = ("cpu",), cases: Optional[Iterable[Case]] = None, progress=None
) -> SuiteRun:
    """Run every catalogue case (for the adapter's dtypes and ``devices``) and return the results."""
    suite = SuiteRun(adapter)
    for case in cases if cases is not None else catalogue(adapter.dtypes, devices):
        result = suite.run(case)
        if progress is not None:
            progress(result)
    return suite
