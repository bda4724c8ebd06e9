"""The conformance suite itself: it passes a correct backend, catches broken ones, enforces its
expected-failure rules and compares saved runs. The backends here are NumPy ones built from the
reference, so these tests need no framework."""

import dataclasses
import gc
import json
import weakref

import numpy as np
import pytest

from xnorm import reference_spectral
from xnorm.conformance import fine_tuning
from xnorm.conformance.adapters.reference import ReferenceAdapter as NumpyAdapter
from xnorm.conformance.cases import CATALOGUE_DTYPES, LAYERS, Case, catalogue
from xnorm.conformance.report import cross_report, full_report
from xnorm.conformance.runner import (
    CHECKS,
    ConformanceError,
    ExpectedFailure,
    SuiteRun,
    load_expected_failures,
    run_case,
    run_suite,
)
from xnorm.spec import FLOATING_DTYPES

FEW_CASES = [Case(layer, dim, "float64", "cpu") for layer in (LAYERS[0], LAYERS[3], LAYERS[8]) for dim in (0, None)]


class IgnoresG(NumpyAdapter):
    """A classic bug: the weight is v, not v * g / ||v||, so g gets no gradient."""

    name = "numpy-ignores-g"

    def _call(self, handle, training):
        return handle["tensors"]["v"], handle["state"]

    def _gradients(self, handle, w, state, x, grad_output):
        grads = super()._gradients(handle, w, state, x, grad_output)
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
    assert {name for name, check in result.checks.items() if check.state == "failed"} == failing
    assert all(check.state == "passed" for name, check in result.checks.items() if name not in failing)


def test_a_crashing_backend_fails_the_step_that_crashed_and_nothing_after_it_counts_as_run():
    class Crashes(NumpyAdapter):
        name = "numpy-crashes"

        def gradients(self, handle, x, grad_output):
            raise RuntimeError("kernel missing")

    result = run_case(Crashes(), FEW_CASES[0])
    assert result.status == "failed" and "kernel missing" in result.reason
    gradient = result.checks["gradient"]
    assert gradient.state == "failed" and "kernel missing" in gradient.detail and gradient.max_abs is None
    # the life cycle runs plain_forward, init, weight, preserves/forward, eval, gradient, training, state, remove
    assert {n for n, c in result.checks.items() if c.state == "passed"} == {
        "plain_forward", "init", "weight", "preserves", "forward", "eval"
    }
    for name in ("training", "state", "remove"):
        check = result.checks[name]
        assert check.state == "not-run" and check.ratio is None and check.max_abs is None
        assert check.detail == "not reached: gradient raised RuntimeError"


class CrashesAtBuild(NumpyAdapter):
    """A layer that cannot be built (MindSpore's float64 convolutions, Flax's grouped ConvTranspose)."""

    name = "numpy-crashes-at-build"

    def build(self, layer, weight, bias, dtype):
        raise TypeError("no float64 kernel")


def test_a_case_failing_at_its_first_check_reports_every_later_check_not_run(tmp_path):
    suite = SuiteRun(CrashesAtBuild(), expected_failures=[])
    for case in FEW_CASES:
        suite.run(case)
    result = suite.results[0]
    assert result.status == "failed" and result.checks["plain_forward"].state == "failed"
    assert all(c.state == "not-run" for n, c in result.checks.items() if n != "plain_forward")
    # counts, summary.json and the report say the same
    summary = json.loads((suite.save(tmp_path) / "summary.json").read_text())
    n = len(FEW_CASES)
    assert summary["counts"] == {"passed": 0, "failed": n, "xfail": 0, "not-run": 0}
    assert summary["check_counts"]["plain_forward"] == {"passed": 0, "failed": n, "xfail": 0, "not-run": 0}
    assert summary["check_counts"]["forward"] == {"passed": 0, "failed": 0, "xfail": 0, "not-run": n}
    assert summary["check_counts"]["gradient"]["passed"] == 0
    report = (tmp_path / CrashesAtBuild.name / "report.md").read_text()
    assert "| forward | float64 | " not in report  # no row pretends a forward ran
    assert f"| plain_forward | float64 | forward | 0 | {n} | 0 | 0 | - | rtol 1e-07, atol 1e-07 | raised |" in report
    text, ok = full_report(tmp_path)
    assert not ok and "**Verdict: FAILED**" in text and f"0 passed, {n} failed" in text


