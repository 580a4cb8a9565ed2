"""Readers for the datasets' original release formats, each returning uint8 N-C-H-W arrays.

Every reader checks what it reads and raises :class:`DataError` with the file
name and what is wrong (truncated, bad magic number, labels out of range), so a
corrupt download never turns into a silently wrong LMDB.
"""

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from metaqnn_errors import MetaQNNError


class DataError(MetaQNNError):
    pass


@dataclass
class Split:
    images: np.ndarray  # uint8, N x C x H x W; may be a strided view (SVHN): read it in chunks
    labels: np.ndarray  # int64, N

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")


@dataclass
class Dataset:
    """The sets a release provides: 'train' (full training set), 'test', and 'extra' for SVHN."""

    name: str
    num_classes: int
    sets: Dict[str, Split]


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels out of range 0..{num_classes - 1} (found {labels.min()}..{labels.max()})")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _find(folder: Path, names: List[str]) -> Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise DataError(f"{folder}: missing {names[0]} (or {names[0]}.gz)")


# --- MNIST: IDX files ----------------------------------------------------------------


def read_idx_images(path: Path) -> np.ndarray:
    data = _open_maybe_gz(path)
    if len(data) < 16:
        raise DataError(f"{path}: truncated IDX header")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise DataError(f"{path}: bad IDX image magic number {magic} (expected 2051)")
    need = 16 + n * rows * cols
    if len(data) < need:
        raise DataError(
            f"{path}: truncated: header says {n} images of {rows}x{cols}, file has {len(data)} of {need} bytes"
        )
    return np.frombuffer(data, np.uint8, n * rows * cols, 16).reshape(n, 1, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    data = _open_maybe_gz(path)
    if len(data) < 8:
        raise DataError(f"{path}: truncated IDX header")
    magic, n = struct.unpack(">II", data[:8])
    if magic != 2049:
        raise DataError(f"{path}: bad IDX label magic number {magic} (expected 2049)")
    if len(data) < 8 + n:
        raise DataError(f"{path}: truncated: header says {n} labels, file has {len(data) - 8}")
    return np.frombuffer(data, np.uint8, n, 8).astype(np.int64)


def read_mnist(folder: Path) -> Dataset:
    sets = {}
    for name, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_images(_find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
        lpath = _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        labels = read_idx_labels(lpath)
        if len(images) != len(labels):
            raise DataError(f"{lpath}: {len(labels)} labels for {len(images)} images")
        _check_labels(labels, 10, str(lpath))
        sets[name] = Split(images, labels)
    return Dataset("mnist", 10, sets)


# --- CIFAR-10: binary release (data_batch_1..5.bin, test_batch.bin) ---------------------

CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_records(path: Path, record: int, what: str) -> np.ndarray:
    """The file's fixed-size records as rows; a size that is not a whole number of records is truncation."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not raw or len(raw) % record:
        raise DataError(f"{path}: size {len(raw)} is not a multiple of the {record}-byte {what} record (truncated?)")
    return np.frombuffer(raw, np.uint8).reshape(-1, record)


def read_cifar_bin(path: Path) -> Split:
    rec = _cifar_records(path, CIFAR_RECORD, "CIFAR")
    labels = rec[:, 0].astype(np.int64)
    _check_labels(labels, 10, str(path))
    return Split(rec[:, 1:].reshape(-1, 3, 32, 32), labels)


def read_cifar10(folder: Path) -> Dataset:
    base = folder / "cifar-10-batches-bin" if (folder / "cifar-10-batches-bin").is_dir() else folder
    paths = [base / f"data_batch_{i}.bin" for i in range(1, 6)]
    for p in [*paths, base / "test_batch.bin"]:
        if not p.exists():
            raise DataError(f"{base}: missing {p.name}")
    # Filled file by file, so one file's bytes and the result are in memory, not five files and
    # their concatenation.  A size that is not whole records is refused by read_cifar_bin below.
    sizes = [p.stat().st_size // CIFAR_RECORD for p in paths]
    images = np.empty((sum(sizes), 3, 32, 32), np.uint8)
    labels = np.empty(sum(sizes), np.int64)
    start = 0
    for p, size in zip(paths, sizes):
        part = read_cifar_bin(p)
        if len(part.labels) != size:
            raise DataError(f"{p}: changed while it was read ({size} records, then {len(part.labels)})")
        images[start : start + size] = part.images
        labels[start : start + size] = part.labels
        start += size
        del part
    train = Split(images, labels)
    return Dataset("cifar10", 10, {"train": train, "test": read_cifar_bin(base / "test_batch.bin")})


# --- CIFAR-100: binary release (cifar-100-binary/train.bin, test.bin) ----------------------

CIFAR100_RECORD = 2 + 3 * 32 * 32  # coarse label byte, fine label byte, 3,072 pixel bytes
# Label sets by the record's byte order: the 20 superclasses first, then the 100 classes.
CIFAR100_CLASSES = {"coarse": 20, "fine": 100}


def read_cifar100_bin(path: Path, labels: str = "fine") -> Split:
    """One CIFAR-100 file with its ``labels`` ("fine" or "coarse").

    Both label bytes are checked whichever is used: a record whose other label is out of
    range is corrupt too, and would otherwise pass unseen until the other label set is prepared.
    """
    if labels not in CIFAR100_CLASSES:
        raise DataError(f"CIFAR-100 labels must be one of {', '.join(CIFAR100_CLASSES)}, got {labels!r}")
    rec = _cifar_records(path, CIFAR100_RECORD, "CIFAR-100")
    for column, kind in enumerate(CIFAR100_CLASSES):
        n = CIFAR100_CLASSES[kind]
        bad = np.flatnonzero(rec[:, column] >= n)
        if bad.size:
            raise DataError(
                f"{path}: record {bad[0]} has {kind} label {rec[bad[0], column]}, out of range 0..{n - 1} "
                f"({bad.size} such record{'s' if bad.size > 1 else ''})"
            )
    column = list(CIFAR100_CLASSES).index(labels)
    return Split(rec[:, 2:].reshape(-1, 3, 32, 32), rec[:, column].astype(np.int64))


def read_cifar100(folder: Path, labels: str = "fine") -> Dataset:
    """``folder`` holds train.bin and test.bin, or is the folder above ``cifar-100-binary/``."""
    base = folder / "cifar-100-binary" if (folder / "cifar-100-binary").is_dir() else folder
    for name in ("train.bin", "test.bin"):  # both looked for before 150 MB are read
        if not (base / name).exists():
            raise DataError(f"{base}: missing {name}")
    sets = {name: read_cifar100_bin(base / f"{name}.bin", labels) for name in ("train", "test")}
    return Dataset("cifar100", CIFAR100_CLASSES[labels], sets)


# --- SVHN: cropped digits (train_32x32.mat, test_32x32.mat, extra_32x32.mat) --------------


def read_svhn_mat(path: Path) -> Split:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except Exception as exc:  # scipy raises many types for a corrupt file
        raise DataError(f"{path}: not a readable SVHN .mat file ({type(exc).__name__}: {exc})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X has shape {x.shape}, expected 32x32x3xN")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    _check_labels(labels, 10, str(path))
    # A view, not a copy: the N-C-H-W transpose of the 32x32x3xN array (extra: 1.6 GB) is made
    # contiguous one chunk at a time where it is written (preprocess.iter_chunks).  The former
    # ascontiguousarray + astype made two more whole copies (issue 25: 6 GB peak for SVHN).
    images = x.astype(np.uint8, copy=False).transpose(3, 2, 0, 1)
    return Split(images, labels)


def read_svhn(folder: Path, with_extra: bool = True) -> Dataset:
    sets = {}
    for name in ("train", "test") + (("extra",) if with_extra else ()):
        p = folder / f"{name}_32x32.mat"
        if not p.exists():
            raise DataError(f"{folder}: missing {name}_32x32.mat")
        sets[name] = read_svhn_mat(p)
    return Dataset("svhn", 10, sets)


# --- scikit-learn's bundled digits: the offline default -----------------------------------


# A second task made from the same bundled data, for transfer (Table 5's shape, issue 21): the
# digits 5..9 as classes 0..4.  Its training and test images are digits' own of those classes, so a
# model trained on digits has never seen a digits59 test image.
DIGITS_TASKS: Dict[str, Tuple[int, ...]] = {"digits59": (5, 6, 7, 8, 9)}


def read_digits(test_fraction: float = 1 / 6, seed: int = 0, task: str = "digits") -> Dataset:
    """8x8 digits, pixel values 0..16 rescaled to 0..255; a stratified test set is held out.

    ``task`` "digits" is all ten classes; a :data:`DIGITS_TASKS` name keeps some of them in both
    sets of that split, relabelled 0..k-1.
    """
    from sklearn.datasets import load_digits

    from data_prep.split import stratified_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = d.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, round(len(labels) * test_fraction), seed)
    classes = DIGITS_TASKS.get(task, tuple(range(10)))

    def subset(idx: np.ndarray) -> Split:
        idx = np.sort(idx)
        idx = idx[np.isin(labels[idx], classes)]
        return Split(images[idx], np.searchsorted(np.array(classes), labels[idx]).astype(np.int64))

    return Dataset(task, len(classes), {"train": subset(train_idx), "test": subset(test_idx)})


def read_dataset(name: str, source: Optional[Path], seed: int = 0, labels: str = "fine") -> Dataset:
    """The release of ``name``; ``labels`` picks CIFAR-100's label set (the others have only "fine")."""
    if labels != "fine" and name != "cifar100":
        raise DataError(f"labels {labels!r}: only cifar100 has a second (coarse) label set, not {name}")
    if name == "digits" or name in DIGITS_TASKS:
        return read_digits(seed=seed, task=name)
    if source is None:
        raise DataError(
            f"dataset {name} needs its release files: give --source FOLDER (or run `metaqnn download {name}`)"
        )
    if not source.is_dir():
        raise DataError(f"source folder {source} does not exist")
    readers: Dict[str, Callable[[Path], Dataset]] = {
        "mnist": read_mnist,
        "cifar10": read_cifar10,
        "cifar100": lambda folder: read_cifar100(folder, labels),
        "svhn": read_svhn,
    }
    if name not in readers:
        raise DataError(
            f"unknown dataset {name!r}; known: digits, {', '.join(DIGITS_TASKS)}, mnist, cifar10, cifar100, svhn"
        )
    return readers[name](source)


def shape_of(split: Split) -> Tuple[int, int, int]:
    _, c, h, w = split.images.shape
    return int(c), int(h), int(w)
