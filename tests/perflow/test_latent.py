"""Latent text-to-image teachers from local diffusers folders, and the student exported as a complete
pipeline that the stock StableDiffusionPipeline samples in K steps (tiny models, no download)."""

import inspect
import json
import shutil

import pytest
import torch

from rectflow.errors import CheckpointError, ConfigError, DataError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from rectflow import perflow
from rectflow.flow.solvers import euler
from rectflow.perflow import diffusers_scheduler
from rectflow.perflow.diffusers_io import load_student
from rectflow.perflow.diffusers_scheduler import step_grid
from rectflow.perflow.guidance_modes import Guidance
from rectflow.perflow.latent import export_pipeline, load_pipeline
from rectflow.perflow.scheduler_config import AFFINE_SCHEDULERS, PINNED_KEYS, SAMPLER_KEYS, SCHEDULE_KEYS, schedule_from_config
from tests.perflow.conftest import build_tiny_sd, perturbed_student

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs"]


def _stock(folder, **kw):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True, **kw).to("cpu")




def test_teacher_is_the_unet_on_the_scheduler_path(tiny_pipeline):
    pipe = tiny_pipeline
    assert pipe.parameterization == "eps" and pipe.latent_shape == (4, 8, 8) and pipe.resolution == (16, 16) and pipe.text_shape == (16, 32)
    ref = diffusers.DDIMScheduler.from_pretrained(str(pipe.folder / "scheduler"))
    assert torch.allclose(pipe.schedule.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-7)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.6])
    cond = pipe.encode_text(PROMPTS)
    with torch.no_grad():
        ours = pipe.teacher.raw(z, t, cond)
        theirs = pipe.unet(z, (1 - t) * 1000 - 1, encoder_hidden_states=cond).sample
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ConfigError, match="needs a condition"):
        pipe.teacher.model(z, t)


def test_text_encoding_and_null_condition_match_the_stock_pipeline(tiny_pipeline):
    stock = _stock(tiny_pipeline.folder)
    cond, uncond = stock.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(tiny_pipeline.encode_text(PROMPTS), cond)
    torch.testing.assert_close(tiny_pipeline.null_embedding().expand(2, -1, -1), uncond)
    assert tiny_pipeline.tokenize("abc").shape == (1, 16)
    with pytest.raises(DataError, match=r"prompt 'abcdefghijklmnopq' is 19 tokens, more than the 16 of .*tokenizer"):
        tiny_pipeline.encode_text(["a cat", "abcdefghijklmnopq"])  # the text encoder would cut it silently


@pytest.mark.parametrize("shift", [None, 0.1])
def test_vae_scaling_and_shift(tmp_path, tiny_pipeline, shift):
    pipe = tiny_pipeline if shift is None else load_pipeline(build_tiny_sd(tmp_path / "sd", shift_factor=shift))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = pipe.vae.encode(x).latent_dist.mean
        z = pipe.encode_images(x)
        torch.testing.assert_close(z, (mean - (shift or 0.0)) * 0.18215)
        torch.testing.assert_close(pipe.decode_latents(z), pipe.vae.decode(mean).sample)
        a = pipe.encode_images(x, mode="sample", generator=torch.Generator().manual_seed(1))
        b = pipe.encode_images(x, mode="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, z)
    with pytest.raises(DataError, match=r"expected images \(B, 3, 16, 16\)"):
        pipe.encode_images(torch.zeros(1, 3, 8, 8))


# ----- scheduler configs -> (affine path, parameterisation) ---------------------------------------

@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_scheduler_configs_become_one_affine_path(cls, prediction):
    if cls == "PNDMScheduler" and prediction == "sample":
        pytest.skip("PNDMScheduler accepts only epsilon and v_prediction")
    sched = getattr(diffusers, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction,
                                    timestep_spacing="trailing", steps_offset=1)
    cfg = json.loads(sched.to_json_string())
    path, kind = schedule_from_config(cfg)
    assert kind == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    assert torch.allclose(path.alphas_cumprod, sched.alphas_cumprod.double(), atol=1e-7)


def test_every_key_of_the_supported_schedulers_is_classified():
    """A diffusers upgrade that adds a scheduler key fails here, not in a user's run."""
    known = SCHEDULE_KEYS | SAMPLER_KEYS | set(PINNED_KEYS)
    for cls in AFFINE_SCHEDULERS:
        params = set(inspect.signature(getattr(diffusers, cls).__init__).parameters) - {"self", "kwargs"}
        assert params <= known, (cls, params - known)


@pytest.mark.parametrize("cfg, key", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "FlowMatchEulerDiscreteScheduler"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}, "timestep_type"),
    ({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"}, "prediction_type"),
    ({"_class_name": "DDIMScheduler", "brand_new_key": 3}, "brand_new_key"),
])
def test_unsupported_scheduler_configs_are_refused_naming_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key) as e:
        schedule_from_config(cfg)
    assert "\n" not in str(e.value)


