"""The latent cache: a captioned image folder encoded once through the VAE and the text encoder,
resumable, checksummed and tied to its pipeline; training reads it and never runs the VAE."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rectflow.errors import CheckpointError, ConfigError, DataError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from rectflow import perflow
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.perflow.latent import load_pipeline
from rectflow.perflow.latent_cache import LatentCache, LatentCacheData, load_caption_image, read_captions
from tests.perflow.conftest import build_cache, build_tiny_sd, caption_images

torch.set_num_threads(1)






def _digests(cache):
    return [(e["file"], e["sha256"]) for e in json.loads((cache.path / "manifest.json").read_text())["shards"]]


def test_cache_holds_the_encoded_images_and_captions(tmp_path, tiny_pipeline):
    images = caption_images(tmp_path / "imgs")
    cache = build_cache(tiny_pipeline, images, tmp_path / "cache")
    assert len(cache) == 5 and [e["n"] for e in cache.manifest["shards"]] == [2, 2, 1]
    items = read_captions(images)
    assert [n for n, _ in items] == ["img_0.png", "img_1.png", "img_2.png", "img_4.png", "sub/img_3.jpg"]
    x = torch.stack([load_caption_image((images / n).read_bytes(), n, (16, 16)) for n, _ in items])
    lat, txt = cache.load()
    torch.testing.assert_close(lat, tiny_pipeline.encode_images(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, tiny_pipeline.encode_text([t for _, t in items]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.null_text(), tiny_pipeline.null_embedding())
    # the .txt layout gives the same cache
    other = build_cache(tiny_pipeline, caption_images(tmp_path / "txt", layout="txt"), tmp_path / "cache_txt")
    assert _digests(other) == _digests(cache)
    # the data object: (latents, text) pairs of one image each, by generator; memory maps agree
    ram, mapped = LatentCacheData(cache, pipeline=tiny_pipeline), LatentCacheData(cache.path, in_memory=False)
    a, b = ram.sample(7, generator=torch.Generator().manual_seed(3)), mapped.sample(7, generator=torch.Generator().manual_seed(3))
    assert a[0].shape == (7, 4, 8, 8) and a[1].shape == (7, 16, 32) and ram.null_cond.shape == (1, 16, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    i = torch.randint(5, (7,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], lat[i]) and torch.equal(a[1], txt[i])


def test_centre_crop_keeps_the_middle():
    img = np.zeros((16, 32, 3), dtype=np.uint8)
    img[:, 8:24] = 255  # a white middle half between black quarters
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = load_caption_image(buf.getvalue(), "wide.png", (8, 8))
    assert x.shape == (3, 8, 8) and torch.equal(x, torch.ones_like(x))


def test_kill_and_resume_equals_an_uninterrupted_build(tmp_path, tiny_pipeline):
    images = caption_images(tmp_path / "imgs")
    whole = build_cache(tiny_pipeline, images, tmp_path / "whole", latent_mode="sample", seed=4)

    class Kill(Exception):
        pass

    def kill_after_first(s):
        if s == 0:
            raise Kill

    with pytest.raises(Kill):
        build_cache(tiny_pipeline, images, tmp_path / "resumed", latent_mode="sample", seed=4, on_shard=kill_after_first)
    with pytest.raises(CheckpointError, match="incomplete latent cache"):
        LatentCache(tmp_path / "resumed")
    (tmp_path / "resumed" / ".latents_00001.safetensors.123.tmp").write_bytes(b"half")  # a write torn by kill -9
    resumed = build_cache(tiny_pipeline, images, tmp_path / "resumed", latent_mode="sample", seed=4)
    assert _digests(resumed) == _digests(whole)
    assert not list((tmp_path / "resumed").glob(".*.tmp"))
    again = build_cache(tiny_pipeline, images, tmp_path / "resumed", latent_mode="sample", seed=4)  # complete: only checked
    assert _digests(again) == _digests(whole)
    mean = build_cache(tiny_pipeline, images, tmp_path / "mean")
    assert _digests(mean) != _digests(whole)  # the posterior draws differ from its mean


def _flip(path, offset=10):
    data = bytearray(path.read_bytes())
    data[-offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, msg", [("latents_00001.safetensors", "latents_00001.*changed on disk"),
                                       ("null_text.safetensors", "null_text.*changed on disk")])
def test_tampering_is_detected(tmp_path, tiny_pipeline, name, msg):
    cache = build_cache(tiny_pipeline, caption_images(tmp_path / "imgs"), tmp_path / "cache")
    _flip(cache.path / name)
    with pytest.raises(CheckpointError, match=msg) as e:
        LatentCache(cache.path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="changed on disk"):  # a rebuild refuses to continue on a changed file
        build_cache(tiny_pipeline, tmp_path / "imgs", cache.path)
    (cache.path / name).write_bytes((cache.path / name).read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        LatentCache(cache.path, verify=False)


def test_a_cache_of_another_pipeline_or_images_is_refused(tmp_path, tiny_pipeline):
    images = caption_images(tmp_path / "imgs")
    cache = build_cache(tiny_pipeline, images, tmp_path / "cache")
    other = load_pipeline(build_tiny_sd(tmp_path / "other-sd", seed=1))
    with pytest.raises(ConfigError, match="another pipeline.*vae_sha256.*text_encoder_sha256") as e:
        LatentCache(cache.path, pipeline=other)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="another pipeline.*resolution"):
        LatentCacheData(cache, pipeline={**tiny_pipeline.fingerprint(), "resolution": [32, 32]})
    before = sorted(p.name for p in cache.path.iterdir())
    with pytest.raises(ConfigError, match="other settings.*vae_sha256"):
        build_cache(other, images, cache.path)
    with pytest.raises(ConfigError, match="other settings.*images_sha256"):  # a caption changed
        meta = images / "metadata.jsonl"
        meta.write_text(meta.read_text().replace("two dogs", "three dogs"))
        build_cache(tiny_pipeline, images, cache.path)
    assert sorted(p.name for p in cache.path.iterdir()) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty and holds no latent cache"):
        build_cache(tiny_pipeline, images, tmp_path / "busy")


def test_missing_or_bad_captions_are_named(tmp_path):
    txt = caption_images(tmp_path / "txt", layout="txt")
    (txt / "img_1.txt").unlink()
    with pytest.raises(DataError, match=r"img_1\.png: no caption \(expected img_1\.txt") as e:
        read_captions(txt)
    assert "\n" not in str(e.value)
    meta = caption_images(tmp_path / "meta")
    rows = (meta / "metadata.jsonl").read_text().splitlines()
    (meta / "metadata.jsonl").write_text("\n".join(r for r in rows if "img_2" not in r))
    with pytest.raises(DataError, match=r"img_2\.png: no caption \(metadata\.jsonl has no row"):
        read_captions(meta)
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="line 1 names gone.png"):
        read_captions(meta)
    (meta / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        read_captions(meta)
    shutil.rmtree(meta)
    meta.mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_captions(meta)


def test_training_reads_the_cache_never_the_vae(tmp_path, tiny_sd):
    pipe = load_pipeline(tiny_sd)  # our own copy: its VAE and text encoder are disabled below
    cache = build_cache(pipe, caption_images(tmp_path / "imgs"), tmp_path / "cache", dtype="float16")
    assert cache.load()[0].dtype == torch.float16

    def refuse(*a, **k):
        raise AssertionError("training ran the VAE or the text encoder")

    pipe.vae.encode = pipe.vae.decode = pipe.text_encoder.forward = refuse
    data = LatentCacheData(cache.path, pipeline=pipe.fingerprint())
    windows = perflow.make_windows(2)
    student = pipe.student(windows)
    obj = perflow.PeRFlowObjective(pipe.teacher, data, windows, solver_steps=1)
    Trainer(student, obj, TrainConfig(steps=2, batch_size=3, ema_decay=0.0, device="cpu", progress=False)).fit(resume=False)
    assert obj.teacher_nfe == 6


def test_an_unreadable_image_is_named(tmp_path, tiny_pipeline):
    images = caption_images(tmp_path / "imgs")
    (images / "img_1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"img_1\.png: cannot decode image") as e:
        build_cache(tiny_pipeline, images, tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_a_caption_longer_than_the_tokenizer_allows_is_named(tmp_path, tiny_pipeline):
    """The text encoder would silently cut it (the tiny tokenizer takes 16 tokens): refused, naming the
    image and its caption file, before anything is written."""
    txt = caption_images(tmp_path / "txt", layout="txt")
    (txt / "img_1.txt").write_text("a dog that is far too long to fit\n")
    with pytest.raises(DataError, match=r"img_1\.png: its caption \(img_1\.txt\) is 27 tokens, more than the 16") as e:
        build_cache(tiny_pipeline, txt, tmp_path / "cache")
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()
    meta = caption_images(tmp_path / "meta")
    rows = [json.loads(r) for r in (meta / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = "x" * 15
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"img_4\.png: its caption \(metadata\.jsonl\) is 17 tokens"):
        build_cache(tiny_pipeline, meta, tmp_path / "cache")


_KILLED_BUILD = """
import os, signal, sys
import torch
import rectflow.engine.shards as shards
from rectflow.perflow.latent import load_pipeline
from rectflow.perflow.latent_cache import build_latent_cache

