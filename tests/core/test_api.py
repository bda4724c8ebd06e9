"""The public API with no framework involved: imports, backend listing and errors."""

import subprocess
import sys

import pytest

import xnorm
from xnorm import registry


def test_import_xnorm_imports_no_framework():
    code = (
        "import sys, xnorm, xnorm.reference, xnorm.spec; xnorm.backends(); xnorm.is_wrapped(object()); "
        "xnorm.is_frozen(object()); xnorm.batchnorm.equivalent_batchnorm_settings('torch', 'flax', 0.1, 1e-5); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'mindspore', 'jax', 'jaxlib', 'flax', 'optax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_lists_every_backend_with_install_hint():
    rows = {row.name: row for row in xnorm.backends()}
    assert set(rows) >= {"torch", "mindspore", "flax"}
    for row in rows.values():
        assert row.install.startswith("pip install")
        assert row.installed == all(v is not None for v in row.versions.values())
        assert row.name in str(row)


@pytest.fixture
def missing_backend():
    registry.register_backend(
        "ghost", "xnorm_tests_ghost_backend", "GhostBackend", frameworks=("xnorm_tests_ghost_framework",), extra="ghost"
    )
    yield "ghost"
    registry._ENTRIES.pop("ghost")


def test_backend_whose_framework_is_missing_says_what_to_install(missing_backend):
    with pytest.raises(xnorm.BackendNotInstalledError, match=r'pip install "xnorm\[ghost\]"') as info:
        xnorm.wrap(object(), backend=missing_backend)
    assert isinstance(info.value, ImportError)
    row = next(r for r in xnorm.backends() if r.name == "ghost")
    assert not row.installed and "not installed" in str(row)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(xnorm.UnknownBackendError, match="torch") as info:
        xnorm.wrap(object(), backend="tensorflow")
    assert isinstance(info.value, ValueError)


def test_an_object_no_backend_owns_is_a_detection_error():
    class NotALayer:
        weight = [1.0, 2.0]

    layer = NotALayer()
    with pytest.raises(xnorm.BackendDetectionError, match="NotALayer") as info:
        xnorm.wrap(layer)
    assert isinstance(info.value, TypeError)
    assert layer.weight == [1.0, 2.0]
    with pytest.raises(xnorm.BackendDetectionError):
        xnorm.remove(layer)
    assert xnorm.is_wrapped(layer) is False
    for call in (xnorm.freeze, xnorm.unfreeze):
        with pytest.raises(xnorm.BackendDetectionError):
            call(layer)
    assert xnorm.is_frozen(layer) is False


def test_negative_eps_is_rejected_before_any_backend_is_touched():
    with pytest.raises(xnorm.OptionError):
        xnorm.wrap(object(), eps=-1e-3)


def test_every_error_is_an_xnorm_error():
    for name in xnorm.errors.__all__:
        assert issubclass(getattr(xnorm, name), xnorm.XnormError)


@pytest.mark.parametrize("layers", [42, "(", (), ("bn",), [1.0]])
def test_bad_layers_values_are_refused_before_any_backend_is_touched(layers):
    with pytest.raises(xnorm.OptionError, match="layers="):
        xnorm.freeze(object(), layers=layers)
