"""Reflow pair stores: coupled samples (Z0, Z1 = Flow_k(Z0)) kept on disk (theory §4.1).

A store is a directory::

    manifest.json               settings, provenance and one entry (n, bytes, sha256, NFE) per shard
    pairs_00000.safetensors     z0 (m, *shape) and z1 (m, *shape), float32
    pairs_00001.safetensors     ...

Generation (:func:`generate_pairs`) streams shard by shard, so only one shard is ever in
memory.  Shard s holds Z0 drawn from ``step_generator(seed, s)`` and Z1 solved on that whole
shard (adaptive solvers control their step on the batch, so the shard is the unit of
determinism): the store is a function of its settings alone.  Each shard is written
atomically and then recorded in the manifest, so a killed generation resumes at the first
unrecorded shard with no pair lost or duplicated.  A store is never overwritten with other
settings, and a shard that is missing, truncated or changed on disk is reported with a
:class:`~rectflow.errors.CheckpointError`.

The shard mechanism (manifest, atomic shards, checks, resumption) is :mod:`rectflow.engine.shards`,
shared with the PeRFlow latent cache.

Reading: :class:`PairStore` is a map-style dataset (``store[i] -> (z0, z1)``, ``store.get(idx)``)
backed by memory maps, so stores larger than RAM are read page by page;
:class:`PairCoupling` draws random pairs from it and is a coupling in the sense of
:mod:`rectflow.flow.couplings`, usable by :class:`~rectflow.flow.losses.FlowMatchingObjective`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rectflow.diffusion.specs import parse_spec, sample, spec_label
from rectflow.draws import randint
from rectflow.engine import distributed
from rectflow.engine import shards as _shards
from rectflow.engine.hardware import resolve_device
from rectflow.engine.io import load_tensors, save_json, save_tensors, sha256_file
from rectflow.engine.shards import MANIFEST, ShardLayout, StoreKind, state_dict_sha256
from rectflow.engine.trainer import step_generator
from rectflow.errors import CheckpointError, ConfigError, DataError, check_int

__all__ = [
    "PAIRS_FORMAT",
    "PairOptions",
    "PairSettings",
    "PairStore",
    "PairCoupling",
    "generate_pairs",
    "default_solve_batch",
    "state_dict_sha256",
    "shard_name",
]

PAIRS_FORMAT = "rectflow-pairs/1"
_SHARD_KEYS = ("z0", "z1")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``pairs_00000.safetensors``."""
    return f"pairs_{index:05d}.safetensors"


