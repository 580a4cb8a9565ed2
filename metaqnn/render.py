"""Render typed net/solver specs through the Jinja2 templates in prototxt_templates/.

Values are printed by type: enums bare (``MAX``, ``LMDB``, ``TRAIN``), strings
quoted, floats with ``repr`` (the shortest text that round-trips exactly, so a
learning rate of 1e-05 is never truncated by ``%f``), bools as true/false.
"""

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import jinja2

from metaqnn.netspec import NetSpec, param_block
from metaqnn.resources import asset_dir

TEMPLATES_DIR = asset_dir("prototxt_templates")
ENUM_FIELDS = {"pool", "backend", "phase", "solver_mode", "snapshot_format"}


def pb_value(value: Any, key: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value if key in ENUM_FIELDS else json.dumps(value)
    raise TypeError(f"cannot render {value!r} for field {key!r}")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pb"] = pb_value
    return env


class _LayerView:
    """What the template sees of a CaffeLayer: the fields plus its *_param block name."""

    def __init__(self, layer: Any) -> None:
        self._layer = layer
        self.block = param_block(layer.kind)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._layer, item)


def render_net(spec: NetSpec) -> str:
    return _env().get_template("net.prototxt.j2").render(layers=[_LayerView(layer) for layer in spec.layers])


def render_solver(fields: Sequence[Tuple[str, Any]]) -> str:
    return _env().get_template("solver.prototxt.j2").render(fields=list(fields))


def write_training_files(
    folder: Path,
    spec: Optional[NetSpec],
    solver: Sequence[Tuple[str, Any]],
    net_name: str = "net.prototxt",
    solver_name: str = "solver.prototxt",
) -> Path:
    """Render a net (unless ``spec`` is None: the net is there already) and its solver into ``folder``.

    Returns the solver's path.
    The one place that turns typed specs into the files ``caffe train`` reads: the trainer, the
    Caffe preflight, the fixtures and the tests all go through it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        write_net(folder / net_name, spec)
    path = folder / solver_name
    path.write_text(render_solver(solver))
    return path


def write_net(path: Path, spec: NetSpec) -> Path:
    Path(path).write_text(render_net(spec))
    return Path(path)
