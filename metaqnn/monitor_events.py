"""TensorBoard event files: the records :mod:`metaqnn.monitor` decides on, written and read back.

The edge of the monitor: protocol buffers from tensorboardX's bundled modules (an optional extra,
imported only here), one writer per run folder, and a reader that tells what a run already holds.

* Scalars are written as TensorBoard's own ``tf.summary.scalar`` writes them: a rank-0 float32
  tensor with the ``scalars`` plugin's metadata (TensorBoard's fast loader, its default, shows no
  float64 scalar: a value reads back as the float32 nearest to the CSV's).
* HParams records are the plugin's own (``_hparams_/experiment``, ``session_start_info``,
  ``session_end_info``), each with the plugin's null tensor, written directly rather than through
  ``SummaryWriter.add_hparams`` (which makes a sub-run per call and marks every session successful).
* Every writer opens a file of its own (``events.out.tfevents.<time>.<host>.<pid>.<n>``) and never
  appends to an existing one: after a kill -9 the old file may end in a torn record, which
  TensorBoard and :func:`read_run` both stop at, and the next writer's file follows it.
"""

import itertools
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

EXPERIMENT_TAG = "_hparams_/experiment"
SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"
EVENT_FILE_MARK = ".tfevents."
STATUSES = ("STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING")
_files = itertools.count()

HParamValue = Union[str, float, bool]


def tensorboardx() -> Optional[Any]:
    """The tensorboardX package, or None when the optional extra is not installed."""
    try:
        import tensorboardX
        from tensorboardX.proto import api_pb2, event_pb2, plugin_hparams_pb2, summary_pb2  # noqa: F401
    except ImportError:
        return None
    return tensorboardX


@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float
    wall_time: float = 0.0


@dataclass(frozen=True)
class HParamSpec:
    """One hyperparameter column of the HParams view."""

    name: str
    kind: str  # "string" | "number"
    description: str = ""
    values: Tuple[HParamValue, ...] = ()  # a discrete domain, when known


@dataclass(frozen=True)
class MetricSpec:
    tag: str
    description: str = ""


@dataclass(frozen=True)
class Session:
    """One model as one HParams session: its values, and how it ended (a STATUSES name)."""

    hparams: Mapping[str, HParamValue]
    status: str
    start_time: float = 0.0
    end_time: float = 0.0


@dataclass
class RunIndex:
    """What a run folder already holds: the last step of every scalar tag and the hparams records."""

    last_step: Dict[str, int] = field(default_factory=dict)
    tags: set = field(default_factory=set)  # every summary tag seen (hparams records included)
    files: int = 0
    torn: int = 0  # files that ended in a torn record (a writer killed mid-record)

    def has(self, tag: str) -> bool:
        return tag in self.tags


# --- building records ------------------------------------------------------------------------


def _pb() -> Any:
    from tensorboardX.proto import api_pb2, event_pb2, plugin_hparams_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

    return api_pb2, event_pb2, plugin_hparams_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2


def _scalar_value(tag: str, value: float, description: str = "") -> Any:
    _, _, _, summary_pb2, tensor_pb2, tensor_shape_pb2 = _pb()
    return summary_pb2.Summary.Value(
        tag=tag,
        tensor=tensor_pb2.TensorProto(
            dtype="DT_FLOAT", float_val=[float(value)], tensor_shape=tensor_shape_pb2.TensorShapeProto()
        ),
        metadata=summary_pb2.SummaryMetadata(
            summary_description=description,
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        ),
    )


def _hparams_value(tag: str, data: Any) -> Any:
    _, _, _, summary_pb2, tensor_pb2, tensor_shape_pb2 = _pb()
    null = tensor_pb2.TensorProto(
        dtype="DT_FLOAT",
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=0)]),
    )
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="hparams", content=data.SerializeToString())
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=null, metadata=metadata)


def scalar_events(points: Sequence[Scalar], descriptions: Mapping[str, str]) -> List[Any]:
    """One Event per step, holding every tag of ``points`` at that step, steps ascending."""
    _, event_pb2, _, summary_pb2, _, _ = _pb()
    events: List[Any] = []
    by_step: Dict[int, List[Scalar]] = {}
    for p in points:
        by_step.setdefault(p.step, []).append(p)
    for step, group in sorted(by_step.items()):  # in step order: a run's points never go back
        events.append(
            event_pb2.Event(
                wall_time=max(p.wall_time for p in group) or time.time(),
                step=step,
                summary=summary_pb2.Summary(
                    value=[_scalar_value(p.tag, p.value, descriptions.get(p.tag, "")) for p in group]
                ),
            )
        )
    return events


