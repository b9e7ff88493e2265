"""Atomic file writes: outputs appear complete, with ordinary permissions, or not at all.

The temporary file is ``.<name>.<random>.partial`` beside the destination, and its writer holds an
exclusive lock on it. A writer killed outright (SIGKILL, power loss) cannot remove its partial
file; the next write to the same destination finds it unlocked and removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from sd3fp8.errors import FileAccessError
from sd3fp8.io.oserrors import file_error, os_errors

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so stale partial files are left alone
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _partial_pattern(path: Path) -> re.Pattern:
    # mkstemp's random part: 8 characters of [a-z0-9_]
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.partial")


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove partial files of ``path`` that no live writer holds; returns what was removed."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern, removed = _partial_pattern(path), []
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: another process is writing it right now
        finally:
            os.close(fd)  # closing also drops a lock we took
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Yield a temporary file beside ``path``; on success it is synced and renamed over ``path``,
    on any error (Ctrl-C included) it is removed and ``path`` is left as it was. OS errors become
    one-line user errors naming ``path`` and the cause."""
    path = Path(path)
    if path.is_dir():  # os.replace would blame the temporary file's name
        raise FileAccessError(f"cannot write {path}: it is a directory (give a file name)")
    with os_errors(path, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        if fcntl is not None:  # taken at once: the window an unlocked new file is seen is microseconds
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output is an ordinary file
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename not in (None, tmp):  # raised by the caller about another file (its source)
            raise file_error(e, e.filename, "access") from None
        raise file_error(e, path, "write") from None  # a failed write (full disk) names no file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
