"""CIFAR-100: its binary release read, prepared and checked, on a small synthetic ``cifar-100-binary``.

Each synthetic record carries both label bytes, coarse = fine // 5, and its fine label again as
its first pixel byte, so a prepared set shows which label byte became the Datum's label.
"""

import dataclasses
import json

import numpy as np
import pytest
from commandline import cli, one_line_error

from data_prep.integrity import check_manifest_matches
from data_prep.lmdb_writer import iter_lmdb
from data_prep.prepare import PrepOptions, prepare
from data_prep.sources import CIFAR100_RECORD, DataError, read_cifar100
from metaqnn.caffe.schema import load_schema
from metaqnn.config import build_config
from metaqnn.search import check_data_fits, prep_options
from qagent.errors import ConfigError

PER_CLASS_TRAIN, PER_CLASS_TEST = 6, 2


def cifar100_records(per_class: int, seed: int) -> np.ndarray:
    """``per_class`` records of each of the 100 fine classes, shuffled; coarse = fine // 5."""
    rng = np.random.default_rng(seed)
    fine = rng.permutation(np.repeat(np.arange(100), per_class))
    rec = rng.integers(0, 256, (len(fine), CIFAR100_RECORD), dtype=np.uint8)
    rec[:, 0], rec[:, 1], rec[:, 2] = fine // 5, fine, fine
    return rec


def cifar100_release(folder, nested=True):
    """A small release: ``folder/cifar-100-binary/{train,test}.bin`` (``nested``) or the two files in ``folder``."""
    base = folder / "cifar-100-binary" if nested else folder
    base.mkdir(parents=True)
    (base / "train.bin").write_bytes(cifar100_records(PER_CLASS_TRAIN, 0).tobytes())
    (base / "test.bin").write_bytes(cifar100_records(PER_CLASS_TEST, 1).tobytes())
    return base


def labels_and_first_bytes(path):
    datum = load_schema().Datum
    pairs = [(d.label, d.data[0]) for d in (datum.FromString(v) for _, v in iter_lmdb(path))]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def quiet(_message):
    pass


def test_fine_labels_give_a_stratified_validation_split_over_100_classes(tmp_path):
    cifar100_release(tmp_path / "src")
    manifest = prepare(PrepOptions("cifar100", validation_size=100), tmp_path / "out", tmp_path / "src", log=quiet)
    assert manifest["dataset"] == "cifar100" and manifest["num_classes"] == 100
    assert manifest["options"]["labels"] == "fine"
    sets = manifest["sets"]
    assert sets["val"]["class_counts"] == [1] * 100  # exactly one image of every class
    assert sets["train"]["class_counts"] == [PER_CLASS_TRAIN - 1] * 100
    assert sets["train_full"]["class_counts"] == [PER_CLASS_TRAIN] * 100
    assert sets["test"]["class_counts"] == [PER_CLASS_TEST] * 100
    assert sets["train"]["shape"] == [3, 32, 32] and sets["train"]["dtype"] == "uint8"
    for name in ("train", "val", "train_full", "test"):
        labels, first = labels_and_first_bytes(tmp_path / "out" / f"{name}.lmdb")
        assert len(labels) == sets[name]["count"] and np.array_equal(labels, first)  # the fine label byte
    keys = [k for k, _ in iter_lmdb(tmp_path / "out" / "test.lmdb")]
    assert keys[0] == b"00000"  # CIFAR-10's key width (convert_cifar_data)