def experiment_event(name: str, description: str, hparams: Sequence[HParamSpec], metrics: Sequence[MetricSpec]) -> Any:
    """The HParams experiment record: the columns of the HParams view and of its parallel coordinates."""
    api_pb2, event_pb2, plugin_hparams_pb2, summary_pb2, _, _ = _pb()
    from google.protobuf import struct_pb2

    infos = []
    for h in hparams:
        info = api_pb2.HParamInfo(
            name=h.name,
            description=h.description,
            type=api_pb2.DATA_TYPE_STRING if h.kind == "string" else api_pb2.DATA_TYPE_FLOAT64,
        )
        if h.values:
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[_proto_value(v) for v in h.values]))
        infos.append(info)
    experiment = api_pb2.Experiment(
        name=name,
        description=description,
        time_created_secs=time.time(),
        hparam_infos=infos,
        metric_infos=[
            api_pb2.MetricInfo(
                name=api_pb2.MetricName(group="", tag=m.tag),
                description=m.description,
                dataset_type=api_pb2.DATASET_VALIDATION,
            )
            for m in metrics
        ],
    )
    data = plugin_hparams_pb2.HParamsPluginData(version=0, experiment=experiment)
    return event_pb2.Event(
        wall_time=time.time(), summary=summary_pb2.Summary(value=[_hparams_value(EXPERIMENT_TAG, data)])
    )


def _proto_value(v: HParamValue) -> Any:
    from google.protobuf import struct_pb2

    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, str):
        return struct_pb2.Value(string_value=v)
    return struct_pb2.Value(number_value=float(v))


def session_start_event(run: str, session: Session) -> Any:
    """The session's start record; its group is the run, so that each model is one session of its own."""
    _, event_pb2, plugin_hparams_pb2, summary_pb2, _, _ = _pb()
    info = plugin_hparams_pb2.SessionStartInfo(group_name=run, start_time_secs=session.start_time)
    for k, v in session.hparams.items():
        info.hparams[k].CopyFrom(_proto_value(v))
    data = plugin_hparams_pb2.HParamsPluginData(version=0, session_start_info=info)
    return event_pb2.Event(
        wall_time=session.start_time or time.time(),
        summary=summary_pb2.Summary(value=[_hparams_value(SESSION_START_TAG, data)]),
    )


def session_end_event(session: Session) -> Any:
    api_pb2, event_pb2, plugin_hparams_pb2, summary_pb2, _, _ = _pb()
    info = plugin_hparams_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(session.status), end_time_secs=session.end_time
    )
    data = plugin_hparams_pb2.HParamsPluginData(version=0, session_end_info=info)
    return event_pb2.Event(
        wall_time=session.end_time or time.time(),
        summary=summary_pb2.Summary(value=[_hparams_value(SESSION_END_TAG, data)]),
    )


# --- writing ---------------------------------------------------------------------------------


class RunWriter:
    """The events of one run folder, in a file of this writer's own, opened at the first write.

    Records reach the file when :meth:`flush` (or :meth:`close`) is called; both fsync it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._writer: Any = None
        self.pending = 0  # records written since the last flush

    def write(self, events: Sequence[Any]) -> None:
        if not events:
            return
        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            suffix = f".{os.getpid()}.{next(_files)}"
            self._writer = EventsWriter(str(self.folder / "events"), suffix)
        for event in events:
            self._writer.write_event(event)
        self.pending += len(events)

    def flush(self) -> None:
        if self._writer is not None and self.pending:
            self._writer.flush()
            self.pending = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.pending = 0


# --- reading ---------------------------------------------------------------------------------


def event_files(folder: Path) -> List[Path]:
    """A run folder's event files, in the order TensorBoard reads them (by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if EVENT_FILE_MARK in p.name and p.is_file())


def records(path: Path) -> Tuple[List[bytes], bool]:
    """The complete records of a TFRecord file, and whether it ended in a torn one (which is left out).

    A record is [length u64][masked crc32c of length][data][masked crc32c of data]; a file cut
    anywhere in its last record (a writer killed by a signal) reads as the records before it."""
    from tensorboardX.record_writer import masked_crc32c

    data = path.read_bytes()
    out: List[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            return out, True
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            return out, True
        end = pos + 12 + length + 4
        if end > len(data):
            return out, True
        out.append(data[pos + 12 : pos + 12 + length])
        pos = end
    return out, False


def read_events(folder: Path) -> Iterator[Any]:
    """Every complete Event of a run folder, file by file."""
    _, event_pb2, _, _, _, _ = _pb()
    for path in event_files(folder):
        for raw in records(path)[0]:
            try:
                yield event_pb2.Event.FromString(raw)
            except Exception:  # a record that does not parse: the rest of the file cannot be trusted
                break


def read_run(folder: Path) -> RunIndex:
    """What a run folder holds, tolerating a torn last record in any of its files."""
    _, event_pb2, _, _, _, _ = _pb()
    index = RunIndex()
    for path in event_files(folder):
        raws, torn = records(path)
        index.files += 1
        index.torn += torn
        for raw in raws:
            try:
                event = event_pb2.Event.FromString(raw)
            except Exception:
                index.torn += 1
                break
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                index.tags.add(value.tag)
                if value.tag.startswith("_hparams_/"):
                    continue
                last = index.last_step.get(value.tag)
                if last is None or event.step > last:
                    index.last_step[value.tag] = event.step
    return index
