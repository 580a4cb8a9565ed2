"""Paths from the command line, checked once: symlink loops, over-long names, and experiment folders.

Every path option (``--exp``, ``--data-dir``, ``--source``, ``--out``, ``--dest``, compare's files)
goes through :func:`checked_path` (or :func:`resolved_path`), so a symlink loop or a name longer
than the file system allows is one line naming the option, never a traceback from deep inside.

:func:`check_experiment_dir` decides what ``search`` may turn into an experiment folder:

* a folder that does not exist yet (it is created, with its parents), or
* an empty folder, or
* a folder that already holds an experiment: a ``store.sqlite`` (whatever else the experiment
  wrote next to it: ``models/``, ``export/``, ``report/``, ``tensorboard/``, ...; a ``store.sqlite``
  that is not a usable store -- a folder, a FIFO, someone else's database -- is then refused by
  the store itself, naming what it is), or
* a folder holding only what a search killed while creating its store leaves behind
  (``store.sqlite.lock``, ``store.sqlite-wal``, ``store.sqlite-shm``).

Anything else -- a folder with other files and no store, such as ``/etc`` reached by
``--exp ../../etc`` -- is refused before anything is written into it.
"""

import errno
import os
from pathlib import Path
from typing import Union

from qagent.errors import MetaQNNError, quote

STORE_NAME = "store.sqlite"  # the same name as metaqnn.experiment.STORE_NAME (kept import-light here)
# What a search leaves in its folder when it is killed between taking the lock and writing the store.
STORE_REMNANTS = frozenset({STORE_NAME, f"{STORE_NAME}.lock", f"{STORE_NAME}-wal", f"{STORE_NAME}-shm"})
NAME_MAX = 255  # bytes in one path component (Linux file systems)
PATH_MAX = 4096  # bytes in a whole path


class PathError(MetaQNNError):
    """A path argument that cannot be used: a symlink loop, a name too long, not an experiment folder."""


def _name_max(path: Path) -> int:
    """The file system's limit on one name, asked of the nearest existing folder (NAME_MAX if unknown)."""
    for p in [path, *path.parents]:
        try:
            if p.is_dir():
                return int(os.pathconf(str(p), "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return NAME_MAX


def _check_lengths(text: str, path: Path, what: str) -> None:
    if len(os.fsencode(text)) >= PATH_MAX:
        raise PathError(f"{what} {quote(text)}: the path is longer than {PATH_MAX - 1} bytes")
    limit = min(NAME_MAX, _name_max(path.parent if path.parent != path else path))
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise PathError(f"{what} {quote(text)}: the name {quote(part, 60)} is longer than {limit} bytes")


def _loop(what: str, text: str) -> PathError:
    return PathError(f"{what} {quote(text)}: a symbolic link loop (a link that points back at itself)")


def resolved_path(value: Union[str, Path], what: str) -> Path:
    """``value`` made absolute with its links resolved; a loop, an over-long name or an empty path is one line.

    ``what`` names the option in the message (``--data-dir``).  The path need not exist.
    """
    text = str(value)
    if not text.strip():
        raise PathError(f"{what} is empty: give a path")
    if "\0" in text:
        raise PathError(f"{what} {quote(text)}: a path cannot hold a NUL character")
    path = Path(text)
    _check_lengths(text, path, what)
    try:
        resolved = path.resolve()
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise _loop(what, text) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _loop(what, text) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise PathError(f"{what} {quote(text)}: a name in it is too long") from None
        raise PathError(f"{what} {quote(text)}: {os.strerror(exc.errno or 0).lower()}") from None
    _check_lengths(str(resolved), resolved, what)  # links may have made it longer
    try:
        os.stat(str(resolved))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _loop(what, text) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise PathError(f"{what} {quote(text)}: a name in it is too long") from None
        # ENOENT (not there yet), ENOTDIR (a parent is a file), EACCES: the command that uses it says so
    return resolved


def checked_path(value: Union[str, Path], what: str) -> Path:
    """``value`` as given (relative stays relative), after the checks of :func:`resolved_path`."""
    resolved_path(value, what)
    return Path(value)


def is_experiment_dir(path: Path) -> bool:
    """Does ``path`` hold an experiment, or what claims to be one (anything named ``store.sqlite``
    but an empty file)?

    An empty store is what a search killed while creating it leaves; beside anything else (the
    model folders of an experiment whose store was emptied) it would start a new experiment over
    them, so an empty store counts as one of a killed creation's remnants.
    """
    store = Path(path) / STORE_NAME
    if not os.path.lexists(str(store)):
        return False
    try:
        return not (store.is_file() and not store.is_symlink() and store.stat().st_size == 0)
    except OSError:
        return True  # the store names what is wrong with it


def check_experiment_dir(exp_dir: Path, what: str = "--exp") -> Path:
    """``exp_dir`` if ``search`` may create or resume an experiment there, else :class:`PathError`.

    Acceptable: a folder that does not exist, an empty folder, a folder holding a ``store.sqlite``
    (the store checks what it is), or one holding only a killed creation's remnants (``store.sqlite.lock``/``-wal``/``-shm``).
    A file, or a folder with anything else in it, is refused: nothing is written there.
    """
    exp_dir = Path(exp_dir)
    if not os.path.lexists(str(exp_dir)):
        return exp_dir
    if not exp_dir.is_dir():
        raise PathError(f"{what} {exp_dir} is not a folder (an experiment is a folder)")
    if is_experiment_dir(exp_dir):
        return exp_dir
    try:
        entries = sorted(os.listdir(str(exp_dir)))
    except OSError as exc:
        raise PathError(f"cannot read experiment folder {exp_dir}: {os.strerror(exc.errno or 0).lower()}") from None
    others = [e for e in entries if e not in STORE_REMNANTS]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PathError(
            f"{what} {exp_dir} is a folder that is not empty and holds no experiment (no {STORE_NAME}, or an empty one; "
            f"it holds {shown}): give a new or empty folder, or an existing experiment"
        )
    return exp_dir
