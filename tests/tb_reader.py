"""An event-file reader for tests, independent of pickstyle_jax.train.tensorboard: TFRecord framing checked with a
bit-at-a-time CRC-32C (not the writer's table), Event messages parsed by the real protobuf library from a descriptor
built here with tensorflow/core/util/event.proto's and summary.proto's field numbers.

`scalars(logdir)` reads every events.out.tfevents.* file in name order and applies TensorBoard's rule for restarts: a
SessionLog START at step s drops the values logged earlier at steps >= s.
"""
from __future__ import annotations

import struct
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def crc32c_bitwise(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path) -> list[bytes]:
    """The records of a TFRecord file; every CRC checked, no trailing bytes allowed."""
    buf, out, i = Path(path).read_bytes(), [], 0
    while i < len(buf):
        header = buf[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", buf[i + 8:i + 12])[0] == _masked(header), f"{path}: bad length CRC at {i}"
        data = buf[i + 12:i + 12 + n]
        assert len(data) == n, f"{path}: truncated record at {i}"
        assert struct.unpack("<I", buf[i + 12 + n:i + 16 + n])[0] == _masked(data), f"{path}: bad data CRC at {i}"
        out.append(data)
        i += 16 + n
    return out


def _event_class():
    T = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="tb_reader_event.proto", package="tbtest", syntax="proto3")

    def msg(name, fields, oneof=()):
        """oneof: the field names of the message's one oneof (present even when zero, as in the .proto files)."""
        m = f.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name="what")
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
            if fname in oneof:
                fd.oneof_index = 0
        return m

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Value", [("tag", 1, T.TYPE_STRING, opt, None), ("simple_value", 2, T.TYPE_FLOAT, opt, None)],
        oneof=("simple_value",))
    msg("Summary", [("value", 1, T.TYPE_MESSAGE, rep, ".tbtest.Value")])
    msg("SessionLog", [("status", 1, T.TYPE_INT32, opt, None), ("msg", 3, T.TYPE_STRING, opt, None)])
    msg("Event", [("wall_time", 1, T.TYPE_DOUBLE, opt, None), ("step", 2, T.TYPE_INT64, opt, None),
                  ("file_version", 3, T.TYPE_STRING, opt, None), ("summary", 5, T.TYPE_MESSAGE, opt, ".tbtest.Summary"),
                  ("session_log", 6, T.TYPE_MESSAGE, opt, ".tbtest.SessionLog")],
        oneof=("file_version", "summary", "session_log"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


Event = _event_class()


def events(path) -> list:
    out = []
    for data in records(path):
        e = Event()
        e.ParseFromString(data)
        assert e.SerializeToString() == data, "the writer's bytes are not what protobuf itself would write"
        out.append(e)
    return out


def event_files(logdir) -> list[Path]:
    return sorted(Path(logdir).glob("events.out.tfevents.*"))


def scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over all event files, START events purging what came before at steps >= theirs."""
    out: dict[str, dict[int, float]] = {}
    for path in event_files(logdir):
        evs = events(path)
        assert evs[0].file_version == "brain.Event:2", f"{path}: first event is not the file version"
        for e in evs[1:]:
            if e.HasField("session_log") and e.session_log.status == 1:
                for series in out.values():
                    for s in [s for s in series if s >= e.step]:
                        del series[s]
            for v in e.summary.value:
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out
