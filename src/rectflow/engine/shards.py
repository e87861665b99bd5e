"""Resumable, checksummed shard stores: the one on-disk mechanism behind the reflow pair store
(:mod:`rectflow.reflow.pairs`) and the PeRFlow latent cache (:mod:`rectflow.perflow.latent_cache`).

A store is a directory::

    manifest.json                {format, settings, provenance, shards: [{file, n, bytes, sha256, ...}], complete}
    <prefix>_00000.safetensors   the tensors of items 0 .. m-1 (each key (m, *item shape))
    <prefix>_00001.safetensors   ...

The *settings* (a JSON mapping owned by the kind of store) determine the content completely; the
*layout* (:class:`ShardLayout`) derived from them says how many items each shard holds and which
tensors of which dtype and per-item shape it contains.  :func:`write_shards` makes the shards in
order, writes each atomically and then records it (size and sha256) in the manifest, so a process
killed at any point resumes at the first unrecorded shard with nothing lost or duplicated.  A
directory holding a store of other settings, or anything else, is refused before anything is
written; a recorded shard that is missing, truncated or changed on disk is a
:class:`~rectflow.errors.CheckpointError` naming the file.

A kind of store is described once by a :class:`StoreKind` (format tag, nouns for messages, shard
file prefix, and how its settings are parsed and turned into a layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rectflow.engine.io import LOCK_FILE, check_writable, exclusive_lock, load_json, save_json, save_tensors, sha256_file
from rectflow.errors import CheckpointError, ConfigError

__all__ = [
    "DTYPE_BYTES",
    "MANIFEST",
    "ShardLayout",
    "StoreKind",
    "check_shard",
    "check_target",
    "open_for_writing",
    "read_manifest",
    "safetensors_layout",
    "settings_diff",
    "shard_memmap",
    "state_dict_sha256",
    "write_shards",
]

MANIFEST = "manifest.json"

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
_NUMPY = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def state_dict_sha256(model: nn.Module) -> str:
    """Hex sha256 over a model's state dict (names, dtypes, shapes and raw bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardLayout:
    """How a store's items are split into shards and what each shard file holds.

    ``tensors``: one (key, safetensors dtype such as ``"F32"``, per-item shape) per tensor; shard i
    holds each key with shape (shard_count(i), *per-item shape).
    """

    prefix: str
    n_items: int
    shard_size: int
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_items / self.shard_size)

    def shard_count(self, index: int) -> int:
        """Number of items in shard ``index`` (all full but possibly the last)."""
        return min(self.shard_size, self.n_items - index * self.shard_size)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}_{index:05d}.safetensors"

    def item_bytes(self) -> int:
        return sum(DTYPE_BYTES[d] * math.prod(s) for _, d, s in self.tensors)


@dataclass(frozen=True)
class StoreKind:
    """One kind of shard store.

    Args:
        format: the manifest's ``format`` tag (e.g. ``"rectflow-pairs/1"``).
        noun: what the store is called in messages (``"pair store"``).
        items: what it holds, plural (``"pairs"``; progress bars and messages).
        parse: ``(settings mapping, where) -> settings object``; raises CheckpointError when malformed.
        to_dict: settings object -> JSON mapping (the inverse of ``parse``; compared key by key).
        layout: settings object -> :class:`ShardLayout`.
        unit: one item, for progress bars (``"pair"``).
    """

    format: str
    noun: str
    items: str
    parse: Callable[[Any, str], Any]
    to_dict: Callable[[Any], dict[str, Any]]
    layout: Callable[[Any], ShardLayout]
    unit: str = "item"


# ----- checks ------------------------------------------------------------------------------


