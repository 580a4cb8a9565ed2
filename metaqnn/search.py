"""The search a user runs: Algorithm 1 with real Caffe training, resumable at any instant.

Per iteration: the agent samples an architecture; an already-trained one
returns its stored reward; a new one is marked in flight in the store, trained
by :class:`~metaqnn.trainer.Trainer`, and its result is committed together with
the agent's replays in one transaction.  After a crash the in-flight model is
resumed (same RNG state, its snapshots) instead of being sampled anew.
"""

import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from data_prep.lmdb_writer import quick_check_lmdb
from data_prep.prepare import PrepOptions, prepare
from metaqnn.caffe.locate import find_caffe
from metaqnn.config import PROJECT_ROOT, agent_config_of, schedule_of, space_of
from metaqnn.executors import InlineExecutor, LocalExecutor, RayExecutor
from metaqnn.netspec import Transform
from metaqnn.solverspec import load_protocol
from metaqnn.trainer import DataMissingError, Trainer, TrainJob, TrainResult, caffe_seed
from qagent.agent import Agent, Proposal
from qagent.arch import parse_architecture
from qagent.store import ExperimentStore

STORE_NAME = "store.sqlite"


@dataclass
class SearchOptions:
    exp_dir: Path
    data_dir: Path
    source: Optional[Path] = None
    gpus: List[int] = field(default_factory=list)  # one training per GPU; empty = CPU
    workers: int = 1  # trainings in flight at once (default: one per GPU, else 1)
    ray: Optional[str] = None  # address of a running Ray cluster
    ray_gpus: bool = False  # on Ray: one GPU per training (slots = the cluster's GPUs)
    cpus_per_trial: float = 1.0  # Ray CPU resources per CPU training
    timeout: Optional[float] = None
    max_models: Optional[int] = None  # stop after this many newly trained models (demos, tests)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


def default_data_dir(config: Dict[str, Any]) -> Path:
    return PROJECT_ROOT / "data" / str(config["dataset"]["name"])


def default_source_dir(config: Dict[str, Any]) -> Path:
    """Where `metaqnn download` puts a dataset's release files."""
    return default_data_dir(config) / "source"


def source_or_default(config: Dict[str, Any]) -> Optional[Path]:
    d = default_source_dir(config)
    return d if d.is_dir() else None


def default_exp_dir(name: str) -> Path:
    return PROJECT_ROOT / "experiments" / name


def experiment_data_dir(store: ExperimentStore) -> Path:
    """The data folder the experiment was searched with (export, finetune and ensemble use it too)."""
    recorded = store.meta().get("data_dir")
    return Path(recorded) if recorded else default_data_dir(store.config())


def prep_options(config: Dict[str, Any]) -> PrepOptions:
    d = config["dataset"]
    return PrepOptions(
        dataset=d["name"],
        validation_size=int(d.get("validation_size", 5000)),
        preprocess=d.get("preprocess", "none"),
        pad=int(d.get("pad", 0)),
        seed=int(d.get("seed", 0)),
    )


def ensure_data(
    config: Dict[str, Any], data_dir: Path, source: Optional[Path], log: Callable[[str], None]
) -> Dict[str, Any]:
    """Prepare the data if missing; check the exploration LMDBs before hours of training depend on them."""
    manifest = prepare(prep_options(config), data_dir, source, lambda msg: None if "already" in msg else log(msg))
    for name in ("train", "val"):
        quick_check_lmdb(data_dir / manifest["sets"][name]["path"], int(manifest["sets"][name]["count"]))
    return manifest


def transform_of(config: Dict[str, Any]) -> Transform:
    r = config.get("render", {})
    return Transform(
        mirror=bool(r.get("mirror", False)),
        crop_size=int(r.get("crop_size", 0)),
        scale=float(r.get("scale", 0.0)),
        mean_file=str(r.get("mean_file", "")),
    )


