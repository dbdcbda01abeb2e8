"""Atomic file writing: nothing already written is lost when a process dies mid-write.

Every file tinkerkit writes goes through these helpers: the bytes go to a temporary file in the
same directory, are flushed and fsynced, and the temporary file is renamed over the target
(``os.replace`` is atomic on POSIX). Directories (checkpoints, exports) are staged in a temporary
sibling and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tinkerkit.errors import DataError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; give written files and directories the
# permissions an ordinary open()/mkdir() would have under the process umask.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, flush, fsync, rename)."""
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files that belong together (a train/test split) as atomically as POSIX allows.

    Every file is first written completely to a temporary file beside its target (flush, fsync);
    only then are they renamed into place, one ``os.replace`` after the other. A crash while the
    data is written leaves every target as it was; only a crash between two renames (no data is
    written there) can leave some targets new and some old.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for parent in dict.fromkeys(path.parent for _, path in staged):
        _fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    """``obj`` as the JSON tinkerkit writes: UTF-8, non-ASCII kept, trailing newline."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (see :func:`json_bytes`) to ``path`` atomically."""
    atomic_write_bytes(path, json_bytes(obj, indent))


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line to ``path`` and fsync it.

    A crash can at worst leave a final line without its newline; :func:`read_jsonl` ignores such a
    torn last line, so a reader never sees a half-written record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read the complete lines of a JSON Lines file written by :func:`append_jsonl`.

    A last line without a trailing newline (a torn append) is ignored; missing file -> ``[]``.

    Raises:
        DataError: A complete line is not UTF-8 JSON (the file was edited or damaged); the
            message names the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte offset {e.start}", path=str(path)) from None
    complete = text.split("\n")[:-1]  # the part after the last "\n" is either "" or a torn line
    records = []
    for n, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=str(path),
                            line=n) from None
    return records


def read_json(path: str | os.PathLike) -> Any:
    """Read a UTF-8 JSON file (a byte-order mark is accepted)."""
    return json.loads(Path(path).read_text(encoding="utf-8-sig"))


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace a JSON Lines file atomically with ``records``."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Stage one large file that a writer streams to a path, and rename it into place.

    Yields a temporary path beside ``target`` for the writer to create and fill (a GGUF file, for
    one); when the block completes the file is fsynced, given the umask's permissions and renamed
    over ``target``; on failure it is removed and ``target`` is untouched. The temporary name keeps
    the target's extension (``.model-q8_0.x1y2.tmp.gguf``), for readers that go by it.

    Example::

        with atomic_file("exports/model-q8_0.gguf") as tmp:
            write_everything_to(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}",
                               dir=target.parent)
    os.close(fd)
    staged = Path(tmp)
    try:
        yield staged
        os.chmod(staged, FILE_MODE)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Stage a directory and move it into place only when the block completes.

    Yields a temporary sibling directory to fill. On success, an existing ``target`` is replaced
    (moved aside, then deleted) and the staged directory renamed to ``target``; on failure the
    staged directory is removed and ``target`` is untouched.

    Example::

        with atomic_directory(run_dir / "checkpoints" / "step_000100") as tmp:
            save_file(tensors, tmp / "adapter_model.safetensors")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, DIR_MODE)
    try:
        yield staging
        for child in staging.rglob("*"):
            if child.is_symlink():
                continue
            if child.is_file():
                # safetensors' save_file creates its files 0600 whatever the umask: a checkpoint
                # or an exported model would be unreadable to a server running as another user
                os.chmod(child, FILE_MODE)
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
            elif child.is_dir():
                os.chmod(child, DIR_MODE)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
