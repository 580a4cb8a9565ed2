"""Architecture -> typed list of Caffe layers, the way the authors' files lay them out.

Rendering is split in two so templates stay dumb: this module decides every
name, blob, padding and dropout ratio; ``prototxt_templates/net.prototxt.j2``
only loops over the resulting list.  Conventions read off the published files
(see docs/deviations.md):

* names count per type: Convolution1.., ReLU1.., Dropout1.., Pooling1..,
  InnerProduct1.., Accuracy1, SoftmaxWithLoss1; ReLUs are in place;
* dropout goes after a layer's ReLU.  "authors" is the rule of the authors'
  code (metaqnn/dropout.py: every second layer and every FC, ratio k/(2*count)
  with their own count); "paper" is Section 5's reading (every second layer,
  conv, pool and FC all counting, i/(2n) for the i-th of n); "mnist_published"
  is the authors' placement with the ratios of the published MNIST nets,
  0.5 - 0.1*floor((n-i)/2);
* GAP = Convolution 1x1 (num_classes, no pad/stride lines) + ReLU + AVE pooling
  over the whole remaining map, then the InnerProduct(num_classes) classifier.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from metaqnn.dropout import authors_dropout
from qagent.arch import FC, GAP, Conv, Layer, Pool, Softmax
from qagent.errors import ConfigError
from qagent.space import conv_output, pool_output

DROPOUT_RULES = ("authors", "paper", "mnist_published", "none")


@dataclass(frozen=True)
class Transform:
    mirror: bool = False
    crop_size: int = 0
    scale: float = 0.0
    mean_file: str = ""


@dataclass(frozen=True)
class CaffeLayer:
    """One layer block; ``params`` is an ordered tuple of (field, value) pairs inside its *_param block.

    A value that is itself a tuple of (field, value) pairs is a nested message: the deploy net's
    Input layer (metaqnn/latency.py) writes ``("shape", (("dim", 1), ("dim", 3), ...))`` for
    ``input_param { shape { dim: 1 dim: 3 ... } }``, which flat pairs cannot say.
    """

    kind: str  # data | input | conv | relu | dropout | pool | ip | accuracy | loss
    name: str
    type: str
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]
    params: Tuple[Tuple[str, object], ...] = ()
    phase: str = ""
    transform: Tuple[Tuple[str, object], ...] = ()
    filler: bool = False
    # One ``param { lr_mult: x }`` block per learnable blob; empty = Caffe's default 1 (no line),
    # as in every search net.  Only a transfer's re-initialised layers set it (metaqnn/transfer.py).
    lr_mults: Tuple[float, ...] = ()


@dataclass(frozen=True)
class ParamShapes:
    """The shapes of a learnable layer's blobs (weights, bias) and which of their dimensions the
    data decides rather than the architecture: ``free`` holds (blob, dim, what) triples, e.g.
    (0, 1, "input channels") for the first convolution.  Weights trained on other data may
    differ from this net's only there (metaqnn/transfer.py)."""

    shapes: Tuple[Tuple[int, ...], ...]
    free: Tuple[Tuple[int, int, str], ...] = ()


@dataclass
class NetSpec:
    layers: List[CaffeLayer] = field(default_factory=list)
    # Learnable parameters of the classifier net (weights + biases).
    param_count: int = 0
    # Layer name -> its blob shapes, in net order.
    params: Dict[str, ParamShapes] = field(default_factory=dict)


