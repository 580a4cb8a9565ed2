"""Dataset release -> the LMDBs a search and a finetuning need, plus manifest.json.

Sets written (Section 5):
  train       the exploration training set: full training set minus validation, in a
              seeded shuffled order (Caffe's Data layer does not shuffle);
  val         the stratified validation split (5,000 images for the paper's datasets);
  train_full  the full training set in release order (SVHN: train + extra) for finetuning;
  test        the test set in release order.
Padding (``pad``, for random-crop translations) goes on the two training sets
only, as in the authors' lmdb_creator.py: their TEST data layer reads val and
test unpadded with no crop.
The manifest records sizes, class counts, shapes and the options; the solver
generation reads it.  Re-running with the same options is a no-op; different
options are refused with a message instead of mixing two preparations.
"""

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from data_prep import preprocess
from data_prep.integrity import damaged_sets, discard_partial, prepare_lock, remove_path, validate_manifest
from data_prep.lmdb_writer import write_lmdb
from data_prep.sources import CIFAR100_CLASSES, DataError, Dataset, read_dataset
from data_prep.split import stratified_split
from qagent.outdir import os_reason, writing_into

MANIFEST = "manifest.json"
# Record keys as Caffe's converters write them: convert_cifar_data uses 5 digits, convert_mnist_data 8.
KEY_DIGITS = {"cifar10": 5, "cifar100": 5}  # CIFAR-100 as CIFAR-10: the same converter's layout
# 2: only the training sets are padded (version 1 padded every set).
MANIFEST_VERSION = 2
PADDED_SETS = ("train", "train_full")


@dataclass(frozen=True)
class PrepOptions:
    dataset: str
    validation_size: int = 5000
    preprocess: str = "none"
    pad: int = 0
    seed: int = 0
    # CIFAR-100's label set: "fine" (100 classes) or "coarse" (20 superclasses); the other datasets
    # have one label set, "fine".  Added after the first manifests: see _with_defaults.
    labels: str = "fine"

    def __post_init__(self) -> None:
        if self.labels not in CIFAR100_CLASSES:
            raise DataError(f"unknown labels {self.labels!r}; known: {', '.join(CIFAR100_CLASSES)}")
        if self.labels != "fine" and self.dataset != "cifar100":
            raise DataError(
                f"labels {self.labels!r}: only cifar100 has a second (coarse) label set, not {self.dataset}"
            )
        if self.preprocess not in preprocess.PREPROCESS:
            raise DataError(f"unknown preprocessing {self.preprocess!r}; known: {', '.join(preprocess.PREPROCESS)}")
        if self.validation_size <= 0:
            raise DataError(f"validation size must be positive, got {self.validation_size}")
        if self.pad < 0:
            raise DataError(f"pad must be >= 0, got {self.pad}")


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    if not path.is_file():  # a folder, or a FIFO that reading would wait on forever
        raise DataError(f"{path}: corrupt manifest (not a regular file)")
    try:
        return validate_manifest(json.loads(path.read_text()), path)
    except (OSError, ValueError) as exc:  # unreadable (a folder, no permission), not UTF-8, not JSON
        raise DataError(f"{path}: corrupt manifest ({os_reason(exc)})") from None


def stale_reason(manifest: Dict[str, Any]) -> Optional[str]:
    """Why a prepared folder no longer matches what ``build`` writes, or None.

    A version-1 folder is still right when nothing was padded (same bytes); with
    padding its val and test sets are padded too, which the rendered TEST layer
    (no crop) would feed to the net at the wrong size.
    """
    if int(manifest.get("version", 1)) >= MANIFEST_VERSION:
        return None
    if int(manifest.get("options", {}).get("pad", 0)) == 0:
        return None
    return "prepared by an older version that also padded the validation and test sets"


def _with_defaults(options: Any) -> Any:
    """A manifest's options with the fields added since it was written at their defaults.

    Manifests written before ``labels`` existed lack it; they were all prepared with the one
    label set a dataset then had, the default, so they still match options that use it.
    """
    if not isinstance(options, dict):
        return options
    defaults = {f.name: f.default for f in fields(PrepOptions) if f.default is not MISSING}
    return {**defaults, **options}


