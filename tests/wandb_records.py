"""Reading what an offline W&B run wrote (its ``run-<id>.wandb`` file), for the tests.

wandb (0.31) ships no Python reader of its own run files any more (``wandb.sdk.internal.datastore``
is gone; ``wandb.Api`` needs the server), so this reads the file's framing here and decodes each
record with wandb's own protobuf schema, ``wandb.proto.wandb_internal_pb2.Record``. The framing
is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC-32 of the type byte and the data, length, type:
1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    records, pos, pending = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            break  # zero padding after the last record
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class OfflineRun:
    """The parts of one offline run the tests check."""
    id: str
    name: str
    group: str
    job_type: str
    config: dict
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    summary: dict = field(default_factory=dict)


def read_run(path: Path) -> OfflineRun:
    """Identity, config, history (W&B's own keys, those starting with '_', left out) and the final summary."""
    run = None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            config = {_key(u): json.loads(u.value_json) for u in r.config.update}
            run = OfflineRun(r.run_id, r.display_name, r.run_group, r.job_type, config)
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            step = row["_step"]
            for key, value in row.items():
                if not key.startswith("_"):
                    run.history.setdefault(key, []).append((step, value))
        elif kind == "summary":
            for u in record.summary.update:
                run.summary[_key(u)] = json.loads(u.value_json)
    assert run is not None, f"{path} holds no run record"
    return run


def offline_runs(wandb_dir: Path) -> list[Path]:
    """Every run file under ``<out_dir>/wandb``, oldest first."""
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
