"""Integrity checks of an LMDB that are safe to run on a broken one.

LMDB memory-maps ``data.mdb`` and trusts it: a truncated file kills the reader
with SIGBUS, a zeroed branch page aborts it on an assertion.  So before anything
maps the file, :func:`lmdb_file_problem` reads the two meta pages with
``struct`` (magic, version, page size, last used page, the main database's root)
and the root page's header, and compares the file size with what the newer valid
meta page says; :func:`lmdb_meta_problem` adds what the meta page says of the
contents (entry count, page counts) against the manifest: together the cheap
check of a set a command does not read, a few kilobytes whatever the set's size.
:func:`lmdb_walk`, the deep check of a set a command reads, reads every branch and
leaf page with ``pread`` and checks the tree itself: nothing here maps the file, so
a broken one is a one-line error, never a crash.
"""

import contextlib
import os
import stat
import struct
from pathlib import Path
from typing import List, NamedTuple, Optional, Set, Tuple

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1  # every non-development liblmdb build (Caffe's and py-lmdb's included)
P_BRANCH, P_LEAF, P_META = 0x01, 0x02, 0x08
P_INVALID = (1 << 64) - 1  # the root of an empty database
_PAGE_HEADER = struct.Struct("=QHHI")  # mp_pgno, mp_pad, mp_flags, mp_lower/mp_upper (64-bit build)
_META_HEAD = struct.Struct("=IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
# MDB_db: md_pad (the page size, in the free DB), flags, depth, branch, leaf, overflow pages, entries, root
_DB = struct.Struct("=IHHQQQQQ")
_META_TAIL = struct.Struct("=QQ")  # mm_last_pg, mm_txnid


class Meta(NamedTuple):
    """What one meta page says: its page size, format version, last used page and transaction, and the
    main database's B-tree (depth, branch/leaf/overflow page counts, entries, root page)."""

    psize: int
    version: int
    last_pg: int
    txnid: int
    free_pages: int
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int


def _meta_at(raw: bytes, offset: int) -> Optional[Meta]:
    """The meta page at ``offset``, or None if it is not one."""
    if len(raw) < offset + _PAGE_HEADER.size + _META_HEAD.size + 2 * _DB.size + _META_TAIL.size:
        return None
    _, _, flags, _ = _PAGE_HEADER.unpack_from(raw, offset)
    magic, version, _, _ = _META_HEAD.unpack_from(raw, offset + _PAGE_HEADER.size)
    if magic != MDB_MAGIC or not flags & P_META:
        return None
    base = offset + _PAGE_HEADER.size + _META_HEAD.size
    psize, _, _, free_branch, free_leaf, free_overflow, _, _ = _DB.unpack_from(raw, base)
    _, db_flags, depth, branch, leaf, overflow, entries, root = _DB.unpack_from(raw, base + _DB.size)
    last_pg, txnid = _META_TAIL.unpack_from(raw, base + 2 * _DB.size)
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    free_pages = free_branch + free_leaf + free_overflow
    return Meta(psize, version, last_pg, txnid, free_pages, db_flags, depth, branch, leaf, overflow, entries, root)


def _read_meta(path: Path) -> Tuple[Optional[str], Optional[Meta]]:
    """(the problem, None) or (None, the meta page LMDB would use) of the LMDB folder ``path``; never maps it.

    Besides the two meta pages, at most one more page is read: the root page's header, whose
    page number and kind must be what the meta page says (a zeroed or overwritten root).
    """
    path = Path(path)
    if not path.exists():
        return "missing", None
    if not path.is_dir():
        return "not an LMDB folder (it is a file)", None
    data = path / "data.mdb"
    try:
        st = data.stat()
    except FileNotFoundError:
        return "not an LMDB (no data.mdb)", None
    except OSError as exc:
        return f"cannot read data.mdb ({exc.strerror or exc})", None
    if not stat.S_ISREG(st.st_mode):
        return "not an LMDB (data.mdb is not a regular file)", None
    try:
        with open(data, "rb") as fh:
            with contextlib.suppress(OSError, AttributeError):  # no readahead past what is read here
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            head = fh.read(1 << 17)  # both meta pages, at the largest page size LMDB uses
            first = _meta_at(head, 0)
            if first is None:
                return f"not an LMDB (data.mdb has no valid meta page; {st.st_size} bytes)", None
            second = _meta_at(head, first.psize)
            if second is None:
                return f"not an LMDB (data.mdb has no valid second meta page; {st.st_size} bytes)", None
            meta = max(first, second, key=lambda m: m.txnid)  # LMDB uses the meta page of the newer transaction
            if meta.version != MDB_DATA_VERSION:
                return f"not an LMDB this liblmdb reads (data format version {meta.version})", None
            need = (meta.last_pg + 1) * meta.psize
            if st.st_size < need:
                return f"truncated: data.mdb has {st.st_size} bytes, its meta page says {need}", None
            if meta.entries == 0 or meta.root == P_INVALID:
                if meta.entries or meta.root != P_INVALID:
                    return f"corrupt LMDB (meta page: {meta.entries} entries, root page {meta.root})", None
                return None, meta
            if not 2 <= meta.root <= meta.last_pg or meta.depth < 1:
                return f"corrupt LMDB (meta page: root page {meta.root}, depth {meta.depth})", None
            fh.seek(meta.root * meta.psize)
            pgno, _, flags, _ = _PAGE_HEADER.unpack(fh.read(_PAGE_HEADER.size))
    except OSError as exc:
        return f"cannot read data.mdb ({exc.strerror or exc})", None
    kind = P_LEAF if meta.depth == 1 else P_BRANCH
    if pgno != meta.root or (flags & (P_BRANCH | P_LEAF | P_META)) != kind:
        return f"corrupt LMDB (root page {meta.root} is not a {'leaf' if kind == P_LEAF else 'branch'} page)", None
    return None, meta


def lmdb_file_problem(path: Path) -> Optional[str]:
    """What is structurally wrong with the LMDB folder ``path`` (None if nothing), without mapping it."""
    return _read_meta(path)[0]


def lmdb_meta_problem(path: Path, expected_count: int, min_record_bytes: int = 0) -> Optional[str]:
    """:func:`lmdb_file_problem`, then what the meta page says of the contents against the manifest.

    The entry count must be ``expected_count``; the pages it counts must fit in the file; and
    its leaf and overflow pages must have room for ``expected_count`` values of at least
    ``min_record_bytes`` (an image's bytes): a set that lost its records, or another, smaller
    set copied over it, is refused here without reading a record.
    """
    problem, meta = _read_meta(path)
    return problem if meta is None else _contents_problem(meta, expected_count, min_record_bytes)


def _contents_problem(meta: Meta, expected_count: int, min_record_bytes: int) -> Optional[str]:
    if meta.entries != expected_count:
        return f"{meta.entries} records, the manifest says {expected_count}"
    used = 2 + meta.free_pages + meta.branch_pages + meta.leaf_pages + meta.overflow_pages
    if used > meta.last_pg + 1:
        return f"corrupt LMDB (its meta page counts {used} pages, its last page is {meta.last_pg})"
    room = (meta.leaf_pages + meta.overflow_pages) * meta.psize
    if room < expected_count * min_record_bytes:
        return (
            f"too small: its {meta.leaf_pages + meta.overflow_pages} data pages of {meta.psize} bytes "
            f"cannot hold {expected_count} images of {min_record_bytes} bytes"
        )
    return None


def lmdb_walk(path: Path, expected_count: int) -> Tuple[Optional[str], Optional[bytes]]:
    """(the problem, None) or (None, the first record's value): the deep check of a set a command reads.

    :func:`lmdb_meta_problem`, then every branch and leaf page of the main database read with
    ``pread`` (never mapped: nothing here can crash) and checked: its stored page number and
    kind, its node offsets and sizes, its children's and values' page numbers, keys in order
    within each branch's bounds, every leaf at the meta page's depth, and the page and entry
    counts equal to the meta page's.  Values are not read (only the first record's):
    a leaf page holds the sizes and page numbers of the images, whose pages are 98% of the file,
    so the walk reads a few MB of a set (SVHN's train: 441 of its 68,709 pages), each page once,
    with readahead off (``POSIX_FADV_RANDOM``): readahead around each page (8 MB on some disks)
    would read the images as well.  liblmdb walking the same pages (``mdb_cursor_get``) would
    read them all: py-lmdb touches every page of each value it returns, and maps the file.
    """
    problem, meta = _read_meta(path)
    problem = problem if meta is None else _contents_problem(meta, expected_count, 0)
    if problem is not None or meta is None:
        return problem, None
    if meta.entries == 0:
        return None, None
    try:
        fd = os.open(str(Path(path) / "data.mdb"), os.O_RDONLY)
    except OSError as exc:
        return f"cannot read data.mdb ({exc.strerror or exc})", None
    try:
        with contextlib.suppress(OSError, AttributeError):  # only a hint; not on every platform
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        walk = _Walk(fd, meta)
        problem = walk.page(meta.root, 1, None, None)
        if problem is None:
            problem = walk.totals()
    except OSError as exc:
        problem = f"cannot read data.mdb ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if problem is not None:
        return f"corrupt LMDB ({problem})", None
    return None, walk.first


_NODE = struct.Struct("=HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
_PTR = struct.Struct("=H")
_PGNO = struct.Struct("=Q")
F_BIGDATA = 0x01


class _Walk:
    """One walk of the main database's B-tree, page by page; each method returns a problem or None."""

    def __init__(self, fd: int, meta: Meta) -> None:
        self.fd, self.meta = fd, meta
        self.seen: Set[int] = set()
        self.branch = self.leaf = self.overflow = self.entries = 0
        self.last_key: Optional[bytes] = None
        self.first: Optional[bytes] = None
        self.ordered = meta.flags == 0  # plain byte-order keys, as Caffe and data_prep write them

    def _read(self, pgno: int, pages: int = 1) -> bytes:
        psize = self.meta.psize
        return os.pread(self.fd, psize * pages, pgno * psize)

    def _prefetch(self, pages: List[int]) -> None:
        """Ask for a branch's children all at once (``POSIX_FADV_WILLNEED``): a disk that queues
        requests serves them together, instead of one seek or round trip per page."""
        psize = self.meta.psize
        for pgno in pages:
            if 2 <= pgno <= self.meta.last_pg:
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(self.fd, pgno * psize, psize, os.POSIX_FADV_WILLNEED)

    def page(self, pgno: int, depth: int, low: Optional[bytes], high: Optional[bytes]) -> Optional[str]:
        """Check page ``pgno`` at ``depth`` (the root is 1) and, for a branch, its subtree; keys in [low, high)."""
        meta = self.meta
        if not 2 <= pgno <= meta.last_pg or pgno in self.seen:
            return f"a page number {pgno} out of range or used twice"
        self.seen.add(pgno)
        raw = self._read(pgno)
        if len(raw) != meta.psize:
            return f"page {pgno} is past the end of the file"
        stored, _, flags, _ = _PAGE_HEADER.unpack_from(raw)
        lower, upper = struct.unpack_from("=HH", raw, 12)
        want = P_LEAF if depth == meta.depth else P_BRANCH
        if stored != pgno or flags != want:
            kind = "leaf" if want == P_LEAF else "branch"
            return f"page {pgno} is not the {kind} page the tree says (page number {stored}, flags {flags:#x})"
        if not _PAGE_HEADER.size <= lower <= upper <= meta.psize or (lower - _PAGE_HEADER.size) % 2:
            return f"page {pgno} has a bad free-space range ({lower}, {upper})"
        n = (lower - _PAGE_HEADER.size) // 2
        if n == 0:
            return f"page {pgno} is empty"
        nodes = []
        for i in range(n):
            (off,) = _PTR.unpack_from(raw, _PAGE_HEADER.size + 2 * i)
            if off < upper or off + _NODE.size > meta.psize:
                return f"page {pgno} node {i} is outside the page"
            lo, hi, nflags, ksize = _NODE.unpack_from(raw, off)
            kstart = off + _NODE.size
            if kstart + ksize > meta.psize:
                return f"page {pgno} node {i} key runs past the page"
            nodes.append((lo, hi, nflags, raw[kstart : kstart + ksize], kstart + ksize))
        if want == P_BRANCH:
            self.branch += 1
            keys = [low, *(key for _, _, _, key, _ in nodes[1:]), high]  # node 0's key is implied: the low bound
            children = [lo | hi << 16 | nflags << 32 for lo, hi, nflags, _, _ in nodes]
            self._prefetch(children)
            for i, child in enumerate(children):
                start, stop = keys[i], keys[i + 1]
                if self.ordered and start is not None and stop is not None and start >= stop:
                    return f"branch page {pgno} has its keys out of order"
                problem = self.page(child, depth + 1, start, stop)
                if problem is not None:
                    return problem
            return None
        self.leaf += 1
        for i, (lo, hi, nflags, key, dstart) in enumerate(nodes):
            if self.ordered and (
                (self.last_key is not None and key <= self.last_key)
                or (low is not None and key < low)
                or (high is not None and key >= high)
            ):
                return f"leaf page {pgno} has its keys out of order"
            self.last_key = key
            dsize = lo | hi << 16
            if nflags & ~F_BIGDATA:
                return f"leaf page {pgno} node {i} has flags {nflags:#x}, not those of a plain record"
            if nflags & F_BIGDATA:
                if dstart + _PGNO.size > meta.psize:
                    return f"leaf page {pgno} node {i} runs past the page"
                (first_page,) = _PGNO.unpack_from(raw, dstart)
                pages = (_PAGE_HEADER.size - 1 + dsize) // meta.psize + 1
                if first_page < 2 or first_page + pages > meta.last_pg + 1:
                    return f"leaf page {pgno} node {i} points at pages {first_page}..{first_page + pages - 1}"
                self.overflow += pages
                if self.first is None:
                    self.first = self._read(first_page, pages)[_PAGE_HEADER.size : _PAGE_HEADER.size + dsize]
            else:
                if dstart + dsize > meta.psize:
                    return f"leaf page {pgno} node {i} value runs past the page"
                if self.first is None:
                    self.first = raw[dstart : dstart + dsize]
            self.entries += 1
        return None

    def totals(self) -> Optional[str]:
        """The counts the walk found against the meta page's.

        Overflow pages can only be bounded: a value overwritten by a smaller one keeps its larger
        run of pages, whose length is in the run's first page, which the walk does not read.
        """
        meta = self.meta
        found = (self.branch, self.leaf, self.entries)
        said = (meta.branch_pages, meta.leaf_pages, meta.entries)
        if found != said:
            return f"the tree holds {found} branch and leaf pages and records, its meta page says {said}"
        if self.overflow > meta.overflow_pages:
            return f"its values need {self.overflow} overflow pages, its meta page counts {meta.overflow_pages}"
        return None
