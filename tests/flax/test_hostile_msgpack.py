"""Hostile Flax .msgpack files, and `xnorm convert` killed while it writes (issue 14).

Every malformed file ends in CheckpointFileError (a file that decodes but holds no mapping of arrays: the
documented ConversionError) naming the file, quickly, with the output path untouched. The crash test kills
the CLI with SIGKILL at random points of its write and finds the output either as it was or complete."""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest
from flax import serialization

from xnorm import porting
from xnorm._backends.flax.convert import read
from xnorm.errors import CheckpointFileError, ConversionError

SECONDS = 3.0


def _array(shape, dtype="float32", data=None):
    data = np.zeros(shape, dtype).tobytes() if data is None else data
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype, data)))  # flax.serialization's ndarray


GOOD = serialization.msgpack_serialize({"params": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3)}})

ATTACKS = {
    "empty file": (b"", CheckpointFileError),
    "random bytes": (bytes(random.Random(0).randrange(256) for _ in range(4096)), CheckpointFileError),
    "maps nested 100000 deep": (b"\x81\xa1a" * 100_000 + b"\x80", CheckpointFileError),
    "lists nested 100000 deep": (b"\x81\xa1a" + b"\x91" * 100_000 + b"\x90", CheckpointFileError),
    "maps nested just past Python's stack": (b"\x81\xa1a" * 1000 + b"\x80", CheckpointFileError),
    "map declaring 2**32 entries": (b"\xdf\xff\xff\xff\xff", CheckpointFileError),
    "array declaring 2**32 items": (b"\x81\xa1a\xdd\xff\xff\xff\xff", CheckpointFileError),
    "bytes declaring 4 GiB": (b"\x81\xa1a\xc6\xff\xff\xff\xff", CheckpointFileError),
    "array of object dtype": (msgpack.packb({"a": _array((2,), "object", b"\0" * 16)}), CheckpointFileError),
    "array shape past its bytes": (msgpack.packb({"a": _array((2**40, 2**40), data=b"\0" * 16)}),
                                   CheckpointFileError),
    "array with an unknown dtype": (msgpack.packb({"a": _array((2,), "float7", b"\0" * 8)}), CheckpointFileError),
    "trailing bytes": (GOOD + b"\x00", CheckpointFileError),
    "top level is a list": (msgpack.packb([1, 2]), ConversionError),
    "top level is a string": (msgpack.packb("params"), ConversionError),
    "leaves are not arrays": (msgpack.packb({"params": {"kernel": [1.0, 2.0]}}), ConversionError),
    "integer keys": (msgpack.packb({1: 2}), ConversionError),
}


def _refused(path, error_class):
    before = path.read_bytes()
    start = time.perf_counter()
    with pytest.raises(error_class) as caught:
        read(path)
    assert time.perf_counter() - start < SECONDS
    assert repr(os.fspath(path)) in str(caught.value), str(caught.value)
    assert path.read_bytes() == before
    return str(caught.value)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_named_attack_is_refused(tmp_path, attack):
    data, error_class = ATTACKS[attack]
    path = tmp_path / "hostile.msgpack"
    path.write_bytes(data)
    _refused(path, error_class)


def test_truncation_at_every_byte(tmp_path):
    for cut in range(len(GOOD)):
        path = tmp_path / f"cut{cut}.msgpack"
        path.write_bytes(GOOD[:cut])
        _refused(path, CheckpointFileError)


