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
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from data_prep.integrity import check_manifest_matches
from data_prep.prepare import PrepOptions, prepare
from metaqnn import faults
from metaqnn.caffe import runner
from metaqnn.caffe.gpu import ensure_gpu_ready
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import Stall
from metaqnn.caffe.schema import load_schema
from metaqnn.config import Config, upgrade_record
from metaqnn.constraints import LatencyPlan, Scorer
from metaqnn.early_stop.curves import epochs_trained
from metaqnn.early_stop.rules import StopRule
from metaqnn.early_stop.source import RuleSource
from metaqnn.executors import InlineExecutor, LocalExecutor, RayExecutor, connect_ray
from metaqnn.exp_path import check_experiment_dir
from metaqnn.experiment import (
    STORE_NAME,
    experiment_id,
    model_dir,
    source_or_default,
)
from metaqnn.failures import BreakerTripped, CircuitBreaker, InfrastructureError, is_disk_full
from metaqnn.monitor import start_monitor
from metaqnn.preflight import check_caffe_runs, check_caffe_trains
from metaqnn.snapshot_policy import apply_policy, write_policy
from metaqnn.solverspec import Protocol
from metaqnn.trainer import Trainer, TrainJob, TrainResult, caffe_seed
from qagent.agent import Agent, Proposal
from qagent.arch import Layer, parse_architecture
from qagent.costs import Barrier, Budget
from qagent.errors import ConfigError, MetaQNNError
from qagent.status import MEASURED, TRAINED, ModelStatus
from qagent.store import ExperimentStore


@dataclass
class SearchOptions:
    exp_dir: Path
    data_dir: Path
    source: Optional[Path] = None
    gpus: List[int] = field(default_factory=list)  # one training per GPU; empty = CPU
    workers: int = 1  # trainings in flight at once (default: one per GPU, else 1)
    ray: Optional[str] = None  # address of a running Ray cluster
    ray_gpus: bool = False  # on Ray: one GPU per training (slots = the cluster's GPUs)
    trainings_per_gpu: int = 1  # trainings packed onto one GPU at once (local pool: slots; Ray: num_gpus=1/K)
    cpus_per_trial: float = 1.0  # Ray CPU resources per CPU training
    timeout: Optional[float] = None
    max_models: Optional[int] = None  # stop after this many newly trained models (demos, tests)
    max_same_failures: int = 8  # circuit breaker: stop after this many identical model failures in a row
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))
    stall: Optional[Stall] = field(default_factory=Stall)  # hung-caffe watchdog (None: off)

    def __post_init__(self) -> None:
        # resolved here, at the boundary: caffe runs inside each model folder, and the store
        # records the data folder for export/finetune, so a relative path must not get further
        self.exp_dir = Path(self.exp_dir).resolve()
        self.data_dir = Path(self.data_dir).resolve()
        if self.source is not None:
            self.source = Path(self.source).resolve()


def prep_options(config: Config) -> PrepOptions:
    d = config.dataset
    return PrepOptions(
        dataset=d.name,
        validation_size=d.validation_size,
        preprocess=d.preprocess,
        pad=d.pad,
        seed=d.seed,
        labels=d.labels,
    )


def check_data_fits(config: Config, manifest: Dict[str, Any], where: Path) -> None:
    """The prepared images must have the config's size (or crop), channels and classes."""
    check_manifest_matches(
        manifest,
        config.space.image_size,
        config.dataset.channels,
        config.space.num_classes,
        crop_size=config.render.crop_size,
        where=where,
    )


