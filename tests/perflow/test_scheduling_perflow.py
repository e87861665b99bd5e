"""PeRFlowScheduler as a diffusers user meets it: exports that load without rectflow, diffusers' scheduler contract
(add_noise / img2img, pred_original_sample, set_begin_index), the teacher's schedule in the config, any timestep dtype,
and the official PeRFlow repository's configs, prediction types and time convention."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from rectflow import perflow
from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler
from rectflow.perflow.latent import export_pipeline
from rectflow.perflow.windows import WindowPath
from tests.perflow.conftest import perturbed_student

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs"]
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
NO_T5 = dict.fromkeys(("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder"))

# Run in a fresh interpreter where importing rectflow fails: load each export with stock diffusers and sample.
_NO_RECTFLOW = textwrap.dedent("""
    import json, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "rectflow" or name.startswith("rectflow."):
                raise ImportError("rectflow is blocked in this test")
    sys.meta_path.insert(0, Block())
    import diffusers, torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    jobs = json.loads(sys.argv[1])
    out = {}
    for job in jobs:
        cls = getattr(diffusers, job["pipeline"])
        kw = {k: None for k in job.get("none", [])}
        pipe = cls.from_pretrained(job["folder"], local_files_only=True, trust_remote_code=job["trust"], **kw)
        pipe.set_progress_bar_config(disable=True)
        x = load_file(job["latents"])["x"]
        for steps in job["steps"]:
            with torch.no_grad():
                out[f"{job['name']}_{steps}"] = pipe(job["prompts"], height=16, width=16, num_inference_steps=steps, guidance_scale=job["w"],
                                                     latents=x.clone(), output_type="latent").images.contiguous()
        out[job["name"] + "_class"] = torch.tensor([type(pipe.scheduler).__name__ == job["scheduler"]])
    assert not any(m == "rectflow" or m.startswith("rectflow.") for m in sys.modules), "rectflow was imported"
    save_file(out, job["result"])