def test_refused_source_leaves_the_output_and_the_target_unchanged(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    source = tmp_path / "bad.msgpack"
    source.write_bytes(GOOD[: len(GOOD) // 2])
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"previous")
    like = torch.nn.Linear(4, 3)
    state = {k: v.clone() for k, v in like.state_dict().items()}
    with pytest.raises(CheckpointFileError, match="bad.msgpack"):
        porting.convert(str(source), to="torch", like=like, load=True)
    from xnorm import cli

    status = cli.main(["convert", str(source), "--to", "torch", "--like", "torch.nn:Linear", "--like-arg",
                       "in_features=4", "--like-arg", "out_features=3", "-o", str(output), "--quiet"])
    assert status != 0 and "bad.msgpack' cannot be read" in capsys.readouterr().err
    assert output.read_bytes() == b"previous"
    assert all(torch.equal(state[k], v) for k, v in like.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.msgpack", "out.safetensors"]


# -- SIGKILL during the write ---------------------------------------------------------------------------------

# The child writes the safetensors file 64 KiB at a time, reports each chunk on stdout and waits for the
# parent's go-ahead on stdin before the next (and after the close, before the rename), so the parent kills it
# at a chosen byte of the write whatever the load on the machine; everything else is the real `xnorm convert`.
CHILD = textwrap.dedent(
    """
    import sys, time
    import xnorm.checkpoint_files as files

    class Slow:
        def __init__(self, f):
            self.f, self.done = f, 0
        def write(self, data):
            data = memoryview(data).cast("B")
            for at in range(0, len(data), 65536):
                self.f.write(data[at:at + 65536])
                self.f.flush()
                self.done += len(data[at:at + 65536])
                print("wrote", self.done, flush=True)
                sys.stdin.readline()
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.__exit__(*exc)
            print("closing", flush=True)
            sys.stdin.readline()  # between the last byte and the rename: a kill here must leave the old file

    def slow_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return Slow(f) if "w" in mode else f

    files.open = slow_open
    from xnorm.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)

PARTIAL = re.compile(r"^\.out\.xnorm-partial-\d+\.safetensors$")


def test_sigkill_during_the_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "big.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(512, 512)\n")
    rng = np.random.default_rng(0)
    variables = {"params": {"kernel": rng.standard_normal((512, 512)).astype(np.float32),
                            "bias": rng.standard_normal(512).astype(np.float32)}}
    source = tmp_path / "source.msgpack"
    source.write_bytes(serialization.msgpack_serialize(variables))
    previous = b"the previous output, which a crash must leave as it was"

    def command(folder):
        return [sys.executable, str(tmp_path / "child.py"), "convert", str(source), "--to", "torch", "--like",
                "big:build", "-o", str(folder / "out.safetensors"), "--quiet"]

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    picker = random.Random(14)  # the kill points: random, and the same on every run
    total = 512 * 513 * 4
    targets = sorted(picker.randrange(1, total) for _ in range(3)) + [total]  # the last: written, not renamed
    # every child at once: each spends seconds importing torch and JAX, and they share nothing
    children = []
    for i, target in enumerate(targets):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        if i % 2 == 0:  # half the runs overwrite an older output, half write where there was none
            (folder / "out.safetensors").write_bytes(previous)
        child = subprocess.Popen(command(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=env, cwd=folder, text=True)
        children.append((folder, target, child))

    for folder, target, child in children:
        killed_at = None
        for line in child.stdout:
            word, _, number = line.partition(" ")
            if word == "closing" or (word == "wrote" and int(number) >= target):
                child.send_signal(signal.SIGKILL)
                killed_at = line.strip()
                break
            child.stdin.write("\n")  # the next chunk
            child.stdin.flush()
        child.wait(timeout=120)
        assert killed_at is not None and child.returncode == -signal.SIGKILL, (folder, child.returncode)
        folder.joinpath("killed_at").write_text(killed_at)

    # The complete output, and the reruns below, from the CLI in this process (which has imported torch and
    # JAX already); only the killed runs need processes of their own.
    from xnorm import cli

    monkeypatch.syspath_prepend(str(tmp_path))
    complete = tmp_path / "complete"
    complete.mkdir()
    assert cli.main(command(complete)[2:]) == 0
    new = (complete / "out.safetensors").read_bytes()
    assert len(new) > total
    left_over = []
    for folder, _target, _ in children:
        out = folder / "out.safetensors"
        where = f"{folder.name}, killed at {(folder / 'killed_at').read_text()} of {len(new)}"
        if out.exists():
            assert out.read_bytes() in (previous, new), where
        leftovers = [p for p in folder.iterdir() if p.name not in ("out.safetensors", "killed_at")]
        for leftover in leftovers:
            assert PARTIAL.match(leftover.name), (where, leftover.name)
            if len(leftover.read_bytes()) < len(new):  # a partial file never reads as a checkpoint
                with pytest.raises(CheckpointFileError):
                    porting.read_safetensors(leftover)
        left_over += [folder] if leftovers else []
    assert left_over, "no kill left a temporary file: the kill points missed the write"
    # the next conversion writes the complete output whatever was left next to it
    for folder in left_over:
        assert cli.main(command(folder)[2:]) == 0
        assert (folder / "out.safetensors").read_bytes() == new
