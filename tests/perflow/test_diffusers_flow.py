"""Flow-matching transformer teachers (SD3 layout) with FlowMatchEulerDiscreteScheduler and its shift
(theory §6.10): a tiny random SD3Transformer2DModel built from a config, nothing downloaded, no text
encoders (the condition is the precomputed pair (encoder_hidden_states, pooled_projections))."""

import json
import shutil

import pytest
import torch

from rectflow.diffusion.samplers import ddim
from rectflow.diffusion.schedules import DiscreteFlowMatchingSchedule, FlowMatchingSchedule
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.solvers import euler

diffusers = pytest.importorskip("diffusers")

from rectflow import perflow
from rectflow.perflow.adapters import SD3TransformerAdapter
from rectflow.perflow.diffusers_io import export_student, load_student, load_teacher
from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler, step_grid
from rectflow.perflow.scheduler_config import flow_match_scheduler_config, schedule_from_config

torch.set_num_threads(1)

SHIFT, L, D, P = 3.0, 5, 16, 16
NO_TEXT = {k: None for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")}


def _sd3_folder(path, *, shift=SHIFT, seed=0):
    """A tiny SD3-layout folder: transformer/ (8x8x4 latents, 1 joint block), vae/, scheduler/, model_index.json."""
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                                  num_attention_heads=2, joint_attention_dim=D, caption_projection_dim=16,
                                                  pooled_projection_dim=P, out_channels=4, pos_embed_max_size=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                                  norm_num_groups=8, sample_size=16, layers_per_block=1)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
                                              vae=vae, **NO_TEXT)
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _sd3_folder(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def _cond(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, D, generator=g), torch.randn(b, P, generator=g)


def _noise(b=2, seed=2):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _stock_loop(transformer, scheduler, x, cond, steps):
    """diffusers' own K-step sampling: set_timesteps(K), then step(transformer(...), t, z) at each timestep."""
    scheduler.set_timesteps(steps)
    z = x.clone()
    for ts in scheduler.timesteps:
        u = transformer(hidden_states=z, timestep=ts.expand(z.shape[0]), encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample
        z = scheduler.step(u, ts, z).prev_sample
    return z


def _perturb(net):
    with torch.no_grad():  # move a student off its teacher so equalities are not teacher against teacher
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_flow_match_config_is_the_straight_line_with_sigma_time_input():
    fm = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT}
    with pytest.raises(ConfigError, match="only with a transformer teacher") as e:  # the SD 1.x / 2.x latent pipeline's call
        schedule_from_config(fm)
    assert "\n" not in str(e.value)
    sch, kind = schedule_from_config(fm, allow_flow=True)
    assert kind == "u" and isinstance(sch, DiscreteFlowMatchingSchedule) and sch.shift == SHIFT and sch.num_steps == 1000
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    stock.set_timesteps(6)
    t = 1 - stock.sigmas[:-1].double()
    for got, want in zip(sch.coefficients(t), FlowMatchingSchedule().coefficients(t)):  # the shift moves no coefficient
        assert torch.equal(got, want)
    x0, noise = _noise(3, 5), _noise(3, 6)
    for i, ts in enumerate(stock.timesteps):  # diffusers' forward process == a(t) x0 + b(t) noise at t = 1 - timestep / N
        c = sch.coefficients(sch.timestep_to_t(ts.double()).reshape(1))
        ours = float(c.a) * x0 + float(c.b) * noise
        torch.testing.assert_close(stock.scale_noise(x0, ts.reshape(1), noise), ours, rtol=0, atol=1e-6)
        assert abs(float(sch.t_to_timestep(t[i])) - float(ts)) < 1e-3  # the network's time input is sigma N
    # a stock scheduler's defaults (every key written out) read the same
    full, _ = schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **{k: v for k, v in stock.config.items() if not k.startswith("_")}},
                                   allow_flow=True)
    assert full.shift == SHIFT


