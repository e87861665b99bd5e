"""The reflow command line: pairs, reflow (a chain in one command), distill, diagnose, pipeline,
and one-line errors on bad input."""

import json

import pytest

from rectflow.cli import main
from rectflow.runs.experiment import load_run

TINY = ["model.width=32", "model.depth=2", "train.steps=60", "train.ckpt_every=30", "train.log_every=10", "eval.n_samples=200", "eval.solvers=[euler:1,euler:4]"]
PAIR_ARGS = ["--solver", "euler:8", "--shard-size", "128", "--device", "cpu"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "moons"
    assert main(["train", "--run", str(run), "--quiet", "--no-eval", *TINY]) == 0
    return run


def test_chain_distill_and_diagnose(base, capsys):
    code, out, err = run_cli(["pairs", base, "--n", 300, "--quiet", *PAIR_ARGS], capsys)
    assert code == 0, err
    assert "300 pairs in" in out and "euler:8" in out and "mean NFE 8.0" in out
    store = base / "pairs" / "euler8-n300-seed0"
    assert json.loads((store / "manifest.json").read_text())["complete"]

    code, out, err = run_cli(["reflow", base, "--pairs", 300, "--stages", 2, "--steps", 20, "--quiet", *PAIR_ARGS], capsys)
    assert code == 0, err
    two, three = base.parent / "moons-2rf", base.parent / "moons-3rf"
    assert f"runs saved in {two}, {three}" in out and out.count("| euler:1 |") == 2
    assert load_run(three).config.reflow.parent == str(two.resolve()) and load_run(three).config.reflow.stage == 3
    assert (two / "pairs" / "euler8-n300-seed0" / "manifest.json").is_file() and (three / "plots" / "samples.png").is_file()

    code, out, err = run_cli(["distill", two, "--pairs", 300, "--steps", 10, "--quiet", "train.lr=0.0001", *PAIR_ARGS], capsys)
    assert code == 0, err
    d = base.parent / "moons-2rf-distill"
    assert f"run saved in {d}" in out and load_run(d).config.reflow.distill and load_run(d).config.train.lr == 1e-4

    code, out, err = run_cli(["distill", base, "--random", "--steps", 10, "--quiet", "--no-eval", "--init", "scratch"], capsys)
    assert code == 0, err and (base.parent / "moons-distill-independent").is_dir()

    code, out, err = run_cli(["eval", three, "--solvers", "euler:1,euler:2", "--n", 100, "--json"], capsys)
    assert code == 0 and [r["nfe"] for r in json.loads(out)["rows"]] == [1, 2]

    diag = base.parent / "diag"
    code, out, err = run_cli(["diagnose", base, two, three, d, "--n", 150, "--solvers", "euler:1,euler:4", "--out", diag], capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["stage", "independent", "1-RF", "2-RF", "3-RF", "2-RF+distill"]
    for name in ("table.md", "rows.json", "quality_vs_nfe.png", "stages.png", "crossings_2_rf.png"):
        assert (diag / name).is_file(), name


@pytest.mark.slow
def test_pipeline_command(tmp_path, capsys):
    args = ["pipeline", "--out", tmp_path, "--steps", 40, "--pairs", 256, "--pair-solver", "euler:8", "--n-eval", 150, "--distill-steps", 10, "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    header = next(ln for ln in out.splitlines() if ln.startswith("| stage"))
    for col in ("W2 euler:1", "W2 euler:2", "W2 euler:4", "W2 euler:8", "W2 euler:100", "W2 dopri5", "| S |", "cost", "crossing p"):
        assert col in header, col
    stages = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    assert stages == ["independent", "1-RF", "2-RF", "2-RF+distill"]
    pdir = tmp_path / "pipeline"
    rows = json.loads((pdir / "rows.json").read_text())
    assert len(rows["rows"]) == 4 and set(rows["timings_s"]) == {"1-RF", "2-RF", "distill", "diagnostics"}
    assert any("pairs_per_s" in json.dumps(v) for v in rows["pair_stores"].values())
    for name in ("table.md", "quality_vs_nfe.png", "stages.png", "crossings_1_rf.png", "crossings_2_rf.png", "crossings_independent.png"):
        assert (pdir / name).is_file(), name


@pytest.mark.parametrize(
    "args, msg",
    [
        (["reflow", "{run}", "--pairs", "0"], "--pairs must be >= 1"),
        (["reflow", "{run}", "--pairs", "10", "--stages", "0"], "--stages must be >= 1"),
        (["reflow", "{run}", "--pairs", "10", "--stages", "2", "--out", "{tmp}/x"], "use --prefix"),
        (["reflow", "{run}", "--pairs", "10", "--solver", "euler:0"], "must be >= 1"),
        (["reflow", "{tmp}/missing", "--pairs", "10"], "no such run directory"),
        (["reflow", "{run}", "--pairs", "10", "--pairs-dir", "{tmp}/nostore", "--out", "{tmp}/x"], "not a pair store"),
        (["pairs", "{run}", "--n", "0"], "must be >= 1"),
        (["pairs", "{run}", "--n", "10", "--out", "{tmp}/full"], "not empty"),
        (["pairs", "{run}", "--n", "10", "--out", "{tmp}/store", "--pair-seed", "9", *PAIR_ARGS], "other settings (differs in seed)"),
        (["distill", "{tmp}/distilled", "--pairs", "10"], "already a distillation run"),
        (["reflow", "{tmp}/distilled", "--pairs", "10"], "is a distillation run"),
        (["reflow", "{run}", "--pairs", "10", "train.stpes=3", "--out", "{tmp}/x"], "unknown config key 'train.stpes'"),
        (["reflow", "{run}", "--pairs", "10", "--out", "{tmp}/distilled"], "holds a run with another config"),
        (["pipeline", "--out", "{tmp}/p", "--pairs", "0"], "--pairs must be >= 1"),
        (["diagnose", "{run}", "--solvers", "rk9:2"], "unknown sampler"),
    ],
)
def test_bad_input_is_one_clear_line(args, msg, base, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.txt").write_text("keep me")
    assert main(["pairs", str(base), "--n", "10", "--out", str(tmp_path / "store"), "--quiet", *PAIR_ARGS]) == 0
    assert main(["distill", str(base), "--random", "--steps", "2", "--quiet", "--no-eval", "--out", str(tmp_path / "distilled")]) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    base_before = sorted(p.name for p in base.rglob("*"))
    code, _, err = run_cli([a.format(run=base, tmp=tmp_path) if isinstance(a, str) else a for a in args], capsys)
    assert code == 2, err
    assert msg in err and err.count("\n") == 1 and err.startswith("rectflow ")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written or overwritten
    assert sorted(p.name for p in base.rglob("*")) == base_before
    assert not (tmp_path / "x").exists()


def test_recipe_fills_what_the_user_did_not_say(tmp_path, capsys, monkeypatch):
    """--recipe 2d (issue 16, trap 3): the measured teacher settings go under the config file and
    the overrides; reflow and distill take the recipe's steps, pairs and loss unless given."""
    from rectflow import cli
    from rectflow.runs.recipes import RECIPES

    r = RECIPES["2d"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  batch_size: 64\n")
    run = tmp_path / "teacher"
    code, _, err = run_cli(["train", "--recipe", "2d", "--config", cfg_file, "--run", run, "--quiet", "--no-eval", *TINY, "train.steps=20"], capsys)
    assert code == 0, err
    c = load_run(run).config
    assert (c.train.lr, c.train.lr_schedule, c.train.warmup_steps, c.coupling.kind) == (r.train["lr"], "cosine", 200, "ot")
    assert c.train.batch_size == 64 and c.train.steps == 20  # the file and the overrides win

    seen = {}
    monkeypatch.setattr(cli, "reflow_chain", lambda run, stages, **kw: seen.setdefault("reflow", kw) and [])
    monkeypatch.setattr(cli, "train_distill", lambda run, out, **kw: seen.setdefault("distill", kw) and tmp_path)
    assert run_cli(["reflow", run, "--recipe", "2d", "--no-eval"], capsys)[0] == 0
    assert (seen["reflow"]["n_pairs"], seen["reflow"]["steps"]) == (r.n_pairs, r.reflow_steps)
    assert run_cli(["distill", run, "--pairs", 50, "--recipe", "2d", "--no-eval"], capsys)[0] == 0
    assert (seen["distill"]["steps"], seen["distill"]["loss"], seen["distill"]["huber_c"]) == (r.distill_steps, "pseudo_huber", r.huber_c)
    seen.clear()
    assert run_cli(["distill", run, "--pairs", 50, "--recipe", "2d", "--steps", 7, "--loss", "l2", "--no-eval"], capsys)[0] == 0
    assert (seen["distill"]["steps"], seen["distill"]["loss"], seen["distill"]["huber_c"]) == (7, "l2", 0.0)  # no Huber scale for L2
    seen.clear()
    assert run_cli(["distill", run, "--pairs", 50, "--no-eval"], capsys)[0] == 0  # no recipe: the generic defaults
    assert (seen["distill"]["steps"], seen["distill"]["loss"], seen["distill"]["huber_c"]) == (None, "l2", 0.0)
