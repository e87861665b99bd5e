"""The run-directory guard: a directory holds one job, and a job never overwrites another's.

Every job that writes into a directory (training runs, reflow and distillation stages, PeRFlow)
keeps a JSON record of what it is (``config.json``, ``perflow.json``) and calls
:func:`guard_run_dir` before writing anything: the same record resumes, another one is refused
with the keys that differ.  Only settings that do not change the result (step budget, logging,
checkpoint cadence, device) may change between a job and its resumption.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from rectflow.engine.checkpoint import describe_diff
from rectflow.engine.io import LOCK_FILE, check_writable, exclusive_lock, load_json, remove_stale_temporaries
from rectflow.errors import ConfigError

__all__ = ["RESUMABLE_TRAIN_KEYS", "semantic_config", "semantic_train", "guard_run_dir", "lock_run_dir", "open_job"]

RESUMABLE_TRAIN_KEYS = frozenset({"steps", "progress", "log_every", "ckpt_every", "keep_checkpoints", "workers", "device", "sample_every", "threads"})
"""``train`` keys that may change between a run and its resumption (they do not change the result)."""


def semantic_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of an experiment config dict that defines the result: no ``eval`` section and no
    :data:`RESUMABLE_TRAIN_KEYS`."""
    d = {k: v for k, v in cfg_dict.items() if k != "eval"}
    d["train"] = semantic_train(d.get("train", {}))
    return d


def semantic_train(train: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` keys that define the result: all but :data:`RESUMABLE_TRAIN_KEYS`, except that ``steps`` stays when
    the learning rate follows a cosine schedule, whose shape it sets (a 200-step cosine run resumed with 400 steps would
    jump back to a high lr and end unlike any 400-step run)."""
    keep = RESUMABLE_TRAIN_KEYS - ({"steps"} if train.get("lr_schedule") == "cosine" else set())
    return {k: v for k, v in train.items() if k not in keep}


def guard_run_dir(
    run_dir: str | Path,
    record_name: str,
    record: dict[str, Any],
    *,
    what: str = "run",
    normalise: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
    foreign_ok: bool = True,
) -> bool:
    """Check that ``run_dir`` may hold the job described by ``record`` before anything is written.

    Returns True when ``run_dir/record_name`` holds the same job (a resumption), False when the
    directory holds no job of this kind.  Raises ConfigError (naming the directory and the keys
    that differ) when it holds another job, or, with ``foreign_ok=False``, when it is a non-empty
    directory that is not a job of this kind; OutputError when ``run_dir`` is a file or cannot be
    created or written (:func:`~rectflow.engine.io.check_writable`).
    """
    run_dir = check_writable(run_dir, directory=True)
    path = run_dir / record_name
    if path.exists():
        old, new = normalise(load_json(path)), normalise(record)
        if old != new:
            raise ConfigError(f"{run_dir} holds a {what} with another config (differs in {describe_diff(old, new)}); "
                              "use a new directory, or ask for the values it holds to resume it")
        return True
    if not foreign_ok and run_dir.is_dir() and any(q.name != LOCK_FILE for q in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not a {what} directory (no {record_name}); choose a new directory")
    return False


def lock_run_dir(run_dir: str | Path, what: str = "run directory") -> contextlib.AbstractContextManager:
    """The job's exclusive lock on ``run_dir`` (:func:`~rectflow.engine.io.exclusive_lock`), taken
    by rank 0 only: the other torchrun ranks of the same job share it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return exclusive_lock(run_dir, what)


@contextlib.contextmanager
def open_job(run_dir: str | Path, record_name: str, record: dict[str, Any], *, what: str = "run",
             normalise: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d, foreign_ok: bool = True,
             temporaries: tuple[str, ...] = ()) -> Iterator[bool]:
    """The one skeleton of every job that writes into a directory (training runs and their reflow / distillation children,
    both PeRFlow jobs): check that ``run_dir`` may hold the job (:func:`guard_run_dir`, read-only, so a refused directory is
    left as it was), take its lock (:func:`lock_run_dir`), check again (another process may have started meanwhile), and
    remove the temporaries a kill left mid-write in ``run_dir`` and its ``temporaries`` subfolders.  Yields whether
    ``run_dir`` already holds this job (a resumption); writing the record and doing the work is the block's."""
    guard_run_dir(run_dir, record_name, record, what=what, normalise=normalise, foreign_ok=foreign_ok)
    with lock_run_dir(run_dir, f"{what} directory"):
        resumed = guard_run_dir(run_dir, record_name, record, what=what, normalise=normalise, foreign_ok=foreign_ok)
        run_dir = Path(run_dir)
        remove_stale_temporaries(run_dir, *(run_dir / t for t in temporaries))
        yield resumed
