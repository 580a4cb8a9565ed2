"""Which layers of a net trained on one dataset carry over to the same architecture on another.

Caffe copies weights by layer name (``caffe train --weights``) and aborts when a same-named
layer's blobs differ in shape ("Cannot copy param ... shape mismatch").  The plan is made
before anything runs, from the blob shapes alone, so that abort is never reached:

* a layer whose blobs have this net's shapes is **copied**;
* a layer whose blobs differ only in dimensions the *data* decides -- the classes of the
  classifier and of the GAP block's 1x1 convolution, the input size of an InnerProduct fed by
  a flattened map, the input channels of the first convolution -- is **re-initialised**
  (renamed, Caffe's flickr_style convention, so that ``--weights`` skips it);
* any other difference, a missing or an extra learnable layer means the weights are not this
  architecture's: an error, never a partial copy.

The dimensions the data decides are recorded by the renderer (:class:`metaqnn.netspec.ParamShapes`).
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

from metaqnn.caffe.schema import load_schema
from metaqnn.netspec import NetSpec
from qagent.errors import MetaQNNError

# What a re-initialised layer is renamed to: ``<name><REINIT_SUFFIX>`` (flickr_style: fc8 -> fc8_flickr).
REINIT_SUFFIX = "_reinit"

Shape = Tuple[int, ...]


class WeightsMismatchError(MetaQNNError):
    """The weights were not trained for this architecture."""


@dataclass(frozen=True)
class Reinit:
    """A layer trained afresh on the target, and why (e.g. "classes 10 -> 5")."""

    layer: str
    reason: str

    @property
    def renamed(self) -> str:
        return self.layer + REINIT_SUFFIX


@dataclass(frozen=True)
class WeightPlan:
    copied: Tuple[str, ...]
    reinitialised: Tuple[Reinit, ...]

    def describe(self) -> List[str]:
        lines = [f"re-initialised {r.layer} ({r.reason}), renamed {r.renamed}" for r in self.reinitialised]
        return [*lines, f"copied from the source weights: {', '.join(self.copied) or 'nothing'}"]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def plan_weights(spec: NetSpec, source: Mapping[str, Sequence[Shape]]) -> WeightPlan:
    """The copy/re-initialise decision for every learnable layer of ``spec``.

    ``source``: layer name -> blob shapes of the weights (:func:`caffemodel_shapes`).
    """
    extra = sorted(set(source) - set(spec.params))
    if extra:
        raise WeightsMismatchError(
            f"the weights hold layer {extra[0]}, which this architecture does not have: "
            "the weights belong to another architecture"
        )
    copied: List[str] = []
    reinit: List[Reinit] = []
    for name, info in spec.params.items():
        if name not in source:
            raise WeightsMismatchError(f"the weights have no layer {name}: the weights belong to another architecture")
        shapes = [tuple(s) for s in source[name]]
        if len(shapes) != len(info.shapes):
            raise WeightsMismatchError(
                f"layer {name} has {len(shapes)} blobs in the weights, {len(info.shapes)} in the architecture: "
                "the weights belong to another architecture"
            )
        free = {(b, d): what for b, d, what in info.free}
        reasons: Dict[str, str] = {}
        for b, (got, want) in enumerate(zip(shapes, info.shapes)):
            if len(got) != len(want) or any(g != w and (b, d) not in free for d, (g, w) in enumerate(zip(got, want))):
                raise WeightsMismatchError(
                    f"layer {name} blob {b} is {_dims(got)} in the weights but {_dims(want)} in the architecture: "
                    "the weights belong to another architecture"
                )
            for d, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    reasons.setdefault(free[(b, d)], f"{free[(b, d)]} {g} -> {w}")
        if reasons:
            reinit.append(Reinit(name, ", ".join(reasons.values())))
        else:
            copied.append(name)
    return WeightPlan(tuple(copied), tuple(reinit))


# (image size, channels, classes): the data a net was rendered for.
InputShape = Tuple[int, int, int]
LARGEST_IMAGE = 1024  # input sizes tried when the weights' own data is unknown


def _shapes_of(spec: NetSpec) -> Dict[str, List[Shape]]:
    return {name: [tuple(s) for s in info.shapes] for name, info in spec.params.items()}


def fit_source(
    build: Callable[[InputShape], NetSpec], source: Mapping[str, Sequence[Shape]], prefer: Iterable[InputShape]
) -> Tuple[NetSpec, InputShape]:
    """The architecture as rendered for the data the weights were trained on, and that data's shape.

    Blob shapes say which architecture weights belong to only together with the input they were
    trained on (an FC layer's fan-in is depth x map size squared), so the weights must be exactly
    the architecture's on *some* input: ``prefer`` first (the source's known data, the target's),
    then every square size up to :data:`LARGEST_IMAGE` with the channels the weights show.
    Nothing fits: the weights are another architecture's.
    """
    source = {name: [tuple(s) for s in shapes] for name, shapes in source.items()}
    if not source:
        raise WeightsMismatchError("the weights hold no learned layer (an empty or foreign caffemodel)")
    probe = build(next(iter(prefer), (LARGEST_IMAGE, 1, 2)))
    layer_names = list(probe.params)
    last = source.get(layer_names[-1], [()])[0] if layer_names else ()
    first = source.get(layer_names[0], [()])[0] if layer_names else ()
    classes = [last[0]] if len(last) >= 1 else []
    channels = sorted({first[1]} if len(first) == 4 else {1, 3})
    tried = list(prefer) + [(n, c, k) for n in range(1, LARGEST_IMAGE + 1) for c in channels for k in classes]
    for shape in dict.fromkeys(tried):
        spec = build(shape)
        if _shapes_of(spec) == source:
            return spec, shape
    plan_weights(probe, source)  # the first difference, named
    raise WeightsMismatchError(
        f"the weights fit this architecture on no input up to {LARGEST_IMAGE}x{LARGEST_IMAGE}: "
        "the weights belong to another architecture"
    )


def renamed_spec(spec: NetSpec, plan: WeightPlan, lr_mult: float) -> NetSpec:
    """The net with each re-initialised layer renamed (its blobs keep their names) and learning
    at ``lr_mult`` times the base rate, weights and bias alike."""
    names = {r.layer: r.renamed for r in plan.reinitialised}
    layers = [
        replace(layer, name=names[layer.name], lr_mults=(lr_mult, lr_mult)) if layer.name in names else layer
        for layer in spec.layers
    ]
    return NetSpec(layers=layers, param_count=spec.param_count, params=dict(spec.params))


def caffemodel_shapes(path: Path) -> Dict[str, List[Shape]]:
    """Layer name -> blob shapes of a .caffemodel (the data is parsed, but only shapes are kept)."""
    from metaqnn.weights import read_caffemodel

    return {name: [a.shape for a in arrays] for name, arrays in read_caffemodel(path).items()}


def write_canonical_names(src: Path, dst: Path) -> None:
    """Copy a caffemodel with every ``<name>_reinit`` layer named ``<name>`` again, so that the
    weights of a transfer are those of the plain architecture and can be a source themselves."""
    net = load_schema().NetParameter()
    net.ParseFromString(Path(src).read_bytes())
    for layer in net.layer:
        if layer.name.endswith(REINIT_SUFFIX):
            layer.name = layer.name[: -len(REINIT_SUFFIX)]
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(net.SerializeToString())
    tmp.replace(dst)
