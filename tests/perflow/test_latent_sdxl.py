"""SDXL pipelines as PeRFlow teachers: two text encoders, pooled text and size conditioning read as the
stock StableDiffusionXLPipeline reads them, the student exported as an SDXL folder the stock pipeline
samples in K steps, and the latent cache of an SDXL folder (tiny models from configs, no download)."""

import json
import shutil

import pytest
import torch

from rectflow.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from rectflow import perflow
from rectflow.perflow import diffusers_scheduler  # noqa: F401 (registers PeRFlowScheduler for from_pretrained)
from rectflow.perflow.diffusers_io import load_student
from rectflow.perflow.guidance_modes import Guidance
from rectflow.perflow.latent import export_pipeline, load_pipeline
from rectflow.perflow.latent_cache import LatentCache, LatentCacheData, load_caption_image, read_captions
from tests.perflow.conftest import SDXL_POOLED, build_cache, build_tiny_sdxl, caption_images, perturbed_student

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs"]
L, D = 16, 32 + 48


def _stock(folder, **kw):
    return diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True, **kw).to("cpu")


def _stock_latents(stock, x, steps, w):
    with torch.no_grad():
        return stock(PROMPTS, height=16, width=16, num_inference_steps=steps, guidance_scale=w, latents=x.clone(), output_type="latent").images


