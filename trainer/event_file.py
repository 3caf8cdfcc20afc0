"""Scalars into a TensorBoard event file, written with tensorboard's protos and the TFRecord framing only.

torch.utils.tensorboard imports tensorboard's whole summary API and its TensorFlow stub (~0.7 s of CPU, more than a
debug model's first step) to write what is, for scalars, a few bytes per value. An event file is a sequence of
records: the payload's length (uint64, little-endian), a masked CRC-32C of those 8 bytes, the payload (a serialized
`Event` proto), a masked CRC-32C of the payload. The first event names the file version; each scalar is one event
with a `simple_value`, as `SummaryWriter.add_scalar` writes it.
"""

import itertools
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # the Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()
_FILES = itertools.count()  # several writers of one process in one folder within a second get distinct files


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; records are tens of bytes, so a table in Python is fast enough."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class ScalarEventWriter:
    """Writes scalars to a new event file in `log_dir`, flushed after every `add_scalars`."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILES)}"
        self.path = log_dir / name
        self._file = open(self.path, "wb")
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._file.flush()

    def _write(self, event: Event) -> None:
        data = event.SerializeToString()
        length = struct.pack("<Q", len(data))
        self._file.write(length + struct.pack("<I", masked_crc32c(length)) + data
                         + struct.pack("<I", masked_crc32c(data)))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """One event per tag at `step`, stamped now."""
        now = time.time()
        for tag, value in scalars.items():
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
            self._write(Event(wall_time=now, step=step, summary=summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
