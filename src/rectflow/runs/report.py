"""`rectflow report`: one self-contained HTML page comparing run directories side by side.

Everything is embedded (PNG figures as data URIs, inline CSS, no scripts, no network), so the
page can be mailed or archived.  A run that lacks files, or comes from another version, is
reported with what is missing and the rest still renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rectflow.engine.io import atomic_path, check_writable, scan_jsonl
from rectflow.errors import DataError
from rectflow.runs.config import config_from_dict
from rectflow.runs.evaluation import format_reference
from rectflow.runs.machine import describe, machine_info
from rectflow.runs.plots import draw_floor, subplots

__all__ = ["RunSummary", "collect_run", "build_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.warn{color:#a15c00;background:#fff6e5;padding:4px 8px;margin:4px 0}
.grid{display:grid;gap:12px}.cell{border:1px solid #eee;padding:6px}.cell img{max-width:100%}
pre{background:#f7f7f7;padding:8px;font-size:0.8em;overflow:auto;max-height:300px}.muted{color:#777;font-size:0.85em}
"""


@dataclass
class RunSummary:
    """What the report knows of one run directory."""

    name: str
    path: Path
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None  # eval.json's "reference": what it was measured against, the finite-sample floor
    figures: dict[str, Path] = field(default_factory=dict)
    machine: dict[str, Any] | None = None
    extra_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path, problems: list[str], hint: str | None, kind: type = dict) -> Any:
    """The JSON value in ``path`` if it is a ``kind``; else None, with a line in ``problems``
    (a missing file only when ``hint`` says why it matters)."""
    if not path.is_file():
        if hint is not None:
            problems.append(f"missing {path.name} ({hint})")
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{path.name} is not UTF-8 text")
        return None
    except RecursionError:
        problems.append(f"{path.name} is unreadable: nested too deeply")
        return None
    except json.JSONDecodeError as e:
        problems.append(f"{path.name} is not valid JSON ({e})")
        return None
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror or e})")
        return None
    if not isinstance(value, kind):
        problems.append(f"{path.name} is not a JSON {'object' if kind is dict else 'list'} (found {type(value).__name__})")
        return None
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _good_metric(row: dict[str, Any]) -> bool:
    """A training-log row the charts can use: an integer step, and numbers where numbers belong."""
    step = row.get("step")
    return isinstance(step, int) and not isinstance(step, bool) and all(_is_number(row[k]) for k in ("loss", "loss_per_dim", "lr", "ms_per_step", "steps") if k in row)


def _good_eval_row(row: Any) -> bool:
    """An evaluation row of ``rectflow eval``: a solver name, an integer NFE, numbers for the metrics."""
    return (isinstance(row, dict) and isinstance(row.get("solver"), str) and isinstance(row.get("nfe"), int)
            and all(_is_number(row[k]) for k in ("w2", "energy", "sample_s") if k in row))


def _good_reference(ref: Any) -> bool:
    """eval.json's "reference" as :func:`~rectflow.runs.evaluation.evaluation_reference` writes it."""
    return isinstance(ref, dict) and isinstance(ref.get("against"), str) and all(_is_number(ref.get(k)) for k in ("floor_w2", "floor_energy"))


def _filtered(name: str, rows: list[Any], keep, problems: list[str], what: str) -> list[Any]:
    good = [r for r in rows if keep(r)]
    if len(good) < len(rows):
        problems.append(f"{name}: {len(rows) - len(good)} of {len(rows)} {what} have fields of the wrong type (left out)")
    return good


