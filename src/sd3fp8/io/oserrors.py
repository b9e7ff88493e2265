"""One place where operating-system errors become user errors: the path and the cause in words.

Every read and write of a user's path goes through :func:`os_errors` (or :func:`file_error`), and
outputs are checked with :func:`check_output_file` before minutes of work go into them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from sd3fp8.errors import FileAccessError, SD3FP8Error

CAUSES = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error (a failing disk or a lost network share?)",
    errno.EFBIG: "the file is too large for this file system",
    errno.EMFILE: "too many open files",
    errno.ENXIO: "no such device",
}


def cause(e: OSError) -> str:
    return CAUSES.get(e.errno) or e.strerror or type(e).__name__


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path``'s folders that exists but is a file (``a.png/b.png``)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def file_error(e: OSError, path: str | Path | None, action: str, error: type[SD3FP8Error] = FileAccessError) -> SD3FP8Error:
    """A one-line user error for ``e`` met while doing ``action`` ("read", "write") on ``path``
    (``error``: the type callers expect, e.g. ModelLoadError for model files)."""
    if path is None:
        path = e.filename if e.filename is not None else "a file"
    path = Path(path)
    text = cause(e)
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        blocker = _blocking_file(path)
        if blocker is not None:  # the usual reason: a path component is a file
            text = f"{blocker} is a file, not a folder"
    return error(f"cannot {action} {path}: {text}")


@contextlib.contextmanager
def os_errors(path: str | Path, action: str, error: type[SD3FP8Error] = FileAccessError):
    """Turn any OSError raised in the block into a one-line ``error`` about ``path``."""
    try:
        yield
    except OSError as e:
        raise file_error(e, path, action, error) from None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_file(path: str | Path, needed_bytes: int = 0) -> Path:
    """Fail now, with the reason, if ``path`` cannot be written later: it is a directory, a folder on
    its way is a file, its file system is read-only or not writable, or lacks ``needed_bytes``.

    Nothing is left behind: missing folders are not created here, and the write probe is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise FileAccessError(f"cannot write {path}: it is a directory (give a file name)")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise FileAccessError(f"cannot write {path}: {blocker} is a file, not a folder")
    folder = _nearest_existing(path.parent)
    with os_errors(path, "write"):
        # access() misses read-only mounts for some file systems and root; a real file does not
        fd, probe = tempfile.mkstemp(prefix=".sd3fp8-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise FileAccessError(f"cannot write {path}: it needs {_size(needed_bytes)} and its file system has "
                              f"{_size(free)} free")
    return path


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
