"""The search a user runs: Algorithm 1 with real Caffe training, resumable at any instant.

Per iteration: the agent samples an architecture; an already-trained one
returns its stored reward; a new one is marked in flight in the store, trained
by :class:`~metaqnn.trainer.Trainer`, and its result is committed together with
the agent's replays in one transaction.  After a crash the in-flight model is
resumed (same RNG state, its snapshots) instead of being sampled anew.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from data_prep.lmdb_writer import quick_check_lmdb
from data_prep.prepare import PrepOptions, prepare
from metaqnn.caffe.locate import find_caffe
from metaqnn.config import PROJECT_ROOT, agent_config_of, schedule_of, space_of
from metaqnn.netspec import Transform
from metaqnn.solverspec import load_protocol
from metaqnn.trainer import Trainer, TrainJob, TrainResult
from qagent.agent import Agent, Proposal
from qagent.arch import parse_architecture
from qagent.store import ExperimentStore

STORE_NAME = "store.sqlite"


@dataclass
class SearchOptions:
    exp_dir: Path
    data_dir: Path
    source: Optional[Path] = None
    gpu: Optional[int] = None
    timeout: Optional[float] = None
    max_models: Optional[int] = None  # stop after this many newly trained models (demos, tests)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


def default_data_dir(config: Dict[str, Any]) -> Path:
    return PROJECT_ROOT / "data" / str(config["dataset"]["name"])


def default_exp_dir(name: str) -> Path:
    return PROJECT_ROOT / "experiments" / name


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
    """The live line: models done/total, epsilon, best and mean at this epsilon, current model, ETA."""

    def __init__(self, agent: Agent, store: ExperimentStore, log: Callable[[str], None]) -> None:
        self.agent, self.store, self.log = agent, store, log
        self.tty = sys.stdout.isatty()
        self.times: List[float] = []

    def line(self, current: str = "") -> str:
        done = sum(self.agent.trained_per_epsilon.values())
        total = self.agent.schedule.total
        eps = self.agent.epsilon
        here = [
            m.reward
            for m in self.store.models()
            if m.epsilon == eps and m.status in ("done", "failed") and m.reward is not None
        ]
        stats = f"best {max(here):.4f} mean {sum(here) / len(here):.4f}" if here else "no models yet"
        eta = ""
        if self.times:
            avg = sum(self.times[-20:]) / len(self.times[-20:])
            eta = f" | ETA {_hms(avg * max(0, total - done))}"
        eps_text = "done" if eps is None else f"{eps:g}"
        return f"[{done}/{total}] eps {eps_text} ({stats}){eta}" + (f" | {current}" if current else "")

    def show(self, current: str = "") -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + self.line(current))
            sys.stdout.flush()

    def event(self, message: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")
        self.log(message)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_search(config: Dict[str, Any], options: SearchOptions) -> Dict[str, Any]:
    log = options.log
    caffe = find_caffe()
    space = space_of(config)
    protocol = load_protocol(config.get("protocol", {}).get("search", "search"))
    with ExperimentStore.open(options.exp_dir / STORE_NAME, config) as store:
        manifest = ensure_data(config, options.data_dir, options.source, log)
        agent = Agent(space, schedule_of(config), agent_config_of(config))
        store.load_agent(agent)
        progress = Progress(agent, store, log)
        sets = manifest["sets"]
        log(
            f"search: experiment {options.exp_dir} | caffe {caffe.binary} ({caffe.origin}) | "
            f"{'GPU ' + str(options.gpu) if options.gpu is not None else 'CPU'} | "
            f"{len(agent.rewards)} models already trained"
        )

        def train(p: Proposal, model_id: int) -> TrainResult:
            job = TrainJob(
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
                gpu=options.gpu,
                timeout=options.timeout,
            )
            started = time.monotonic()
            result = Trainer(job, progress=lambda msg: progress.show(f"#{model_id} {msg}")).train()
            progress.times.append(time.monotonic() - started)
            return result

        search_loop(agent, store, train, progress, options.max_models)
        if progress.tty:
            sys.stdout.write("\n")
        return summary(store, agent)


def search_loop(
    agent: Agent,
    store: ExperimentStore,
    train: Callable[[Proposal, int], TrainResult],
    progress: "Progress",
    max_models: Optional[int] = None,
) -> int:
    """Algorithm 1 over a store; returns how many models were trained by this call.

    Each result is committed with the agent's replays in one transaction, so the
    loop can be killed anywhere: a model in flight is resumed with the RNG state
    it was sampled with, everything committed stays committed.
    """

    def commit(p: Proposal, result: TrainResult, model_id: int) -> None:
        metrics = result.metrics()
        if result.status == "oom":
            agent.skip(p.arch)
            store.record_result(agent, p, "oom", None, metrics, result.message)
            progress.event(f"#{model_id} out of memory, skipped: {p.arch}")
            return
        reward = result.best_accuracy if result.status == "done" else agent.failure_reward
        assert reward is not None
        agent.observe(p.arch, p.encoded, reward, p.epsilon)
        store.record_result(agent, p, result.status, reward, metrics, result.message or None)
        what = f"acc {reward:.4f}" if result.status == "done" else f"FAILED ({result.failure}: {result.message})"
        progress.event(
            f"#{model_id} eps {p.epsilon:g} {what} restarts {result.restarts} {result.wall_time:.1f}s {p.arch}"
        )

    trained_now = 0
    for row in store.running():  # a model that was in flight when the search stopped
        rng = store.rng_after(row.arch)
        if rng is not None:
            agent.set_rng_state(rng)
        p = Proposal(row.arch, parse_architecture(row.arch), row.epsilon, agent.encode(row.arch), None)
        progress.event(f"#{row.id} resuming {row.arch}")
        commit(p, train(p, row.id), row.id)
        trained_now += 1
    while not agent.done and (max_models is None or trained_now < max_models):
        p = agent.propose()
        if p.known_reward is not None:
            agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
            store.record_result(agent, p, "duplicate", p.known_reward)
            continue
        if p.arch in agent.skipped:
            agent.skip(p.arch)
            store.record_result(agent, p, "oom", None, None, "re-sampled a model that ran out of memory")
            continue
        model_id = store.begin_model(agent, p)
        progress.show(f"#{model_id} {p.arch}")
        commit(p, train(p, model_id), model_id)
        trained_now += 1
    return trained_now


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
