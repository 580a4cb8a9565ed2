"""Search start-up integrity checks at paper size, with a cold page cache (issue 25).

Writes a full-size synthetic SVHN prepared folder (train 68,257, val 5,000, train_full 604,388,
test 26,032 uint8 3x32x32 Datums, ~2.9 GB) with the project's own ``data_prep.prepare.build``,
then, ``--repeats`` times each: evicts every file of the folder from the page cache (fsync, then
``posix_fadvise(DONTNEED)``; checked with util-linux ``fincore`` where it is installed) and times,
in a fresh interpreter, the checks a search start (or resume) performs:

  new       ``metaqnn.search.ensure_data``: train and val walked, train_full and test by their meta pages
  all-deep  every set walked (``damaged_sets`` with ``deep`` = all sets: what ``metaqnn prepare`` does)
  old       what ensure_data did before issue 25, replayed here: every set walked by liblmdb through
            py-lmdb in a forked child (``iternext(values=False)``, which still touches every value's
            pages, with the kernel's readahead around each fault), then train and val a second time

The peak RSS of the checking process and of its children, and the bytes they read from the disk
(``ru_inblock``), are reported too: on a VM whose host caches the disk, the seconds understate a
cold start on real storage, the bytes do not.
Target: under 3 s for ``new``.  Prints a table, writes ``startup_checks.json`` under ``--out``;
the data folder (``--out``/data) is removed afterwards unless ``--keep``.

    .venv/bin/python bench/bench_startup_checks.py --out build/bench-startup
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

# The SVHN release: train 73,257 (5,000 of them become val), extra 531,131, test 26,032.
SIZES = {"train": 73257, "extra": 531131, "test": 26032}
ROOT = Path(__file__).resolve().parent.parent


def write_folder(folder: Path) -> Dict[str, Any]:
    """The prepared folder ``metaqnn prepare`` writes for SVHN, from random images of the release's sizes."""
    from data_prep.prepare import PrepOptions, build
    from data_prep.sources import Dataset, Split

    rng = np.random.default_rng(0)
    sets = {
        name: Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
        for name, n in SIZES.items()
    }
    return build(Dataset("svhn", 10, sets), PrepOptions("svhn", validation_size=5000), folder, print)


def files_of(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def evict(folder: Path) -> None:
    """Drop the folder's pages from the page cache (clean pages only: fsync first)."""
    for path in files_of(folder):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(folder: Path) -> Optional[int]:
    """Bytes of the folder's files in the page cache, by util-linux ``fincore`` (None without it)."""
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files_of(folder))],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in r.stdout.split("\n") if line.strip())


def measure(mode: str, folder: Path) -> Dict[str, Any]:
    """Run in a fresh interpreter: the checks of ``mode``, timed, with this process's and its children's peak RSS."""
    from data_prep.integrity import SETS
    from data_prep.prepare import prepare, read_manifest
    from metaqnn.config import build_config
    from metaqnn.search import check_data_fits, ensure_data, prep_options

    config = build_config("svhn", [], None)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "new":
        ensure_data(config, folder, None, print)
    elif mode == "all-deep":
        manifest = prepare(prep_options(config), folder, None, lambda _m: None, repair=False, deep=SETS)
        check_data_fits(config, manifest, folder)
    elif mode == "old":
        manifest = read_manifest(folder)
        assert manifest is not None
        for name in (*SETS, "train", "val"):
            old_walk(folder / manifest["sets"][name]["path"], int(manifest["sets"][name]["count"]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - t0
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "mode": mode,
        "seconds": seconds,
        "rss_before_mb": rss0,
        "rss_mb": peak_rss_mb(),
        "child_rss_mb": children.ru_maxrss / 1024,
        "read_mb": (me.ru_inblock + children.ru_inblock) * 512 / 1e6,
    }


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts again at exec (ru_maxrss keeps the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def old_walk(path: Path, count: int) -> None:
    """The walk ``quick_check_lmdb`` did before issue 25: liblmdb over the mapped file, in a forked child."""
    import lmdb

    from data_prep.lmdb_check import lmdb_file_problem

    problem = lmdb_file_problem(path)
    if problem is not None:
        raise SystemExit(f"{path}: {problem}")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
            with env.begin() as txn:
                walked = sum(1 for _ in txn.cursor().iternext(keys=True, values=False))
                next(iter(txn.cursor()), None)
            code = 0 if walked == count else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"{path}: the old walk failed (status {status})")


def timed_run(mode: str, folder: Path) -> Dict[str, Any]:
    evict(folder)
    left = cached_bytes(folder)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, __file__, "--measure", mode, "--data", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode}: the checks failed: {r.stderr.strip() or r.stdout.strip()}")
    result: Dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    result.update(cached_before_mb=None if left is None else left / 1e6, process_wall_s=wall)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/bench-startup")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="new,all-deep,old", help="comma-separated: new, all-deep, old")
    ap.add_argument("--keep", action="store_true", help="keep the data folder (a later run reuses it)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.data))))
        return
    if args.write:
        write_folder(Path(args.data))
        return
    out = Path(args.out)
    folder = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    if not (folder / "manifest.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        # in another process: the 6 GB it takes would otherwise be where every measuring process starts
        subprocess.run([sys.executable, __file__, "--write", "--data", str(folder)], cwd=ROOT, check=True)
        print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s")
    sizes = {p.parent.name: p.stat().st_size for p in folder.glob("*.lmdb/data.mdb")}
    print("sizes: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(sizes.items())))
    runs = []
    try:
        for i in range(args.repeats):
            for mode in args.modes.split(","):
                runs.append({"repeat": i, **timed_run(mode, folder)})
                r = runs[-1]
                print(
                    f"{mode:8} #{i}: {r['seconds']:6.2f} s  read {r['read_mb']:7.1f} MB  rss {r['rss_mb']:5.0f} MB  "
                    f"child rss {r['child_rss_mb']:5.0f} MB  cached before {r['cached_before_mb']} MB"
                )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {}
    print(f"\n{'mode':10}{'median s':>10}{'max s':>8}{'read MB':>9}{'rss MB':>8}{'child MB':>10}")
    for mode in args.modes.split(","):
        mine = [r for r in runs if r["mode"] == mode]
        secs = sorted(r["seconds"] for r in mine)
        summary[mode] = {
            "median_s": secs[len(secs) // 2],
            "max_s": secs[-1],
            "read_mb": max(r["read_mb"] for r in mine),
            "rss_mb": max(r["rss_mb"] for r in mine),
            "child_rss_mb": max(r["child_rss_mb"] for r in mine),
        }
        s = summary[mode]
        print(
            f"{mode:10}{s['median_s']:10.2f}{s['max_s']:8.2f}{s['read_mb']:9.1f}{s['rss_mb']:8.0f}"
            f"{s['child_rss_mb']:10.0f}"
        )
    report = {"sizes_bytes": sizes, "runs": runs, "summary": summary, "target_s": 3.0}
    (out / "startup_checks.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'startup_checks.json'}")


if __name__ == "__main__":
    main()
