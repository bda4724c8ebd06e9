"""Hostile torch checkpoints (issue 14): pickles that would run code, zip archives that are truncated or
declare gigabytes, random bytes; each ends in CheckpointFileError naming the file, runs nothing, quickly."""

import io
import os
import pickle
import struct
import time
import zipfile

import pytest
import torch

from xnorm._backends.torch.convert import read
from xnorm.errors import CheckpointFileError

SECONDS = 3.0


class _Payload:
    """Unpickled, it would create the marker file: the proof that nothing ran is that the file is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refused(path, *phrases):
    before = path.read_bytes()
    start = time.perf_counter()
    with pytest.raises(CheckpointFileError) as caught:
        read(path)
    assert time.perf_counter() - start < SECONDS
    message = str(caught.value)
    assert repr(os.fspath(path)) in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert path.read_bytes() == before
    return message


def _tensors_zip(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(64), "b": torch.zeros(3)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_reduce_payload_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    if legacy:
        path.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    else:
        torch.save({"w": _Payload(marker)}, path)
    # the message names the global torch refused (torch 2.13 words a blocked module differently)
    _refused(path, "holds objects other than tensors", "refused the pickled object posix.system")
    assert not marker.exists()


def test_global_outside_the_allow_list_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').close()"
    # GLOBAL builtins.exec, then exec(code): a hand-written pickle, no class of ours involved
    payload = b"\x80\x02cbuiltins\nexec\nX" + struct.pack("<I", len(code)) + code.encode() + b"\x85R."
    path = tmp_path / "exec.pt"
    path.write_bytes(payload)
    _refused(path, "refused the pickled object")
    assert not marker.exists()


def test_truncated_zip_at_many_points(tmp_path):
    data = _tensors_zip(tmp_path)
    for cut in sorted({2, 4, 30, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1}):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        _refused(path, "truncated or corrupt")


def test_random_bytes_after_a_zip_signature(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    _refused(path, "truncated or corrupt")


def _with_record_size(data, suffix, declared, compress):
    """The archive with the record ending in ``suffix`` rewritten (deflated if ``compress``) and its declared
    uncompressed size patched to ``declared`` in both of the zip's headers."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            kind = zipfile.ZIP_DEFLATED if compress and info.filename.endswith(suffix) else zipfile.ZIP_STORED
            archive.writestr(info, source.read(info.filename), compress_type=kind)
    blob = bytearray(out.getvalue())
    name = next(i.filename for i in source.infolist() if i.filename.endswith(suffix)).encode()
    for signature, name_at, header, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        at = blob.find(signature)
        while at >= 0:
            length = struct.unpack_from("<H", blob, at + name_at)[0]
            if bytes(blob[at + header:at + header + length]) == name:
                struct.pack_into("<I", blob, at + size_at, declared)
            at = blob.find(signature, at + 4)
    return bytes(blob)


@pytest.mark.parametrize("suffix, compress", [("data.pkl", True), ("data/0", True), ("data/0", False)],
                         ids=["compressed pickle", "compressed storage", "stored storage past the file"])
def test_zip_bomb_is_refused_before_torch_allocates_it(tmp_path, monkeypatch, suffix, compress):
    path = tmp_path / "bomb.pt"
    path.write_bytes(_with_record_size(_tensors_zip(tmp_path), suffix, 0xFFFFFFF0, compress))

    def never(*args, **kwargs):
        raise AssertionError("torch.load reached: it allocates the declared 4 GiB before reading")

    monkeypatch.setattr(torch, "load", never)
    _refused(path, "declares 4294967280 bytes", "zip bomb")


def test_real_zip_bomb_is_refused(tmp_path, monkeypatch):
    """A deflated record that would really expand to 64 MiB, the way a zip bomb is made."""
    data = _tensors_zip(tmp_path)
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            body = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                body += b"\0" * (64 * 2**20)  # the unpickler stops at STOP: trailing bytes are never read
            archive.writestr(info.filename, body, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    path = tmp_path / "bomb.pt"
    path.write_bytes(out.getvalue())
    assert path.stat().st_size < 2 * 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    _refused(path, "compressed", "zip bomb")


def test_legacy_storage_declaring_gigabytes_is_refused(tmp_path):
    """The pre-1.6 format declares each storage's size in the pickle; torch allocates it (virtual memory, not
    touched) before reading, then finds the file too short: refused, quickly."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(70000)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    at = data.find(b"J" + struct.pack("<i", 70000))
    assert at > 0
    struct.pack_into("<i", data, at + 1, 0x7FFFFFFF)
    path.write_bytes(bytes(data[:5000]))
    _refused(path, "truncated or corrupt")


def test_valid_checkpoints_still_read(tmp_path):
    path = tmp_path / "ok.pt"
    path.write_bytes(_tensors_zip(tmp_path))
    assert sorted(read(path)) == ["b", "w"]
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert sorted(read(path)) == ["w"]