class Progress:
    """The live line: models done/total, epsilon, best and mean at this epsilon, current model, ETA.

    Statistics are computed on the search's own thread after each commit (the store's
    connection belongs to it); ``show`` may be called from training threads and only reuses them.
    On a terminal the line is redrawn in place; otherwise every event line carries it.
    """

    def __init__(self, agent: Agent, store: ExperimentStore, log: Callable[[str], None]) -> None:
        self.agent, self.store, self.log = agent, store, log
        self.tty = sys.stdout.isatty()
        self.times: List[float] = []
        self._lock = threading.Lock()
        self._status = ""
        self.refresh()

    def refresh(self) -> None:
        self._status = self._line()

    def _line(self, epsilon: Optional[float] = None) -> str:
        """The status at ``epsilon`` (default: the epsilon models are now drawn at; the last one when complete)."""
        done = sum(self.agent.trained_per_epsilon.values())
        total = self.agent.schedule.total
        eps = self.agent.epsilon if epsilon is None else epsilon
        eps = self.agent.schedule.steps[-1][0] if eps is None else eps
        here = self.store.rewards_at(eps)
        stats = f"best {max(here):.4f} mean {sum(here) / len(here):.4f}" if here else "no models yet"
        eta = ""
        if done >= total:
            eta = " | done"
        elif self.times:
            recent = self.times[-20:]
            per_model = sum(recent) / len(recent) / max(1, len(self.agent.in_flight))  # N train at once
            eta = f" | ETA {_hms(per_model * max(0, total - done))}"
        return f"[{done}/{total}] eps {eps:g} ({stats}){eta}"

    def trainer(self, job: TrainJob) -> TrainResult:
        """Train locally, showing the epochs of this model on the live line."""
        started = time.monotonic()
        name = f"#{int(job.model_dir.name)}"
        result = Trainer(job, progress=lambda msg: self.show(f"{name} {msg}")).train()
        self.times.append(time.monotonic() - started)
        return result

    def show(self, current: str = "") -> None:
        if self.tty:
            with self._lock:
                sys.stdout.write("\r\033[K" + self._status + (f" | {current}" if current else ""))
                sys.stdout.flush()

    def event(self, message: str, epsilon: Optional[float] = None) -> None:
        """Log an event about a model drawn at ``epsilon``: its line shows that epsilon's statistics,
        not those of the next epsilon the commit may have moved the agent on to."""
        self.refresh()
        with self._lock:
            if self.tty:
                sys.stdout.write("\r\033[K")
                self.log(message)
            else:
                self.log(f"{self._line(epsilon)} | {message}")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def make_executor(options: SearchOptions, run: Callable[[Any], TrainResult]) -> Any:
    if options.ray:
        return RayExecutor(
            run,
            options.ray,
            slots=options.workers if options.workers > 1 else None,
            use_gpu=options.ray_gpus,
            cpus_per_trial=options.cpus_per_trial,
        )
    slots = max(options.workers, len(options.gpus) or 1)
    if slots == 1:
        gpu = options.gpus[0] if options.gpus else None
        return InlineExecutor(lambda job: run(job if gpu is None else replace(job, gpu=gpu)))
    return LocalExecutor(run, slots, options.gpus)


def run_search(config: Dict[str, Any], options: SearchOptions) -> Dict[str, Any]:
    log = options.log
    caffe = find_caffe()
    space = space_of(config)
    protocol = load_protocol(config.get("protocol", {}).get("search", "search"))
    with ExperimentStore.open(options.exp_dir / STORE_NAME, config) as store:
        manifest = ensure_data(config, options.data_dir, options.source or source_or_default(config), log)
        store.set_meta("data_dir", str(options.data_dir.resolve()))
        agent = Agent(space, schedule_of(config), agent_config_of(config))
        store.load_agent(agent)
        progress = Progress(agent, store, log)
        sets = manifest["sets"]

        def make_job(p: Proposal, model_id: int) -> TrainJob:
            return TrainJob(
                layers=p.layers,
                model_dir=options.exp_dir / "models" / f"{model_id:05d}",
                caffe=caffe.binary,
                train_lmdb=options.data_dir / sets["train"]["path"],
                val_lmdb=options.data_dir / sets["val"]["path"],
                train_size=sets["train"]["count"],
                val_size=sets["val"]["count"],
                image_size=space.image_size,
                channels=sets["train"]["shape"][0],
                num_classes=space.num_classes,
                protocol=protocol,
                transform=transform_of(config),
                dropout=config.get("render", {}).get("dropout", "paper"),
                timeout=options.timeout,
                seed=caffe_seed(agent.config.seed, p.arch),
            )

        executor = make_executor(options, train_job if options.ray else progress.trainer)
        where = (
            f"Ray cluster {options.ray}"
            if options.ray
            else (f"GPU {','.join(map(str, options.gpus))}" if options.gpus else "CPU")
        )
        log(
            f"search: experiment {options.exp_dir} | caffe {caffe.binary} ({caffe.origin}) | {where} | "
            f"{executor.slots} at a time | {len(agent.rewards)} models already trained"
        )
        try:
            search_loop(agent, store, executor, make_job, progress, options.max_models)
        finally:
            executor.close()
        if progress.tty:
            sys.stdout.write("\n")
        return summary(store, agent)


def train_job(job: TrainJob) -> TrainResult:
    """Module-level so that Ray can ship it to workers."""
    return Trainer(job).train()


