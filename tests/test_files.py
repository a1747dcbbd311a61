"""files.replacing / write_atomically: the real name holds the old bytes or the new ones, never a mix, and a failed
write leaves no temporary file behind. (Killing a process mid-save: tests/test_train_safety.py.)"""
import pytest

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
