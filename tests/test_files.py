"""files.replacing / write_atomically: the real name holds the old bytes or the new ones, never a mix, and a failed
write leaves no temporary file behind. (Killing a process mid-save: tests/test_train_safety.py.)"""
import os

import pytest
import torch
from safetensors.torch import save_file

from ldm_scratch.files import replacing, write_atomically


def test_a_successful_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt          # Ctrl-C in the middle of the writer
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_new_file_has_the_permissions_of_a_plain_write(tmp_path):
    """safetensors' save_file creates its file with mode 0o600; a model we write is readable like any other file."""
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.safetensors"
        with replacing(fresh) as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.safetensors"        # replacing a file keeps that file's mode
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        write_atomically(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_umask)
