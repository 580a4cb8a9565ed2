"""Issue 14: the GPU build's run-time side, checked with fake GPUs (CI has none).

The packing of many trainings per GPU (ids, the environment each training sees, the retry at
lower packing after an out-of-memory), the driver check, and which Caffe a GPU run picks.
"""

import os
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import pytest

from metaqnn.caffe import gpu as gpuinfo
from metaqnn.caffe.locate import CaffeInstall, find_caffe
from metaqnn.executors import LocalExecutor, RayExecutor
from metaqnn.packing import GpuPool, gpu_env, on_gpu, packing_levels, run_packed, units
from qagent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class FakeJob:
    arch: str
    gpu: Optional[int] = None
    env: Tuple[Tuple[str, str], ...] = ()


@dataclass
class FakeResult:
    status: str
    message: str = ""


def test_packing_levels_halve_down_to_one_training_per_gpu():
    assert packing_levels(1) == [1]
    assert packing_levels(8) == [8, 4, 2, 1]
    assert packing_levels(3) == [3, 1]
    assert [units(8, k) for k in packing_levels(8)] == [1, 2, 4, 8]
    assert units(3, 1) == 3
    with pytest.raises(ValueError):
        packing_levels(0)


def test_each_training_sees_only_its_gpu_as_device_0():
    job = on_gpu(FakeJob("a"), 3)
    assert job.gpu == 0 and dict(job.env) == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpu_env(1)["CUDA_VISIBLE_DEVICES"] == "1"

    @dataclass(frozen=True)
    class Plain:  # a job without an environment gets --gpu=N
        gpu: Optional[int] = None

    assert on_gpu(Plain(), 2).gpu == 2


def test_the_pool_spreads_trainings_over_gpus_then_packs_them():
    pool = GpuPool([2, 5], per_gpu=3)
    assert pool.slots == 6
    assert [pool.acquire(3) for _ in range(6)] == [2, 5, 2, 5, 2, 5]  # least loaded first
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(3)), daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # all six units taken: the seventh waits
    pool.release(5, 3)
    t.join(5)
    assert got == [5]


def test_a_retry_alone_on_a_gpu_is_not_starved_by_packed_trainings():
    pool = GpuPool([0], per_gpu=4)
    held = [pool.acquire(4) for _ in range(3)]  # three packed trainings on GPU 0
    order = []
    alone = threading.Thread(target=lambda: order.append(("alone", pool.acquire(1))), daemon=True)
    alone.start()
    time.sleep(0.1)  # the retry now drains GPU 0
    late = threading.Thread(target=lambda: order.append(("late", pool.acquire(4))), daemon=True)
    late.start()
    time.sleep(0.1)
    assert not order  # one unit is free, but GPU 0 is held for the retry
    for g in held:
        pool.release(g, 4)
    alone.join(5)
    assert order == [("alone", 0)] and pool.used[0] == 4
    pool.release(0, 1)
    late.join(5)
    assert order[-1] == ("late", 0)


def test_local_pool_packs_k_trainings_per_gpu_with_their_own_device(tmp_path):
    lock = threading.Lock()
    on_device, seen = Counter(), []
    peak = Counter()

    def run(job):
        gpu = int(dict(job.env)["CUDA_VISIBLE_DEVICES"])
        with lock:
            assert job.gpu == 0
            on_device[gpu] += 1
            peak[gpu] = max(peak[gpu], on_device[gpu])
            seen.append(gpu)
        time.sleep(0.02)
        with lock:
            on_device[gpu] -= 1
        return FakeResult("done")

    ex = LocalExecutor(run, slots=6, gpus=[0, 1, 2], per_gpu=2)
    try:
        for i in range(30):
            ex.submit(f"m{i}", FakeJob(f"m{i}"))
        done = []
        while len(done) < 30:
            done += ex.wait_any()
    finally:
        ex.close()
    assert all(r.status == "done" for _, r in done)
    assert set(seen) == {0, 1, 2} and max(peak.values()) == 2  # never more than K on one GPU
    assert all(v == 0 for v in ex.gpu_pool.used.values())