def ensure_data(config: Config, data_dir: Path, source: Optional[Path], log: Callable[[str], None]) -> Dict[str, Any]:
    """Prepare the data if missing; check the exploration LMDBs before hours of training depend on them.

    Damaged data is refused, not rebuilt under an experiment; data that does not fit the config
    (image size, channels, classes) is refused before any model is sampled.  train and val, which
    the search reads, are walked page by page, once; train_full and test, which it does not, by
    their meta pages (walking SVHN's 2.5 GB train_full was most of a cold start-up).
    """
    manifest = prepare(
        prep_options(config),
        data_dir,
        source,
        lambda msg: None if "already" in msg else log(msg),
        repair=False,
        deep=("train", "val"),
    )
    check_data_fits(config, manifest, data_dir)
    return manifest


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
        here, measured = self.store.rewards_at(eps), self.store.rewards_at(eps, measured_only=True)
        best = f"{max(measured):.4f}" if measured else "-"  # a prediction or failure reward is no best accuracy
        stats = f"best {best} mean {sum(here) / len(here):.4f}" if here else "no models yet"
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
            per_gpu=options.trainings_per_gpu,
        )
    slots = max(options.workers, len(options.gpus) * options.trainings_per_gpu or 1)
    if slots == 1:
        gpu = options.gpus[0] if options.gpus else None
        return InlineExecutor(lambda job: run(job if gpu is None else replace(job, gpu=gpu)))
    return LocalExecutor(run, slots, options.gpus, per_gpu=options.trainings_per_gpu if options.gpus else 1)


def budget_barrier(config: Config) -> Optional[Barrier]:
    """The agent's budget barrier ([constraints] max_params / max_macs), or None when there is no such budget."""
    budget = config.constraints.budget
    return Barrier(config.space, config.dataset.channels, budget) if budget.active else None


def check_constraints(config: Config, on_gpus: bool) -> None:
    """A budget no architecture of the space fits, or a latency nobody can measure, is refused before
    anything exists (the cheapest nets are found exactly, :meth:`qagent.costs.Barrier.cheapest`)."""
    c = config.constraints
    barrier = budget_barrier(config)
    if barrier is not None and not barrier.cheapest():
        cheapest = Barrier(config.space, config.dataset.channels, Budget()).cheapest()
        fewest = min(x.params for x in cheapest)
        least = min(x.macs for x in cheapest)
        raise ConfigError(
            f"no architecture of the {config.name} space fits the budget (constraints.max_params {c.max_params}, "
            f"max_macs {c.max_macs}): the smallest has {fewest:,} parameters, the cheapest {least:,} MACs"
        )
    if c.needs_latency and c.latency_device == "gpu" and not on_gpus:
        raise ConfigError(
            'constraints.latency_device = "gpu" needs a search that trains on GPUs (--gpu/--gpus): '
            'this one trains on the CPU; set latency_device = "cpu" or give the GPUs'
        )


def check_before_creating(
    config: Config, options: SearchOptions, caffe: Any, protocol: Protocol
) -> Tuple[str, Dict[str, Any]]:
    """Everything a search depends on, before the experiment exists: the driver (GPU runs), the
    caffe binary and its schema, the data (prepared if missing, checked against the config), and
    one real iteration.  Returns caffe's version line and the manifest's sets."""
    check_constraints(config, bool(options.gpus) or options.ray_gpus)
    if options.gpus and not options.ray:
        ensure_gpu_ready(caffe)
    version = check_caffe_runs(caffe.binary)
    load_schema()  # the schema comes from this Caffe: missing, it is named now, not blamed on the data
    data_dir = options.data_dir
    manifest = ensure_data(config, data_dir, options.source or source_or_default(config), options.log)
    sets: Dict[str, Any] = manifest["sets"]
    protocol.iters_per_epoch(int(sets["train"]["count"]))  # a training set smaller than one batch is refused
    check_caffe_trains(
        caffe.binary,
        train_lmdb=data_dir / sets["train"]["path"],
        val_lmdb=data_dir / sets["val"]["path"],
        image_size=config.space.image_size,
        channels=int(sets["train"]["shape"][0]),
        num_classes=config.space.num_classes,
        transform=config.render.transform(),
        gpu=options.gpus[0] if options.gpus and not options.ray else None,
    )
    return version, sets


