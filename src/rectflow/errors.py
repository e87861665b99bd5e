"""Exceptions with one-line, user-facing messages (the CLI prints them and exits non-zero)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RectflowError(Exception):
    """Base class of every error rectflow raises on bad input."""


class ConfigError(RectflowError, ValueError):
    """An invalid configuration: unknown key, wrong type or value out of range."""


class DataError(RectflowError, ValueError):
    """Unusable data: empty or unreadable file, NaN/inf, wrong shape, dimension mismatch."""


class CheckpointError(RectflowError):
    """A missing, corrupt or incompatible checkpoint or run directory."""


class BusyError(RectflowError):
    """A run directory or pair store is in use by another process (its lock is held)."""


class OutputError(RectflowError):
    """An output path that cannot be written: a file where a directory is needed (or the reverse),
    no permission, a full disk.  The message names the path."""


def check_int(value: object, name: str, low: int = 1, *, note: str = "") -> int:
    """``value`` if it is an integer (not a bool) >= ``low``; else ConfigError "``name`` must be an integer >= low``note``,
    got ...": the library's one integer-argument check."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}{note}, got {value!r}")
    return value


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float if it is a number in [0, 1] (a probability or a share); else ConfigError "``name`` must
    lie in [0, 1], got ...": the library's one check of probabilities (NaN, strings and other non-numbers fail it too)."""
    if isinstance(value, (str, bytes, bool)):
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")
    return p


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Any failure inside becomes one :class:`DataError` line naming ``path`` (a library error passes unchanged):
    readers such as numpy raise many kinds on a corrupt file."""
    try:
        yield
    except RectflowError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else "corrupt"
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {first})") from None
