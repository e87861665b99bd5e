import json
import shutil

import pytest

from rectflow.cli import main
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
