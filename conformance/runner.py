"""Run the catalogue through an adapter, check every quantity against the NumPy reference, save results.

Each case goes through one life cycle, and every step is compared in float64 with what the case's
*oracle* (:mod:`xnorm.conformance.oracles`: the reparametrization's NumPy reference) and
:mod:`xnorm.conformance.layers` say. "Tensors" are the reparametrization's trainable tensors (g and v
for weight norm, W for spectral norm) and "state" its non-trainable state (spectral norm's u and v):

====================  =========================================================================  ==========
check                 what is compared                                                           quantity
====================  =========================================================================  ==========
``plain_forward``     the unwrapped layer's output vs the reference layer (the adapter builds    forward
                      the layer it claims to)
``init``              tensors (and the state's structure) right after wrapping vs the oracle     weight
``weight``            the weight an eval-mode use computes vs the oracle's, from the backend's   weight
                      own tensors and state (spectral norm: the state is first set to the
                      case's own, so every backend continues from the same values)
``preserves``         wrapped output vs the plain layer's output (weight norm only: wrapping     forward
                      is function-preserving)
``forward``           training-mode output, and the state after it, vs the oracle                forward
``gradient``          d/d tensors and dL/dbias for a random dL/dy vs the analytic gradients      gradient
``eval``              eval-mode output vs the training-mode output, state unchanged              exact
``training``          tensors, bias and state after each of 20 SGD steps vs the oracle's         training
                      trajectory
``state``             tensors, state and eval output after a save/load round trip into a fresh   exact
                      layer
``remove``            plain structure again (same parameter names as the original layer),        forward
                      weight and output vs the oracle (removed in training mode)
====================  =========================================================================  ==========

A check a reparametrization does not have (``preserves`` for spectral norm) is absent from its cases.
Every check ends in one of four states: *passed*, *failed*, *xfail* (a failure an entry of
``expected_failures/<adapter>.toml`` covers, with its reason) or *not-run* (with its reason: an earlier
step raised, the adapter does not offer the dtype, the device is absent). A check starts not run and
only a comparison moves it, so a check the life cycle never reached is never counted as passed.

The training reference starts from the backend's own tensors (so the init error is not counted
twice), computes each step in float64 and rounds tensors and bias to the case's dtype (state to its
compute dtype) after each update, as a framework storing them so does.
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
import weakref
import zlib
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tomllib

from xnorm.reference import round_to_dtype

from . import layers
from .adapter import Adapter
from .cases import CATALOGUE_DTYPES, CATALOGUE_REPARAMETRIZATIONS, Case, catalogue
from .fine_tuning import FINE_TUNING_CHECKS
from .oracles import Oracle, oracle_for
from .tolerances import TOLERANCE_VERSION, compare, tolerance

__all__ = [
    "TRAINING_STEPS",
    "LEARNING_RATE",
    "STATES",
    "CheckResult",
    "CaseResult",
    "ExpectedFailure",
    "load_expected_failures",
    "run_case",
    "not_run",
    "case_state",
    "state_counts",
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
    **FINE_TUNING_CHECKS,
}
CHECKS = tuple(CHECK_QUANTITY)


#: The four states of a check, and of a case (the worst of its checks, see :func:`case_state`).
PASSED, FAILED, XFAIL, NOT_RUN = "passed", "failed", "xfail", "not-run"
STATES = (PASSED, FAILED, XFAIL, NOT_RUN)


def state_counts(states: Iterable[str]) -> Dict[str, int]:
    """``{state: count}`` over :data:`STATES`, every state present (zeros included), in that order."""
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] += 1
    return counts


def tally(cases: Sequence[dict]) -> Dict[str, dict]:
    """``{"counts", "check_counts"}`` of a summary, from its cases (:meth:`CaseResult.to_json`): cases and
    each check counted by state (:func:`state_counts`)."""
    return {
        "counts": state_counts(case["status"] for case in cases),
        "check_counts": {
            name: state_counts(case["checks"][name]["state"] for case in cases if name in case["checks"])
            for name in CHECKS
        },
    }


class ConformanceError(Exception):
    """A misuse of the suite itself (bad expected-failure file, adapter breaking the protocol)."""


_MISSING_NOTE = "no value from the adapter for "


@dataclasses.dataclass
class CheckResult:
    """One check of one case. It starts ``not-run`` and only a comparison (:meth:`add`) or a failure
    (:meth:`fail`) moves it, so a check the life cycle never reached can never read as passed.

    ``max_abs``, ``max_rel`` and ``ratio`` (worst error / allowed) are ``None`` until a comparison ran;
    a failure without a comparison (the backend raised) has ``ratio`` inf and no errors. ``detail``
    names the worst comparison, the failure, or why the check did not run or was expected to fail.
    ``missing`` names the comparisons the adapter gave no value for (an implementation without that
    quantity, such as Flax's spectral norm, which stores no v): each fails the check, while ``ratio``
    stays the worst of the comparisons that did run, so a missing value does not hide how far the
    values that exist are off.
    """

    check: str
    quantity: str
    rtol: float
    atol: float
    state: str = NOT_RUN
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    ratio: Optional[float] = None
    detail: str = "not reached"
    missing: List[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.state == PASSED

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    def add(self, actual, expected, what: str) -> None:
        """Fold one comparison into this check, keeping the worst errors."""
        if self.state == NOT_RUN:
            self.state, self.detail, self.ratio, self.max_abs, self.max_rel = PASSED, "", 0.0, 0.0, 0.0
        if actual is None:
            self.state = FAILED
            self.missing.append(what)
            if self.ratio != float("inf"):  # a raised failure keeps its message
                self.detail = self._with_missing(self.detail.partition(_MISSING_NOTE)[0].rstrip("; "))
            return
        try:
            result = compare(actual, expected, self.rtol, self.atol)
        except ValueError as error:
            self.fail(f"{what}: {error}")
            return
        if result["ratio"] > (self.ratio or 0.0) or not self.detail:
            self.detail = self._with_missing(what if result["passed"] else f"{what} out of tolerance")
        self.max_abs = max(self.max_abs or 0.0, result["max_abs"])
        self.max_rel = max(self.max_rel or 0.0, result["max_rel"])
        self.ratio = max(self.ratio or 0.0, result["ratio"])
        if not result["passed"]:
            self.state = FAILED

    def _with_missing(self, detail: str) -> str:
        if not self.missing:
            return detail
        more = f" and {len(self.missing) - 1} more" if len(self.missing) > 1 else ""
        note = f"{_MISSING_NOTE}{self.missing[0]}{more}"
        return f"{detail}; {note}" if detail else note

    def fail(self, detail: str) -> None:
        self.state = FAILED
        self.ratio = float("inf")
        self.detail = detail

    def skip(self, reason: str) -> None:
        """Mark a check that did not run, with the reason (only a check that never compared anything)."""
        if self.state != NOT_RUN:
            raise ConformanceError(f"check {self.check!r} already {self.state}; it cannot be marked not run")
        self.detail = reason


def case_state(checks: Iterable[CheckResult]) -> str:
    """A case's state from its checks: failed if any check failed, else xfail if any was an expected
    failure, else not-run if any did not run, else passed (every check ran and passed)."""
    states = {check.state for check in checks}
    for state in (FAILED, XFAIL, NOT_RUN):
        if state in states:
            return state
    return PASSED if states else NOT_RUN


@dataclasses.dataclass
class CaseResult:
    """One case of one adapter. ``status`` is one of :data:`STATES`; ``checks`` always holds every check
    its reparametrization has (a subset of :data:`CHECKS`), each in its own state, also for a case that
    did not run at all."""

    case: Case
    adapter: str
    status: str
    checks: Dict[str, CheckResult] = dataclasses.field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0
    arrays: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing failed (passed, expected failures only, or not run)."""
        return self.status != FAILED

    def failures(self) -> List[str]:
        return [
            f"{c.check}: {c.detail} (worst error/allowed {c.ratio:.3g})" for c in self.checks.values() if c.failed
        ]

    def to_json(self) -> dict:
        return {
            "id": self.case.id,
            "reparametrization": self.case.reparametrization,
            "dtype": self.case.dtype,
            "device": self.case.device,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "checks": {name: dataclasses.asdict(check) for name, check in self.checks.items()},
        }


def _fresh_checks(case: Case) -> Dict[str, CheckResult]:
    # a case with a life cycle of its own (the fine-tuning case) names its checks; the others' come from
    # their reparametrization's oracle
    names = getattr(case, "checks", None) or oracle_for(case).checks
    return {name: CheckResult(name, CHECK_QUANTITY[name], *tolerance(case.dtype, CHECK_QUANTITY[name])) for name in
            names}


def not_run(case: Case, adapter_name: str, reason: str) -> CaseResult:
    """A case that did not run at all (device absent, dtype not offered): every check not run, with ``reason``."""
    checks = _fresh_checks(case)
    for check in checks.values():
        check.skip(reason)
    return CaseResult(case, adapter_name, NOT_RUN, checks, reason=reason)


@dataclasses.dataclass(frozen=True)
class ExpectedFailure:
    """One entry of ``expected_failures/<adapter>.toml``: cases matching ``case`` (fnmatch pattern over
    case ids), of ``reparametrization`` (a spec kind, or any when empty), are expected to fail ``check``
    (or any check when empty), for ``reason``."""

    case: str
    reason: str
    check: str = ""
    reparametrization: str = ""

    def matches(self, case: Case) -> bool:
        if self.reparametrization and case.reparametrization != self.reparametrization:
            return False
        return fnmatch.fnmatchcase(case.id, self.case)


def load_expected_failures(adapter: Adapter, *, path: Optional[Path] = None) -> List[ExpectedFailure]:
    """Read the adapter's expected-failure list and check every entry against the catalogue.

    The file is ``expected_failures/<adapter name>.toml`` shipped with the suite (or ``path``; an
    adapter may also define ``expected_failures_path``). Each ``[[expected_failure]]`` table has
    ``case`` (an fnmatch pattern over case ids), ``reason`` (required, non-empty) and optionally
    ``check`` and ``reparametrization`` (``"weight_norm"``, ``"spectral_norm"``: one reason per
    reparametrization where a pattern would match both). An entry that matches no case of the
    adapter's full catalogue (all its dtypes and devices) raises :class:`ConformanceError`: stale
    entries would hide nothing and mislead.
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
        unknown = set(raw) - {"case", "reason", "check", "reparametrization"}
        if unknown or not raw.get("case") or not str(raw.get("reason", "")).strip():
            raise ConformanceError(f"{where}: each entry needs 'case' and a non-empty 'reason' (got {raw!r})")
        if raw.get("check", "") not in ("", *CHECKS):
            raise ConformanceError(f"{where}: unknown check {raw['check']!r}; checks are {', '.join(CHECKS)}")
        if raw.get("reparametrization", "") not in ("", *CATALOGUE_REPARAMETRIZATIONS):
            raise ConformanceError(
                f"{where}: unknown reparametrization {raw['reparametrization']!r}; the catalogue has "
                f"{', '.join(CATALOGUE_REPARAMETRIZATIONS)}"
            )
        entries.append(ExpectedFailure(raw["case"], raw["reason"].strip(), raw.get("check", ""),
                                       raw.get("reparametrization", "")))
    every_case = catalogue(adapter.dtypes, adapter.devices, adapter.reparametrizations)
    stale = [entry.case for entry in entries if not any(entry.matches(case) for case in every_case)]
    if stale:
        raise ConformanceError(f"{where}: entries match no case of the catalogue: {', '.join(stale)}")
    return entries


def _expected(case: Case, entries: Sequence[ExpectedFailure]) -> List[ExpectedFailure]:
    return [entry for entry in entries if entry.matches(case)]


def _reference_step(case: Case, oracle: Oracle, tensors, state, bias, x, target):
    """One float64 SGD step on 0.5 * mean((y - target)^2); tensors and bias rounded to the case's dtype
    after the update, the state to its compute dtype."""
    w, state = oracle.training_call(tensors, state)
    y = layers.forward(case.layer, w, bias, x)
    grad_y = (y - np.asarray(target, dtype=np.float64)) / y.size
    grad_w, grad_b = layers.backward(case.layer, w, x, grad_y)
    grads = oracle.gradients(tensors, state, grad_w)
    tensors = {
        key: round_to_dtype(value - LEARNING_RATE * grads[key], case.dtype).astype(np.float64)
        for key, value in tensors.items()
    }
    if bias is not None:
        bias = round_to_dtype(bias - LEARNING_RATE * grad_b, case.dtype).astype(np.float64)
    return tensors, oracle.round_state(state), bias


def run_case(adapter: Adapter, case: Case, expected_failures: Sequence[ExpectedFailure] = ()) -> CaseResult:
    """Run one case's whole life cycle; never raises for a backend's failure (it is recorded).

    A backend that raises fails the check in progress; every check after it that compared nothing is
    *not run*, with the reason. Failed checks that an expected-failure entry covers become *xfail*
    (a check-less entry covers any check); an entry whose case then has no failure makes the case
    *failed* (an unexpected pass: the entry is stale).
    """
    start = time.perf_counter()
    checks = _fresh_checks(case)
    result = CaseResult(case, adapter.name, PASSED, checks)
    stage = [""]
    try:
        stage[0] = next(iter(checks))
        # the same draws at wrap whichever cases ran before, in whichever process (xnorm conformance --jobs)
        adapter.seed(zlib.crc32(case.id.encode()))
        life_cycle = getattr(case, "life_cycle", None)
        if life_cycle is not None:
            life_cycle(adapter, checks, result.arrays, stage)
        else:
            _life_cycle(adapter, case, checks, result.arrays, stage)
        unreached = "the life cycle returned before this check (suite bug)"
    except Exception as error:  # a backend crash is a result, not a suite crash
        message = f"raised {type(error).__name__}: {error}"
        checks[stage[0]].fail(message)
        result.reason = message + "\n" + traceback.format_exc(limit=6)
        unreached = f"not reached: {stage[0]} raised {type(error).__name__}"
    result.seconds = time.perf_counter() - start
    for check in checks.values():
        if check.state == NOT_RUN:
            check.skip(unreached)
    expected = _expected(case, expected_failures)
    failed = [check for check in checks.values() if check.failed]
    for check in failed:
        excuses = [e for e in expected if not e.check or e.check == check.check]
        if excuses:
            check.state = XFAIL
            check.detail = f"expected: {'; '.join(e.reason for e in excuses)} (got: {check.detail})"
    result.status = case_state(checks.values())
    if expected and not failed:
        result.status = FAILED
        result.reason = "listed as an expected failure but passed: remove the entry (" + expected[0].case + ")"
    elif result.status == XFAIL:
        result.reason = "; ".join(dict.fromkeys(e.reason for e in expected))
    elif result.status == NOT_RUN:
        # Every check that ran passed, yet some never ran: the suite must not call that a pass.
        result.status = FAILED
        result.reason = result.reason or unreached
    return result


def _as64(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}


def _life_cycle(
    adapter: Adapter, case: Case, checks: Dict[str, CheckResult], saved: Dict[str, np.ndarray], stage: List[str]
):
    """The steps of :func:`run_case`; ``stage[0]`` names the check in progress, to blame a crash on."""
    data = case.arrays()
    layer, spec, oracle = case.layer, case.spec, oracle_for(case)
    x, bias0 = data["x"], data.get("bias")

    def add_state(check: str, actual: Dict[str, np.ndarray], expected: Dict[str, np.ndarray], when: str) -> None:
        for key in spec.state:
            if key in expected:
                checks[check].add(actual.get(key), expected[key], f"state {key} {when}")

    plain = adapter.build(layer, data["weight"], bias0, case.dtype)
    plain_names = sorted(adapter.parameter_names(plain))
    y_plain = adapter.forward(plain, x)
    checks["plain_forward"].add(y_plain, layers.forward(layer, data["weight"], bias0, x), "plain layer output")

    stage[0] = "init"
    wrapped = adapter.wrap(plain, spec)
    params = _as64(adapter.parameters(wrapped))
    for actual, expected, what in oracle.init_comparisons(data["weight"], params, _as64(adapter.state(wrapped))):
        checks["init"].add(actual, expected, what)
    tensors = {key: params[key] for key in spec.tensors}
    bias = params.get("bias")

    stage[0] = "weight"
    state = oracle.start_state(data, tensors)
    if state is not None:
        wrapped = adapter.set_state(wrapped, state)
        add_state("weight", _as64(adapter.state(wrapped)), state, "after set_state")
    state = state or {}
    w = adapter.weight(wrapped)
    checks["weight"].add(w, oracle.weight(tensors, state), f"w ({spec.kind}, eval mode)")
    saved["weight"] = np.asarray(w, dtype=np.float64)

    stage[0] = "forward"
    y = adapter.forward(wrapped, x)
    w_ref, state = oracle.training_call(tensors, state)
    if "preserves" in checks:
        checks["preserves"].add(y, y_plain, "wrapped output vs plain output")
    checks["forward"].add(y, layers.forward(layer, w_ref, bias, x), "wrapped output (training mode)")
    add_state("forward", _as64(adapter.state(wrapped)), state, "after a training-mode call")
    saved["forward"] = np.asarray(y, dtype=np.float64)

    stage[0] = "eval"
    state_before = _as64(adapter.state(wrapped))
    y_eval = adapter.forward(wrapped, x, training=False)
    checks["eval"].add(y_eval, y, "eval-mode output vs training-mode output")
    add_state("eval", _as64(adapter.state(wrapped)), state_before, "after an eval-mode call vs before it")

    stage[0] = "gradient"
    grad_output = data["grad_output"]
    grads = adapter.gradients(wrapped, x, grad_output)
    w_ref, state = oracle.training_call(tensors, state)
    grad_w, grad_b = layers.backward(layer, w_ref, x, grad_output)
    for key, expected in oracle.gradients(tensors, state, grad_w).items():
        checks["gradient"].add(grads.get(key), expected, f"dL/d{key}")
        if key in grads:
            saved[f"grad_{key}"] = np.asarray(grads[key], np.float64)
    if layer.bias:
        checks["gradient"].add(grads["bias"], grad_b, "dL/dbias")
        saved["grad_bias"] = np.asarray(grads["bias"], np.float64)
    add_state("gradient", _as64(adapter.state(wrapped)), state, "after the gradient's training-mode call")
    # the backend's own state from here on, as the tensors: an error is counted once, where it arose
    # (an entry the backend does not store, such as Flax's v, continues from the reference's)
    own_state = _as64(adapter.state(wrapped))
    state = oracle.round_state({k: own_state.get(k, v) for k, v in state.items()})

    stage[0] = "training"
    trained = wrapped
    ref_tensors, ref_state, ref_bias = tensors, state, bias
    for step in range(1, TRAINING_STEPS + 1):
        trained = adapter.sgd_step(trained, x, data["target"], LEARNING_RATE)
        ref_tensors, ref_state, ref_bias = _reference_step(
            case, oracle, ref_tensors, ref_state, ref_bias, x, data["target"]
        )
        now = _as64(adapter.parameters(trained))
        for key in spec.tensors:
            checks["training"].add(now[key], ref_tensors[key], f"{key} after step {step}")
        if layer.bias:
            checks["training"].add(now["bias"], ref_bias, f"bias after step {step}")
        add_state("training", _as64(adapter.state(trained)), ref_state, f"after step {step}")
    final = _as64(adapter.parameters(trained))
    final_state = _as64(adapter.state(trained))
    for key, value in {**final, **{f"state_{k}": v for k, v in final_state.items()}}.items():
        saved[f"trained_{key}"] = value

    stage[0] = "state"
    fresh = adapter.wrap(adapter.build(layer, data["other_weight"], data.get("other_bias"), case.dtype), spec)
    y_trained = adapter.forward(trained, x, training=False)
    loaded = adapter.state_roundtrip(trained, fresh)
    for key, value in adapter.parameters(loaded).items():
        checks["state"].add(value, final[key], f"{key} after save/load")
    add_state("state", _as64(adapter.state(loaded)), final_state, "after save/load")
    checks["state"].add(adapter.forward(loaded, x, training=False), y_trained, "eval output after save/load")

    stage[0] = "remove"
    removed = adapter.remove(trained)
    removed_names = sorted(adapter.parameter_names(removed))
    if removed_names != plain_names:
        checks["remove"].fail(f"parameters after remove are {removed_names}, the plain layer had {plain_names}")
        return
    # removal in training mode is one more training-mode use (spectral norm iterates once more)
    w_final, _ = oracle.training_call({key: final[key] for key in spec.tensors}, {**ref_state, **final_state})
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
        """Run ``case`` (or record it as not run: a dtype the adapter does not offer, a device absent here)."""
        reason = self.not_run_reason(case)
        if reason:
            result = not_run(case, self.adapter.name, reason)
        else:
            active = _ACTIVE.get("adapter")
            if self._ready_device != case.device or active is None or active() is not self.adapter:
                self.adapter.setup(case.device)
                self._ready_device = case.device
                _ACTIVE["adapter"] = weakref.ref(self.adapter)
            result = run_case(self.adapter, case, self.expected_failures)
        self.results.append(result)
        return result

    def not_run_reason(self, case: Case) -> str:
        """Why ``case`` cannot run with this adapter here, or ``""``."""
        if case.reparametrization not in self.adapter.reparametrizations:
            why = self.adapter.reparametrization_reasons.get(case.reparametrization, "the adapter does not offer it")
            return f"{case.reparametrization} is not run by {self.adapter.name}: {why}"
        if case.dtype not in self.adapter.dtypes:
            why = self.adapter.dtype_reasons.get(case.dtype, "the adapter does not offer it")
            return f"dtype {case.dtype} is not run by {self.adapter.name}: {why}"
        if not self.adapter.supports_device(case.device):
            return f"device {case.device!r} is not available in this process"
        return ""

    def absent_devices(self) -> List[str]:
        """Requested devices whose every case was not run because the device is absent."""
        return sorted({r.case.device for r in self.results if r.reason.startswith("device ")})

    def summary(self) -> dict:
        cases = [result.to_json() for result in self.results]
        return {
            "adapter": self.adapter.name,
            "backend": self.adapter.backend,
            "versions": self.adapter.versions(),
            "dtypes": list(self.adapter.dtypes),
            "devices": sorted({r.case.device for r in self.results}),
            "absent_devices": self.absent_devices(),
            "tolerance_version": TOLERANCE_VERSION,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **tally(cases),
            "cases": cases,
        }

    def save(self, results_dir: Path, *, log: Optional[str] = None) -> Path:
        """Write ``<results_dir>/<adapter>/summary.json``, ``arrays.npz`` and ``report.md``; returns the folder.
        ``log`` names the file (relative to the results folder) holding the run's framework output."""
        from .report import adapter_report

        folder = Path(results_dir) / self.adapter.name
        folder.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        if log:
            summary["log"] = log
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
        arrays = {f"{r.case.id}::{key}": value for r in self.results for key, value in r.arrays.items()}
        np.savez_compressed(folder / "arrays.npz", **arrays)
        (folder / "report.md").write_text(adapter_report(summary))
        return folder


# The adapter whose setup() ran last: switching adapters in one process (MindSpore's graph and
# PyNative modes) must re-run setup. A weak reference: an adapter whose run ended must be garbage by the
# next one's setup, which may freeze what is alive then (the MindSpore adapters' gc.freeze()); held
# strongly here, each earlier adapter of a process, with its layers and their compiled graphs, stayed in
# memory for the rest of the process.
_ACTIVE: Dict[str, weakref.ref[Adapter]] = {}


def run_suite(
    adapter: Adapter, *, devices: Iterable[str] = ("cpu",), cases: Optional[Iterable[Case]] = None, progress=None
) -> SuiteRun:
    """Run every catalogue case (every dtype of the catalogue and every device in ``devices``) and return
    the results; cases of a reparametrization or dtype the adapter does not offer, or of an absent device,
    are recorded as not run. ``progress(result, done, total, runnable)`` is called after each case
    (``runnable``: how many of the ``total`` cases run at all)."""
    suite = SuiteRun(adapter)
    cases = list(cases if cases is not None else catalogue(CATALOGUE_DTYPES, devices))
    runnable = sum(not suite.not_run_reason(case) for case in cases)
    for done, case in enumerate(cases, 1):
        result = suite.run(case)
        if progress is not None:
            progress(result, done, len(cases), runnable)
    return suite