@pytest.mark.parametrize("shift", [1.0, SHIFT, 0.5])
@pytest.mark.parametrize("k", [1, 2, 4, 7, 28])
def test_sampling_grid_is_the_stock_schedulers_k_step_grid(shift, k):
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    stock.set_timesteps(k)
    grid = DiscreteFlowMatchingSchedule(1000, shift).sampling_grid(k)
    torch.testing.assert_close(grid, 1 - stock.sigmas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(DiscreteFlowMatchingSchedule(1000, shift).t_to_timestep(grid[:-1]), stock.timesteps.double(), rtol=0, atol=1e-3)


@pytest.mark.parametrize(("key", "value"), [("use_dynamic_shifting", True), ("invert_sigmas", True), ("shift_terminal", 0.1),
                                            ("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                                            ("prediction_type", "epsilon"), ("shift", 0.0), ("shift", -1.0), ("num_train_timesteps", 0)])
def test_unsupported_flow_match_keys_are_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", key: value}, allow_flow=True)
    assert "\n" not in str(e.value)


def test_other_flow_schedulers_and_folders_are_refused_in_one_line(sd3, tmp_path):
    with pytest.raises(ConfigError, match="FlowMatchHeunDiscreteScheduler") as e:
        schedule_from_config({"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0}, allow_flow=True)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    (empty / "scheduler").mkdir(parents=True)
    (empty / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(ConfigError, match="neither unet/config.json nor transformer/config.json") as e:
        load_teacher(empty)
    assert "\n" not in str(e.value)
    # a transformer on a DDPM schedule, and a transformer class we do not drive
    ddpm = tmp_path / "ddpm"
    shutil.copytree(sd3, ddpm)
    (ddpm / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ConfigError, match="flow-matching scheduler") as e:
        load_teacher(ddpm)
    assert "\n" not in str(e.value)
    flux = tmp_path / "flux"
    shutil.copytree(sd3, flux)
    cfg = json.loads((flux / "transformer" / "config.json").read_text())
    (flux / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ConfigError, match="FluxTransformer2DModel") as e:
        load_teacher(flux)
    assert "\n" not in str(e.value)


def test_text_prompts_and_missing_conditions_are_refused_in_one_line(sd3):
    teacher = load_teacher(sd3)
    x, t = _noise(1), torch.full((1,), 0.3)
    for bad, match in [("a photo of a cat", "text prompts"), (["a cat"], "text prompts"), (None, "pair"),
                       (torch.randn(1, L, D), "pair"), ((torch.randn(1, L, D),), "pair")]:
        with pytest.raises(ConfigError, match=match) as e:
            teacher.raw(x, t, bad) if bad is not None else teacher.model(x, teacher.time_map(t), None)
        assert "\n" not in str(e.value)
    hidden, pooled = _cond(1)  # the pair as a dict reads the same as the tuple
    with torch.no_grad():
        assert torch.equal(teacher.raw(x, t, {"encoder_hidden_states": hidden, "pooled_projections": pooled}), teacher.raw(x, t, (hidden, pooled)))


@pytest.mark.parametrize("k", [1, 4])
def test_teacher_euler_on_the_shifted_grid_is_the_stock_scheduler_loop(sd3, k):
    teacher = load_teacher(sd3)
    assert isinstance(teacher.model, SD3TransformerAdapter) and teacher.parameterization == "u"
    assert isinstance(teacher.path, DiscreteFlowMatchingSchedule) and teacher.path.shift == SHIFT
    cond, x = _cond(), _noise()
    grid = teacher.path.sampling_grid(k)
    with torch.no_grad():
        ours = euler(lambda z, t: teacher.velocity(z, t, cond), x, grid)
        as_ddim = ddim(lambda z, t: teacher.raw(z, t, cond), x, grid, path=teacher.path, parameterization="u")  # theory §6.4: DDIM == Euler here
        stock = _stock_loop(teacher.model.transformer, diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3 / "scheduler")), x, cond, k)
    assert ours.nfe == k
    torch.testing.assert_close(ours.x, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(as_ddim.x, stock, rtol=1e-5, atol=1e-5)


def test_guided_teacher_on_the_shifted_grid_is_the_stock_pipeline_with_cfg(sd3):
    """load_teacher(guidance=w, null_cond=the empty prompt's pair): CFG in the transformer's output space, as the stock pipeline does it."""
    hidden0, pooled0 = _cond(1, seed=9)
    null = (hidden0[0], pooled0[0])  # one example's shapes (L, D) and (P,), broadcast over the batch
    teacher = load_teacher(sd3, guidance=4.0, null_cond=null)
    cond, x = _cond(), _noise()
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3), **NO_TEXT)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ours = euler(lambda z, t: teacher.velocity(z, t, cond), x, teacher.path.sampling_grid(3))
        piped = pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], negative_prompt_embeds=hidden0.expand(2, L, D),
                     negative_pooled_prompt_embeds=pooled0.expand(2, P), latents=x, num_inference_steps=3, guidance_scale=4.0,
                     output_type="latent", height=16, width=16).images
    assert teacher.nfe_per_eval == 2
    torch.testing.assert_close(ours.x, piped, rtol=1e-5, atol=1e-5)


def test_fresh_student_on_the_shifted_windows_is_the_teachers_k_step_sampler(sd3):
    teacher = load_teacher(sd3)
    cond, x = _cond(), _noise()
    windows = teacher.path.sampling_grid(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    with torch.no_grad():
        ours = perflow.sample_perflow(student, x, windows, cond=cond)
        stock = _stock_loop(teacher.model.transformer, diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT), x, cond, 4)
        teacher_euler = euler(lambda z, t: teacher.velocity(z, t, cond), x, windows)
    assert ours.nfe == 4
    torch.testing.assert_close(ours.x, teacher_euler.x, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.x, stock, rtol=1e-5, atol=1e-5)


def test_training_export_and_the_stock_pipeline_reproduce_our_k_step_sampler(sd3, tmp_path):
    """issue 15: a trained student on the shifted K-step grid exports with a stock FlowMatchEulerDiscreteScheduler
    config; the stock scheduler loop, StableDiffusion3Pipeline (text encoders None, embeddings given, CFG)
    and our loader all give our K-step samples."""
    teacher = load_teacher(sd3)
    k = 4
    windows = teacher.path.sampling_grid(k)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    hidden0, pooled0 = _cond(1, seed=9)
    null = (hidden0[0] * 0, pooled0[0] * 0)  # a stand-in for the empty prompt's pair

    class Data:  # (latents, (encoder_hidden_states, pooled_projections))
        def sample(self, n, generator=None, device=None):
            return (torch.randn(n, 4, 8, 8, generator=generator),
                    (torch.randn(n, L, D, generator=generator), torch.randn(n, P, generator=generator)))

    obj = perflow.PeRFlowObjective(teacher, Data(), windows, solver_steps=2, p_uncond=0.5, null_cond=null)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.0, device="cpu", progress=False, log_every=1, ckpt_every=1000)
    Trainer(student, obj, cfg, run_dir=tmp_path / "run").fit(resume=False)
    _perturb(student.net)  # two steps move the weights too little to tell teacher and student apart
    out = export_student(student, tmp_path / "student", sd3)
    meta = json.loads((out / "perflow.json").read_text())
    assert meta["stock_scheduler_exact"] and meta["model"] == "transformer" and meta["parameterization"] == "u"
    assert (out / "transformer" / "config.json").is_file() and (out / "vae" / "config.json").is_file()
    assert json.loads((out / "scheduler_flowmatch" / "scheduler_config.json").read_text())["shift"] == SHIFT
    cond, x = _cond(), _noise()
    with torch.no_grad():
        ours = perflow.sample_perflow(student, x, windows, cond=cond)
        transformer = diffusers.SD3Transformer2DModel.from_pretrained(str(out / "transformer"))
        stock = _stock_loop(transformer, diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler_flowmatch")), x, cond, k)
        loaded = load_student(out)
        again = perflow.sample_perflow(loaded, x, loaded.boundaries, cond=cond)
        # the stock pipeline, our PeRFlowScheduler in model_index.json; CFG in the transformer's output space
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out), trust_remote_code=True, **NO_TEXT)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler).__name__ == "PeRFlowScheduler"
        neg = (null[0].expand(2, L, D), null[1].expand(2, P))
        piped = pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1],
                     latents=x, num_inference_steps=k, guidance_scale=2.5, output_type="latent", height=16, width=16).images
        guided = perflow.sample_perflow(student, x, windows, cond=cond, guidance=2.5, null_cond=null)
    assert ours.nfe == k and guided.nfe == 2 * k
    torch.testing.assert_close(stock, ours.x, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.x, ours.x)
    torch.testing.assert_close(piped, guided.x, rtol=1e-5, atol=1e-5)
    assert (ours.x - perflow.sample_perflow(perflow.PeRFlowStudent.from_teacher(teacher, windows), x, windows, cond=cond).x).abs().max() > 1e-3