def test_an_expected_failure_at_the_first_check_is_xfail_with_the_rest_not_run(tmp_path):
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-*"\nreason = "no float64 kernel (known)"\n')
    result = run_case(CrashesAtBuild(), FEW_CASES[0], load_expected_failures(CrashesAtBuild(), path=path))
    assert result.status == "xfail" and result.reason == "no float64 kernel (known)"
    assert result.checks["plain_forward"].state == "xfail"
    assert "no float64 kernel (known)" in result.checks["plain_forward"].detail
    assert all(c.state == "not-run" for n, c in result.checks.items() if n != "plain_forward")


def test_a_check_the_life_cycle_never_reached_is_not_passed_and_fails_the_case(monkeypatch):
    from xnorm.conformance import runner

    original = runner._life_cycle

    def stops_after_training(adapter, case, checks, saved, stage):
        adapter.state_roundtrip = None  # TypeError at "state": caught below, as if the life cycle had returned
        try:
            original(adapter, case, checks, saved, stage)
        except TypeError:
            return

    monkeypatch.setattr(runner, "_life_cycle", stops_after_training)
    result = run_case(NumpyAdapter(), FEW_CASES[0])
    assert result.checks["training"].state == "passed"
    assert result.checks["state"].state == "not-run" and result.checks["remove"].state == "not-run"
    assert "suite bug" in result.checks["remove"].detail
    assert result.status == "failed"  # every check that ran passed, but a case with unrun checks is no pass


def test_an_adapter_whose_run_ended_is_garbage_before_the_next_ones_setup():
    """A process runs adapter after adapter (``--jobs``); the next one's ``setup`` may freeze what is alive
    (MindSpore's adapters call gc.freeze()), so the runner must not keep the last adapter alive itself."""
    seen_at_setup = []

    class Next(NumpyAdapter):
        def setup(self, device):
            gc.collect()
            seen_at_setup.append(first_alive())
            super().setup(device)

    first = NumpyAdapter()
    first_alive = weakref.ref(first)
    case = Case(LAYERS[0], 0, "float64", "cpu")
    assert run_suite(first, cases=[case]).results[0].status == "passed"
    del first
    assert run_suite(Next(), cases=[case]).results[0].status == "passed"
    assert seen_at_setup == [None]


def test_absent_device_is_reported_not_run():
    suite = SuiteRun(NumpyAdapter(), expected_failures=[])
    result = suite.run(Case(LAYERS[0], 0, "float64", "gpu"))
    assert result.status == "not-run" and "gpu" in result.reason
    assert set(result.checks) == set(CHECKS) - set(fine_tuning.FINE_TUNING_CHECKS)  # weight norm's
    assert all(c.state == "not-run" and c.ratio is None and "gpu" in c.detail for c in result.checks.values())
    assert suite.absent_devices() == ["gpu"]


def test_a_dtype_the_adapter_does_not_offer_is_listed_not_run_with_its_reason(tmp_path):
    class NoBfloat16(NumpyAdapter):
        name = "numpy-no-bf16"
        dtype_reasons = {"bfloat16": "the CPU matmul rejects bfloat16"}

    suite = run_suite(NoBfloat16(), cases=[Case(LAYERS[0], 0, d, "cpu") for d in ("float64", "bfloat16", "float16")])
    assert [r.status for r in suite.results] == ["passed", "not-run", "not-run"]
    assert "the CPU matmul rejects bfloat16" in suite.results[1].reason
    assert "does not offer it" in suite.results[2].reason
    assert suite.absent_devices() == []
    report = (suite.save(tmp_path) / "report.md").read_text()
    assert "### Not run (2 cases)" in report and "the CPU matmul rejects bfloat16" in report
    assert "| init | bfloat16" not in report  # a dtype that never ran has no row of errors


def test_the_whole_catalogue_lists_every_dtype_of_the_spec():
    suite = run_suite(CrashesAtBuild(), cases=[])
    assert suite.results == []
    ids = {case.id for case in catalogue(CATALOGUE_DTYPES)}
    assert {case.dtype for case in catalogue(CATALOGUE_DTYPES)} == set(FLOATING_DTYPES)
    assert "linear-dim0-float16-cpu" in ids


