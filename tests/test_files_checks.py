"""Atomic writes: permissions of new and replaced files, the umask, folders made for a write
that fails early, fsync, and safetensors bytes with a sorted, padded header."""
import json
import os

import pytest
import torch

from qround import files
from qround.errors import QroundError


def process_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write(path, data=b"new", **kwargs):
    with files.atomic_write(path, **kwargs) as f:
        f.write(data)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_umask_is_the_processes(mask):
    old = os.umask(mask)
    try:
        assert files._umask() == mask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_new_file_gets_0666_less_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write(tmp_path / "new.bin")
        write(tmp_path / "sub" / "t.txt", "text", binary=False, make_folder=True)
    finally:
        os.umask(old)
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "sub" / "t.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "sub" / "t.txt").read_text() == "text"


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode):
    path = tmp_path / "old.bin"
    path.write_bytes(b"old")
    path.chmod(mode)
    write(path)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == mode


def test_the_data_is_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.path.exists(tmp_path / "out.bin"))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    write(tmp_path / "out.bin")
    assert calls == [False]      # once, and before the target appeared


def test_a_failed_temp_file_removes_the_folders_it_made(tmp_path, monkeypatch):
    def no_temp(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(files.tempfile, "mkstemp", no_temp)
    with pytest.raises(QroundError, match="cannot write file .*Too many open files"):
        write(tmp_path / "a" / "b" / "out.bin", make_folder=True)
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(QroundError, match="Too many open files"):
        write(tmp_path / "kept" / "c" / "out.bin", make_folder=True)
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_an_error_in_the_block_keeps_the_old_file_and_names_oserrors(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(QroundError, match="cannot write report .*f.bin.*boom"):
        with files.atomic_write(path, what="report") as f:
            f.write(b"half")
            raise OSError("boom")
    with pytest.raises(KeyError):
        with files.atomic_write(path) as f:
            raise KeyError("not an OSError: passes as it is")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_missing_folders_are_listed_deepest_first(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert files.missing_folders(deep) == [str(deep), str(deep.parent), str(tmp_path / "a")]
    assert files.missing_folders(tmp_path) == []


def test_safetensors_header_is_sorted_and_padded():
    import safetensors.torch

    tensors = {f"t{i}": torch.arange(i + 1, dtype=torch.float32) for i in (3, 1, 2, 0)}
    metadata = {f"key{i:02d}": str(i) for i in range(40, 0, -1)}
    for extra in range(8):     # header lengths of each remainder mod 8
        meta = dict(metadata, pad="x" * extra)
        data = files.safetensors_bytes(tensors, meta)
        size = int.from_bytes(data[:8], "little")
        assert size % 8 == 0
        text = data[8:8 + size].decode()
        header = json.loads(text)
        assert text.rstrip(" ") == json.dumps(header, sort_keys=True, separators=(",", ":"))
        assert list(header["__metadata__"]) == sorted(meta)
        loaded = safetensors.torch.load(data)
        assert set(loaded) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v)
        assert data == files.safetensors_bytes(dict(reversed(tensors.items())),
                                               dict(reversed(meta.items())))
