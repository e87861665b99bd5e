import json
import shutil

import pytest

from rectflow.cli import main
from rectflow.runs import plots, report
from rectflow.runs.demo import run_pipeline, task_config
from rectflow.runs.evaluation import evaluate_run
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.report import build_report, collect_run

TINY = ["model.width=32", "model.depth=2", "train.steps=40", "train.ckpt_every=20", "train.log_every=10", "eval.n_samples=200", "eval.solvers=[euler:1,euler:4]"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    for name, target in (("moons", "moons"), ("circle", "circle")):
        assert main(["train", "--run", str(root / name), "--quiet", f"target={target}", *TINY]) == 0
    return root


def test_report_embeds_everything(two_runs, tmp_path):
    out = build_report([two_runs / "moons", two_runs / "circle"], tmp_path / "r.html")
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 2 + 2 * 3  # quality + loss charts, 3 figures per run
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for token in ("euler:4", "Quality vs NFE", "moons", "circle", "median ms/step"):
        assert token in page


def test_report_survives_missing_and_foreign_files(two_runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(two_runs / "moons", broken)
    (broken / "eval.json").unlink()
    shutil.rmtree(broken / "plots")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["future_section"] = {"x": 1}  # a run from another version
    (broken / "config.json").write_text(json.dumps(cfg))
    s = collect_run(broken)
    assert any("eval.json" in p for p in s.problems)
    assert any("no figures" in p for p in s.problems)
    assert any("does not validate" in p for p in s.problems)
    page = build_report([broken, two_runs / "circle", tmp_path / "nope"], tmp_path / "r.html").read_text()
    assert "missing eval.json" in page and "is not a directory" in page
    assert "data:image/png;base64," in page  # the rest still renders


def test_report_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(two_runs / "moons"), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_report_lists_corrupt_files_and_renders_the_rest(two_runs, tmp_path, capsys):
    """issue 13 item 11: a corrupt machine.json or metrics.jsonl, or eval.json rows of the wrong
    type, used to stop the report with a traceback or an error naming no file."""
    bad = tmp_path / "bad"
    shutil.copytree(two_runs / "moons", bad)
    (bad / "machine.json").write_bytes(b"")
    with open(bad / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\n7\n{\"step\": \"ten\", \"loss\": \"low\"}\n")
    ev = json.loads((bad / "eval.json").read_text())
    ev["rows"] += [5, {"solver": 3, "nfe": "many", "w2": "x"}]
    (bad / "eval.json").write_text(json.dumps(ev))
    (bad / "extra.table.json").write_bytes(b'{"not": "a list of rows"}')
    worse = tmp_path / "worse"
    shutil.copytree(two_runs / "circle", worse)
    (worse / "machine.json").write_bytes(b"\xff\x00")
    (worse / "eval.json").write_text(json.dumps({"rows": "euler:1"}))
    (worse / "config.json").write_text("[1, 2]")
    s = collect_run(bad)
    text = " | ".join(s.problems)
    for token in ("machine.json", "metrics.jsonl: line", "not a JSON object", "eval.json", "extra.table.json"):
        assert token in text, (token, text)
    assert s.metrics and all(isinstance(m["step"], int) for m in s.metrics)  # the good rows are kept
    assert s.eval_rows and all(isinstance(r["nfe"], int) for r in s.eval_rows)
    out = tmp_path / "r.html"
    assert main(["report", str(bad), str(worse), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    page = out.read_text()
    assert "Traceback" not in captured.err and "machine.json" in page and "config.json" in page
    assert "data:image/png;base64," in page and "euler:4" in page  # the rest renders
    assert "machine.json" in captured.err  # and the listing is shown, not only in the page


def test_report_with_nothing_to_render_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["report", str(tmp_path / "nope"), str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def recording(make, figures):
    """``make`` (a figure factory or saver) that also keeps every figure it sees in ``figures``."""
    def wrapped(*args, **kwargs):
        out = make(*args, **kwargs)
        figures.append(out[0] if isinstance(out, tuple) else args[0])
        return out
    return wrapped


def lines_of(figures, title):
    return [line.get_label() for fig in figures for ax in fig.axes if title in ax.get_title() for line in ax.get_lines()]


@pytest.mark.slow
def test_report_of_a_demo_chain_shows_every_stage_and_the_floor(tmp_path, monkeypatch):
    """Issue 16 trap 8, on a tiny demo-like chain (1-RF evaluated, then the pipeline): the report
    draws quality vs NFE for all three stages, the one-step map gets no t-coloured trajectories,
    and the W2-vs-NFE charts have the finite-sample floor."""
    pipeline_figs, report_figs = [], []
    monkeypatch.setattr(plots, "save_figure", recording(plots.save_figure, pipeline_figs))
    base = tmp_path / "moons"
    train_run(task_config("gaussian", "moons", steps=30, n_eval=100, progress=False), base)
    evaluate_run(load_run(base))
    first_eval = json.loads((base / "eval.json").read_text())
    res = run_pipeline(tmp_path, target="moons", base_run=base, steps=30, n_pairs=200, n_eval=100, progress=False, echo=lambda s: None)
    runs = [str(r) for r in res["runs"]]
    assert [p.rsplit("/", 1)[-1] for p in runs] == ["moons", "moons-2rf", "moons-2rf-distill"]
    assert set(res["timings"]) == {"2-RF", "distill", "diagnostics"}  # the given 1-RF was trained before: no 0 s "1-RF" time
    assert any("floor" in label for label in lines_of(pipeline_figs, "W2 vs NFE"))  # pipeline/quality_vs_nfe.png

    summaries = [collect_run(r) for r in runs]
    for s in summaries:
        assert s.eval_rows and not any("eval.json" in p for p in s.problems), (s.name, s.problems)
        assert s.reference and s.reference["floor_w2"] > 0
    assert json.loads((base / "eval.json").read_text()) == first_eval  # the 1-RF keeps its own evaluation
    assert [r["solver"] for r in summaries[2].eval_rows] == ["euler:1"]
    w2 = {s.name: {r["solver"]: r["w2"] for r in s.eval_rows} for s in summaries}
    rows = {r["stage"]: r for r in res["rows"]}
    assert w2["moons-2rf"]["euler:8"] == pytest.approx(rows["2-RF"]["w2@euler:8"])  # the numbers the table printed

    distilled = tmp_path / "moons-2rf-distill" / "plots"
    assert (distilled / "map.png").is_file() and not (distilled / "trajectories.png").exists()

    monkeypatch.setattr(report, "subplots", recording(report.subplots, report_figs))
    page = build_report(summaries, tmp_path / "r.html").read_text()
    labels = lines_of(report_figs, "W2 vs NFE")
    for name in ("moons", "moons-2rf", "moons-2rf-distill"):
        assert any(label.startswith(f"{name} (") for label in labels), (name, labels)
    assert any("floor" in label for label in labels)
    assert "finite-sample floor" in page and "missing eval.json" not in page
