"""rectflow.runs.perflow_job and `rectflow perflow`: the PeRFlow job (teacher in, student directory out)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from rectflow.cli import main
from rectflow.diffusion.schedules import DiscreteFlowMatchingSchedule
from rectflow.engine.io import load_tensors
from rectflow.engine.trainer import TrainConfig
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.perflow.student import PeRFlowStudent, sample_perflow
from rectflow.perflow.windows import make_windows
from rectflow.runs.config import config_from_dict
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.perflow_job import PeRFlowSettings, load_perflow, load_perflow_teacher, train_perflow

torch.set_num_threads(1)

TINY_UNET = {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0, "head_channels": 8}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    cfg = config_from_dict({
        "source": {"name": "gaussian", "shape": [1, 8, 8]}, "target": {"name": "digits"}, "model": TINY_UNET,
        "train": {"steps": 20, "batch_size": 16, "device": "cpu", "progress": False, "ckpt_every": 20, "log_every": 10},
    })
    train_run(cfg, run)
    return run


def _train(steps=6):
    return TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.0, device="cpu", progress=False, workers=0, ckpt_every=3, log_every=3)


def test_run_teacher_is_the_runs_flow_on_the_straight_path(image_run):
    teacher, data, desc = load_perflow_teacher(image_run)
    run = load_run(image_run)
    z, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    torch.testing.assert_close(teacher.velocity(z, t), run.model(z, t))  # velocity on X_t = t X1 + (1 - t) X0
    assert desc["kind"] == "run" and data.sample(2).shape == (2, 1, 8, 8)


def test_job_writes_student_delta_samples_and_reloads(image_run, tmp_path):
    out = train_perflow(image_run, tmp_path / "pf", settings=PeRFlowSettings(windows=2, solver_steps=2), train=_train())
    for name in ("perflow.json", "student.safetensors", "delta.safetensors", "samples.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["windows"] == [0.0, 0.5, 1.0] and rec["shape"] == [1, 8, 8] and rec["steps_done"] == 6
    assert rec["teacher_nfe_this_session"] == 6 * 8 * 2  # steps x batch x window solver steps
    job = load_perflow(out)
    x = job.sample(5, seed=3)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    torch.testing.assert_close(job.sample(5, seed=3), x)  # seeded
    # student = teacher + delta, weight by weight
    teacher, _, _ = load_perflow_teacher(image_run)
    delta, meta = load_tensors(out / "delta.safetensors")
    assert json.loads(meta["windows"]) == [0.0, 0.5, 1.0] if isinstance(meta["windows"], str) else meta["windows"] == [0.0, 0.5, 1.0]
    for name, w in job.student.net.state_dict().items():
        if name in delta:
            torch.testing.assert_close(w, teacher.model.state_dict()[name] + delta[name])
    assert any(float(d.abs().max()) > 0 for d in delta.values())  # it trained


def test_compile_also_compiles_the_teachers_window_solve(image_run, tmp_path, monkeypatch):
    """--compile (train.compile) compiles the teacher's network too (its window solve is most of a
    step); the delta is still taken against the plain teacher's weights."""
    compiled, real = [], torch.compile

    def eager_compile(model, **kw):
        compiled.append(model)
        return real(model, backend="eager", dynamic=kw.get("dynamic"))

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    out = tmp_path / "pf"
    assert main(["perflow", str(image_run), "--out", str(out), "-K", "2", "--steps", "3", "--batch-size", "8",
                 "--solver-steps", "2", "--device", "cpu", "-q", "--compile"]) == 0
    assert json.loads((out / "perflow.json").read_text())["train"]["compile"] is True
    teacher, _, _ = load_perflow_teacher(image_run)
    assert len(compiled) == 2 and type(compiled[0]) is type(teacher.model)  # the teacher's network, then the student
    delta, _ = load_tensors(out / "delta.safetensors")
    assert set(delta) <= set(teacher.model.state_dict()) and not any("_orig_mod" in k for k in delta)
    assert json.loads((out / "perflow.json").read_text())["teacher_nfe_this_session"] == 3 * 8 * 2


def test_untrained_student_is_the_teachers_k_step_solver(image_run, tmp_path):
    """Before training, one Euler step per window of the student = the teacher's K-step Euler (a
    velocity teacher on the straight path: DDIM == Euler, theory §6)."""
    teacher, _, _ = load_perflow_teacher(image_run)
    b = make_windows(4)
    student = PeRFlowStudent.from_teacher(teacher, b)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sample_perflow(student, z, b).x, sample_perflow(teacher.velocity, z, b).x, rtol=1e-4, atol=1e-5)