def test_coarse_labels_give_20_superclasses(tmp_path):
    cifar100_release(tmp_path / "src")
    manifest = prepare(
        PrepOptions("cifar100", validation_size=100, labels="coarse"), tmp_path / "out", tmp_path / "src", log=quiet
    )
    assert manifest["num_classes"] == 20 and manifest["options"]["labels"] == "coarse"
    sets = manifest["sets"]
    assert sets["val"]["class_counts"] == [5] * 20  # 100 over 20 superclasses of 30 images
    assert sets["train"]["class_counts"] == [25] * 20
    assert sets["train_full"]["class_counts"] == [30] * 20 and sets["test"]["class_counts"] == [10] * 20
    for name in ("val", "test"):
        labels, first = labels_and_first_bytes(tmp_path / "out" / f"{name}.lmdb")
        assert np.array_equal(labels, first // 5)  # the coarse label byte, of the same record
    # one folder holds one label set: the fine labels are refused there, not mixed in
    with pytest.raises(DataError, match="was prepared with"):
        prepare(PrepOptions("cifar100", validation_size=100), tmp_path / "out", tmp_path / "src", log=quiet)


def test_the_release_folder_or_its_parent_is_read(tmp_path):
    base = cifar100_release(tmp_path / "src")
    for folder in (tmp_path / "src", base):
        data = read_cifar100(folder, "coarse")
        assert data.num_classes == 20 and len(data.sets["train"].labels) == 600 and data.sets["test"].labels.max() == 19
    flat = cifar100_release(tmp_path / "flat", nested=False)
    assert read_cifar100(flat).sets["test"].images.shape == (200, 3, 32, 32)


def corrupt_label(column, value, file, record):
    def corrupt(base):
        rec = np.frombuffer((base / file).read_bytes(), np.uint8).reshape(-1, CIFAR100_RECORD).copy()
        rec[record, column] = value
        (base / file).write_bytes(rec.tobytes())

    return corrupt


@pytest.mark.parametrize("labels", ["fine", "coarse"])
@pytest.mark.parametrize(
    ("corrupt", "file", "message"),
    [
        (corrupt_label(1, 100, "train.bin", 7), "train.bin", "record 7 has fine label 100, out of range 0..99"),
        (corrupt_label(0, 20, "test.bin", 3), "test.bin", "record 3 has coarse label 20, out of range 0..19"),
        (
            lambda b: (b / "train.bin").write_bytes((b / "train.bin").read_bytes()[:-100]),
            "train.bin",
            f"size {600 * CIFAR100_RECORD - 100} is not a multiple of the 3074-byte CIFAR-100 record (truncated?)",
        ),
        (lambda b: (b / "test.bin").write_bytes(b""), "test.bin", "size 0 is not a multiple"),
        (lambda b: (b / "test.bin").unlink(), "cifar-100-binary", "missing test.bin"),
    ],
    ids=["fine-label-100", "coarse-label-20", "truncated", "empty", "missing-test"],
)
def test_a_bad_record_or_file_is_one_line_naming_the_file(tmp_path, corrupt, file, message, labels):
    """Both label bytes are checked whichever label set is prepared; nothing is left behind."""
    base = cifar100_release(tmp_path / "src")
    corrupt(base)
    with pytest.raises(DataError) as err:
        prepare(PrepOptions("cifar100", validation_size=100, labels=labels), tmp_path / "out", tmp_path / "src", quiet)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(base / file if file.endswith(".bin") else base)), text
    assert message in text, text
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_labels_are_checked():
    with pytest.raises(DataError, match="unknown labels 'superclass'; known: coarse, fine"):
        PrepOptions("cifar100", labels="superclass")
    with pytest.raises(DataError, match="only cifar100 has a second"):
        PrepOptions("cifar10", labels="coarse")
    with pytest.raises(ConfigError, match=r"dataset\.labels must be fine or coarse"):
        build_config("cifar100", ["dataset.labels=super"])
    with pytest.raises(ConfigError, match="dataset cifar10 has only fine labels"):
        build_config("cifar10", ["dataset.labels=coarse"])


def test_an_older_manifest_without_labels_still_matches(tmp_path):
    """Manifests written before ``labels`` existed lack it: they are the default (fine) preparation."""
    cifar100_release(tmp_path / "src")
    options = PrepOptions("cifar100", validation_size=100)
    prepare(options, tmp_path / "out", tmp_path / "src", log=quiet)
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["options"]["labels"]
    path.write_text(json.dumps(manifest))
    log = []
    prepare(options, tmp_path / "out", tmp_path / "src", log=log.append)
    assert "already prepared" in log[-1]
    with pytest.raises(DataError, match="was prepared with"):
        prepare(PrepOptions("cifar100", validation_size=100, labels="coarse"), tmp_path / "out", None, log=quiet)


def test_the_preset_and_a_search_config_fit_the_prepared_data(tmp_path):
    cfg = build_config("cifar100", ["dataset.validation_size=100"])
    assert (cfg.space.num_classes, cfg.dataset.labels, cfg.protocol.finetune) == (100, "fine", "finetune_cifar10")
    assert (cfg.dataset.preprocess, cfg.dataset.pad, cfg.render.mirror, cfg.render.crop_size) == ("gcn", 5, True, 32)
    assert cfg.space == dataclasses.replace(build_config("cifar10").space, num_classes=100)  # CIFAR-10's space
    cifar100_release(tmp_path / "src")
    manifest = prepare(prep_options(cfg), tmp_path / "fine", tmp_path / "src", log=quiet)
    assert manifest["sets"]["train"]["shape"] == [3, 42, 42] and manifest["sets"]["val"]["shape"] == [3, 32, 32]
    check_data_fits(cfg, manifest, tmp_path / "fine")  # padded training sets, 32x32 crops: fits
    coarse = build_config("cifar100", ["dataset.validation_size=100", "dataset.labels=coarse"])
    coarse_manifest = prepare(prep_options(coarse), tmp_path / "coarse", tmp_path / "src", log=quiet)
    with pytest.raises(ConfigError, match=r"space\.num_classes is 100, but .*coarse has 20 classes"):
        check_data_fits(coarse, coarse_manifest, tmp_path / "coarse")
    check_data_fits(
        build_config("cifar100", ["dataset.validation_size=100", "dataset.labels=coarse", "space.num_classes=20"]),
        coarse_manifest,
        tmp_path / "coarse",
    )
    with pytest.raises(ConfigError, match=r"render\.crop_size is 0, but .* 42x42 padded training images and 32x32"):
        check_manifest_matches(manifest, 32, 3, 100, crop_size=0)


def test_prepare_on_the_command_line(tmp_path):
    cifar100_release(tmp_path / "src")
    out = tmp_path / "out"
    args = ["prepare", "--dataset", "cifar100", "--source", str(tmp_path / "src"), "--data-dir", str(out)]
    result = cli(*args, "--set", "dataset.validation_size=100", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val            100 images [3, 32, 32] float32" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == 100 and manifest["sets"]["val"]["class_counts"] == [1] * 100
    corrupt_label(1, 100, "train.bin", 0)(tmp_path / "src" / "cifar-100-binary")
    bad = tmp_path / "bad"
    line = one_line_error(cli(*args[:-1], str(bad), "--set", "dataset.validation_size=100", timeout=300), "train.bin")
    assert "record 0 has fine label 100" in line
    assert not (bad / "manifest.json").exists()