def run_search(config: Config, options: SearchOptions) -> Dict[str, Any]:
    """Check everything (caffe, data, options), then create or resume the experiment and search."""
    check_experiment_dir(options.exp_dir)  # never turn someone else's folder into an experiment
    caffe = find_caffe(gpu=bool(options.gpus) or options.ray_gpus)
    protocol: Protocol = config.protocol.load("search")
    # A cluster that cannot be reached is one bounded line before anything exists (data, store).
    if options.ray:
        connect_ray(options.ray)  # the TCP probe first: "connection refused" in a second, not 30 s
    ray_executor = make_executor(options, train_job) if options.ray else None
    try:
        version, sets = check_before_creating(config, options, caffe, protocol)
        return _search_in_store(config, options, caffe, protocol, version, sets, ray_executor)
    finally:
        if ray_executor is not None:
            ray_executor.close()


def _search_in_store(
    config: Config,
    options: SearchOptions,
    caffe: Any,
    protocol: Protocol,
    version: str,
    sets: Dict[str, Any],
    ray_executor: Optional[Any],
) -> Dict[str, Any]:
    """Create or resume the experiment (everything it depends on has been checked) and search."""
    log = options.log
    space, data_dir = config.space, options.data_dir
    with ExperimentStore.open(options.exp_dir / STORE_NAME, config.to_dict(), normalize=upgrade_record) as store:
        store.set_meta("data_dir", str(data_dir))  # the experiment exists only once everything above passed
        exp_id = experiment_id(store, options.exp_dir)
        agent = Agent(space, config.schedule, config.agent, budget_barrier(config))
        store.load_agent(agent)
        progress = Progress(agent, store, log)
        rules = RuleSource(config.early_stop, protocol.epochs, config.agent.seed, progress.event).load(store)

        def make_job(p: Proposal, model_id: int) -> TrainJob:
            return build_job(
                config,
                protocol,
                JobPlaces(caffe.binary, data_dir, sets, options.exp_dir, exp_id),
                model_id,
                p.layers,
                p.arch,
                timeout=options.timeout,
                stall=options.stall,
                early_stop=rules.rule(),
            )

        executor = ray_executor or make_executor(options, progress.trainer)
        where = (
            f"Ray cluster {options.ray}"
            if options.ray
            else (f"GPU {','.join(map(str, options.gpus))} x {options.trainings_per_gpu}" if options.gpus else "CPU")
        )
        log(
            f"search: experiment {options.exp_dir} | caffe {caffe.binary} ({caffe.origin}, {version}) | {where} | "
            f"{executor.slots} at a time | {len(agent.rewards)} models already trained"
        )
        breaker = CircuitBreaker(options.max_same_failures)
        monitor = start_monitor(options.exp_dir, config, log)  # event files for TensorBoard (metaqnn.monitor)
        try:
            scorer = Scorer(config.constraints, space.image_size, config.dataset.channels, space.num_classes)
            policy = config.snapshots
            write_policy(options.exp_dir, policy)

            def keep_disk() -> None:
                try:
                    apply_policy(options.exp_dir, store.models(), policy, progress.event)
                except OSError as exc:  # nothing is lost by keeping a file: said, retried after the next commit
                    progress.event(f"snapshots: the policy could not delete a file ({exc}); kept for now")

            keep_disk()  # the policy may have changed since the last run
            hooks = [keep_disk, monitor.poke]
            search_loop(agent, store, executor, make_job, progress, options.max_models, breaker, rules, scorer, hooks)
        except BaseException:
            runner.stop_all()  # trainings still in flight stay "running" in the store: resumed next time
            raise
        finally:
            monitor.close()  # the last pass: every committed model gets its final points and session
            if executor is not ray_executor:
                executor.close()  # the Ray executor is closed by run_search
            runner.allow_runs()
        if progress.tty:
            sys.stdout.write("\n")
        return summary(store, agent)