def _class_counts(labels: np.ndarray, num_classes: int) -> List[int]:
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


_TMP_PID = re.compile(r"^\..+\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete ``.<name>.tmp-<pid>`` folders a killed run left behind (its pid is gone).

    A live pid's folder stays: another prepare may be writing it right now."""
    removed = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            m = _TMP_PID.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def prepare(
    options: PrepOptions,
    out_dir: Path,
    source: Optional[Path] = None,
    log: Callable[[str], None] = print,
    repair: bool = True,
    chunk_size: int = preprocess.CHUNK_SIZE,
    deep: Optional[Iterable[str]] = None,
) -> Dict[str, Any]:
    """Prepare ``out_dir`` unless it already is; sets found missing or corrupt are rebuilt (``repair``) or refused.

    ``deep``: the sets the caller will read, checked page by page (default: all, for ``metaqnn
    prepare`` itself); the others by their meta pages only (see ``damaged_sets``).

    A complete folder is only read (it may be read-only); writing happens under a lock on
    the folder, so two searches that start at once on fresh data do not write it twice.
    ``chunk_size`` images are preprocessed at a time (memory, not output: see :func:`build`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"data folder {out_dir} is not a folder")
    with contextlib.suppress(OSError):  # best effort: a complete folder may be read-only
        for stale in remove_stale_temporaries(out_dir):
            log(f"data: removed {stale.name}, left by a killed run")
    manifest = _prepared(options, out_dir, log, repair, deep)
    if manifest is not None:
        return manifest
    t0 = time.time()
    with writing_into(out_dir, "data folder"), prepare_lock(out_dir, log):  # one line for read-only or full
        manifest = _prepared(options, out_dir, lambda _m: None, repair, deep)  # another process may have done it
        if manifest is not None:
            return manifest
        try:
            data = read_dataset(options.dataset, source, options.seed, options.labels)
            if (out_dir / MANIFEST).exists():
                (out_dir / MANIFEST).unlink()  # damaged: incomplete until the rebuild writes it again
            manifest = build(data, options, out_dir, log, chunk_size)
        except BaseException:
            discard_partial(out_dir)
            raise
    log(f"data: wrote {out_dir} in {time.time() - t0:.1f} s")
    return manifest


def _prepared(
    options: PrepOptions, out_dir: Path, log: Callable[[str], None], repair: bool, deep: Optional[Iterable[str]] = None
) -> Optional[Dict[str, Any]]:
    """The manifest if ``out_dir`` is complete and sound, None if it must be (re)built; refuses other options."""
    existing = read_manifest(out_dir)
    if existing is None:
        return None
    stale = stale_reason(existing)
    if stale:
        raise DataError(f"{out_dir}: {stale}; delete it (or use another --data-dir) and prepare again")
    if _with_defaults(existing.get("options")) != asdict(options):
        raise DataError(
            f"{out_dir} was prepared with {existing.get('options')}, not {asdict(options)}; "
            "use another --data-dir or delete it"
        )
    damaged = damaged_sets(out_dir, existing, deep)
    if not damaged:
        log(f"data: {out_dir} already prepared with these options")
        return existing
    if not repair:
        raise DataError(f"{out_dir / damaged[0]}; run `metaqnn prepare` with these options to rebuild it")
    log(f"data: {out_dir}: {'; '.join(damaged)}: rebuilding")
    return None


@dataclass(frozen=True)
class Rows:
    """One set to write, as pieces of the release arrays: (images, row indices or None for all).

    Nothing is copied until it is written: a set is read chunk by chunk, each chunk a fancy-index
    or slice copy of at most ``chunk_size`` images (issue 25).  SVHN's train_full is its train and
    extra arrays one after the other, not their 1.9 GB concatenation.
    """

    parts: Tuple[Tuple[np.ndarray, Optional[np.ndarray]], ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the set's images; every part must have it (SVHN's train and extra do)."""
        shapes = {tuple(int(v) for v in images.shape[1:]) for images, _ in self.parts}
        if len(shapes) != 1:
            raise DataError(f"the parts of one set have images of different shapes: {sorted(shapes)}")
        c, h, w = shapes.pop()
        return c, h, w

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for images, rows in self.parts:
            yield from preprocess.iter_chunks(images, size, rows)


def build(
    data: Dataset,
    options: PrepOptions,
    out_dir: Path,
    log: Callable[[str], None],
    chunk_size: int = preprocess.CHUNK_SIZE,
) -> Dict[str, Any]:
    """Write the four sets and the manifest, ``chunk_size`` images at a time (statistics in one pass).

    The output does not depend on ``chunk_size`` except in the last bits of ZCA's float32
    values (BLAS may round a product differently for a few-row tail chunk): docs/deviations.md.
    """
    full = data.sets["train"]
    full_parts: List[Tuple[np.ndarray, Optional[np.ndarray]]] = [(full.images, None)]
    full_labels = full.labels
    if "extra" in data.sets:
        extra = data.sets["extra"]
        full_parts.append((extra.images, None))
        full_labels = np.concatenate([full.labels, extra.labels])
    if options.validation_size >= len(full.labels):
        raise DataError(f"validation size {options.validation_size} >= training set size {len(full.labels)}")
    rest, val = stratified_split(full.labels, options.validation_size, options.seed)
    order = np.random.Generator(np.random.PCG64(options.seed + 1)).permutation(rest)
    explore = Rows(((full.images, order),), full.labels[order])
    valid = Rows(((full.images, val),), full.labels[val])
    finetune = Rows(tuple(full_parts), full_labels)
    test = data.sets["test"]

    # The statistics are exact sums (preprocess.PixelStats), independent of the order of the
    # images: the exploration set is read in release order (``rest`` is sorted), for locality.
    transform = preprocess.fit(options.preprocess, Rows(((full.images, rest),), full.labels[rest]).chunks(chunk_size))
    transform_full = (
        preprocess.fit(options.preprocess, finetune.chunks(chunk_size))
        if options.preprocess in ("mean", "zca")
        else transform
    )
    sets = {
        "train": (explore, transform),
        "val": (valid, transform),
        "train_full": (finetune, transform_full),
        "test": (Rows(((test.images, None),), test.labels), transform_full),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "dataset": data.name,
        "num_classes": data.num_classes,
        "options": asdict(options),
        "preprocess": preprocess.describe()[options.preprocess],
        "padded_sets": list(PADDED_SETS) if options.pad else [],
        "sets": {},
    }
    dtype = preprocess.output_dtype(options.preprocess)
    for name, (split, fn) in sets.items():
        target = out_dir / f"{name}.lmdb"
        remove_path(target)  # a previous run died before writing the manifest, or the set is damaged
        pixels = options.pad if name in PADDED_SETS else 0
        c, h, w = split.image_shape()
        shape = (c, h + 2 * pixels, w + 2 * pixels)
        log(f"data: writing {target.name}: {len(split)} images {shape} {dtype}")
        written = write_lmdb(
            target,
            _processed(split, fn, pixels, chunk_size, shape, dtype),
            key_digits=KEY_DIGITS.get(data.name, 8),
            count=len(split),
        )
        assert written == len(split), (name, written, len(split))
        manifest["sets"][name] = {
            "path": target.name,
            "count": len(split),
            "shape": list(shape),
            "dtype": str(dtype),
            "class_counts": _class_counts(split.labels, data.num_classes),
        }
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.rename(out_dir / MANIFEST)  # the manifest appears last: its presence means "complete"
    return manifest


def _processed(
    split: Rows,
    fn: preprocess.Transform,
    pixels: int,
    chunk_size: int,
    shape: Tuple[int, int, int],
    dtype: np.dtype,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(images, labels) chunks of ``split``, transformed then padded, as write_lmdb takes them."""
    start = 0
    for chunk in split.chunks(chunk_size):
        images = preprocess.pad(fn(chunk), pixels)
        if images.shape[1:] != shape or images.dtype != dtype:  # what the manifest will say
            raise AssertionError(f"preprocessing made {images.shape[1:]} {images.dtype}, not {shape} {dtype}")
        yield images, split.labels[start : start + len(chunk)]
        start += len(chunk)