def test_out_of_memory_is_retried_at_lower_packing_then_recorded(tmp_path):
    calls = []
    pool_ref = []

    def run(job):
        gpu = int(dict(job.env)["CUDA_VISIBLE_DEVICES"])
        calls.append((job.arch, gpu, pool_ref[0].used[gpu]))
        if job.arch == "big" or (job.arch == "medium" and pool_ref[0].used[gpu] < 4):
            return FakeResult("oom", "CUDA out of memory: syncedmem.cpp:56] Check failed: error == cudaSuccess")
        return FakeResult("done")

    ex = LocalExecutor(run, slots=4, gpus=[7], per_gpu=4)
    pool_ref.append(ex.gpu_pool)
    try:
        for arch in ("big", "medium", "small"):
            ex.submit(arch, FakeJob(arch))
        results = {}
        while len(results) < 3:
            results.update(ex.wait_any())
    finally:
        ex.close()
    assert results["small"].status == "done"
    assert results["medium"].status == "done"  # succeeded once alone on the GPU (4 of 4 units)
    assert [u for a, _, u in calls if a == "medium"][-1] == 4
    big = [u for a, _, u in calls if a == "big"]
    assert len(big) == 3 and big[-1] == 4  # packings 4, 2, 1: the last one alone on GPU 7
    assert results["big"].status == "oom" and "after 2 retries at lower packing" in results["big"].message
    assert ex.gpu_pool.used == {7: 0}


def test_run_packed_with_one_training_per_gpu_does_not_retry():
    pool = GpuPool([0], per_gpu=1)
    calls = []
    result = run_packed(lambda j: calls.append(j) or FakeResult("oom", "x"), FakeJob("a"), pool)
    assert result.status == "oom" and result.message == "x" and len(calls) == 1


class _FakeRay(types.ModuleType):
    """Just enough of ray for RayExecutor: tasks run at once; num_gpus of each task is recorded."""

    def __init__(self, gpus: float, results):
        super().__init__("ray")
        self.gpus, self.results, self.calls = gpus, results, []
        self.exceptions = types.SimpleNamespace(RayTaskError=type("RTE", (Exception,), {}), RayError=Exception)
        ray = self

        class Remote:
            def __init__(self, fn, opts):
                self.fn, self.opts = fn, opts

            def options(self, **kw):
                return Remote(self.fn, {**self.opts, **kw})

            def remote(self, job, run, use_gpu):
                ray.calls.append((job.arch, self.opts["num_gpus"]))
                return (job.arch, len(ray.calls))

        self._remote_cls = Remote

    def init(self, **kw):
        return None

    def cluster_resources(self):
        return {"GPU": self.gpus, "CPU": 4.0}

    def remote(self, fn):
        return self._remote_cls(fn, {})

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        arch, n = ref
        return self.results(arch, n)

    def cancel(self, ref, force=False):
        return None

    def shutdown(self):
        return None


