"""Download the datasets' release files from their official locations: checksums, resume, progress.

Each file is fetched into ``<name>.part`` (continued with an HTTP Range request after an
interruption), checked against its published MD5, and only then renamed; the CIFAR archives are
unpacked (the members ARCHIVE_MEMBERS names, by base name into the download folder, never
arbitrary paths).  A wrong checksum deletes the
partial file and is an error naming the file.  (These development machines cannot reach the
dataset hosts; the tests serve files from a loopback HTTP server.)
"""

import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from data_prep.sources import DataError
from qagent.outdir import first_missing

CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    name: str
    urls: Tuple[str, ...]  # mirrors, tried in order
    md5: str
    unpack: bool = False


RESOURCES: Dict[str, Tuple[Resource, ...]] = {
    "mnist": tuple(
        Resource(
            f, (f"http://yann.lecun.com/exdb/mnist/{f}", f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}"), md5
        )
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        )
    ),
    "cifar10": (
        Resource(
            "cifar-10-binary.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
            "c32a1d4ab5d03f1284b67883e8d87530",
            unpack=True,
        ),
    ),
    "cifar100": (
        Resource(
            "cifar-100-binary.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",),
            "03b5dce01913d631647c71ecec9e9cb8",
            unpack=True,
        ),
    ),
    "svhn": tuple(
        Resource(f, (f"http://ufldl.stanford.edu/housenumbers/{f}",), md5)
        for f, md5 in (
            ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
            ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
        )
    ),
}


@dataclass(frozen=True)
class ArchiveMembers:
    """What a dataset's archive must hold (``required``) and may hold (``optional``), by base name."""

    what: str  # for the error message: "does not hold <what>"
    required: Tuple[str, ...]
    optional: Tuple[str, ...] = ()


ARCHIVE_MEMBERS: Dict[str, ArchiveMembers] = {
    "cifar10": ArchiveMembers(
        "the six CIFAR-10 .bin batches", (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
    ),
    "cifar100": ArchiveMembers(
        "CIFAR-100's train.bin and test.bin",
        ("train.bin", "test.bin"),
        ("coarse_label_names.txt", "fine_label_names.txt"),  # for people reading results; prepare ignores them
    ),
}


def md5_of(path: Path) -> str:
    h = hashlib.md5()  # the datasets publish MD5 checksums
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _Bar:
    """One self-overwriting progress line on stderr (a line per 10% when not a terminal)."""

    def __init__(self, name: str, total: Optional[int], done: int) -> None:
        self.name, self.total, self.start, self.t0 = name, total, done, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def update(self, done: int) -> None:
        rate = (done - self.start) / max(1e-6, time.monotonic() - self.t0) / 1e6
        if self.total:
            pct = 100 * done / self.total
            text = f"{self.name}: {pct:5.1f}% {done / 1e6:.1f}/{self.total / 1e6:.1f} MB {rate:.1f} MB/s"
            tenth = int(pct // 10)
        else:
            text, tenth = f"{self.name}: {done / 1e6:.1f} MB {rate:.1f} MB/s", self.last_tenth
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        elif tenth != self.last_tenth:
            sys.stderr.write(text + "\n")
        self.last_tenth = tenth

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def fetch(url: str, part: Path, timeout: float = 60.0) -> None:
    """Append the rest of ``url`` to ``part`` (a Range request when part of it is already there)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        bar = _Bar(part.name.replace(".part", ""), total, have)
        with open(part, "ab" if have else "wb") as out:
            done = have
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                done += len(block)
                bar.update(done)
        bar.close()
        if total is not None and done < total:
            raise DataError(f"{url}: connection closed at {done} of {total} bytes (run again to resume)")


def _unpack(archive: Path, dest: Path, members: ArchiveMembers) -> None:
    """Extract ``members`` by base name into ``dest``: no member's path (``../``, absolute) is ever used.

    Each file is written beside its final name and renamed, so an interrupted unpack leaves no
    short file under the name the readers look for.
    """
    wanted = set(members.required) | set(members.optional)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            found = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in wanted]
            names = [Path(m.name).name for m in found]
            if not set(members.required) <= set(names):
                raise DataError(f"{archive}: does not hold {members.what}")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise DataError(f"{archive}: holds {twice[0]} more than once; which one is meant is unclear")
            for m in found:
                src = tar.extractfile(m)
                assert src is not None
                target = dest / Path(m.name).name
                part = dest / f".{target.name}.unpacking"
                try:
                    with src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    part.replace(target)
                except BaseException:
                    part.unlink(missing_ok=True)
                    raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: corrupt archive ({exc})") from None


def _kept(part: Path, created: Optional[Path]) -> str:
    """After a failed fetch: keep a partial file that has bytes (and say so), else leave nothing behind."""
    try:
        if part.stat().st_size > 0:
            return f" (partial file kept for resuming: {part.name}, {part.stat().st_size} bytes)"
        part.unlink()
    except OSError:
        pass  # no partial file
    if created is not None:  # the folders this call made, while empty (files fetched before stay)
        for folder in [part.parent, *part.parent.parents]:
            try:
                folder.rmdir()
            except OSError:
                break
            if folder == created:
                break
    return " (no partial file: nothing of it was downloaded)"


def download(
    dataset: str, dest: Path, resources: Optional[Sequence[Resource]] = None, log: Callable[[str], None] = print
) -> Path:
    if resources is None:
        if dataset not in RESOURCES:
            raise DataError(f"nothing to download for {dataset!r}; downloadable: {', '.join(sorted(RESOURCES))}")
        resources = RESOURCES[dataset]
    created = first_missing(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"cannot create download folder {dest}: it, or a folder above it, is a file") from None
    except OSError as exc:
        raise DataError(f"cannot create download folder {dest}: {os.strerror(exc.errno or 0).lower()}") from None
    for r in resources:
        final = dest / r.name
        if final.exists() and md5_of(final) == r.md5:
            log(f"download: {r.name} present, checksum ok")
        else:
            part = dest / f"{r.name}.part"
            errors = []
            for url in r.urls:
                try:
                    fetch(url, part)
                    break
                except (urllib.error.URLError, OSError, DataError) as exc:
                    errors.append(f"{url}: {exc}")
            else:
                raise DataError(f"could not download {r.name}{_kept(part, created)}: " + "; ".join(errors))
            got = md5_of(part)
            if got != r.md5:
                part.unlink()
                raise DataError(f"{r.name}: checksum mismatch (MD5 {got}, expected {r.md5}); the file was deleted")
            part.rename(final)
            log(f"download: {r.name} ok")
        if r.unpack:
            if dataset not in ARCHIVE_MEMBERS:
                raise DataError(f"{r.name}: no archive layout known for {dataset!r} to unpack")
            _unpack(final, dest, ARCHIVE_MEMBERS[dataset])
    return dest
