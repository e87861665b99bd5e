"""The shared shell of the benchmark scripts: their common command-line options, result files (written atomically through
``rectflow.engine.io``) and the resumable rows of a long benchmark.

The scripts run as ``python benchmarks/NAME.py``: Python puts ``benchmarks/`` first on ``sys.path``, so they import this
module (and ``_machine``, ``_cifar10``, ...) by its bare name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from rectflow.engine.io import atomic_path, make_dirs, read_jsonl

__all__ = ["ROOT", "RESULTS", "bench_args", "write_results", "np_json", "resumable_rows", "append_rows", "write_rows"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
RESULTS = ROOT / "benchmarks" / "results"
"""Where the committed result files live (the default ``--out``)."""


def bench_args(description: str, name: str | None = None, *, out: Path = RESULTS, out_help: str = "output directory",
               threads: int | None = None, threads_help: str | None = None, report_only: str | None = None,
               formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> argparse.ArgumentParser:
    """An ArgumentParser with the options the benchmark scripts share, each only where asked for:

    ``--out`` (a Path, default ``out``: ``benchmarks/results``), ``--name`` (the output file stem; only when ``name`` is
    given, which is its default), ``--threads`` (an int; only when ``threads``, its default, is given) and
    ``--report-only`` (a switch; only when ``report_only``, its help text, is given).  The script adds its own options.
    ``threads_help`` replaces the plain "torch threads" help where a script has more to say."""
    ap = argparse.ArgumentParser(description=description, formatter_class=formatter_class)
    ap.add_argument("--out", type=Path, default=out, help=out_help)
    if name is not None:
        ap.add_argument("--name", default=name, help="output file stem (default %(default)s)")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help=threads_help or "torch threads (default %(default)s)")
    if report_only is not None:
        ap.add_argument("--report-only", action="store_true", help=report_only)
    return ap


def write_results(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``out_dir/name.json`` (``payload``, indent 1, numpy and other numbers as floats) and ``out_dir/name.md``
    (``markdown``), each atomically: a reader never sees half a file.  Returns both paths."""
    js, md = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    for path, text in ((js, json.dumps(payload, indent=1, default=float) + "\n"), (md, markdown.rstrip() + "\n")):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return js, md


def np_json(v: Any) -> Any:
    """numpy scalars -> Python numbers, inside dicts, lists and tuples too (for json.dumps)."""
    if isinstance(v, dict):
        return {k: np_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [np_json(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def resumable_rows(out_dir: Path, name: str, *, from_committed: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """The partial JSONL of a resumable benchmark (``out_dir``/tmp/``name``_partial.jsonl, its folder created) and its rows.

    With ``from_committed``, on a fresh clone, where only the committed ``name``.json exists, the partial file is seeded
    from that file's rows, so a rerun continues the committed table instead of starting over."""
    partial = Path(out_dir) / "tmp" / f"{name}_partial.jsonl"
    make_dirs(partial.parent)
    committed = Path(out_dir) / f"{name}.json"
    if from_committed and not partial.is_file() and committed.is_file():
        write_rows(partial, json.loads(committed.read_text())["rows"])
    return partial, read_jsonl(partial)


def append_rows(partial: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to a JSONL file, one JSON object a line, in one write (a finished unit of rows lands together).
    A torn last line (a kill mid-write, skipped by :func:`resumable_rows`) is first ended, so the new rows stay readable."""
    torn = False
    if Path(partial).is_file() and Path(partial).stat().st_size:
        with open(partial, "rb") as fh:
            fh.seek(-1, 2)
            torn = fh.read(1) != b"\n"
    with open(partial, "a") as fh:
        fh.write(("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in rows))


def write_rows(partial: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSONL file by ``rows``, atomically."""
    with atomic_path(partial) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def mean_each(values: list[float], digits: int = 3, unit: str = "") -> str:
    """``1.234 (1.200 / 1.268)``: the mean over seeds, then each seed's value (alone when there is one seed)."""
    each = " / ".join(f"{v:.{digits}f}{unit}" for v in values)
    return f"{np.mean(values):.{digits}f}{unit}" + (f" ({each})" if len(values) > 1 else "")


def ratios(r: list[float], digits: int = 2) -> str:
    """``1.23x (1.20x / 1.26x)``: the mean of per-seed ratios, then each seed's."""
    return mean_each(r, digits, "x")
