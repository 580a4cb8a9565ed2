"""The experiment store: one SQLite file per experiment.

It holds the config, every sampled and trained architecture with its status
and metrics, the Q-table, the RNG state and the sampling history, and every
result is written in one transaction together with the Q rows it changed and
the RNG state after its replays.  A search killed at any instant therefore
restarts from the last committed model: nothing completed is lost or trained
again.  The schedule position is derived from the models table, never stored.

Writers hold an ``flock`` on ``<store>.lock`` (released by the kernel if the
process dies, so kill -9 leaves no stale lock); readers (``status``, reports)
open the database read-only and need no lock (WAL mode).
"""

import contextlib
import fcntl
import functools
import json
import os
import shutil
import sqlite3
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, TextIO, Tuple, TypeVar, cast
from urllib.parse import quote

from qagent.agent import Agent, AgentState, Proposal
from qagent.errors import MetaQNNError, StoreError, StoreLockedError
from qagent.outdir import first_missing, make_output_dir, os_reason
from qagent.space import State
from qagent.status import MEASURED, REWARDED, TRAINED, ModelStatus

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models(
    id INTEGER PRIMARY KEY,
    arch TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,           -- running | done | stopped | failed | oom | deferred
    epsilon REAL NOT NULL,          -- epsilon when first sampled (the schedule counts these)
    reward REAL,
    metrics TEXT,                   -- JSON: curve, restarts, lr, wall time, ...
    message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS samples(
    iteration INTEGER PRIMARY KEY,  -- every architecture the agent drew, duplicates included
    arch TEXT NOT NULL,
    epsilon REAL NOT NULL,
    reward REAL,                    -- NULL for a skipped (out-of-memory) model
    duplicate INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS qstates(id INTEGER PRIMARY KEY, state TEXT UNIQUE NOT NULL, actions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS qvalues(id INTEGER PRIMARY KEY, q BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS agent(id INTEGER PRIMARY KEY CHECK (id = 0), rng TEXT NOT NULL);
"""
# Tables every experiment store has had since schema 1: one of them missing is damage, never "new".
REQUIRED_TABLES = ("meta", "models", "samples", "qstates", "qvalues", "agent")
# Added later, created in older stores on first writing open: the Q-values before a run of set-up
# failures began, so that the circuit breaker can take those failures back (see rollback_streak).
_CHECKPOINT_SCHEMA = "CREATE TABLE IF NOT EXISTS qcheckpoint(id INTEGER PRIMARY KEY, q BLOB NOT NULL);"
_TRAINED_SQL = ", ".join(f"'{s.value}'" for s in TRAINED)
_REWARDED_SQL = ", ".join(f"'{s.value}'" for s in REWARDED)
# a column value that is set but is not a number in [0, 1] (a reward or an epsilon)
_NOT_A_RATE = "({0} IS NOT NULL AND (typeof({0}) NOT IN ('real', 'integer') OR {0} < 0 OR {0} > 1))"
# a shaped reward (constraints.reward = "mnas": accuracy x a cost factor) may exceed 1; never negative
_NOT_A_SHAPED_REWARD = "({0} IS NOT NULL AND (typeof({0}) NOT IN ('real', 'integer') OR {0} < 0 OR {0} > 1e6))"
_MEASURED_SQL = ", ".join(f"'{s.value}'" for s in MEASURED)


@dataclass(frozen=True)
class ModelRow:
    id: int
    arch: str
    status: ModelStatus
    epsilon: float
    reward: Optional[float]
    metrics: Dict[str, Any]
    message: Optional[str]
    attempts: int
    started: Optional[float]
    finished: Optional[float]

    @property
    def accuracy(self) -> Optional[float]:
        """The model's (measured or predicted) accuracy; its reward unless [constraints] shaped the reward."""
        value = self.metrics.get("accuracy")
        return self.reward if value is None else float(value)


def _row_to_model(r: sqlite3.Row) -> ModelRow:
    try:
        status = ModelStatus(r["status"])
    except ValueError:
        raise StoreError(f"model #{r['id']} has an unknown status {r['status']!r}: the store is damaged") from None
    return ModelRow(
        r["id"],
        r["arch"],
        status,
        r["epsilon"],
        r["reward"],
        json.loads(r["metrics"]) if r["metrics"] else {},
        r["message"],
        r["attempts"],
        r["started"],
        r["finished"],
    )


def _check_is_file(path: Path) -> None:
    """Refuse a store path that is a folder, a FIFO (SQLite would wait on it forever) or a device."""
    if path.is_dir():
        raise StoreError(f"experiment store {path} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise StoreError(f"experiment store {path} is not a regular file")


def writer_active(path: Path) -> bool:
    """Whether a search (or finish) holds the store's writer lock right now."""
    lock_path = Path(str(path) + ".lock")
    try:
        fh = open(lock_path)  # noqa: SIM115 -- closed below
    except OSError:
        return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        fh.close()
    return False


def _quiet_readonly(path: Path) -> bool:
    """A reader may open the file immutable (so SQLite creates no -wal/-shm beside it) when no
    writer is active and no committed transaction waits in a write-ahead log."""
    wal = Path(f"{path}-wal")
    return not writer_active(path) and (not wal.exists() or wal.stat().st_size == 0)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    _check_is_file(path)
    if readonly:
        if not path.exists():
            raise StoreError(f"no experiment store at {path}")
        if _quiet_readonly(path):
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True, timeout=30)
            conn.row_factory = sqlite3.Row
            return conn
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=30)
        try:
            conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            conn.close()
            if os.access(str(path.parent), os.W_OK):
                raise
            # A WAL database in a folder nobody can write to (a read-only mount): no writer can be
            # active, so the file is read as it is, without the shared-memory file it cannot create.
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True, timeout=30)
    else:
        conn = sqlite3.connect(str(path), timeout=30)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:  # someone else's database: leave it as it is
            conn.close()
            raise StoreError(f"{path} is an SQLite database but not an experiment store")
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives any crash of this process.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def _store_error(path: Path, exc: BaseException) -> StoreError:
    """One line for a failing store: not a database, read-only, disk full, cannot be opened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if isinstance(exc, OSError):
        return StoreError(f"cannot use experiment store {path}: {os_reason(exc)}")
    if "not a database" in low or "malformed" in low:
        return StoreError(f"{path} is not a readable experiment store ({text})")
    if "no such table" in low or "no such column" in low:
        return StoreError(f"{path} is not an experiment store ({text})")
    if "readonly" in low or "read-only" in low:
        return StoreError(f"cannot write experiment store {path}: it is read-only ({text})")
    if "disk is full" in low or "no space" in low or ("disk i/o error" in low and _nearly_full(path.parent)):
        return StoreError(f"cannot write experiment store {path}: no space left on device ({text})")
    if "unable to open" in low:
        folder = path.parent
        why = "its folder is not writable" if not os.access(str(folder), os.W_OK) else text
        return StoreError(f"cannot open experiment store {path}: {why}")
    return StoreError(f"experiment store {path}: {text}")


def _nearly_full(folder: Path) -> bool:
    """SQLite reports a failed write to its shared-memory file as a disk I/O error: is the disk full?"""
    try:
        st = os.statvfs(str(folder))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """SQLite and OS errors of a store method become one StoreError naming the file."""

    @functools.wraps(method)
    def wrapper(self: "ExperimentStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MetaQNNError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise _store_error(self.path, exc) from None
        except (ValueError, KeyError) as exc:  # a row that does not decode: JSON, a missing key
            raise StoreError(f"{self.path} is not a readable experiment store ({type(exc).__name__}: {exc})") from None

    return cast(_F, wrapper)


def _remove_created(files: List[Path], folder: Optional[Path]) -> None:
    with contextlib.suppress(OSError):
        if folder is not None:
            shutil.rmtree(folder)
            return
        for p in files:
            for f in (p, Path(f"{p}-wal"), Path(f"{p}-shm")):
                if f.is_file():
                    f.unlink()


class ExperimentStore:
    """Open with :meth:`open` (writer, locked) or :meth:`open_readonly`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: Optional[TextIO]) -> None:
        self.path = path
        self.conn = conn
        self._lock = lock
        self._persisted_states = 0
        self._reader_files: List[Path] = []  # -shm a read-only open created: removed again on close

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path,
        config: Optional[Dict[str, Any]] = None,
        normalize: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    ) -> "ExperimentStore":
        """Create or reopen for writing; ``config`` must equal the stored one on reopen.

        ``normalize`` turns a record written by an earlier version into today's canonical
        form before the comparison, so an upgrade alone never reads as a changed config.
        """
        path = Path(path)
        new_folder = first_missing(path.parent)
        make_output_dir(path.parent, "experiment folder")
        _check_is_file(path)
        lock_path = Path(str(path) + ".lock")
        created = [p for p in (lock_path, path) if not os.path.lexists(str(p))]
        conn: Optional[sqlite3.Connection] = None
        try:
            lock = open(lock_path, "a+")  # noqa: SIM115 -- held for the store's lifetime
        except OSError as exc:
            raise StoreError(f"cannot open experiment store {path} for writing: {os_reason(exc)}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise StoreLockedError(f"experiment {path.parent} is already open for writing by {holder}") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}")
            lock.flush()
            conn = _connect(path, readonly=False)
            store = cls(path, conn, lock)
            store._init_schema()
            store._check_meta(config, normalize)
            store._check_integrity()
        except BaseException as exc:
            if conn is not None:
                conn.close()
            with contextlib.suppress(OSError):  # closing flushes the pid, which fails again on a full disk
                lock.close()
            _remove_created(created, new_folder)  # a store that could not be opened leaves nothing behind
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise _store_error(path, exc) from None
            raise
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> "ExperimentStore":
        path = Path(path)
        if path.is_file() and path.stat().st_size == 0:
            raise StoreError(f"experiment store {path} is empty (a search may be creating it)")
        shm = Path(f"{path}-shm")
        shm_before = os.path.lexists(str(shm))
        try:
            store = cls(path, _connect(path, readonly=True), None)
        except (sqlite3.Error, OSError) as exc:
            raise _store_error(path, exc) from None
        if not shm_before:
            store._reader_files.append(shm)
        try:
            meta = store.meta()
            if "config" not in meta:
                raise StoreError(f"{path} is not an experiment store (no config recorded)")
            if meta.get("schema") != str(SCHEMA_VERSION):
                raise StoreError(f"{path} has store schema {meta.get('schema')}, this version reads {SCHEMA_VERSION}")
            store.config()
            store._check_integrity(full=False)
        except BaseException:
            store.close()
            raise
        return store

    def _tables(self) -> Set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @_guarded
    def _init_schema(self) -> None:
        """Create the tables of a new store; an existing one must have every table it ever had.

        ``CREATE TABLE IF NOT EXISTS`` alone would recreate a dropped ``models`` or ``samples``
        table empty, and the search would go on as if those models had never been trained.
        """
        tables = self._tables()
        if tables:
            missing = [t for t in REQUIRED_TABLES if t not in tables]
            if missing:
                raise StoreError(
                    f"experiment store {self.path} is damaged: its table{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing (a damaged store is never "
                    "recreated: restore it from a copy, or start a new experiment)"
                )
        with self.conn:
            self.conn.executescript(_SCHEMA + _CHECKPOINT_SCHEMA)
        # Fail now, not at the first result, on a database this process may read but not write.
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("ROLLBACK")

    @_guarded
    def _check_integrity(self, full: bool = True) -> None:
        """Refuse a store whose parts disagree: each of these is damage that would otherwise turn
        into silently wrong rewards (models trained again, replays of results that are gone, an
        RNG that starts over)."""
        conn = self.conn

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        def damaged(why: str) -> StoreError:
            return StoreError(
                f"experiment store {self.path} is damaged: {why} (a damaged store is never repaired by guessing: "
                "restore it from a copy, or start a new experiment)"
            )

        if full:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise damaged(f"SQLite's check says {str(check)[:120]!r}")
        missing = [t for t in REQUIRED_TABLES if t not in self._tables()]
        if missing:
            raise damaged(f"table {', '.join(missing)} missing")
        models, samples = count("SELECT COUNT(*) FROM models"), count("SELECT COUNT(*) FROM samples")
        if not self.meta().get("config") and (models or samples):
            raise damaged("it holds models but no config")
        if (models or samples) and count("SELECT COUNT(*) FROM agent") == 0:
            raise damaged("the agent's random-number state is missing")
        if samples and count("SELECT COUNT(*) FROM qvalues") == 0:
            raise damaged("it holds samples but no Q-values")
        if count("SELECT COUNT(*) FROM qvalues v LEFT JOIN qstates s ON s.id = v.id WHERE s.id IS NULL"):
            raise damaged("Q-values without their states")
        if count("SELECT COUNT(*) FROM samples s LEFT JOIN models m ON m.arch = s.arch WHERE m.id IS NULL"):
            raise damaged("samples of models it does not hold")
        unsampled = count(  # a join, not NOT EXISTS: SQLite indexes it on the fly (ms, not s, at paper scale)
            "SELECT COUNT(*) FROM models m LEFT JOIN (SELECT DISTINCT arch FROM samples) s ON s.arch = m.arch "
            f"WHERE m.status IN ({_REWARDED_SQL}) AND s.arch IS NULL"
        )
        if unsampled:
            raise damaged(f"{unsampled} trained models without their samples")
        if count(f"SELECT COUNT(*) FROM models WHERE status IN ({_REWARDED_SQL}) AND reward IS NULL"):
            raise damaged("trained models without a reward")
        shaped = self._shaped_rewards()
        not_a_reward = (_NOT_A_SHAPED_REWARD if shaped else _NOT_A_RATE).format("reward")
        for table in ("models", "samples"):
            if count(f"SELECT COUNT(*) FROM {table} WHERE {not_a_reward} OR {_NOT_A_RATE.format('epsilon')}"):
                what = "a non-negative number" if shaped else "a number in [0, 1]"
                raise damaged(f"{table} with a reward that is not {what}, or an epsilon that is not in [0, 1]")
        disagree = count(  # a sample keeps the reward the agent was given: the model's, unless finished since
            "SELECT COUNT(*) FROM samples s JOIN models m ON m.arch = s.arch WHERE s.reward IS NOT NULL "
            f"AND m.status IN ({_REWARDED_SQL}) AND s.reward != m.reward "
            "AND instr(COALESCE(m.metrics, ''), '\"stopped_early\"') = 0"
        )
        if disagree:
            raise damaged(f"{disagree} samples whose reward is not their model's")

    def _shaped_rewards(self) -> bool:
        """The experiment's rewards are accuracies times a cost factor (``constraints.reward = "mnas"``)."""
        try:
            record = self.config()
        except Exception:  # no or unreadable config: judged by the checks that read it
            return False
        constraints = record.get("constraints") if isinstance(record, dict) else None
        return isinstance(constraints, dict) and constraints.get("reward") == "mnas"

    def close(self) -> None:
        self.conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._reader_files and not writer_active(self.path):
            for f in self._reader_files:  # SQLite's index of a log that a writer rebuilds anyway
                with contextlib.suppress(OSError):
                    f.unlink()
        self._reader_files = []

    def __enter__(self) -> "ExperimentStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_guarded
    def _check_meta(
        self, config: Optional[Dict[str, Any]], normalize: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    ) -> None:
        meta = self.meta()
        if not meta:
            if config is None:
                raise StoreError(f"{self.path} is a new experiment and no config was given")
            with self.conn:
                self.conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("schema", str(SCHEMA_VERSION)),
                        ("config", json.dumps(config, sort_keys=True)),
                        ("created", str(time.time())),
                        ("experiment_id", uuid.uuid4().hex),
                    ],
                )
            return
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has store schema {meta.get('schema')}, this version reads {SCHEMA_VERSION}")
        if config is not None:
            stored = self.config()
            given = json.loads(json.dumps(config))
            if stored != given and normalize is not None:
                stored = normalize(stored)
            if stored != given:
                diffs = _config_diff(stored, config)
                raise StoreError(
                    f"experiment {self.path.parent} was created with a different config ({diffs}); "
                    "resume it without overrides or use a new EXP name"
                )

    # -- reading ------------------------------------------------------------------
    @_guarded
    def meta(self) -> Dict[str, str]:
        return {r["key"]: r["value"] for r in self.conn.execute("SELECT key, value FROM meta")}

    def experiment_id(self) -> str:
        """This experiment's own name for itself: every model folder it writes carries it."""
        return self.meta().get("experiment_id", "")

    def assign_experiment_id(self) -> str:
        """Give a store made before model folders carried an identity its experiment id (the caller
        has checked that no model folder names one: then the id was deleted, and that is damage)."""
        if not self.experiment_id():
            self.set_meta("experiment_id", uuid.uuid4().hex)
        return self.experiment_id()

    @_guarded
    def set_meta(self, key: str, value: str) -> None:
        """Facts about where the experiment runs (e.g. its data folder), outside the frozen config."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @_guarded
    def config(self) -> Dict[str, Any]:
        config = json.loads(self.meta()["config"])
        if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
            raise StoreError(f"{self.path} is not a readable experiment store (its config is not a table of sections)")
        return config

    @_guarded
    def models(self, status: Optional[ModelStatus] = None) -> List[ModelRow]:
        if status is None:
            rows = self.conn.execute("SELECT * FROM models ORDER BY id")
        else:
            rows = self.conn.execute("SELECT * FROM models WHERE status = ? ORDER BY id", (ModelStatus(status).value,))
        return [_row_to_model(r) for r in rows]

    @_guarded
    def model(self, arch: str) -> Optional[ModelRow]:
        r = self.conn.execute("SELECT * FROM models WHERE arch = ?", (arch,)).fetchone()
        return None if r is None else _row_to_model(r)

    @_guarded
    def top_models(self, k: int, include_predicted: bool = False, by: str = "accuracy") -> List[ModelRow]:
        """The best ``k`` by accuracy (or by ``by="reward"``, the agent's, shaped under [constraints]):
        measured accuracies only, unless predicted ones are asked for too.  Without reward shaping
        the two orders are one: a model's accuracy is its reward."""
        if by not in ("accuracy", "reward"):
            raise ValueError(f"rank by accuracy or reward, not {by!r}")
        statuses = [ModelStatus.DONE] + ([ModelStatus.STOPPED] if include_predicted else [])
        marks = ", ".join("?" for _ in statuses)
        key = "reward" if by == "reward" else "COALESCE(json_extract(metrics, '$.accuracy'), reward)"
        rows = self.conn.execute(
            f"SELECT * FROM models WHERE status IN ({marks}) ORDER BY {key} DESC, id ASC LIMIT ?",
            (*[s.value for s in statuses], k),
        )
        return [_row_to_model(r) for r in rows]

    @_guarded
    def in_finish_order(self, status: ModelStatus) -> List[ModelRow]:
        """Models of one status in the order their results were committed (ties by id)."""
        rows = self.conn.execute(
            "SELECT * FROM models WHERE status = ? ORDER BY finished ASC, id ASC", (ModelStatus(status).value,)
        )
        return [_row_to_model(r) for r in rows]

    @_guarded
    def samples(self) -> Iterator[sqlite3.Row]:
        return iter(self.conn.execute("SELECT * FROM samples ORDER BY iteration").fetchall())

    @_guarded
    def q_rows(self) -> Iterator[sqlite3.Row]:
        """(state, actions JSON, q BLOB) rows for reports."""
        return iter(
            self.conn.execute(
                "SELECT s.state, s.actions, v.q FROM qstates s JOIN qvalues v ON v.id = s.id ORDER BY s.id"
            ).fetchall()
        )

    @_guarded
    def trained_per_epsilon(self) -> Dict[float, int]:
        rows = self.conn.execute(
            f"SELECT epsilon, COUNT(*) AS n FROM models WHERE status IN ({_TRAINED_SQL}) GROUP BY epsilon"
        )
        return {r["epsilon"]: r["n"] for r in rows}

    @_guarded
    def rewards_at(self, epsilon: float, measured_only: bool = False) -> List[float]:
        """Accuracies of the unique models trained at one epsilon (for progress lines: the reward,
        unless [constraints] shaped it); with ``measured_only``, not the predictions of models stopped early."""
        statuses = _MEASURED_SQL if measured_only else _TRAINED_SQL
        rows = self.conn.execute(
            "SELECT COALESCE(json_extract(metrics, '$.accuracy'), reward) AS accuracy FROM models "
            f"WHERE epsilon = ? AND status IN ({statuses})",
            (epsilon,),
        )
        return [r["accuracy"] for r in rows]

    def running(self) -> List[ModelRow]:
        return self.models(ModelStatus.RUNNING)

    # -- agent state ----------------------------------------------------------------
    @_guarded
    def load_agent(self, agent: Agent) -> None:
        """Restore Q rows, replay memory, replay dictionary, counts and RNG into a fresh agent."""
        q_rows: List[Tuple[State, Sequence[float]]] = []
        for r in self.conn.execute("SELECT s.state, v.q FROM qstates s JOIN qvalues v ON v.id = s.id ORDER BY s.id"):
            values = array("d")
            values.frombytes(r["q"])
            q_rows.append((State.from_key(r["state"]), values))
        rewards: Dict[str, float] = {}
        skipped = set()
        for m in self.models():
            if m.status in REWARDED and m.reward is not None:
                rewards[m.arch] = m.reward
            elif m.status == ModelStatus.OOM:
                skipped.add(m.arch)
        r = self.conn.execute("SELECT rng FROM agent WHERE id = 0").fetchone()
        agent.restore(
            AgentState(
                q_rows=q_rows,
                rewards=rewards,
                skipped=skipped,
                trained_per_epsilon=self.trained_per_epsilon(),
                samples=[(s["iteration"], s["arch"], s["reward"]) for s in self.samples()],
                rng=json.loads(r["rng"]) if r is not None else None,
            )
        )
        self._persisted_states = len(q_rows)

    def _write_agent(self, agent: Agent) -> None:
        q = agent.q
        conn = self.conn
        n = len(q)
        if n > self._persisted_states:
            conn.executemany(
                "INSERT INTO qstates(id, state, actions) VALUES (?, ?, ?)",
                [
                    (sid, q.states[sid].key(), json.dumps([str(a) for a in q.actions[sid]]))
                    for sid in range(self._persisted_states, n)
                ],
            )
        conn.executemany(
            "INSERT INTO qvalues(id, q) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET q = excluded.q",
            [(sid, array("d", q.values[sid]).tobytes()) for sid in sorted(q.dirty)],
        )
        self._write_rng(agent)

    def _write_rng(self, agent: Agent) -> None:
        self.conn.execute(
            "INSERT INTO agent(id, rng) VALUES (0, ?) ON CONFLICT(id) DO UPDATE SET rng = excluded.rng",
            (json.dumps(agent.rng_state()),),
        )

    # -- writing ----------------------------------------------------------------------
    @_guarded
    def begin_model(self, agent: Agent, proposal: Proposal) -> int:
        """Mark a model as in flight, together with the RNG state after sampling it.

        After a crash the model is trained (resumed) instead of sampled again, and the
        agent continues with the random numbers that follow it.
        """
        with self.conn:
            self.conn.execute(
                "INSERT INTO models(arch, status, epsilon, attempts, started) VALUES (?, 'running', ?, 1, ?) "
                "ON CONFLICT(arch) DO UPDATE SET status = 'running', attempts = attempts + 1, started = excluded.started",
                (proposal.arch, proposal.epsilon, time.time()),
            )
            self._write_rng(agent)
        row = self.conn.execute("SELECT id FROM models WHERE arch = ?", (proposal.arch,)).fetchone()
        return int(row["id"])

    @_guarded
    def record_result(
        self,
        agent: Agent,
        proposal: Proposal,
        status: ModelStatus,
        reward: Optional[float],
        metrics: Optional[Dict[str, Any]] = None,
        message: Optional[str] = None,
        checkpoint: bool = False,
    ) -> None:
        """Commit one sampled architecture and everything the agent learnt from it, atomically.

        ``status``: 'done' / 'failed' (rewarded, in the replay memory), 'duplicate'
        (already trained: sample row only) or 'oom' (skipped, no reward).  ``checkpoint``: keep
        the Q-values as they were before this result, for :meth:`rollback_streak`.
        """
        now = time.time()
        rewarded = status != ModelStatus.OOM
        with self.conn:
            conn = self.conn
            if checkpoint:
                self._write_checkpoint(agent.iteration - 1)
            if status in REWARDED or status == ModelStatus.OOM:
                conn.execute(
                    "INSERT INTO models(arch, status, epsilon, reward, metrics, message, attempts, finished) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT(arch) DO UPDATE SET status = excluded.status, "
                    "reward = excluded.reward, metrics = excluded.metrics, message = excluded.message, "
                    "finished = excluded.finished",
                    (
                        proposal.arch,
                        status,
                        proposal.epsilon,
                        reward if rewarded else None,
                        json.dumps(metrics or {}, sort_keys=True),
                        message,
                        now,
                    ),
                )
            conn.execute(
                "INSERT INTO samples(iteration, arch, epsilon, reward, duplicate, time) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    agent.iteration,
                    proposal.arch,
                    proposal.epsilon,
                    reward if rewarded else None,
                    int(status == ModelStatus.DUPLICATE),
                    now,
                ),
            )
            self._write_agent(agent)
        # Only once the transaction is durable do these rows count as written.
        self._persisted_states = len(agent.q)
        agent.q.mark_clean(len(agent.q))

    def _write_checkpoint(self, last_iteration: int) -> None:
        """The stored Q-values before the commit now being written (inside its transaction)."""
        conn = self.conn
        conn.execute("DELETE FROM qcheckpoint")
        conn.execute("INSERT INTO qcheckpoint(id, q) SELECT id, q FROM qvalues")
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('checkpoint', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (json.dumps({"iteration": last_iteration, "states": self._persisted_states}),),
        )

    @_guarded
    def checkpoint(self, agent: Agent) -> None:
        """A checkpoint of the stored Q-values now (a run of set-up failures may begin here)."""
        with self.conn:
            self._write_checkpoint(agent.iteration)

    @_guarded
    def rollback_streak(self, model_ids: Sequence[int], reason: str) -> List[str]:
        """Take back a run of failures that the circuit breaker blamed on the set-up, atomically.

        The Q-values return to the checkpoint written with the first of them; every sample
        committed since (those failures, and duplicates answered meanwhile) is removed; the
        blamed models become 'deferred' (no reward, trained first on the next run).  The RNG
        keeps its newest state: no random number is ever drawn twice.  Returns their archs.
        """
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no checkpoint to roll the blamed failures back to")
        point = json.loads(row["value"])
        ids = sorted(set(int(i) for i in model_ids))
        marks = ", ".join("?" for _ in ids)
        with self.conn:
            conn = self.conn
            archs = [r["arch"] for r in conn.execute(f"SELECT arch FROM models WHERE id IN ({marks})", ids)]
            conn.execute("DELETE FROM qvalues")
            conn.execute("INSERT INTO qvalues(id, q) SELECT id, q FROM qcheckpoint WHERE id < ?", (point["states"],))
            conn.execute("DELETE FROM qstates WHERE id >= ?", (point["states"],))
            conn.execute("DELETE FROM samples WHERE iteration > ?", (point["iteration"],))
            conn.execute(
                f"UPDATE models SET status = 'deferred', reward = NULL, finished = NULL, "
                f"message = ? || COALESCE(message, '') WHERE id IN ({marks})",
                (f"{reason}; was: ", *ids),
            )
            conn.execute("DELETE FROM meta WHERE key = 'checkpoint'")
        return archs

    @_guarded
    def defer_model(self, arch: str, message: str, metrics: Optional[Dict[str, Any]] = None) -> None:
        """Set a model aside without a reward: nothing the agent learns changes (see ModelStatus)."""
        with self.conn:
            self.conn.execute(
                "UPDATE models SET status = 'deferred', reward = NULL, message = ?, metrics = ?, finished = ? "
                "WHERE arch = ?",
                (message, json.dumps(metrics or {}, sort_keys=True), time.time(), arch),
            )

    @_guarded
    def record_skipped(self, agent: Agent, proposal: Proposal) -> None:
        """A sample of a model set aside in this run: it teaches nothing (a sample without a reward)."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO samples(iteration, arch, epsilon, reward, duplicate, time) VALUES (?, ?, ?, NULL, 0, ?)",
                (agent.iteration, proposal.arch, proposal.epsilon, time.time()),
            )
            self._write_rng(agent)

    @_guarded
    def count_attempt(self, model_id: int) -> None:
        """A model that goes out again (resumed after a stop, or retried after being set aside) is
        one more attempt: ``attempts`` counts every time a training of it started."""
        with self.conn:
            self.conn.execute(
                "UPDATE models SET attempts = attempts + 1, started = ? WHERE id = ?", (time.time(), int(model_id))
            )

    def resumable(self) -> List[ModelRow]:
        """Models to train first when a search starts: those in flight when it stopped, then those set aside."""
        return self.models(ModelStatus.RUNNING) + self.models(ModelStatus.DEFERRED)

    @_guarded
    def record_finished(self, arch: str, reward: float, metrics: Dict[str, Any]) -> None:
        """A model stopped early, then trained to the end: its measured result replaces the prediction.

        The samples keep the reward the agent was given then (the Q-values were learnt from it);
        the model's row now holds the measured accuracy, which later duplicates are answered with.
        """
        with self.conn:
            cur = self.conn.execute(
                "UPDATE models SET status = ?, reward = ?, metrics = ?, message = NULL, finished = ? "
                "WHERE arch = ? AND status = ?",
                (
                    ModelStatus.DONE.value,
                    reward,
                    json.dumps(metrics, sort_keys=True),
                    time.time(),
                    arch,
                    ModelStatus.STOPPED.value,
                ),
            )
        if cur.rowcount != 1:
            raise StoreError(f"{arch} is not a model stopped early in this experiment")


def _config_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _config_diff(a, b, prefix + key + ".")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r}, given {b!r}")
    return "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
