"""Issue 14: scripts/setup-caffe-gpu.sh where it can be exercised without a 20-minute build.

Its one-line errors (missing compiler, unsupported toolkit, bad arches, no network) and its
no-op on a finished prefix.  The real build is run by `make caffe-gpu` (not in CI: ~25 min).
"""

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup-caffe-gpu.sh"
TOOLS = ("apt-get", "dpkg-deb", "dpkg-source", "patch", "cmake", "make")


def run(prefix, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "GPU_", "PIP_")) and k != "JOBS"}
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


# -- everything is checked before anything is deleted or fetched (issue 24) ---------------------

FETCHERS = (
    "apt-get",
    "apt",
    "pip",
    "pip3",
    "curl",
    "wget",
    "python3",
    "dpkg-source",
    "dpkg-deb",
    "cmake",
    "make",
    "patch",
)


def stub_path(tmp_path):
    """A PATH whose network and build tools only record that they were called (and fail)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    for name in FETCHERS:
        tool = stubs / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        tool.chmod(0o755)
    return {"PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python3")}, calls


def tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def partial_build(tmp_path):
    """An interrupted build with other settings, where the script keeps it (PREFIX.partial)."""
    work = tmp_path / "caffe-gpu.partial"
    (work / "build").mkdir(parents=True)
    (work / "build" / "CMakeCache.txt").write_text("# 1.4 GB of compiled objects, in spirit\n")
    (work / "build" / "marker").write_text("still here\n")
    (work / ".stamp").write_text("caffe-1.0 gpu bullseye toolkit=pypi-cuda13.0 archs=80 ptx=90 patches=0 v1\n")
    (work / ".sources-ready").touch()
    return tmp_path / "caffe-gpu", work


def test_a_bad_cuda_home_leaves_an_interrupted_build_untouched(tmp_path):
    prefix, work = partial_build(tmp_path)
    before = tree(work)
    env, calls = stub_path(tmp_path)
    proc = run(prefix, CUDA_HOME="/nonexistent", **env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("setup-caffe-gpu: error: CUDA_HOME=/nonexistent has no bin/nvcc")
    assert tree(work) == before and not prefix.exists()
    assert not calls.exists(), calls.read_text()


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"GPU_ARCHS": "70"}, "cannot build for compute capability 70"),
        ({"GPU_ARCHS": " "}, "GPU_ARCHS is blank"),
        ({"GPU_ARCHS": ""}, "GPU_ARCHS is blank"),
        ({"GPU_ARCHS": "abc"}, "compute capabilities without dots"),
        ({"GPU_ARCHS": "8.0"}, "compute capabilities without dots"),
        ({"GPU_PTX": " "}, "GPU_PTX is blank"),
        ({"GPU_PTX": "61"}, "cannot build for compute capability 61"),
        ({"JOBS": "0"}, "JOBS must be a positive integer"),
        ({"JOBS": "two"}, "JOBS must be a positive integer"),
        ({"JOBS": " "}, "JOBS is blank"),
        ({"CUDA_HOME": " "}, "CUDA_HOME is blank"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_values_are_refused_at_once_with_nothing_fetched(tmp_path, env, fragment):
    prefix, work = partial_build(tmp_path)
    before = tree(work)
    stubs, calls = stub_path(tmp_path)
    t0 = time.monotonic()
    proc = run(prefix, **env, **stubs)
    took = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("setup-caffe-gpu: error: ") and fragment in lines[0], lines[0]
    assert not proc.stdout and took < 5
    assert not calls.exists(), calls.read_text()  # no apt, pip, curl, cmake... was run
    assert tree(work) == before and not prefix.exists()


def test_an_unwritable_prefix_is_refused_before_anything_is_fetched(tmp_path):
    if os.geteuid() == 0:
        parent = tmp_path / "file"  # root writes anywhere: a prefix under a plain file instead
        parent.write_text("")
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o555)
    stubs, calls = stub_path(tmp_path)
    proc = run(parent / "caffe-gpu", **stubs)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "cannot create" in lines[0], proc.stderr
    assert not calls.exists(), calls.read_text()


def test_make_caffe_gpu_passes_a_blank_value_on_quoted(tmp_path):
    stubs, calls = stub_path(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "GPU_")) and k != "JOBS"}
    env.update(stubs, METAQNN_CAFFE_GPU_PREFIX=str(tmp_path / "caffe-gpu"))
    env["PATH"] = os.environ["PATH"]  # the real make; the script still gets the stub python
    for args, fragment in (
        (["GPU_ARCHS= "], "GPU_ARCHS is blank"),
        (["GPU_PTX="], "GPU_PTX is blank"),
        (["JOBS=", "GPU_ARCHS=80 90"], "JOBS is blank"),
        (["GPU_ARCHS=80 '90"], "(got ''90')"),  # quoted through the shell as given
    ):
        proc = subprocess.run(
            ["make", "-s", "--no-print-directory", "caffe-gpu", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("setup-caffe-gpu: ")]
        assert proc.returncode != 0 and len(errors) == 1 and fragment in errors[0], proc.stdout + proc.stderr
    assert not (tmp_path / "caffe-gpu.partial").exists() and not calls.exists()


@pytest.mark.parametrize("patch", sorted((ROOT / "patches" / "caffe-gpu").glob("*.patch")), ids=lambda p: p.name)
def test_each_patch_explains_itself(patch):
    text = patch.read_text()
    header = text.split("\n--- ", 1)[0]
    assert header.startswith("Subject: ") and "Applies to: Debian's caffe 1.0.0+git20180821.99bd997-8" in header
    assert "\n+++ b/src/caffe/" in text