class JobPlaces(NamedTuple):
    """Where a training finds its binary, its data (the manifest's sets) and its experiment."""

    caffe: Path
    data_dir: Path
    sets: Dict[str, Any]
    exp_dir: Path
    experiment_id: str = ""  # the store's: every model folder carries it (metaqnn.trainer.folder_identity)


def build_job(
    config: Config,
    protocol: Protocol,
    places: JobPlaces,
    model_id: int,
    layers: Tuple[Layer, ...],
    arch: str,
    timeout: Optional[float] = None,
    stall: Optional[Stall] = None,
    gpu: Optional[int] = None,
    early_stop: Optional[StopRule] = None,
) -> TrainJob:
    """One model's training job: the same for the search and for finishing a model stopped early."""
    sets = places.sets
    return TrainJob(
        layers=layers,
        model_dir=model_dir(places.exp_dir, model_id),
        caffe=places.caffe,
        train_lmdb=places.data_dir / sets["train"]["path"],
        val_lmdb=places.data_dir / sets["val"]["path"],
        train_size=sets["train"]["count"],
        val_size=sets["val"]["count"],
        image_size=config.space.image_size,
        channels=sets["train"]["shape"][0],
        num_classes=config.space.num_classes,
        protocol=protocol,
        transform=config.render.transform(),
        dropout=config.render.dropout,
        gpu=gpu,
        timeout=timeout,
        seed=caffe_seed(config.agent.seed, arch),
        stall=stall,
        early_stop=early_stop,
        experiment_id=places.experiment_id,
        model_id=model_id,
        latency=LatencyPlan.of(config.constraints),
    )


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
    breaker: Optional[CircuitBreaker] = None,
    rules: Optional[RuleSource] = None,
    scorer: Optional[Scorer] = None,
    after_commit: Sequence[Callable[[], None]] = (),
) -> int:
    """Algorithm 1 over a store with up to ``executor.slots`` models in flight.

    Each result is committed with the agent's replays in one transaction as it arrives, so the
    loop can be killed anywhere: models that were in flight are resumed (their snapshots, the
    RNG state that followed them), everything committed stays committed.  An architecture that
    is sampled while a copy of it is training is not sent out again: the sample waits for that
    result and then counts as a duplicate.  ``after_commit``: called after each durable commit (the
    snapshot policy), on the loop's thread.  Returns the number of models sent out.
    """
    loop = _SearchLoop(agent, store, executor, make_job, progress, max_models, breaker, rules, scorer)
    loop.after_commit = list(after_commit)
    return loop.run()


