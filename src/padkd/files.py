"""Files padkd writes into a run directory and reads back from it.

Writes never follow a symbolic link planted where padkd writes: a file is replaced whole (written to an
exclusively created temporary file beside it, fsynced, renamed over it, the folder fsynced), so a reader
sees the old file or the new one and a link in its place is replaced, not followed; an append opens the
file with O_NOFOLLOW. Reads are capped by the bytes actually read (a procfs file reports size 0), must
be UTF-8, and fail with one line that names the file and never quotes its content.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from padkd.errors import PadkdError

#: Temporary files of `atomic_write`: `.NAME.tmp-PID-RANDOM` beside the target.
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-")


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut (where the file system can)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory; the rename is still atomic
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace `path` whole with what `write` writes to a binary file: an exclusively created temporary file
    beside it, fsynced, renamed over `path`, the folder fsynced. On any failure `path` is untouched and
    the temporary file removed; a symlink at `path` is replaced, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file of `atomic_write` (of any process)."""
    return _TMP.match(name) is not None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files that a killed writer left in `folder` (their pid no longer runs)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TMP.match(path.name)
        if match is None or _alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_no_follow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open with O_NOFOLLOW; a symlink at `path` is one line naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PadkdError(f"'{path}' is a symbolic link; padkd never writes through a link in a run directory: "
                             "remove the link or choose another output_dir") from None
        raise


def append(path: Path, data: bytes) -> None:
    """Append `data` in one write and fsync; never through a symlink."""
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(folder: Path, prefix: str, suffix: str, data: bytes) -> Path:
    """Write `data` to a new file of a unique name in `folder` (created exclusively: never through a link)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file, at most `limit` of them read: a longer file is one line (its reported
    size is not trusted: procfs files report 0)."""
    if not path.is_file():
        raise PadkdError(f"{what} '{path}' is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PadkdError(f"'{path}' is too large for a {what} (over {limit:,} bytes, the limit); is it the right file?")
    return data


def decode(data: bytes, path: Path, what: str) -> str:
    """UTF-8 text (a leading BOM dropped), or one line naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PadkdError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8 or restore the file") from None


def read_text(path: Path, limit: int, what: str) -> str:
    """`read_bytes` decoded as UTF-8."""
    return decode(read_bytes(path, limit, what), path, what)


def read_json(path: Path, limit: int, what: str) -> Any:
    """A JSON document (at most `limit` bytes), or one line saying where it stops being JSON."""
    text = read_text(path, limit, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise PadkdError(f"{what} '{path}' is not valid JSON{where} (a write that never finished?); "
                         "restore the file or run again") from None
