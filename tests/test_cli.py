import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rectflow.cli import main
from rectflow.runs.experiment import load_run

TINY = ["model.width=32", "model.depth=2", "train.steps=60", "train.ckpt_every=20", "train.log_every=10", "eval.n_samples=300", "eval.solvers=[euler:1,euler:4,dopri5]"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "moons"
    assert main(["train", "--run", str(run), "--quiet", *TINY]) == 0
    return run


def test_train_writes_a_complete_run(trained):
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.md", "plots/loss.png", "plots/samples.png", "plots/trajectories.png"):
        assert (trained / name).is_file(), name
    assert [p.name for p in sorted((trained / "checkpoints").iterdir())] == ["step_00000040.safetensors", "step_00000060.safetensors"]
    rows = json.loads((trained / "eval.json").read_text())["rows"]
    assert [r["solver"] for r in rows] == ["euler:1", "euler:4", "dopri5"] and rows[2]["nfe"] > 6


def test_sample_and_eval(trained, tmp_path, capsys):
    out, traj = tmp_path / "s.npy", tmp_path / "traj.npy"
    code, stdout, _ = run_cli(["sample", trained, "--n", 50, "--steps", 4, "--out", out, "--trajectory", traj], capsys)
    assert code == 0 and "NFE 4" in stdout
    assert np.load(out).shape == (50, 2) and np.load(traj).shape == (5, 50, 2)
    code, stdout, _ = run_cli(["eval", trained, "--solvers", "euler:2,heun:2", "--n", 200, "--json"], capsys)
    rows = json.loads(stdout)["rows"]
    assert code == 0 and [(r["solver"], r["nfe"]) for r in rows] == [("euler:2", 2), ("heun:2", 4)]


def test_same_seed_same_samples(trained, tmp_path, capsys):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    run_cli(["sample", trained, "--n", 20, "--seed", 3, "--out", a], capsys)
    run_cli(["sample", trained, "--n", 20, "--seed", 3, "--out", b], capsys)
    assert np.array_equal(np.load(a), np.load(b))


@pytest.mark.parametrize(
    "args, msg",
    [
        (["sample", "{run}", "--steps", "0", "--out", "{tmp}/x.npy"], "steps (NFE) must be >= 1"),
        (["sample", "{run}", "--solver", "dopri5", "--rtol", "0", "--out", "{tmp}/x.npy"], "rtol must be > 0"),
        (["sample", "{tmp}/missing", "--out", "{tmp}/x.npy"], "no such run directory"),
        (["eval", "{run}", "--solvers", "euler:0"], "must be >= 1"),
        (["train", "--run", "{tmp}/r", "train.stpes=3"], "unknown config key 'train.stpes'"),
        (["train", "--run", "{tmp}/r", "source={tmp}/three.npy"], "dimension 3 but target has dimension 2"),
        (["train", "--run", "{tmp}/r", "target={tmp}/nan.npy"], "NaN"),
        (["train", "--run", "{tmp}/r", "target={tmp}/empty.csv"], "empty"),
        (["train", "--run", "{tmp}/r", "target={tmp}/junk.npy"], "cannot read"),
        (["train", "--run", "{run}", "model.width=16"], "another config"),
    ],
)
def test_bad_input_is_one_clear_line(args, msg, trained, tmp_path, capsys):
    np.save(tmp_path / "three.npy", np.zeros((10, 3)))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, 1.0]]))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    before = sorted(p.name for p in trained.rglob("*"))
    code, _, err = run_cli([a.format(run=trained, tmp=tmp_path) for a in args], capsys)
    assert code == 2
    assert msg in err and err.count("\n") == 1 and err.startswith("rectflow ")
    assert not (tmp_path / "x.npy").exists()
    assert sorted(p.name for p in trained.rglob("*")) == before  # nothing written into the run
    assert not list(tmp_path.rglob("*.tmp"))


def test_checkpoint_from_another_config_is_refused(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"]["width"] = 64
    (copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["sample", copy, "--out", tmp_path / "y.npy"], capsys)
    assert code == 2 and "does not match" in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "eval", "demo"):
        assert cmd in out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """A run killed with SIGKILL mid-training and started again ends with the same weights."""
    args = ["model.width=64", "train.steps=1500", "train.ckpt_every=100", "train.log_every=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rectflow.cli", "train", "--quiet", "--no-eval"]
    subprocess.run([*cmd, "--run", str(tmp_path / "a"), *args], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--run", str(tmp_path / "b"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckdir.is_dir() and any(p.name >= "step_00000300" for p in ckdir.glob("step_*.safetensors"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(ckdir.glob("step_*.safetensors"))
    assert done and done[-1].name < "step_00001500"  # really killed mid-run
    subprocess.run([*cmd, "--run", str(tmp_path / "b"), *args], check=True, env=env, capture_output=True)
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and np.array_equal(va.numpy(), vb.numpy()), ka


@pytest.mark.parametrize("args, msg", [(["--device", "banana"], "not a device"), (["--n", "1"], ">= 2"), (["--n", "0"], ">= 2"), (["--n", "-3"], ">= 2")])
def test_eval_bad_numbers_and_devices_are_one_line_errors(tmp_path, capsys, args, msg):
    from rectflow.cli import main

    run = tmp_path / "r"
    assert main(["train", "--run", str(run), "--quiet", "--no-eval", "model.width=16", "model.depth=2", "train.steps=5", "train.batch_size=16"]) == 0
    capsys.readouterr()
    if args[0] == "--device":
        code = main(["train", "--run", str(tmp_path / "d"), "--quiet", "--no-eval", "train.device=banana", "train.steps=5"])
    else:
        code = main(["eval", str(run), *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_sample_and_eval_of_a_one_step_map_default_to_one_step(tmp_path, capsys):
    """Issue 16 trap 2: a distilled run is a one-step map; `sample` integrates it with the one step
    it was trained for unless told otherwise, and says so (one stderr line) when told more."""
    run = tmp_path / "distilled"
    assert main(["train", "--run", str(run), "--quiet", "--no-eval", "reflow.distill=true", "reflow.stage=0", *TINY]) == 0
    capsys.readouterr()
    code, out, err = run_cli(["sample", run, "--n", 20, "--out", tmp_path / "a.npy"], capsys)
    assert code == 0 and "NFE 1)" in out and err == ""
    code, out, err = run_cli(["sample", run, "--n", 20, "--steps", 8, "--out", tmp_path / "b.npy"], capsys)
    assert code == 0 and "NFE 8)" in out
    assert err.count("\n") == 1 and err.startswith("rectflow sample: warning: ") and "one-step map" in err
    code, out, err = run_cli(["eval", run, "--solvers", "euler:1,euler:4", "--n", 50], capsys)
    assert code == 0 and err.count("\n") == 1 and err.startswith("rectflow eval: warning: ") and "euler:4" in err
    code, out, err = run_cli(["eval", run, "--solvers", "euler:1", "--n", 50], capsys)
    assert code == 0 and err == ""
