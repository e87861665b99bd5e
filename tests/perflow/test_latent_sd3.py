"""SD3 pipelines as PeRFlow teachers: the transformer on its flow-matching schedule, the two CLIP text
encoders (and the T5's zero tokens without a T5) read as the stock StableDiffusion3Pipeline reads them,
the student exported as an SD3 folder the stock pipeline samples in K steps, and the latent cache of an
SD3 folder (tiny models from configs, no download)."""

import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from rectflow import perflow
from rectflow.errors import CheckpointError, ConfigError
from rectflow.flow.solvers import euler
from rectflow.perflow import diffusers_scheduler  # noqa: F401 (registers PeRFlowScheduler for from_pretrained)
from rectflow.perflow.diffusers_io import load_student
from rectflow.perflow.diffusers_scheduler import step_grid
from rectflow.perflow.guidance_modes import Guidance
from rectflow.perflow.latent import T5_MAX_LENGTH, export_pipeline, load_pipeline
from rectflow.perflow.latent_cache import LatentCacheData, read_captions
from tests.perflow.conftest import SD3_CLIP, SD3_JOINT, SD3_SHIFT, build_cache, build_tiny_sd3, caption_images, perturbed_student

torch.set_num_threads(1)
PROMPTS = ["a red cat", "two dogs"]
L = 16 + T5_MAX_LENGTH


def _stock(folder):
    """The stock pipeline; diffusers wants the absent parts (no T5, no image encoder) passed as None."""
    none = dict.fromkeys(("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder"))
    return diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True, **none).to("cpu")


def test_sd3_pipeline_loads_on_its_flow_matching_schedule(tiny_sd3_pipeline):
    pipe = tiny_sd3_pipeline
    assert pipe.is_sd3 and not pipe.is_sdxl and pipe.parameterization == "u" and pipe.schedule.shift == SD3_SHIFT
    assert pipe.latent_shape == (4, 8, 8) and pipe.resolution == (16, 16)
    assert pipe.text_shape == (L, SD3_JOINT) and pipe.pooled_dim == 2 * SD3_CLIP and pipe.null_condition == "empty_prompt"
    assert "SD3" in repr(pipe) and pipe.text_encoder_3 is None


def test_sd3_text_encoding_and_null_condition_match_the_stock_pipeline(tiny_sd3_pipeline):
    pipe = tiny_sd3_pipeline
    stock = _stock(pipe.folder)
    hidden, neg_hidden, pooled, neg_pooled = stock.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                                                 num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = pipe.encode_text(PROMPTS)
    assert ours[0].shape == (2, L, SD3_JOINT) and ours[1].shape == (2, 2 * SD3_CLIP)
    torch.testing.assert_close(ours[0], hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours[1], pooled, rtol=0, atol=0)
    null = pipe.null_embedding()
    torch.testing.assert_close(null[0].expand(2, -1, -1), neg_hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(null[1].expand(2, -1), neg_pooled, rtol=0, atol=1e-6)


def test_sd3_with_a_t5_encodes_its_tokens_as_the_stock_pipeline(tmp_path):
    pipe = load_pipeline(build_tiny_sd3(tmp_path / "sd3-t5", t5=True))
    assert pipe.text_encoder_3 is not None and pipe.text_shape == (L, SD3_JOINT)
    stock = diffusers.StableDiffusion3Pipeline.from_pretrained(str(pipe.folder), local_files_only=True, feature_extractor=None, image_encoder=None)
    with torch.no_grad():  # as the pipeline's __call__ runs it (with gradients T5's attention takes another kernel: 1e-5 apart)
        hidden, neg_hidden, pooled, _ = stock.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=True)
    ours = pipe.encode_text(PROMPTS)
    assert float(ours[0][:, 16:].abs().max()) > 0  # the T5 tokens are the encoder's, not zeros
    torch.testing.assert_close(ours[0], hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours[1], pooled, rtol=0, atol=0)
    torch.testing.assert_close(pipe.null_embedding()[0].expand(2, -1, -1), neg_hidden, rtol=0, atol=1e-6)


