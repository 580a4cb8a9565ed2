"""Issue 25: start-up integrity checks walk what the command reads, once, and check the rest cheaply.

A search start (or resume) walks train and val page by page and checks train_full and test by
their meta pages, root page and manifest; ``metaqnn prepare`` walks everything; ``train`` and
``transfer`` walk the two sets their protocol reads.  Damage that shows in an unread set's meta
pages or size (truncation, a zeroed meta or root page, another set's records) is still one
``error:`` line naming the file; a corrupt leaf page is found by the walk of a set that is read.
"""

import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, List, Tuple

import lmdb
import pytest

import data_prep.lmdb_writer as lmdb_writer
from data_prep.integrity import SETS, damaged_sets
from data_prep.lmdb_check import lmdb_meta_problem, lmdb_walk
from data_prep.prepare import PrepOptions, prepare, read_manifest
from data_prep.sources import DataError
from metaqnn.cli import main
from metaqnn.config import build_config
from metaqnn.search import ensure_data

PAGE = 4096


@pytest.fixture
def walks(monkeypatch) -> Counter:
    """How many times each set is walked page by page (by name), however the walk is reached."""
    seen: Counter = Counter()
    real = lmdb_writer.lmdb_walk

    def counting(path: Path, expected_count: int) -> Tuple[object, object]:
        seen[Path(path).name.replace(".lmdb", "")] += 1
        return real(path, expected_count)

    monkeypatch.setattr(lmdb_writer, "lmdb_walk", counting)
    return seen


def one_line(capsys, *args: object) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def mdb(folder: Path, name: str) -> Path:
    return folder / f"{name}.lmdb" / "data.mdb"


def overwrite(path: Path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)


def tree_pages(path: Path) -> Tuple[int, int]:
    """(the root page, the first leaf page) of an LMDB's main database, read as lmdb_check does."""
    raw = path.read_bytes()
    meta = max((raw[0:PAGE], raw[PAGE : 2 * PAGE]), key=lambda m: struct.unpack_from("=Q", m, 144)[0])
    depth, root = struct.unpack_from("=H", meta, 94)[0], struct.unpack_from("=Q", meta, 128)[0]
    pgno = root
    for _ in range(depth - 1):  # down the first child of each branch page
        (off,) = struct.unpack_from("=H", raw, pgno * PAGE + 16)
        lo, hi, flags = struct.unpack_from("=HHH", raw, pgno * PAGE + off)
        pgno = lo | hi << 16 | flags << 32
    return root, pgno


def search_error(capsys, data: Path, tmp_path: Path) -> str:
    line = one_line(capsys, "search", "--exp", tmp_path / "exp", "--data-dir", data)
    assert not (tmp_path / "exp").exists()
    return line


# -- what each command walks -----------------------------------------------------------------------


def test_a_search_start_walks_train_and_val_once_and_nothing_else(data, walks):
    ensure_data(build_config("digits", [], None), data, None, lambda _m: None)
    assert walks == Counter({"train": 1, "val": 1})


def test_prepare_still_walks_every_set_once(data, walks):
    log: List[str] = []
    prepare(PrepOptions("digits", validation_size=300), data, log=log.append)
    assert walks == Counter({name: 1 for name in SETS}) and any("already prepared" in m for m in log)


def test_a_transfer_walks_the_protocols_sets_once_for_all_its_cells(data, walks):
    from metaqnn.transfer import Target, plan_for
    from metaqnn.transfer_source import SourceModel
    from qagent.arch import parse_architecture

    source = SourceModel(parse_architecture("[C(8,3,1), SM(10)]"))
    target = Target(build_config("digits", [], None), data)
    walked: set = set()
    plans = [plan_for(source, target, "scratch", None, None, lambda _m: None, walked) for _ in range(2)]
    read = {plans[0].protocol.train_set, plans[0].protocol.test_set}
    assert read == {"train_full", "test"} and walks == Counter({name: 1 for name in read})


# -- damage an unread set shows in its meta pages: the cheap check ---------------------------------


def _truncate(folder: Path) -> None:
    path = mdb(folder, "train_full")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _zero_root(folder: Path) -> None:
    root, _ = tree_pages(mdb(folder, "train_full"))
    overwrite(mdb(folder, "train_full"), root * PAGE, bytes(PAGE))


def _another_set(folder: Path) -> None:
    shutil.rmtree(folder / "test.lmdb")
    shutil.copytree(folder / "train.lmdb", folder / "test.lmdb")