""")


def _sample_in_rectflow(pipe_cls, folder, x, steps, w, none=()):
    stock = pipe_cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True, **dict.fromkeys(none)).to("cpu")
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return {n: stock(PROMPTS, height=16, width=16, num_inference_steps=n, guidance_scale=w, latents=x.clone(), output_type="latent").images for n in steps}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_exports_load_and_sample_where_rectflow_cannot_be_imported(tmp_path, kind, request):
    pipe = request.getfixturevalue({"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline", "sd3": "tiny_sd3_pipeline"}[kind])
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}[kind]
    none = list(NO_T5) if kind == "sd3" else []
    k = 4
    windows = perflow.make_windows(k, spacing="teacher", path=pipe.schedule) if kind == "sd3" else perflow.make_windows(k)
    student = perturbed_student(pipe, windows)
    ours_dir = export_pipeline(student, pipe, tmp_path / "ours")
    with pytest.warns(UserWarning, match="exact at num_inference_steps=4 only"):
        stock_dir = export_pipeline(student, pipe, tmp_path / "stock", stock_scheduler=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    jobs = [{"name": "ours", "pipeline": cls, "folder": str(ours_dir), "trust": True, "steps": [k, k + 3], "w": 2.0, "none": none,
             "scheduler": "PeRFlowScheduler", "prompts": PROMPTS, "latents": str(tmp_path / "x.safetensors"), "result": str(tmp_path / "r.safetensors")},
            {"name": "stock", "pipeline": cls, "folder": str(stock_dir), "trust": False, "steps": [k], "w": 2.0, "none": none,
             "scheduler": "FlowMatchEulerDiscreteScheduler" if kind == "sd3" else "DDIMScheduler", "prompts": PROMPTS,
             "latents": str(tmp_path / "x.safetensors"), "result": str(tmp_path / "r.safetensors")}]
    run = subprocess.run([sys.executable, "-c", _NO_RECTFLOW, json.dumps(jobs)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(str(tmp_path / "r.safetensors"))
    assert bool(got["ours_class"]) and bool(got["stock_class"])
    # the same export sampled in this process, through our own sampler's twin (the scheduler proven equal to
    # sample_perflow in test_latent*.py)
    ref = _sample_in_rectflow(getattr(diffusers, cls), ours_dir, x, [k, k + 3], 2.0, none)
    for n in (k, k + 3):
        torch.testing.assert_close(got[f"ours_{n}"], ref[n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[f"stock_{k}"], ref[k], atol=1e-5, rtol=1e-5)


def _sd_scheduler(k=4, **kw):
    sch = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    path = WindowPath(sch, perflow.make_windows(k))
    cfg = {**SD_BETAS, "windows": [float(v) for v in path.boundaries], "window_alphas": [float(v) for v in path.a_knots],
           "window_sigmas": [float(v) for v in path.b_knots], "prediction_type": "epsilon", **kw}
    return PeRFlowScheduler(**cfg), path


@pytest.mark.parametrize("n", range(4, 41))
def test_step_accepts_int_half_bfloat16_and_float32_timesteps(n):
    sched, _ = _sd_scheduler()
    sched.set_timesteps(n)
    assert sched.timesteps.dtype == torch.float32 and len(sched.timesteps) == n
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(n))
    out = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(n + 100))
    for ts in sched.timesteps:
        ref = sched.step(out, ts, z).prev_sample
        for alt in (torch.tensor(int(ts)), int(ts), ts.half(), ts.bfloat16(), ts.float(), float(ts)):
            torch.testing.assert_close(sched.step(out, alt, z).prev_sample, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="matches none of this schedule's"):
        sched.step(out, float(sched.timesteps[0]) - 0.4 * float(sched.timesteps[0] - sched.timesteps[1]), z)


def test_add_noise_is_the_window_path_and_pred_original_sample_the_implied_x0():
    sched, path = _sd_scheduler(k=4)
    sched.set_timesteps(7)
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    ts = sched.timesteps[[0, 3, 5]]
    t = torch.tensor(sched.grid[[0, 3, 5]])
    c = path.coefficients(t)
    want = c.a.float()[:, None, None, None] * x0 + c.b.float()[:, None, None, None] * eps
    torch.testing.assert_close(sched.add_noise(x0, eps, ts), want)
    # the model predicts eps exactly: pred_original_sample is x0, and the step lands on the path at the next time
    for i in (0, 3, 5):
        z = sched.add_noise(x0, eps, sched.timesteps[i].expand(3))
        res = sched.step(eps, sched.timesteps[i], z)
        torch.testing.assert_close(res.pred_original_sample, x0, atol=1e-5, rtol=1e-5)
        nxt = sched.add_noise(x0, eps, sched.timesteps[i + 1].expand(3)) if i + 1 < 7 else x0 * path.a_knots[-1].float() + eps * path.b_knots[-1].float()
        torch.testing.assert_close(res.prev_sample, nxt, atol=1e-5, rtol=1e-5)
    sched.set_begin_index(3)
    assert sched.begin_index == 3 and sched.init_noise_sigma == 1.0 and sched.order == 1
    assert sched.scale_model_input(x0, ts[0]) is x0
    assert isinstance(sched.sigmas, torch.Tensor) and isinstance(sched.alphas_cumprod, torch.Tensor)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_img2img_runs_on_the_export_from_the_window_path(tmp_path, kind, request):
    pipe = request.getfixturevalue({"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline"}[kind])
    student = perturbed_student(pipe, perflow.make_windows(4))
    out = export_pipeline(student, pipe, tmp_path / "e")
    cls = diffusers.StableDiffusionImg2ImgPipeline if kind == "sd" else diffusers.StableDiffusionXLImg2ImgPipeline
    img2img = cls.from_pretrained(str(out), local_files_only=True, trust_remote_code=True).to("cpu")
    img2img.set_progress_bar_config(disable=True)
    calls = []
    step, add_noise = img2img.scheduler.step, img2img.scheduler.add_noise
    img2img.scheduler.step = lambda o, t, s, **kw: calls.append(float(t)) or step(o, t, s, **kw)
    noised = []
    img2img.scheduler.add_noise = lambda x, e, t: noised.append(t.clone()) or add_noise(x, e, t)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res = img2img(PROMPTS[:1], image=image, strength=0.5, num_inference_steps=8, guidance_scale=1.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert res.shape == (1, 3, 16, 16) and bool(torch.isfinite(res).all())
    img2img.scheduler.set_timesteps(8)
    assert calls == [float(t) for t in img2img.scheduler.timesteps[4:]]  # half the grid, from a window boundary
    assert float(noised[0][0]) == float(img2img.scheduler.timesteps[4])


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_from_config_into_a_stock_scheduler_gives_the_teachers_schedule(tmp_path, kind, request):
    pipe = request.getfixturevalue({"sd": "tiny_pipeline", "sd3": "tiny_sd3_pipeline"}[kind])
    out = export_pipeline(perturbed_student(pipe, perflow.make_windows(4)), pipe, tmp_path / "e")
    ours = PeRFlowScheduler.from_pretrained(str(out / "scheduler"))
    if kind == "sd":
        teacher = diffusers.DDIMScheduler.from_pretrained(str(pipe.folder / "scheduler"))
        again = diffusers.DDIMScheduler.from_config(ours.config)
        torch.testing.assert_close(again.alphas_cumprod, teacher.alphas_cumprod, rtol=0, atol=0)
        torch.testing.assert_close(ours.alphas_cumprod, teacher.alphas_cumprod, rtol=0, atol=1e-7)
    else:
        teacher = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipe.folder / "scheduler"))
        again = diffusers.FlowMatchEulerDiscreteScheduler.from_config(ours.config)
        assert again.config.shift == teacher.config.shift
        again.set_timesteps(6)
        teacher.set_timesteps(6)
        torch.testing.assert_close(again.sigmas, teacher.sigmas)


# ----- the official repository's scheduler, written here from its documented behaviour -------------------------------------


def _official_steps(n_train, k, n):
    """The official timesteps: windows start at 1. * i / K (i = K .. 1), each split by linspace(start, end, m, endpoint=False),
    times N, as int64."""
    starts = [1.0 * i / k for i in range(1, k + 1)][::-1]
    ends = starts[1:] + [0]
    ts = []
    for i in range(k):
        m = n // k + (1 if i < n % k else 0)
        ts.append(np.linspace(starts[i], ends[i], num=m, endpoint=False))
    return (np.concatenate(ts) * n_train).astype(np.int64)


def _official_window(k, tc, n_train):
    """The official lookup: the first window (from the noise end) whose end lies below tc - 0.1 / N."""
    starts = [1.0 * i / k for i in range(1, k + 1)][::-1]
    ends = starts[1:] + [0]
    idx = 0
    while tc - 0.1 / n_train <= ends[idx]:
        idx += 1
    return starts[idx], ends[idx]


def _official_step(abar, k, n_train, timesteps, kind, out, ts, z):
    """One official step at integer timestep ts: the window holding tau = ts / N (ends at tau_e), its knots
    abar[N tau_s - 1] and abar[max(N tau_e - 1, 0)], the window-end prediction, then Euler to the next timestep."""
    tc = ts / n_train
    t_s, t_e = _official_window(k, tc, n_train)
    a_s, a_e = abar[int(round(t_s * n_train)) - 1], abar[max(int(round(t_e * n_train)) - 1, 0)]
    if kind == "velocity":
        v = out
    else:
        if kind == "ddim_eps":
            lam_s = (a_e / a_s) ** 0.5
            eta_s = (1 - a_e) ** 0.5 - (a_e / a_s * (1 - a_s)) ** 0.5
        else:
            g = (a_s / a_e) ** 0.5
            lam_s, eta_s = 1 / g, -((1 - g * g) ** 0.5) / g
        den = lam_s * (tc - t_s) + (t_e - tc)
        z_end = (lam_s * (t_e - t_s) / den) * z + (eta_s * (t_e - tc) / den) * out
        v = (z_end - z) / (t_e - tc)
    j = list(timesteps).index(ts)
    prev = timesteps[j + 1] if j + 1 < len(timesteps) else 0
    return z + (prev - ts) / n_train * v


@pytest.mark.parametrize("kind", ["ddim_eps", "diff_eps", "velocity"])
@pytest.mark.parametrize("k, n", [(4, 4), (4, 6), (4, 8), (4, 11), (3, 13), (5, 5), (5, 12), (6, 7), (7, 9), (10, 10)])
def test_the_official_config_prediction_types_and_time_convention(kind, k, n):
    stock = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched = PeRFlowScheduler.from_config(stock.config, prediction_type=kind, num_time_windows=k)  # as the official README does
    sched.set_timesteps(n)
    want_ts = _official_steps(1000, k, n)
    assert sched.timesteps.tolist() == want_ts.astype(np.float32).tolist()  # 1000 at pure noise, int(N tau)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).numpy()
    g = torch.Generator().manual_seed(n)
    z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    ref = z.clone()
    zz = z.float()
    for ts in want_ts:
        out = torch.sin(3 * ref + ts / 300.0)  # any model output, a function of the state and time
        ref = _official_step(abar, k, 1000, list(want_ts), kind, out, int(ts), ref)
        zz = sched.step(torch.sin(3 * zz.double() + ts / 300.0).float(), torch.tensor(int(ts)), zz).prev_sample
    torch.testing.assert_close(zz.double(), ref, atol=2e-4, rtol=2e-4)


def test_a_scheduler_config_we_cannot_honour_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        PeRFlowScheduler(**SD_BETAS, prediction_type="mystery")
    with pytest.raises(ValueError, match="t_noise = 1 and t_clean = 0"):
        PeRFlowScheduler(**SD_BETAS, prediction_type="ddim_eps", t_noise=0.9)
    with pytest.raises(ValueError, match="window_alphas and window_sigmas"):
        PeRFlowScheduler(**SD_BETAS, windows=[0, 0.5, 1])
    with pytest.raises(ValueError, match="uniform windows"):
        PeRFlowScheduler(**SD_BETAS, prediction_type="ddim_eps", windows=[0, 0.3, 1], window_alphas=[0.1, 0.5, 1], window_sigmas=[1, 0.8, 0])


def test_official_delta_folder_round_trip_and_the_official_loaders(tmp_path, tiny_pipeline):
    from rectflow.perflow.delta import apply_delta
    from rectflow.perflow.official import OFFICIAL_DELTA_FILE, load_official_delta, save_official_delta

    pipe, k = tiny_pipeline, 4
    windows = perflow.make_windows(k)
    student = perturbed_student(pipe, windows)
    folder = save_official_delta(tmp_path / "official", student.net, pipe.denoiser, pipe.scheduler_config, windows, "eps")
    assert (folder / OFFICIAL_DELTA_FILE).is_file() and (folder / "config.json").is_file()
    # the official README's route: the folder loads as a UNet whose state dict is the delta
    as_unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).state_dict()
    delta = load_official_delta(folder)
    assert as_unet.keys() == delta.keys()
    for name, d in delta.items():
        torch.testing.assert_close(as_unet[name], d, rtol=0, atol=0)
    base = diffusers.UNet2DConditionModel.from_pretrained(str(pipe.folder / "unet"))
    apply_delta(base, load_official_delta(folder / OFFICIAL_DELTA_FILE))  # its load_delta_weights_into_unet: W_base + delta
    for name, w in base.state_dict().items():
        torch.testing.assert_close(w, student.net.unet.state_dict()[name], atol=1e-6, rtol=1e-6)
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "ddim_eps" and cfg["num_time_windows"] == k and cfg["beta_schedule"] == "scaled_linear"
    sched = PeRFlowScheduler.from_config(cfg)
    sched.set_timesteps(k)
    assert sched.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    # sampled as the official scheduler would: the window path of our export up to its two conventions (time + 1, last knot)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_text(PROMPTS)
    z = x.clone()
    with torch.no_grad():
        for ts in sched.timesteps:
            z = sched.step(base(z, ts, encoder_hidden_states=cond).sample, ts, z).prev_sample
        ours = perflow.sample_perflow(student, x, windows, cond=cond).x
    assert float((z - ours).norm() / ours.norm()) < 0.05
    with pytest.raises(ValueError, match="uniform windows only"):
        save_official_delta(tmp_path / "o2", student.net, pipe.denoiser, pipe.scheduler_config, perflow.make_windows(boundaries=[0, 0.3, 1]), "eps")
    with pytest.raises(ValueError, match="predicts 'v'"):
        save_official_delta(tmp_path / "o3", student.net, pipe.denoiser, pipe.scheduler_config, windows, "v")
    with pytest.raises(ValueError, match="not an official PeRFlow delta folder"):
        load_official_delta(tmp_path)


def test_exported_scheduler_config_has_no_negative_zero(tmp_path, tiny_pipeline):
    out = export_pipeline(perturbed_student(tiny_pipeline, perflow.make_windows(4)), tiny_pipeline, tmp_path / "e")
    text = (out / "scheduler" / "scheduler_config.json").read_text()
    assert "-0.0" not in text and json.loads(text)["window_sigmas"][-1] == 0.0


def test_a_bit_flipped_exported_weights_file_is_refused(tmp_path, tiny_pipeline):
    """The student's weights are checksummed in perflow.json and verified when rectflow loads the export (diffusers
    itself reads any bytes that parse; a flipped bit in a tensor would otherwise sample silently wrong)."""
    from rectflow.errors import CheckpointError
    from rectflow.perflow.diffusers_io import load_student

    out = export_pipeline(perturbed_student(tiny_pipeline, perflow.make_windows(2)), tiny_pipeline, tmp_path / "e")
    meta = json.loads((out / "perflow.json").read_text())
    assert "unet/diffusion_pytorch_model.safetensors" in meta["files_sha256"]
    load_student(out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's bytes: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*checksum"):
        load_student(out)


# ----- review fixes ------------------------------------------------------------------------------------------------------------


def test_from_config_gives_the_teachers_own_ddim_back_not_diffusers_defaults(tmp_path, tiny_pipeline):
    """clip_sample, set_alpha_to_one, steps_offset and timestep_spacing travel with the betas (a DDIM built from a config without
    them clipped SD latents to [-1, 1] and stepped on other timesteps)."""
    out = export_pipeline(perturbed_student(tiny_pipeline, perflow.make_windows(4)), tiny_pipeline, tmp_path / "e")
    ours = PeRFlowScheduler.from_pretrained(str(out / "scheduler"))
    teacher = diffusers.DDIMScheduler.from_pretrained(str(tiny_pipeline.folder / "scheduler"))
    again = diffusers.DDIMScheduler.from_config(ours.config)
    for key in ("clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing", "prediction_type"):
        assert again.config[key] == teacher.config[key], key
    teacher.set_timesteps(4)
    again.set_timesteps(4)
    assert again.timesteps.tolist() == teacher.timesteps.tolist()
    assert "interpolation_type" not in ours.config  # a key the teacher's config does not have is not invented


def test_a_timestep_that_its_dtype_cannot_tell_apart_is_refused_not_mapped_to_a_neighbour():
    sched, _ = _sd_scheduler()
    sched.set_timesteps(1000)  # neighbouring timesteps 1 apart: bf16 (spacing 4 near 1000) cannot tell them apart
    z, out = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="matches [0-9]+ .*cannot tell them apart"):
        sched.step(out, sched.timesteps[250].bfloat16(), z)
    sched.step(out, sched.timesteps[250], z)  # the float32 timestep itself is fine
    with pytest.raises(ValueError, match="a batch of different timesteps"):
        sched.step(out, torch.tensor([999.0, 499.0]), z)
    for junk in (torch.tensor([]), float("nan"), "999", torch.tensor(1 + 2j)):
        with pytest.raises(ValueError, match="timestep"):
            sched.step(out, junk, z)


def test_official_prediction_types_on_an_exports_config_are_refused(tmp_path, tiny_pipeline):
    out = export_pipeline(perturbed_student(tiny_pipeline, perflow.make_windows(4)), tiny_pipeline, tmp_path / "e")
    cfg = PeRFlowScheduler.from_pretrained(str(out / "scheduler")).config
    with pytest.raises(ValueError, match="official repository's"):
        PeRFlowScheduler.from_config(cfg, prediction_type="diff_eps")
    with pytest.raises(ValueError, match="num_time_windows=8 but the config's windows are 4"):
        PeRFlowScheduler.from_config(cfg, num_time_windows=8)


@pytest.mark.slow
def test_a_loaded_export_saved_again_still_loads_without_rectflow(tmp_path, tiny_pipeline):
    out = export_pipeline(perturbed_student(tiny_pipeline, perflow.make_windows(4)), tiny_pipeline, tmp_path / "e")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    pipe.save_pretrained(str(tmp_path / "again"))
    idx = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert idx["scheduler"] == ["scheduling_perflow", "PeRFlowScheduler"]
    assert (tmp_path / "again" / "scheduler" / "scheduling_perflow.py").is_file()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    job = {"name": "again", "pipeline": "StableDiffusionPipeline", "folder": str(tmp_path / "again"), "trust": True, "steps": [4], "w": 1.0,
           "scheduler": "PeRFlowScheduler", "prompts": PROMPTS, "latents": str(tmp_path / "x.safetensors"), "result": str(tmp_path / "r.safetensors")}
    run = subprocess.run([sys.executable, "-c", _NO_RECTFLOW, json.dumps([job])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "r.safetensors"))["again_4"], _sample_in_rectflow(diffusers.StableDiffusionPipeline, out, x, [4], 1.0)[4])


@pytest.mark.slow
def test_sd3_img2img_runs_on_the_export(tmp_path, tiny_sd3_pipeline):
    pipe = tiny_sd3_pipeline
    out = export_pipeline(perturbed_student(pipe, perflow.make_windows(4, spacing="teacher", path=pipe.schedule)), pipe, tmp_path / "e")
    img2img = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(str(out), local_files_only=True, trust_remote_code=True, **NO_T5)
    img2img.set_progress_bar_config(disable=True)
    with torch.no_grad():
        res = img2img(PROMPTS[:1], image=torch.rand(1, 3, 16, 16), strength=0.5, num_inference_steps=8, guidance_scale=1.0, output_type="pt").images
    assert res.shape == (1, 3, 16, 16) and bool(torch.isfinite(res).all())


def test_model_cards_name_the_folder_and_say_how_it_loads(tmp_path, tiny_pipeline):
    student = perturbed_student(tiny_pipeline, perflow.make_windows(4))
    card = (export_pipeline(student, tiny_pipeline, tmp_path / "mine") / "README.md").read_text()
    assert 'from_pretrained("mine", trust_remote_code=True)' in card and ".tmp" not in card
    with pytest.warns(UserWarning):
        stock = (export_pipeline(student, tiny_pipeline, tmp_path / "stock", stock_scheduler=True) / "README.md").read_text()
    assert 'from_pretrained("stock")' in stock and "trust_remote_code" not in stock.split("```")[1] and "num_inference_steps=4," in stock
    assert PeRFlowScheduler.from_pretrained(str(tmp_path / "mine" / "scheduler")).alphas_cumprod is not None


def test_the_standalone_scheduler_and_the_exporter_agree_on_the_teacher_keys():
    from rectflow.perflow import scheduler_config, scheduling_perflow

    assert scheduling_perflow.TEACHER_SAMPLER_KEYS == scheduler_config.TEACHER_SAMPLER_KEYS
