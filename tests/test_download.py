"""Issue 6: downloads -- checksums, resume after an interruption, clear errors (loopback server only)."""

import hashlib
import http.server
import io
import tarfile
import threading
from typing import ClassVar, Dict, Set

import pytest

from data_prep.download import Resource, download
from data_prep.sources import DataError


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves FILES; honours Range; the first request for a file breaks off after CUT bytes."""

    FILES: ClassVar[Dict[str, bytes]] = {}
    CUT = 0
    seen: ClassVar[Set[str]] = set()

    def do_GET(self):
        body = self.FILES.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.CUT and self.path not in self.seen:
            self.seen.add(self.path)
            self.wfile.write(body[start : self.CUT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.seen = set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def md5(b):
    return hashlib.md5(b).hexdigest()


def test_interrupted_download_resumes_and_is_checked(server, tmp_path):
    blob = bytes(range(256)) * 4000
    RangeHandler.FILES = {"train_32x32.mat": blob}
    RangeHandler.CUT = 300_000
    res = [Resource("train_32x32.mat", (f"{server}/train_32x32.mat",), md5(blob))]
    with pytest.raises(DataError, match="partial file kept for resuming"):
        download("svhn", tmp_path, res, log=lambda _m: None)
    assert (tmp_path / "train_32x32.mat.part").stat().st_size == 300_000
    download("svhn", tmp_path, res, log=lambda _m: None)  # resumes with a Range request
    assert (tmp_path / "train_32x32.mat").read_bytes() == blob and not (tmp_path / "train_32x32.mat.part").exists()
    log = []
    download("svhn", tmp_path, res, log=log.append)
    assert log == ["download: train_32x32.mat present, checksum ok"]


def test_checksum_mismatch_and_mirrors(server, tmp_path):
    RangeHandler.FILES = {"a": b"good data"}
    RangeHandler.CUT = 0
    bad = [Resource("a", (f"{server}/a",), md5(b"other data"))]
    with pytest.raises(DataError, match="a: checksum mismatch"):
        download("mnist", tmp_path, bad, log=lambda _m: None)
    assert not (tmp_path / "a.part").exists() and not (tmp_path / "a").exists()
    mirrors = [Resource("a", (f"{server}/missing", f"{server}/a"), md5(b"good data"))]
    download("mnist", tmp_path, mirrors, log=lambda _m: None)  # the first mirror 404s, the second serves
    assert (tmp_path / "a").read_bytes() == b"good data"
    with pytest.raises(DataError, match="nothing to download for 'digits'"):
        download("digits", tmp_path)


def test_cifar_archive_is_unpacked_safely(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "../evil.bin"]:
            data = name.encode()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}" if "evil" not in name else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    RangeHandler.FILES = {"c.tgz": buf.getvalue()}
    RangeHandler.CUT = 0
    download(
        "cifar10",
        tmp_path / "src",
        [Resource("c.tgz", (f"{server}/c.tgz",), md5(buf.getvalue()), unpack=True)],
        log=lambda _m: None,
    )
    assert (tmp_path / "src" / "data_batch_3.bin").read_bytes() == b"data_batch_3.bin"
    assert not (tmp_path / "evil.bin").exists()


def test_a_failed_download_says_partial_file_kept_only_when_there_is_one(server, tmp_path):
    """No network (here: a port nothing listens on, and a 404): no partial file, so none is promised."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused
    RangeHandler.FILES = {}
    RangeHandler.CUT = 0
    dest = tmp_path / "new" / "source"
    res = [Resource("train_32x32.mat", (f"{dead}/train_32x32.mat", f"{server}/train_32x32.mat"), md5(b"x"))]
    with pytest.raises(DataError) as err:
        download("svhn", dest, res, log=lambda _m: None)
    assert "partial file" not in str(err.value).replace("no partial file", "")
    assert "no partial file" in str(err.value) and "train_32x32.mat" in str(err.value)
    assert not (tmp_path / "new").exists()  # the folders it made for nothing are gone
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "a.mat.part").write_bytes(b"half")  # an earlier interrupted run
    with pytest.raises(DataError, match=r"partial file kept for resuming: a\.mat\.part, 4 bytes"):
        download("svhn", kept, [Resource("a.mat", (f"{dead}/a.mat",), md5(b"x"))], log=lambda _m: None)
    assert (kept / "a.mat.part").read_bytes() == b"half"


def test_cifar100_archive_is_unpacked_safely(server, tmp_path):
    """The release's layout: cifar-100-binary/{train,test}.bin and the two label-name files."""
    buf = io.BytesIO()
    members = ["train.bin", "test.bin", "coarse_label_names.txt", "fine_label_names.txt"]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [*members, "../evil.bin", "/tmp/absolute.bin"]:
            data = name.encode()
            info = tarfile.TarInfo(f"cifar-100-binary/{name}" if name in members else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    RangeHandler.FILES = {"c100.tgz": buf.getvalue()}
    RangeHandler.CUT = 0
    res = [Resource("c100.tgz", (f"{server}/c100.tgz",), md5(buf.getvalue()), unpack=True)]
    download("cifar100", tmp_path / "src", res, log=lambda _m: None)
    for name in members:
        assert (tmp_path / "src" / name).read_bytes() == name.encode()
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == sorted([*members, "c100.tgz"])
    assert not (tmp_path / "evil.bin").exists()
    # an archive without test.bin is refused by name, and nothing of it is taken for the release
    bad = io.BytesIO()
    with tarfile.open(fileobj=bad, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-binary/train.bin")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    RangeHandler.FILES = {"bad.tgz": bad.getvalue()}
    with pytest.raises(DataError, match=r"bad\.tgz: does not hold CIFAR-100's train\.bin and test\.bin"):
        download(
            "cifar100",
            tmp_path / "other",
            [Resource("bad.tgz", (f"{server}/bad.tgz",), md5(bad.getvalue()), unpack=True)],
            log=lambda _m: None,
        )
    assert not (tmp_path / "other" / "train.bin").exists()


def test_cifar100_comes_from_its_official_location():
    from data_prep.download import RESOURCES

    (r,) = RESOURCES["cifar100"]
    assert r.urls == ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",)
    assert (r.name, r.md5, r.unpack) == ("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", True)
