"""diffusers in/out for PeRFlow: local folders only, tiny random UNet2DModel (no download)."""

import json

import pytest
import torch

from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

from rectflow import perflow  # noqa: E402
from rectflow.engine.trainer import TrainConfig, Trainer  # noqa: E402
from rectflow.flow.solvers import euler  # noqa: E402
from rectflow.perflow.diffusers_io import export_student, load_student, load_teacher  # noqa: E402
from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler, step_grid  # noqa: E402
from rectflow.perflow.scheduler_config import schedule_from_config  # noqa: E402

torch.set_num_threads(1)


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def _teacher_folder(tmp_path, prediction_type="epsilon"):
    folder = tmp_path / "teacher"
    _tiny_unet().save_pretrained(str(folder / "unet"))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    sched.save_pretrained(str(folder / "scheduler"))
    return folder


class _Data:
    def sample(self, n, generator=None, device=None):
        return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


def test_load_teacher_maps_schedule_and_kind(tmp_path):
    t = load_teacher(_teacher_folder(tmp_path, "v_prediction"))
    assert t.parameterization == "v" and isinstance(t.path, DDPMSchedule)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000)
    assert torch.allclose(t.path.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6)
    cos, kind = schedule_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"})
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    assert kind == "eps" and torch.allclose(cos.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "directory"])
def test_unreadable_weights_are_one_line_naming_the_file(tmp_path, damage):
    """issue 13 item 12: a corrupt weights file escaped as a bare OSError from diffusers."""
    folder = _teacher_folder(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if damage == "directory":
        weights.unlink()
        weights.mkdir()
    else:
        weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors") as e:
        load_teacher(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["scheduler/scheduler_config.json", "unet/config.json"])
def test_corrupt_json_of_a_diffusers_folder_is_named(tmp_path, name):
    folder = _teacher_folder(tmp_path)
    (folder / name).write_bytes(b"\xff{not json")
    with pytest.raises((CheckpointError, ConfigError), match=name.split("/")[-1]) as e:
        load_teacher(folder)
    assert "\n" not in str(e.value)


def test_missing_config_and_non_affine_schedule(tmp_path):
    folder = _teacher_folder(tmp_path)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        load_teacher(folder)
    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="affine"):
        schedule_from_config({"_class_name": "ScoreSdeVeScheduler"})
    with pytest.raises(ConfigError, match="zero_snr|alpha = 0"):
        schedule_from_config({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    with pytest.raises(ConfigError, match="affine"):
        schedule_from_config({"beta_schedule": "sigmoid"})


def test_an_unsupported_scheduler_file_is_named_with_the_reason(tmp_path):
    folder = _teacher_folder(tmp_path)
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({"_class_name": "LCMScheduler", "num_train_timesteps": 1000}))
    with pytest.raises(ConfigError, match=r"scheduler_config\.json: diffusers scheduler 'LCMScheduler' .*consistency") as e:
        load_teacher(folder)
    assert str(cfg) in str(e.value) and "\n" not in str(e.value)
    cfg.write_text(json.dumps({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True}))
    with pytest.raises(ConfigError, match=r"scheduler_config\.json: diffusers scheduler: rescale_betas_zero_snr"):
        load_teacher(folder)


@pytest.mark.parametrize("k", [4, 10])  # K = 10: window starts 0.1, 0.3, ... round below in float32
def test_train_export_import_identical_samples(tmp_path, k):
    folder = _teacher_folder(tmp_path)
    teacher = load_teacher(folder)
    windows = perflow.make_windows(k)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    obj = perflow.PeRFlowObjective(teacher, _Data(), windows, solver_steps=2)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, ema_decay=0.0, device="cpu", progress=False,
                      log_every=1, ckpt_every=1000)
    Trainer(student, obj, cfg, run_dir=tmp_path / "run").fit(resume=False)
    out = export_student(student, tmp_path / "student", folder)
    meta = json.loads((out / "perflow.json").read_text())
    assert meta["stock_scheduler_exact"] and meta["windows"] == pytest.approx([i / k for i in range(k + 1)], abs=1e-12)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = perflow.sample_perflow(student, x, windows)
        loaded = load_student(out)
        again = perflow.sample_perflow(loaded, x, loaded.boundaries)
        # stock diffusers: DDIMScheduler from the exported config + the exported UNet
        unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet"))
        sched = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler_ddim"))
        sched.set_timesteps(k)
        z = x.clone()
        for ts in sched.timesteps:
            z = sched.step(unet(z, ts).sample, ts, z).prev_sample
    assert ours.nfe == k
    assert torch.equal(ours.x, again.x)
    assert torch.allclose(z, ours.x, atol=1e-5), (z - ours.x).abs().max()