def test_killed_job_resumes_to_the_same_student(image_run, tmp_path):
    s = PeRFlowSettings(windows=2, solver_steps=1)
    whole = train_perflow(image_run, tmp_path / "whole", settings=s, train=_train(6))
    part = train_perflow(image_run, tmp_path / "part", settings=s, train=_train(3))  # stopped after 3 steps
    part = train_perflow(image_run, part, settings=s, train=_train(6))  # the same command, a larger budget
    a, _ = load_tensors(whole / "student.safetensors")
    b, _ = load_tensors(part / "student.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_bad_input_is_refused_and_nothing_is_overwritten(image_run, tmp_path):
    out = train_perflow(image_run, tmp_path / "pf", settings=PeRFlowSettings(windows=2, solver_steps=1), train=_train(3))
    before = (out / "student.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="settings"):
        train_perflow(image_run, out, settings=PeRFlowSettings(windows=3, solver_steps=1), train=_train(3))
    assert (out / "student.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match="no such directory"):
        train_perflow(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(ConfigError, match="neither a rectflow run"):
        train_perflow(tmp_path, tmp_path / "y")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a PeRFlow job"):
        train_perflow(image_run, tmp_path / "full", train=_train(3))
    with pytest.raises(ConfigError, match="windows"):
        train_perflow(image_run, tmp_path / "z", settings=PeRFlowSettings(windows=0))
    with pytest.raises(CheckpointError, match="not a finished PeRFlow job"):
        load_perflow(tmp_path / "full")


def test_two_d_run_is_not_a_perflow_teacher(tmp_path):
    cfg = config_from_dict({"train": {"steps": 2, "batch_size": 8, "device": "cpu", "progress": False, "ckpt_every": 2}})
    train_run(cfg, tmp_path / "moons")
    with pytest.raises(ConfigError, match="Gaussian noise to images"):
        load_perflow_teacher(tmp_path / "moons")


def test_cli_perflow(image_run, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["perflow", str(image_run), "--out", str(out), "-K", "2", "--steps", "3", "--batch-size", "4",
                 "--solver-steps", "1", "--device", "cpu", "-q", "--data", "digits"])
    assert code == 0 and (out / "samples.png").is_file()
    assert "2-step sampling" in capsys.readouterr().out
    assert main(["perflow", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_perflow_config_file_equals_the_flags_and_the_command_line_wins(image_run, tmp_path, capsys):
    """issue 32 item 3: a strict YAML of the command's own options (layered, with KEY=VALUE overrides) makes the same job as
    the flags; a flag on the command line wins over a file, an override over both."""
    flags = ["-K", "2", "--steps", "3", "--batch-size", "4", "--solver-steps", "1", "--device", "cpu", "-q", "--data", "digits", "--ema", "0"]
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "flags"), *flags]) == 0
    base = tmp_path / "base.yaml"
    base.write_text("windows: 3\nsteps: 3\nbatch_size: 4\nsolver-steps: 1\ndevice: cpu\nquiet: true\ndata: digits\nema: 0\n")
    top = tmp_path / "top.yaml"
    top.write_text("windows: 2\n")  # a later file wins
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "cfg"), "-c", str(base), "-c", str(top)]) == 0
    rec = [json.loads((tmp_path / d / "perflow.json").read_text()) for d in ("flags", "cfg")]
    for key in ("settings", "train"):
        assert rec[0][key] == rec[1][key], key
    (a, meta_a), (b, meta_b) = (load_tensors(tmp_path / d / "delta.safetensors") for d in ("flags", "cfg"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same student, bit for bit
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "win"), "-c", str(base), "-K", "2", "solver_steps=2"]) == 0
    won = json.loads((tmp_path / "win" / "perflow.json").read_text())["settings"]
    assert won["windows"] == 2 and won["solver_steps"] == 2  # the flag beat the file's 3, the override beat its 1
    capsys.readouterr()
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "cfg"), "-c", str(base), "-c", str(top), "windows=3"]) == 2
    err = capsys.readouterr().err
    assert "differs in" in err and "windows" in err  # the stored job's message, as for flags


@pytest.mark.parametrize("text, says", [("windos: 2\n", "unknown key 'windos'"), ("windows: two\n", "key 'windows' must be an integer"),
                                        ("spacing: cubic\n", "key 'spacing' must be one of"), ("compile: 1\n", "key 'compile' must be true or false"),
                                        ("guidance: [1]\n", "key 'guidance' must be a number"), ("out: x\n", "unknown key 'out'"),
                                        ("windows: 2\nwindows: 3\n", "appears twice"), ("- 1\n", "top level must be a mapping"),
                                        ("[a]: 1\n", "is not a name"), ("lr: fast\n", "key 'lr' must be a number")])
def test_cli_perflow_config_refuses_bad_keys_in_one_line(image_run, tmp_path, capsys, text, says):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "o"), "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(cfg) in err and len(err.strip().splitlines()) == 1
    assert main(["perflow", str(image_run), "--out", str(tmp_path / "o"), "windows=x"]) == 2
    assert "the command line: key 'windows' must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_perflow_config_reads_values_as_the_flags_would():
    """Review findings: 1e-4 (a string to YAML 1.1) is a number; an override of a string option keeps its text (prompt=yes
    is the prompt 'yes'); repeated --prompt-like overrides add up as --prompt does; a flag given as --opt=value wins too."""
    from rectflow.cli import apply_perflow_config, build_parser

    def apply(argv):
        args, extra = build_parser().parse_known_args(argv)
        args.overrides, args.argv = [*args.overrides, *extra], argv
        apply_perflow_config(args)
        return args

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "job.yaml"
        cfg.write_text("lr: 1e-4\nema: 1e-3\nwindows: 6\nprompt: a cat\n")
        args = apply(["perflow", "T", "--out", "O", "-c", str(cfg), "prompt=yes", "prompt=a dog: portrait", "--windows=5", "steps=1000"])
    assert args.lr == 1e-4 and args.ema == 1e-3 and args.windows == 5
    assert args.prompt == ["yes", "a dog: portrait"]  # overrides replace the file's prompts and add up among themselves
    assert args.steps == 1000


