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
from typing import Any, Callable, Iterator, Tuple

import lmdb
import numpy as np

from data_prep.sources import DataError
from metaqnn.caffe.schema import load_schema


def write_lmdb(
    path: Path, images: np.ndarray, labels: np.ndarray, key_digits: int = 8, commit_every: int = 1000
) -> None:
    path = Path(path)
    if path.exists():
        raise DataError(f"{path} already exists (remove it first)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datum_cls = load_schema().Datum
    n, c, h, w = images.shape
    is_uint8 = images.dtype == np.uint8
    per_record = c * h * w * (1 if is_uint8 else 5) + 64
    env = lmdb.open(str(tmp), map_size=max(1 << 26, 2 * n * per_record), subdir=True, meminit=False)
    try:
        fmt = f"%0{key_digits}d"
        label_list = np.asarray(labels, dtype=np.int64).tolist()
        keys = [(fmt % i).encode("ascii") for i in range(n)]
        encode = _uint8_encoder(datum_cls, c, h, w) if is_uint8 else _float_encoder(datum_cls, c, h, w)
        flat = images.reshape(n, -1)
        for start in range(0, n, commit_every):
            stop = min(n, start + commit_every)
            batch = [(keys[i], encode(flat[i], label_list[i])) for i in range(start, stop)]
            with env.begin(write=True) as txn:  # one commit per 1,000 records, like convert_mnist_data
                txn.cursor().putmulti(batch, append=True)
        env.sync(True)
    except BaseException:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    os.rename(tmp, path)


def _uint8_encoder(datum_cls: Any, c: int, h: int, w: int) -> Callable[[np.ndarray, int], bytes]:
    """Datum bytes for uint8 images: one message reused, as convert_mnist_data does.

    (An earlier byte-splicing encoder measured only 1.3-2x faster, ~0.1-0.2 s on 60,000 images,
    which did not pay for its complexity: bench/bench_lmdb.py.)
    """
    datum = datum_cls(channels=c, height=h, width=w)

    def encode(image: np.ndarray, label: int) -> bytes:
        datum.data = image.tobytes()
        datum.label = label
        return bytes(datum.SerializeToString())

    return encode


def _float_encoder(datum_cls: Any, c: int, h: int, w: int) -> Callable[[np.ndarray, int], bytes]:
    datum = datum_cls(channels=c, height=h, width=w)

    def encode(image: np.ndarray, label: int) -> bytes:
        datum.label = label
        del datum.float_data[:]
        datum.float_data.extend(image.astype(np.float32).tolist())
        return datum.SerializeToString()

    return encode


def iter_lmdb(path: Path) -> Iterator[Tuple[bytes, bytes]]:
    if not (Path(path) / "data.mdb").exists():
        raise DataError(f"{path}: not an LMDB (no data.mdb)")
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


def quick_check_lmdb(path: Path, expected_count: int) -> None:
    """Cheap integrity check before a search: record count and the first record's Datum."""
    if not (Path(path) / "data.mdb").exists():
        raise DataError(f"{path}: missing (no data.mdb); prepare the data again")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
        try:
            entries = env.stat()["entries"]
            with env.begin() as txn:
                first = next(iter(txn.cursor()), None)
        finally:
            env.close()
    except lmdb.Error as exc:
        raise DataError(f"{path}: corrupt LMDB ({exc})") from None
    if entries != expected_count:
        raise DataError(f"{path}: {entries} records, the manifest says {expected_count}")
    datum_cls = load_schema().Datum  # a missing schema is reported as such, not as bad data
    try:
        datum_cls.FromString(first[1] if first else b"\xff")
    except Exception:
        raise DataError(f"{path}: first record is not a valid Datum") from None