class _SearchLoop:
    """The steps of :func:`search_loop`: resume, fill the slots, wait, commit, answer waiting samples."""

    OOM_AGAIN = "re-sampled a model that ran out of memory"

    def __init__(
        self,
        agent: Agent,
        store: ExperimentStore,
        executor: Any,
        make_job: Callable[[Proposal, int], Any],
        progress: "Progress",
        max_models: Optional[int],
        breaker: Optional[CircuitBreaker],
        rules: Optional[RuleSource] = None,
        scorer: Optional[Scorer] = None,
    ) -> None:
        self.agent, self.store, self.executor, self.make_job = agent, store, executor, make_job
        self.progress, self.max_models, self.breaker, self.rules = progress, max_models, breaker, rules
        self.scorer = scorer  # costs and the shaped reward ([constraints]); None: neither (synthetic searches)
        self.launched: Dict[str, Tuple[Proposal, int]] = {}  # arch -> (its proposal, its model id)
        self.waiting: Dict[str, List[Proposal]] = {}  # arch in flight -> later samples of it
        self.deferred: Set[str] = set()  # set aside in this run (no reward): a re-sample teaches nothing
        self.sent = 0
        self.after_commit: List[Callable[[], None]] = []

    def run(self) -> int:
        self.resume_running()
        while True:
            self.fill_slots()
            if not self.launched:
                return self.sent
            for arch, outcome in self.executor.wait_any():
                p, model_id = self.launched.pop(arch)
                if isinstance(outcome, BaseException):
                    raise as_infrastructure(outcome, model_id)  # the model stays "running": retried on resume
                self.commit(p, outcome, model_id)
                self.answer_waiting(arch)
                for hook in self.after_commit:
                    hook()

    def resume_running(self) -> None:
        """Models that were in flight when the search stopped, then those set aside without a reward,
        go out again first, under their own ids."""
        for row in self.store.resumable():
            what = "resuming" if row.status == ModelStatus.RUNNING else "training again (set aside before)"
            self.progress.event(f"#{row.id} {what} {row.arch}")
            encoded = self.agent.encode(row.arch)
            self.store.count_attempt(row.id)
            self.launch(Proposal(row.arch, parse_architecture(row.arch), row.epsilon, encoded, None), row.id)

    def fill_slots(self) -> None:
        """Sample until every slot is busy, the schedule is done, or a sample must wait for its twin."""
        agent, store = self.agent, self.store
        while (
            len(agent.in_flight) < self.executor.slots
            and agent.epsilon is not None
            and (self.max_models is None or self.sent < self.max_models)
        ):
            p = agent.propose()
            if p.known_reward is not None:
                agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
                store.record_result(agent, p, ModelStatus.DUPLICATE, p.known_reward)
            elif p.arch in self.deferred:
                agent.pass_over(p.arch)
                store.record_skipped(agent, p)
            elif p.arch in agent.skipped:
                agent.skip(p.arch)
                store.record_result(agent, p, ModelStatus.OOM, None, None, self.OOM_AGAIN)
            elif p.arch in agent.in_flight:
                self.waiting.setdefault(p.arch, []).append(p)
                return  # wait for that result instead of sending the same net out twice
            else:
                self.launch(p, store.begin_model(agent, p))

    def launch(self, p: Proposal, model_id: int) -> None:
        self.agent.launch(p)
        self.launched[p.arch] = (p, model_id)
        self.sent += 1
        self.progress.show(f"#{model_id} {p.arch}")
        self.executor.submit(p.arch, self.make_job(p, model_id))

    def commit(self, p: Proposal, result: TrainResult, model_id: int) -> None:
        """One result and the agent's replays, in one transaction; then the circuit breaker sees it.

        A result set aside (deferred) changes nothing the agent knows; when the breaker trips, the
        failures it blames are taken back (:meth:`take_back`)."""
        faults.point("commit")
        agent, metrics = self.agent, result.metrics()
        for note in result.notes:
            self.progress.event(f"#{model_id} {note}", p.epsilon)
        starts = self.breaker is not None and self.breaker.starts_streak(result.status, result.failure, result.message)
        if result.status == ModelStatus.DEFERRED:
            agent.pass_over(p.arch, count=False)
            self.deferred.add(p.arch)
            self.sent -= 1  # --max-models counts models trained: another takes its place
            if starts:
                self.store.checkpoint(agent)
            self.store.defer_model(p.arch, result.message, metrics)
            self.progress.event(f"#{model_id} SET ASIDE, no reward ({result.message}): {p.arch}", p.epsilon)
        elif result.status == ModelStatus.OOM:
            agent.skip(p.arch)
            self.store.record_result(agent, p, ModelStatus.OOM, None, metrics, result.message, checkpoint=starts)
            self.progress.event(f"#{model_id} out of memory, skipped: {p.arch}", p.epsilon)
        else:
            reward = reward_of(result, agent.failure_reward)
            metrics.update(self.scorer.costs(p.layers) if self.scorer is not None else {})
            if self.scorer is not None and self.scorer.shaping and result.status in TRAINED_OK:
                metrics["accuracy"] = reward  # the store keeps the accuracy beside the shaped reward
                reward = self.scorer.reward(reward, metrics)
            rejected = result.status == ModelStatus.REJECTED
            agent.observe(p.arch, p.encoded, reward, p.epsilon, trained=not rejected)
            if rejected:
                self.sent -= 1  # --max-models counts models trained: another takes its place
            self.store.record_result(
                agent, p, result.status, reward, metrics, result.message or None, checkpoint=starts
            )
            if result.status == ModelStatus.DONE and self.rules is not None:
                self.rules.observe(model_id, p.arch, metrics)
            if result.status == ModelStatus.DONE:
                what = f"acc {metrics.get('accuracy', reward):.4f}" + (
                    f" reward {reward:.4f}" if "accuracy" in metrics else ""
                )
            elif result.status == ModelStatus.STOPPED:
                what = (
                    f"predicted {reward:.4f} (stopped at epoch {result.stopped_epoch}, measured {result.best_accuracy})"
                )
            elif rejected:
                what = f"REJECTED ({result.message}), reward {reward:.4f}"
            else:
                what = f"FAILED ({result.failure}: {result.message})"
            self.progress.event(
                f"#{model_id} eps {p.epsilon:g} {what} restarts {result.restarts} {result.wall_time:.1f}s {p.arch}",
                p.epsilon,
            )
        if self.breaker is not None:
            try:
                self.breaker.observe(model_id, result.status, result.failure, result.message)
            except BreakerTripped as tripped:
                self.take_back(tripped)
                raise

    def take_back(self, tripped: BreakerTripped) -> None:
        """The failures the breaker blames on the set-up are not rewards: the store rolls them back,
        and their result.json files are renamed so that the next run trains them again."""
        for model_id in tripped.model_ids:  # first: a kill before the rollback leaves the store as it was
            folder = model_dir(self.store.path.parent, model_id)
            result = folder / "result.json"
            if result.exists():
                result.replace(folder / "result-set-aside.json")
        archs = self.store.rollback_streak(tripped.model_ids, "the circuit breaker blamed the set-up")
        self.progress.event(
            f"circuit breaker: {len(archs)} failures taken back (no reward): "
            + ", ".join(f"#{m}" for m in tripped.model_ids)
        )

    def answer_waiting(self, arch: str) -> None:
        """Samples that waited for ``arch`` become duplicates of its result (or skips, out of memory)."""
        agent = self.agent
        for dup in self.waiting.pop(arch, []):
            if arch in self.deferred:
                agent.pass_over(arch)
                self.store.record_skipped(agent, dup)
            elif arch in agent.rewards:
                agent.observe(arch, dup.encoded, agent.rewards[arch], dup.epsilon)
                self.store.record_result(agent, dup, ModelStatus.DUPLICATE, agent.rewards[arch])
            else:
                agent.skip(arch)
                self.store.record_result(agent, dup, ModelStatus.OOM, None, None, self.OOM_AGAIN)


