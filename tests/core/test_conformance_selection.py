"""Which adapters ``xnorm conformance`` runs for a ``--backend`` selection, with and without
``--xnorm-only`` (CI's tests leave out the other implementations; the report runs every adapter)."""

import pytest

from xnorm import cli
from xnorm.conformance.adapters import BACKEND_ADAPTERS, OTHER_IMPLEMENTATIONS

XNORM_ADAPTERS = {
    "torch": ["torch", "torch-fused"],
    "mindspore": ["mindspore-graph", "mindspore-pynative", "mindspore-graph-fused"],
    "flax": ["flax-linen", "flax-nnx", "flax-linen-fused", "flax-nnx-fused"],
}


@pytest.fixture
def ran(monkeypatch):
    """The adapters _conformance hands to the runner (nothing runs)."""
    names = []

    def run_adapter(name, args):
        names.append(name)
        return 0

    monkeypatch.setattr(cli, "_run_adapter", run_adapter)
    return names


@pytest.mark.parametrize("backend", sorted(XNORM_ADAPTERS))
def test_xnorm_only_leaves_out_the_other_implementations(ran, backend, tmp_path):
    assert cli.main(["conformance", "--backend", backend, "--xnorm-only", "--jobs", "1",
                     "--results-dir", str(tmp_path)]) == 0
    assert ran == XNORM_ADAPTERS[backend]


@pytest.mark.parametrize("backend", sorted(XNORM_ADAPTERS))
def test_without_it_every_adapter_of_the_backend_runs(ran, backend, tmp_path):
    assert cli.main(["conformance", "--backend", backend, "--jobs", "1", "--results-dir", str(tmp_path)]) == 0
    assert ran == list(BACKEND_ADAPTERS[backend])
    assert set(ran) - set(XNORM_ADAPTERS[backend]) == set(ran) & set(OTHER_IMPLEMENTATIONS)
