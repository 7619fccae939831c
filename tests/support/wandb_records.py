"""Read an offline W&B run file (run-<id>.wandb) back, for tests.

The file is a LevelDB-style log: a 7-byte header (':W&B', magic 0xBEE1, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32 4, length 2, type 1; type 1 = full,
2/3/4 = first/middle/last fragment). Each record is a protobuf `wandb_internal_pb2.Record`.
"""
import json
import struct
import subprocess
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # block tail too short for a header: padding
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        payload = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> list[dict]:
    """Every `run.log` call as a dict of key -> value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_file(run_dir: Path, timeout: float = 60.0) -> Path:
    """The newest offline run file under run_dir/wandb, once W&B's service has written its end.

    `run.finish()` hands the last records to W&B's writer process; on a loaded machine they can
    reach the file a moment later, so wait for the exit record rather than read a partial log.
    """
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}/wandb"
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in records(files[-1])):
        assert time.monotonic() < deadline, f"{files[-1]} has no exit record after {timeout} s"
        time.sleep(0.2)
    return files[-1]


def inspect_summary(path: Path) -> dict:
    """Config, summary, name, group, tags and state as W&B's own reader prints them."""
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_record(path: Path):
    """The run's own record: name (display_name), group (run_group), tags, config."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {path}")