def collect_run(path: str | Path) -> RunSummary:
    """Gather config, metrics, evaluation, figures and machine of a run directory (never raises
    for missing or unreadable files: they are listed in ``problems``)."""
    path = Path(path)
    s = RunSummary(name=path.name or str(path), path=path)
    if not path.is_dir():
        s.problems.append(f"{path} is not a directory")
        return s
    s.config = _read_json(path / "config.json", s.problems, "not a rectflow run, or an unfinished one")
    if s.config is not None:
        try:
            config_from_dict(s.config)
        except Exception as e:  # a run from another version: show it, say why
            s.problems.append(f"config.json does not validate with this rectflow version: {e}")
    if (path / "metrics.jsonl").is_file():
        rows, unreadable = scan_jsonl(path / "metrics.jsonl")
        s.problems += [f"metrics.jsonl: {q}" for q in unreadable[:3]] + ([f"metrics.jsonl: {len(unreadable) - 3} more unreadable lines"] if len(unreadable) > 3 else [])
        s.metrics = _filtered("metrics.jsonl", rows, _good_metric, s.problems, "rows")
    else:
        s.problems.append("missing metrics.jsonl (no training log)")
    ev = _read_json(path / "eval.json", s.problems, "run `rectflow eval` on it")
    if ev is not None:
        rows = ev.get("rows", [])
        if isinstance(rows, list):
            s.eval_rows = _filtered("eval.json", rows, _good_eval_row, s.problems, "rows")
        else:
            s.problems.append(f"eval.json: 'rows' is not a list (found {type(rows).__name__})")
        ref = ev.get("reference")
        if _good_reference(ref):
            s.reference = ref
        elif ref is not None:
            s.problems.append("eval.json: 'reference' is not a description with numeric floor_w2 and floor_energy (left out)")
    s.machine = _read_json(path / "machine.json", s.problems, None)
    for extra in sorted(path.glob("*.table.json")):
        table = _read_json(extra, s.problems, None, kind=list)
        if table is not None:
            s.extra_tables[extra.name.removesuffix(".table.json")] = _filtered(extra.name, table, lambda r: isinstance(r, dict), s.problems, "rows")
    plots = path / "plots"
    if plots.is_dir():
        s.figures = {p.stem: p for p in sorted(plots.glob("*.png"))}
    if not s.figures:
        s.problems.append("no figures in plots/ (run `rectflow eval` or `rectflow train` to make them)")
    return s