def test_a_pipeline_with_an_unsupported_scheduler_names_the_file(tmp_path, tiny_sd):
    folder = _copy(tiny_sd, tmp_path / "sd")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "TCDScheduler"}))
    with pytest.raises(ConfigError, match=r"scheduler.scheduler_config\.json: diffusers scheduler 'TCDScheduler' .*consistency"):
        load_pipeline(folder)


# ----- folders that are not SD 1.x / 2.x ------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_folders_are_one_line(tmp_path, tiny_sd):
    xl = _copy(tiny_sd, tmp_path / "xl")
    idx = json.loads((xl / "model_index.json").read_text())
    idx.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (xl / "model_index.json").write_text(json.dumps(idx))
    no_vae = _copy(tiny_sd, tmp_path / "novae")
    shutil.rmtree(no_vae / "vae")
    inpaint = _copy(tiny_sd, tmp_path / "inpaint")
    cfg = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    lcm = _copy(tiny_sd, tmp_path / "lcm")
    (lcm / "unet" / "config.json").write_text(json.dumps({**cfg, "time_cond_proj_dim": 256}))
    euler_cont = _copy(tiny_sd, tmp_path / "cont")
    (euler_cont / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}))
    broken = _copy(tiny_sd, tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    cases = [(xl, ConfigError, "no text_encoder_2/"), (no_vae, ConfigError, "no vae/"), (inpaint, ConfigError, "in_channels=9"),
             (lcm, ConfigError, "time_cond_proj_dim"), (euler_cont, ConfigError, "timestep_type"),
             (broken, CheckpointError, "diffusion_pytorch_model.safetensors"), (tmp_path / "nowhere", ConfigError, "does not exist")]
    for folder, err, msg in cases:
        with pytest.raises(err, match=msg) as e:
            load_pipeline(folder)
        assert "\n" not in str(e.value), folder


# ----- export: the stock pipeline samples the student in K steps -----------------------------------

def _ours(student, x, windows, cond, null, w, steps=None):
    """Our K-step sampler under the library's classifier-free guidance (one batched call on cond and
    null rows); the combination in velocity space is the pipeline's in eps space (the conversion is affine)."""
    guide = Guidance(w, null_cond=null[:1])
    grid = step_grid(windows, steps) if steps is not None else perflow.window_grid(windows)
    out = euler(lambda z, t: guide(student, z, t, cond), x, grid).x
    if w != 1.0:  # and by hand: v(null) + w (v(cond) - v(null))
        by_hand = euler(lambda z, t: student(z, t, null) + w * (student(z, t, cond) - student(z, t, null)), x, grid).x
        torch.testing.assert_close(out, by_hand, atol=1e-4, rtol=1e-4)  # batched 2B vs two B calls: float rounding
    return out


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_exported_pipeline_samples_the_student_in_k_steps(tmp_path, tiny_pipeline, w):
    k = 4
    windows = perflow.make_windows(k)
    student = perturbed_student(tiny_pipeline, windows)
    out = export_pipeline(student, tiny_pipeline, tmp_path / "student")
    idx = json.loads((out / "model_index.json").read_text())
    assert idx["scheduler"] == ["scheduling_perflow", "PeRFlowScheduler"] and idx["safety_checker"] == [None, None]
    stock = _stock(out)
    assert type(stock.scheduler).__name__ == "PeRFlowScheduler"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond, null = tiny_pipeline.encode_text(PROMPTS), tiny_pipeline.null_embedding().expand(2, -1, -1)
    with torch.no_grad():
        theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=w, latents=x.clone(), output_type="latent").images
        ours = _ours(student, x, windows, cond, null, w)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    if w == 1.0:  # any step count >= K, our loader, and the stock DDIM config (exact at K)
        with torch.no_grad():
            theirs7 = stock(PROMPTS, height=16, width=16, num_inference_steps=7, guidance_scale=w, latents=x.clone(), output_type="latent").images
            torch.testing.assert_close(theirs7, _ours(student, x, windows, cond, null, w, steps=7), atol=1e-5, rtol=1e-5)
            loaded = load_student(out)
            torch.testing.assert_close(perflow.sample_perflow(loaded, x, loaded.boundaries, cond=cond).x, ours, atol=1e-5, rtol=1e-5)
            stock.scheduler = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler_ddim"))
            ddim = stock(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=w, latents=x.clone(), output_type="latent").images
        torch.testing.assert_close(ddim, ours, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="fewer than the 4 windows"):
            stock.scheduler = diffusers_scheduler.PeRFlowScheduler.from_pretrained(str(out / "scheduler"))
            stock(PROMPTS, height=16, width=16, num_inference_steps=3, latents=x.clone(), output_type="latent")