def test_on_disk_format_names_never_change():
    """Files written by earlier versions must stay readable: these identifiers are part of the format."""
    from rectflow.perflow import diffusers_io
    from rectflow.runs import perflow_job as job

    assert job.PERFLOW_JOB_FORMAT == "rectflow.perflow.job"
    assert '"format": "rectflow.perflow"' in Path(diffusers_io.__file__).read_text()


# ----------------------------------------------------------------------------------------- guidance (theory §5.5)
@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A tiny class-conditional rectified-flow run on the digits (10 labels, label dropout 0.1)."""
    run = tmp_path_factory.mktemp("runs") / "digits-cond"
    cfg = config_from_dict({
        "source": {"name": "gaussian", "shape": [1, 8, 8]}, "target": {"name": "digits"}, "model": {**TINY_UNET, "num_classes": 10},
        "train": {"steps": 20, "batch_size": 16, "device": "cpu", "progress": False, "ckpt_every": 20, "log_every": 10},
    })
    train_run(cfg, run)
    return run


def test_conditional_run_with_guidance_in_the_teachers_solve(labelled_run, tmp_path):
    """Option (a): the teacher's window solve is guided (2 NFE per step), the student samples at w = 1."""
    s = PeRFlowSettings(windows=2, solver_steps=2, guidance=3.0)
    out = train_perflow(labelled_run, tmp_path / "a", settings=s, train=_train(4))
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["settings"]["guidance"] == 3.0 and rec["settings"]["guidance_mode"] == "teacher" and rec["settings"]["p_uncond"] == 0.0
    assert rec["teacher"]["num_classes"] == 10
    assert rec["teacher_nfe_per_example"] == 4 and rec["teacher_nfe_this_session"] == 4 * 8 * 2 * 2  # steps x batch x solver steps x 2
    job = load_perflow(out)
    assert job.num_classes == 10 and job.guidance == 1.0
    x = job.sample(5, labels=torch.tensor([0, 1, 2, 3, 4]), seed=1)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    assert not torch.allclose(x, job.sample(5, labels=torch.tensor([5, 6, 7, 8, 9]), seed=1))  # the labels matter
    with pytest.raises(ConfigError, match="label"):
        job.sample(3, labels=torch.tensor([0, 1, 10]))
    before = (out / "student.safetensors").read_bytes()
    for other in (PeRFlowSettings(windows=2, solver_steps=2, guidance=2.0),
                  PeRFlowSettings(windows=2, solver_steps=2, guidance=3.0, p_uncond=0.1, guidance_mode="student")):
        with pytest.raises(ConfigError, match="settings"):  # a resume with other guidance settings is refused
            train_perflow(labelled_run, out, settings=other, train=_train(4))
    assert (out / "student.safetensors").read_bytes() == before
    train_perflow(labelled_run, out, settings=s, train=_train(4))  # the same settings resume (nothing left to do)


def test_conditional_run_with_guidance_at_student_sampling(labelled_run, tmp_path):
    """Option (b): teacher at w = 1 on dropped labels; the job samples the student with CFG at w."""
    s = PeRFlowSettings(windows=2, solver_steps=1, guidance=2.0, p_uncond=0.25, guidance_mode="student")
    out = train_perflow(labelled_run, tmp_path / "b", settings=s, train=_train(3))
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["teacher_nfe_per_example"] == 1 and rec["teacher_nfe_this_session"] == 3 * 8 * 1
    job = load_perflow(out)
    assert job.guidance == 2.0
    y = torch.arange(4)
    guided, plain = job.sample(4, labels=y), job.sample(4, labels=y, guidance=1.0)
    assert not torch.allclose(guided, plain, atol=1e-4)
    with torch.no_grad():
        noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        res = sample_perflow(job.student, noise, job.boundaries, cond=y, guidance=2.0)
    assert res.nfe == 4 and torch.allclose(res.x, guided, atol=1e-6)  # 2K NFE

    class Unlabelled:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, 1, 8, 8, generator=generator)

    with pytest.raises(DataError, match="labelled"):
        train_perflow(labelled_run, tmp_path / "c", settings=s, train=_train(1), data=Unlabelled())


def test_guidance_settings_are_checked(image_run, tmp_path):
    with pytest.raises(ConfigError, match="p_uncond"):
        PeRFlowSettings(guidance=2.0, guidance_mode="student").validate()
    with pytest.raises(ConfigError, match="guidance_mode"):
        PeRFlowSettings(guidance_mode="both").validate()
    with pytest.raises(ConfigError, match="p_uncond"):
        PeRFlowSettings(p_uncond=2.0).validate()
    with pytest.raises(ConfigError, match="class-conditional"):
        train_perflow(image_run, tmp_path / "u", settings=PeRFlowSettings(windows=2, solver_steps=1, guidance=2.0), train=_train(1))
    out = train_perflow(image_run, tmp_path / "plain", settings=PeRFlowSettings(windows=2, solver_steps=1), train=_train(1))
    rec = json.loads((out / "perflow.json").read_text())
    assert not {"guidance", "p_uncond", "guidance_mode"} & set(rec["settings"])  # unconditional records stay as before
    with pytest.raises(ConfigError, match="unconditional"):
        load_perflow(out).sample(2, guidance=2.0)


