"""Issue 12, data and store: a damaged data folder, a config that does not fit it, a full disk, a corrupt,
foreign or read-only experiment store and an unwritable output folder each end in one ``error:`` line and
exit status 2 -- no traceback, no crash, nothing half-created -- or, for ``prepare``, in a rebuild."""

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import lmdb
import numpy as np
import pytest

from data_prep.integrity import check_manifest_matches, prepare_lock
from data_prep.lmdb_check import lmdb_file_problem
from data_prep.lmdb_writer import check_lmdb, iter_lmdb, quick_check_lmdb
from data_prep.prepare import PrepOptions, prepare
from data_prep.sources import DataError
from metaqnn.caffe.schema import load_schema
from metaqnn.cli import main
from metaqnn.config import build_config
from qagent.agent import Agent
from qagent.errors import ConfigError, StoreError
from qagent.outdir import OutputError
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ----------------------------------------------------------------------------------


def run(capsys, *args: str) -> Tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(capsys, *args: str, says: Tuple[str, ...] = ()) -> str:
    """Run the CLI in this process (an uncaught exception fails the test): exit 2, one ``error:`` line."""
    code, out, err = run(capsys, *args)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in says:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def records(path: Path) -> list:
    return list(iter_lmdb(path))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a fresh tmpfs folder (needs root: a small disk to fill, a file system to make read-only)."""
    mounted: List[Path] = []

    def mount(name: str, size: str = "4m") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def small_experiment(exp: Path, results: int = 3) -> Path:
    """A digits experiment with a few recorded (made-up) results: enough for status, export and report."""
    cfg = build_config("digits", [], None)
    with ExperimentStore.open(exp / "store.sqlite", cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        for i in range(results):
            p = agent.propose()
            store.begin_model(agent, p)
            agent.observe(p.arch, p.encoded, 0.5 + i / 10, p.epsilon)
            store.record_result(agent, p, "done", 0.5 + i / 10, {"learning_rate": 0.01})
    return exp


# -- truncated and corrupt LMDBs -----------------------------------------------------------------


def test_truncated_lmdb_is_caught_before_it_is_mapped_and_prepare_rebuilds_it(data, digits_data, capsys, tmp_path):
    original = records(digits_data[0] / "val.lmdb")
    mdb = data / "val.lmdb" / "data.mdb"
    size = mdb.stat().st_size
    with open(mdb, "r+b") as fh:
        fh.truncate(size // 2)
    message = f"truncated: data.mdb has {size // 2} bytes, its meta page says {size}"
    assert lmdb_file_problem(data / "val.lmdb") == message
    # mapping it would have killed this process with SIGBUS
    with pytest.raises(DataError, match=message):
        quick_check_lmdb(data / "val.lmdb", 300)
    with pytest.raises(DataError, match=message):
        check_lmdb(data / "val.lmdb", 300, 10)
    # search refuses it (and creates no experiment); prepare rebuilds it instead of calling it prepared
    one_line(capsys, "search", "--exp", tmp_path / "exp", "--data-dir", data, says=("val.lmdb", "truncated"))
    assert not (tmp_path / "exp").exists()
    code, out, _ = run(capsys, "prepare", "--data-dir", data)
    assert code == 0 and "val.lmdb: truncated" in out and "rebuilding" in out
    assert records(data / "val.lmdb") == original
    code, out, _ = run(capsys, "prepare", "--data-dir", data)
    assert code == 0 and "already prepared" in out


def test_search_on_a_truncated_lmdb_exits_2_instead_of_dying_of_sigbus(data, tmp_path):
    with open(data / "train.lmdb" / "data.mdb", "r+b") as fh:
        fh.truncate(3 * 4096)
    r = subprocess.run(
        [sys.executable, "-m", "metaqnn", "search", "--exp", str(tmp_path / "exp"), "--data-dir", str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)  # was 135 (SIGBUS)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.lmdb: truncated" in lines[0], r.stderr
    assert not (tmp_path / "exp").exists()


def test_a_corrupt_page_is_one_error_not_a_crash(data, digits_data):
    mdb = data / "train.lmdb" / "data.mdb"
    raw = bytearray(mdb.read_bytes())
    raw[3 * 4096 : 4 * 4096] = bytes(4096)  # a zeroed leaf page: LMDB aborts on an assertion walking it
    mdb.write_bytes(bytes(raw))
    assert lmdb_file_problem(data / "train.lmdb") is None  # the size is right: only reading finds it
    with pytest.raises(DataError, match=r"train\.lmdb: corrupt LMDB"):
        quick_check_lmdb(data / "train.lmdb", 1197)
    log: List[str] = []
    prepare(PrepOptions("digits", validation_size=300), data, log=log.append)
    assert any("train.lmdb: corrupt LMDB" in line and "rebuilding" in line for line in log), log
    assert records(data / "train.lmdb") == records(digits_data[0] / "train.lmdb")


def _not_datums(path: Path) -> None:
    shutil.rmtree(path)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(300):
            txn.put(b"%08d" % i, b"\xff\xff\xff\xff")
    env.close()


def _wrong_shape(path: Path) -> None:
    shutil.rmtree(path)
    datum = load_schema().Datum
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(300):
            txn.put(b"%08d" % i, datum(channels=3, height=4, width=4, data=bytes(48), label=1).SerializeToString())
    env.close()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: shutil.rmtree(p), "val.lmdb: missing"),
        (lambda p: (p / "data.mdb").unlink(), "no data.mdb"),
        (lambda p: (shutil.rmtree(p), p.write_text("not a folder")), "it is a file"),
        (lambda p: (p / "data.mdb").write_bytes(bytes(5000)), "no valid meta page"),
        (
            lambda p: shutil.copytree(p.parent / "train.lmdb", p, dirs_exist_ok=True),
            "1197 records, the manifest says 300",
        ),
        (_not_datums, "first record is not a valid Datum"),
        (_wrong_shape, "first record is a 3x4x4 Datum, the manifest says 1x8x8"),
    ],
    ids=["missing", "no-data.mdb", "a-file", "zeros", "wrong-set", "not-datums", "wrong-shape"],
)
def test_a_damaged_set_is_refused_by_search_and_rebuilt_by_prepare(data, digits_data, capsys, tmp_path, damage, says):
    damage(data / "val.lmdb")
    one_line(capsys, "search", "--exp", tmp_path / "exp", "--data-dir", data, says=("val.lmdb", says))
    assert not (tmp_path / "exp").exists()
    code, out, err = run(capsys, "prepare", "--data-dir", data)
    assert code == 0 and "rebuilding" in out, out + err
    assert records(data / "val.lmdb") == records(digits_data[0] / "val.lmdb")


# -- manifests and data folders ------------------------------------------------------------------


def _manifest(edit):
    def apply(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        edit(m)
        (folder / "manifest.json").write_text(json.dumps(m))

    return apply


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: (f / "manifest.json").write_text("{not json"), "corrupt manifest"),
        (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"), "corrupt manifest"),
        (lambda f: (f / "manifest.json").write_text("[1, 2]"), "a JSON list, not an object"),
        (_manifest(lambda m: m.pop("sets")), "no sets"),
        (_manifest(lambda m: m["sets"].pop("test")), "no test set"),
        (_manifest(lambda m: m["sets"]["train"].update(path="../../elsewhere")), "is not a name inside the folder"),
        (_manifest(lambda m: m["sets"]["val"].update(count="300")), "val.count '300'"),
        (_manifest(lambda m: m["sets"]["val"].update(shape=[1, 8])), "is not [channels, height, width]"),
        (_manifest(lambda m: m["sets"]["test"].pop("dtype")), "test.dtype None"),
        (lambda f: ((f / "manifest.json").unlink(), (f / "manifest.json").mkdir()), "corrupt manifest"),
        (lambda f: ((f / "manifest.json").unlink(), os.mkfifo(f / "manifest.json")), "not a regular file"),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "a-list",
        "no-sets",
        "no-test",
        "path-escapes",
        "count-text",
        "short-shape",
        "no-dtype",
        "a-dir",
        "a-fifo",
    ],
)
def test_a_garbage_manifest_is_one_line_everywhere_and_deletes_nothing(data, capsys, tmp_path, damage, says):
    damage(data)
    before = tree(data)
    for args in (
        ["prepare", "--data-dir", data],
        ["search", "--exp", tmp_path / "exp", "--data-dir", data],
        ["render", "--arch", "[SM(10)]", "--out", tmp_path / "r", "--data-dir", data],
    ):
        one_line(capsys, *args, says=("manifest.json", says))
    assert tree(data) == before and not (tmp_path / "exp").exists() and not (tmp_path / "r").exists()


def test_a_data_folder_that_is_a_file(capsys, tmp_path):
    (tmp_path / "data").write_text("x")
    for args in (
        ["prepare", "--data-dir", tmp_path / "data"],
        ["search", "--exp", tmp_path / "e", "--data-dir", tmp_path / "data"],
    ):
        one_line(capsys, *args, says=(f"data folder {tmp_path / 'data'} is not a folder",))
    assert (tmp_path / "data").read_text() == "x" and not (tmp_path / "e").exists()


# -- the config against the prepared data ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("space.image_size=32", "space.image_size is 32, but the prepared data in {data} has 8x8 images"),
        ("dataset.channels=3", "dataset.channels is 3, but the prepared data in {data} has 1-channel images"),
        ("space.num_classes=5", "space.num_classes is 5, but the prepared data in {data} has 10 classes"),
        ("render.crop_size=6", "space.image_size is 8, but render.crop_size 6 makes the net's input 6x6"),
    ],
)
def test_a_config_that_does_not_fit_the_data_is_refused_before_the_experiment_exists(
    data, capsys, tmp_path, override, says
):
    exp = tmp_path / "exp"
    one_line(capsys, "search", "--exp", exp, "--data-dir", data, "--set", override, says=(says.format(data=data),))
    assert not exp.exists()


def test_check_manifest_matches_follows_the_crop():
    manifest = {"num_classes": 10, "sets": {n: {"shape": [3, 42, 42]} for n in ("train", "val", "train_full", "test")}}
    check_manifest_matches(manifest, 32, 3, 10, crop_size=32)  # CIFAR-10: 5-pixel padding, 32x32 crops
    check_manifest_matches(manifest, 42, 3, 10)
    with pytest.raises(ConfigError, match=r"space\.image_size is 32, but the prepared data has 42x42 images"):
        check_manifest_matches(manifest, 32, 3, 10)
    with pytest.raises(ConfigError, match=r"render\.crop_size is 48, larger than the 42x42 images"):
        check_manifest_matches(manifest, 48, 3, 10, crop_size=48)
    manifest["sets"]["test"]["shape"] = [3, 32, 32]
    with pytest.raises(DataError, match=r"set test has shape \[3, 32, 32\], train has \[3, 42, 42\]"):
        check_manifest_matches(manifest, 32, 3, 10, crop_size=32)


# -- a full disk -----------------------------------------------------------------------------------------


def test_disk_full_during_prepare_is_one_line_and_leaves_nothing(capsys, tmpfs):
    disk = tmpfs("disk", "256k")  # the digits LMDBs need about 420 kB
    line = one_line(capsys, "prepare", "--data-dir", disk / "d", says=("no space left on device",))
    assert str(disk / "d") in line and tree(disk) == []  # the folder it made is gone
    (disk / "mine").mkdir()
    one_line(capsys, "search", "--exp", disk / "exp", "--data-dir", disk / "mine", says=("no space left on device",))
    assert tree(disk) == ["mine"]  # an existing folder: the sets written before the disk filled are removed


def test_disk_full_injected_while_writing_the_manifest(tmp_path, monkeypatch):
    """The same without a tmpfs: the manifest write fails with ENOSPC after all four LMDBs were written."""
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=f"cannot write to data folder {tmp_path / 'd'}: no space left on device"):
        prepare(PrepOptions("digits", validation_size=300), tmp_path / "d", log=lambda _m: None)
    assert tree(tmp_path) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(OutputError, match="no space left on device"):
        prepare(PrepOptions("digits", validation_size=300), tmp_path / "kept", log=lambda _m: None)
    assert tree(tmp_path) == ["kept"]


def test_disk_full_for_the_experiment_store_and_the_outputs(data, capsys, tmp_path, tmpfs):
    disk = tmpfs("disk", "64k")
    (disk / "filler").write_bytes(b"\0" * (64 << 10))  # as much as fits
    one_line(capsys, "search", "--exp", disk / "exp", "--data-dir", data, says=("store.sqlite", "no space left"))
    exp = small_experiment(tmp_path / "exp")
    one_line(capsys, "report", "--exp", exp, "--out", disk / "report", says=(str(disk / "report"), "no space left"))
    one_line(capsys, "export", "--exp", exp, "--out", disk / "export", says=(str(disk / "export"), "no space left"))
    assert tree(disk) == ["filler"]


def test_disk_full_while_a_search_records_a_result(tmpfs):
    """A result that cannot be committed stops the search with one line; the store keeps what it had."""
    exp = small_experiment(tmpfs("disk", "1m"), results=1)
    cfg = build_config("digits", [], None)
    store = ExperimentStore.open(exp / "store.sqlite", cfg.to_dict())
    agent = Agent(cfg.space, cfg.schedule, cfg.agent)
    store.load_agent(agent)
    with open(exp / "filler", "wb", buffering=0) as fh:  # fill the disk to the last byte
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(StoreError, match=f"cannot write experiment store {exp / 'store.sqlite'}: no space left"):
        for _ in range(200):
            p = agent.propose()
            store.begin_model(agent, p)
            agent.observe(p.arch, p.encoded, 0.5, p.epsilon)
            store.record_result(agent, p, "done", 0.5, {"padding": "x" * 20000})
    store.close()
    (exp / "filler").unlink()
    with ExperimentStore.open(
        exp / "store.sqlite", cfg.to_dict()
    ) as store:  # consistent: each result with its sample row
        done = {m.arch for m in store.models("done")}
        assert len(done) >= 1 and done == {r["arch"] for r in store.samples()}
        assert all(m.status in ("done", "running") for m in store.models())


# -- corrupt, foreign, misplaced and read-only stores -------------------------------------------------------


def _random_bytes(store: Path) -> None:
    store.parent.mkdir(parents=True)
    store.write_bytes(np.random.default_rng(0).integers(0, 256, 50000, dtype=np.uint8).tobytes())


def _foreign(store: Path) -> None:
    import sqlite3

    store.parent.mkdir(parents=True)
    conn = sqlite3.connect(str(store))
    conn.execute("CREATE TABLE photos(name TEXT)")
    conn.commit()
    conn.close()


def _bad_config(store: Path) -> None:
    small_experiment(store.parent)
    import sqlite3

    conn = sqlite3.connect(str(store))
    conn.execute("UPDATE meta SET value = '[1, 2]' WHERE key = 'config'")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_random_bytes, "is not a readable experiment store (file is not a database)"),
        (lambda s: s.mkdir(parents=True), "is a folder, not a file"),
        (lambda s: (s.parent.mkdir(parents=True), os.mkfifo(s)), "is not a regular file"),  # SQLite would hang
        (_foreign, "not an experiment store"),
        (_bad_config, "is not a readable experiment store (its config is not a table of sections)"),
    ],
    ids=["random-bytes", "a-folder", "a-fifo", "foreign-sqlite", "config-not-a-table"],
)
def test_a_broken_store_is_one_line_in_every_command_and_is_left_alone(data, capsys, tmp_path, make, says):
    exp = tmp_path / "exp"
    store = exp / "store.sqlite"
    make(store)
    before = tree(exp)
    content = store.read_bytes() if store.is_file() else None  # (reading a FIFO would wait)
    for args in (
        ["search", "--exp", exp, "--data-dir", data],
        ["status", "--exp", exp],
        ["export", "--exp", exp],
        ["report", "--exp", exp],
    ):
        one_line(capsys, *args, says=(str(store), says))
    companions = ("store.sqlite-wal", "store.sqlite-shm")  # SQLite's own, as after reading any store
    assert [f for f in tree(exp) if f not in companions] == before  # no lock file, no export or report folder
    assert content is None or store.read_bytes() == content


def test_a_read_only_experiment_is_readable_and_refuses_writes_in_one_line(data, capsys, tmpfs):
    """A read-only mount: root ignores permission bits, not EROFS."""
    exp = small_experiment(tmpfs("exp"))
    remount_read_only(exp)
    code, out, err = run(capsys, "status", "--exp", exp)  # reading needs no write access
    assert code == 0 and "3/" in out and "top models" in out, out + err
    one_line(capsys, "search", "--exp", exp, "--data-dir", data, says=(str(exp), "read-only file system"))
    one_line(capsys, "export", "--exp", exp, says=(str(exp / "export"), "read-only file system"))
    one_line(capsys, "report", "--exp", exp, says=(str(exp / "report"), "read-only file system"))
    one_line(
        capsys,
        "render",
        "--arch",
        "[SM(10)]",
        "--out",
        exp / "render",
        says=(str(exp / "render"), "read-only file system"),
    )
    one_line(capsys, "prepare", "--data-dir", exp / "data", says=(str(exp / "data"), "read-only file system"))


def test_prepared_data_on_a_read_only_disk_is_used_as_it_is(digits_data, capsys, tmpfs):
    disk = tmpfs("data")
    shutil.copytree(digits_data[0], disk, dirs_exist_ok=True)
    remount_read_only(disk)
    code, out, err = run(capsys, "prepare", "--data-dir", disk)
    assert code == 0 and "already prepared" in out, out + err
    with open(disk / "train.lmdb" / "data.mdb", "rb"):  # still readable, untouched
        pass


def test_a_read_only_store_file_refuses_the_search_at_once(data, capsys, tmp_path):
    """The store file alone is read-only (chattr +i as root, chmod otherwise); the folder stays writable."""
    exp = small_experiment(tmp_path / "exp")
    store = exp / "store.sqlite"
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
    else:
        store.chmod(0o444)
    try:
        one_line(capsys, "search", "--exp", exp, "--data-dir", data, says=(str(store), "read-only"))
        code, out, _ = run(capsys, "status", "--exp", exp)
        assert code == 0 and "top models" in out
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(store)], check=True)


def test_unwritable_output_folders(data, capsys, tmp_path):
    exp = small_experiment(tmp_path / "exp")
    (tmp_path / "file").write_text("x")
    one_line(capsys, "export", "--exp", exp, "--out", tmp_path / "file", says=(f"{tmp_path / 'file'} is not a folder",))
    one_line(capsys, "report", "--exp", exp, "--out", tmp_path / "file" / "r", says=("a parent is not a folder",))
    one_line(capsys, "render", "--arch", "[SM(10)]", "--out", tmp_path / "file", says=("is not a folder",))
    one_line(capsys, "search", "--exp", tmp_path / "file" / "e", "--data-dir", data, says=("experiment folder",))
    (tmp_path / "locked" / "store.sqlite.lock").mkdir(parents=True)
    one_line(
        capsys, "search", "--exp", tmp_path / "locked", "--data-dir", data, says=("store.sqlite", "is a directory")
    )
    with pytest.raises(StoreError, match="no experiment store"):
        ExperimentStore.open_readonly(tmp_path / "nothing" / "store.sqlite")
    assert (tmp_path / "file").read_text() == "x"


def test_three_prepares_at_once_write_the_folder_once(tmp_path, digits_data):
    """Two searches started together on fresh data: the second waits for the first instead of colliding."""
    folder = tmp_path / "data"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "metaqnn", "prepare", "--data-dir", str(folder)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("data: wrote" in out for out in outputs) == 1, outputs
    assert tree(folder) == tree(digits_data[0])
    for name in ("train", "val", "train_full", "test"):
        assert records(folder / f"{name}.lmdb") == records(digits_data[0] / f"{name}.lmdb")


def test_prepare_lock_falls_back_to_a_lock_file_where_a_folder_cannot_be_flocked(tmp_path, monkeypatch):
    """NFS emulates flock with write locks, so a read-only folder descriptor cannot be locked there."""
    real = fcntl.flock

    def nfs_like(fd, op):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", nfs_like)
    with prepare_lock(tmp_path, lambda _m: None):
        other = os.open(str(tmp_path / ".prepare.lock"), os.O_WRONLY)
        try:
            with pytest.raises(BlockingIOError):
                real(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a second prepare would wait
        finally:
            os.close(other)