def test_non_uniform_windows_export_without_stock_scheduler(tmp_path):
    folder = _teacher_folder(tmp_path)
    teacher = load_teacher(folder)
    student = perflow.PeRFlowStudent.from_teacher(teacher, perflow.make_windows(boundaries=[0, 0.3, 1]))
    out = export_student(student, tmp_path / "s", folder)
    assert not (out / "scheduler_ddim").exists() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert not json.loads((out / "perflow.json").read_text())["stock_scheduler_exact"]
    loaded = load_student(out)
    assert torch.equal(loaded.boundaries, student.boundaries)


@pytest.mark.parametrize("n", [4, 8, 7, 13])  # K = 4 windows: any n >= K, the remainder spread over the first windows
def test_exported_scheduler_reproduces_our_sampler_at_any_step_count(tmp_path, n):
    folder = _teacher_folder(tmp_path)
    teacher = load_teacher(folder)
    windows = perflow.make_windows(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    with torch.no_grad():  # move the student off the teacher so the comparison is not DDIM against DDIM
        for p in student.net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = export_student(student, tmp_path / "student", folder)
    sched = PeRFlowScheduler.from_pretrained(str(out / "scheduler"))
    unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet"))
    sched.set_timesteps(n)
    assert len(sched.timesteps) == n
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = x.clone()
        for ts in sched.timesteps:
            z = sched.step(unet(z, ts.float()).sample, ts, z).prev_sample
        ours = euler(student, x, step_grid(windows, n))
    assert torch.allclose(z, ours.x, atol=1e-5), (z - ours.x).abs().max()
    if n % 4 == 0:
        torch.testing.assert_close(ours.x, perflow.sample_perflow(student, x, windows, steps_per_window=n // 4).x)
    with pytest.raises(ValueError, match="fewer than the 4 windows"):
        sched.set_timesteps(3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exported_scheduler_steps_a_half_precision_pipeline_as_in_float32(dtype):
    """A pipeline in fp16 / bf16 hands the scheduler half-precision samples: the step is computed in
    float32 (as diffusers' schedulers upcast), so it neither refuses SD's small a(0) as singular nor
    reads a grid point near a boundary on the next window's slopes (fp16's rounding is 1e-3 of t)."""
    sd = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    schedule, _ = schedule_from_config(sd)
    windows = perflow.make_windows(4)
    c = schedule.coefficients(windows)
    sched = PeRFlowScheduler(windows=windows.tolist(), alphas=c.a.tolist(), sigmas=c.b.tolist())
    gen = torch.Generator().manual_seed(0)
    for n in (16, 160):
        sched.set_timesteps(n)
        for ts in sched.timesteps:
            z, eps = torch.randn(2, 4, 4, 4, generator=gen).to(dtype), torch.randn(2, 4, 4, 4, generator=gen).to(dtype)
            low = sched.step(eps, ts, z).prev_sample
            ref = sched.step(eps.float(), ts, z.float()).prev_sample.to(dtype)  # the same rounded inputs, stepped in float32
            assert low.dtype == dtype
            torch.testing.assert_close(low, ref, rtol=0, atol=0)


def test_export_is_all_or_nothing_and_never_writes_into_a_foreign_folder(tmp_path, monkeypatch):
    folder = _teacher_folder(tmp_path)
    student = perflow.PeRFlowStudent.from_teacher(load_teacher(folder), perflow.make_windows(2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty and holds no PeRFlow export"):
        export_student(student, tmp_path / "mine", folder)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    out = export_student(student, tmp_path / "student", folder)
    before = (out / "perflow.json").read_bytes()

    import rectflow.perflow.diffusers_io as dio

    def dies(*a, **k):
        raise KeyboardInterrupt  # a Ctrl-C after the UNet is written, before the scheduler
    monkeypatch.setattr(dio, "perflow_scheduler_config", dies)
    with pytest.raises(KeyboardInterrupt):
        export_student(student, out, folder)
    assert (out / "perflow.json").read_bytes() == before and (out / "unet" / "config.json").is_file()  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    monkeypatch.undo()
    export_student(student, out, folder)  # a previous export is replaced
    assert json.loads((out / "perflow.json").read_text())["windows"] == [0.0, 0.5, 1.0]