def _img(src: Path | bytes, alt: str) -> str:
    data = src if isinstance(src, bytes) else src.read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(no rows)</p>'
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(c)}</th>' for i, c in enumerate(cols))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{fmt(r.get(c))}</td>' for i, c in enumerate(cols)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _loss_chart(runs: list[RunSummary]) -> bytes | None:
    series = [(r.name, [m["step"] for m in r.metrics if "loss" in m], [m["loss"] for m in r.metrics if "loss" in m]) for r in runs]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = subplots(figsize=(6, 3.5))
    for name, x, y in series:
        ax.plot(x, y, label=name, lw=1.2, marker="o" if len(x) < 5 else None)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _quality_chart(runs: list[RunSummary], metric: str = "w2") -> bytes | None:
    """Metric vs NFE, one line per run and solver family, with the finite-sample floor of each
    run's reference points (one line when the runs share it)."""
    fig, ax = subplots(figsize=(6, 3.5))
    drawn, floors = False, {}
    for r in runs:
        for family in dict.fromkeys(row["solver"].split(":")[0] for row in r.eval_rows if metric in row):
            pts = sorted((row["nfe"], row[metric]) for row in r.eval_rows if metric in row and row["solver"].split(":")[0] == family)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{r.name} ({family})")
            drawn = True
            if r.reference is not None and r.name not in floors:
                floors[r.name] = (r.reference[f"floor_{metric}"], line.get_color())
    if not drawn:
        return None
    if len({round(v, 9) for v, _ in floors.values()}) == 1:
        v = next(iter(floors.values()))[0]
        draw_floor(ax, v, f"finite-sample floor ({v:.3g})")
    else:
        for name, (v, color) in floors.items():
            draw_floor(ax, v, f"{name}: finite-sample floor ({v:.3g})", color=color)
    ax.set(xscale="log", xlabel="NFE", ylabel=metric.upper(), title=f"{metric.upper()} vs NFE (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def _timings(r: RunSummary) -> dict[str, Any]:
    timed = [m for m in r.metrics if "ms_per_step" in m and "step" in m]
    row: dict[str, Any] = {"run": r.name, "steps": r.metrics[-1].get("step") if r.metrics else None}
    if timed:
        row["median ms/step"] = statistics.median(m["ms_per_step"] for m in timed)
        steps = [0] + [m["step"] for m in timed]  # rows written before "steps" existed cover the gap to the previous row
        row["train time (s)"] = sum(m["ms_per_step"] * m.get("steps", b - a) for m, a, b in zip(timed, steps, steps[1:])) / 1e3
    if r.eval_rows:
        row["eval sampling (s)"] = sum(e.get("sample_s", 0.0) for e in r.eval_rows)
    if r.machine:
        row["machine"] = describe(r.machine)
    return row


def _renderable(r: RunSummary) -> bool:
    return bool(r.config or r.metrics or r.eval_rows or r.figures or r.extra_tables)


def build_report(run_dirs: list[str | Path | RunSummary], out: str | Path, title: str = "rectflow report") -> Path:
    """Write one self-contained HTML page comparing ``run_dirs`` (paths, or summaries from
    :func:`collect_run`); returns its path.  Unreadable files are listed on the page and the rest
    renders; :class:`DataError` when no run has anything to show."""
    check_writable(out)  # before reading every run
    runs = [p if isinstance(p, RunSummary) else collect_run(p) for p in run_dirs]
    if not any(_renderable(r) for r in runs):
        raise DataError("nothing to report: " + "; ".join(f"{r.name}: {r.problems[0] if r.problems else 'empty'}" for r in runs[:3]) + (" ..." if len(runs) > 3 else ""))
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="muted">runs: {", ".join(html.escape(r.name) for r in runs)} &middot; report made on {html.escape(describe(machine_info()))}</p>']
    for r in runs:
        for p in r.problems:
            parts.append(f'<div class="warn"><b>{html.escape(r.name)}</b>: {html.escape(p)}</div>')

    parts.append("<h2>Quality vs NFE</h2>")
    q = _quality_chart(runs)
    parts.append(_img(q, "quality vs NFE") if q else '<p class="muted">no evaluation tables to plot</p>')
    for r in runs:
        if r.eval_rows:
            parts.append(f"<h3>{html.escape(r.name)}</h3>" + _table(r.eval_rows, ["solver", "nfe", "w2", "energy", "sample_s"]))
            if r.reference is not None:
                parts.append(f'<p class="muted">{html.escape(format_reference(r.reference))}</p>')
        for name, rows in r.extra_tables.items():
            parts.append(f"<h3>{html.escape(r.name)}: {html.escape(name)}</h3>" + _table(rows))

    parts.append("<h2>Training</h2>")
    lc = _loss_chart(runs)
    parts.append(_img(lc, "loss curves") if lc else '<p class="muted">no training logs</p>')
    parts.append(_table([_timings(r) for r in runs]))

    names = list(dict.fromkeys(k for r in runs for k in r.figures))
    if names:
        parts.append("<h2>Figures, side by side</h2>")
        cols = len(runs)
        for fig_name in names:
            cells = []
            for r in runs:
                p = r.figures.get(fig_name)
                inner = _img(p, f"{r.name}: {fig_name}") if p else '<p class="muted">(not present)</p>'
                cells.append(f'<div class="cell"><div class="muted">{html.escape(r.name)}</div>{inner}</div>')
            parts.append(f"<h3>{html.escape(fig_name)}</h3><div class=\"grid\" style=\"grid-template-columns:repeat({cols},1fr)\">{''.join(cells)}</div>")

    parts.append("<h2>Configs</h2>")
    for r in runs:
        body = html.escape(json.dumps(r.config, indent=2)) if r.config is not None else "(no config.json)"
        parts.append(f"<details><summary>{html.escape(r.name)}</summary><pre>{body}</pre></details>")

    page = f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{"".join(parts)}</body></html>\n'
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
