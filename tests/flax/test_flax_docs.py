"""The Python snippets of docs/flax.md run (the README quickstart among them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "flax.md"


def snippets():
    text = DOC.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs():
    blocks = snippets()
    assert blocks, "docs/flax.md has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[-1], f"{DOC}:quickstart", "exec"), namespace)  # noqa: S102
    assert "plain_layer" in namespace and "plain_variables" in namespace


@pytest.mark.parametrize("index", [0, 1, 2])
def test_short_snippets_run_after_the_quickstart(index):
    blocks = snippets()
    namespace: dict = {}
    exec(compile(blocks[-1], f"{DOC}:quickstart", "exec"), namespace)  # noqa: S102
    namespace.update(
        key=namespace["jax"].random.key(0),
        variables=namespace["dense_variables"],
        wrapped_variables=namespace["variables"],
    )
    exec(compile(blocks[index], f"{DOC}:snippet{index}", "exec"), namespace)  # noqa: S102


def test_readme_orthogonal_example_runs(capsys):
    readme = DOC.parents[1] / "README.md"
    section = readme.read_text().split("## Orthogonal parametrization", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "flax" in code]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], f"{readme}:orthogonal", "exec"), namespace)  # noqa: S102
    assert capsys.readouterr().out.split() == ["True"]
    import numpy as np
    from flax import nnx

    plain, w = namespace["plain"], namespace["w"]
    assert type(plain) is nnx.Linear
    np.testing.assert_array_equal(np.asarray(plain.kernel.get_value()), w)
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)


def test_freeze_doc_examples_run():
    """docs/freeze.md's Flax examples (NNX in place; linen with optax labels): each asserts what it shows."""
    text = (DOC.parent / "freeze.md").read_text()
    blocks = [code for code in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if re.search(r"^from flax\b", code, re.M)]
    assert len(blocks) == 2
    for number, code in enumerate(blocks):
        exec(compile(code, f"docs/freeze.md (Flax python block {number})", "exec"), {})  # noqa: S102


def test_readme_freeze_example_runs():
    import xnorm

    readme = DOC.parents[1] / "README.md"
    section = readme.read_text().split("## Freezing BatchNorm statistics", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if re.search(r"^from flax\b", code, re.M)]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (freeze, Flax)", "exec"), namespace)  # noqa: S102
    bn = namespace["bn"]
    assert not xnorm.is_frozen(namespace["model"]) and type(bn).__name__ == "BatchNorm"
    assert abs(bn.momentum - 0.9) < 1e-12  # torch's 0.1, translated