TRAINED_OK = (ModelStatus.DONE, ModelStatus.STOPPED)  # an accuracy (measured or predicted), shaped with [constraints]


def reward_of(result: TrainResult, failure_reward: float) -> float:
    """The agent's reward: the measured best accuracy, the prediction for a model stopped early,
    else the failure reward."""
    if result.status == ModelStatus.DONE and result.best_accuracy is not None:
        return result.best_accuracy
    if result.status == ModelStatus.STOPPED and result.predicted_accuracy is not None:
        return result.predicted_accuracy
    return failure_reward


def as_infrastructure(exc: BaseException, model_id: int) -> BaseException:
    """An exception out of a training is never a model's result: it stops the search, with one line.

    Ctrl-C and the project's own errors pass through unchanged; anything else is
    a bug or a broken machine, named with the model it happened in.
    """
    if not isinstance(exc, Exception) or isinstance(exc, MetaQNNError):
        return exc
    if is_disk_full(exc):
        return InfrastructureError(f"the disk is full while training model #{model_id}: {exc}")
    return InfrastructureError(
        f"training model #{model_id} raised {type(exc).__name__}: {str(exc)[:200]} "
        "(a bug or a broken machine, not the net's fault; the model is retried on resume)"
    )


def summary(store: ExperimentStore, agent: Optional[Agent] = None, top: int = 10) -> Dict[str, Any]:
    """Per epsilon: models, mean reward (predictions of models stopped early included, as the agent
    saw them), best *measured* accuracy, models stopped; the top measured models; the stopped ones."""
    per_eps: Dict[float, Dict[str, Any]] = {}
    epochs = 0.0
    for m in store.models():
        epochs += epochs_trained(m.metrics) if m.metrics and m.status != ModelStatus.DUPLICATE else 0.0
        if m.status in TRAINED and m.reward is not None:
            e = per_eps.setdefault(m.epsilon, {"rewards": [], "measured": [], "stopped": 0})
            e["rewards"].append(m.accuracy)  # the accuracy, also when [constraints] shaped the reward
            if m.status in MEASURED:
                e["measured"].append(m.accuracy)
            e["stopped"] += m.status == ModelStatus.STOPPED
    stopped = sorted(store.models(ModelStatus.STOPPED), key=lambda m: (-(m.accuracy or 0.0), m.id))
    return {
        "per_epsilon": {
            e: {
                "models": len(v["rewards"]),
                "mean": sum(v["rewards"]) / len(v["rewards"]),
                "best": max(v["measured"]) if v["measured"] else None,
                "stopped": v["stopped"],
            }
            for e, v in sorted(per_eps.items(), reverse=True)
        },
        "top": [(m.id, m.accuracy, m.arch, cost_text(m.metrics)) for m in store.top_models(top)],
        "stopped": [(m.id, m.accuracy, m.arch, m.metrics.get("stopped_epoch")) for m in stopped[:top]],
        "stopped_total": len(stopped),
        "epochs_trained": epochs,
        "complete": None if agent is None else agent.done,
        "samples": sum(1 for _ in store.samples()),
    }


