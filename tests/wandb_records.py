"""A reader of W&B's offline run files (`<dir>/wandb/offline-run-*/run-<id>.wandb`), for tests.

W&B's Python package no longer has a reader for them (the writer is its Go service). The file is
a LevelDB-style record log, as W&B writes it (wandb 0.31):

- a 7-byte file header: b":W&B", the magic 0xBEE1 (little-endian u16) and a version byte (0);
- then 32 KiB blocks of chunks, each a 7-byte header (u32 CRC-32, u16 length, u8 type) and its
  data. Type 1 is a whole record; 2, 3, 4 the first, middle and last chunk of one that spans
  blocks. The CRC is zlib's CRC-32 of the data, seeded with the CRC-32 of the type byte. A block
  with fewer than 7 bytes left is padded with zeros; the next chunk starts the next block.
- each record is a serialized `wandb.proto.wandb_internal_pb2.Record`.

`read_run` folds the records into what the W&B UI shows for the run: identity, config, history
rows, summary, metric definitions and the exit record.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class DamagedLog(ValueError):
    pass


def chunks(data: bytes):
    """(type, data) of every chunk after the file header, checking each CRC."""
    offset = HEADER.size
    while offset + CHUNK.size <= len(data):
        if BLOCK - offset % BLOCK < CHUNK.size:  # the block's zero padding
            offset += BLOCK - offset % BLOCK
            continue
        crc, length, kind = CHUNK.unpack_from(data, offset)
        body = data[offset + CHUNK.size : offset + CHUNK.size + length]
        if crc == length == kind == 0:  # padding at the end of the last block
            break
        if len(body) != length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise DamagedLog(f"bad chunk at byte {offset} (type {kind}, length {length})")
        yield kind, body
        offset += CHUNK.size + length


def records(path: Path) -> list[Any]:
    """Every Record of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise DamagedLog(f"{path}: not a W&B run log ({ident!r}, {magic:#x}, {version})")
    out, pending = [], None
    for kind, body in chunks(data):
        if kind == FULL:
            blobs = [body]
        elif kind == FIRST:
            pending, blobs = bytearray(body), []
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += body
            blobs = [bytes(pending)] if kind == LAST else []
            pending = None if kind == LAST else pending
        else:
            raise DamagedLog(f"{path}: chunk of type {kind} out of place")
        for blob in blobs:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(blob)
            out.append(record)
    return out


def _path(item: Any) -> list[str]:
    """An item's key path: [`key`], or its `nested_key` (W&B sends a logged dict, such as a
    table's reference, as one item per leaf)."""
    return [item.key] if item.key else list(item.nested_key)


def _put(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _path(item)
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = json.loads(item.value_json)


def _drop(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _path(item)
    for name in parents:
        target = target.get(name) or {}
    target.pop(leaf, None)


@dataclass
class OfflineRun:
    """What an offline run file holds, folded as W&B's server would fold it."""

    id: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> MetricRecord
    exit_code: int | None = None

    def user_history_keys(self) -> set[str]:
        """History keys the code logged (W&B adds _step, _runtime, _timestamp)."""
        return {k for row in self.history for k in row if not k.startswith("_")}


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.project, run.entity = r.run_id, r.project, r.entity
            run.group, run.job_type, run.name = r.run_group, r.job_type, r.display_name
            run.notes, run.tags = r.notes, list(r.tags)
            for item in r.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
            for item in record.config.remove:
                _drop(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
            for item in record.summary.remove:
                _drop(run.summary, item)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_run_file(wandb_dir: Path, run_id: str) -> Path:
    """The newest offline run file of `run_id` under a `wandb/` folder."""
    found = sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    if not found:
        raise FileNotFoundError(f"no offline W&B run {run_id} under {wandb_dir}")
    return found[-1]
