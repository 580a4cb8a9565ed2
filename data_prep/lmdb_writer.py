"""Write Caffe Datum records into an LMDB the way Caffe's own converters do.

Keys are zero-padded record indices (8 digits like convert_mnist_data, 5 like
convert_cifar_data), values are serialized ``caffe.Datum`` messages built from
the installed Caffe's schema: uint8 images in ``data`` (C-H-W), float images in
``float_data``.  The database is written under a temporary name and renamed
only when complete, so an interrupted run never leaves an LMDB that looks
finished.  ``read_lmdb`` checks every record, for corrupt-input errors.
"""

import itertools
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import lmdb
import numpy as np

from data_prep.lmdb_check import lmdb_file_problem, lmdb_walk
from data_prep.sources import DataError
from metaqnn.caffe.datum import datum_encoder
from metaqnn.caffe.schema import load_schema
from qagent.outdir import os_reason

# (images N-C-H-W, labels N): one piece of a set, for writing a set larger than memory in pieces
Chunk = Tuple[np.ndarray, np.ndarray]


def write_lmdb(
    path: Path,
    images: Union[np.ndarray, Iterable[Chunk]],
    labels: Optional[np.ndarray] = None,
    key_digits: int = 8,
    commit_every: int = 1000,
    count: Optional[int] = None,
) -> int:
    """Write ``images`` (N-C-H-W with ``labels``, or an iterable of (images, labels) chunks); returns N.

    Chunks let a caller preprocess a paper-size set piece by piece (issue 25): only one chunk
    and one commit of encoded records are in memory.  Keys count records across chunks, and
    records are committed every ``commit_every`` whatever the chunk sizes, so the result is the
    same as for the whole array.  ``count`` (the total, when known) sizes the memory map at
    once; without it the map grows as records arrive.
    """
    path = Path(path)
    if path.exists():
        raise DataError(f"{path} already exists (remove it first)")
    if isinstance(images, np.ndarray):
        if labels is None:
            raise TypeError("write_lmdb(path, images, labels): labels are required with an image array")
        chunks: Iterator[Chunk] = iter([(images, labels)])
        count = len(images)
    else:
        if labels is not None:
            raise TypeError("write_lmdb(path, chunks): labels come with each chunk")
        chunks = iter(images)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    env = None
    written = 0
    per_record = 64
    try:
        first = next(chunks, None)
        shape = tuple(first[0].shape[1:]) if first is not None else (1, 1, 1)
        if len(shape) != 3:
            raise ValueError(f"images must be N-C-H-W, got a chunk of shape {first[0].shape if first else ()}")
        dtype = np.dtype(first[0].dtype) if first is not None else np.dtype(np.uint8)
        c, h, w = (int(v) for v in shape)
        per_record = c * h * w * (1 if dtype == np.uint8 else 5) + 64
        env = lmdb.open(str(tmp), map_size=_map_size(count or 0, per_record), subdir=True, meminit=False)
        fmt = f"%0{key_digits}d"
        encode = datum_encoder(c, h, w, dtype)
        batch: List[Tuple[bytes, bytes]] = []
        for chunk_images, chunk_labels in itertools.chain([first] if first is not None else [], chunks):
            if tuple(chunk_images.shape[1:]) != shape or chunk_images.dtype != dtype:
                raise ValueError(f"a chunk of {chunk_images.shape[1:]} {chunk_images.dtype} after {shape} {dtype}")
            if len(chunk_images) != len(chunk_labels):
                raise ValueError(f"a chunk of {len(chunk_images)} images with {len(chunk_labels)} labels")
            flat = chunk_images.reshape(len(chunk_images), -1)
            for image, label in zip(flat, np.asarray(chunk_labels, dtype=np.int64).tolist()):
                batch.append(((fmt % written).encode("ascii"), encode(image, label)))
                written += 1
                if len(batch) == commit_every:  # one commit per 1,000 records, like convert_mnist_data
                    _commit(env, batch, per_record)
                    batch = []
                    # A fresh message per commit: upb keeps every bytes value assigned to a message
                    # in the message's arena until the message is freed, 3 KB per 32x32x3 uint8
                    # record (1.9 GB over SVHN's train_full with one message for the whole set).
                    encode = datum_encoder(c, h, w, dtype)
        if batch:
            _commit(env, batch, per_record)
        env.sync(True)
        env.close()
        os.rename(tmp, path)
    except BaseException as exc:
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (lmdb.Error, OSError)):
            needed = max(count or 0, written) * per_record
            raise DataError(f"cannot write {path}: {_write_failure(path.parent, exc, needed)}") from None
        raise
    return written


