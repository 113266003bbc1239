"""TensorBoard event files of scalars, written without TensorFlow, the tensorboard package or protobuf.

    w = EventWriter(workdir)                    # a new events.out.tfevents.* file per run start
    w.scalars(step, {"loss": 0.1, "lr": 1e-4})
    w.close()

The format: a file of TFRecords, each an 8-byte little-endian length, the masked CRC-32C of those 8 bytes, the data
and the masked CRC-32C of the data (mask: rotate right by 15, add 0xa282ead8). Each record's data is a serialized
`tensorflow.Event`: wall_time (field 1, double), step (2, int64), then one of file_version (3, string: the first
event of a file is "brain.Event:2"), summary (5: `Summary{value (1): {tag (1), simple_value (2, float)}}`) or
session_log (6: `SessionLog{status (1): START = 1}`).

Resume: a writer given `resume_step` writes a SessionLog START at resume_step + 1 after the file version, which is
how TensorBoard learns that a run restarted there: it drops the values an earlier run logged at that step and later
(the steps a killed run logged past its last checkpoint, which the new run logs again). Earlier files are never
touched.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

__all__ = ["EventWriter", "crc32c", "masked_crc32c", "record", "scalar_event"]


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, bit-reflected
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; crc32c(b"123456789") == 0xE3069283."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# Protocol buffer wire format: a key is (field << 3 | wire type); 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are their two's complement, ten bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _field_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """An Event in protobuf's own encoding: fields in number order, proto3 zero scalars left out."""
    head = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) if wall_time else b""
    return head + (_field_varint(2, step) if step else b"") + body


def scalar_event(step: int, values: dict, wall_time: float | None = None) -> bytes:
    """A serialized Event with one Summary holding a simple_value per (tag, value)."""
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, str(tag).encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
        for tag, v in values.items())
    return _event(time.time() if wall_time is None else wall_time, int(step), _field_bytes(5, summary))


_SERIAL = itertools.count()


class EventWriter:
    """Appends scalar events to a new event file in `logdir` (module docstring), flushed after every write.

    The file name follows TensorBoard's convention, events.out.tfevents.<seconds>.<host>.<pid>.<n>, so the files of
    successive runs sort in the order they started."""

    def __init__(self, logdir, resume_step: int | None = None):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{next(_SERIAL)}"
        self.path = logdir / name
        self._file = open(self.path, "xb")  # never another run's file
        self._write(_event(now, 0, _field_bytes(3, b"brain.Event:2")))
        if resume_step is not None:
            self._write(_event(now, int(resume_step) + 1, _field_bytes(6, _field_varint(1, 1))))

    def _write(self, event: bytes) -> None:
        self._file.write(record(event))
        self._file.flush()

    def scalars(self, step: int, values: dict, wall_time: float | None = None) -> None:
        """One event at `step` with a scalar per tag; non-numbers are refused by float()."""
        self._write(scalar_event(step, values, wall_time))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