def test_sd3_teacher_is_the_transformer_reading_sigma(tiny_sd3_pipeline):
    pipe = tiny_sd3_pipeline
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.25, 0.6])
    hidden, pooled = pipe.encode_text(PROMPTS)
    with torch.no_grad():
        theirs = pipe.denoiser(hidden_states=z, timestep=(1 - t) * 1000, encoder_hidden_states=hidden, pooled_projections=pooled).sample
        torch.testing.assert_close(pipe.teacher.raw(z, t, (hidden, pooled)), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_a_fresh_sd3_student_is_the_guided_teachers_k_step_flow_euler(tiny_sd3_pipeline, w):
    """Windows on the stock scheduler's shifted K-step grid: before training the student is the stock
    K-step FlowMatchEuler sampler of the guided teacher."""
    pipe, k = tiny_sd3_pipeline, 4
    windows = pipe.schedule.sampling_grid(k)
    cond, null = pipe.encode_text(PROMPTS), pipe.null_embedding()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stock = _stock(pipe.folder)
    with torch.no_grad():
        ours = perflow.sample_perflow(pipe.student(windows), x, windows, cond=cond, guidance=Guidance(w, null)).x
        theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=w, latents=x.clone(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_exported_sd3_pipeline_samples_the_student_in_k_steps(tmp_path, tiny_sd3_pipeline, w):
    """The exported folder samples a student (moved off the teacher) in the stock pipeline as our sampler
    does: with our scheduler at K and 2K + 1 steps, and with the stock FlowMatchEuler config at K."""
    pipe, k = tiny_sd3_pipeline, 4
    windows = pipe.schedule.sampling_grid(k)
    cond, null = pipe.encode_text(PROMPTS), pipe.null_embedding()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    student = perturbed_student(pipe, windows)
    out = export_pipeline(student, pipe, tmp_path / "student")
    idx = json.loads((out / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusion3Pipeline" and idx["scheduler"] == ["scheduling_perflow", "PeRFlowScheduler"]
    assert idx["text_encoder_3"] == [None, None] and idx["transformer"][1] == "SD3Transformer2DModel" and "safety_checker" not in idx
    stock = _stock(out)
    assert type(stock.scheduler).__name__ == "PeRFlowScheduler"

    def stock_latents(n):
        return stock(PROMPTS, height=16, width=16, num_inference_steps=n, guidance_scale=w, latents=x.clone(), output_type="latent").images

    with torch.no_grad():
        ours = perflow.sample_perflow(student, x, windows, cond=cond, guidance=w, null_cond=null).x
        torch.testing.assert_close(stock_latents(k), ours, atol=1e-5, rtol=1e-5)
        nine = euler(lambda z, t: student(z, t, cond, guidance=Guidance(w, null)) if w != 1.0 else student(z, t, cond), x, step_grid(windows, 2 * k + 1))
        torch.testing.assert_close(stock_latents(2 * k + 1), nine.x, atol=1e-5, rtol=1e-5)
        stock.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler_flowmatch"))
        torch.testing.assert_close(stock_latents(k), ours, atol=1e-5, rtol=1e-5)
        loaded = load_student(out)
        torch.testing.assert_close(perflow.sample_perflow(loaded, x, windows, cond=cond, guidance=w, null_cond=null).x, ours, atol=1e-6, rtol=1e-6)
    again = load_pipeline(out)  # an export reads back as an SD3 pipeline with the teacher's schedule
    assert again.is_sd3 and again.fingerprint() == pipe.fingerprint()


def test_sd3_latent_cache_holds_hidden_and_pooled_text(tmp_path, tiny_sd3_pipeline):
    pipe = tiny_sd3_pipeline
    cache = build_cache(pipe, caption_images(tmp_path / "imgs"), tmp_path / "cache")
    assert len(cache) == 5 and cache.settings.pooled_dim == 2 * SD3_CLIP
    lat, (hidden, pooled) = cache.load()  # the rows are the pipeline's own encoding of each caption, in the cache's order
    want_hidden, want_pooled = pipe.encode_text([t for _, t in read_captions(tmp_path / "imgs")])
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=1e-5)
    data = LatentCacheData(cache, pipeline=pipe)
    lat, (hidden, pooled) = data.sample(3, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (3, 4, 8, 8) and hidden.shape == (3, L, SD3_JOINT) and pooled.shape == (3, 2 * SD3_CLIP)


def test_sd3_folders_without_text_encoders_or_of_other_transformers_are_one_line(tmp_path, tiny_sd3):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_sd3, bare)
    shutil.rmtree(bare / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"no text_encoder_2/ \(an SD3 layout needs .*precomputed conditions"):
        load_pipeline(bare)
    flux = tmp_path / "flux"
    shutil.copytree(tiny_sd3, flux)
    idx = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**idx, "_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="FluxPipeline.*not supported"):
        load_pipeline(flux)


def test_sd3_model_index_quirks_and_a_half_precision_t5(tmp_path):
    """null entries in model_index.json mean "absent" (no traceback); a first CLIP without projection is
    refused; a T5 loaded in fp16 keeps its wo layers in float32, as transformers loads it for the stock
    pipeline (T5 overflows in fp16 otherwise); its width is checked before any weights are read."""
    folder = build_tiny_sd3(tmp_path / "sd3", t5=True)
    idx = json.loads((folder / "model_index.json").read_text())
    assert load_pipeline(folder).text_encoder_3 is not None
    (folder / "model_index.json").write_text(json.dumps({**idx, "text_encoder_3": None, "tokenizer_3": None}))
    assert load_pipeline(folder).text_encoder_3 is None  # null entries drop the T5 that is there, as the stock pipeline does
    (folder / "model_index.json").write_text(json.dumps({**idx, "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(ConfigError, match="text_encoder is a CLIPTextModel, not the CLIPTextModelWithProjection"):
        load_pipeline(folder)
    t5 = build_tiny_sd3(tmp_path / "t5", t5=True)
    half = load_pipeline(t5, dtype=torch.float16)
    assert half.text_encoder.dtype == torch.float16
    assert {p.dtype for n, p in half.text_encoder_3.named_parameters() if ".wo." in n} == {torch.float32}
    cfg = t5 / "text_encoder_3" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "d_model": 8}))
    with pytest.raises(ConfigError, match=r"differs from the T5's d_model=8"):
        load_pipeline(t5)


def test_sd3_t5_named_but_missing_or_without_tokenizer_files_is_one_line(tmp_path):
    """model_index.json names a T5 whose folder is gone, or a tokenizer_3/ without its vocabulary: refused, naming the
    folder (was: the T5 silently dropped, or every token read as unknown)."""
    src = build_tiny_sd3(tmp_path / "src", t5=True)
    for part in ("text_encoder_3", "tokenizer_3"):
        folder = tmp_path / f"no-{part}"
        shutil.copytree(src, folder)
        shutil.rmtree(folder / part)
        with pytest.raises(ConfigError, match=rf"model_index.json names {part} but .*no-{part}/{part}/ does not exist"):
            load_pipeline(folder)
    half = tmp_path / "half-null"
    shutil.copytree(src, half)
    idx = json.loads((half / "model_index.json").read_text())
    (half / "model_index.json").write_text(json.dumps({**idx, "tokenizer_3": [None, None]}))
    with pytest.raises(ConfigError, match=r"model_index.json: tokenizer_3 is null but text_encoder_3 is named"):
        load_pipeline(half)  # was: the T5 that is there silently dropped
    empty = tmp_path / "empty-tok"
    shutil.copytree(src, empty)
    for f in (empty / "tokenizer_3").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match=r"empty-tok/tokenizer_3: no tokenizer.json or spiece.model"):
        load_pipeline(empty)


def test_sd3_truncated_text_encoder_weights_name_the_file(tmp_path, tiny_sd3):
    folder = tmp_path / "torn"
    shutil.copytree(tiny_sd3, folder)
    weights = next((folder / "text_encoder_2").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"torn/text_encoder_2: cannot load the text encoder"):
        load_pipeline(folder)


def test_sd3_minimal_model_index_loads_projected_clips(tmp_path, tiny_sd3, tiny_sd3_pipeline):
    """A model_index.json naming only the pipeline class is an SD3 folder read from its subfolders: both CLIPs are
    loaded with their projection (was: a plain CLIPTextModel, then an AttributeError)."""
    folder = tmp_path / "minimal"
    shutil.copytree(tiny_sd3, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    pipe = load_pipeline(folder)
    ours, want = pipe.encode_text(PROMPTS), tiny_sd3_pipeline.encode_text(PROMPTS)
    torch.testing.assert_close(ours[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], want[1], rtol=0, atol=0)


def test_a_bf16_sd3_student_feeds_the_transformer_the_stock_timesteps(tiny_sd3):
    """In bfloat16 the times our sampler gives the transformer are the stock pipeline's float32 timesteps
    (was: times rounded to bf16, the last step's 8.93 read as 7.81)."""
    pipe, k = load_pipeline(tiny_sd3, dtype=torch.bfloat16), 4
    windows = pipe.schedule.sampling_grid(k)
    seen = []
    hook = pipe.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].float().clone()), with_kwargs=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    stock = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), local_files_only=True, torch_dtype=torch.bfloat16,
                                                             **dict.fromkeys(("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder")))
    stock.transformer = pipe.denoiser  # the same module, so the hook sees both samplers' calls
    with torch.no_grad():
        perflow.sample_perflow(pipe.student(windows), x, windows, cond=pipe.encode_text(PROMPTS))
        ours = torch.stack(seen)
        seen.clear()
        stock(PROMPTS, height=16, width=16, num_inference_steps=k, guidance_scale=1.0, latents=x.clone(), output_type="latent")
    hook.remove()
    torch.testing.assert_close(ours, torch.stack(seen), rtol=0, atol=1e-3)
    assert float(ours[-1, 0]) > 8.5  # float32's last timestep, not bf16's 7.81
