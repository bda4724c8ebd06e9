"""Hostile MindSpore .ckpt files (issue 14): truncated, random or damaged protobuf ends in CheckpointFileError
naming the file, quickly, the file unchanged."""

import os
import random
import time

import mindspore
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from xnorm._backends.mindspore.convert import read
from xnorm.errors import CheckpointFileError

SECONDS = 5.0


def _refused(path):
    before = path.read_bytes()
    start = time.perf_counter()
    with pytest.raises(CheckpointFileError) as caught:
        read(path)
    assert time.perf_counter() - start < SECONDS
    assert repr(os.fspath(path)) in str(caught.value), str(caught.value)
    assert path.read_bytes() == before


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    params = [{"name": "w", "data": Parameter(Tensor(np.ones((8, 4), np.float32)), name="w")},
              {"name": "b", "data": Parameter(Tensor(np.zeros(4, np.float32)), name="b")}]
    mindspore.save_checkpoint(params, str(path))
    return path.read_bytes()


def test_truncated_checkpoints(tmp_path, good):
    assert sorted(read_bytes_ok(tmp_path, good)) == ["b", "w"]
    for cut in sorted({1, 2, 8, len(good) // 3, len(good) // 2, len(good) - 8, len(good) - 1}):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(good[:cut])
        _refused(path)


def read_bytes_ok(tmp_path, good):
    path = tmp_path / "ok.ckpt"
    path.write_bytes(good)
    return read(path)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes(tmp_path, seed):
    noise = random.Random(seed)
    path = tmp_path / "noise.ckpt"
    path.write_bytes(b"\x0a" + bytes(noise.randrange(256) for _ in range(2048)))
    _refused(path)


def test_field_declaring_gigabytes(tmp_path):
    path = tmp_path / "huge.ckpt"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 64)  # field 1, length 4 GiB, 64 bytes present
    _refused(path)
