"""Semantic comparison of Caffe net/solver files, and recovery of MetaQNN architectures.

Files are parsed with the installed Caffe's schema, so formatting, field order,
``0.025000`` vs ``0.025`` and float32 rounding never count as differences; what
is reported is every differing layer field or solver field, in order.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from google.protobuf import json_format, text_format

from metaqnn.caffe.schema import load_schema
from qagent.arch import FC, GAP, Conv, Layer, Pool, Softmax, format_architecture
from qagent.errors import MetaQNNError

if TYPE_CHECKING:
    from metaqnn.config import Config

# Layers a MetaQNN net is made of besides C/P/FC/GAP/SM; anything else is not one of its nets.
_PASSIVE_LAYERS = {"Data", "Input", "ReLU", "Dropout", "Accuracy", "SoftmaxWithLoss", "Softmax"}

PATH_FIELDS_NET = {("data_param", "source"), ("transform_param", "mean_file"), ("image_data_param", "source")}
PATH_FIELDS_SOLVER = {"net", "train_net", "test_net"}


class CompareError(MetaQNNError):
    pass


def load_caffe_file(path: Path) -> Tuple[str, Any]:
    """('net' | 'solver', message) -- a file that is neither is an error naming the parser's complaint."""
    pb = load_schema()
    path = Path(path)
    if path.is_dir():
        raise CompareError(f"{path} is a directory, not a prototxt")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO (reading it would wait forever), a socket
        raise CompareError(f"{path} is not a regular file (a device, FIFO or socket), not a prototxt")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompareError(f"{path} is not a text prototxt (it holds binary data)") from None
    except IsADirectoryError:
        raise CompareError(f"{path} is a directory, not a prototxt") from None
    except OSError as exc:
        raise CompareError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise CompareError(f"{path} is empty, neither a Caffe net nor a solver")
    errors = []
    for kind, cls in (("net", pb.NetParameter), ("solver", pb.SolverParameter)):
        msg = cls()
        try:
            text_format.Parse(text, msg)
        except text_format.ParseError as exc:
            errors.append(f"as {kind}: {exc}")
            continue
        if kind == "net" and not msg.layer:
            errors.append("as net: no layers")
            continue
        if kind == "solver" and not msg.ListFields():  # only comments: parses, but as nothing
            errors.append("as solver: no fields set")
            continue
        return kind, msg
    raise CompareError(f"{path} is neither a Caffe net nor a solver ({'; '.join(errors)})")


