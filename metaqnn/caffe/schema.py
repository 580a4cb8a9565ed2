"""caffe_pb2 message classes from the *installed* Caffe, for any protobuf version.

An old generated caffe_pb2.py only imports with protobuf 3.20; instead we take
the serialized FileDescriptorProto out of it (without executing it), or out of
libcaffe's read-only data, or compile caffe.proto with ``protoc``, add it to a
private DescriptorPool and build classes with message_factory.  pycaffe, when
importable, is used as is.  Nothing of Caffe's schema is committed here.
"""

import ast
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from metaqnn.caffe.locate import (
    SCHEMA_ENV,
    SCHEMA_HINT,
    CaffeNotFoundError,
    find_caffe,
    root_candidates,
    schema_override,
)
from qagent.errors import MetaQNNError


class SchemaNotFoundError(MetaQNNError):
    pass


MESSAGES = ("NetParameter", "SolverParameter", "Datum", "LayerParameter", "BlobProto", "SolverState")


_PB2_LITERAL = re.compile(rb"""(?:serialized_pb\s*=\s*|AddSerializedFile\(\s*)(b'(?:[^'\\]|\\.)*')""", re.S)


def descriptor_from_pb2_source(path: Path) -> bytes:
    """The ``serialized_pb=`` / ``AddSerializedFile(...)`` bytes literal of a generated caffe_pb2.py.

    Only that literal is evaluated (``ast.literal_eval``): the module is never executed.
    """
    m = _PB2_LITERAL.search(path.read_bytes())
    if m is None:
        raise SchemaNotFoundError(f"{path} holds no serialized descriptor")
    value = ast.literal_eval(m.group(1).decode("latin-1"))
    if not isinstance(value, bytes):
        raise SchemaNotFoundError(f"{path}: the descriptor literal is not bytes")
    return value


_FILE_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14}


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def descriptor_from_binary(path: Path) -> bytes:
    """Find the embedded caffe.proto FileDescriptorProto in libcaffe and cut it at its natural end.

    protoc's C++ output stores the descriptor as one byte array; we walk its
    top-level fields (all length-delimited or varint) until a byte that cannot
    start a FileDescriptorProto field, which is where the array ends.
    """
    data = path.read_bytes()
    m = re.search(rb"\n([\x05-\x7f])((?:[\w/]*/)?caffe\.proto)\x12\x05caffe", data)
    if m is None:
        raise SchemaNotFoundError(f"{path} holds no caffe.proto descriptor")
    start = pos = m.start()
    while pos < len(data):
        try:
            tag, nxt = _read_varint(data, pos)
        except ValueError:
            break
        field, wire = tag >> 3, tag & 7
        if field not in _FILE_FIELDS:
            break
        if wire == 2:
            length, nxt = _read_varint(data, nxt)
            nxt += length
        elif wire == 0:
            _, nxt = _read_varint(data, nxt)
        else:
            break
        if nxt > len(data):
            break
        pos = nxt
    blob = data[start:pos]
    descriptor_pb2.FileDescriptorProto.FromString(blob)  # raises if we cut wrongly
    return blob


def descriptor_from_proto(path: Path) -> bytes:
    protoc = shutil.which("protoc")
    if protoc is None:
        raise SchemaNotFoundError(f"found {path} but no `protoc` on PATH to compile it")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "caffe.desc"
        subprocess.run(
            [protoc, f"-I{path.parent}", f"--descriptor_set_out={out}", path.name],
            check=True,
            capture_output=True,
            timeout=120,
        )
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0].SerializeToString()


def classes_from_descriptor(blob: bytes) -> SimpleNamespace:
    proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    ns = SimpleNamespace(DESCRIPTOR_BYTES=blob)
    for name in MESSAGES:
        desc = pool.FindMessageTypeByName(f"{proto.package}.{name}")
        if hasattr(message_factory, "GetMessageClass"):
            cls = message_factory.GetMessageClass(desc)
        else:  # protobuf 3.20
            cls = message_factory.MessageFactory(pool).GetPrototype(desc)
        setattr(ns, name, cls)
    return ns


def _pycaffe() -> Optional[Any]:
    try:
        from caffe.proto import caffe_pb2
    except Exception:
        return None
    return caffe_pb2


_CANDIDATE_ERRORS = (
    SchemaNotFoundError,
    OSError,
    subprocess.SubprocessError,
    SyntaxError,
    DecodeError,
    KeyError,
    TypeError,
    ValueError,
)


def schema_from_file(path: Path) -> SimpleNamespace:
    """The message classes out of one candidate: a caffe_pb2.py, a caffe.proto, or a binary (libcaffe)."""
    if path.suffix == ".py":
        blob = descriptor_from_pb2_source(path)
    elif path.suffix == ".proto":
        blob = descriptor_from_proto(path)
    else:
        blob = descriptor_from_binary(path)
    ns = classes_from_descriptor(blob)
    ns.source = str(path)
    return ns


def _named_schema(named: Path) -> SimpleNamespace:
    """CAFFE_SCHEMA: that file (or the candidates in that folder), and nothing else -- it is the user's word."""
    if not named.exists():
        raise SchemaNotFoundError(f"{SCHEMA_ENV}={named} does not exist; {SCHEMA_HINT}")
    files = root_candidates(named) if named.is_dir() else [named]
    if not files:
        raise SchemaNotFoundError(f"{SCHEMA_ENV}={named} is a folder with no caffe_pb2.py, caffe.proto or libcaffe.so")
    reasons = []
    for path in files:
        try:
            return schema_from_file(path)
        except _CANDIDATE_ERRORS as exc:
            reasons.append(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise SchemaNotFoundError(f"{SCHEMA_ENV}={named} holds no usable Caffe schema ({'; '.join(reasons)[:400]})")


@lru_cache(maxsize=1)
def load_schema() -> Any:
    """caffe_pb2-like namespace with NetParameter, SolverParameter, Datum, ... classes.

    ``CAFFE_SCHEMA`` (a caffe_pb2.py, caffe.proto or libcaffe.so, or a Caffe folder) wins; then
    pycaffe when importable; then the files around the Caffe that :func:`find_caffe` finds.
    """
    named = schema_override()
    if named is not None:
        return _named_schema(named)
    pb2 = _pycaffe()
    if pb2 is not None:
        return pb2
    searched: List[str] = ["pycaffe (import caffe.proto.caffe_pb2)"]
    try:
        caffe = find_caffe()
    except CaffeNotFoundError as exc:
        raise SchemaNotFoundError(f"Caffe schema not found: {exc}; or {SCHEMA_HINT}") from None
    for path in caffe.schema_candidates():
        searched.append(str(path))
        try:
            return schema_from_file(path)
        except _CANDIDATE_ERRORS:
            continue  # a damaged or foreign candidate: try the next one, do not stop the search
    roots = ", ".join(f"{r}/" for r in caffe.roots())
    raise SchemaNotFoundError(
        f"Caffe protobuf schema not found for {caffe.binary} ({caffe.origin}); searched: "
        + ", ".join(searched)
        + f" and the Caffe folders {roots}: {SCHEMA_HINT}"
    )
