"""Issue 14: scripts/setup-caffe-gpu.sh where it can be exercised without a 20-minute build.

Its one-line errors (missing compiler, unsupported toolkit, bad arches, no network) and its
no-op on a finished prefix.  The real build is run by `make caffe-gpu` (not in CI: ~25 min).
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup-caffe-gpu.sh"
TOOLS = ("apt-get", "dpkg-deb", "dpkg-source", "patch", "cmake", "make")


def run(prefix, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "GPU_", "PIP_"))}
    full.update(env)
    return subprocess.run(
        [str(SCRIPT), str(prefix)], capture_output=True, text=True, timeout=300, env=full, check=False
    )


def one_line_error(proc, fragment):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:  # a machine without the build tools stops earlier, with its own one line
        fragment = f"{missing[0]} not found"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup-caffe-gpu: error: "), proc.stderr
    assert fragment in lines[0], lines[0]


def fake_toolkit(tmp_path, release):
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return home


def test_missing_compiler_is_one_line(tmp_path):
    one_line_error(run(tmp_path / "p", CUDA_HOST_CXX="/nonexistent/g++"), "no C++ compiler")


def test_unsupported_toolkits_are_one_line(tmp_path):
    one_line_error(run(tmp_path / "p", CUDA_HOME=str(tmp_path / "none")), "has no bin/nvcc")
    old = fake_toolkit(tmp_path, "11.2")
    one_line_error(run(tmp_path / "p", CUDA_HOME=str(old)), "unsupported CUDA toolkit 11.2")
    new = fake_toolkit(tmp_path, "13.0")
    one_line_error(run(tmp_path / "p", CUDA_HOME=str(new), GPU_ARCHS="61 80"), "cannot build for compute capability 61")


def test_bad_arches_are_one_line(tmp_path):
    one_line_error(run(tmp_path / "p", GPU_ARCHS="sm_80"), "compute capabilities without dots")


def test_no_network_is_one_line(tmp_path):
    toolkit = fake_toolkit(tmp_path, "12.4")
    one_line_error(
        run(tmp_path / "p", CUDA_HOME=str(toolkit), METAQNN_DEBIAN_MIRROR="http://127.0.0.1:9/debian"),
        "no network or mirror unreachable",
    )
    one_line_error(
        run(tmp_path / "q", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2"),
        "pip could not fetch the CUDA 13 wheels",
    )
    assert not (tmp_path / "p").exists()  # nothing half-built where the prefix goes


def test_a_finished_prefix_is_a_no_op(tmp_path):
    prefix = tmp_path / "caffe-gpu"
    (prefix / "bin").mkdir(parents=True)
    caffe = prefix / "bin" / "caffe"
    caffe.write_text("#!/bin/sh\necho 'caffe version 1.0.0'\n")
    caffe.chmod(0o755)
    patches = sorted((ROOT / "patches" / "caffe-gpu").glob("*.patch"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest()[:12]
    (prefix / ".complete").write_text(
        f"caffe-1.0 gpu bullseye toolkit=pypi-cuda13.0 archs=80 90 ptx=90 patches={digest} v1\n"
    )
    (prefix / "build-info").write_text("build=gpu\ncuda=13.0\narchs=80 90\nptx=90\n")
    proc = run(prefix)
    assert proc.returncode == 0 and "already built, nothing to do" in proc.stdout, proc.stdout + proc.stderr
    assert "cuda=13.0" in proc.stdout
    # other arches are another build: not a no-op (it stops here at the bad host compiler)
    one_line_error(run(prefix, GPU_ARCHS="90", CUDA_HOST_CXX="/nonexistent/g++"), "no C++ compiler")


@pytest.mark.parametrize("patch", sorted((ROOT / "patches" / "caffe-gpu").glob("*.patch")), ids=lambda p: p.name)
def test_each_patch_explains_itself(patch):
    text = patch.read_text()
    header = text.split("\n--- ", 1)[0]
    assert header.startswith("Subject: ") and "Applies to: Debian's caffe 1.0.0+git20180821.99bd997-8" in header
    assert "\n+++ b/src/caffe/" in text
