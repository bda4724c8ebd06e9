"""The README's MindSpore quickstart runs as written: graph-mode training, remove, MINDIR export."""

import re
import runpy
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_mindspore_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet exports net.mindir into the working directory
    section = README.read_text().split("## Quickstart (MindSpore, graph mode)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # A real file: mindspore.jit reads the source of the functions it compiles.
    script = tmp_path / "readme_quickstart.py"
    script.write_text(code)
    namespace = runpy.run_path(str(script), run_name="readme_quickstart")
    net, x = namespace["net"], namespace["x"]
    assert [p.name for p in net.trainable_params()] == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    assert (tmp_path / "net.mindir").is_file()
    np.testing.assert_array_equal(namespace["reloaded"](x).asnumpy(), net(x).asnumpy())


def test_readme_mindspore_orthogonal_example_runs(tmp_path, capsys):
    section = README.read_text().split("## Orthogonal parametrization", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"```python\n(.*?)```", section, re.S) if "mindspore" in code]
    assert len(blocks) == 1
    script = tmp_path / "readme_orthogonal.py"
    script.write_text(blocks[0])
    namespace = runpy.run_path(str(script), run_name="readme_orthogonal")
    assert capsys.readouterr().out.split() == ["True"]
    plain, w = namespace["plain"], namespace["w"]
    assert sorted(p.name for p in plain.get_parameters()) == ["weight"]
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(plain.weight.asnumpy(), w)


def test_readme_mindspore_freeze_example_runs(tmp_path):
    import xnorm

    section = README.read_text().split("## Freezing BatchNorm statistics", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"```python\n(.*?)```", section, re.S) if "mindspore" in code]
    assert len(blocks) == 1
    script = tmp_path / "readme_freeze.py"
    script.write_text(blocks[0])
    namespace = runpy.run_path(str(script), run_name="readme_freeze")
    backbone = namespace["backbone"]
    assert not xnorm.is_frozen(backbone) and backbone[1].use_batch_statistics is None
    assert abs(backbone[1].momentum - 0.1) < 1e-6  # MindSpore stores 1 - momentum for its primitive
