"""Issue 25: data preparation in chunks, with streamed statistics, writes what the whole-array code wrote.

The reference below is the pre-issue-25 code, verbatim: it held whole float64 copies of a set.
Chunk sizes 7 and 64 divide none of the sets, so every set ends in a short chunk.
"""

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_prep import preprocess
from data_prep.lmdb_writer import iter_lmdb, write_lmdb
from data_prep.prepare import KEY_DIGITS, PADDED_SETS, PrepOptions, prepare
from data_prep.sources import CIFAR_RECORD, DataError, read_dataset
from data_prep.split import stratified_split
from metaqnn.caffe.schema import load_schema
from tests.conftest import ROOT

CHUNKS = (7, 64)


# -- the whole-array reference (data_prep before issue 25) ------------------------------------------


def old_fit(method, train):
    if method == "none":
        return lambda x: x
    if method == "mean":
        mean = train.astype(np.float64).mean(axis=0)
        return lambda x: (x.astype(np.float64) - mean).astype(np.float32)
    if method == "gcn":
        return preprocess.global_contrast_normalize
    if method == "lcn":
        return preprocess.local_contrast_normalize
    flat = train.reshape(len(train), -1).astype(np.float64) / 255.0
    mean = flat.mean(axis=0)
    cov = np.cov(flat - mean, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    w = (u * (1.0 / np.sqrt(s + 0.1))) @ u.T

    def apply(x):
        f = x.reshape(len(x), -1).astype(np.float64) / 255.0
        return ((f - mean) @ w).reshape(x.shape).astype(np.float32)

    return apply


def old_build(data, options, out):
    """The LMDBs the old ``build`` wrote: whole arrays, train + extra concatenated."""
    full = data.sets["train"]
    if "extra" in data.sets:
        extra = data.sets["extra"]
        finetune = (np.concatenate([full.images, extra.images]), np.concatenate([full.labels, extra.labels]))
    else:
        finetune = (full.images, full.labels)
    rest, val = stratified_split(full.labels, options.validation_size, options.seed)
    order = np.random.Generator(np.random.PCG64(options.seed + 1)).permutation(rest)
    explore = (full.images[order], full.labels[order])
    transform = old_fit(options.preprocess, explore[0])
    transform_full = old_fit(options.preprocess, finetune[0]) if options.preprocess in ("mean", "zca") else transform
    sets = {
        "train": (explore, transform),
        "val": ((full.images[val], full.labels[val]), transform),
        "train_full": (finetune, transform_full),
        "test": ((data.sets["test"].images, data.sets["test"].labels), transform_full),
    }
    out.mkdir()
    for name, ((images, labels), fn) in sets.items():
        x = preprocess.pad(fn(images), options.pad if name in PADDED_SETS else 0)
        write_lmdb(out / f"{name}.lmdb", x, labels, key_digits=KEY_DIGITS.get(data.name, 8))


def records(path):
    return list(iter_lmdb(path))


def floats(path):
    datum = load_schema().Datum
    return np.stack([np.array(datum.FromString(v).float_data, np.float32) for _, v in iter_lmdb(path)])


def same_sets(ours, theirs, method):
    """Byte-identical records; for ZCA equal keys and labels, float32 values equal to the last bits."""
    report = {}
    for name in ("train", "val", "train_full", "test"):
        a, b = ours / f"{name}.lmdb", theirs / f"{name}.lmdb"
        if method != "zca":
            assert records(a) == records(b), name
            continue
        datum = load_schema().Datum
        assert [(k, datum.FromString(v).label) for k, v in records(a)] == [
            (k, datum.FromString(v).label) for k, v in records(b)
        ], name
        x, y = floats(a), floats(b)
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max())
        report[name] = float(np.mean(x == y))
    return report


# -- synthetic releases ------------------------------------------------------------------------------