@pytest.mark.parametrize("n", [4, 9])  # K = 4 windows; n > K steps are spread over the windows
def test_perflow_scheduler_reproduces_our_sampler_at_any_step_count_and_stock_config_needs_the_grid(sd3, tmp_path, n):
    teacher = load_teacher(sd3)
    windows = perflow.make_windows(4)  # uniform in t: not the stock scheduler's shifted grid
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    _perturb(student.net)
    assert flow_match_scheduler_config(json.loads((sd3 / "scheduler" / "scheduler_config.json").read_text()), windows) is None
    with pytest.raises(ConfigError, match="stock_scheduler=True needs windows on the teacher scheduler's own") as e:
        export_student(student, tmp_path / "stock", sd3, stock_scheduler=True)
    assert "\n" not in str(e.value)
    out = export_student(student, tmp_path / "student", sd3)
    assert not (out / "scheduler_flowmatch").exists() and not json.loads((out / "perflow.json").read_text())["stock_scheduler_exact"]
    sched = PeRFlowScheduler.from_pretrained(str(out / "scheduler"))
    assert sched.config.time_input == "sigma" and sched.config.prediction_type == "flow_prediction"
    cond, x = _cond(), _noise()
    with torch.no_grad():
        z = _stock_loop(student.net.transformer, sched, x, cond, n)
        ours = euler(lambda z, t: student(z, t, cond), x, step_grid(windows, n))
    torch.testing.assert_close(z, ours.x, rtol=1e-5, atol=1e-5)


def test_stock_scheduler_export_names_the_stock_scheduler_in_model_index(sd3, tmp_path):
    teacher = load_teacher(sd3)
    windows = teacher.path.sampling_grid(2)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    with pytest.warns(UserWarning, match="FlowMatchEulerDiscreteScheduler, exact at num_inference_steps=2 only"):
        out = export_student(student, tmp_path / "student", sd3, stock_scheduler=True)
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"] and index["text_encoder"] == [None, None]
    assert (out / "scheduler_perflow" / "scheduler_config.json").is_file()
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out), trust_remote_code=True, **NO_TEXT)
    pipe.set_progress_bar_config(disable=True)
    cond, x = _cond(), _noise()
    with torch.no_grad():
        piped = pipe(prompt_embeds=cond[0], pooled_prompt_embeds=cond[1], latents=x, num_inference_steps=2, guidance_scale=1.0,
                     output_type="latent", height=16, width=16).images
        ours = perflow.sample_perflow(student, x, windows, cond=cond)
    torch.testing.assert_close(piped, ours.x, rtol=1e-5, atol=1e-5)
