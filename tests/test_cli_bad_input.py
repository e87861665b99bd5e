"""Every subcommand of ``rectflow`` with bad input: exit code 2 and one short line on stderr that
names the offending file or config key, never a traceback (issue 13: "the CLI exits 2 with one
line naming the file or key for every input above").

The command line is called in-process (``main(argv)``); one tiny run is trained for the module.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rectflow import cli
from rectflow.cli import main

TINY = ["model.width=16", "model.depth=2", "train.steps=6", "train.batch_size=16", "train.ckpt_every=3", "train.log_every=2",
        "eval.n_samples=64", "eval.solvers=[euler:1,euler:2]"]
MAX_LINE = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_input") / "moons"
    assert main(["train", "--run", str(path), "--quiet", "--no-eval", *TINY]) == 0
    return path


def _png_claiming(side: int) -> bytes:
    """A PNG whose header claims side x side pixels (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _diffusers_teacher(folder: Path) -> Path:
    """A tiny local diffusers folder (UNet2DModel + DDPM scheduler) whose weights file is garbage."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(str(folder / "unet"))
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(folder / "scheduler"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: the header promises more
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-layout pipeline folder (tests/perflow/conftest.py), built once for the module."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.perflow.conftest import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("bad_input_sd") / "tiny-sd")


@pytest.fixture(scope="module")
def export(sd, tmp_path_factory) -> Path:
    """An exported PeRFlow pipeline folder of the untrained K = 4 student of ``sd``."""
    from rectflow.perflow.latent import export_pipeline, load_pipeline
    from rectflow.perflow.windows import make_windows

    pipe = load_pipeline(sd)
    return export_pipeline(pipe.student(make_windows(4)), pipe, tmp_path_factory.mktemp("bad_input_export") / "k4")


def _image_png(path: Path, side: int = 16) -> None:
    from PIL import Image

    Image.fromarray(np.full((side, side, 3), 128, dtype=np.uint8)).save(path)


def _setup(tmp: Path, run: Path, argv: list[str]) -> None:
    """Create only the bad inputs a row refers to."""
    text = " ".join(argv)
    (tmp / "afile").write_text("a file, not a directory")
    np.save(tmp / "complex.npy", np.array([[1 + 2j, 0], [1, 3j]]))
    np.save(tmp / "huge.npy", np.array([[1e300, 0.0], [1.0, 2.0], [0.5, 0.5]]))
    (tmp / "dup.yaml").write_text("train: {lr: 0.05}\nmodel: {width: 16}\ntrain: {steps: 7}\n")
    (tmp / "latin1.yaml").write_bytes(b"train: {lr: 0.05}  # caf\xe9\n")
    (tmp / "nested.yaml").write_text("[" * 100000)
    if "{nestedrun}" in text:
        shutil.copytree(run, tmp / "nestedrun")
        (tmp / "nestedrun" / "config.json").write_text("[" * 100000)
    if "{corrupt}" in text:
        shutil.copytree(run, tmp / "corrupt")
        with open(tmp / "corrupt" / "metrics.jsonl", "ab") as f:
            f.write(b"\xff\xfe garbled\n[1, 2]\n")
    if "{evaldir}" in text:
        shutil.copytree(run, tmp / "evaldir")
        (tmp / "evaldir" / "eval.json").mkdir()  # eval.json cannot be written, portably (also as root)
    if "{teacher}" in text:
        _diffusers_teacher(tmp / "teacher")
    if "{captions}" in text:
        (tmp / "captions").mkdir()
        _image_png(tmp / "captions" / "cat.png")
        (tmp / "captions" / "cat.txt").write_text("a cat")
    if "{nocaps}" in text:
        (tmp / "nocaps").mkdir()
        _image_png(tmp / "nocaps" / "cat.png")  # no cat.txt, no metadata.jsonl
    if "{notapipe}" in text:
        (tmp / "notapipe" / "text_encoder").mkdir(parents=True)
        (tmp / "notapipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    if "{bomb}" in text:
        with zipfile.ZipFile(tmp / "bomb.zip", "w") as zf:
            zf.writestr("huge.png", _png_claiming(20000))


# (argv, what the line must name)
CASES = [
    # train
    (["train", "--run", "{run}/config.json", *TINY], "config.json"),
    (["train", "--run", "{tmp}/afile/run", *TINY], "afile"),
    (["train", "--run", "{tmp}/r", "target={tmp}/complex.npy"], "complex.npy"),
    (["train", "--run", "{tmp}/r", "target={tmp}/huge.npy"], "too large for float32"),
    (["train", "--run", "{tmp}/r", "coupling.kind=ot", "coupling.method=sinkhorn", "coupling.reg=0"], "coupling.reg"),
    (["train", "--run", "{tmp}/r", "train.lr=inf"], "train.lr"),
    (["train", "--run", "{tmp}/r", "--config", "{tmp}/dup.yaml"], "train"),
    (["train", "--run", "{tmp}/r", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    (["train", "--run", "{tmp}/r", "train.device=banana"], "banana"),
    (["train", "--run", "{corrupt}", "--quiet", *TINY, "train.steps=9"], "metrics.jsonl"),
    (["train", "--run", "{tmp}/r", "train.precision=fp16"], "train.precision"),
    (["train", "--run", "{tmp}/r", "train.batch_size=99999999999999999999999"], "train.batch_size"),
    (["train", "--run", "{tmp}/r", "train.seed=99999999999999999999999"], "train.seed"),  # above 2^64
    (["train", "--run", "{tmp}/r", "--config", "{tmp}/latin1.yaml"], "latin1.yaml"),
    (["train", "--run", "{tmp}/r", "--config", "{tmp}/nested.yaml"], "nested.yaml"),
    (["train", "--run", "{nestedrun}", *TINY], "config.json"),
    (["sample", "{run}", "--n", "99999999999999999999", "--out", "{tmp}/x.npy"], "--n"),
    (["sample", "{run}", "--seed", "999999999999999999999999", "--out", "{tmp}/x.npy"], "--seed"),
    (["sample", "{run}", "--label", "3", "--out", "{tmp}/afile"], "class-conditional"),
    (["sample", "{run}", "--guidance", "nan", "--out", "{tmp}/afile"], "--guidance"),
    (["train", "--run", "{tmp}/r", "train.threads=0"], "train.threads"),
    # tune
    (["tune", "{tmp}/missing.yaml"], "missing.yaml"),
    (["tune", "{tmp}/dup.yaml"], "train"),
    (["tune", "{tmp}/missing.yaml", "--threads", "0"], "--threads"),
    # sample
    (["sample", "{run}", "--out", "{tmp}/afile/x.npy"], "afile"),
    (["sample", "{run}", "--out", "{tmp}"], "is a directory"),
    (["sample", "{run}", "--out", "{tmp}/x.npy", "--trajectory", "{tmp}/afile/t.npy"], "afile"),
    (["sample", "{tmp}/missing", "--out", "{tmp}/x.npy"], "missing"),
    (["sample", "{run}", "--n", "0", "--out", "{tmp}/x.npy"], "--n"),
    (["sample", "{run}", "--prompt", "a cat", "--out", "{tmp}/x.npy"], "--prompt"),
    (["sample", "{export}", "--prompt", "a cat", "--steps", "1", "--out", "{tmp}/s"], "--steps"),
    (["sample", "{export}", "--out", "{tmp}/s"], "--prompt"),
    (["sample", "{export}", "--prompt", "a cat", "--out", "{tmp}/afile"], "afile"),
    (["sample", "{sd}", "--prompt", "a cat", "--out", "{tmp}/s"], "tiny-sd"),
    # eval
    (["eval", "{evaldir}"], "eval.json"),
    (["eval", "{run}", "--n", "1"], "--n"),
    (["eval", "{run}", "--solvers", "rk9:2"], "rk9"),
    (["eval", "{run}", "--nll", "--probes", "-1"], "--probes"),
    (["eval", "{tmp}/missing"], "missing"),
    # report
    (["report", "{run}", "--out", "{tmp}/afile/r.html"], "afile"),
    (["report", "{run}", "--out", "{tmp}"], "is a directory"),
    (["report", "{tmp}/nope", "{tmp}/nada", "--out", "{tmp}/r.html"], "nope"),
    # pairs
    (["pairs", "{run}", "--n", "10", "--out", "{tmp}/afile/p"], "afile"),
    (["pairs", "{run}", "--n", "10", "--out", "{tmp}/afile"], "afile"),
    (["pairs", "{run}", "--n", "0"], "--n"),
    (["pairs", "{run}", "--n", "99999999999999999999"], "--n"),
    (["pairs", "{run}", "--n", "10", "--solver", "euler:0", "--out", "{tmp}/p"], "euler:0"),
    # reflow
    (["reflow", "{run}", "--pairs", "10", "--out", "{tmp}/afile/x", "--steps", "2"], "afile"),
    (["reflow", "{run}", "--pairs", "0"], "--pairs"),
    (["reflow", "{run}"], "--pairs"),
    (["reflow", "{run}", "--pairs", "10", "--pairs-dir", "{tmp}/nostore", "--out", "{tmp}/x"], "nostore"),
    # distill
    (["distill", "{run}", "--random", "--out", "{tmp}/afile/d", "--steps", "2"], "afile"),
    (["distill", "{run}", "--pairs-dir", "{tmp}/nostore", "--out", "{tmp}/d"], "nostore"),
    (["distill", "{run}", "--random", "--out", "{tmp}/d", "train.stpes=3"], "train.stpes"),
    # diagnose
    (["diagnose", "{run}", "--out", "{tmp}/afile/diag"], "afile"),
    (["diagnose", "{tmp}/missing"], "missing"),
    # pipeline and demo
    (["pipeline", "--out", "{tmp}/afile/p", "--steps", "2"], "afile"),
    (["pipeline", "--out", "{tmp}/p", "--target", "{tmp}/complex.npy", "--steps", "2"], "complex.npy"),
    (["pipeline", "--out", "{tmp}/p", "--pair-tol", "nan", "--steps", "2"], "--pair-tol"),
    (["demo", "--out", "{tmp}/afile/d", "--steps", "2"], "afile"),
    # perflow
    (["perflow", "{tmp}/missing", "--out", "{tmp}/pf"], "missing"),
    (["perflow", "{run}", "--out", "{tmp}/pf"], "moons"),
    (["perflow", "{teacher}", "--out", "{tmp}/pf", "--data", "digits", "--device", "cpu"], "diffusion_pytorch_model.safetensors"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--data", "{bomb}"], "huge.png"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--guidance", "nan"], "--guidance"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--guidance-mode", "both"], "--guidance-mode"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--p-uncond", "1.5"], "--p-uncond"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--guidance-mode", "student", "--guidance", "3", "--p-uncond", "0"], "--p-uncond"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--guidance", "2"], "moons"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--prompt", "a cat"], "--prompt"),
    (["perflow", "{notapipe}", "--data", "{captions}", "--out", "{tmp}/pf", "--device", "cpu"], "notapipe"),
    (["perflow", "{sd}", "--out", "{tmp}/pf", "--device", "cpu"], "--data"),
    (["perflow", "{sd}", "--data", "{nocaps}", "--out", "{tmp}/pf", "--device", "cpu"], "nocaps"),
    (["perflow", "{sd}", "--data", "{captions}", "--out", "{tmp}/pf", "--lora-rank", "-1"], "--lora-rank"),
    (["perflow", "{sd}", "--data", "{captions}", "--out", "{tmp}/pf", "--latent-mode", "median"], "--latent-mode"),
    (["perflow", "{sd}", "--data", "{captions}", "--out", "{tmp}/pf", "--cache-dtype", "float8"], "--cache-dtype"),
    (["perflow", "{run}", "--out", "{tmp}/pf", "--cache-dtype", "float16"], "--cache-dtype"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(CASES)])
def test_every_subcommand_refuses_bad_input_in_one_line(argv, names, run, tmp_path, capsys, request):
    _setup(tmp_path, run, argv)
    places = {"run": run, "tmp": tmp_path, "corrupt": tmp_path / "corrupt", "evaldir": tmp_path / "evaldir",
              "teacher": tmp_path / "teacher", "bomb": tmp_path / "bomb.zip", "captions": tmp_path / "captions",
              "nocaps": tmp_path / "nocaps", "notapipe": tmp_path / "notapipe", "nestedrun": tmp_path / "nestedrun"}
    for name in ("sd", "export"):  # built once per module, only when a row needs them
        if "{" + name + "}" in " ".join(argv):
            places[name] = request.getfixturevalue(name)
    capsys.readouterr()  # what building a fixture printed is not the command's output
    code = main([a.format(**places) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, err
    line = err.strip()
    assert err.endswith("\n") and "\n" not in line, f"more than one line on stderr:\n{err}"
    assert line.startswith(f"rectflow {argv[0]}: error: ") and len(line) <= MAX_LINE + len(str(tmp_path)), line
    assert names in line, line
    assert (tmp_path / "afile").read_text() == "a file, not a directory"


def test_the_table_covers_every_subcommand():
    assert set(cli._COMMANDS) == {argv[0] for argv, _ in CASES}


def test_eval_prints_its_table_before_failing_to_save_it(run, tmp_path, capsys):
    """issue 13 item 9: eval on a run that cannot be written used to fail before printing anything."""
    _setup(tmp_path, run, ["{evaldir}"])
    code = main(["eval", str(tmp_path / "evaldir"), "--solvers", "euler:1"])
    out, err = capsys.readouterr()
    assert code == 2 and "| euler:1 |" in out
    assert "eval.json" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_eval_on_a_read_only_run_directory(run, tmp_path, capsys):
    ro = tmp_path / "ro"
    shutil.copytree(run, ro)
    (ro / "eval.json").unlink(missing_ok=True)
    ro.chmod(0o555)
    try:
        code = main(["eval", str(ro), "--solvers", "euler:1"])
    finally:
        ro.chmod(0o755)
    out, err = capsys.readouterr()
    assert code == 2 and "| euler:1 |" in out and str(ro) in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_bad_probes_before_printing_anything(run, capsys):
    """issue 31 item 8: eval --probes -1 --nll printed the W2 table, then refused --probes."""
    assert main(["eval", str(run), "--nll", "--probes", "-1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--probes" in err


def test_pairs_that_cannot_fit_on_the_disk_are_refused_before_any_is_written(run, tmp_path, capsys, monkeypatch):
    """issue 31 item 9: a huge --n wrote shards until the disk was full."""
    import collections

    from rectflow.reflow import pairs

    monkeypatch.setattr(pairs.shutil, "disk_usage", lambda p: collections.namedtuple("U", "total used free")(10**6, 0, 10**5))
    assert main(["pairs", str(run), "--n", "100000", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").glob("shard_*"))


def _every_option(kind):
    """(subcommand, its required arguments filled with a placeholder, option string) for every option of type ``kind``."""
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        required = []
        for act in p._actions:
            if not act.option_strings and act.nargs not in ("*", "?") and act.dest != "help":
                required.append("placeholder")
            elif act.option_strings and act.required:
                required += [act.option_strings[0], "1" if act.type is int else "placeholder"]
        for group in p._mutually_exclusive_groups:  # a required choice (distill: --pairs | --pairs-dir | --random): its first member
            if group.required:
                first = group._group_actions[0]
                required += [first.option_strings[0]] + ([] if first.nargs == 0 else ["1" if first.type is int else "placeholder"])
        for act in p._actions:
            in_required_group = any(g.required and act in g._group_actions[:1] for g in p._mutually_exclusive_groups)
            if act.option_strings and act.type is kind and not act.required and not in_required_group:
                yield name, required, act.option_strings[-1]


@pytest.mark.parametrize("command, required, option", list(_every_option(int)), ids=lambda v: v if isinstance(v, str) else "")
def test_every_integer_option_of_every_subcommand_is_bounded(command, required, option, tmp_path, capsys, monkeypatch):
    """issue 31: a huge integer anywhere is one line naming the option, exit 2, nothing written (checked before the command runs)."""
    monkeypatch.chdir(tmp_path)
    code = main([command, *required, option, "99999999999999999999"])
    err = capsys.readouterr().err
    assert code == 2 and option in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, required, option", list(_every_option(float)), ids=lambda v: v if isinstance(v, str) else "")
def test_every_float_option_of_every_subcommand_refuses_non_finite_values(command, required, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("nan", "inf"):
        code = main([command, *required, option, bad])
        err = capsys.readouterr().err
        assert code == 2 and option in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
