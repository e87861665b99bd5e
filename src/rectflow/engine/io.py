"""Atomic file writes, safetensors tensors with JSON metadata, and JSON files.

Every write goes to a temporary file in the destination folder and is renamed into place,
so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from rectflow.errors import BusyError, CheckpointError, OutputError

__all__ = ["atomic_path", "check_writable", "make_dirs", "save_json", "load_json", "save_tensors", "load_tensors", "sha256_file",
           "append_jsonl", "read_jsonl", "scan_jsonl"]


def check_writable(path: str | Path, *, directory: bool = False) -> Path:
    """Check, creating nothing, that ``path`` can be written: as a file (``directory=False``,
    written by :func:`atomic_path`) or as a directory to create or write into.

    Raises :class:`OutputError` naming the path when it is a directory where a file is wanted (or a
    file where a directory is), when an existing ancestor is a file, or when the directory that
    would receive the write is not writable.  Returns ``Path(path)``.
    """
    p = Path(path)
    if p.is_dir() and not directory:
        raise OutputError(f"{p} is a directory, not a file")
    if p.exists() and not p.is_dir() and directory:
        raise OutputError(f"{p} is a file, not a directory")
    nearest = p if directory and p.is_dir() else p.parent
    while not nearest.is_dir():
        if nearest.exists() or nearest == nearest.parent:  # a file (or something else) where a directory is needed
            raise OutputError(f"{p}: cannot create it, {nearest} is a file, not a directory")
        nearest = nearest.parent
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: cannot write into {nearest} (permission denied)")
    return p


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p path``, with an :class:`OutputError` naming the path instead of an OSError."""
    p = check_writable(path, directory=True)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{p}: cannot create the directory ({e.strerror or e})") from None
    return p


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    A path that cannot be written (see :func:`check_writable`) raises :class:`OutputError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory, not a file")
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as e:  # writing the temporary (a full disk) or renaming it (a directory appeared there)
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
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
    except RecursionError:
        raise CheckpointError(f"{p}: not valid JSON (nested too deeply)") from None


_JSON_KEYS = "rectflow.json_keys"  # metadata key listing the keys whose values are JSON (the others are plain strings)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors, atomically.  String ``metadata`` values are stored as they are (so other
    tools read them plainly); any other value as JSON, its key listed under ``rectflow.json_keys``."""
    meta, json_keys = {}, []
    for k, v in (metadata or {}).items():
        if isinstance(v, str):
            meta[k] = v
        else:
            meta[k] = json.dumps(v)
            json_keys.append(k)
    if json_keys or any(_is_json(v) for v in meta.values()):  # without the key a reader takes what parses as JSON for JSON
        meta[_JSON_KEYS] = json.dumps(sorted(json_keys))
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a safetensors file and its metadata (see :func:`save_tensors`; a file written before plain strings, with
    every value JSON, reads the same); a missing/corrupt file raises :class:`CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        tensors = load_file(str(p), device=str(device))

        with safe_open(str(p), framework="pt") as f:
            raw = dict(f.metadata() or {})
        if _JSON_KEYS in raw:
            keys = set(json.loads(raw.pop(_JSON_KEYS)))
            meta = {k: json.loads(v) if k in keys else v for k, v in raw.items()}
        else:  # plain strings that are not JSON, or a file of an earlier version (every value JSON)
            meta = {k: json.loads(v) if _is_json(v) else v for k, v in raw.items()}
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
    """Append one JSON line and flush (readers skip a torn last line left by a kill: see read_jsonl).  A symbolic link at
    ``path`` is refused (:class:`OutputError`), never followed: rows never land outside the run."""
    fd = _open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (one line naming it) instead of following it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link; rectflow does not follow links inside its directories (remove it)") from None
        raise


def scan_jsonl(path: str | Path, check: Callable[[dict[str, Any]], str | None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a JSON-lines file, and one entry per line that could not be read (``"line 3: not a
    JSON object"``).  A missing file has no rows; blank lines are skipped; a torn last line (no
    newline: a process killed while appending) is dropped and is not a problem.  ``check(row)``
    may refuse a row by returning why (it then counts as unreadable)."""
    p = Path(path)
    if not p.is_file():
        return [], []
    lines = p.read_bytes().split(b"\n")
    rows, problems = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number < len(lines):  # text after the last newline is a torn line: dropped, not a problem
                problems.append(f"line {number}: " + ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not JSON ({e.msg})"))
            continue
        why = f"not a JSON object ({type(row).__name__})" if not isinstance(row, dict) else check(row) if check is not None else None
        if why is None:
            rows.append(row)
        else:
            problems.append(f"line {number}: {why}")
    return rows, problems


def read_jsonl(path: str | Path, *, strict: bool = False, check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Rows (JSON objects) of a JSON-lines file; a torn last line left by a kill is skipped.

    Other unreadable lines (stray bytes, text that is not JSON, JSON that is not an object) are
    skipped too, unless ``strict``: then the first raises :class:`CheckpointError` naming the file
    and the line (see :func:`scan_jsonl`, which also explains ``check``)."""
    rows, problems = scan_jsonl(path, check)
    if strict and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0]}{more}")
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
    make_dirs(directory)
    path = directory / LOCK_FILE
    while True:
        fd = _open_no_follow(path, os.O_RDWR | os.O_CREAT)
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
    """Delete the temporaries a process killed mid-write leaves in ``directories`` (not recursive):
    files of :func:`atomic_path` (``.<name>.<random>.tmp``) and folders staged beside their target
    (``.<name>.<what>.tmp``, e.g. a pipeline export); returns what was removed.  Call it only while
    holding the directory's :func:`exclusive_lock`: another writer's temporaries would otherwise be
    in use."""
    removed = []
    for d in map(Path, directories):
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