def _write(tmp_path, text):
    path = tmp_path / "xfail.toml"
    path.write_text(text)
    return path


def test_expected_failure_turns_a_failure_into_xfail_and_an_unexpected_pass_into_a_failure(tmp_path):
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-dim0-*"\nreason = "g is ignored (known)"\n')
    linear_dim0 = Case(LAYERS[0], 0, "float64", "cpu")
    broken = run_case(IgnoresG(), linear_dim0, load_expected_failures(IgnoresG(), path=path))
    assert broken.status == "xfail" and broken.reason == "g is ignored (known)"
    assert {n for n, c in broken.checks.items() if c.state == "xfail"} == {"gradient", "training", "remove"}
    assert all(c.state == "passed" for n, c in broken.checks.items() if n not in ("gradient", "training", "remove"))
    correct = run_case(NumpyAdapter(), linear_dim0, load_expected_failures(NumpyAdapter(), path=path))
    assert correct.status == "failed" and not correct.ok and "listed as an expected failure but passed" in (
        correct.reason
    )


def test_expected_failure_limited_to_one_check_does_not_excuse_others(tmp_path):
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-dim0-*"\ncheck = "training"\nreason = "r"\n')
    result = run_case(IgnoresG(), Case(LAYERS[0], 0, "float64", "cpu"), load_expected_failures(IgnoresG(), path=path))
    assert result.status == "failed"
    assert result.checks["training"].state == "xfail" and result.checks["gradient"].state == "failed"


def test_an_expected_failure_limited_to_a_reparametrization_excuses_only_its_cases(tmp_path):
    # "linear-*dim1-*" matches linear-dim1 (weight norm) and linear-sn3-dim1 (spectral norm)
    path = _write(tmp_path, '[[expected_failure]]\ncase = "linear-*dim1-*"\nreparametrization = "weight_norm"\n'
                            'reason = "g is ignored (known)"\n')
    entries = load_expected_failures(IgnoresG(), path=path)
    weight_norm = run_case(IgnoresG(), Case(LAYERS[0], 1, "float64", "cpu"), entries)
    assert weight_norm.status == "xfail"
    spectral = next(c for c in catalogue(("float64",), reparametrizations=("spectral_norm",))
                    if c.id.startswith("linear-sn3-dim1-"))
    assert run_case(DetachesSigma(), spectral, entries).status == "failed"


