"""Issue 6: datasets to LMDB, checked against Caffe's own converters."""

import gzip
import json
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import lmdb_writer
from data_prep.lmdb_writer import check_lmdb, iter_lmdb, write_lmdb
from data_prep.prepare import PrepOptions, prepare
from data_prep.sources import CIFAR_RECORD, DataError, read_cifar_bin, read_digits, read_svhn_mat
from data_prep.split import stratified_split
from metaqnn.caffe.schema import load_schema


def write_idx(folder, prefix, images, labels, gz=False):
    img = struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()
    lab = struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()
    for name, blob in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def mnist_release(folder, n_train=1200, n_test=300, seed=0, gz=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(
        folder, "train", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train), gz
    )
    write_idx(folder, "t10k", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test), gz)


def records(path):
    return list(iter_lmdb(path))


def test_mnist_lmdb_is_byte_identical_to_convert_mnist_data(caffe, tmp_path):
    src = tmp_path / "mnist"
    mnist_release(src)
    manifest = prepare(PrepOptions("mnist", validation_size=200), tmp_path / "out", src, log=lambda _m: None)
    for ours, prefix in (("train_full", "train"), ("test", "t10k")):
        theirs = tmp_path / f"caffe_{prefix}"
        subprocess.run(
            [
                str(caffe.tool("convert_mnist_data")),
                str(src / f"{prefix}-images-idx3-ubyte"),
                str(src / f"{prefix}-labels-idx1-ubyte"),
                str(theirs),
                "--backend=lmdb",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        a, b = records(tmp_path / "out" / f"{ours}.lmdb"), records(theirs)
        assert len(a) == manifest["sets"][ours]["count"] and a == b
    assert manifest["sets"]["train"]["count"] == 1000 and manifest["sets"]["val"]["count"] == 200


def test_cifar_lmdb_is_byte_identical_to_convert_cifar_data(caffe, tmp_path):
    src = tmp_path / "cifar"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (10000, CIFAR_RECORD), dtype=np.uint8)  # the converter reads 10,000 per file
        rec[:, 0] = rng.integers(0, 10, 10000)
        (src / name).write_bytes(rec.tobytes())
    prepare(PrepOptions("cifar10", validation_size=5000), tmp_path / "out", src, log=lambda _m: None)
    out = tmp_path / "caffe"
    out.mkdir()  # convert_cifar_data creates its two LMDBs inside an existing folder
    subprocess.run(
        [str(caffe.tool("convert_cifar_data")), str(src), str(out), "lmdb"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert records(tmp_path / "out" / "train_full.lmdb") == records(out / "cifar10_train_lmdb")
    assert records(tmp_path / "out" / "test.lmdb") == records(out / "cifar10_test_lmdb")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=20, max_size=400), st.integers(1, 19), st.integers(0, 5))
def test_stratified_split_keeps_class_shares(labels, val_frac, seed):
    labels = np.array(labels)
    size = max(1, min(len(labels) - 1, len(labels) * val_frac // 20))
    rest, held = stratified_split(labels, size, seed)
    assert len(held) == size and len(np.intersect1d(rest, held)) == 0 and len(rest) + size == len(labels)
    for c in np.unique(labels):
        exact = size * np.mean(labels == c)
        assert abs(np.sum(labels[held] == c) - exact) < 1
    again = stratified_split(labels, size, seed)
    assert np.array_equal(again[1], held)


def test_rerun_is_a_noop_and_other_options_are_refused(tmp_path):
    log = []
    prepare(PrepOptions("digits", validation_size=300), tmp_path, log=log.append)
    stamp = (tmp_path / "train.lmdb" / "data.mdb").stat().st_mtime_ns
    prepare(PrepOptions("digits", validation_size=300), tmp_path, log=log.append)
    assert "already prepared" in log[-1] and (tmp_path / "train.lmdb" / "data.mdb").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="was prepared with"):
        prepare(PrepOptions("digits", validation_size=200), tmp_path, log=log.append)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    val = manifest["sets"]["val"]
    assert val["count"] == 300 and sum(val["class_counts"]) == 300
    check_lmdb(tmp_path / "val.lmdb", 300, 10)


def test_interrupted_write_leaves_no_finished_lmdb(tmp_path, monkeypatch):
    real = lmdb_writer.datum_encoder
    calls = []

    def interrupted(*args):
        encode = real(*args)

        def wrapper(image, label):
            calls.append(1)
            if len(calls) > 1500:  # after the first commit of 1,000 records
                raise KeyboardInterrupt
            return encode(image, label)

        return wrapper

    monkeypatch.setattr(lmdb_writer, "datum_encoder", interrupted)
    images = np.zeros((3000, 1, 4, 4), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        write_lmdb(tmp_path / "x.lmdb", images, np.zeros(3000, np.int64))
    assert list(tmp_path.iterdir()) == []


def test_float_preprocessing_goes_to_float_data_and_only_training_sets_are_padded(tmp_path):
    manifest = prepare(
        PrepOptions("digits", validation_size=300, preprocess="gcn", pad=2), tmp_path, log=lambda _m: None
    )
    shapes = {name: s["shape"] for name, s in manifest["sets"].items()}
    # as the authors' lmdb_creator.py: train and train_full padded, val and test as released
    assert shapes == {"train": [1, 12, 12], "train_full": [1, 12, 12], "val": [1, 8, 8], "test": [1, 8, 8]}
    assert manifest["sets"]["train"]["dtype"] == "float32" and manifest["padded_sets"] == ["train", "train_full"]
    datum = load_schema().Datum
    d = datum.FromString(records(tmp_path / "train.lmdb")[0][1])
    assert not d.data and len(d.float_data) == 144 and (d.height, d.width) == (12, 12)
    img = np.array(d.float_data).reshape(12, 12)
    assert np.all(img[:2] == 0) and abs(img[2:10, 2:10].mean()) < 1e-4  # zero border, GCN-centred interior
    v = datum.FromString(records(tmp_path / "val.lmdb")[0][1])
    assert (v.height, v.width) == (8, 8) and abs(np.mean(v.float_data)) < 1e-4


def test_a_folder_padded_by_the_old_layout_is_stale(tmp_path):
    """Version-1 folders padded val/test too: refused when padded, still used when nothing was padded."""
    for pad in (2, 0):
        folder = tmp_path / str(pad)
        prepare(PrepOptions("digits", validation_size=300, pad=pad), folder, log=lambda _m: None)
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "version": 1}))
        if pad:
            with pytest.raises(DataError, match="also padded the validation and test sets; delete it"):
                prepare(PrepOptions("digits", validation_size=300, pad=pad), folder, log=lambda _m: None)
        else:
            log = []
            prepare(PrepOptions("digits", validation_size=300, pad=pad), folder, log=log.append)
            assert "already prepared" in log[-1]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda f: (f / "train-images-idx3-ubyte").write_bytes((f / "train-images-idx3-ubyte").read_bytes()[:5000]),
            "train-images-idx3-ubyte: truncated: header says 1200 images",
        ),
        (
            lambda f: (f / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2051, 1200) + bytes(1200)),
            "bad IDX label magic number 2051",
        ),
        (
            lambda f: (f / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 300) + bytes([12]) * 300),
            "labels out of range 0..9",
        ),
        (lambda f: (f / "t10k-images-idx3-ubyte").unlink(), "missing t10k-images-idx3-ubyte"),
    ],
)
def test_bad_mnist_input_names_the_file(tmp_path, corrupt, message):
    src = tmp_path / "mnist"
    mnist_release(src)
    corrupt(src)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(PrepOptions("mnist", validation_size=200), tmp_path / "out", src, log=lambda _m: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_corrupt_gzip_and_cifar_and_svhn(tmp_path):
    src = tmp_path / "mnist"
    mnist_release(src, gz=True)
    (src / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        prepare(PrepOptions("mnist", validation_size=200), tmp_path / "o", src, log=lambda _m: None)
    (tmp_path / "b.bin").write_bytes(bytes(CIFAR_RECORD * 2 + 7))
    with pytest.raises(DataError, match="not a multiple of the 3073-byte CIFAR record"):
        read_cifar_bin(tmp_path / "b.bin")
    from scipy.io import savemat

    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    savemat(str(tmp_path / "train_32x32.mat"), {"X": x, "y": np.array([[10], [1], [2], [3], [4], [5]])})
    split = read_svhn_mat(tmp_path / "train_32x32.mat")
    assert split.images.shape == (6, 3, 32, 32) and list(split.labels) == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(split.images[2, 1], x[:, :, 1, 2])
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 nonsense")
    with pytest.raises(DataError, match=r"bad\.mat: not a readable SVHN \.mat file"):
        read_svhn_mat(tmp_path / "bad.mat")


@pytest.mark.parametrize("method", ["mean", "lcn", "zca"])
def test_float_preprocessing_options(tmp_path, method):
    manifest = prepare(PrepOptions("digits", validation_size=300, preprocess=method), tmp_path, log=lambda _m: None)
    datum = load_schema().Datum
    rows = [np.array(datum.FromString(v).float_data) for _, v in records(tmp_path / "train.lmdb")]
    x = np.stack(rows)
    assert manifest["sets"]["train"]["dtype"] == "float32" and x.shape == (1197, 64) and np.isfinite(x).all()
    if method == "mean":  # fitted on the exploration training set: its per-pixel mean is zero
        assert np.abs(x.mean(axis=0)).max() < 1e-3
    elif method == "zca":  # whitening (regularised, eps 0.1) at least halves the mean pixel correlation
        raw = read_digits().sets["train"].images.reshape(-1, 64).astype(float)
        assert _mean_abs_correlation(x) < 0.5 * _mean_abs_correlation(raw)
    else:  # local contrast normalisation: zero local mean, so each image is centred
        assert np.abs(x.mean(axis=1)).max() < 0.5


def _mean_abs_correlation(a):
    live = a.std(axis=0) > 1e-6  # constant border pixels have no correlation
    c = np.corrcoef(a[:, live], rowvar=False)
    return np.abs(c - np.diag(np.diag(c))).mean()
