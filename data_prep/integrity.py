"""Is a prepared data folder what it claims to be, and does it fit the config?

``validate_manifest``      the manifest has the structure ``prepare`` writes (sets, counts, shapes)
``damaged_sets``           which of its LMDBs are missing, truncated or corrupt (safe on broken files):
                           the sets a command reads deeply, the others by their meta pages
``check_manifest_matches`` the images' channels and size and the class count agree with the config
``discard_partial``        remove what an interrupted or failed ``prepare`` left, so nothing looks finished
"""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from data_prep.lmdb_check import lmdb_meta_problem
from data_prep.lmdb_writer import quick_check_lmdb
from data_prep.sources import DataError
from qagent.errors import ConfigError

SETS = ("train", "val", "train_full", "test")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_manifest(manifest: Any, path: Path) -> Dict[str, Any]:
    """``manifest`` if it has every field the search and the solvers read, else a DataError naming ``path``."""

    def bad(what: str) -> DataError:
        return DataError(f"{path}: not a manifest written by `metaqnn prepare` ({what}); delete it to prepare again")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if not isinstance(manifest.get("options"), dict):
        raise bad("no options")
    if "num_classes" in manifest and not _positive_int(manifest["num_classes"]):
        raise bad(f"num_classes {manifest['num_classes']!r}")
    sets = manifest.get("sets")
    if not isinstance(sets, dict):
        raise bad("no sets")
    for name in SETS:
        s = sets.get(name)
        if not isinstance(s, dict):
            raise bad(f"no {name} set")
        p = s.get("path")
        if not isinstance(p, str) or p in ("", ".", "..") or "/" in p or "\\" in p or "\0" in p:
            raise bad(f"{name}.path {p!r} is not a name inside the folder")
        if not _positive_int(s.get("count")):
            raise bad(f"{name}.count {s.get('count')!r}")
        shape = s.get("shape")
        if not isinstance(shape, list) or len(shape) != 3 or not all(_positive_int(x) for x in shape):
            raise bad(f"{name}.shape {shape!r} is not [channels, height, width]")
        if s.get("dtype") not in ("uint8", "float32"):
            raise bad(f"{name}.dtype {s.get('dtype')!r}")
    return manifest


def damaged_sets(folder: Path, manifest: Dict[str, Any], deep: Optional[Iterable[str]] = None) -> List[str]:
    """One line per set of a (validated) manifest whose LMDB is missing, truncated or corrupt.

    The sets named in ``deep`` (default: all) get the deep check, every branch and leaf page
    read (``quick_check_lmdb``: what a command about to read a set for hours needs); the others
    the cheap one, the meta pages and the root page's header against the file size and the
    manifest's count and image size (``lmdb_meta_problem``: a few kB, whatever the set's size).
    A search reads train and val, not the 2.5 GB of SVHN's train_full: it need not walk it.
    """
    problems = []
    num_classes = manifest.get("num_classes")
    walk = set(SETS if deep is None else deep)
    for name in SETS:
        s = manifest["sets"][name]
        target = Path(folder) / s["path"]
        if name in walk:
            try:
                quick_check_lmdb(target, int(s["count"]), s["shape"], num_classes)
                problem = None
            except DataError as exc:
                problem = str(exc).replace(f"{target}: ", "", 1)
        else:
            c, h, w = (int(x) for x in s["shape"])
            problem = lmdb_meta_problem(target, int(s["count"]), c * h * w * (4 if s["dtype"] == "float32" else 1))
        if problem is not None:
            problems.append(f"{target.name}: {problem}")
    return problems


def check_manifest_matches(
    manifest: Dict[str, Any],
    image_size: int,
    channels: int,
    num_classes: int,
    *,
    crop_size: int = 0,
    where: Optional[Path] = None,
) -> None:
    """Refuse a config whose networks would not fit the prepared images (ConfigError naming both values).

    The net's input is ``crop_size`` x ``crop_size`` when the data layer crops
    (``render.crop_size``), else the prepared images' height x width.  The sets the manifest
    lists as ``padded_sets`` (the training sets, for random translations) are larger than the
    others by the padding: the sizes checked are the unpadded ones, which the TEST phase reads.
    """
    data = f"the prepared data in {where}" if where is not None else "the prepared data"
    shapes = {name: [int(x) for x in s["shape"]] for name, s in manifest["sets"].items()}
    padded = [n for n in shapes if n in set(manifest.get("padded_sets") or ())]
    plain = [n for n in shapes if n not in padded]
    for group in (padded, plain):
        for name in group[1:]:
            if shapes[name] != shapes[group[0]]:
                raise DataError(
                    f"{data}: set {name} has shape {shapes[name]}, {group[0]} has {shapes[group[0]]}; prepare it again"
                )
    c, h, w = shapes[plain[0]] if plain else shapes["train"]
    if padded and plain:
        pc, ph, pw = shapes[padded[0]]
        if pc != c or ph < h or pw < w:
            raise DataError(
                f"{data}: padded set {padded[0]} has shape {shapes[padded[0]]}, {plain[0]} has {[c, h, w]}; "
                "prepare it again"
            )
        if (ph, pw) != (h, w) and (crop_size, crop_size) != (h, w):  # TRAIN crops, TEST reads h x w as is
            raise ConfigError(
                f"render.crop_size is {crop_size}, but {data} has {ph}x{pw} padded training images "
                f"and {h}x{w} others, which the TEST phase reads uncropped: crop to {h}"
            )
    if c != int(channels):
        raise ConfigError(f"dataset.channels is {channels}, but {data} has {c}-channel images")
    if crop_size:
        if crop_size > min(h, w):
            raise ConfigError(f"render.crop_size is {crop_size}, larger than the {h}x{w} images of {data}")
        if crop_size != int(image_size):
            raise ConfigError(
                f"space.image_size is {image_size}, but render.crop_size {crop_size} makes the net's input "
                f"{crop_size}x{crop_size} (from the {h}x{w} images of {data})"
            )
    elif (h, w) != (int(image_size), int(image_size)):
        raise ConfigError(f"space.image_size is {image_size}, but {data} has {h}x{w} images")
    classes = manifest.get("num_classes")
    if classes is not None and int(classes) != int(num_classes):
        raise ConfigError(f"space.num_classes is {num_classes}, but {data} has {classes} classes")


def discard_partial(folder: Path) -> None:
    """After a failed build, before its manifest was written: remove the sets and the manifest draft it wrote."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "manifest.json").exists():
        return
    with contextlib.suppress(OSError):  # best effort: the error that stopped the build is the one to report
        for name in SETS:
            remove_path(folder / f"{name}.lmdb")
        remove_path(folder / ".manifest.json.tmp")


def remove_path(path: Path) -> None:
    """Remove a folder tree, a file or a link (not what it points to), if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(str(path)):
        path.unlink()


@contextlib.contextmanager
def prepare_lock(folder: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an flock on the folder itself (no lock file to leave behind; the kernel drops it if we die).

    Where a folder cannot be flocked (NFS emulates flock with write locks), a ``.prepare.lock``
    file in it is locked instead.
    """
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: waiting for another process that is preparing {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = -1
            fd = os.open(str(Path(folder) / ".prepare.lock"), os.O_WRONLY | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)