@dataclass(frozen=True)
class PairSettings:
    """Everything that determines a store's content (two stores with equal settings are identical).

    ``solver`` is a spec such as ``"dopri5"`` or ``"euler:100"``; ``model_sha256`` identifies the
    flow that produced Z1; ``source`` describes pi0 (JSON: a distribution spec or a repr);
    ``solve_batch``: pairs integrated together inside a shard (dopri5 picks one step size per
    batch, so it is part of the content; manifests written before it existed solved whole shards).
    """
    n_pairs: int
    shape: tuple[int, ...]
    seed: int
    shard_size: int
    solver: str
    rtol: float
    atol: float
    model_sha256: str
    source: Any
    solve_batch: int = 0  # 0: the whole shard

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_pairs / self.shard_size)

    def shard_count(self, index: int) -> int:
        """Number of pairs in shard ``index`` (all full but possibly the last)."""
        return min(self.shard_size, self.n_pairs - index * self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PairSettings":
        want = {f: None for f in cls.__dataclass_fields__}
        if isinstance(d, dict) and "solve_batch" not in d:  # written before solve batches: whole shards
            d = {**d, "solve_batch": d.get("shard_size")}
        if not isinstance(d, dict) or set(d) != set(want):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{where}: malformed pair-store manifest (settings keys {got}, expected {sorted(want)})")
        try:
            s = cls(
                n_pairs=int(d["n_pairs"]),
                shape=tuple(int(v) for v in d["shape"]),
                seed=int(d["seed"]),
                shard_size=int(d["shard_size"]),
                solver=str(d["solver"]),
                rtol=float(d["rtol"]),
                atol=float(d["atol"]),
                model_sha256=str(d["model_sha256"]),
                source=d["source"],
                solve_batch=int(d["solve_batch"]),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed pair-store manifest ({e})") from None
        if s.n_pairs < 1 or s.shard_size < 1 or s.solve_batch < 1 or not s.shape or any(v < 1 for v in s.shape):
            raise CheckpointError(f"{where}: malformed pair-store manifest (n_pairs {s.n_pairs}, shard_size {s.shard_size}, "
                                  f"solve_batch {s.solve_batch}, shape {list(s.shape)})")
        return s


# ----- manifest and shard checks (the shared shard-store mechanism, rectflow.engine.shards) ----


def _layout(settings: PairSettings) -> ShardLayout:
    return ShardLayout("pairs", settings.n_pairs, settings.shard_size, tuple((k, "F32", settings.shape) for k in _SHARD_KEYS))


PAIR_STORE = StoreKind(PAIRS_FORMAT, "pair store", "pairs", PairSettings.from_dict, PairSettings.to_dict, _layout, "pair")


def _read_manifest(root: Path) -> tuple[PairSettings, dict[str, Any]]:
    settings, _, man = _shards.read_manifest(root, PAIR_STORE)
    return settings, man


def _check_shard(root: Path, settings: PairSettings, index: int, entry: dict[str, Any], *, full: bool) -> tuple[int, dict]:
    """Verify shard ``index`` against its manifest entry; returns its safetensors layout."""
    return _shards.check_shard(root, _layout(settings), index, entry, full=full)


def _settings_diff(a: PairSettings, b: PairSettings) -> list[str]:
    return _shards.settings_diff(PAIR_STORE, a, b)


# ----- reading -----------------------------------------------------------------------------


class PairStore(Dataset):
    """A complete pair store opened for reading: ``len(store)`` pairs, ``store[i] -> (z0, z1)``.

    Args:
        path: the store directory.
        verify: check every shard's sha256 on open (reads the store once); sizes, shapes and the
            manifest's consistency are always checked.
    Raises:
        CheckpointError: missing/malformed manifest, incomplete store, or a shard that is
            missing, truncated, changed on disk or disagrees with the manifest.
    """
    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise CheckpointError(f"{self.path}: not a pair store (no {MANIFEST}); generate pairs first")
        self.settings, self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            n = len(self.manifest["shards"])
            raise CheckpointError(f"{self.path}: incomplete pair store ({n} of {self.settings.n_shards} shards); run the generation again to finish it")
        self._layouts = [
            _check_shard(self.path, self.settings, i, e, full=verify)[0] for i, e in enumerate(self.manifest["shards"])
        ]
        counts = [self.settings.shard_count(i) for i in range(self.settings.n_shards)]
        self._offsets = np.array([0, *np.cumsum(counts).tolist()], dtype=np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # Memory maps are per process: drop them when pickled (DataLoader workers reopen lazily).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample (d,) or (C, H, W)."""
        return self.settings.shape

    @property
    def dim(self) -> int:
        """Number of values per sample."""
        return math.prod(self.settings.shape)

    @property
    def nbytes(self) -> int:
        return 2 * 4 * len(self) * self.dim

    def __len__(self) -> int:
        return self.settings.n_pairs

    def __repr__(self) -> str:
        s = self.settings
        return f"PairStore({str(self.path)!r}, n={s.n_pairs}, shape={list(s.shape)}, solver={s.solver!r})"

    _MAX_OPEN_MAPS = 64  # each memory map holds a file descriptor

    def _shard_maps(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._maps:
            if len(self._maps) >= self._MAX_OPEN_MAPS:
                self._maps.pop(next(iter(self._maps)))  # the oldest opened
            entry = self.manifest["shards"][index]
            path = self.path / entry["file"]
            start, header = _shards.safetensors_layout(path)
            self._maps[index] = tuple(_shards.shard_memmap(path, start, header, k) for k in _SHARD_KEYS)  # type: ignore[assignment]
        return self._maps[index]

    def get(self, idx: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Pairs at global indices ``idx`` (k,): z0, z1 each (k, *shape), in the order given."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"pair index out of range [0, {len(self)})")
        z0 = np.empty((idx.numel(), *self.shape), dtype=np.float32)
        z1 = np.empty_like(z0)
        gidx = idx.numpy()
        shard = np.searchsorted(self._offsets, gidx, side="right") - 1
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            local = gidx[sel] - self._offsets[s]
            m0, m1 = self._shard_maps(s)
            z0[sel] = m0[local]
            z1[sel] = m1[local]
        return torch.from_numpy(z0), torch.from_numpy(z1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if i < 0:
            i += len(self)
        z0, z1 = self.get([i])
        return z0[0], z1[0]

    def iter_shards(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Stream the store shard by shard: (z0, z1) of shape (m, *shape) each, in order."""
        for i, entry in enumerate(self.manifest["shards"]):
            tensors, _ = load_tensors(self.path / entry["file"])
            yield tensors["z0"], tensors["z1"]

    def load(self) -> tuple[Tensor, Tensor]:
        """All pairs in memory: z0, z1 of shape (N, *shape)."""
        parts = list(self.iter_shards())
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def verify(self) -> None:
        """Check every shard's size, layout and sha256 against the manifest (raises CheckpointError)."""
        for i, e in enumerate(self.manifest["shards"]):
            _check_shard(self.path, self.settings, i, e, full=True)


class PairCoupling:
    """The coupling of a pair store: ``sample(n, generator, device)`` returns n pairs drawn uniformly
    with replacement (theory §4.1: 2-RF is 1-RF's loss on this coupling).

    Args:
        store: a :class:`PairStore` or its directory.
        in_memory: keep all pairs in RAM (fast gathers); default: when the store is at most 2 GiB,
            else the pairs are gathered from memory maps.
        dim, shape: when given, the dimension / sample shape the caller expects; a store of
            another raises :class:`DataError`.
    """
    heavy = False

    def __init__(
        self, store: PairStore | str | Path, *, in_memory: bool | None = None, dim: int | None = None, shape: Sequence[int] | None = None
    ) -> None:
        self.store = store if isinstance(store, PairStore) else PairStore(store)
        if shape is not None and tuple(shape) != self.store.shape:
            raise DataError(
                f"{self.store.path}: pairs have shape {list(self.store.shape)} but this run's samples have shape {list(shape)}; "
                "use pairs generated by a flow of this run's dimension"
            )
        if dim is not None and self.store.dim != dim:
            raise DataError(
                f"{self.store.path}: pairs have shape {list(self.store.shape)} (dimension {self.store.dim}) "
                f"but this run's distributions have dimension {dim}; use pairs generated by a flow of this run's dimension"
            )
        if in_memory is None:
            in_memory = self.store.nbytes <= 2 << 30
        self._pairs = self.store.load() if in_memory else None

    def __len__(self) -> int:
        return len(self.store)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        idx = randint(len(self.store), n, generator=generator, device="cpu")
        if self._pairs is not None:
            z0, z1 = self._pairs[0][idx], self._pairs[1][idx]
        else:
            z0, z1 = self.store.get(idx)
        return z0.to(device), z1.to(device)


# ----- generation --------------------------------------------------------------------------


def _model_dim_check(model: nn.Module, shape: tuple[int, ...]) -> None:
    mdim = getattr(model, "dim", None)
    if isinstance(mdim, int) and len(shape) == 1 and mdim != shape[0]:
        raise DataError(f"the flow has dimension {mdim} but the source pi0 has dimension {shape[0]}; they must match")


def _check_disk_space(root: Path, need: int) -> None:
    """ConfigError (one line) when the pairs cannot fit on the disk that holds ``root``: a huge ``--n`` would otherwise write
    shards until the disk is full.  A store partly written already counts as space that is there."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    have = shutil.disk_usage(probe).free + sum(f.stat().st_size for f in root.glob("shard_*")) if root.is_dir() else shutil.disk_usage(probe).free
    if need > have:
        raise ConfigError(f"{root}: {need / 2**30:.1f} GiB of pairs do not fit in the {have / 2**30:.1f} GiB free there; ask for fewer pairs or another disk")


DEFAULT_PAIR_TOL = 1e-5  # dopri5's rtol / atol when PairOptions leaves them None outside a run


@dataclass(frozen=True)
class PairOptions:
    """How pairs (Z0 ~ pi0, Z1 = Flow(Z0)) are generated: the ``solver`` (dopri5: ``rtol`` / ``atol``, None: the
    run's eval tolerances for a run's flow, else ``DEFAULT_PAIR_TOL``), the ``seed`` of the Z0 draws, pairs per
    ``shard_size`` shard, ``solve_batch`` pairs integrated together (None: :func:`default_solve_batch`), and the
    ``device`` of the solve ("auto": where the model's weights are; :func:`generate_pairs` never moves the model, and
    ``generate_run_pairs`` puts a run's model on CUDA, else MPS, else the CPU)."""

    seed: int = 0
    solver: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    shard_size: int = 65536
    device: str = "auto"
    solve_batch: int | None = None


def generate_pairs(
    model: nn.Module,
    source: Any,
    out: str | Path,
    n: int,
    options: PairOptions = PairOptions(),
    *,
    model_sha256: str | None = None,
    source_spec: Any = None,
    provenance: dict[str, Any] | None = None,
    progress: bool | None = True,
    on_shard: Callable[[int], None] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> PairStore:
    """Write (or finish, or just verify) the store of n pairs (Z0, Z1 = Flow(Z0)) in ``out``.

    Args:
        model: the velocity field v(x, t) of the k-RF, integrated from t = 0 to 1.
        source: a sampler of pi0 (``sample(n, generator=, device=)`` and ``dim`` or ``shape``).
        out: the store directory: new, empty, or a store of the same settings to resume.
        n: number of pairs.
        options: the :class:`PairOptions`: ``shard_size`` pairs per shard (the unit of memory and of resumption);
            shard s draws Z0 from ``step_generator(seed, s)``; ``solver`` ``"dopri5"`` (adaptive, rtol / atol)
            or a fixed-step spec such as ``"euler:100"``; ``solve_batch`` pairs integrated together (bounds the
            solver's memory; default :func:`default_solve_batch`, the whole shard for low-dimensional data).
        model_sha256: identifies the flow (default: :func:`state_dict_sha256` of ``model``).
        source_spec: JSON description of pi0 recorded in the settings (default: ``repr(source)``).
        provenance: extra JSON recorded in the manifest but not compared (run dir, step, stage).
        progress: tqdm bar over pairs (None: only on a terminal).
        on_shard: called with each shard index after it is recorded (tests use it to simulate a kill).
        rank, world_size: under torchrun (default: read from torch.distributed), rank r makes the
            shards r, r + N, r + 2N, ... and rank 0 writes the manifest; since shard s depends on
            (settings, s) alone, N ranks produce exactly the store one process would.
    Returns:
        the complete, verified :class:`PairStore`.
    Raises:
        ConfigError: ``out`` is non-empty and not a store of these settings (nothing is written);
        CheckpointError: an existing shard is missing, truncated or changed;
        DataError: the model's and the source's dimensions differ.
    """

    o = options
    solver, shard_size = o.solver, o.shard_size
    rtol = DEFAULT_PAIR_TOL if o.rtol is None else o.rtol
    atol = DEFAULT_PAIR_TOL if o.atol is None else o.atol
    check_int(n, "number of pairs")
    check_int(shard_size, "shard size")
    if o.solve_batch is not None:
        check_int(o.solve_batch, "solve batch")
    method, steps = parse_spec(solver)
    if method == "edm":
        raise ConfigError(f"pairs: {solver} starts at sigma_max = 80 from b(t_0) x0, not from x0, so the stored pair (x0, x1) would not be the "
                          "flow's coupling; use dopri5, euler:N, rk4:N or dpm++2m:N")
    if method == "dopri5" and not (rtol > 0 and atol >= 0):
        raise ConfigError(f"dopri5 needs rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    shape = tuple(getattr(source, "shape", None) or (int(source.dim),))
    device = _model_device(model) if o.device == "auto" else resolve_device(str(o.device))
    _model_dim_check(model, shape)
    settings = PairSettings(
        n_pairs=n,
        shape=shape,
        seed=int(o.seed),
        shard_size=shard_size,
        solver=solver,
        rtol=float(rtol) if method == "dopri5" else 0.0,
        atol=float(atol) if method == "dopri5" else 0.0,
        model_sha256=model_sha256 or state_dict_sha256(model),
        source=source_spec if source_spec is not None else repr(source),
        solve_batch=min(shard_size, o.solve_batch or default_solve_batch(shape)),
    )
    root = Path(out)
    _check_disk_space(root, n * 2 * math.prod(shape) * 4)

    dinfo = distributed.info()
    rank = dinfo.rank if rank is None else int(rank)
    world_size = dinfo.world_size if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, world_size), got rank {rank}, world_size {world_size}")
    if world_size > 1:
        return _generate_sharded(model, source, root, settings, provenance, rank, world_size, device, method, steps, rtol, atol, progress)
    def make(s: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        z0, z1, nfe = _make_shard(model, source, settings, s, device, method, steps, rtol, atol)
        return {"z0": z0, "z1": z1}, {"nfe": nfe}

    def finish(man: dict[str, Any], made: int, elapsed: float) -> dict[str, Any]:
        return {
            "nfe_mean": sum(e["nfe"] * e["n"] for e in man["shards"]) / n,
            "nfe_max": max(e["nfe"] for e in man["shards"]),
            "last_session_pairs_per_s": made / elapsed if elapsed > 0 else None,
            "device": str(device),
            "torch": torch.__version__,
        }

    _shards.write_shards(root, PAIR_STORE, settings, make, provenance=provenance, progress=progress, on_shard=on_shard, finish=finish)
    return PairStore(root, verify=False)  # every shard was hashed when written or when the store was reopened


def _model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights (else buffers) are; the CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


SOLVE_ELEMENTS = 1 << 22  # default bound on the numbers in one solve batch (pairs x dimension)


def default_solve_batch(shape: tuple[int, ...]) -> int:
    """Pairs solved together by default: 2^22 numbers (1,365 CIFAR-10 images of 3x32x32, about
    9 GiB of activations for the 35.7M UNet in fp32; every 2-D shard whole)."""
    return max(1, SOLVE_ELEMENTS // math.prod(shape))


def _make_shard(model: nn.Module, source: Any, settings: PairSettings, s: int, device, method: str, steps: int | None, rtol: float, atol: float) -> tuple[Tensor, Tensor, int]:
    """Shard s: Z0 from step_generator(seed, s), Z1 = Flow(Z0); a function of (settings, s) alone."""
    z0 = source.sample(settings.shard_count(s), generator=step_generator(settings.seed, s), device="cpu").float()
    if tuple(z0.shape[1:]) != settings.shape:
        raise DataError(f"the source drew samples of shape {list(z0.shape[1:])}, expected {list(settings.shape)}")
    parts, nfe = [], 0.0
    for chunk in z0.split(settings.solve_batch):  # memory-bounded solves (settings.solve_batch is part of the content)
        res = sample(model, chunk.to(device), spec_label(method, steps), rtol=rtol, atol=atol)
        parts.append(res.x.float().cpu())
        nfe += res.nfe * chunk.shape[0]
    z1 = torch.cat(parts)
    if not torch.isfinite(z1).all():
        raise FloatingPointError(f"the flow produced NaN/inf in shard {s}; nothing of it was stored")
    mean = nfe / z0.shape[0]
    return z0, z1, int(mean) if mean == int(mean) else mean


def _generate_sharded(model, source, root: Path, settings: PairSettings, provenance, rank: int, world: int, device, method, steps, rtol, atol, progress) -> PairStore:
    """torchrun pair generation: rank 0 opens the store; every rank writes its own shards (each with
    a side file holding its NFE); rank 0 then hashes them in order and completes the manifest."""
    if rank == 0:
        man = _open_for_writing(root, settings, provenance)
    distributed.barrier()
    if rank != 0:
        old, man = _read_manifest(root)
        diff = _settings_diff(old, settings)
        if diff:
            raise ConfigError(f"{root} holds pairs with other settings (differs in {', '.join(diff)})")
    done = len(man["shards"])
    mine = [s for s in distributed.rank_shards(settings.n_shards, rank, world) if s >= done]
    bar = tqdm(total=sum(settings.shard_count(s) for s in mine), disable=not progress or None, desc=f"pairs (rank {rank})", unit="pair", unit_scale=True, dynamic_ncols=True)
    try:
        for s in mine:
            path = root / shard_name(s)
            side = path.with_name(path.name + ".nfe.json")
            if path.is_file() and side.is_file():  # finished by an earlier, killed attempt (atomic writes)
                bar.update(settings.shard_count(s))
                continue
            z0, z1, nfe = _make_shard(model, source, settings, s, device, method, steps, rtol, atol)
            save_tensors(path, {"z0": z0, "z1": z1}, {"format": PAIRS_FORMAT})
            save_json(side, {"nfe": nfe})
            bar.update(settings.shard_count(s))
    finally:
        bar.close()
    distributed.barrier()
    if rank == 0 and not man["complete"]:
        for s in range(done, settings.n_shards):
            path = root / shard_name(s)
            side = path.with_name(path.name + ".nfe.json")
            nfe = json.loads(side.read_text())["nfe"]
            man["shards"].append({"file": path.name, "n": settings.shard_count(s), "bytes": path.stat().st_size, "sha256": sha256_file(path), "nfe": nfe})
        man["complete"] = True
        nfes = [e["nfe"] for e in man["shards"]]
        man["stats"] = {"nfe_mean": sum(e["nfe"] * e["n"] for e in man["shards"]) / settings.n_pairs, "nfe_max": max(nfes), "world_size": world, "torch": torch.__version__}
        save_json(root / MANIFEST, man)
        for s in range(settings.n_shards):
            (root / (shard_name(s) + ".nfe.json")).unlink(missing_ok=True)
    distributed.barrier()
    return PairStore(root, verify=False)


def _check_target(root: Path, settings: PairSettings) -> bool:
    """Refuse (ConfigError) a directory that holds pairs of other settings or something else,
    without writing anything; True when it holds a complete store of these settings."""
    return _shards.check_target(root, PAIR_STORE, settings)


def _open_for_writing(root: Path, settings: PairSettings, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """Create the store's manifest, or check that ``root`` holds a store of the same settings whose
    recorded shards are intact; returns the manifest (stale temporary files are removed)."""
    return _shards.open_for_writing(root, PAIR_STORE, settings, provenance)