def test_ray_gets_fractional_gpus_and_more_of_one_after_out_of_memory(monkeypatch):
    fake = _FakeRay(2.0, lambda arch, n: FakeResult("oom" if arch == "big" and n < 3 else "done"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    ex = RayExecutor(lambda j: j, "fake:6379", use_gpu=True, per_gpu=4)
    assert ex.slots == 8  # 2 GPUs x 4 trainings each
    ex.submit("big", FakeJob("big"))
    results = []
    while not results:
        results = ex.wait_any()
    assert results[0][1].status == "done"
    assert fake.calls == [("big", 0.25), ("big", 0.5), ("big", 1.0)]


# -- the driver check ---------------------------------------------------------------


def _gpu_prefix(tmp_path, cuda="13.0", archs="80 90", ptx="90"):
    prefix = tmp_path / "caffe-gpu"
    (prefix / "bin").mkdir(parents=True)
    caffe = prefix / "bin" / "caffe"
    caffe.write_text("#!/bin/sh\necho 'caffe version 1.0.0' >&2\n")
    caffe.chmod(0o755)
    (prefix / "build-info").write_text(f"# test\nbuild=gpu\ncuda={cuda}\ntoolkit=pypi\narchs={archs}\nptx={ptx}\n")
    (prefix / ".complete").write_text("caffe-1.0 gpu test\n")
    return prefix


def test_driver_problems_are_one_line_with_what_to_do(tmp_path):
    info = CaffeInstall(_gpu_prefix(tmp_path) / "bin" / "caffe", "GPU prefix").build_info()
    assert info is not None and info["archs"] == "80 90"
    none = gpuinfo.Driver(error="no NVIDIA driver (libcuda.so.1 not found)")
    assert "needs NVIDIA driver R580 or newer" in gpuinfo.gpu_problem(info, none)
    old = gpuinfo.Driver(cuda=(12, 2), release="535.104.05")
    msg = gpuinfo.gpu_problem(info, old)
    assert "535.104.05 supports CUDA 12.2" in msg and "R580" in msg and "CUDA_HOME" in msg and "\n" not in msg
    h100 = gpuinfo.Driver(cuda=(13, 0), release="580.65.06", gpus=[(0, "NVIDIA H100 80GB HBM3", (9, 0))])
    assert gpuinfo.gpu_problem(info, h100) is None
    assert gpuinfo.arch_support(info, (8, 9)) == "sm_80 code (binary compatible)"  # RTX 40xx
    assert gpuinfo.arch_support(info, (12, 0)).startswith("PTX 90")  # newer GPUs: JIT from PTX
    turing = replace(h100, gpus=[(1, "Tesla T4", (7, 5))])
    assert 'GPU_ARCHS="75"' in gpuinfo.gpu_problem(info, turing)
    assert gpuinfo.gpu_problem({"cuda": "12.4", "archs": "80"}, old) is None  # a CUDA 12 build on a 12.2 driver


def test_gpu_runs_pick_the_gpu_build_and_stop_early_on_an_old_driver(tmp_path, monkeypatch):
    prefix = _gpu_prefix(tmp_path)
    monkeypatch.delenv("CAFFE_BIN", raising=False)
    monkeypatch.delenv("CAFFE_ROOT", raising=False)
    monkeypatch.setenv("METAQNN_CAFFE_GPU_PREFIX", str(prefix))
    c = find_caffe(gpu=True)
    assert c.origin == "GPU prefix" and c.is_gpu_build and c.binary == prefix / "bin" / "caffe"
    with pytest.raises(ConfigError, match=r"supports CUDA 12\.2"):
        gpuinfo.ensure_gpu_ready(c, gpuinfo.Driver(cuda=(12, 2), release="535.104.05"))
    gpuinfo.ensure_gpu_ready(c, gpuinfo.Driver(cuda=(13, 0), release="580.65.06"))
    lines = gpuinfo.describe(c, gpuinfo.Driver(error="no NVIDIA driver (libcuda.so.1 not found)"))
    assert lines[0].startswith("build: GPU, CUDA 13.0 (PyPI wheels), arches sm_80 sm_90 + PTX 90, cuDNN off")
    assert lines[1].startswith("driver: none") and lines[-1].startswith("GPU: cannot run")


def test_a_gpu_request_with_only_the_cpu_prefix_says_make_caffe_gpu(tmp_path):
    prefix = tmp_path / "caffe"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "caffe").write_text("#!/bin/sh\n")
    (prefix / ".complete").write_text("caffe-1.0 bullseye openblas-pthread v1\n")
    with pytest.raises(ConfigError, match="make caffe-gpu"):
        gpuinfo.ensure_gpu_ready(CaffeInstall(prefix / "bin" / "caffe", "private prefix"))


def test_caffe_info_names_the_build_and_the_driver(tmp_path):
    prefix = _gpu_prefix(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("CAFFE_BIN", "CAFFE_ROOT")}
    env["METAQNN_CAFFE_GPU_PREFIX"] = str(prefix)
    env["PATH"] = "/usr/bin:/bin"  # no caffe on PATH
    out = subprocess.run(
        [sys.executable, "-m", "metaqnn", "caffe-info", "--gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    text = out.stdout + out.stderr
    assert f"caffe: {prefix}/bin/caffe (GPU prefix)" in text
    assert "build: GPU, CUDA 13.0" in text and "GPU:" in text


def test_trainings_per_gpu_needs_gpus_and_a_positive_k(tmp_path):
    for extra, fragment in (
        (["--trainings-per-gpu", "0", "--gpu", "0"], "--trainings-per-gpu: a positive integer expected"),
        (["--trainings-per-gpu", "4"], "give --gpu N or --gpus"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "metaqnn", "search", "--exp", str(tmp_path / "x"), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and fragment in out.stderr, out.stderr


# -- the prepared GPU check (scripts/device-check.sh, bench/device_check.py), issue 24 ----------


def _device_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_writes_speed_json_after_each_packing_level(tmp_path, monkeypatch):
    dc = _device_check_module()
    nets = tmp_path / "published" / "prototxt"
    nets.mkdir(parents=True)
    for name in ("svhn_0", "svhn_1"):
        (nets / f"{name}.prototxt").write_text('layer { name: "data" data_param { source: "train.lmdb" } }\n')
    rows = [{"NumIters": i, "Seconds": 0.1 * i} for i in range(0, 50, 10)]
    seen = []

    def fake_run(argv, cwd, log, timeout, env=None):
        k = int(Path(cwd).name.split("_")[0][1:])
        if k == 4:  # the machine is taken back in the middle of K=4
            raise KeyboardInterrupt
        seen.append(k)
        state = types.SimpleNamespace(train_rows=rows, out_of_memory=False)
        return types.SimpleNamespace(state=state, returncode=0)

    monkeypatch.setattr(dc, "_run", fake_run)
    monkeypatch.setattr(dc, "_caffe", lambda: Path("/bin/true"))
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        dc.main(
            [
                "--out",
                str(out),
                "--work",
                str(work),
                "--published",
                str(tmp_path / "published"),
                "speed",
                "--k",
                "1",
                "2",
                "4",
            ]
        )
    import json

    speed = json.loads((out / "speed.json").read_text())
    assert sorted(speed) == ["1", "2"] and speed["1"]["per_net"] == {"svhn_0": 10.0, "svhn_1": 10.0}
    assert speed["2"]["mean_epoch_s"] == pytest.approx(dc.SVHN_EPOCH_ITERS / 10.0)
    assert (work / "speed").is_dir() and not (out / "speed").exists()  # model folders stay out of $OUT


def test_device_check_preflight_names_what_this_python_lacks(tmp_path, monkeypatch, capsys):
    import importlib.util

    dc = _device_check_module()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("h5py", "lmdb") else real(name, *a)
    )
    assert dc.main(["--out", str(tmp_path), "preflight"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks h5py, lmdb (the bundle has wheels for CPython 3.10-3.13)" in err


def _fake_bundle(tmp_path, caffe, digits_data, broken=False):
    """A bundle for the CPU half of the check: the CPU caffe stands in for the GPU build."""
    import shutil

    bundle = tmp_path / "bundle"
    for d in ("caffe/bin", "caffe/lib", "caffe/libexec", "pylib", "published/prototxt", "data"):
        (bundle / d).mkdir(parents=True, exist_ok=True)
    wrapper = bundle / "caffe" / "bin" / "caffe"
    wrapper.write_text(f'#!/bin/sh\nexec "{caffe.binary}" "$@"\n')
    wrapper.chmod(0o755)
    (bundle / "caffe" / "libexec" / "caffe").symlink_to("/bin/sh")  # what its ldd check reads
    root = Path(caffe.binary).resolve().parent.parent  # the schema comes from the bundle's libcaffe
    for lib in sorted(root.glob("root/usr/lib/x86_64-linux-gnu/libcaffe.so*")) + sorted(root.glob("lib/libcaffe*.so*")):
        (bundle / "caffe" / "lib" / lib.name).symlink_to(lib)
    for net in sorted((ROOT.parent / "shared" / "reference" / "published-caffe" / "prototxt").glob("svhn_*.prototxt")):
        shutil.copy(net, bundle / "published" / "prototxt")
    data = bundle / "data" / "digits"
    if broken:
        shutil.copytree(digits_data[0], data)
        mdb = data / "train.lmdb" / "data.mdb"
        mdb.write_bytes(mdb.read_bytes()[:4096])
    else:
        data.symlink_to(digits_data[0])
    return bundle


def _run_device_check(tmp_path, bundle):
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver: the dry run is for machines without one")
    except OSError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("CAFFE_BIN", "CAFFE_ROOT", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, DEVICE_BUNDLE=str(bundle), OUT=str(tmp_path / "out"))
    env["DEVICE_CHECK_WORK"] = str(tmp_path / "work")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "device-check.sh")], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    out = tmp_path / "out"
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files  # what comes back from $OUT
    return proc, (out / "device-check" / "summary.txt").read_text()


def test_device_check_dry_run_without_a_gpu_passes_its_cpu_half(tmp_path, caffe, digits_data):
    import tarfile

    proc, summary = _run_device_check(tmp_path, _fake_bundle(tmp_path, caffe, digits_data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU" in proc.stdout and "step 0 passed" in proc.stdout
    assert "step preflight: ok" in summary and "step parity-cpu: ok" in summary
    assert "result: step 0 passed, no GPU" in summary and len(summary.splitlines()) < 40
    out = tmp_path / "out" / "device-check"
    assert (out / "parity-cpu.json").is_file()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/parity-cpu.log", "logs/preflight.log", "parity-cpu/train.log"} <= set(tar.getnames())


def test_device_check_reports_a_failed_cpu_parity_without_a_gpu(tmp_path, caffe, digits_data):
    proc, summary = _run_device_check(tmp_path, _fake_bundle(tmp_path, caffe, digits_data, broken=True))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "step 0 FAILED" in proc.stdout and "step parity-cpu: FAILED" in summary
    assert "result: step 0 FAILED" in summary