def test_cli_perflow_with_guidance(labelled_run, tmp_path, capsys):
    out = tmp_path / "cli-b"
    code = main(["perflow", str(labelled_run), "--out", str(out), "-K", "2", "--steps", "2", "--batch-size", "4", "--solver-steps", "1",
                 "--device", "cpu", "-q", "--guidance", "2", "--guidance-mode", "student"])
    assert code == 0 and "with guidance 2: 4 NFE" in capsys.readouterr().out
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["settings"]["p_uncond"] == 0.1 and rec["settings"]["guidance_mode"] == "student"  # the mode's default dropout
    assert main(["perflow", str(labelled_run), "--out", str(tmp_path / "x"), "--guidance-mode", "student", "--guidance", "3", "--p-uncond", "0"]) == 2
    assert "--p-uncond" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- latent text-to-image pipelines (issue 15)
CAPTIONS = ["a red cat", "two dogs", "a blue car", "the sea", "a green tree", "an owl"]


def write_caption_folder(folder: Path, captions=CAPTIONS, *, seed: int = 0) -> Path:
    """Small RGB PNGs (mixed sizes: the cache crops and resizes) with a .txt caption beside each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, text in enumerate(captions):
        h, w = (16, 16) if i % 2 == 0 else (20, 24)
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.perflow.conftest import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("captions") / "images")


def _latent_train(steps):
    return TrainConfig(steps=steps, batch_size=2, lr=1e-3, ema_decay=0.0, device="cpu", progress=False, workers=0, ckpt_every=2, log_every=2)


@pytest.fixture(scope="module")
def pipeline_job(sd_folder, captions, tmp_path_factory):
    """`rectflow perflow` on the tiny SD folder: 2 windows, 3 steps, LoRA rank 2, two prompts."""
    out = tmp_path_factory.mktemp("jobs") / "sd-perflow"
    code = main(["perflow", str(sd_folder), "--data", str(captions), "--out", str(out), "-K", "2", "--steps", "3", "--batch-size", "2",
                 "--solver-steps", "1", "--lora-rank", "2", "--prompt", "a red cat", "--prompt", "an owl", "--cache-dtype", "bfloat16",
                 "--device", "cpu", "-q"])
    assert code == 0
    return out


def test_pipeline_job_writes_export_delta_lora_and_grid(pipeline_job, sd_folder, captions, capsys):
    from rectflow.perflow.latent import load_pipeline
    from rectflow.perflow.lora import load_lora

    out = pipeline_job
    for name in ("perflow.json", "delta.safetensors", "samples.png", "metrics.jsonl", "diffusers/model_index.json",
                 "diffusers/unet/config.json", "diffusers/scheduler/scheduler_config.json", "lora/pytorch_lora_weights.safetensors",
                 "latents/manifest.json"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["teacher"]["kind"] == "pipeline" and rec["teacher"]["path"] == str(sd_folder.resolve())
    assert rec["data"]["images"] == str(captions.resolve()) and rec["data"]["latent_mode"] == "mean"
    assert rec["data"]["dtype"] == "bfloat16" and rec["cache"]["settings"]["dtype"] == "bfloat16"  # --cache-dtype
    assert rec["cache"]["path"] == str((out / "latents").resolve()) and rec["cache"]["settings"]["n_images"] == len(CAPTIONS)
    assert rec["windows"] == [0.0, 0.5, 1.0] and rec["shape"] == [4, 8, 8] and rec["steps_done"] == 3
    assert rec["settings"]["guidance_mode"] == "teacher"  # a text-conditional teacher records its guidance keys
    assert rec["prompts"] == ["a red cat", "an owl"] and rec["lora"]["rank"] == 2
    assert rec["teacher_nfe_this_session"] == 3 * 2 * 1
    # the exported UNet = teacher UNet + delta; the LoRA is the rank-2 form of that delta
    teacher = load_pipeline(sd_folder)
    student = load_pipeline(out / "diffusers")
    delta, meta = load_tensors(out / "delta.safetensors")
    assert meta["windows"] == [0.0, 0.5, 1.0] or json.loads(meta["windows"]) == [0.0, 0.5, 1.0]
    t_sd = teacher.unet.state_dict()
    for name, w in student.unet.state_dict().items():
        torch.testing.assert_close(w, t_sd[name] + delta[name])
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    lora, _ = load_lora(out / "lora")
    assert {v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight")} == {2}  # --lora-rank 2 everywhere
    # the grid: one row per prompt
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.width > im.height > 0


def test_pipeline_job_writes_model_cards_the_official_delta_and_the_lora_gap(pipeline_job, sd_folder, capsys):
    from rectflow.perflow.delta import apply_delta
    from rectflow.perflow.official import load_official_delta

    out = pipeline_job
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["official"] == {"written": True} and rec["outputs"]["official"] == "official"
    for folder in ("diffusers", "lora", "official"):
        card = (out / folder / "README.md").read_text()
        front = card.split("---")[1]
        assert "library_name: diffusers" in front and "base_model:" in front and "- perflow" in front, folder
        assert "K = 2" in card and "rectflow perflow" in card, folder  # the windows and the command that made it
    lora_card = (out / "lora" / "README.md").read_text()
    gap = rec["lora"]
    assert 0 <= gap["lora_gap"] and 0 <= gap["lora_missed_share"] and f"{gap['lora_gap']:.4g}" in lora_card
    assert gap["lora_missed_share"] < 1.0  # rank 2 of a 3-step delta still carries part of it
    # the official delta is the same delta
    delta, _ = load_tensors(out / "delta.safetensors")
    off = load_official_delta(out / "official")
    for name, d in delta.items():
        torch.testing.assert_close(off[name], d)
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd_folder / "unet"))
    apply_delta(unet, off)
    ours = diffusers.UNet2DConditionModel.from_pretrained(str(out / "diffusers" / "unet"))
    for name, w in ours.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[name], w, atol=1e-6, rtol=1e-6)


def test_pipeline_job_with_stock_scheduler_and_lora_bias(sd_folder, captions, tmp_path, capsys):
    out = tmp_path / "job"
    with pytest.warns(UserWarning, match="exact at num_inference_steps=2 only"):
        code = main(["perflow", str(sd_folder), "--data", str(captions), "--out", str(out), "-K", "2", "--steps", "2", "--batch-size", "2",
                     "--solver-steps", "1", "--lora-rank", "2", "--lora-bias", "--stock-scheduler", "--precision", "bf16", "--device", "cpu", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "LoRA (rank 2) vs the full delta" in printed and "official/" in printed
    idx = json.loads((out / "diffusers" / "model_index.json").read_text())
    assert idx["scheduler"] == ["diffusers", "DDIMScheduler"] and (out / "diffusers" / "scheduler_perflow" / "scheduling_perflow.py").is_file()
    assert "no custom code to trust" in (out / "diffusers" / "README.md").read_text()
    from rectflow.perflow.lora import load_lora

    lora, _ = load_lora(out / "lora")
    assert any(k.endswith("lora_B.bias") for k in lora)
    assert json.loads((out / "perflow.json").read_text())["train"]["precision"] == "bf16"
    assert main(["perflow", str(sd_folder), "--data", str(captions), "--out", str(tmp_path / "j2"), "-K", "3", "--steps", "1",
                 "--stock-scheduler", "-q"]) == 2  # K = 3 does not divide 1000: no stock scheduler is exact
    assert "stock_scheduler=True needs" in capsys.readouterr().err


def _stock_equals_ours(stock, job, runs, tol):
    """The stock pipeline's latents from given noise, at each (steps, guidance) of ``runs``, equal our sample_pipeline_latents."""
    from rectflow.runs.perflow_job import sample_pipeline_latents

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "two dogs"]
    with torch.no_grad():
        for steps, w in runs:
            theirs = stock(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=w, latents=noise.clone(), output_type="latent").images
            ours = sample_pipeline_latents(job.student, job.pipeline, prompts, noise, steps=steps, guidance=w)
            torch.testing.assert_close(theirs, ours, atol=tol, rtol=tol)


