"""Safe handling of file names and archives that a server handed us.

A Tinker server names the files of a downloaded checkpoint, and may ship them as a tar archive;
neither name nor archive is trusted. :func:`safe_relative_path` accepts only a plain relative path
inside the destination, and :func:`extract_tar` checks every member of a tar archive (optionally
gzip/bz2/xz compressed) before anything is written:

* no absolute path (``/etc/passwd``, ``C:\\x``, ``\\\\server\\share``) and no ``..`` component;
* regular files and directories only: symbolic links, hard links, character and block devices
  and FIFOs are refused, wherever they point;
* the sizes the members declare add up to at most ``max_bytes`` (tar writes exactly the declared
  size of each file, so this bounds the bytes written, whatever the compression ratio).

One bad member refuses the whole archive, with a one-line :class:`~tinkerkit.errors.CheckpointError`
naming the archive, the member and the reason. The extraction itself then runs with the standard
library's ``filter="data"`` (PEP 706) as a second line of defense.

Example::

    extract_tar(Path("adapter.tar.gz"), Path("out"), max_bytes=2**30)
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tinkerkit.errors import CheckpointError

MAX_EXTRACTED_BYTES = 64 * 2**30
"""Default ceiling on the bytes one archive (or one download) may write: 64 GiB, above any LoRA
adapter of the models Tinker serves, far below what a decompression bomb asks for."""

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive_name(name: str) -> bool:
    """Whether a file name is one of the tar archive kinds :func:`extract_tar` opens."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_relative_path(name: str, where: str) -> PurePosixPath:
    """Validate a server-given file name as a path strictly inside a destination directory.

    Args:
        name: The name, ``/``-separated (a tar member name, a key of a download listing).
        where: What the name came from, for the error message.

    Returns:
        The normalized relative path (``.`` components dropped).

    Raises:
        CheckpointError: Empty, absolute (POSIX root, Windows drive or UNC share), holding a
            backslash, a NUL byte or a ``..`` component, or naming the destination itself.
    """
    if not name or "\x00" in name:
        raise CheckpointError(f"{where}: an empty or NUL-holding file name is refused")
    if name.startswith("/") or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise CheckpointError(f"{where}: '{name}' is an absolute path; refused")
    if "\\" in name:
        raise CheckpointError(f"{where}: '{name}' holds a backslash; refused")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if ".." in parts:
        raise CheckpointError(f"{where}: '{name}' climbs out of the destination with '..'; "
                              "refused")
    if not parts:
        raise CheckpointError(f"{where}: '{name}' names no file; refused")
    return PurePosixPath(*parts)


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What is wrong with a member's type, or None for a regular file or a directory."""
    if member.issym():
        return f"a symbolic link (to '{member.linkname}')"
    if member.islnk():
        return f"a hard link (to '{member.linkname}')"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if not (member.isfile() or member.isdir()):
        return "a special file"
    return None


def check_tar_members(archive: Path, members: list[tarfile.TarInfo], max_bytes: int) -> int:
    """Check every member as the module docstring says; returns the bytes they declare.

    Raises:
        CheckpointError: The first member that breaks a rule, or the total size above
            ``max_bytes``.
    """
    total = 0
    for member in members:
        where = f"archive {archive.name}: member '{member.name}'"
        safe_relative_path(member.name, f"archive {archive.name}")
        kind = _member_kind(member)
        if kind is not None:
            raise CheckpointError(f"{where} is {kind}; links and special files are refused")
        total += member.size
        if total > max_bytes:
            raise CheckpointError(f"archive {archive.name}: its files exceed the limit of "
                                  f"{max_bytes:,} bytes (at member '{member.name}'); refused")
    return total


def extract_tar(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACTED_BYTES) -> list[Path]:
    """Extract a tar archive into ``dest`` after checking all of its members.

    Args:
        archive: The ``.tar`` file (gzip, bzip2 or xz compression is detected).
        dest: The directory to extract into (created if missing).
        max_bytes: Ceiling on the sum of the member sizes.

    Returns:
        The extracted regular files, as paths under ``dest``.

    Raises:
        CheckpointError: Not a readable tar archive, or a member breaks a rule (nothing is
            extracted then).
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            check_tar_members(archive, members, max_bytes)
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CheckpointError(f"archive {archive.name}: cannot be extracted: {e}") from e
    return [dest / member.name for member in members if member.isfile()]
