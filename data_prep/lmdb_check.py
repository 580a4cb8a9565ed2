"""Integrity checks of an LMDB that are safe to run on a broken one.

LMDB memory-maps ``data.mdb`` and trusts it: a truncated file kills the reader
with SIGBUS, a zeroed branch page aborts it on an assertion.  So before anything
maps the file, :func:`lmdb_file_problem` reads the two meta pages with
``struct`` (magic, page size, last used page) and compares the file size with
what the newer valid meta page says; and :func:`in_child` runs the reading part
of ``quick_check_lmdb`` (every leaf page walked) in a forked child, so that a
crash there is a one-line error here.
"""

import faulthandler
import os
import signal
import stat
import struct
from pathlib import Path
from typing import Callable, Optional, Tuple

MDB_MAGIC = 0xBEEFC0DE
P_META = 0x08
_PAGE_HEADER = struct.Struct("=QHHI")  # mp_pgno, mp_pad, mp_flags, mp_lower/mp_upper (64-bit build)
_META_HEAD = struct.Struct("=IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
# MDB_db: md_pad (the page size, in the free DB), flags, depth, branch, leaf, overflow pages, entries, root
_DB = struct.Struct("=IHHQQQQQ")
_META_TAIL = struct.Struct("=QQ")  # mm_last_pg, mm_txnid


def _meta_at(raw: bytes, offset: int) -> Optional[Tuple[int, int, int]]:
    """(page size, last page, txnid) of the meta page at ``offset``, or None if it is not one."""
    if len(raw) < offset + _PAGE_HEADER.size + _META_HEAD.size + 2 * _DB.size + _META_TAIL.size:
        return None
    _, _, flags, _ = _PAGE_HEADER.unpack_from(raw, offset)
    magic, _, _, _ = _META_HEAD.unpack_from(raw, offset + _PAGE_HEADER.size)
    if magic != MDB_MAGIC or not flags & P_META:
        return None
    base = offset + _PAGE_HEADER.size + _META_HEAD.size
    psize = _DB.unpack_from(raw, base)[0]
    last_pg, txnid = _META_TAIL.unpack_from(raw, base + 2 * _DB.size)
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return psize, last_pg, txnid


def lmdb_file_problem(path: Path) -> Optional[str]:
    """What is structurally wrong with the LMDB folder ``path`` (None if nothing), without mapping it."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "not an LMDB folder (it is a file)"
    data = path / "data.mdb"
    try:
        st = data.stat()
    except FileNotFoundError:
        return "not an LMDB (no data.mdb)"
    except OSError as exc:
        return f"cannot read data.mdb ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not an LMDB (data.mdb is not a regular file)"
    try:
        with open(data, "rb") as fh:
            head = fh.read(1 << 17)  # both meta pages, at the largest page size LMDB uses
    except OSError as exc:
        return f"cannot read data.mdb ({exc.strerror or exc})"
    first = _meta_at(head, 0)
    if first is None:
        return f"not an LMDB (data.mdb has no valid meta page; {st.st_size} bytes)"
    psize = first[0]
    second = _meta_at(head, psize)
    if second is None:
        return f"not an LMDB (data.mdb has no valid second meta page; {st.st_size} bytes)"
    _, last_pg, _ = max(first, second, key=lambda m: m[2])  # LMDB uses the meta page of the newer transaction
    need = (last_pg + 1) * psize
    if st.st_size < need:
        return f"truncated: data.mdb has {st.st_size} bytes, its meta page says {need}"
    return None


def in_child(fn: Callable[[], Optional[str]]) -> Optional[str]:
    """Run ``fn`` in a forked child and return what it returns; a crash of the child is a message too."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            faulthandler.disable()  # the parent reports a crash in one line: no dump, no LMDB assertion text
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            message = fn()
            if message:
                os.write(write_end, message.encode("utf-8", "replace")[:4000])
        except BaseException as exc:
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as fh:
        chunks.append(fh.read())
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"corrupt LMDB (reading it crashed with {name})"
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    return text or None
