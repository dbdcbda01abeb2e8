"""Atomic writes and run logs (tinkerkit.files): what a failure or a damaged file leaves behind."""

import os

import pytest

from tinkerkit import files
from tinkerkit.errors import DataError


def test_a_pair_of_files_is_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    train, test = tmp_path / "train_set.json", tmp_path / "test_set.json"
    files.atomic_write_files({train: b"old train\n", test: b"old test\n"})
    fsync = os.fsync
    calls = []

    def fail_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_on_the_second_file)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write_files({train: b"new train\n", test: b"new test\n"})
    assert train.read_bytes() == b"old train\n" and test.read_bytes() == b"old test\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_set.json", "train_set.json"]

    monkeypatch.setattr(os, "fsync", fsync)
    files.atomic_write_files({train: b"new train\n", test: b"new test\n"})
    assert train.read_bytes() == b"new train\n" and test.read_bytes() == b"new test\n"
    assert oct(train.stat().st_mode & 0o777) == oct(files.FILE_MODE)


def test_read_jsonl_skips_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed mid-append
    assert files.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # edited or damaged
    with pytest.raises(DataError, match=r"metrics.jsonl:2: invalid JSON"):
        files.read_jsonl(log)
    log.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: invalid UTF-8 at byte offset 12"):
        files.read_jsonl(log)


def test_a_staged_directory_gets_umask_permissions_even_for_safetensors_files(tmp_path):
    """safetensors' save_file creates 0600 files whatever the umask, so checkpoints and exported
    models were readable by their owner only (a model server running as another user could not
    load an export); a staged directory's entries now get the umask's permissions."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        target = tmp_path / "export"
        with files.atomic_directory(target) as staging:
            save_file({"a": torch.zeros(2)}, staging / "model.safetensors")
            (staging / "sub").mkdir(mode=0o700)
            save_file({"b": torch.ones(1)}, staging / "sub" / "adapter_model.safetensors")
            (staging / "note.txt").write_text("x")
            os.chmod(staging / "note.txt", 0o600)
    finally:
        os.umask(old)
    modes = {p.relative_to(target).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in sorted(target.rglob("*"))}
    assert modes == {"model.safetensors": oct(files.FILE_MODE), "note.txt": oct(files.FILE_MODE),
                     "sub": oct(files.DIR_MODE),
                     "sub/adapter_model.safetensors": oct(files.FILE_MODE)}


def test_atomic_file_replaces_the_target_only_when_the_writer_finishes(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_file(target) as staged:
        assert staged.parent == tmp_path and staged.suffix == ".gguf" and staged != target
        staged.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]

    with files.atomic_file(target) as staged:
        staged.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert target.stat().st_mode & 0o777 == files.FILE_MODE