@pytest.mark.parametrize(
    "text",
    [
        '[[expected_failure]]\ncase = "no-such-layer-*"\nreason = "stale"\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = ""\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = "r"\ncheck = "speed"\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = "r"\nwhy = "typo"\n',
        '[[expected_failure]]\ncase = "linear-*"\nreason = "r"\nreparametrization = "freeze"\n',
        # a pattern matching only weight-norm cases, limited to spectral norm: matches nothing
        '[[expected_failure]]\ncase = "linear-dim0-*"\nreason = "r"\nreparametrization = "spectral_norm"\n',
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
    assert summary["counts"] == {"passed": len(FEW_CASES), "failed": 0, "xfail": 0, "not-run": 0}
    report, ok = full_report(tmp_path)
    assert not ok and "## numpy-twin" in report and "err/allowed" in report
    assert "**Verdict: FAILED**: numpy-reference vs numpy-twin: 1 array(s) disagree" in report
    assert "Pairs of adapters that agree on every case both passed: 0 of 1." in report



def test_pairs_with_no_case_passed_in_both_are_one_line_not_a_row_each(tmp_path):
    _saved_run(NumpyAdapter(), tmp_path)
    # another implementation whose every case is an expected failure passes no case to compare
    suite = SuiteRun(IgnoresG(), expected_failures=[ExpectedFailure("*", "g is ignored (known)")])
    for case in FEW_CASES:
        suite.run(case)
    suite.save(tmp_path)
    report, ok = full_report(tmp_path)
    assert ok and "**Verdict: PASSED**" in report
    assert "1 pair(s) of adapters have no case that passed in both: nothing to compare (`numpy-ignores-g` pass" in (
        report
    )
    assert "`numpy-reference` vs `numpy-ignores-g`" not in report and "Pairs of adapters that agree" not in report


SPECTRAL_CASES = [case for case in catalogue(("float64",), reparametrizations=("spectral_norm",))
                  if case.layer.label in ("linear", "conv_transpose1d")]


@pytest.mark.parametrize("case", SPECTRAL_CASES, ids=lambda c: c.id)
def test_a_correct_spectral_norm_backend_passes_and_has_no_preserves_check(case):
    result = run_case(NumpyAdapter(), case)
    assert result.status == "passed", result.failures()
    assert "preserves" not in result.checks and {"forward", "eval", "training", "remove"} <= set(result.checks)


class IteratesInEvalMode(NumpyAdapter):
    """Flax linen's own SpectralNorm: eval-mode calls still run the power iteration."""

    name = "numpy-iterates-in-eval"

    def _call(self, handle, training):
        return super()._call(handle, training=True)


class NeverIterates(NumpyAdapter):
    """u and v frozen after wrapping: sigma never follows the trained weight."""

    name = "numpy-never-iterates"

    def _call(self, handle, training):
        return super()._call(handle, training=False)


class DetachesSigma(NumpyAdapter):
    """No gradient through sigma: dL/dW = G / sigma only."""

    name = "numpy-detaches-sigma"

    def _gradients(self, handle, w, state, x, grad_output):
        grads = super()._gradients(handle, w, state, x, grad_output)
        if "original" in grads:
            from xnorm.conformance import layers

            grad_w, _ = layers.backward(handle["layer"], w, x, grad_output)
            sigma = reference_spectral.sigma(handle["tensors"]["original"], state["u"], state["v"], self._dim(handle))
            grads["original"] = grad_w / sigma
        return grads


@pytest.mark.parametrize(
    ("adapter", "failing"),
    [
        # its eval-mode calls move the state, so every check after the first of them sees other values
        (IteratesInEvalMode(), {"weight", "eval", "gradient", "state", "remove"}),
        (NeverIterates(), {"forward", "gradient", "training", "remove"}),
        (DetachesSigma(), {"gradient", "training"}),
    ],
)
def test_broken_spectral_norm_backends_fail_the_checks_that_concern_them(adapter, failing):
    result = run_case(adapter, SPECTRAL_CASES[0])
    assert result.status == "failed"
    assert {name for name, check in result.checks.items() if check.state == "failed"} == failing


class StoresNoV(NumpyAdapter):
    """Flax's SpectralNorm: only u is state; v is recomputed from u in every call."""

    name = "numpy-stores-no-v"

    def state(self, handle):
        return {key: value for key, value in super().state(handle).items() if key != "v"}


class NoGradientForG(NumpyAdapter):
    """Flax's NNX WeightNorm: its scales are not nnx.Param, so no gradient reaches g."""

    name = "numpy-no-gradient-for-g"

    def gradients(self, handle, x, grad_output):
        grads = super().gradients(handle, x, grad_output)
        del grads["g"]
        return grads


def test_a_value_the_adapter_does_not_return_fails_its_checks_without_hiding_the_others():
    result = run_case(StoresNoV(), SPECTRAL_CASES[0])
    # every check that compares the state with the reference's fails, and the case still runs to its end
    # (the state check compares the backend with itself after save/load; remove continues from the
    # reference's v)
    failing = {name for name, check in result.checks.items() if check.state == "failed"}
    assert failing == {"init", "weight", "forward", "gradient", "training"}
    assert result.checks["state"].state == result.checks["remove"].state == "passed"
    weight = result.checks["weight"]
    assert weight.missing == ["state v after set_state"] and "no value from the adapter for state v" in weight.detail
    # the values that exist are still measured: w itself is right, so the ratio is that of a passing comparison
    assert weight.ratio is not None and weight.ratio <= 1.0
    assert result.checks["training"].missing[-1] == "state v after step 20"

    result = run_case(NoGradientForG(), FEW_CASES[2])
    gradient = result.checks["gradient"]
    assert gradient.state == "failed" and gradient.missing == ["dL/dg"] and gradient.ratio <= 1.0
    assert {name for name, check in result.checks.items() if check.state == "failed"} == {"gradient"}


ORTHOGONAL_CASES = [case for case in catalogue(("float64",), reparametrizations=("orthogonal",))
                    if case.layer.label in ("linear-wide", "conv2d-kernels") and case.spec.orthogonal_map != "cayley"]


@pytest.mark.parametrize("case", ORTHOGONAL_CASES, ids=lambda c: c.id)
def test_a_correct_orthogonal_backend_passes(case):
    result = run_case(NumpyAdapter(), case)
    assert result.status == "passed", result.failures()
    assert "preserves" not in result.checks


class ForgetsBase(NumpyAdapter):
    """base never multiplies the map's result: the weight is orthogonal, but not the registered one."""

    name = "numpy-forgets-base"

    def _call(self, handle, training):
        if "base" in handle.get("state", {}):
            handle = {**handle, "state": {}}
        return super()._call(handle, training)


class KeepsTheWeight(NumpyAdapter):
    """Registration keeps the weight in base unchanged (no QR): fine for an orthogonal weight only."""

    name = "numpy-keeps-the-weight"

    def wrap(self, handle, spec):
        out = super().wrap(handle, spec)
        if "base" in out["state"]:
            out["state"] = {"base": np.array(handle["weight"], np.float64)}
        return out


@pytest.mark.parametrize(
    ("adapter", "failing"),
    [
        (ForgetsBase(), {"weight", "forward", "gradient", "training", "remove"}),
        (KeepsTheWeight(), {"init"}),  # the suite then sets every backend's base to the case's own
    ],
)
def test_broken_orthogonal_backends_fail_the_checks_that_concern_them(adapter, failing):
    case = next(c for c in ORTHOGONAL_CASES if c.spec.use_trivialization and c.layer.label == "conv2d-kernels")
    result = run_case(adapter, case)
    assert {name for name, check in result.checks.items() if check.state == "failed"} == failing


# -- the fine-tuning case of xnorm.freeze --------------------------------------------------------------
FINE_TUNING_CASE = next(case for case in catalogue(("float64",), reparametrizations=("freeze",)))


class ForgetsToFreeze(NumpyAdapter):
    """The trap itself: bn1 keeps training-mode statistics (bn.eval() undone by model.train())."""

    name = "numpy-forgets-to-freeze"

    def fine_tune(self, run):
        return super().fine_tune(dataclasses.replace(run, freeze=False))


class NeverUnfreezes(NumpyAdapter):
    """unfreeze() that leaves bn1 frozen."""

    name = "numpy-never-unfreezes"

    def fine_tune(self, run):
        records = super().fine_tune(run)
        if run.freeze:
            records[-1] = fine_tuning.reference_step(records[-2], run.batches[-1], run, "torch", frozen=True)
        return records


class FreezesAlways(NumpyAdapter):
    """A freeze that happens without being asked (the counter-example shows no drift)."""

    name = "numpy-freezes-always"

    def fine_tune(self, run):
        return super().fine_tune(dataclasses.replace(run, freeze=True))


class WrongVarianceConvention(NumpyAdapter):
    """Updates the running variance with the biased batch variance while claiming torch's convention."""

    name = "numpy-biased-running-var"

    def fine_tune(self, run):
        records = [dict(run.weights, **fine_tuning.reference_eval(run.weights, run))]
        for index, batch in enumerate(run.batches):
            frozen = run.freeze and index < fine_tuning.FROZEN_STEPS
            records.append(fine_tuning.reference_step(records[-1], batch, run, "flax", frozen=frozen))
        return records


def test_the_fine_tuning_case_is_in_the_catalogue_once_per_dtype_and_device():
    cases = [c for c in catalogue(CATALOGUE_DTYPES, ("cpu", "gpu")) if c.reparametrization == "freeze"]
    assert sorted(c.id for c in cases) == [
        "finetune-convnet-bn-float32-cpu", "finetune-convnet-bn-float32-gpu",
        "finetune-convnet-bn-float64-cpu", "finetune-convnet-bn-float64-gpu",
    ]
    assert set(FINE_TUNING_CASE.checks) <= set(CHECKS)


def test_a_correct_backend_passes_the_fine_tuning_case():
    result = run_case(NumpyAdapter(), FINE_TUNING_CASE)
    assert result.status == "passed", result.failures()
    assert set(result.checks) == {"frozen_state", "frozen_output", "fine_tuning", "unfreeze", "drift"}
    assert all(check.max_abs == 0.0 for check in result.checks.values())


@pytest.mark.parametrize(
    ("adapter", "failing"),
    [
        (ForgetsToFreeze(), {"frozen_state", "frozen_output", "fine_tuning"}),
        (NeverUnfreezes(), {"unfreeze"}),
        (FreezesAlways(), {"drift"}),
        (WrongVarianceConvention(), {"fine_tuning", "unfreeze", "drift"}),
    ],
    ids=lambda a: getattr(a, "name", ""),
)
def test_broken_freezes_fail_the_fine_tuning_checks_that_concern_them(adapter, failing):
    result = run_case(adapter, FINE_TUNING_CASE)
    assert result.status == "failed"
    assert {name for name, check in result.checks.items() if check.state == "failed"} == failing
    assert all(check.state == "passed" for name, check in result.checks.items() if name not in failing)


def test_a_fine_tune_that_raises_fails_its_first_check_and_leaves_the_rest_not_run():
    class Crashes(NumpyAdapter):
        name = "numpy-fine-tune-crashes"

        def fine_tune(self, run):
            raise RuntimeError("no BatchNorm kernel")

    result = run_case(Crashes(), FINE_TUNING_CASE)
    assert result.status == "failed" and result.checks["frozen_state"].state == "failed"
    for name in ("frozen_output", "fine_tuning", "unfreeze", "drift"):
        assert result.checks[name].state == "not-run"
        assert result.checks[name].detail == "not reached: frozen_state raised RuntimeError"


def test_an_adapter_without_the_fine_tuning_case_reports_it_not_run_with_its_reason():
    class NoFreeze(NumpyAdapter):
        name = "numpy-no-freeze"
        reparametrizations = ("weight_norm",)
        reparametrization_reasons = {"freeze": "xnorm.freeze is not implemented here"}

    result = SuiteRun(NoFreeze(), expected_failures=[]).run(FINE_TUNING_CASE)
    assert result.status == "not-run" and "xnorm.freeze is not implemented here" in result.reason
    assert all(check.state == "not-run" for check in result.checks.values())


class FlaxConvention(WrongVarianceConvention):
    """A correct backend whose BatchNorm updates the running variance with the biased batch variance (Flax's
    convention, declared)."""

    name = "numpy-flax-convention"
    batchnorm_convention = "flax"


def _cross_fine_tuning(tmp_path, adapters, *, force_passed=False):
    for adapter in adapters:
        suite = SuiteRun(adapter, expected_failures=[])
        result = suite.run(FINE_TUNING_CASE)
        if force_passed:
            result.status = "passed"  # compare the arrays even though the run failed its own checks
        suite.save(tmp_path)
    return cross_report(tmp_path)


def test_backends_of_different_variance_conventions_compare_what_the_convention_does_not_touch(tmp_path):
    assert run_case(FlaxConvention(), FINE_TUNING_CASE).status == "passed"
    text, agree = _cross_fine_tuning(tmp_path, (NumpyAdapter(), FlaxConvention()))
    assert agree, text
    runs = {path.parent.name: dict(np.load(path)) for path in tmp_path.glob("*/arrays.npz")}
    torch_like, flax_like = runs["numpy-reference"], runs["numpy-flax-convention"]
    shared = sorted(set(torch_like) & set(flax_like))
    # every parameter's trajectory in both runs, the frozen bn1 and backbone until unfreeze; no eval output
    # that reads a training BatchNorm's running variance
    assert any(key.endswith("finetune_frozen_conv2.weight") for key in shared)
    assert any(key.endswith("finetune_plain_bn1.weight") for key in shared)
    assert any(key.endswith("finetune_frozen_backbone_eval") for key in shared)
    assert not any("output_eval" in key or "@" in key for key in shared)
    # within one convention, everything is compared
    assert any(key.endswith("finetune_plain_output_eval@unbiased") for key in torch_like)


def test_a_backend_with_another_variance_update_than_it_declares_disagrees_with_the_others(tmp_path):
    text, agree = _cross_fine_tuning(tmp_path, (NumpyAdapter(), WrongVarianceConvention()), force_passed=True)
    assert not agree and "@unbiased" in text
