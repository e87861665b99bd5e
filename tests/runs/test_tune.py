"""rectflow tune: the candidates are timed through the real trainer and the winner's settings load as a second config."""

import json

import yaml

from rectflow.cli import main
from rectflow.runs.config import load_config
from rectflow.runs.tune import Candidate, candidates, render_table, tune, write_overrides

TINY = ["source=gaussian", "target=moons", "model.width=8", "model.depth=2", "train.batch_size=16", "train.device=cpu"]


def test_candidates_cover_precision_layout_compile_and_threads():
    got = candidates(True, compile=True, threads=[1, 2])
    assert len(got) == 2 * 2 * 2 * 2 and Candidate("bf16", True, True, 2) in got
    assert {c.channels_last for c in candidates(False, compile=False, threads=[1])} == {False}  # vectors have no memory format


def test_tune_times_every_candidate_and_writes_the_winner(tmp_path):
    cfg = load_config(None, TINY)
    result = tune(cfg, seconds=0.01, steps=1, warmup=1, threads=[1])
    assert result["rounds"] >= 1 and {r["precision"] for r in result["rows"]} == {"fp32", "bf16"}
    assert all(r["s_per_step"] > 0 for r in result["rows"]) and result["winner"] == result["rows"][0]
    assert "| settings | ms / step |" in render_table(result)
    path = write_overrides(tmp_path / "tuned.yaml", result)
    assert yaml.safe_load(path.read_text())["train"]["precision"] == result["winner"]["precision"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"precision": "fp32", "lr": 0.002}}))
    both = load_config([tmp_path / "base.yaml", path])  # the later file wins key by key, the rest of the first stays
    assert both.train.precision == result["winner"]["precision"] and both.train.lr == 0.002


def test_cli_tune_prints_the_table_and_the_overrides(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"source": "gaussian", "target": "moons", "model": {"width": 8, "depth": 2},
                                                     "train": {"batch_size": 16, "device": "cpu"}}))
    assert main(["tune", str(tmp_path / "c.yaml"), "--seconds", "0.01", "--steps", "1", "--threads", "1", "--write", str(tmp_path / "t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fastest:" in out and "train.precision=" in out and "precision auto picks" in out
    assert (tmp_path / "t.yaml").is_file()
    assert main(["train", "--run", str(tmp_path / "r"), "-c", str(tmp_path / "c.yaml"), "-c", str(tmp_path / "t.yaml"), "train.steps=2",
                 "--no-eval", "-q"]) == 0
    rec = json.loads((tmp_path / "r" / "config.json").read_text())
    assert rec["train"]["precision"] == yaml.safe_load((tmp_path / "t.yaml").read_text())["train"]["precision"]


def test_a_later_config_file_replaces_a_distribution_spec_whole(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"target": {"name": "moons", "noise": 0.05}, "train": {"lr": 0.002}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"target": {"name": "circle"}, "train": {"steps": 7}}))
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert cfg.target == {"name": "circle"} and cfg.train.lr == 0.002 and cfg.train.steps == 7  # sections merge, specs do not