def dropout_ratios(n: int, rule: str) -> List[float]:
    if rule == "paper":
        return [i / (2 * n) for i in range(1, n + 1)]
    if rule == "mnist_published":
        return [max(0.0, round(0.5 - 0.1 * ((n - i) // 2), 10)) for i in range(1, n + 1)]
    if rule == "none":
        return []
    raise ConfigError(f"render.dropout must be one of {', '.join(DROPOUT_RULES)}, got {rule!r}")


def dropout_positions(layers: Sequence[Layer], rule: str) -> List[int]:
    """Indices (into the hidden layers) after which a dropout layer goes ("paper": every second one)."""
    if rule == "none":
        return []
    return [i for i in range(len(layers)) if (i + 1) % 2 == 0]


def dropout_plan(layers: Sequence[Layer], hidden: Sequence[Layer], rule: str) -> Dict[int, float]:
    """Hidden-layer index -> ratio of the dropout after it, under one of DROPOUT_RULES."""
    if rule == "authors":
        return authors_dropout(layers)
    if rule == "mnist_published":  # the authors' placement, the published MNIST ratios
        positions = sorted(authors_dropout(layers))
    else:
        positions = dropout_positions(hidden, rule)
    return dict(zip(positions, dropout_ratios(len(positions), rule)))


def _transform_fields(t: Transform, train: bool) -> Tuple[Tuple[str, object], ...]:
    fields: List[Tuple[str, object]] = []
    if t.scale:
        fields.append(("scale", float(t.scale)))
    if train:
        fields.append(("mirror", bool(t.mirror)))
    if t.crop_size and train:  # TEST reads unpadded images at the input size, as the authors' nets do
        fields.append(("crop_size", int(t.crop_size)))
    if t.mean_file:
        fields.append(("mean_file", t.mean_file))
    return tuple(fields)


def _data_layer(phase: str, source: str, batch: int, transform: Tuple[Tuple[str, object], ...]) -> CaffeLayer:
    params = (("source", source), ("batch_size", batch), ("backend", "LMDB"))
    return CaffeLayer("data", "data", "Data", (), ("data", "label"), params, phase=phase, transform=transform)


class _NetBuilder:
    """Appends layers the way the authors' files lay them out, tracking the blob's shape and the parameter count.

    Each method is one step of a MetaQNN net: a named layer (names count per type), its in-place
    ReLU where the published nets have one, and the size/depth arithmetic that the next layer needs.
    """

    def __init__(self, image_size: int, channels: int) -> None:
        self.spec = NetSpec()
        self.counts: Dict[str, int] = {}
        self.blob = "data"
        self.size, self.depth, self.flat = image_size, channels, False  # depth = channels of the current blob
        self.depth_is_data = True  # the depth is still the data's channel count (nothing but pooling yet)
        self.depth_is_classes = False  # after the GAP block: one channel per class

    def _name(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}{self.counts[kind]}"

    def _add(self, layer: CaffeLayer) -> None:
        self.spec.layers.append(layer)

    def data(self, phase: str, source: str, batch: int, transform: Tuple[Tuple[str, object], ...]) -> None:
        self._add(_data_layer(phase, source, batch, transform))

    def _relu_on(self, top: str) -> None:
        self._add(CaffeLayer("relu", self._name("ReLU"), "ReLU", (top,), (top,)))

    def _conv_relu(self, fields: Tuple[Tuple[str, object], ...], filters: int, kernel: int, classes: bool) -> None:
        top = self._name("Convolution")
        free = [(0, 1, "input channels")] if self.depth_is_data else []
        if classes:  # the GAP block's 1x1 convolution has one filter per class
            free += [(0, 0, "classes"), (1, 0, "classes")]
        shapes = ((filters, self.depth, kernel, kernel), (filters,))
        self.spec.params[top] = ParamShapes(shapes, tuple(free))
        self._add(CaffeLayer("conv", top, "Convolution", (self.blob,), (top,), fields, filler=True))
        self._relu_on(top)
        self.blob, self.depth_is_data = top, False

    def conv(self, layer: Conv) -> None:
        fields = (("num_output", layer.filters), ("pad", layer.size // 2), ("kernel_size", layer.size))
        self._conv_relu((*fields, ("stride", layer.stride)), layer.filters, layer.size, classes=False)
        self.spec.param_count += layer.filters * (self.depth * layer.size * layer.size + 1)
        self.size, self.depth = conv_output(self.size, layer.size, layer.stride), layer.filters

    def pool(self, layer: Pool) -> None:
        top = self._name("Pooling")
        fields = (("pool", "MAX"), ("kernel_size", layer.size), ("stride", layer.stride))
        self._add(CaffeLayer("pool", top, "Pooling", (self.blob,), (top,), params=fields))
        self.size, self.blob = pool_output(self.size, layer.size, layer.stride), top

    def _inner_product(self, units: int, classes: bool = False) -> str:
        top = self._name("InnerProduct")
        self._add(
            CaffeLayer("ip", top, "InnerProduct", (self.blob,), (top,), filler=True, params=(("num_output", units),))
        )
        fan_in = self.depth if self.flat else self.depth * self.size * self.size
        # A flattened map's size is the data's; after the GAP block it is the class count.
        free = [] if self.flat else [(0, 1, "classes" if self.depth_is_classes else "input size")]
        if classes:
            free += [(0, 0, "classes"), (1, 0, "classes")]
        self.spec.params[top] = ParamShapes(((units, fan_in), (units,)), tuple(free))
        self.spec.param_count += units * (fan_in + 1)
        self.size, self.depth, self.flat, self.blob = 1, units, True, top
        self.depth_is_data = False
        return top

    def fc(self, layer: FC) -> None:
        self._relu_on(self._inner_product(layer.units))

    def dropout(self, ratio: float) -> None:
        top = self._name("Dropout")
        self._add(CaffeLayer("dropout", top, "Dropout", (self.blob,), (top,), params=(("dropout_ratio", ratio),)))
        self.blob = top

    def gap(self, num_classes: int) -> None:
        """As the published nets: 1x1 conv to the classes (no pad/stride lines), ReLU, AVE pool over the map."""
        self._conv_relu((("num_output", num_classes), ("kernel_size", 1)), num_classes, 1, classes=True)
        self.spec.param_count += num_classes * (self.depth + 1)
        self.depth, self.depth_is_classes = num_classes, True
        top = self._name("Pooling")
        fields = (("pool", "AVE"), ("kernel_size", self.size))
        self._add(CaffeLayer("pool", top, "Pooling", (self.blob,), (top,), params=fields))
        self.size, self.blob = 1, top

    def classifier(self, num_classes: int) -> None:
        """The final InnerProduct (no ReLU), then Accuracy and SoftmaxWithLoss on it."""
        top = self._inner_product(num_classes, classes=True)
        self._add(CaffeLayer("accuracy", "Accuracy1", "Accuracy", (top, "label"), ("Accuracy1",)))
        self._add(CaffeLayer("loss", "SoftmaxWithLoss1", "SoftmaxWithLoss", (top, "label"), ("SoftmaxWithLoss1",)))


def build_net(
    layers: Sequence[Layer],
    *,
    image_size: int,
    channels: int,
    num_classes: int,
    train_source: str,
    test_source: str,
    transform: Transform = Transform(),
    dropout: str = "paper",
    train_batch: int = 128,
    test_batch: int = 100,
) -> NetSpec:
    if not layers or not isinstance(layers[-1], Softmax):
        raise ConfigError("an architecture must end with SM(n)")
    if layers[-1].classes != num_classes:
        raise ConfigError(f"architecture ends with {layers[-1]} but the dataset has {num_classes} classes")
    hidden = [layer for layer in layers if isinstance(layer, (Conv, Pool, FC))]
    ratios = dropout_plan(layers, hidden, dropout)
    net = _NetBuilder(image_size, channels)
    net.data("TRAIN", train_source, train_batch, _transform_fields(transform, True))
    net.data("TEST", test_source, test_batch, _transform_fields(transform, False))
    for i, layer in enumerate(hidden):
        if isinstance(layer, Conv):
            net.conv(layer)
        elif isinstance(layer, Pool):
            net.pool(layer)
        else:
            net.fc(layer)
        if i in ratios:
            net.dropout(ratios[i])
    if any(isinstance(layer, GAP) for layer in layers):
        net.gap(num_classes)
    net.classifier(num_classes)
    return net.spec


def param_block(kind: str) -> Optional[str]:
    return {
        "data": "data_param",
        "input": "input_param",
        "conv": "convolution_param",
        "pool": "pooling_param",
        "ip": "inner_product_param",
        "dropout": "dropout_param",
    }.get(kind)