def _as_dict(msg: Any) -> Dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _diff(a: Any, b: Any, where: str, out: List[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            _diff(a.get(key), b.get(key), f"{where}.{key}" if where else key, out)
    elif a != b:
        out.append(f"  {where}: {a!r} != {b!r}")


def _layer_summary(layer: Dict[str, Any]) -> str:
    return f"{layer.get('name', '?')} ({layer.get('type', '?')})"


def _strip_paths(layer: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(layer)
    for block, field in PATH_FIELDS_NET:
        if block in out and field in out[block]:
            out[block] = {k: v for k, v in out[block].items() if k != field}
    return out


def diff_messages(kind: str, a: Any, b: Any, ignore_paths: bool) -> List[str]:
    lines: List[str] = []
    if kind == "solver":
        da, db = _as_dict(a), _as_dict(b)
        if ignore_paths:
            for f in PATH_FIELDS_SOLVER:
                da.pop(f, None)
                db.pop(f, None)
        _diff(da, db, "", lines)
        return lines
    la = [_as_dict(x) for x in a.layer]
    lb = [_as_dict(x) for x in b.layer]
    if ignore_paths:
        la, lb = [_strip_paths(x) for x in la], [_strip_paths(x) for x in lb]
    if len(la) != len(lb):
        lines.append(f"  layer count: {len(la)} != {len(lb)}")
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else {}
        y = lb[i] if i < len(lb) else {}
        sub: List[str] = []
        _diff(x, y, "", sub)
        if sub:
            lines.append(f" layer {i + 1}: {_layer_summary(x)} vs {_layer_summary(y)}")
            lines.extend("  " + s for s in sub)
    return lines


def compare_files(a: Path, b: Path, ignore_paths: bool = False) -> Tuple[bool, str]:
    kind_a, msg_a = load_caffe_file(a)
    kind_b, msg_b = load_caffe_file(b)
    if kind_a != kind_b:
        return False, f"{a} is a {kind_a} file, {b} is a {kind_b} file"
    lines = diff_messages(kind_a, msg_a, msg_b, ignore_paths)
    head = f"{kind_a}s {a} and {b}"
    if not lines:
        return True, f"equal: {head}" + (" (paths ignored)" if ignore_paths else "")
    return False, f"different: {head}\n" + "\n".join(lines)


def architecture_from_net(net: Any) -> Tuple[Layer, ...]:
    """C/P/FC/GAP/SM sequence of a MetaQNN-style net (ReLU, Dropout, data, loss layers skipped)."""
    layers = list(net.layer)
    out: List[Layer] = []
    ips = [i for i, x in enumerate(layers) if x.type == "InnerProduct"]
    if not ips:
        raise CompareError("not a MetaQNN-style net: no InnerProduct classifier")
    last_ip = ips[-1]
    i = 0
    while i < len(layers):
        x = layers[i]
        if x.type == "Convolution":
            p = x.convolution_param
            k = p.kernel_size[0] if p.kernel_size else p.kernel_h
            s = p.stride[0] if p.stride else 1
            nxt = [y for y in layers[i + 1 :] if y.type not in ("ReLU", "Dropout")]
            if nxt and nxt[0].type == "Pooling" and nxt[0].pooling_param.pool == 1:  # AVE: the GAP block
                out.append(GAP())
                i = layers.index(nxt[0]) + 1
                continue
            out.append(Conv(int(p.num_output), int(k), int(s)))
        elif x.type == "Pooling":
            p = x.pooling_param
            if p.pool != 0:
                raise CompareError(f"layer {x.name}: only MAX pooling appears outside a GAP block")
            out.append(Pool(int(p.kernel_size), int(p.stride)))
        elif x.type == "InnerProduct":
            n = int(x.inner_product_param.num_output)
            out.append(Softmax(n) if i == last_ip else FC(n))
        elif x.type not in _PASSIVE_LAYERS:
            raise CompareError(
                f"layer {x.name!r} has type {x.type!r}, which no MetaQNN net contains "
                "(only Convolution, Pooling, InnerProduct, ReLU, Dropout, data and loss layers)"
            )
        i += 1
    return tuple(out)


def architecture_of_net(path: Path) -> str:
    kind, msg = load_caffe_file(path)
    if kind != "net":
        raise CompareError(f"{path} is a solver; give a net prototxt")
    return format_architecture(architecture_from_net(msg))


def regenerate_check(path: Path, config: "Config", overrides: Sequence[str] = ()) -> Tuple[bool, str]:
    """Recover the architecture (net) or take the protocol (solver), render with the preset, compare."""
    from metaqnn.export import finetune_solver_text, net_text

    kind, original = load_caffe_file(path)
    pb = load_schema()
    protocol_overrides = parse_protocol_overrides(overrides)
    if kind == "net":
        arch = architecture_from_net(original)
        text = net_text(config, arch, finetune=True)
        regenerated = pb.NetParameter()
        head = f"architecture {format_architecture(arch)}\n"
    else:
        text = finetune_solver_text(config, net=original.net, protocol_overrides=protocol_overrides)
        regenerated = pb.SolverParameter()
        head = ""
    text_format.Parse(text, regenerated)
    lines = diff_messages(kind, regenerated, original, ignore_paths=True)
    if not lines:
        return True, head + f"equal: {path} regenerated from the {config.name} preset (paths ignored)"
    return False, head + f"different: regenerated (left) vs {path} (right)\n" + "\n".join(lines)


def parse_protocol_overrides(items: Sequence[str]) -> Dict[str, Any]:
    from metaqnn.config import parse_override

    out: Dict[str, Any] = {}
    for item in items:
        _, key, value = parse_override(f"protocol.{item}")
        out[key] = value
    return out