folder, images, out, where = sys.argv[1:5]
torch.set_num_threads(1)  # as the tests: another thread count rounds the VAE's convolutions differently
pipe = load_pipeline(folder)
def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)
on_shard = None
if where == "after-shard-0":  # shard 0 written and recorded
    on_shard = lambda s: die() if s == 0 else None
else:  # shard 1's file written and renamed into place, the manifest not yet updated
    save_json, calls = shards.save_json, []
    def save_json_then_die(path, obj):
        calls.append(path)
        if len(obj.get("shards", [])) == 2:
            die()
        save_json(path, obj)
    shards.save_json = save_json_then_die
build_latent_cache(pipe, images, out, shard_size=2, encode_batch=2, latent_mode="sample", seed=4, progress=False, on_shard=on_shard)
"""


@pytest.mark.parametrize("where", ["after-shard-0", "before-manifest-1"])
def test_a_build_killed_by_sigkill_resumes_with_nothing_lost_or_twice(tmp_path, tiny_pipeline, where):
    """kill -9 of a real process, after a shard is recorded or between a shard's file and its manifest
    entry: the rerun finishes the cache, equal shard for shard to an uninterrupted build."""
    import signal
    import subprocess
    import sys

    images = caption_images(tmp_path / "imgs")
    whole = build_cache(tiny_pipeline, images, tmp_path / "whole", latent_mode="sample", seed=4)
    out = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tiny_pipeline.folder), str(images), str(out), where],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    recorded = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(recorded) == 1 and not json.loads((out / "manifest.json").read_text())["complete"]
    assert (out / "latents_00001.safetensors").is_file() == (where == "before-manifest-1")  # written but not recorded
    resumed = build_cache(tiny_pipeline, images, out, latent_mode="sample", seed=4)
    assert _digests(resumed) == _digests(whole)
    assert len(resumed) == 5 and [e["n"] for e in resumed.manifest["shards"]] == [2, 2, 1]
    torch.testing.assert_close(resumed.load()[0], whole.load()[0], rtol=0, atol=0)
    assert not list(out.glob(".*.tmp"))
