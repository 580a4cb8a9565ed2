"""Can this machine run the GPU Caffe it has?  Build, arches, CUDA version and the driver.

The GPU build (scripts/setup-caffe-gpu.sh) records what it was built with in PREFIX/build-info.
The driver is asked through libcuda's ``cuDriverGetVersion`` (the CUDA version it supports;
no GPU context is created) and, when there, ``nvidia-smi`` (each GPU's compute capability).
A driver too old for the build's CUDA gives one line saying what to do, before any training.
"""

import contextlib
import ctypes
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from metaqnn.caffe.locate import CaffeInstall
from qagent.errors import ConfigError

# The oldest driver branch for each CUDA major version (CUDA's minor-version compatibility).
MIN_DRIVER = {11: "R450", 12: "R525", 13: "R580"}


@dataclass
class Driver:
    cuda: Optional[Tuple[int, int]] = None  # the newest CUDA version the driver supports
    release: Optional[str] = None  # e.g. 580.65.06
    gpus: List[Tuple[int, str, Tuple[int, int]]] = field(default_factory=list)  # (index, name, compute capability)
    error: str = ""  # why no driver was found


def _version_pair(text: str) -> Tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def probe_driver(timeout: float = 20.0) -> Driver:
    d = Driver()
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        d.error = "no NVIDIA driver (libcuda.so.1 not found)"
        return d
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        d.error = "libcuda.so.1 does not answer cuDriverGetVersion"
        return d
    d.cuda = (version.value // 1000, version.value % 1000 // 10)
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    if m:
        d.release = m.group(1)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=index,name,compute_cap,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        for line in proc.stdout.splitlines() if proc is not None and proc.returncode == 0 else []:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 4 and parts[0].isdigit():
                try:
                    d.gpus.append((int(parts[0]), parts[1], _version_pair(parts[2])))
                except ValueError:
                    continue
                d.release = d.release or parts[3]
    return d


def build_cuda(info: Dict[str, str]) -> Tuple[int, int]:
    return _version_pair(info.get("cuda", "0.0"))


def arch_support(info: Dict[str, str], cc: Tuple[int, int]) -> str:
    """How a GPU of compute capability ``cc`` runs this build: its own cubin, a compatible one, PTX JIT, or not."""
    sms = [int(a) for a in info.get("archs", "").split()]
    ptx = [int(a) for a in info.get("ptx", "").split()]
    mine = cc[0] * 10 + cc[1]
    if mine in sms:
        return f"sm_{mine} code"
    same_major = [a for a in sms if a // 10 == cc[0] and a <= mine]
    if same_major:
        return f"sm_{max(same_major)} code (binary compatible)"
    older_ptx = [a for a in ptx if a <= mine]
    if older_ptx:
        return f"PTX {max(older_ptx)}, compiled by the driver at first use"
    return ""


def gpu_problem(info: Dict[str, str], driver: Driver) -> Optional[str]:
    """One line saying why this GPU build cannot run here and what to do; None when it can."""
    need = build_cuda(info)
    branch = MIN_DRIVER.get(need[0], "a newer")
    rebuild = "or rebuild with `make caffe-gpu CUDA_HOME=/path/to/cuda` (a toolkit the driver supports, 11.8 or newer)"
    if driver.cuda is None:
        return f"{driver.error}: this Caffe is built with CUDA {need[0]}.{need[1]} and needs NVIDIA driver {branch} or newer"
    if driver.cuda[0] < need[0]:
        return (
            f"the NVIDIA driver {driver.release or ''} supports CUDA {driver.cuda[0]}.{driver.cuda[1]}, but this Caffe "
            f"is built with CUDA {need[0]}.{need[1]}: update the driver to {branch} or newer, {rebuild}"
        ).replace("driver  supports", "driver supports")
    for index, name, cc in driver.gpus:
        if not arch_support(info, cc):
            return (
                f"GPU {index} ({name}, sm_{cc[0]}{cc[1]}) is not among this build's arches "
                f"(sm {info.get('archs')}, PTX {info.get('ptx') or 'none'}): rebuild with "
                f'`make caffe-gpu GPU_ARCHS="{cc[0]}{cc[1]}"` (after removing .deps/caffe-gpu)'
            )
    return None


def describe(install: CaffeInstall, driver: Optional[Driver] = None) -> List[str]:
    """The lines of `caffe-info` about the build and the driver."""
    info = install.build_info()
    if info is None or info.get("build") != "gpu":
        kind = (
            "CPU only (Debian 11's caffe, OpenBLAS)" if install.is_cpu_prefix else "unknown (not built by this project)"
        )
        return [f"build: {kind}"]
    sms = " ".join(f"sm_{a}" for a in info.get("archs", "").split())
    ptx = " ".join(f"PTX {a}" for a in info.get("ptx", "").split())
    lines = [
        f"build: GPU, CUDA {info.get('cuda')} ({'PyPI wheels' if info.get('toolkit') == 'pypi' else info.get('toolkit')}), "
        f"arches {sms}{' + ' + ptx if ptx else ''}, cuDNN {info.get('cudnn', 'off')}"
        + (
            f", built in {int(info['build_seconds']) // 60} min"
            if info.get("build_seconds", "").isdigit() and info.get("resumed") != "1"
            else ""
        )
    ]
    d = driver if driver is not None else probe_driver()
    if d.cuda is None:
        lines.append(f"driver: none ({d.error}): CPU mode only")
    else:
        lines.append(f"driver: {d.release or 'unknown release'}, supports CUDA {d.cuda[0]}.{d.cuda[1]}")
        for index, name, cc in d.gpus:
            how = arch_support(info, cc)
            lines.append(f"gpu {index}: {name}, sm_{cc[0]}{cc[1]}: {how or 'NOT supported by this build'}")
    problem = gpu_problem(info, d)
    lines.append("GPU: ready" if problem is None else f"GPU: cannot run: {problem}")
    return lines


def ensure_gpu_ready(install: CaffeInstall, driver: Optional[Driver] = None) -> None:
    """Before the first GPU training: one clear error instead of a crash inside Caffe."""
    if install.is_cpu_prefix:
        raise ConfigError(
            f"a GPU was asked for, but {install.binary} is the CPU-only Caffe: run `make caffe-gpu` "
            "(or set CAFFE_BIN to a GPU build)"
        )
    info = install.build_info()
    if info is None or info.get("build") != "gpu":
        return  # conda or the user's own build: Caffe itself will tell
    problem = gpu_problem(info, driver if driver is not None else probe_driver())
    if problem is not None:
        raise ConfigError(problem)
