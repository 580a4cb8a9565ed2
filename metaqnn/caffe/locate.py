"""Find the Caffe installation the user has.

Order: ``CAFFE_BIN`` (a caffe binary), ``CAFFE_ROOT`` (a source build or an
install prefix), ``caffe`` on PATH (conda), then the project's private Debian
prefix made by ``scripts/setup-caffe.sh`` (``METAQNN_CAFFE_PREFIX`` or
``.deps/caffe``).  When a GPU is asked for, the project's GPU build made by
``scripts/setup-caffe-gpu.sh`` (``METAQNN_CAFFE_GPU_PREFIX`` or ``.deps/caffe-gpu``)
comes right after the two variables; without a GPU it is the last resort (it
trains in CPU mode too).  The result also names the sibling tools
(convert_mnist_data, extract_features, ...) and where a caffe_pb2.py /
caffe.proto / libcaffe may be.

A ``CAFFE_BIN`` that is a wrapper script (``exec /opt/caffe/bin/caffe "$@"`` with extra
environment or a profiler) has no Caffe around it: its schema is then found through
``CAFFE_SCHEMA`` (a caffe_pb2.py, caffe.proto or libcaffe.so file, or a Caffe folder), or
through ``CAFFE_ROOT`` when both ``CAFFE_BIN`` and ``CAFFE_ROOT`` are set (the binary is
CAFFE_BIN's, the schema and the sibling tools CAFFE_ROOT's).  A CAFFE_BIN that is a symbolic
link is also followed to the Caffe it points at.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from metaqnn.config import PROJECT_ROOT
from qagent.errors import MetaQNNError


class CaffeNotFoundError(MetaQNNError):
    pass


SCHEMA_ENV = "CAFFE_SCHEMA"
SCHEMA_HINT = (
    f"set {SCHEMA_ENV} to Caffe's caffe_pb2.py, caffe.proto or libcaffe.so (or to the Caffe folder holding "
    "them), or CAFFE_ROOT to the Caffe install or source folder (a CAFFE_BIN wrapper script keeps its binary)"
)


def schema_override() -> Optional[Path]:
    """``CAFFE_SCHEMA``: the file (or Caffe folder) the schema comes from, when the user names it."""
    value = os.environ.get(SCHEMA_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _root_of(binary: Path) -> Path:
    parent = binary.parent
    if parent.name == "tools" and parent.parent.name == "build":
        return parent.parent.parent
    return parent.parent


def root_candidates(root: Path) -> List[Path]:
    """Files under a Caffe folder (a prefix, a source build, the private prefix) that may carry the schema."""
    out: List[Path] = []
    out += sorted(root.glob("python/caffe/proto/caffe_pb2.py"))
    out += sorted(root.glob("root/usr/lib/python3/dist-packages/caffe/proto/caffe_pb2.py"))
    out += sorted(root.glob("lib/python3*/site-packages/caffe/proto/caffe_pb2.py"))
    out += sorted(root.glob("root/usr/lib/x86_64-linux-gnu/libcaffe.so*"))
    out += sorted(root.glob("lib/libcaffe*.so*")) + sorted(root.glob("build/lib/libcaffe*.so*"))
    out += sorted(root.glob("src/caffe/proto/caffe.proto")) + sorted(root.glob("include/caffe/proto/caffe.proto"))
    return [p for p in out if p.is_file()]


@dataclass(frozen=True)
class CaffeInstall:
    binary: Path
    origin: str  # which rule found it, for messages
    extra_roots: Tuple[Path, ...] = ()  # CAFFE_ROOT next to a CAFFE_BIN (a wrapper): its schema and tools

    @property
    def bin_dir(self) -> Path:
        return self.binary.parent

    def tool(self, name: str) -> Path:
        """A sibling tool such as convert_mnist_data (source builds keep them in build/examples/...)."""
        candidates = [self.bin_dir / name, self.bin_dir / f"{name}.bin"]
        for root in self.roots():
            candidates += [root / "bin" / name] if root != self.root else []
            candidates += [root / "build" / "tools" / f"{name}.bin", root / "build" / "tools" / name]
            candidates += list((root / "build" / "examples").glob(f"*/{name}.bin"))
        found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        on_path = shutil.which(name)
        if found is None and on_path:
            found = Path(on_path)
        cpu_tool = default_prefix() / "bin" / name
        if found is None and self.build_info() is not None and cpu_tool.is_file():
            found = cpu_tool  # the GPU build has no converters: the CPU prefix's are the same Caffe 1.0
        if found is None:
            raise CaffeNotFoundError(f"Caffe tool {name!r} not found next to {self.binary}")
        return found

    @property
    def root(self) -> Optional[Path]:
        """The folder above bin/ (or above build/tools/ for a source build)."""
        return _root_of(self.binary)

    def roots(self) -> List[Path]:
        """Where this Caffe's files may be: its own root, CAFFE_ROOT (with a CAFFE_BIN), a link's target's root."""
        out = [r for r in (self.root, *self.extra_roots) if r is not None]
        try:
            real = self.binary.resolve()
        except (OSError, RuntimeError):
            real = self.binary
        if real != self.binary:
            out.append(_root_of(real))
        return list(dict.fromkeys(out))

    def schema_candidates(self) -> List[Path]:
        """Files that may carry the caffe.proto descriptor, most direct first (CAFFE_SCHEMA before all)."""
        out: List[Path] = []
        named = schema_override()
        if named is not None:
            out += root_candidates(named) if named.is_dir() else [named]
        for root in self.roots():
            out += root_candidates(root)
        return list(dict.fromkeys(out))

    def build_info(self) -> Optional[Dict[str, str]]:
        """What scripts/setup-caffe-gpu.sh recorded (build, cuda, archs, ptx, ...); None for other installs."""
        root = self.root
        path = root / "build-info" if root is not None else None
        if path is None or not path.is_file():
            return None
        info: Dict[str, str] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                info[key.strip()] = value.strip()
        return info

    @property
    def is_gpu_build(self) -> bool:
        info = self.build_info()
        return info is not None and info.get("build") == "gpu"

    @property
    def is_cpu_prefix(self) -> bool:
        """The project's Debian CPU prefix: known to be CPU_ONLY."""
        root = self.root
        stamp = root / ".complete" if root is not None else None
        return stamp is not None and stamp.is_file() and stamp.read_text().startswith("caffe-1.0 bullseye openblas")

    def version(self) -> str:
        proc = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
        return (proc.stdout + proc.stderr).strip().splitlines()[-1] if proc.returncode == 0 else "unknown"


