"""A small net on the digits LMDBs (8x8, 1 channel, 10 classes, pixels scaled to [0, 1)), as several tests train one."""

from pathlib import Path

from metaqnn.netspec import NetSpec, Transform, build_net
from qagent.arch import parse_architecture


def digits_net(data: Path, arch: str, train_batch: int = 32) -> NetSpec:
    return build_net(
        parse_architecture(arch),
        image_size=8,
        channels=1,
        num_classes=10,
        train_source=str(data / "train.lmdb"),
        test_source=str(data / "val.lmdb"),
        transform=Transform(scale=1 / 256),
        train_batch=train_batch,
    )
