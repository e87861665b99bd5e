"""The PeRFlow weight delta, full and LoRA, and its plug-and-play use on a derivative model (the base
UNet after a fine-tune of its own) through diffusers' stock load_lora_weights (tiny models)."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rectflow.engine.io import save_tensors
from rectflow.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from rectflow import perflow
from rectflow.perflow.adapters import TextUNetAdapter
from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler
from rectflow.perflow.latent import export_pipeline
from rectflow.perflow.lora import LORA_WEIGHT_NAME, apply_lora, load_lora, lora_factors, lora_state_dict, save_lora

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs"]


def _perturb(unet, seed, scale=0.05, kinds=(nn.Linear, nn.Conv2d), bias=True, norms=False):
    """Move some parameters of ``unet`` (in place) by ``scale`` times their mean magnitude."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, kinds) or (norms and isinstance(m, (nn.GroupNorm, nn.LayerNorm))):
                for name, p in m.named_parameters(recurse=False):
                    if name == "weight" or bias:
                        p.add_(scale * (p.abs().mean() + 1e-3) * torch.randn(p.shape, generator=g))
    return unet


def _out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([700.0, 250.0]), encoder_hidden_states=cond).sample


def test_lora_factors_reproduce_linear_and_conv_deltas():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    d = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64).float()
    a, b = lora_factors(d)
    assert a.shape == (5, 6, 3, 3) and b.shape == (5, 5, 1, 1)
    x = torch.randn(2, 6, 9, 9, generator=g)
    with torch.no_grad():  # peft's conv LoRA: the layer's own conv with A, then a 1x1 conv with B
        merged = F.conv2d(x, conv.weight + d, conv.bias, stride=2, padding=1)
        split = conv(x) + F.conv2d(F.conv2d(x, a, stride=2, padding=1), b)
    torch.testing.assert_close(merged, split, atol=1e-5, rtol=1e-5)
    lin = torch.randn(7, 4, generator=g)
    a, b = lora_factors(lin, 2)
    assert a.shape == (2, 4) and b.shape == (7, 2)
    s = torch.linalg.svdvals(lin.double())
    assert float(torch.linalg.norm(lin.double() - b.double() @ a.double())) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-5)
    with pytest.raises(ConfigError, match="rank must be an integer"):
        lora_factors(lin, 0)