def default_prefix() -> Path:
    return Path(os.environ.get("METAQNN_CAFFE_PREFIX") or PROJECT_ROOT / ".deps" / "caffe")


def default_gpu_prefix() -> Path:
    return Path(os.environ.get("METAQNN_CAFFE_GPU_PREFIX") or PROJECT_ROOT / ".deps" / "caffe-gpu")


def find_gpu_build() -> Optional[CaffeInstall]:
    p = default_gpu_prefix() / "bin" / "caffe"
    if p.is_file() and os.access(p, os.X_OK) and (p.parent.parent / ".complete").is_file():
        return CaffeInstall(p, "GPU prefix")
    return None


def find_caffe(gpu: bool = False) -> CaffeInstall:
    """The Caffe to run; ``gpu=True`` (a GPU was asked for) prefers the project's GPU build."""
    searched: List[str] = []
    env_bin = os.environ.get("CAFFE_BIN")
    env_root = os.environ.get("CAFFE_ROOT")
    if env_bin:
        p = Path(env_bin)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise CaffeNotFoundError(f"CAFFE_BIN={env_bin} is not an executable file")
        if env_root and not Path(env_root).is_dir():
            raise CaffeNotFoundError(f"CAFFE_ROOT={env_root} (the schema and tools for CAFFE_BIN) is not a folder")
        return CaffeInstall(p, "CAFFE_BIN", (Path(env_root),) if env_root else ())
    if env_root:
        for rel in ("build/tools/caffe", "build/tools/caffe.bin", "bin/caffe"):
            p = Path(env_root) / rel
            if p.is_file() and os.access(p, os.X_OK):
                return CaffeInstall(p, "CAFFE_ROOT")
        raise CaffeNotFoundError(f"CAFFE_ROOT={env_root} holds no build/tools/caffe or bin/caffe")
    searched.append("CAFFE_BIN, CAFFE_ROOT (unset)")
    gpu_build = find_gpu_build()
    if gpu and gpu_build is not None:
        return gpu_build
    on_path = shutil.which("caffe")
    if on_path:
        return CaffeInstall(Path(on_path), "PATH")
    searched.append("caffe on PATH")
    prefix = default_prefix()
    p = prefix / "bin" / "caffe"
    if p.is_file() and os.access(p, os.X_OK):
        return CaffeInstall(p, "private prefix")
    searched.append(str(p))
    if gpu_build is not None:
        return gpu_build  # a GPU build trains in CPU mode too
    searched.append(str(default_gpu_prefix() / "bin" / "caffe"))
    raise CaffeNotFoundError(
        "no Caffe found (searched " + "; ".join(searched) + "): run `make caffe` (Debian/Ubuntu), "
        "install conda's caffe (environment.yml), or set CAFFE_BIN/CAFFE_ROOT"
    )