def _too_small(folder: Path) -> None:
    shutil.rmtree(folder / "test.lmdb")
    env = lmdb.open(str(folder / "test.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(300):
            txn.put(b"%08d" % i, b"\x08\x01")
    env.close()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate, "train_full.lmdb: truncated: data.mdb has"),
        (
            lambda f: overwrite(mdb(f, "test"), 0, bytes(PAGE)),
            "test.lmdb: not an LMDB (data.mdb has no valid meta page",
        ),
        (
            lambda f: overwrite(mdb(f, "test"), PAGE, bytes(PAGE)),
            "test.lmdb: not an LMDB (data.mdb has no valid second",
        ),
        (_zero_root, "train_full.lmdb: corrupt LMDB (root page"),
        (_another_set, "test.lmdb: 1197 records, the manifest says 300"),
        (_too_small, "test.lmdb: too small: its "),
    ],
    ids=["truncated-train_full", "zeroed-meta-of-test", "zeroed-second-meta", "zeroed-root", "other-set", "too-small"],
)
def test_damage_to_an_unread_set_is_one_line_naming_it_without_a_walk(
    data, capsys, tmp_path, walks, damage: Callable[[Path], None], says: str
):
    damage(data)
    line = search_error(capsys, data, tmp_path)
    assert says in line and str(data) in line and "run `metaqnn prepare`" in line, line
    assert set(walks) <= {"train", "val"}  # the damaged set was never walked
    code = main(["prepare", "--data-dir", str(data)])  # and prepare rebuilds it
    out, _ = capsys.readouterr()
    assert code == 0 and "rebuilding" in out, out
    assert damaged_sets(data, read_manifest(data) or {}) == []


# -- damage only reading finds: the deep check of the sets a command reads -------------------------


def _garbage_leaf(path: Path) -> None:
    _, leaf = tree_pages(path)
    overwrite(path, leaf * PAGE, bytes(range(256)) * (PAGE // 256))


def _bad_node_offsets(path: Path) -> None:
    _, leaf = tree_pages(path)
    overwrite(path, leaf * PAGE + 16, b"\xff" * 16)  # the page header stays: only its node table is wrong


@pytest.mark.parametrize("damage", [_garbage_leaf, _bad_node_offsets], ids=["garbage-leaf", "bad-node-offsets"])
def test_a_corrupt_leaf_page_of_train_is_found_by_the_deep_check(data, capsys, tmp_path, damage):
    damage(mdb(data, "train"))
    assert lmdb_meta_problem(data / "train.lmdb", 1197, 64) is None  # the meta pages cannot tell
    with pytest.raises(DataError, match=r"train\.lmdb: corrupt LMDB \((page|leaf page) \d+"):
        lmdb_writer.quick_check_lmdb(data / "train.lmdb", 1197, [1, 8, 8], 10)
    line = search_error(capsys, data, tmp_path)
    assert "train.lmdb: corrupt LMDB" in line, line


def test_a_corrupt_leaf_page_of_an_unread_set_is_left_to_the_command_that_reads_it(data, walks):
    _garbage_leaf(mdb(data, "train_full"))
    ensure_data(build_config("digits", [], None), data, None, lambda _m: None)  # the search does not read it
    manifest = read_manifest(data)
    assert manifest is not None
    assert damaged_sets(data, manifest, deep=("train_full",))[0].startswith("train_full.lmdb: corrupt LMDB")
    log: List[str] = []
    prepare(PrepOptions("digits", validation_size=300), data, log=log.append)
    assert any("train_full.lmdb: corrupt LMDB" in m and "rebuilding" in m for m in log), log


# -- the walk itself (no Caffe) --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_the_walk_accepts_lmdbs_grown_by_overwrites_deletes_and_big_values(tmp_path, seed):
    """No false alarm on a valid LMDB that is not append-written: random keys, values inline and
    over several overflow pages, values overwritten by smaller ones, deletes, several transactions."""
    import random

    rng = random.Random(seed)

    def randbytes(n: int) -> bytes:  # random.Random.randbytes is Python 3.9
        return rng.getrandbits(8 * n).to_bytes(n, "little")

    env = lmdb.open(str(tmp_path / "x.lmdb"), map_size=1 << 27)
    kept = {}
    for _ in range(3):
        with env.begin(write=True) as txn:
            for _ in range(800):
                key, value = randbytes(rng.randint(1, 30)), randbytes(rng.choice([5, 900, 3000, 9000]))
                txn.put(key, value)
                kept[key] = value
            for key in rng.sample(sorted(kept), 50):
                txn.put(key, b"small")  # an overflow run now longer than its value needs
                kept[key] = b"small"
    env.close()
    problem, first = lmdb_walk(tmp_path / "x.lmdb", len(kept))
    assert problem is None and first == kept[min(kept)]
    assert lmdb_walk(tmp_path / "x.lmdb", len(kept) + 1)[0] == f"{len(kept)} records, the manifest says {len(kept) + 1}"