def search_loop(
    agent: Agent,
    store: ExperimentStore,
    executor: Any,
    make_job: Callable[[Proposal, int], Any],
    progress: "Progress",
    max_models: Optional[int] = None,
) -> int:
    """Algorithm 1 over a store with up to ``executor.slots`` models in flight.

    Each result is committed with the agent's replays in one transaction as it arrives, so the
    loop can be killed anywhere: models that were in flight are resumed (their snapshots, the
    RNG state that followed them), everything committed stays committed.  An architecture that
    is sampled while a copy of it is training is not sent out again: the sample waits for that
    result and then counts as a duplicate.  Returns the number of models sent out.
    """
    launched: Dict[str, Tuple[Proposal, int]] = {}
    waiting: Dict[str, List[Proposal]] = {}
    sent = 0

    def launch(p: Proposal, model_id: int) -> None:
        agent.launch(p)
        launched[p.arch] = (p, model_id)
        progress.show(f"#{model_id} {p.arch}")
        executor.submit(p.arch, make_job(p, model_id))

    def commit(p: Proposal, result: TrainResult, model_id: int) -> None:
        metrics = result.metrics()
        if result.status == "oom":
            agent.skip(p.arch)
            store.record_result(agent, p, "oom", None, metrics, result.message)
            progress.event(f"#{model_id} out of memory, skipped: {p.arch}", p.epsilon)
            return
        reward = result.best_accuracy if result.status == "done" else agent.failure_reward
        assert reward is not None
        agent.observe(p.arch, p.encoded, reward, p.epsilon)
        store.record_result(agent, p, result.status, reward, metrics, result.message or None)
        what = f"acc {reward:.4f}" if result.status == "done" else f"FAILED ({result.failure}: {result.message})"
        progress.event(
            f"#{model_id} eps {p.epsilon:g} {what} restarts {result.restarts} {result.wall_time:.1f}s {p.arch}",
            p.epsilon,
        )

    def answer_waiting(arch: str) -> None:
        for dup in waiting.pop(arch, []):
            if arch in agent.rewards:
                agent.observe(arch, dup.encoded, agent.rewards[arch], dup.epsilon)
                store.record_result(agent, dup, "duplicate", agent.rewards[arch])
            else:
                agent.skip(arch)
                store.record_result(agent, dup, "oom", None, None, "re-sampled a model that ran out of memory")

    for row in store.running():  # models that were in flight when the search stopped
        progress.event(f"#{row.id} resuming {row.arch}")
        launch(Proposal(row.arch, parse_architecture(row.arch), row.epsilon, agent.encode(row.arch), None), row.id)
        sent += 1
    while True:
        while (
            len(agent.in_flight) < executor.slots
            and agent.epsilon is not None
            and (max_models is None or sent < max_models)
        ):
            p = agent.propose()
            if p.known_reward is not None:
                agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
                store.record_result(agent, p, "duplicate", p.known_reward)
            elif p.arch in agent.skipped:
                agent.skip(p.arch)
                store.record_result(agent, p, "oom", None, None, "re-sampled a model that ran out of memory")
            elif p.arch in agent.in_flight:
                waiting.setdefault(p.arch, []).append(p)
                break  # wait for that result instead of sending the same net out twice
            else:
                launch(p, store.begin_model(agent, p))
                sent += 1
        if not launched:
            return sent
        for arch, outcome in executor.wait_any():
            p, model_id = launched.pop(arch)
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception) or isinstance(outcome, DataMissingError):
                    raise outcome  # Ctrl-C, missing data: stop; the store stays consistent
                outcome = TrainResult("failed", failure="crashed", message=f"training raised {outcome!r}"[:500])
            commit(p, outcome, model_id)
            answer_waiting(arch)


def summary(store: ExperimentStore, agent: Optional[Agent] = None, top: int = 10) -> Dict[str, Any]:
    per_eps: Dict[float, List[float]] = {}
    for m in store.models():
        if m.status in ("done", "failed") and m.reward is not None:
            per_eps.setdefault(m.epsilon, []).append(m.reward)
    return {
        "per_epsilon": {
            e: {"models": len(v), "mean": sum(v) / len(v), "best": max(v)}
            for e, v in sorted(per_eps.items(), reverse=True)
        },
        "top": [(m.id, m.reward, m.arch) for m in store.top_models(top)],
        "complete": None if agent is None else agent.done,
        "samples": sum(1 for _ in store.samples()),
    }


def format_summary(s: Dict[str, Any]) -> str:
    lines = ["epsilon  models  mean acc  best acc"]
    for e, v in s["per_epsilon"].items():
        lines.append(f"{e:7g}  {v['models']:6d}  {v['mean']:8.4f}  {v['best']:8.4f}")
    lines.append("")
    lines.append("top models (validation accuracy):")
    for rank, (mid, reward, arch) in enumerate(s["top"], 1):
        lines.append(f"{rank:3d}. #{mid:<5d} {reward:.4f}  {arch}")
    return "\n".join(lines)
