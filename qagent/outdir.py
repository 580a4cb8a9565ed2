"""Output folders: make one or fail with one line, and never leave a half-written new one behind.

Every command that writes files (prepare, export, report, render, the store) goes
through :func:`make_output_dir` or :func:`writing_into`, so a folder that is a
file, is not writable, sits on a read-only file system or runs out of space is
reported as ``error: cannot write to ... <folder>: <reason>`` instead of a traceback.
"""

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from qagent.errors import MetaQNNError


class OutputError(MetaQNNError):
    """An output folder cannot be created or written (permissions, read-only, disk full)."""


def os_reason(exc: BaseException) -> str:
    """A short lower-case reason for an OS-level failure: 'no space left on device', 'read-only file system'."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "no space left" in str(exc).lower() or "disk is full" in str(exc).lower():
        return "no space left on device"
    if isinstance(code, int) and code in errno.errorcode:
        return os.strerror(code).lower()
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def make_output_dir(path: Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) and prove it is writable, or raise :class:`OutputError` naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file (or a dangling link is in the way)
        raise OutputError(f"cannot create {what} {path}: a parent is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {os_reason(exc)}") from None
    try:  # root ignores permission bits, so try it instead of asking os.access
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {what} {path}: {os_reason(exc)}") from None
    return path


@contextmanager
def writing_into(path: Path, what: str = "output folder") -> Iterator[Path]:
    """Make ``path`` and turn any OSError raised while writing into it into one line naming it.

    A folder this call created is removed again if the block fails, so a failed
    command leaves nothing half-written behind.
    """
    path = Path(path)
    created = first_missing(path)
    make_output_dir(path, what)
    try:
        yield path
    except OSError as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise OutputError(f"cannot write to {what} {path}: {os_reason(exc)}") from None
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (what mkdir -p would create), if any."""
    missing = None
    for p in [path, *path.parents]:
        if os.path.lexists(str(p)):
            break
        missing = p
    return missing