def test_stock_scheduler_export_loads_without_our_scheduler(tmp_path, tiny_pipeline):
    windows = perflow.make_windows(2)
    student = perturbed_student(tiny_pipeline, windows, seed=1)
    with pytest.warns(UserWarning, match="exact at num_inference_steps=2 only"):  # the stock DDIM cannot refuse other counts
        out = export_pipeline(student, tiny_pipeline.folder, tmp_path / "s", stock_scheduler=True)
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (out / "scheduler_perflow" / "scheduler_config.json").is_file()
    stock = _stock(out)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = tiny_pipeline.encode_text(PROMPTS[:1])
    with torch.no_grad():
        theirs = stock(PROMPTS[:1], height=16, width=16, num_inference_steps=2, guidance_scale=1.0, latents=x.clone(), output_type="latent").images
        torch.testing.assert_close(theirs, perflow.sample_perflow(student, x, windows, cond=cond).x, atol=1e-5, rtol=1e-5)
    # re-exporting over an export replaces it; a foreign folder is refused
    export_pipeline(student, tiny_pipeline, out)
    assert json.loads((out / "model_index.json").read_text())["scheduler"][1] == "PeRFlowScheduler"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_pipeline(student, tiny_pipeline, tmp_path / "foreign")
    with pytest.raises(ConfigError, match="stock_scheduler=True needs windows uniform"):
        export_pipeline(tiny_pipeline.student(perflow.make_windows(boundaries=[0, 0.3, 1])), tiny_pipeline, tmp_path / "s2", stock_scheduler=True)


def test_a_latent_student_trains_on_text_conditions(tiny_pipeline):
    """The conditioning contract end to end: data -> (latents, text embeddings), one training step."""
    from rectflow.engine.trainer import TrainConfig, Trainer

    cond = tiny_pipeline.encode_text(PROMPTS)

    class Data:
        def sample(self, n, generator=None, device=None):
            i = torch.randint(2, (n,), generator=generator)
            return torch.randn(n, 4, 8, 8, generator=generator), cond[i]

    windows = perflow.make_windows(2)
    student = tiny_pipeline.student(windows)
    obj = perflow.PeRFlowObjective(tiny_pipeline.teacher, Data(), windows, solver_steps=1)
    before = [p.detach().clone() for p in student.parameters()]
    Trainer(student, obj, TrainConfig(steps=1, batch_size=2, ema_decay=0.0, device="cpu", progress=False)).fit(resume=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert not any(p.requires_grad for p in tiny_pipeline.unet.parameters())  # the teacher stays frozen


def test_a_v_prediction_pipeline_with_an_euler_config_exports_too(tmp_path):
    """SD 2.x style: v_prediction, an EulerDiscreteScheduler config (its sampling keys are read past)."""
    pipe = load_pipeline(build_tiny_sd(tmp_path / "sd2", prediction_type="v_prediction", scheduler="EulerDiscreteScheduler", seed=3))
    assert pipe.parameterization == "v"
    windows = perflow.make_windows(boundaries=[0, 0.4, 0.7, 1])  # no stock scheduler is exact here
    student = perturbed_student(pipe, windows, seed=4)
    out = export_pipeline(student, pipe, tmp_path / "student")
    assert not (out / "scheduler_ddim").exists()
    stock = _stock(out)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    cond, null = pipe.encode_text(PROMPTS), pipe.null_embedding().expand(2, -1, -1)
    with torch.no_grad():
        theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=2.0, latents=x.clone(), output_type="latent").images
        ours = _ours(student, x, windows, cond, null, 2.0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert load_pipeline(out).parameterization == "v"  # an export reads back as a pipeline (the teacher's schedule)


def test_the_teachers_safety_checker_is_kept_in_the_export(tmp_path, tiny_sd):
    transformers = pytest.importorskip("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = tmp_path / "sd-checked"
    shutil.copytree(tiny_sd, folder)
    tiny = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    cfg = transformers.CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 16, "patch_size": 8}, projection_dim=768)
    torch.manual_seed(0)
    StableDiffusionSafetyChecker(cfg).save_pretrained(str(folder / "safety_checker"))
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(str(folder / "feature_extractor"))
    idx = json.loads((folder / "model_index.json").read_text())
    idx.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=["transformers", "CLIPImageProcessor"],
               requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(idx))
    pipe = load_pipeline(folder)
    out = export_pipeline(perturbed_student(pipe, perflow.make_windows(2)), pipe, tmp_path / "e")
    new = json.loads((out / "model_index.json").read_text())
    assert new["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"] and new["requires_safety_checker"] is True
    assert (out / "safety_checker" / "config.json").is_file() and (out / "feature_extractor" / "preprocessor_config.json").is_file()
    stock = _stock(out)
    assert stock.safety_checker is not None and stock.feature_extractor is not None
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "trust_remote_code=True" in card
