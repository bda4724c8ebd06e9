"""GPU and Ascend cases are selected by device and reported as not run where the device is absent."""

import pytest

from xnorm.conformance.adapters import load_adapter
from xnorm.conformance.adapters.mindspore import _device_available
from xnorm.conformance.cases import LAYERS, Case
from xnorm.conformance.runner import SuiteRun


@pytest.mark.parametrize("device", ["gpu", "ascend"])
@pytest.mark.parametrize("adapter_name", ["mindspore-graph", "mindspore-pynative"])
def test_absent_device_is_not_run(adapter_name, device):
    adapter = load_adapter(adapter_name)
    assert device in adapter.devices
    if _device_available(device):
        pytest.skip(f"{device} is present here: run it with pytest conformance --backend mindspore --device {device}")
    assert not adapter.supports_device(device)
    suite = SuiteRun(adapter, expected_failures=[])
    result = suite.run(Case(LAYERS[0], 0, "float32", device))
    assert result.status == "not-run" and device in result.reason
    # nothing was run, so no check can be reported as passed
    assert result.checks and all(check.state == "not-run" for check in result.checks.values())
