"""The conformance suite itself: it passes a correct backend, catches broken ones, enforces its
expected-failure rules and compares saved runs. The backends here are NumPy ones built from the
reference, so these tests need no framework."""

import copy
import json

import numpy as np
import pytest

from xnorm import reference
from xnorm.conformance import layers
from xnorm.conformance.adapter import Adapter
from xnorm.conformance.cases import LAYERS, Case, catalogue
from xnorm.conformance.report import cross_report, full_report
from xnorm.conformance.runner import ConformanceError, SuiteRun, load_expected_failures, run_case

FEW_CASES = [Case(layer, dim, "float64", "cpu") for layer in (LAYERS[0], LAYERS[3], LAYERS[8]) for dim in (0, None)]


class NumpyAdapter(Adapter):
    """A backend made of the reference itself: everything must pass."""

    name = "numpy-reference"
    backend = "numpy"
    dtypes = ("float64",)
    devices = ("cpu", "gpu")

    def supports_device(self, device):
        return device == "cpu"

    def build(self, layer, weight, bias, dtype):
        return {
            "layer": layer,
            "weight": np.array(weight, np.float64),
            "bias": None if bias is None else np.array(bias),
        }

    def wrap(self, handle, dim):
        g, v = reference.init(handle["weight"], dim)
        return {"layer": handle["layer"], "dim": dim, "g": g, "v": v, "bias": handle["bias"]}

    def remove(self, handle):
        return {"layer": handle["layer"], "weight": self.weight(handle), "bias": handle["bias"]}

    def parameters(self, handle):
        keys = ("g", "v", "bias") if "g" in handle else ("weight", "bias")
        return {k: handle[k] for k in keys if handle.get(k) is not None}

    def parameter_names(self, handle):
        return list(self.parameters(handle))

    def weight(self, handle):
        return reference.weight_norm(handle["g"], handle["v"], handle["dim"]) if "g" in handle else handle["weight"]

    def forward(self, handle, x, *, training=True):
        return layers.forward(handle["layer"], self.weight(handle), handle["bias"], x)

    def gradients(self, handle, x, grad_output):
        grad_w, grad_b = layers.backward(handle["layer"], self.weight(handle), x, grad_output)
        grad_g, grad_v = reference.weight_norm_grads(handle["g"], handle["v"], grad_w, handle["dim"])
        out = {"g": grad_g, "v": grad_v}
        if handle["bias"] is not None:
            out["bias"] = grad_b
        return out

    def sgd_step(self, handle, x, target, lr):
        y = self.forward(handle, x)
        grads = self.gradients(handle, x, (y - target) / y.size)
        new = dict(handle)
        for key, grad in grads.items():
            new[key] = handle[key] - lr * grad
        return new

    def state_roundtrip(self, handle, fresh):
        loaded = dict(fresh)
        loaded.update(copy.deepcopy(self.parameters(handle)))
        return loaded


class IgnoresG(NumpyAdapter):
    """A classic bug: the weight is v, not v * g / ||v||, so g gets no gradient."""

    name = "numpy-ignores-g"

    def weight(self, handle):
        return handle["v"] if "g" in handle else handle["weight"]

    def gradients(self, handle, x, grad_output):
        grads = super().gradients(handle, x, grad_output)
        grads["g"] = np.zeros_like(grads["g"])
        return grads


class LeavesGAndVBehind(NumpyAdapter):
    """remove() that keeps the reparametrization's tensors next to the weight."""

    name = "numpy-leaves-g-v"

    def remove(self, handle):
        return dict(super().remove(handle), removed=True)

    def parameter_names(self, handle):
        return list(self.parameters(handle)) + (["weight_g", "weight_v"] if handle.get("removed") else [])


class ForgetsState(NumpyAdapter):
    """A save/load that silently keeps the fresh layer's values."""

    name = "numpy-forgets-state"

    def state_roundtrip(self, handle, fresh):
        return fresh


@pytest.mark.parametrize("case", FEW_CASES, ids=lambda c: c.id)
def test_a_correct_backend_passes_every_check(case):
    result = run_case(NumpyAdapter(), case)
    assert result.status == "passed", result.failures()
    assert set(result.checks) == {
        "plain_forward",
        "init",
        "weight",
        "preserves",
        "forward",
        "gradient",
        "eval",
        "training",
        "state",
        "remove",
    }