def read_manifest(root: Path, kind: StoreKind) -> tuple[Any, ShardLayout, dict[str, Any]]:
    """(settings, layout, manifest) of the store in ``root``, its shard list checked against the layout."""
    path = root / MANIFEST
    man = load_json(path)
    if not isinstance(man, dict) or man.get("format") != kind.format:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise CheckpointError(f"{path}: not a rectflow {kind.noun} (format {fmt!r}, expected {kind.format!r})")
    settings = kind.parse(man.get("settings"), str(path))
    layout = kind.layout(settings)
    shards = man.get("shards")
    if not isinstance(shards, list) or len(shards) > layout.n_shards:
        raise CheckpointError(f"{path}: malformed {kind.noun.replace(' ', '-')} manifest (shards must be a list of at most {layout.n_shards} entries)")
    for i, e in enumerate(shards):
        ok = isinstance(e, dict) and e.get("file") == layout.shard_name(i) and e.get("n") == layout.shard_count(i)
        ok = ok and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        if not ok:
            raise CheckpointError(
                f"{path}: manifest disagrees with its layout at shard {i} (expected file {layout.shard_name(i)} with "
                f"n = {layout.shard_count(i)}, got {e!r:.120})"
            )
    if man.get("complete") and len(shards) != layout.n_shards:
        raise CheckpointError(f"{path}: manifest says complete but lists {len(shards)} of {layout.n_shards} shards")
    return settings, layout, man


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, header entries) of a safetensors file, read without loading it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated shard ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt shard (header is not a mapping)")
    return 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}


def check_shard(root: Path, layout: ShardLayout, index: int, entry: dict[str, Any], *, full: bool) -> tuple[int, dict]:
    """Verify shard ``index`` against its manifest entry (size; sha256 when ``full``; dtypes, shapes
    and extents of its tensors); returns its safetensors layout (data offset, header)."""
    path = root / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path}: shard is truncated or was changed on disk ({size} bytes, manifest records {entry['bytes']})")
    if full and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: shard was changed on disk (sha256 differs from the manifest)")
    start, header = safetensors_layout(path)
    for key, dtype, shape in layout.tensors:
        want = [layout.shard_count(index), *shape]
        h = header.get(key)
        if not isinstance(h, dict) or h.get("dtype") != dtype or h.get("shape") != want:
            got = {k: (v.get("dtype"), v.get("shape")) for k, v in header.items() if isinstance(v, dict)}
            raise CheckpointError(f"{path}: shard disagrees with the manifest (expected {key} {dtype} of shape {want}, found {got})")
        lo, hi = h.get("data_offsets", [0, -1])
        if hi - lo != DTYPE_BYTES[dtype] * math.prod(want) or start + hi > size:
            raise CheckpointError(f"{path}: corrupt shard (tensor {key} does not fit the file)")
    return start, header


def shard_memmap(path: Path, start: int, header: dict[str, Any], key: str) -> np.ndarray:
    """A read-only memory map of tensor ``key`` of a checked shard (dtypes numpy can map)."""
    h = header[key]
    if h["dtype"] not in _NUMPY:
        raise CheckpointError(f"{path}: tensor {key} of dtype {h['dtype']} cannot be memory-mapped; load the store into memory")
    return np.memmap(path, dtype=_NUMPY[h["dtype"]], mode="r", offset=start + h["data_offsets"][0], shape=tuple(h["shape"]))