def svhn_release(folder, sizes=(("train", 230), ("extra", 170), ("test", 90)), seed=0):
    """The three .mat files of SVHN's cropped digits (32x32x3xN uint8 X, labels 1..10 in y)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in sizes:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        savemat(str(folder / f"{name}_32x32.mat"), {"X": x, "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def cifar10_release(folder, per_batch, test, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", test)]:
        rec = rng.integers(0, 256, (n, CIFAR_RECORD), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        (folder / name).write_bytes(rec.tobytes())


# -- the streamed statistics -------------------------------------------------------------------------


def test_streamed_statistics_are_exact_and_do_not_depend_on_the_chunking():
    x = np.random.default_rng(0).integers(0, 256, (301, 3, 4, 4), dtype=np.uint8)
    results = []
    for size, order in (
        (1, None),
        (7, None),
        (64, None),
        (1000, None),
        (13, np.random.default_rng(1).permutation(301)),
    ):
        stats = preprocess.PixelStats(covariance=True)
        for chunk in preprocess.iter_chunks(x, size, order):
            stats.add(chunk)
        assert stats.count == 301
        results.append((stats.mean(), stats.cov()))
    for mean, cov in results[1:]:  # exact sums: bit-identical whatever the chunks and their order
        assert np.array_equal(mean, results[0][0]) and np.array_equal(cov, results[0][1])
    mean, cov = results[0]
    assert np.array_equal(mean, x.astype(np.float64).mean(axis=0))  # the old code's mean, bit for bit
    flat = x.reshape(301, -1).astype(np.float64)
    np.testing.assert_allclose(cov, np.cov(flat, rowvar=False), rtol=1e-12, atol=1e-9)
    with pytest.raises(TypeError, match="uint8"):
        stats.add(x.astype(np.float32))


@pytest.mark.parametrize("method", preprocess.PREPROCESS)
def test_chunked_transform_matches_the_whole_array_code(method):
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (203, 3, 8, 8), dtype=np.uint8)
    other = rng.integers(0, 256, (101, 3, 8, 8), dtype=np.uint8)
    whole = old_fit(method, train)(other)
    for size in (1, *CHUNKS, 1000):
        fn = preprocess.fit(method, preprocess.iter_chunks(train, size))
        out = np.concatenate([fn(c) for c in preprocess.iter_chunks(other, size)])
        assert out.dtype == whole.dtype == preprocess.output_dtype(method) and out.shape == whole.shape
        if method == "zca":  # covariance from exact sums vs np.cov, and BLAS on short chunks: last bits
            np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)
        else:
            assert np.array_equal(out, whole), size
    assert np.array_equal(preprocess.fit(method, train)(other), preprocess.fit(method, iter([train]))(other))


# -- prepare, chunked, against the old whole-array build ---------------------------------------------


@pytest.mark.parametrize("method", preprocess.PREPROCESS)
def test_prepare_in_chunks_writes_what_the_whole_array_build_wrote(tmp_path, method):
    options = PrepOptions("digits", validation_size=300, preprocess=method, pad=2)
    old_build(read_dataset("digits", None), options, tmp_path / "old")
    for size in CHUNKS:
        manifest = prepare(options, tmp_path / str(size), log=lambda _m: None, chunk_size=size)
        assert manifest["sets"]["train"]["shape"] == [1, 12, 12] and manifest["sets"]["val"]["shape"] == [1, 8, 8]
        same = same_sets(tmp_path / str(size), tmp_path / "old", method)
        if method == "zca":  # most values are the old float32 values exactly; the rest differ in the last bits
            assert min(same.values()) > 0.5, same


@pytest.mark.parametrize("method", ["none", "mean", "gcn", "lcn"])
def test_svhn_train_full_is_train_then_extra_without_their_concatenation(tmp_path, method):
    """SVHN's reader returns transposed views of the .mat arrays; train_full is written from both."""
    svhn_release(tmp_path / "src")
    options = PrepOptions("svhn", validation_size=50, preprocess=method)
    data = read_dataset("svhn", tmp_path / "src")
    assert not data.sets["extra"].images.flags.c_contiguous  # the reader made no copy
    old_build(data, options, tmp_path / "old")
    manifest = prepare(options, tmp_path / "new", tmp_path / "src", log=lambda _m: None, chunk_size=CHUNKS[0])
    assert manifest["sets"]["train_full"]["count"] == 400 and manifest["sets"]["train"]["count"] == 180
    same_sets(tmp_path / "new", tmp_path / "old", method)


def test_cifar10_reader_fills_one_array_file_by_file(tmp_path):
    cifar10_release(tmp_path, 30, 20)
    data = read_dataset("cifar10", tmp_path)
    train = data.sets["train"]
    raw = np.concatenate(
        [
            np.frombuffer((tmp_path / f"data_batch_{i}.bin").read_bytes(), np.uint8).reshape(-1, CIFAR_RECORD)
            for i in range(1, 6)
        ]
    )
    assert np.array_equal(train.images.reshape(150, -1), raw[:, 1:]) and np.array_equal(train.labels, raw[:, 0])
    (tmp_path / "data_batch_3.bin").write_bytes(bytes(CIFAR_RECORD + 1))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: size 3074 is not a multiple"):
        read_dataset("cifar10", tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError, match=r"missing test_batch\.bin"):
        read_dataset("cifar10", tmp_path)


