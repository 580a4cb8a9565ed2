"""Shared fixtures. The real-Caffe fixtures fail (never skip) when Caffe is missing:
`make test` installs it first, so a missing Caffe is a broken setup, not a reason to pass."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = Path(os.environ.get("METAQNN_PUBLISHED", ROOT.parent / "shared" / "reference" / "published-caffe"))

TABLE_A2 = [  # CIFAR-10 top 5 (architecture, paper's parameter count in millions)
    ("[C(512,5,1), C(256,3,1), C(256,5,1), C(256,3,1), P(5,3), C(512,3,1), C(512,5,1), P(2,2), SM(10)]", 11.26),
    ("[C(128,1,1), C(512,3,1), C(64,1,1), C(128,3,1), P(2,2), C(256,3,1), P(2,2), C(512,3,1), P(3,2), SM(10)]", 2.2),
    ("[C(128,3,1), C(128,1,1), C(512,5,1), P(2,2), C(128,3,1), P(2,2), C(64,3,1), C(64,5,1), SM(10)]", 2.46),
    ("[C(256,3,1), C(256,3,1), P(5,3), C(256,1,1), C(128,3,1), P(2,2), C(128,3,1), SM(10)]", 1.13),
    ("[C(64,3,1), C(128,3,1), P(5,3), C(256,3,1), P(3,2), FC(512), FC(128), SM(10)]", 1.62),
]
TABLE_A3 = [  # SVHN top 5
    (
        "[C(128,3,1), P(2,2), C(64,5,1), C(512,5,1), C(256,3,1), C(512,3,1), P(2,2), C(512,3,1), C(256,5,1), "
        "C(256,3,1), C(128,5,1), C(64,3,1), SM(10)]",
        9.81,
    ),
    (
        "[C(128,1,1), C(256,5,1), C(128,5,1), P(2,2), C(256,5,1), C(256,1,1), C(256,3,1), C(256,3,1), C(256,5,1), "
        "C(512,5,1), C(256,3,1), C(128,3,1), SM(10)]",
        10.38,
    ),
    (
        "[C(128,5,1), C(128,3,1), C(64,5,1), P(5,3), C(128,3,1), C(512,5,1), C(256,5,1), C(128,5,1), C(128,5,1), "
        "C(128,3,1), SM(10)]",
        6.83,
    ),
    (
        "[C(128,1,1), C(256,5,1), C(128,5,1), C(256,3,1), C(256,5,1), P(2,2), C(128,1,1), C(512,3,1), C(256,5,1), "
        "P(2,2), C(64,5,1), C(64,1,1), SM(10)]",
        6.99,
    ),
    (
        "[C(128,1,1), C(256,5,1), C(128,5,1), C(256,5,1), C(256,5,1), C(256,1,1), P(3,2), C(128,1,1), C(256,5,1), "
        "C(512,5,1), C(256,3,1), C(128,3,1), SM(10)]",
        10.05,
    ),
]
TABLE_A4 = [  # MNIST top 5
    ("[C(240,4,1), C(120,2,1), C(120,2,1), P(3,2), C(120,3,1), C(120,3,1), P(3,2), FC(50), SM(10)]", 0.80),
    ("[C(120,4,1), C(120,2,1), C(120,2,1), P(10,4), C(240,2,1), FC(250), FC(100), SM(10)]", 0.85),
    ("[C(240,7,1), P(3,2), C(120,5,2), FC(50), SM(10)]", 0.66),
    ("[C(240,4,1), C(120,2,1), C(120,2,1), P(10,4), FC(250), SM(10)]", 0.67),
    ("[C(120,4,1), C(120,2,1), P(5,1), C(60,5,3), C(60,3,1), P(2,1), FC(250), FC(250), SM(10)]", 0.48),
]


@pytest.fixture(scope="session")
def caffe():
    from metaqnn.caffe.locate import find_caffe

    return find_caffe()  # raises CaffeNotFoundError: run `make caffe`


@pytest.fixture(scope="session")
def published() -> Path:
    if not (PUBLISHED / "prototxt").is_dir():
        pytest.fail(f"published Caffe files not found at {PUBLISHED} (set METAQNN_PUBLISHED)")
    return PUBLISHED


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory, caffe):
    """The digits LMDBs (train 1,197 / val 300 / train_full 1,497 / test 300), written once per session."""
    from data_prep.prepare import PrepOptions, prepare

    out = tmp_path_factory.mktemp("digits")
    manifest = prepare(PrepOptions("digits", validation_size=300), out, log=lambda _m: None)
    return out, manifest


@pytest.fixture
def data(tmp_path, digits_data):
    """A private copy of the prepared digits folder, to damage (test_bad_data_store, test_startup_checks)."""
    dst = tmp_path / "data"
    shutil.copytree(digits_data[0], dst)
    return dst


CAFFE_FIXTURES = {"caffe", "digits_data"}


def pytest_collection_modifyitems(config, items):
    """Every test that uses a real-Caffe fixture is marked ``caffe`` (and ``slow``), so that
    ``make test-fast`` (``-m "not caffe and not slow"``) can never run one by accident."""
    for item in items:
        if CAFFE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.caffe)
            item.add_marker(pytest.mark.slow)
