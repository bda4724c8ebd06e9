"""The README's torch quickstart runs as written (it is the first code a user copies)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_torch_quickstart_runs():
    section = README.read_text().split("## Quickstart (torch)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (torch quickstart)", "exec"), namespace)
    conv = namespace["conv"]
    assert type(conv).__name__ == "Conv1d" and not hasattr(conv, "parametrizations")
    assert "scripted" in namespace


def test_readme_spectral_norm_example_runs():
    section = README.read_text().split("## Spectral normalization (torch)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (spectral norm)", "exec"), namespace)
    critic = namespace["critic"]
    assert not any(hasattr(module, "parametrizations") for module in critic.modules())
    assert [type(m).__name__ for m in critic] == ["Conv1d", "LeakyReLU", "Conv1d"]