def test_full_delta_on_the_base_reproduces_the_student(tmp_path, tiny_pipeline):
    windows = perflow.make_windows(4)
    student = tiny_pipeline.student(windows)
    _perturb(student.net.unet, seed=1, norms=True)  # a full fine-tune moves every parameter
    perflow.save_delta(tmp_path / "delta.safetensors", student.net.unet, tiny_pipeline.unet, windows)
    delta, meta = perflow.load_delta(tmp_path / "delta.safetensors")
    assert meta["windows"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    rebuilt = perflow.apply_delta(copy.deepcopy(tiny_pipeline.unet), delta)
    for (name, p), q in zip(rebuilt.state_dict().items(), student.net.unet.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(_out(rebuilt), _out(student.net.unet), atol=1e-5, rtol=1e-5)


def test_lora_error_falls_with_rank_and_vanishes_at_full_rank(tiny_pipeline):
    base = tiny_pipeline.unet
    student = _perturb(copy.deepcopy(base), seed=2)  # Linear / Conv weights and biases: all LoRA can hold
    target = _out(student)
    weight_err, out_err = [], []
    for rank in (1, 4, 16, None):
        sd, report = lora_state_dict(student, base, rank, bias=True)
        merged = apply_lora(copy.deepcopy(base), sd)
        weight_err.append(report.relative_error)
        out_err.append(float((_out(merged) - target).norm() / (_out(base) - target).norm()))
    assert weight_err == sorted(weight_err, reverse=True) and len(set(weight_err)) == 4, weight_err
    assert out_err == sorted(out_err, reverse=True), out_err
    assert weight_err[-1] < 1e-6 and out_err[-1] < 1e-4 and out_err[0] > 0.1
    # without bias terms (the default) the bias changes are reported as what the LoRA misses
    _, report = lora_state_dict(student, base)
    assert report.uncovered and all(n.endswith(".bias") for n in report.uncovered) and report.relative_error > 0
    normed = _perturb(copy.deepcopy(student), seed=3, kinds=(), norms=True)
    _, report = lora_state_dict(normed, base, bias=True)
    assert report.uncovered and all("norm" in n for n in report.uncovered)


def _derivative(tmp_path, tiny_sd):
    """A model derived from the base: the same folder with the UNet fine-tuned on its own."""
    deriv = tmp_path / "derivative"
    shutil.copytree(tiny_sd, deriv)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(deriv / "unet"))
    _perturb(unet, seed=7, scale=0.03, norms=True).save_pretrained(str(deriv / "unet"))
    return deriv


def test_derivative_plus_lora_through_the_stock_pipeline(tmp_path, tiny_sd, tiny_pipeline):
    k = 4
    windows = perflow.make_windows(k)
    student = tiny_pipeline.student(windows)
    _perturb(student.net.unet, seed=5, bias=False)  # the acceleration lives in Linear / Conv weights here
    export_pipeline(student, tiny_pipeline, tmp_path / "student")  # for its scheduler
    report = save_lora(tmp_path / "lora", student.net.unet, tiny_pipeline.unet, boundaries=windows)
    assert report.relative_error < 1e-6 and not report.uncovered
    assert load_lora(tmp_path / "lora")[1]["windows"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    perflow.save_delta(tmp_path / "delta.safetensors", student.net.unet, tiny_pipeline.unet, windows)
    deriv = _derivative(tmp_path, tiny_sd)

    stock = diffusers.StableDiffusionPipeline.from_pretrained(str(deriv), local_files_only=True, trust_remote_code=True)
    stock.scheduler = PeRFlowScheduler.from_pretrained(str(tmp_path / "student" / "scheduler"))
    stock.load_lora_weights(str(tmp_path / "lora"))  # the stock API: peft adapters on the derivative's UNet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    cond = tiny_pipeline.encode_text(PROMPTS)  # the derivative keeps the base's text encoder
    with torch.no_grad():
        theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=1.0, latents=x.clone(), output_type="latent").images
    base_unet = diffusers.UNet2DConditionModel.from_pretrained(str(deriv / "unet"))

    def ours(unet):
        s = perflow.PeRFlowStudent(TextUNetAdapter(unet.eval()), tiny_pipeline.schedule, windows, "eps", time_map=tiny_pipeline.schedule.t_to_timestep)
        with torch.no_grad():
            return perflow.sample_perflow(s, x, windows, cond=cond).x

    with_lora = ours(apply_lora(copy.deepcopy(base_unet), tmp_path / "lora"))
    with_delta = ours(perflow.apply_delta(copy.deepcopy(base_unet), perflow.load_delta(tmp_path / "delta.safetensors")[0]))
    torch.testing.assert_close(theirs, with_lora, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_lora, with_delta, atol=1e-5, rtol=1e-5)
    assert float((with_lora - ours(base_unet)).abs().max()) > 1e-3  # the LoRA did change the derivative
    # a low-rank LoRA (no bias) loads the same way, fuses, and samples
    save_lora(tmp_path / "lora2", student.net.unet, tiny_pipeline.unet, rank=2)
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(str(deriv), local_files_only=True, trust_remote_code=True)
    fresh.scheduler = PeRFlowScheduler.from_pretrained(str(tmp_path / "student" / "scheduler"))
    fresh.load_lora_weights(str(tmp_path / "lora2"), weight_name=LORA_WEIGHT_NAME)
    fresh.fuse_lora()
    with torch.no_grad():
        low = fresh(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=2.0, latents=x.clone(), output_type="latent").images
    assert low.shape == x.shape and torch.isfinite(low).all()


def test_a_lora_of_another_architecture_changes_nothing_and_names_its_file(tmp_path):
    two = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    wide = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 4))
    moved = copy.deepcopy(wide)
    with torch.no_grad():
        for q in moved.parameters():
            q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    save_lora(tmp_path / "lora", moved, wide, rank=2)
    before = {k: v.clone() for k, v in two.state_dict().items()}
    with pytest.raises(ConfigError, match=r"lora.pytorch_lora_weights\.safetensors: shape mismatch for 1\.weight: \(3, 2\) in the model, \(4, 2\) in the LoRA"):
        apply_lora(two, tmp_path / "lora")
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())  # 0.weight did not move either
    with pytest.raises(ConfigError, match=r"pytorch_lora_weights\.safetensors: the model has no parameter '0\.weight'"):
        apply_lora(nn.Conv2d(1, 1, 1), tmp_path / "lora")
    sd = load_lora(tmp_path / "lora")[0]
    torn = {k: v for k, v in sd.items() if not k.endswith("1.lora_B.weight")}
    save_tensors(tmp_path / "torn.safetensors", torn, {})
    with pytest.raises(CheckpointError, match=r"torn\.safetensors: LoRA state: unet\.1\.lora_A\.weight has no lora_B"):
        apply_lora(copy.deepcopy(wide), tmp_path / "torn.safetensors")
