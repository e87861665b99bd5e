"""Atomic file writes, safetensors tensors with JSON metadata, and JSON files.

Every write goes to a temporary file in the destination folder and is renamed into place,
so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from rectflow.errors import BusyError, CheckpointError

__all__ = ["atomic_path", "save_json", "load_json", "save_tensors", "load_tensors", "sha256_file", "append_jsonl", "read_jsonl"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing, empty or corrupt file raises :class:`CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors, atomically.  ``metadata`` values are stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata; a missing/corrupt file raises :class:`CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        tensors = load_file(str(p), device=str(device))

        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({e})") from None
    return tensors, meta


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush (readers skip a torn last line left by a kill: see read_jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; lines that do not parse (a torn last line) are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


LOCK_FILE = ".lock"
"""The lock file a job holds inside its directory while it runs (it holds the holder's pid)."""


@contextmanager
def exclusive_lock(directory: str | Path, what: str = "directory") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the block.

    A second process asking for the same lock gets BusyError naming the holder's pid.  The lock
    is an OS file lock (``flock``) on ``directory/.lock``, so a holder killed by any signal,
    kill -9 included, leaves no stale lock behind (at most a stale file, which the next holder
    takes over).  The lock file is removed on release, and a directory that this call created
    and nobody wrote into is removed again.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(f"{directory}: this {what} is in use by another rectflow process (pid {holder}); wait for it to finish or use another directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: retry
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield directory
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so nobody can lock a file that is going away
        os.close(fd)
        if created and not any(directory.iterdir()):
            directory.rmdir()


def remove_stale_temporaries(*directories: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` leaves when a process is killed mid-write
    (``.<name>.<random>.tmp``) in ``directories`` (not recursive); returns what was removed.
    Call it only while holding the directory's :func:`exclusive_lock`: another writer's
    temporaries would otherwise be in use."""
    removed = []
    for d in map(Path, directories):
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
