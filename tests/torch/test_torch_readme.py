"""The README's torch examples run as written (the first code a user copies)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _run_section(title: str) -> dict:
    """Run the first ```python block under README heading ``title``; returns its namespace."""
    section = README.read_text().split(title, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, f"README.md ({title})", "exec"), namespace)
    return namespace


def test_readme_torch_quickstart_runs():
    namespace = _run_section("## Quickstart (torch)")
    conv = namespace["conv"]
    assert type(conv).__name__ == "Conv1d" and not hasattr(conv, "parametrizations")
    assert "scripted" in namespace


def test_readme_spectral_norm_example_runs():
    critic = _run_section("## Spectral normalization (torch)")["critic"]
    assert not any(hasattr(module, "parametrizations") for module in critic.modules())
    assert [type(m).__name__ for m in critic] == ["Conv1d", "LeakyReLU", "Conv1d"]


def test_readme_orthogonal_example_runs(capsys):
    namespace = _run_section("## Orthogonal parametrization")
    assert capsys.readouterr().out.strip() == "True"
    rotation = namespace["rotation"]
    assert not hasattr(rotation, "parametrizations") and type(rotation).__name__ == "Linear"
    w = rotation.weight.detach()
    assert torch.allclose(w.T @ w, torch.eye(8), atol=1e-5)


def test_readme_freeze_example_runs():
    section = README.read_text().split("## Freezing BatchNorm statistics", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"```python\n(.*?)```", section, re.S)
              if not any(name in code for name in ("mindspore", "flax", "jax"))]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (freeze, torch)", "exec"), namespace)
    backbone = namespace["backbone"]
    assert not namespace["xnorm"].is_frozen(backbone) and backbone[1].training