def cost_text(metrics: Dict[str, Any]) -> str:
    """A model's costs as status and the summary print them: params, MACs, latency and where it was measured."""
    parts = []
    if metrics.get("params") is not None:
        parts.append(f"{metrics['params']:,} params")
    if metrics.get("macs") is not None:
        parts.append(f"{metrics['macs']:,} MACs")
    latency = metrics.get("latency")
    if isinstance(latency, dict) and latency.get("forward_ms") is not None:
        parts.append(f"{latency['forward_ms']:.3f} ms on {latency.get('device', '?')}")
    return ", ".join(parts)


def format_summary(s: Dict[str, Any]) -> str:
    early = s.get("stopped_total", 0) > 0
    lines = ["epsilon  models  mean acc  best acc" + ("  stopped" if early else "")]
    for e, v in s["per_epsilon"].items():
        best = "       -" if v["best"] is None else f"{v['best']:8.4f}"
        lines.append(f"{e:7g}  {v['models']:6d}  {v['mean']:8.4f}  {best}" + (f"  {v['stopped']:7d}" if early else ""))
    if early:
        lines.append(
            f"(mean acc includes the predicted rewards of {s['stopped_total']} models stopped early; "
            f"best acc is measured; {s['epochs_trained']:.0f} training epochs in all)"
        )
    lines.append("")
    lines.append("top models (validation accuracy):")
    for rank, (mid, reward, arch, *costs) in enumerate(s["top"], 1):
        lines.append(f"{rank:3d}. #{mid:<5d} {reward:.4f}  {arch}" + (f"  ({costs[0]})" if costs and costs[0] else ""))
    if early:
        lines.append("")
        lines.append("stopped early (PREDICTED accuracy, not measured; `metaqnn finish` trains them to the end):")
        for mid, reward, arch, epoch in s["stopped"][:5]:
            lines.append(f"     #{mid:<5d} {reward:.4f}  predicted at epoch {epoch}  {arch}")
    return "\n".join(lines)
