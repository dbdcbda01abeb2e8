"""Safe extraction of server-given archives and file names: each bad kind is refused by name."""

import io
import tarfile

import pytest

from tinkerkit.archive import extract_tar, is_archive_name, safe_relative_path
from tinkerkit.errors import CheckpointError


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    tar.addfile(info)


def _archive(path, build, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        _add_file(tar, "adapter_config.json", b'{"r": 4}')  # a good member first
        build(tar)
    return path


def test_a_clean_archive_is_extracted(tmp_path):
    def build(tar):
        info = tarfile.TarInfo("sub")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        _add_file(tar, "./sub/adapter_model.safetensors", b"x" * 100)

    archive = _archive(tmp_path / "adapter.tar.gz", build)
    files = extract_tar(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == [
        "adapter_config.json", "sub/adapter_model.safetensors"]
    assert (tmp_path / "out" / "sub" / "adapter_model.safetensors").read_bytes() == b"x" * 100
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == b'{"r": 4}'


BAD_MEMBERS = {
    "absolute path": (lambda tar: _add_file(tar, "/etc/evil", b"x"),
                      "'/etc/evil' is an absolute path"),
    "dot-dot": (lambda tar: _add_file(tar, "sub/../../evil", b"x"),
                "'sub/../../evil' climbs out of the destination with '..'"),
    "symlink": (lambda tar: _add_special(tar, "link", tarfile.SYMTYPE, "/etc/passwd"),
                "member 'link' is a symbolic link (to '/etc/passwd')"),
    "symlink inside": (lambda tar: _add_special(tar, "link", tarfile.SYMTYPE,
                                                "adapter_config.json"),
                       "member 'link' is a symbolic link (to 'adapter_config.json')"),
    "hardlink": (lambda tar: _add_special(tar, "hard", tarfile.LNKTYPE, "adapter_config.json"),
                 "member 'hard' is a hard link (to 'adapter_config.json')"),
    "character device": (lambda tar: _add_special(tar, "null", tarfile.CHRTYPE),
                         "member 'null' is a device file"),
    "block device": (lambda tar: _add_special(tar, "disk", tarfile.BLKTYPE),
                     "member 'disk' is a device file"),
    "fifo": (lambda tar: _add_special(tar, "pipe", tarfile.FIFOTYPE), "member 'pipe' is a FIFO"),
}


@pytest.mark.parametrize("kind", list(BAD_MEMBERS))
def test_each_bad_member_kind_refuses_the_whole_archive(kind, tmp_path):
    build, message = BAD_MEMBERS[kind]
    archive = _archive(tmp_path / "bad.tar.gz", build)
    with pytest.raises(CheckpointError) as info:
        extract_tar(archive, tmp_path / "out")
    text = str(info.value)
    assert text.startswith("archive bad.tar.gz: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing extracted, not even the good member
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil").exists()


def test_the_declared_sizes_are_bounded(tmp_path):
    archive = _archive(tmp_path / "big.tar", lambda tar: _add_file(tar, "weights", b"0" * 5000),
                       mode="w")
    with pytest.raises(CheckpointError, match="exceed the limit of 4,096 bytes .*'weights'"):
        extract_tar(archive, tmp_path / "out", max_bytes=4096)
    assert not (tmp_path / "out").exists()
    assert len(extract_tar(archive, tmp_path / "out", max_bytes=5008)) == 2


def test_a_file_that_is_not_a_tar_archive_is_a_checkpoint_error(tmp_path):
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not an archive")
    with pytest.raises(CheckpointError, match="archive fake.tar.gz: cannot be extracted"):
        extract_tar(fake, tmp_path / "out")


@pytest.mark.parametrize(("name", "reason"), [
    ("/etc/passwd", "absolute path"), ("C:\\evil", "absolute path"),
    ("\\\\server\\share\\x", "absolute path"), ("a\\..\\..\\b", "backslash"),
    ("a/../../b", "'..'"), ("..", "'..'"), ("", "empty"), ("./.", "names no file"),
    ("a\x00b", "NUL"),
])
def test_unsafe_download_names_are_refused(name, reason):
    with pytest.raises(CheckpointError, match=reason):
        safe_relative_path(name, "checkpoint tinker://run/weights/x")


def test_safe_names_are_normalized():
    assert safe_relative_path("./adapter_model.safetensors", "x").as_posix() == \
        "adapter_model.safetensors"
    assert safe_relative_path("sub/./a.json", "x").as_posix() == "sub/a.json"
    assert [is_archive_name(n) for n in ("a.tar", "A.TGZ", "a.tar.xz", "a.safetensors")] == \
        [True, True, True, False]