@pytest.mark.parametrize(
    ("adapter", "failing"),
    [
        # At init g == ||v||, so ignoring g is invisible in the weight and output; gradients and training see it.
        (IgnoresG(), {"gradient", "training", "remove"}),
        (LeavesGAndVBehind(), {"remove"}),
        (ForgetsState(), {"state"}),
    ],
)
def test_broken_backends_fail_the_checks_that_concern_them(adapter, failing):
    result = run_case(adapter, FEW_CASES[2])
    assert result.status == "failed"
    assert {name for name, check in result.checks.items() if not check.passed} == failing


def test_a_crashing_backend_is_an_error_blamed_on_the_step_that_crashed():
    class Crashes(NumpyAdapter):
        name = "numpy-crashes"

        def gradients(self, handle, x, grad_output):
            raise RuntimeError("kernel missing")

    result = run_case(Crashes(), FEW_CASES[0])
    assert result.status == "error"
    assert not result.checks["gradient"].passed and "kernel missing" in result.checks["gradient"].detail
    assert result.checks["forward"].passed


def test_absent_device_is_reported_not_run():
    suite = SuiteRun(NumpyAdapter(), expected_failures=[])
    result = suite.run(Case(LAYERS[0], 0, "float64", "gpu"))
    assert result.status == "not-run" and "gpu" in result.reason
    assert not result.checks


def _write(tmp_path, text):
    path = tmp_path / "xfail.toml"
    path.write_text(text)
    return path


def test_expected_failure_turns_a_failure_into_xfail_and_a_pass_into_xpass(tmp_path):
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-dim0-*"\nreason = "g is ignored (known)"\n')
    linear_dim0 = Case(LAYERS[0], 0, "float64", "cpu")
    broken = run_case(IgnoresG(), linear_dim0, load_expected_failures(IgnoresG(), path=path))
    assert broken.status == "xfail" and broken.reason == "g is ignored (known)"
    correct = run_case(NumpyAdapter(), linear_dim0, load_expected_failures(NumpyAdapter(), path=path))
    assert correct.status == "xpass" and not correct.ok


def test_expected_failure_limited_to_one_check_does_not_excuse_others(tmp_path):
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-dim0-*"\ncheck = "training"\nreason = "r"\n')
    result = run_case(IgnoresG(), Case(LAYERS[0], 0, "float64", "cpu"), load_expected_failures(IgnoresG(), path=path))
    assert result.status == "failed"


@pytest.mark.parametrize(
    "text",
    [
        '[[expected_failure]]\ncase = "no-such-layer-*"\nreason = "stale"\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = ""\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = "r"\ncheck = "speed"\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = "r"\nwhy = "typo"\n',
    ],
)
def test_bad_or_stale_expected_failure_entries_are_errors(tmp_path, text):
    with pytest.raises(ConformanceError):
        load_expected_failures(NumpyAdapter(), path=_write(tmp_path, text))


def test_case_ids_are_unique_and_name_layer_dim_dtype_device():
    cases = catalogue(("float32", "bfloat16"), ("cpu", "gpu"))
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids))
    assert "conv1d-dim0-float32-cpu" in ids and "linear-dimNone-bfloat16-gpu" in ids
    assert "conv1d-dim-1-float32-cpu" in ids and "conv1d-dim-2-float32-cpu" in ids
    # the same numbers on every device
    a = Case(LAYERS[2], 0, "float32", "cpu").arrays()
    b = Case(LAYERS[2], 0, "float32", "gpu").arrays()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _saved_run(adapter, tmp_path):
    suite = SuiteRun(adapter, expected_failures=[])
    for case in FEW_CASES:
        suite.run(case)
    return suite.save(tmp_path)


def test_cross_report_agrees_for_equal_backends_and_catches_a_drifting_one(tmp_path):
    _saved_run(NumpyAdapter(), tmp_path)

    class Twin(NumpyAdapter):
        name = "numpy-twin"

    _saved_run(Twin(), tmp_path)
    text, agree = cross_report(tmp_path)
    assert agree and "numpy-reference vs numpy-twin" in text

    # Perturb one saved array of the twin beyond twice the float64 tolerance.
    arrays = dict(np.load(tmp_path / "numpy-twin" / "arrays.npz"))
    key = next(k for k in arrays if k.endswith("::forward"))
    arrays[key] = arrays[key] * (1 + 1e-5)
    np.savez(tmp_path / "numpy-twin" / "arrays.npz", **arrays)
    text, agree = cross_report(tmp_path)
    assert not agree
    summary = json.loads((tmp_path / "numpy-twin" / "summary.json").read_text())
    assert summary["counts"] == {"passed": len(FEW_CASES)}
    report, ok = full_report(tmp_path)
    assert not ok and "## numpy-twin" in report and "err/allowed" in report