def test_sdxl_pipeline_loads_with_both_encoders(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    assert pipe.is_sdxl and pipe.parameterization == "eps" and pipe.latent_shape == (4, 8, 8) and pipe.resolution == (16, 16)
    assert pipe.text_shape == (L, D) and pipe.pooled_dim == SDXL_POOLED
    assert "SDXL" in repr(pipe)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_text_encoding_and_null_condition_match_the_stock_pipeline(tmp_path, tiny_sdxl_pipeline, force_zeros):
    pipe = tiny_sdxl_pipeline if force_zeros else load_pipeline(build_tiny_sdxl(tmp_path / "xl", force_zeros_for_empty_prompt=False))
    stock = _stock(pipe.folder)
    hidden, neg_hidden, pooled, neg_pooled = stock.encode_prompt(prompt=PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = pipe.encode_text(PROMPTS)
    assert isinstance(ours, tuple) and ours[0].shape == (2, L, D) and ours[1].shape == (2, SDXL_POOLED)
    torch.testing.assert_close(ours[0], hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours[1], pooled, rtol=0, atol=0)
    null = pipe.null_embedding()
    assert null[0].shape == (1, L, D) and null[1].shape == (1, SDXL_POOLED)
    # the stock pipeline encodes the empty prompt once per row: batch 2 against our batch 1 (float rounding)
    torch.testing.assert_close(null[0].expand(2, -1, -1), neg_hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(null[1].expand(2, -1), neg_pooled, rtol=0, atol=1e-6)
    assert bool((null[0] == 0).all()) == force_zeros


def test_sdxl_teacher_is_the_unet_with_pooled_text_and_size_ids(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.6])
    hidden, pooled = pipe.encode_text(PROMPTS)
    ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(2, 6)  # original size, crop (0, 0), target size: the stock defaults
    with torch.no_grad():
        ours = pipe.teacher.raw(z, t, (hidden, pooled))
        theirs = pipe.unet(z, (1 - t) * 1000 - 1, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        as_dict = pipe.teacher.raw(z, t, {"encoder_hidden_states": hidden, "text_embeds": pooled})
        torch.testing.assert_close(as_dict, ours, rtol=0, atol=0)
    for bad, match in [(hidden, "pair"), ("a red cat", "encode_text"), ((hidden,), "pair")]:
        with pytest.raises(ConfigError, match=match) as e:
            pipe.teacher.raw(z, t, bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_a_fresh_sdxl_student_is_the_guided_teachers_k_step_ddim(tiny_sdxl_pipeline, w):
    pipe, k = tiny_sdxl_pipeline, 4
    windows = perflow.make_windows(k)
    cond, null = pipe.encode_text(PROMPTS), pipe.null_embedding()
    guide = Guidance(w, null)
    teacher = perflow.Teacher(pipe.teacher.model, pipe.schedule, pipe.parameterization, time_map=pipe.teacher.time_map, guidance=guide)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ddim = perflow.teacher_ddim_sample(teacher, x, k, cond=cond)
        res = perflow.sample_perflow(pipe.student(windows), x, windows, cond=cond, guidance=guide)
    assert res.nfe == ddim.nfe == k * (1 if w == 1.0 else 2)
    torch.testing.assert_close(res.x, ddim.x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_exported_sdxl_pipeline_samples_the_student_in_k_steps(tmp_path, tiny_sdxl_pipeline, w):
    pipe, k = tiny_sdxl_pipeline, 4
    windows = perflow.make_windows(k)
    student = perturbed_student(pipe, windows)
    out = export_pipeline(student, pipe, tmp_path / "student")
    idx = json.loads((out / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionXLPipeline" and idx["scheduler"] == ["scheduling_perflow", "PeRFlowScheduler"]
    assert idx["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"] and idx["force_zeros_for_empty_prompt"] is True
    assert "safety_checker" not in idx
    stock = _stock(out)
    assert type(stock.scheduler).__name__ == "PeRFlowScheduler"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = pipe.encode_text(PROMPTS)
    with torch.no_grad():
        ours = perflow.sample_perflow(student, x, windows, cond=cond, guidance=w, null_cond=pipe.null_embedding()).x
    theirs = _stock_latents(stock, x, k, w)
    print(f"SDXL export, PeRFlowScheduler, w = {w}: max |stock - ours| = {float((theirs - ours).abs().max()):.3g}")
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    stock.scheduler = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler_ddim"))  # the stock DDIM config: exact at K steps
    ddim = _stock_latents(stock, x, k, w)
    print(f"SDXL export, stock DDIMScheduler, w = {w}: max |stock - ours| = {float((ddim - ours).abs().max()):.3g}, max |ours| = {float(ours.abs().max()):.3g}")
    torch.testing.assert_close(ddim, ours, atol=1e-5, rtol=1e-5)
    loaded = load_student(out)  # our loader reads the SDXL UNet with its added conditions
    with torch.no_grad():
        torch.testing.assert_close(perflow.sample_perflow(loaded, x, windows, cond=cond, guidance=w, null_cond=pipe.null_embedding()).x, ours,
                                   atol=1e-6, rtol=1e-6)
    again = load_pipeline(out)  # an export reads back as an SDXL pipeline with the teacher's schedule
    assert again.is_sdxl and again.fingerprint() == pipe.fingerprint()


def test_sdxl_latent_cache_holds_hidden_and_pooled_text(tmp_path, tiny_sdxl_pipeline, tiny_pipeline):
    pipe = tiny_sdxl_pipeline
    images = caption_images(tmp_path / "imgs")
    cache = build_cache(pipe, images, tmp_path / "cache")
    assert len(cache) == 5 and cache.settings.pooled_dim == SDXL_POOLED
    lat, (txt, pooled) = cache.load()
    items = read_captions(images)
    x = torch.stack([load_caption_image((images / n).read_bytes(), n, (16, 16)) for n, _ in items])
    torch.testing.assert_close(lat, pipe.encode_images(x), atol=1e-5, rtol=1e-5)
    hidden, pooled_ref = pipe.encode_text([t for _, t in items])
    torch.testing.assert_close(txt, hidden, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled, pooled_ref, atol=1e-6, rtol=1e-6)
    null = cache.null_text()
    assert torch.equal(null[0], torch.zeros(1, L, D)) and torch.equal(null[1], torch.zeros(1, SDXL_POOLED))  # force_zeros_for_empty_prompt
    data = LatentCacheData(cache, pipeline=pipe)
    a, (h, p) = data.sample(7, generator=torch.Generator().manual_seed(3))
    mapped = LatentCacheData(cache.path, in_memory=False).sample(7, generator=torch.Generator().manual_seed(3))
    assert a.shape == (7, 4, 8, 8) and h.shape == (7, L, D) and p.shape == (7, SDXL_POOLED)
    assert torch.equal(a, mapped[0]) and torch.equal(h, mapped[1][0]) and torch.equal(p, mapped[1][1])
    i = torch.randint(5, (7,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(h, txt[i]) and torch.equal(p, pooled[i])
    # a student trains on it: the pair condition through the guided teacher solve and condition dropout
    windows = perflow.make_windows(2)
    obj = perflow.PeRFlowObjective(pipe.teacher, data, windows, solver_steps=1, p_uncond=0.5, null_cond=data.null_cond)
    batch = obj.draw(3, torch.Generator().manual_seed(0), "cpu")
    assert batch.cond[0].shape == (3, L, D) and batch.cond[1].shape == (3, SDXL_POOLED)
    # a cache of another pipeline is refused both ways, in one line
    for cached, other in ((cache.path, tiny_pipeline), (build_cache(tiny_pipeline, images, tmp_path / "sd-cache").path, pipe)):
        with pytest.raises(ConfigError, match="another pipeline.*text_shape.*pooled_dim") as e:
            LatentCache(cached, pipeline=other)
        assert "\n" not in str(e.value)
    keep = load_pipeline(build_tiny_sdxl(tmp_path / "keep", force_zeros_for_empty_prompt=False))  # same weights, the empty prompt as null
    with pytest.raises(ConfigError, match="another pipeline.*null_condition"):
        LatentCache(cache.path, pipeline=keep)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit(path, **changes):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in {**cfg, **changes}.items() if v is not ...}))


def test_bad_sdxl_folders_are_one_line_naming_the_path(tmp_path, tiny_sdxl_pipeline, tiny_sd):
    tiny_sdxl = tiny_sdxl_pipeline.folder
    no_te2 = _copy(tiny_sdxl, tmp_path / "no_te2")
    shutil.rmtree(no_te2 / "text_encoder_2")
    no_tok2 = _copy(tiny_sdxl, tmp_path / "no_tok2")
    shutil.rmtree(no_tok2 / "tokenizer_2")
    refiner = _copy(tiny_sdxl, tmp_path / "refiner")  # SDXL refiner: text_encoder_2 only
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    _edit(refiner / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None])
    no_pool = _copy(tiny_sdxl, tmp_path / "no_pool")
    _edit(no_pool / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"])
    plain_unet = _copy(tiny_sdxl, tmp_path / "plain_unet")
    _edit(plain_unet / "unet" / "config.json", addition_embed_type=None)
    inpaint = _copy(tiny_sdxl, tmp_path / "inpaint")
    _edit(inpaint / "unet" / "config.json", in_channels=9)
    lcm = _copy(tiny_sdxl, tmp_path / "lcm")
    _edit(lcm / "unet" / "config.json", time_cond_proj_dim=256)
    wide = _copy(tiny_sdxl, tmp_path / "wide")
    _edit(wide / "unet" / "config.json", projection_class_embeddings_input_dim=8 * 6 + SDXL_POOLED + 4)
    sd_text_time = _copy(tiny_sd, tmp_path / "sd_text_time")  # an SD 1.x folder whose UNet wants SDXL's added conditions
    _edit(sd_text_time / "unet" / "config.json", addition_embed_type="text_time")
    cases = [(no_te2, f"{no_te2}.*no text_encoder_2/"), (no_tok2, f"{no_tok2}.*no tokenizer_2/"), (refiner, f"{refiner}.*refiner"),
             (no_pool, f"{no_pool}.*CLIPTextModelWithProjection"), (plain_unet, "unet/config.json.*text_time"),
             (inpaint, "unet/config.json.*in_channels=9"), (lcm, "unet/config.json.*time_cond_proj_dim"),
             (wide, "unet/config.json.*projection_class_embeddings_input_dim"), (sd_text_time, "unet/config.json.*text_encoder_2")]
    for folder, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            load_pipeline(folder)
        assert "\n" not in str(e.value), folder
