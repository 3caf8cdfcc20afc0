"""Checkpoint integrity: a CRC-32 of every file a save writes, and the check that finds a truncated, bit-flipped or
missing file before a resume loads it. DCP itself checks nothing: a flipped bit in a tensor loads silently.

At save, every rank's writer records, next to each data file it wrote, `<file>.crc32` ({"bytes", "crc32"}); rank 0
records the CRC-32 of `.metadata` in the completeness marker (checkpoint_files.py) along with `"checksums": true`.
At load, the files are checked before DCP reads them (checkpoint.py splits them over the ranks): `.metadata` must
parse and match its CRC-32, every data file it names must exist with the bytes it needs, and match its own.
"""

import json
import os
import zlib
from pathlib import Path

import torch.distributed.checkpoint as dcp

from trainer.checkpoint_files import read_marker
from trainer.torch_private import storage_extents

SUFFIX = ".crc32"
CHUNK = 16 << 20


def crc32(path: Path) -> int:
    """The CRC-32 of a file, read in 16 MiB chunks (zlib releases the GIL on each: an async save's writer thread
    does not stall training)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ChecksummedWriter(dcp.FileSystemWriter):
    """DCP's FileSystemWriter that also writes `<file>.crc32` for each data file this rank wrote, before its write
    results go to rank 0: once rank 0 completes the save, every checksum is on disk."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()
        for name in sorted({result.storage_data.relative_path for result in results}):
            path = Path(self.path) / name
            _write_json(path.with_name(name + SUFFIX), {"bytes": path.stat().st_size, "crc32": crc32(path)})
        return future


def metadata_record(folder: Path) -> dict:
    """What the marker records of a finished save (rank 0, once `.metadata` is written)."""
    return {"checksums": True, "metadata_crc32": crc32(folder / ".metadata")}


def files_to_check(folder: Path) -> tuple[list[tuple[str, int]], str | None]:
    """([(data file, bytes it needs at least)], None), or ([], what is wrong) when `.metadata` is missing, does not
    match the marker's CRC-32 or does not parse. Rank 0 calls it; each rank then checks some of the files."""
    marker = read_marker(folder) or {}
    meta = folder / ".metadata"
    if not meta.is_file():
        return [], ".metadata is missing"
    if "metadata_crc32" in marker and crc32(meta) != marker["metadata_crc32"]:
        return [], ".metadata does not match its CRC-32 (a changed or truncated file)"
    try:
        extents = storage_extents(dcp.FileSystemReader(str(folder)).read_metadata())
    except Exception as e:
        return [], f".metadata does not parse ({type(e).__name__})"
    return sorted(extents.items()), None


def check_file(folder: Path, name: str, needed: int, checksums: bool) -> str | None:
    """What is wrong with one data file, or None: missing, shorter than the metadata needs, or (with `checksums`,
    the marker's promise that the save wrote them) not matching its recorded size and CRC-32."""
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size < needed:
        return f"{name} is truncated ({size} bytes, the metadata needs {needed})"
    if not checksums:
        return None
    try:
        record = json.loads(path.with_name(name + SUFFIX).read_text())
    except (OSError, ValueError):
        return f"{name}{SUFFIX} is missing or unreadable"
    if size != record["bytes"]:
        return f"{name} has {size} bytes, {record['bytes']} were written"
    if crc32(path) != record["crc32"]:
        return f"{name} does not match its CRC-32 (changed on disk since the save)"
    return None
