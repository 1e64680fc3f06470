"""Training curves as TensorBoard event files (the format every training stack reads), beside the
JSON history and the PNG plots. Written with tensorboardX: pure Python on numpy and protobuf, no
TensorFlow or tensorboard server needed to write.

A resumed run repeats the steps after its checkpoint with the same schedule, so the writer opens
at its first value and purges the events from that step on: a curve never holds a step twice.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path
from typing import Mapping

TENSORBOARD_DIR = "tensorboard"


class ScalarWriter:
    """``log({"loss": 2.3, "tau": 3.9}, step, prefix="train")`` -> scalars ``train/loss``, ``train/tau``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._writer = None

    def __call__(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        self.log(values, step, prefix)

    def log(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=step or None, flush_secs=30)
        for key, value in values.items():
            if key not in ("step",) and isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``: {tag: [(step, value), ...]} in file order.

    Reads the TFRecord framing (length, its CRC, the record, its CRC; the CRCs are not checked) and the
    Event protos directly, so that tests and tools need no tensorboard install. Purged steps of a
    resumed run are still listed (TensorBoard hides them)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars)
