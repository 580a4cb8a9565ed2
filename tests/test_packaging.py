"""Issue 13: `pip install .` (not editable) gives a working metaqnn with its data files."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.caffe
def test_a_built_wheel_works_outside_the_checkout(tmp_path, caffe):
    dist = tmp_path / "dist"
    source = tmp_path / "source"  # setuptools builds in the source folder: keep the checkout clean
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".deps", ".git", "experiments", "data", "build", "*cache*")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("metaqnn-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from this environment's site-packages (no network needed); its .pth files,
    # among them the editable install's finder, are not processed from a path added this way.
    target = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(target, "project-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "CAFFE_BIN": str(caffe.binary), "PYTHONPATH": ""}

    def run(*args):
        return subprocess.run(
            [str(py), "-m", "metaqnn", *args], cwd=outside, capture_output=True, text=True, env=env, timeout=300
        )

    where = subprocess.run(
        [str(py), "-c", "import metaqnn.resources as r; print(r.__file__, r.asset_dir('presets'))"],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
    )
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr
    info = run("caffe-info")
    assert info.returncode == 0 and "caffe version" in info.stdout, info.stdout + info.stderr
    out = outside / "net"
    rendered = run("render", "--dataset", "svhn", "--arch", "[C(64,3,1), P(2,2), SM(10)]", "--out", str(out))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    net = (out / "net.prototxt").read_text()
    assert 'type: "Convolution"' in net and 'type: "Pooling"' in net
    assert 'type: "Adam"' in (out / "solver_search.prototxt").read_text()
