"""The README's porting walkthrough runs as written: its shell commands are copied out of README.md and
run in a shell, in a folder holding a copy of examples/ (as the repository root does), for the backend
installed in this environment (each backend's nox session runs its own lines)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The comment that marks a README command line as one for that backend's environment.
ENVIRONMENT_COMMENT = {"mindspore": "# MindSpore env", "flax": "# JAX env"}


def shell_lines(section_title: str):
    """Every non-empty line of the ```bash blocks of one README section."""
    section = README.read_text().split(section_title, 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines() if line]


@pytest.mark.parametrize("framework", sorted(ENVIRONMENT_COMMENT))
def test_porting_walkthrough_runs_as_written(framework, tmp_path):
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed in this environment; its nox session runs these lines")
    marker = ENVIRONMENT_COMMENT[framework]
    lines = [line for line in shell_lines("## Porting a PyTorch model") if line.endswith(marker)]
    # the generator's port script, the CLI on its file, then the discriminator's port script
    assert [line.split()[0] for line in lines] == ["pip", "xnorm", "pip"], lines
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in lines:
        command = line.split("  #", 1)[0].strip()
        install, sep, rest = command.partition(" && ")
        if sep:
            # The environment already holds these extras (nox installed them): the rest runs as written.
            assert install == f'pip install -e ".[{framework},torch]"', install
            command = rest
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if command.startswith("python -m examples.hifigan.port"):
            assert result.stdout.rstrip().endswith("port OK"), result.stdout
        else:
            assert "wrote hifigan-port/generator." in result.stdout, result.stdout
    suffix = {"mindspore": "ckpt", "flax": "msgpack"}[framework]
    assert (tmp_path / "hifigan-port" / f"generator.{suffix}").stat().st_size > 0
