"""Write Caffe Datum records into an LMDB the way Caffe's own converters do.

Keys are zero-padded record indices (8 digits like convert_mnist_data, 5 like
convert_cifar_data), values are serialized ``caffe.Datum`` messages built from
the installed Caffe's schema: uint8 images in ``data`` (C-H-W), float images in
``float_data``.  The database is written under a temporary name and renamed
only when complete, so an interrupted run never leaves an LMDB that looks
finished.  ``read_lmdb`` checks every record, for corrupt-input errors.
"""

import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Tuple

import lmdb
import numpy as np

from data_prep.lmdb_check import in_child, lmdb_file_problem
from data_prep.sources import DataError
from metaqnn.caffe.datum import datum_encoder
from metaqnn.caffe.schema import load_schema
from qagent.outdir import os_reason


def write_lmdb(
    path: Path, images: np.ndarray, labels: np.ndarray, key_digits: int = 8, commit_every: int = 1000
) -> None:
    path = Path(path)
    if path.exists():
        raise DataError(f"{path} already exists (remove it first)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    n, c, h, w = images.shape
    is_uint8 = images.dtype == np.uint8
    per_record = c * h * w * (1 if is_uint8 else 5) + 64
    env = None
    try:
        env = lmdb.open(str(tmp), map_size=max(1 << 26, 2 * n * per_record), subdir=True, meminit=False)
        fmt = f"%0{key_digits}d"
        label_list = np.asarray(labels, dtype=np.int64).tolist()
        keys = [(fmt % i).encode("ascii") for i in range(n)]
        encode = datum_encoder(c, h, w, images.dtype)
        flat = images.reshape(n, -1)
        for start in range(0, n, commit_every):
            stop = min(n, start + commit_every)
            batch = [(keys[i], encode(flat[i], label_list[i])) for i in range(start, stop)]
            with env.begin(write=True) as txn:  # one commit per 1,000 records, like convert_mnist_data
                txn.cursor().putmulti(batch, append=True)
        env.sync(True)
        env.close()
        os.rename(tmp, path)
    except BaseException as exc:
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (lmdb.Error, OSError)):
            raise DataError(f"cannot write {path}: {_write_failure(path.parent, exc, n * per_record)}") from None
        raise


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
    """Integrity check before a search, safe on a broken LMDB (see :mod:`data_prep.lmdb_check`).

    The file against its meta pages (truncation), then in a forked child: every
    leaf page walked, the record count, and the first record a Datum of ``shape``
    (C, H, W) with a label below ``num_classes``.
    """
    problem = lmdb_file_problem(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}; prepare the data again")
    datum_cls = load_schema().Datum  # here, not in the child: its errors are not about the data
    message = in_child(lambda: _quick_check(path, datum_cls, expected_count, shape, num_classes))
    if message:
        raise DataError(f"{path}: {message}")


def _quick_check(
    path: Path, datum_cls: Any, expected_count: int, shape: Optional[Sequence[int]], num_classes: Optional[int]
) -> Optional[str]:
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
        try:
            with env.begin() as txn:
                entries = txn.stat()["entries"]
                cursor = txn.cursor()
                walked = sum(1 for _ in cursor.iternext(keys=True, values=False))
                first = next(iter(txn.cursor()), None)
        finally:
            env.close()
    except lmdb.Error as exc:
        return f"corrupt LMDB ({exc})"
    if entries != expected_count or walked != expected_count:
        return f"{walked} records, the manifest says {expected_count}"
    try:
        datum = datum_cls.FromString(first[1] if first else b"\xff")
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
