"""Run inside a network namespace that has only loopback (see test_parallel.py), so that every
Ray connection stays on 127.0.0.1: Ray replaces a loopback node address by the host's primary
address whenever it has one.

    python tests/ray_cluster.py search|kill EXP_DIR DATA_DIR

Starts a two-node Ray cluster on this machine (a head and a second node, one CPU each), runs a
small digits search on it with the real caffe, optionally kills the Ray worker process of one
training mid-way, stops the cluster and prints a JSON summary of the experiment store.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
SMALL = ["--set", "schedule.steps=[[1.0, 5], [0.1, 3]]", "--set", "space.max_depth=4"]
# "search" also runs early stopping: the fitted predictor travels to the Ray workers with each job
# (warm-up 3; delta 0.1 stops a model unless it is predicted to beat the best with P >= 0.9)
EARLY = [
    "--set", "early_stop.rule='svr'", "--set", "early_stop.warmup=3", "--set", "early_stop.cv_folds=3",
    "--set", "early_stop.delta=0.1", "--set", "early_stop.checkpoints=[1, 2]",
    "--set", "space.allow_gap=false",  # GAP nets never learn on 8x8 digits: without them the warm-up fills
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def caffe_processes(exp: Path):
    """(pid, parent pid, model folder, solver) of every caffe training a model of this experiment."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if not cmd or not cmd[0].endswith(b"caffe"):
            continue
        solver = next((c.decode() for c in cmd if c.startswith(b"--solver=")), "")
        if str(exp) in solver:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            path = Path(solver.split("=", 1)[1])
            out.append((int(proc.name), ppid, path.parent, path))
    return out


def main() -> None:
    mode, exp, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if mode == "fault":  # every training raises inside the Ray worker: the search must stop, not record failures
        env["METAQNN_FAULT"] = "trainer"
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    subprocess.run(
        [str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    subprocess.run(
        [str(RAY), "start", f"--address=127.0.0.1:{port}", *common],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    killed = None
    try:
        argv = [
            sys.executable,
            "-m",
            "metaqnn",
            "search",
            "--ray",
            f"127.0.0.1:{port}",
            "--exp",
            str(exp),
            "--data-dir",
            str(data),
            "--seed",
            "2",
            *SMALL,
            *(EARLY if mode == "search" else []),
        ]
        search = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if mode == "kill":
            deadline = time.time() + 240
            while killed is None and time.time() < deadline and search.poll() is None:
                for pid, ppid, folder, solver in caffe_processes(exp):
                    # mid-training: past the probe, continuing from the epoch-1 snapshot
                    if solver.name == "solver.prototxt":
                        os.kill(ppid, signal.SIGKILL)  # the Ray worker running this training
                        killed = {"worker_pid": ppid, "caffe_pid": pid, "model": folder.name}
                        break
                time.sleep(0.05)
        output, _ = search.communicate(timeout=600)
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)
    import sqlite3

    conn = sqlite3.connect(str(exp / "store.sqlite"))
    rows = conn.execute("SELECT id, arch, status, reward, metrics FROM models ORDER BY id").fetchall()
    samples = conn.execute("SELECT iteration, arch, duplicate FROM samples ORDER BY iteration").fetchall()
    print(
        json.dumps(
            {
                "returncode": search.returncode,
                "output": output[-3000:],
                "killed": killed,
                "models": [
                    {
                        "id": r[0],
                        "arch": r[1],
                        "status": r[2],
                        "reward": r[3],
                        "worker": json.loads(r[4] or "{}").get("worker", ""),
                        "stop_rule": json.loads(r[4] or "{}").get("stop_rule", ""),
                    }
                    for r in rows
                ],
                "samples": samples,
            }
        )
    )


if __name__ == "__main__":
    main()