def test_exported_pipeline_loads_in_the_stock_pipeline_and_matches_our_sampler(pipeline_job):
    diffusers = pytest.importorskip("diffusers")
    import rectflow.perflow.diffusers_scheduler  # noqa: F401 (registers PeRFlowScheduler for from_pretrained)

    job = load_perflow(pipeline_job)
    assert job.pipeline is not None and job.shape == (4, 8, 8)
    stock = diffusers.StableDiffusionPipeline.from_pretrained(str(pipeline_job / "diffusers"), local_files_only=True, trust_remote_code=True).to("cpu")
    _stock_equals_ours(stock, job, ((2, 1.0), (3, 2.5)), 1e-5)
    prompts = ["a red cat", "two dogs"]
    images = job.sample(3, prompts=prompts, seed=2)
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
    torch.testing.assert_close(job.sample(3, prompts=prompts, seed=2), images)
    with pytest.raises(ConfigError, match="prompts"):
        job.sample(2)


def test_killed_pipeline_job_resumes_to_the_same_student(sd_folder, captions, tmp_path, monkeypatch):
    """A kill inside the cache build, then one after 2 of 4 steps: the same student as one uninterrupted run,
    and the resumed run reads the finished cache without running the VAE encoder."""
    from rectflow.perflow.latent import LatentPipeline
    from rectflow.runs import perflow_job as job_mod
    from rectflow.runs.perflow_job import LatentDataOptions

    s, opts = PeRFlowSettings(windows=2, solver_steps=1), LatentDataOptions(shard_size=2)
    kw = {"settings": s, "data": captions, "latent": opts, "lora_rank": 0, "prompts": ["an owl"]}
    whole = train_perflow(sd_folder, tmp_path / "whole", train=_latent_train(4), **kw)

    real = job_mod.build_latent_cache

    def killed(*a, **k):
        def stop(shard):
            if shard == 0:
                raise KeyboardInterrupt

        return real(*a, **k, on_shard=stop)

    monkeypatch.setattr(job_mod, "build_latent_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        train_perflow(sd_folder, tmp_path / "part", train=_latent_train(4), **kw)
    monkeypatch.setattr(job_mod, "build_latent_cache", real)
    assert not json.loads((tmp_path / "part" / "latents" / "manifest.json").read_text())["complete"]
    train_perflow(sd_folder, tmp_path / "part", train=_latent_train(2), **kw)  # finishes the cache, stops after 2 steps

    def no_vae(*a, **k):
        raise AssertionError("the VAE encoder ran on a resumed job")

    monkeypatch.setattr(LatentPipeline, "encode_images", no_vae)
    part = train_perflow(sd_folder, tmp_path / "part", train=_latent_train(4), **kw)
    assert not (part / "lora").exists()  # lora_rank 0: no LoRA
    a, _ = load_tensors(whole / "delta.safetensors")
    b, _ = load_tensors(part / "delta.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ca = json.loads((whole / "latents" / "manifest.json").read_text())["shards"]
    cb = json.loads((part / "latents" / "manifest.json").read_text())["shards"]
    assert [e["sha256"] for e in ca] == [e["sha256"] for e in cb]


def test_pipeline_job_refuses_bad_input(pipeline_job, sd_folder, captions, image_run, tmp_path):
    from rectflow.runs.perflow_job import LatentDataOptions

    rec = (pipeline_job / "perflow.json").read_bytes()
    train = _latent_train(3)
    with pytest.raises(ConfigError, match="settings"):  # a resume with other settings
        train_perflow(sd_folder, pipeline_job, settings=PeRFlowSettings(windows=3, solver_steps=1), train=train, data=captions)
    with pytest.raises(ConfigError, match="data"):  # ... or other cache options
        train_perflow(sd_folder, pipeline_job, settings=PeRFlowSettings(windows=2, solver_steps=1), train=train, data=captions,
                      latent=LatentDataOptions(latent_mode="sample"))
    assert (pipeline_job / "perflow.json").read_bytes() == rec
    with pytest.raises(ConfigError, match="captioned images"):
        train_perflow(sd_folder, tmp_path / "a", train=train)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(captions / "img0.png", bare / "img0.png")
    with pytest.raises(DataError, match="no caption"):
        train_perflow(sd_folder, tmp_path / "b", train=train, data=bare)
    assert not (tmp_path / "b").exists()  # refused before anything is written
    with pytest.raises(DataError, match="prompt 'abcdefghijklmnopq' is 19 tokens"):
        train_perflow(sd_folder, tmp_path / "b", train=train, data=captions, prompts=["a cat", "abcdefghijklmnopq"])
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="lora_rank"):
        train_perflow(sd_folder, tmp_path / "c", train=train, data=captions, lora_rank=-1)
    sd3 = tmp_path / "sd3"
    for part in ("transformer", "text_encoder", "vae", "scheduler"):
        (sd3 / part).mkdir(parents=True)
    (sd3 / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ConfigError, match="SD3 layout"):
        train_perflow(sd3, tmp_path / "f", train=train, data=captions)
    with pytest.raises(ConfigError, match="text-to-image pipeline"):
        train_perflow(image_run, tmp_path / "d", train=_train(1), prompts=["a cat"])
    with pytest.raises(ConfigError, match="text-to-image pipeline"):
        train_perflow(image_run, tmp_path / "e", train=_train(1), lora_rank=4)


def test_cli_sample_of_an_exported_pipeline(pipeline_job, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sample", str(pipeline_job / "diffusers"), "--prompt", "a red cat", "--prompt", "two dogs", "--n", "3", "--steps", "3",
                 "--guidance", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_00000.png", "sample_00001.png", "sample_00002.png", "samples.json"]
    meta = json.loads((out / "samples.json").read_text())
    assert meta["steps"] == 3 and meta["guidance"] == 2.0 and [s["prompt"] for s in meta["samples"]] == ["a red cat", "two dogs", "a red cat"]
    assert "3 images" in capsys.readouterr().out
    # the job directory samples its export; K steps by default
    assert main(["sample", str(pipeline_job), "--prompt", "an owl", "--n", "1", "--out", str(tmp_path / "s2")]) == 0
    assert json.loads((tmp_path / "s2" / "samples.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert main(["sample", str(pipeline_job / "diffusers"), "--prompt", "an owl", "--steps", "1", "--out", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "2 windows" in err and not (tmp_path / "s3").exists()


def test_pipeline_job_with_guidance_in_either_mode(sd_folder, captions, tmp_path, capsys):
    """Mode "teacher": the window solve is guided against the empty prompt (2 NFE per step); mode "student":
    caption dropout, and the export records the student's scale, the default of `rectflow sample`."""
    a = train_perflow(sd_folder, tmp_path / "a", settings=PeRFlowSettings(windows=2, solver_steps=2, guidance=3.0), train=_latent_train(1),
                      data=captions, lora_rank=0, prompts=["an owl"], samples_per_prompt=1)
    rec = json.loads((a / "perflow.json").read_text())
    assert rec["teacher_nfe_per_example"] == 4 and rec["teacher_nfe_this_session"] == 1 * 2 * 4
    assert json.loads((a / "diffusers" / "perflow.json").read_text())["guidance_scale"] == 1.0 and load_perflow(a).guidance == 1.0
    s = PeRFlowSettings(windows=2, solver_steps=1, guidance=2.0, p_uncond=0.5, guidance_mode="student")
    b = train_perflow(sd_folder, tmp_path / "b", settings=s, train=_latent_train(1), data=captions, lora_rank=0, prompts=["an owl"], samples_per_prompt=1)
    rec = json.loads((b / "perflow.json").read_text())
    assert rec["teacher_nfe_per_example"] == 1 and rec["settings"]["p_uncond"] == 0.5
    assert json.loads((b / "diffusers" / "perflow.json").read_text())["guidance_scale"] == 2.0
    job = load_perflow(b)
    assert job.guidance == 2.0
    assert not torch.allclose(job.sample(1, prompts=["an owl"]), job.sample(1, prompts=["an owl"], guidance=1.0), atol=1e-5)
    assert main(["sample", str(b), "--prompt", "an owl", "--out", str(tmp_path / "s")]) == 0
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["guidance"] == 2.0 and meta["nfe"] == 4 and "NFE 4" in capsys.readouterr().out


def test_pipeline_job_whose_images_changed_says_so(sd_folder, tmp_path):
    """Review finding: when the captioned images change after the job cached them, the refusal names the
    cause and the way out (a new job), not a directory the user never chose."""
    images = write_caption_folder(tmp_path / "images")
    kw = {"settings": PeRFlowSettings(windows=2, solver_steps=1), "data": images, "lora_rank": 0, "prompts": ["an owl"]}
    train_perflow(sd_folder, tmp_path / "job", train=_latent_train(2), **kw)
    write_caption_folder(images, seed=1)  # same names and captions, other pixels
    with pytest.raises(ConfigError, match="changed since the job cached them: start a new job"):
        train_perflow(sd_folder, tmp_path / "job", train=_latent_train(4), **kw)


def test_the_default_window_solve_is_the_measured_one():
    """24 teacher steps per window: 2.19 / 2.25 vs 12 steps' 2.52 / 2.57 FD on digits, two seeds
    (benchmarks/results/perflow_levers.md); the cap of the target is the teacher's 4 x 24-step solve."""
    assert PeRFlowSettings().solver_steps == 24


def test_sdxl_pipeline_job_and_cli_sample(captions, tmp_path_factory, tmp_path, capsys):
    """`rectflow perflow` on a tiny SDXL folder (guidance at the student: condition dropout on the cached
    (hidden, pooled) pairs), its export in the stock StableDiffusionXLPipeline, and `rectflow sample`."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import rectflow.perflow.diffusers_scheduler  # noqa: F401 (registers PeRFlowScheduler for from_pretrained)
    from tests.perflow.conftest import SDXL_POOLED, build_tiny_sdxl

    xl = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    out = tmp_path / "xl-perflow"
    code = main(["perflow", str(xl), "--data", str(captions), "--out", str(out), "-K", "2", "--steps", "2", "--batch-size", "2", "--solver-steps", "1",
                 "--guidance", "2", "--guidance-mode", "student", "--lora-rank", "2", "--prompt", "a red cat", "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["teacher"]["kind"] == "pipeline" and rec["steps_done"] == 2 and rec["shape"] == [4, 8, 8]
    assert rec["cache"]["settings"]["pooled_dim"] == SDXL_POOLED and rec["cache"]["settings"]["null_condition"] == "zeros"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "samples.png").is_file()
    job = load_perflow(out)
    assert job.pipeline.is_sdxl and job.guidance == 2.0
    stock = diffusers.StableDiffusionXLPipeline.from_pretrained(str(out / "diffusers"), local_files_only=True, trust_remote_code=True).to("cpu")
    _stock_equals_ours(stock, job, ((2, 1.0), (3, 2.0)), 1e-5)
    assert main(["sample", str(out), "--prompt", "an owl", "--n", "2", "--out", str(tmp_path / "s")]) == 0
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["steps"] == 2 and meta["guidance"] == 2.0 and meta["nfe"] == 4 and len(meta["samples"]) == 2
    # an SDXL refiner (text_encoder_2/ only) is refused in one line naming the folder, before anything is written
    refiner = tmp_path / "refiner"
    shutil.copytree(xl, refiner, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    capsys.readouterr()
    assert main(["perflow", str(refiner), "--data", str(captions), "--out", str(tmp_path / "r"), "--steps", "1", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert "refiner" in err and str(refiner) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_sd3_pipeline_job_lora_and_cli_sample(captions, tmp_path_factory, tmp_path, capsys):
    """`rectflow perflow` on a tiny SD3 folder (flow-matching transformer, two CLIPs, no T5), its export in
    the stock StableDiffusion3Pipeline (with and without the job's LoRA loaded by diffusers), and
    `rectflow sample`."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import rectflow.perflow.diffusers_scheduler  # noqa: F401 (registers PeRFlowScheduler for from_pretrained)
    from rectflow.perflow.lora import apply_lora
    from tests.perflow.conftest import SD3_CLIP, build_tiny_sd3

    sd3 = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")
    out = tmp_path / "sd3-perflow"
    code = main(["perflow", str(sd3), "--data", str(captions), "--out", str(out), "-K", "2", "--steps", "2", "--batch-size", "2", "--solver-steps", "1",
                 "--guidance", "2", "--guidance-mode", "student", "--lora-rank", "2", "--prompt", "a red cat", "--device", "cpu", "-q",
                 "--spacing", "teacher"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "perflow.json").read_text())
    assert rec["windows"] == DiscreteFlowMatchingSchedule(shift=3.0).sampling_grid(2).double().tolist()  # the stock sampler's shifted grid
    assert (out / "diffusers" / "scheduler_flowmatch" / "scheduler_config.json").is_file()  # so a stock config is exact at K steps
    assert rec["teacher"]["kind"] == "pipeline" and rec["teacher"]["parameterization"] == "u" and rec["steps_done"] == 2
    assert rec["cache"]["settings"]["pooled_dim"] == 2 * SD3_CLIP and (out / "diffusers" / "transformer" / "config.json").is_file()
    job = load_perflow(out)
    assert job.pipeline.is_sd3 and job.guidance == 2.0
    none = dict.fromkeys(("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder"))
    stock = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out / "diffusers"), local_files_only=True, trust_remote_code=True, **none).to("cpu")
    _stock_equals_ours(stock, job, ((2, 1.0), (3, 2.0)), 1e-5)
    # the LoRA: diffusers loads it into the teacher's transformer as our apply_lora merges it
    base = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3), local_files_only=True, **none).to("cpu")
    base.scheduler = stock.scheduler
    merged = apply_lora(copy.deepcopy(base.transformer), out / "lora")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base("a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(), output_type="latent").images
        base.load_lora_weights(str(out / "lora"))
        theirs = base("a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(), output_type="latent").images
        base.unload_lora_weights()
        base.transformer = merged
        ours = base("a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert float((ours - plain).abs().max()) > 1e-4  # the LoRA did change the transformer
    assert main(["sample", str(out), "--prompt", "an owl", "--n", "2", "--out", str(tmp_path / "s")]) == 0
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["steps"] == 2 and meta["guidance"] == 2.0 and meta["nfe"] == 4 and len(meta["samples"]) == 2


def test_a_transformer_folder_without_text_encoders_is_refused_before_writing(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tests.perflow.test_diffusers_flow import _sd3_folder

    bare = _sd3_folder(tmp_path / "sd3")  # transformer/, vae/, scheduler/: no text encoders
    assert main(["perflow", str(bare), "--data", "digits", "--out", str(tmp_path / "o"), "--steps", "1", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert "without its text encoders" in err and str(bare) in err and not (tmp_path / "o").exists()


_KILLABLE_JOB = """
import sys, time, torch
from rectflow.engine.trainer import TrainConfig
from rectflow.runs.perflow_job import LatentDataOptions, PeRFlowSettings, train_perflow

def slow(trainer, step):  # a training step slow enough to be killed between two checkpoints
    time.sleep(0.3)

torch.set_num_threads(1)
cfg = TrainConfig(steps=int(sys.argv[4]), batch_size=2, lr=1e-3, ema_decay=0.0, device="cpu", progress=False, workers=0, ckpt_every=2, log_every=2,
                  precision="fp32")
import rectflow.engine.trainer as tr
orig = tr.Trainer.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    self.callbacks.append(slow)
tr.Trainer.__init__ = init
train_perflow(sys.argv[1], sys.argv[3], settings=PeRFlowSettings(windows=2, solver_steps=1), train=cfg, data=sys.argv[2],
              latent=LatentDataOptions(shard_size=2), lora_rank=0, prompts=["an owl"])
"""


@pytest.mark.slow
def test_a_pipeline_job_killed_with_sigkill_mid_training_resumes_to_the_same_student(sd_folder, captions, tmp_path):
    """issue 31: a real kill -9 of a text-to-image PeRFlow job between checkpoints, then the same command: bitwise the student of a
    run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _KILLABLE_JOB, str(sd_folder), str(captions)]
    subprocess.run([*args, str(tmp_path / "whole"), "8"], check=True, env=env, timeout=600, capture_output=True)
    proc = subprocess.Popen([*args, str(tmp_path / "part"), "8"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "part" / "checkpoints" / "step_00000004.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "part" / "delta.safetensors").exists()  # killed before the end
    subprocess.run([*args, str(tmp_path / "part"), "8"], check=True, env=env, timeout=600, capture_output=True)
    a, _ = load_tensors(tmp_path / "whole" / "delta.safetensors")
    b, _ = load_tensors(tmp_path / "part" / "delta.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_job_recorded_before_steps_defined_a_cosine_job_still_resumes(sd_folder, captions, tmp_path, monkeypatch):
    """rectflow 0.2.0 left train.steps out of perflow.json and of its checkpoints' records; its jobs resume with the same command."""
    from rectflow.runs import perflow_job as job_mod
    from rectflow.runs.perflow_job import LatentDataOptions
    from rectflow.runs.rundir import RESUMABLE_TRAIN_KEYS

    kw = {"settings": PeRFlowSettings(windows=2, solver_steps=1), "data": captions, "latent": LatentDataOptions(shard_size=2), "lora_rank": 0,
          "prompts": ["an owl"]}
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, lr_schedule="cosine", ema_decay=0.0, device="cpu", progress=False, workers=0, ckpt_every=2)
    with monkeypatch.context() as m:  # the job as 0.2.0 recorded it
        m.setattr(job_mod, "semantic_train", lambda t: {k: v for k, v in t.items() if k not in RESUMABLE_TRAIN_KEYS})
        out = train_perflow(sd_folder, tmp_path / "job", train=cfg, **kw)
    assert "steps" not in json.loads((out / "perflow.json").read_text())["train"]
    train_perflow(sd_folder, tmp_path / "job", train=cfg, **kw)  # no "differs in train.steps"
