"""Parse Caffe's glog output: a pure function over lines, usable while the log streams in.

Rows match Caffe's tools/extra/parse_log.py (NumIters, Seconds, LearningRate,
then every named net output), which is Python-2 only and crashes on NaN; this
parser also reports snapshots, "Optimization Done", NaN/inf losses, fatal
lines and CUDA out-of-memory.  Thread ids and file:line differ between builds,
so lines are matched loosely on their message.
"""

import csv
import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

_PREFIX = re.compile(r"^([IWEF])(\d{4}) (\d\d):(\d\d):(\d\d)\.(\d+)\s+\d+\s+[^\]]*\]\s?(.*)$")
_NUM = r"([-+]?(?:nan|inf|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))"
_ITER = re.compile(r"Iteration (\d+)")
_TESTING = re.compile(r"Iteration (\d+), Testing net")
_TRAIN_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUM, re.I)
_LR = re.compile(r"Iteration (\d+), lr = " + _NUM, re.I)
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = " + _NUM, re.I)
_SNAPSHOT = re.compile(r"Snapshotting (?:solver state )?to binary proto file (\S+)")
_OOM = re.compile(r"out of memory|cudaSuccess \(2 vs\. 0\)")


def _float(text: str) -> float:
    t = text.lower().lstrip("+")
    if t in ("nan", "-nan"):
        return math.nan
    return float(t)


@dataclass
class LogState:
    """Everything learnt from the lines so far."""

    train_rows: List[Dict[str, float]] = field(default_factory=list)
    test_rows: List[Dict[str, float]] = field(default_factory=list)
    snapshots: List[str] = field(default_factory=list)
    snapshots_complete: int = 0  # snapshots[:n] are followed by another line: their files are written
    done: bool = False
    diverged: bool = False
    out_of_memory: bool = False
    fatal: List[str] = field(default_factory=list)
    last_iteration: int = -1
    start: Optional[_dt.datetime] = None
    seconds: float = 0.0
    learning_rate: float = math.nan
    _test_row: Optional[Dict[str, float]] = None
    _train_row: Optional[Dict[str, float]] = None

    def best_test(self, output: str) -> Optional[Tuple[int, float]]:
        """(iteration, value) of the highest finite value of a test output before any divergence."""
        best: Optional[Tuple[int, float]] = None
        for row in self.test_rows:
            v = row.get(output)
            if v is None or not math.isfinite(v):
                continue
            if row.get("_nan_before"):
                continue
            if best is None or v > best[1]:
                best = (int(row["NumIters"]), v)
        return best


class LogParser:
    """Feed lines one by one (``feed``) or all at once (:func:`parse_lines`)."""

    def __init__(self, year: Optional[int] = None) -> None:
        self.state = LogState()
        self.year = year or _dt.date.today().year

    def _stamp(self, m: "re.Match[str]") -> float:
        month_day, hh, mm, ss, frac = m.group(2), m.group(3), m.group(4), m.group(5), m.group(6)
        t = _dt.datetime(
            self.year, int(month_day[:2]), int(month_day[2:]), int(hh), int(mm), int(ss), int(frac[:6].ljust(6, "0"))
        )
        st = self.state
        if st.start is None:
            st.start = t
        secs = (t - st.start).total_seconds()
        if secs < 0:  # the log crossed new year
            secs += 365 * 86400
        st.seconds = secs
        return secs

    def feed(self, line: str) -> None:
        st = self.state
        # Caffe logs "Snapshotting to ..." *before* writing the file: a later caffe line means it is
        # complete (not our own "# stopped" notes, written after a kill that may have cut the write).
        if not line.startswith("# "):
            st.snapshots_complete = len(st.snapshots)
        m = _PREFIX.match(line)
        if m is None:
            if "Check failure stack trace" in line:
                st.fatal.append(line.strip())
            return
        level, msg = m.group(1), m.group(7)
        seconds = self._stamp(m)
        if level == "F":
            st.fatal.append(msg.strip())
            if _OOM.search(msg):
                st.out_of_memory = True
            return
        if "Optimization Done" in msg:
            st.done = True
            return
        snap = _SNAPSHOT.search(msg)
        if snap:
            st.snapshots.append(snap.group(1))
            return
        testing = _TESTING.search(msg)
        if testing:
            st.last_iteration = int(testing.group(1))
            st._test_row = None
            return
        lr = _LR.search(msg)
        if lr:
            st.learning_rate = _float(lr.group(2))
            st.last_iteration = int(lr.group(1))
            for row in (st._train_row,):
                if row is not None and row["NumIters"] == st.last_iteration and math.isnan(row["LearningRate"]):
                    row["LearningRate"] = st.learning_rate
            return
        loss = _TRAIN_LOSS.search(msg)
        if loss:
            st.last_iteration = int(loss.group(1))
            if not math.isfinite(_float(loss.group(2))):
                st.diverged = True
            st._train_row = None
            return
        out = _OUTPUT.search(msg)
        if out:
            kind, index, name, value = out.group(1), int(out.group(2)), out.group(3), _float(out.group(4))
            rows = st.train_rows if kind == "Train" else st.test_rows
            attr = "_train_row" if kind == "Train" else "_test_row"
            row = getattr(st, attr)
            if row is None or index == 0:
                row = {"NumIters": float(st.last_iteration), "Seconds": seconds, "LearningRate": st.learning_rate}
                if st.diverged:
                    row["_nan_before"] = 1.0
                rows.append(row)
                setattr(st, attr, row)
            row[name] = value
            if not math.isfinite(value) and ("loss" in name.lower()):
                st.diverged = True
            return
        it = _ITER.search(msg)
        if it:
            st.last_iteration = int(it.group(1))