# -- the writer's chunks -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_write_lmdb_takes_chunks_and_writes_what_one_array_writes(tmp_path, dtype):
    rng = np.random.default_rng(3)
    images = (rng.integers(0, 256, (2508, 2, 3, 3)) - (0 if dtype == np.uint8 else 100)).astype(dtype)
    labels = rng.integers(0, 10, 2508)
    assert write_lmdb(tmp_path / "whole.lmdb", images, labels, key_digits=5) == 2508
    cuts = [0, 1, 1000, 1001, 2500, 2508]  # across the 1,000-record commits
    chunks = [(images[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert write_lmdb(tmp_path / "chunks.lmdb", iter(chunks), key_digits=5) == 2508  # no count: the map grows
    assert write_lmdb(tmp_path / "counted.lmdb", chunks, key_digits=5, count=2508) == 2508
    whole = records(tmp_path / "whole.lmdb")
    assert records(tmp_path / "chunks.lmdb") == whole == records(tmp_path / "counted.lmdb")
    assert whole[-1][0] == b"02507"
    write_lmdb(tmp_path / "empty.lmdb", iter([]))
    assert records(tmp_path / "empty.lmdb") == []


def test_write_lmdb_grows_its_map_for_chunks_of_unknown_total(tmp_path):
    images = np.zeros((1100, 1, 256, 256), np.uint8)  # 72 MB: more than the first 64 MB map
    images[:, 0, 0, 0] = np.arange(1100) % 256
    labels = np.arange(1100) % 10
    write_lmdb(tmp_path / "big.lmdb", ((images[a : a + 300], labels[a : a + 300]) for a in range(0, 1100, 300)))
    got = records(tmp_path / "big.lmdb")
    datum = load_schema().Datum
    assert len(got) == 1100 and datum.FromString(got[1099][1]).data[0] == 1099 % 256


def _anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def test_writing_uint8_records_does_not_grow_memory(tmp_path):
    """One Datum message for a whole set kept every record's bytes in upb's arena (3 KB a record)."""
    chunk = np.random.default_rng(5).integers(0, 256, (2000, 3, 32, 32), dtype=np.uint8)
    seen = []

    def stream():
        for _ in range(20):  # 40,000 records: 120 MB when every record's bytes stay in memory
            seen.append(_anon_mib())
            yield chunk, np.zeros(len(chunk), np.int64)

    write_lmdb(tmp_path / "x.lmdb", stream(), count=40000)
    assert seen[-1] - seen[1] < 30, seen


def test_an_interrupted_chunk_stream_leaves_no_lmdb(tmp_path):
    def stream():
        for _ in range(3):
            yield np.zeros((700, 1, 2, 2), np.uint8), np.zeros(700, np.int64)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_lmdb(tmp_path / "x.lmdb", stream())
    with pytest.raises(ValueError, match="after"):
        write_lmdb(
            tmp_path / "y.lmdb",
            [(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(2))] * 2 + [(np.zeros((2, 1, 3, 3), np.uint8), np.zeros(2))],
        )
    with pytest.raises(ValueError, match="labels"):
        write_lmdb(tmp_path / "z.lmdb", [(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(3))])
    assert list(tmp_path.iterdir()) == []


# -- memory: no whole-set float array ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import lmdb, scipy.ndimage
    from data_prep.prepare import PrepOptions, prepare
    from metaqnn.caffe.schema import load_schema

    def peak_kib():  # this process's own peak (ru_maxrss would include the parent's, across exec)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])

    load_schema()
    before = peak_kib()
    prepare(PrepOptions("cifar10", validation_size=5000, preprocess=sys.argv[4], pad=5), Path(sys.argv[3]),
            Path(sys.argv[2]), log=lambda _m: None, chunk_size=512)
    print(json.dumps({"before_kib": before, "after_kib": peak_kib()}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean", "lcn"])
def test_prepare_holds_no_whole_set_float_array(tmp_path, method):
    """40,000 CIFAR-10-format images: a float64 copy of train_full alone would be 860 MB."""
    cifar10_release(tmp_path / "src", 7000, 5000)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(tmp_path / "src"), str(tmp_path / "out"), method],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (rss["after_kib"] - rss["before_kib"]) * 1024
    uint8_release = 40000 * 3072
    float32_train_full = 35000 * 3 * 42 * 42 * 4  # the padded float32 set the old code held whole
    print(f"{method}: peak RSS grew {grown / 1e6:.0f} MB (uint8 release {uint8_release / 1e6:.0f} MB)")
    assert grown < uint8_release + 0.25 * float32_train_full, grown
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sets"]["train_full"]["count"] == 35000 and manifest["sets"]["train"]["shape"] == [3, 42, 42]


def test_idx_release_unchanged_by_chunking(tmp_path):
    """MNIST's uint8 LMDBs do not depend on the chunk size (the IDX reader returns a view)."""
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    for prefix, n in (("train", 900), ("t10k", 130)):
        (src / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
        )
        (src / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + rng.integers(0, 10, n).astype(np.uint8).tobytes()
        )
    options = PrepOptions("mnist", validation_size=100)
    prepare(options, tmp_path / "a", src, log=lambda _m: None, chunk_size=7)
    prepare(options, tmp_path / "b", src, log=lambda _m: None, chunk_size=100000)
    for name in ("train", "val", "train_full", "test"):
        assert records(tmp_path / "a" / f"{name}.lmdb") == records(tmp_path / "b" / f"{name}.lmdb")