def _map_size(records: int, per_record: int) -> int:
    return max(1 << 26, 2 * records * per_record)


def _commit(env: Any, batch: List[Tuple[bytes, bytes]], per_record: int) -> None:
    """Append ``batch`` in one transaction, growing the memory map when it is full (count unknown)."""
    while True:
        try:
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(batch, append=True)
            return
        except lmdb.MapFullError:  # the transaction was aborted: nothing of the batch is in
            size = env.info()["map_size"]
            env.set_mapsize(max(2 * size, size + _map_size(len(batch), per_record)))


def _write_failure(folder: Path, exc: BaseException, needed: int) -> str:
    """Why a write failed.  LMDB reports a full disk as an I/O error, so the free space decides."""
    reason = os_reason(exc)
    try:
        st = os.statvfs(str(folder))
        free = st.f_bavail * st.f_frsize
    except OSError:
        return reason
    if reason == "no space left on device" or free < needed:
        return f"no space left on device ({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed)"
    return reason


def iter_lmdb(path: Path) -> Iterator[Tuple[bytes, bytes]]:
    problem = lmdb_file_problem(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as exc:
        raise DataError(f"{path}: corrupt LMDB ({exc})") from None
    try:
        with env.begin() as txn:
            yield from txn.cursor()
    except lmdb.Error as exc:
        raise DataError(f"{path}: corrupt LMDB ({exc})") from None
    finally:
        env.close()


def check_lmdb(path: Path, expected_count: int, num_classes: int) -> None:
    """Parse every record: the count, the Datum and the label range must be right."""
    datum_cls = load_schema().Datum
    count = 0
    for key, value in iter_lmdb(path):
        try:
            d = datum_cls.FromString(value)
        except Exception:
            raise DataError(f"{path}: record {key!r} is not a valid Datum") from None
        if not 0 <= d.label < num_classes:
            raise DataError(f"{path}: record {key!r} has label {d.label} outside 0..{num_classes - 1}")
        count += 1
    if count != expected_count:
        raise DataError(f"{path}: {count} records, manifest says {expected_count}")


def quick_check_lmdb(
    path: Path,
    expected_count: int,
    shape: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
) -> None:
    """The deep check of a set a command reads, safe on a broken LMDB (see :mod:`data_prep.lmdb_check`).

    The file against its meta pages (truncation, entry count), then every branch and leaf page
    read and checked, never mapped (:func:`~data_prep.lmdb_check.lmdb_walk`: a few MB of a set,
    not its images), and the first record a Datum of ``shape`` (C, H, W) with a label below
    ``num_classes``.
    """
    message = _quick_check(path, load_schema().Datum, expected_count, shape, num_classes)
    if message:
        raise DataError(f"{path}: {message}")


def _quick_check(
    path: Path, datum_cls: Any, expected_count: int, shape: Optional[Sequence[int]], num_classes: Optional[int]
) -> Optional[str]:
    problem, first = lmdb_walk(path, expected_count)
    if problem is not None:
        return problem
    try:
        datum = datum_cls.FromString(first if first is not None else b"\xff")
    except Exception:
        return "first record is not a valid Datum"
    found = [datum.channels, datum.height, datum.width]
    if shape is not None and found != [int(x) for x in shape]:
        return f"first record is a {'x'.join(map(str, found))} Datum, the manifest says {'x'.join(map(str, shape))}"
    size = datum.channels * datum.height * datum.width
    if not getattr(datum, "encoded", False) and (len(datum.data) + len(datum.float_data) != size or not size):
        return f"first record is not an image ({len(datum.data) or len(datum.float_data)} values for {found})"
    if num_classes is not None and not 0 <= datum.label < num_classes:
        return f"first record has label {datum.label} outside 0..{num_classes - 1}"
    return None