def parse_lines(lines: Iterable[str], year: Optional[int] = None) -> LogState:
    parser = LogParser(year)
    for line in lines:
        parser.feed(line)
    _fix_initial_nan_lr(parser.state.train_rows)
    _fix_initial_nan_lr(parser.state.test_rows)
    return parser.state


def is_run_header(line: str) -> bool:
    """The comment line the runner writes before each caffe run ("# run N: <argv>"; older logs: "# <argv>")."""
    return line.startswith("# ") and " train --solver=" in line


def run_number(header: str) -> int:
    """The run counter of a header line; -1 for headers written before runs were numbered."""
    m = re.match(r"# run (\d+):", header)
    return int(m.group(1)) if m else -1


def split_runs(lines: Iterable[str]) -> List[Tuple[int, List[str]]]:
    """(run number, lines) of each caffe run appended to one log file, oldest first."""
    runs: List[Tuple[int, List[str]]] = []
    for line in lines:
        if is_run_header(line) or not runs:
            runs.append((run_number(line) if is_run_header(line) else -1, []))
        runs[-1][1].append(line)
    return runs


def _latest_per_iteration(rows: Iterable[Dict[str, float]]) -> List[Dict[str, float]]:
    """One row per NumIters, the latest (a resumed run may measure an iteration again), in order."""
    by_iter: Dict[float, Dict[str, float]] = {}
    for r in rows:
        by_iter[r["NumIters"]] = r
    return [by_iter[k] for k in sorted(by_iter)]


def merge_states(states: Iterable[LogState]) -> LogState:
    """The rows of several runs of one model (oldest first) with every iteration exactly once."""
    states = list(states)
    merged = LogState()
    merged.train_rows = _latest_per_iteration(r for st in states for r in st.train_rows)
    merged.test_rows = _latest_per_iteration(r for st in states for r in st.test_rows)
    return merged


def _fix_initial_nan_lr(rows: List[Dict[str, float]]) -> None:
    """As parse_log.py: rows before the first 'lr =' line take the first known rate."""
    first = next((r["LearningRate"] for r in rows if not math.isnan(r["LearningRate"])), None)
    if first is None:
        return
    for r in rows:
        if not math.isnan(r["LearningRate"]):
            break
        r["LearningRate"] = first


def write_csvs(state: LogState, prefix: Path) -> Tuple[Path, Path]:
    """``<prefix>.train`` / ``<prefix>.test`` with parse_log.py's columns."""
    out = []
    for suffix, rows in (("train", state.train_rows), ("test", state.test_rows)):
        path = Path(f"{prefix}.{suffix}")
        names: List[str] = ["NumIters", "Seconds", "LearningRate"]
        for r in rows:
            names += [k for k in r if k not in names and not k.startswith("_")]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=names, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        out.append(path)
    return out[0], out[1]