def settings_diff(kind: StoreKind, a: Any, b: Any) -> list[str]:
    """Names of the settings that differ between two settings objects of ``kind``."""
    da, db = kind.to_dict(a), kind.to_dict(b)
    return [k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


def check_target(root: Path, kind: StoreKind, settings: Any) -> bool:
    """Refuse (ConfigError) a directory that holds a store of other settings or something else,
    writing nothing; True when it holds a complete store of these settings."""
    if (root / MANIFEST).is_file():
        old, _, man = read_manifest(root, kind)
        diff = settings_diff(kind, old, settings)
        if diff:
            raise ConfigError(f"{root} holds {kind.items} with other settings (differs in {', '.join(diff)}); nothing was written: use another directory")
        return bool(man.get("complete"))
    if root.exists():
        if not root.is_dir():
            raise ConfigError(f"{root} exists and is not a directory")
        if any(p for p in root.iterdir() if p.name != LOCK_FILE and not (p.name.startswith(".") and p.name.endswith(".tmp"))):
            raise ConfigError(f"{root} is not empty and holds no {kind.noun} ({MANIFEST} missing); nothing was written: use an empty or new directory")
    check_writable(root, directory=True)
    return False


def open_for_writing(root: Path, kind: StoreKind, settings: Any, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """Create the store's manifest, or check that ``root`` holds a store of the same settings whose
    recorded shards are intact (sha256); returns the manifest (stale temporary files are removed)."""
    check_target(root, kind, settings)
    if (root / MANIFEST).is_file():
        _, layout, man = read_manifest(root, kind)
        for i, e in enumerate(man["shards"]):
            check_shard(root, layout, i, e, full=True)
        for tmp in root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return man
    man = {"format": kind.format, "settings": kind.to_dict(settings), "provenance": provenance or {}, "shards": [], "complete": False}
    save_json(root / MANIFEST, man)
    return man


def write_shards(
    root: Path,
    kind: StoreKind,
    settings: Any,
    make_shard: Callable[[int], tuple[dict[str, Tensor], dict[str, Any]]],
    *,
    provenance: dict[str, Any] | None = None,
    progress: bool | None = True,
    on_shard: Callable[[int], None] | None = None,
    before: Callable[[dict[str, Any]], None] | None = None,
    finish: Callable[[dict[str, Any], int, float], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write (or finish, or just check) the store of ``settings`` in ``root``; returns its manifest.

    Args:
        make_shard: ``s -> (tensors, extra)``: shard s's tensors (a function of (settings, s) alone,
            so a resumed store equals an uninterrupted one) and extra JSON for its manifest entry.
        provenance: JSON recorded in a new manifest but never compared.
        progress: tqdm bar over items (None: only on a terminal).
        on_shard: called with each shard index after it is recorded (tests use it to simulate a kill).
        before: called with the manifest (under the lock, before the first new shard) to add
            store-specific entries; the manifest is saved afterwards.
        finish: ``(manifest, items made in this session, seconds) -> stats`` stored as
            ``manifest["stats"]`` when the last shard is recorded.
    Raises:
        ConfigError: ``root`` holds something else (nothing is written);
        CheckpointError: a recorded shard is missing, truncated or changed.
    """
    complete = check_target(root, kind, settings)  # read-only: a refused directory is left untouched
    with contextlib.nullcontext() if complete else exclusive_lock(root, kind.noun):  # a complete store is only read
        man = open_for_writing(root, kind, settings, provenance)
        if man["complete"]:
            return man
        layout = kind.layout(settings)
        if before is not None:
            before(man)
            save_json(root / MANIFEST, man)
        done = len(man["shards"])
        bar = tqdm(total=layout.n_items, initial=sum(e["n"] for e in man["shards"]), disable=not progress or None, desc=kind.items,
                   unit=kind.unit, unit_scale=True, dynamic_ncols=True)
        t_start, made = time.perf_counter(), 0
        try:
            for s in range(done, layout.n_shards):
                tensors, extra = make_shard(s)
                path = root / layout.shard_name(s)
                save_tensors(path, tensors, {"format": kind.format})  # one key: safetensors orders metadata at random
                man["shards"].append({"file": path.name, "n": layout.shard_count(s), "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra})
                made += layout.shard_count(s)
                man["complete"] = len(man["shards"]) == layout.n_shards
                if man["complete"] and finish is not None:
                    man["stats"] = finish(man, made, time.perf_counter() - t_start)
                save_json(root / MANIFEST, man)
                bar.update(layout.shard_count(s))
                if on_shard is not None:
                    on_shard(s)
        finally:
            bar.close()
    return man
