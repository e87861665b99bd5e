"""A latent cache for PeRFlow on latent text-to-image pipelines: a captioned image folder encoded ONCE
through the VAE and the text encoder(s), kept on disk as safetensors shards, so that training reads
latents and text conditions and never runs the VAE or the text encoders again.

Captions come from a ``metadata.jsonl`` in the folder (one JSON object per line with ``file_name``,
the image's path relative to the folder, and ``text``, as the diffusers training scripts expect;
another caption key via ``caption_column``; a list of captions keeps the first) or, without one,
from a ``.txt`` file beside each image (``cat.png`` -> ``cat.txt``).  Each image is centre-cropped to
the pipeline's aspect ratio and resized to its resolution (area averaging when shrinking, bilinear
when enlarging: :func:`rectflow.data.image_sets.resize_images`), then scaled to [-1, 1].

The store is the library's one shard-store mechanism (:mod:`rectflow.engine.shards`, also behind the
reflow pair store)::

    manifest.json                settings (what determines the content), one entry per shard (n, bytes, sha256)
    null_text.safetensors        the null condition for guidance: text (1, L, D) (SDXL also pooled (1, P))
    latents_00000.safetensors    latents (m, C, h, w) and text (m, L, D) (SDXL also pooled (m, P)) of images 0 .. m-1 (sorted names)
    ...

An SDXL pipeline's condition is the pair (hidden, pooled) (:meth:`LatentPipeline.encode_text`): the
cache stores both (``pooled_dim`` P > 0 in the settings) and gives the pair back wherever an SD 1.x /
2.x cache gives the text tensor; SDXL's size ids are not stored (the UNet adapter makes them).

Shard s holds images s*m .. (s+1)*m - 1 and, with ``latent_mode="sample"``, posterior noise drawn from
``step_generator(seed, s)``: its content is a function of the settings alone.  Writes are atomic and
each shard is recorded after it is written, so a killed build (even kill -9) reruns from the first
unrecorded shard and ends byte-identical to an uninterrupted one.  The settings record the sha256 of
the VAE, the text encoder(s) and the tokenizer(s), the VAE scaling, the resolution, the pooled
width, how the null condition is made (SDXL's zeros or the empty prompt) and the images with their
captions: a build into a cache of other settings is refused, and :class:`LatentCache` refuses a
cache made for another pipeline.  A shard or null file that is missing, truncated or changed on disk
is a :class:`~rectflow.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from rectflow.data.image_sets import IMAGE_SUFFIXES, ImageArray, resize_images, to_unit_range
from rectflow.draws import randint
from rectflow.engine import shards
from rectflow.engine.io import load_tensors, save_tensors, sha256_file
from rectflow.engine.shards import ShardLayout, StoreKind
from rectflow.engine.trainer import step_generator
from rectflow.errors import CheckpointError, ConfigError, DataError, check_int
from rectflow.flow.guidance import map_condition
from rectflow.perflow.latent import LatentPipeline

__all__ = [
    "LATENT_CACHE_FORMAT",
    "LatentCache",
    "LatentCacheData",
    "LatentCacheSettings",
    "build_latent_cache",
    "check_caption_lengths",
    "load_caption_image",
    "read_captions",
]

LATENT_CACHE_FORMAT = "rectflow-latents/1"
NULL_FILE = "null_text.safetensors"
_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16), "bfloat16": ("BF16", torch.bfloat16)}
_PIPELINE_KEYS = ("vae_sha256", "text_encoder_sha256", "tokenizer_sha256", "scaling_factor", "shift_factor", "latent_shape", "text_shape",
                  "pooled_dim", "null_condition")
# Settings added with SDXL, at their SD 1.x / 2.x values: left out of the manifest there (older caches read and compare as before).
_OPTIONAL = {"pooled_dim": 0, "null_condition": "empty_prompt"}


@dataclass(frozen=True)
class LatentCacheSettings:
    """Everything that determines a cache's content (two caches with equal settings are identical).

    ``resolution`` (H, W) of the cropped images; ``latent_shape`` (C, h, w); ``text_shape`` (L, D);
    ``dtype`` of the stored tensors; ``latent_mode`` "mean" (the VAE posterior mean) or "sample"
    (one posterior draw per image, seeded by ``seed`` and the shard); ``encode_batch`` images per VAE
    call (batching can change the last bits); ``images_sha256`` identifies the images (names, bytes)
    with their captions in order; ``pooled_dim`` P of SDXL's pooled text (0: none stored) and
    ``null_condition`` ("empty_prompt", or SDXL's "zeros"); the remaining keys identify the pipeline
    (:meth:`LatentPipeline.fingerprint`).
    """

    n_images: int
    shard_size: int
    resolution: tuple[int, int]
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    dtype: str
    latent_mode: str
    seed: int
    encode_batch: int
    images_sha256: str
    vae_sha256: str
    text_encoder_sha256: str
    tokenizer_sha256: str
    scaling_factor: float
    shift_factor: float
    pooled_dim: int = 0
    null_condition: str = "empty_prompt"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not (k in _OPTIONAL and v == _OPTIONAL[k])}
        for k in ("resolution", "latent_shape", "text_shape"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LatentCacheSettings:
        if not isinstance(d, dict) or not set(cls.__dataclass_fields__) - set(_OPTIONAL) <= set(d) <= set(cls.__dataclass_fields__):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{where}: malformed latent-cache manifest (settings keys {got}, expected {sorted(cls.__dataclass_fields__)})")
        try:
            s = cls(n_images=int(d["n_images"]), shard_size=int(d["shard_size"]), resolution=tuple(int(v) for v in d["resolution"]),
                    latent_shape=tuple(int(v) for v in d["latent_shape"]), text_shape=tuple(int(v) for v in d["text_shape"]),
                    dtype=str(d["dtype"]), latent_mode=str(d["latent_mode"]), seed=int(d["seed"]), encode_batch=int(d["encode_batch"]),
                    images_sha256=str(d["images_sha256"]), vae_sha256=str(d["vae_sha256"]), text_encoder_sha256=str(d["text_encoder_sha256"]),
                    tokenizer_sha256=str(d["tokenizer_sha256"]), scaling_factor=float(d["scaling_factor"]), shift_factor=float(d["shift_factor"]),
                    pooled_dim=int(d.get("pooled_dim", 0)), null_condition=str(d.get("null_condition", "empty_prompt")))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed latent-cache manifest ({e})") from None
        if (s.n_images < 1 or s.shard_size < 1 or s.encode_batch < 1 or s.dtype not in _DTYPES or len(s.resolution) != 2
                or len(s.latent_shape) != 3 or len(s.text_shape) != 2 or s.pooled_dim < 0 or s.null_condition not in ("empty_prompt", "zeros")):
            raise CheckpointError(f"{where}: malformed latent-cache manifest (n_images {s.n_images}, shard_size {s.shard_size}, dtype {s.dtype!r}, "
                                  f"shapes {list(s.resolution)} {list(s.latent_shape)} {list(s.text_shape)})")
        return s

    def condition_tensors(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """(key, safetensors dtype, per-item shape) of the stored condition: text (L, D), and pooled (P,) when P > 0."""
        code = _DTYPES[self.dtype][0]
        return (("text", code, self.text_shape),) + ((("pooled", code, (self.pooled_dim,)),) if self.pooled_dim else ())

    def layout(self) -> ShardLayout:
        return ShardLayout("latents", self.n_images, self.shard_size, (("latents", _DTYPES[self.dtype][0], self.latent_shape), *self.condition_tensors()))


def _parts(cond: Tensor | tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """A pipeline's condition as the cache's named tensors: text, and SDXL's pooled."""
    return dict(zip(("text", "pooled"), cond if isinstance(cond, tuple) else (cond,)))


def _condition(parts: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
    """The cache's named tensors as a pipeline's condition: text (B, L, D), or SDXL's pair (text, pooled (B, P))."""
    return (parts["text"], parts["pooled"]) if "pooled" in parts else parts["text"]


LATENT_CACHE = StoreKind(LATENT_CACHE_FORMAT, "latent cache", "latents", LatentCacheSettings.from_dict, LatentCacheSettings.to_dict,
                         LatentCacheSettings.layout, "image")


# ----- images and captions ----------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_captions(folder: str | Path, *, caption_column: str = "text") -> list[tuple[str, str]]:
    """(image path relative to ``folder``, caption) for every image under ``folder``, sorted by path.

    Raises:
        DataError: no such folder, no images, a malformed ``metadata.jsonl`` line (file and line named),
            a row naming a missing image, or an image without a caption (named, one line).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and _is_image(p)
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise DataError(f"{root}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    meta = root / "metadata.jsonl"
    if meta.is_file():
        captions: dict[str, str] = {}
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{meta}: line {i} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or caption_column not in row:
                raise DataError(f"{meta}: line {i} needs 'file_name' and {caption_column!r}")
            text = row[caption_column]
            text = text[0] if isinstance(text, list) and text else text
            if not isinstance(text, str):
                raise DataError(f"{meta}: line {i}: {caption_column!r} must be a string (or a list of strings)")
            name = PurePosixPath(row["file_name"]).as_posix()
            if not (root / name).is_file():
                raise DataError(f"{meta}: line {i} names {name}, which is not in {root}")
            if name in captions:
                raise DataError(f"{meta}: line {i} repeats {name}")
            captions[name] = text
        missing = [n for n in images if n not in captions]
        if missing:
            raise DataError(f"{root / missing[0]}: no caption ({meta.name} has no row with file_name {missing[0]!r}; {len(missing)} image(s) lack one)")
        return [(n, captions[n]) for n in images]
    out = []
    for n in images:
        txt = (root / n).with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{root / n}: no caption (expected {txt.name} beside it, or a metadata.jsonl with file_name and {caption_column!r})")
        out.append((n, txt.read_text(encoding="utf-8").strip()))
    return out


def check_caption_lengths(pipeline: LatentPipeline, folder: Path, items: Sequence[tuple[str, str]]) -> None:
    """:class:`DataError` naming the first image whose caption is longer than the pipeline's tokenizer
    takes (and the file the caption came from), before anything is encoded or written."""
    meta = (folder / "metadata.jsonl").is_file()
    sources = [f"{folder / name}: its caption ({'metadata.jsonl' if meta else PurePosixPath(name).with_suffix('.txt').name})" for name, _ in items]
    pipeline.check_prompts([text for _, text in items], sources)


def _decode_rgb(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes -> uint8 (h, w, 3) RGB; a corrupt file or a decompression bomb is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse before decoding, not after
            with Image.open(io.BytesIO(data)) as im:
                return np.array(im.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def load_caption_image(data: bytes, name: str, resolution: tuple[int, int]) -> Tensor:
    """One image file's bytes -> float32 (3, H, W) in [-1, 1]: RGB, centre-cropped to the aspect ratio
    H : W, resized to ``resolution`` (:func:`rectflow.data.image_sets.resize_images`)."""
    arr = _decode_rgb(data, name)  # (h, w, 3) uint8
    h, w = arr.shape[:2]
    th, tw = resolution
    if h * tw > w * th:  # too tall: keep the full width
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = torch.from_numpy(arr[top:top + ch, left:left + cw].copy()).permute(2, 0, 1)[None]
    return to_unit_range(resize_images(ImageArray(x.contiguous(), source=name), list(resolution)).images[0])


def _images_digest(root: Path, items: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """(sha256 over names, file digests and captions in order, the per-file digests)."""
    h, files = hashlib.sha256(), []
    for name, text in items:
        d = sha256_file(root / name)
        files.append(d)
        h.update(json.dumps([name, d, text]).encode() + b"\n")
    return h.hexdigest(), files


# ----- building ---------------------------------------------------------------------------------


def build_latent_cache(
    pipeline: LatentPipeline,
    images: str | Path,
    out: str | Path,
    *,
    shard_size: int = 256,
    encode_batch: int = 8,
    dtype: str = "float32",
    latent_mode: str = "mean",
    seed: int = 0,
    caption_column: str = "text",
    provenance: dict[str, Any] | None = None,
    progress: bool | None = True,
    on_shard: Callable[[int], None] | None = None,
) -> LatentCache:
    """Encode a captioned image folder into the latent cache ``out`` (or finish it, or just check it).

    Args:
        pipeline: the :class:`LatentPipeline` whose VAE and text encoder encode (its resolution is used).
        images: the image folder (captions: ``metadata.jsonl`` or a ``.txt`` per image).
        out: the cache directory: new, empty, or a cache of the same settings to resume.
        shard_size: images per shard (the unit of resumption); ``encode_batch`` images per VAE /
            text-encoder call.
        dtype: stored dtype, "float32", "float16" or "bfloat16" (read back as float32 by default).
        latent_mode: "mean" (VAE posterior mean) or "sample" (one posterior draw, seeded by ``seed``).
        provenance: extra JSON recorded in the manifest but not compared.
        on_shard: called with each shard index after it is recorded (tests use it to simulate a kill).
    Returns:
        the complete, verified :class:`LatentCache`.
    Raises:
        ConfigError: bad arguments, or ``out`` holds something else (nothing is written);
        DataError: a missing caption or unreadable image (named);
        CheckpointError: a recorded shard is missing, truncated or changed.
    """
    for key, v in (("shard_size", shard_size), ("encode_batch", encode_batch), ("seed", seed)):
        check_int(v, f"latent cache: {key}", 0 if key == "seed" else 1)
    if dtype not in _DTYPES:
        raise ConfigError(f"latent cache: dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if latent_mode not in ("mean", "sample"):
        raise ConfigError(f"latent cache: latent_mode must be 'mean' or 'sample', got {latent_mode!r}")
    root, out = Path(images), Path(out)
    items = read_captions(root, caption_column=caption_column)
    check_caption_lengths(pipeline, root, items)
    digest, file_digests = _images_digest(root, items)
    fp = pipeline.fingerprint()
    settings = LatentCacheSettings(
        n_images=len(items), shard_size=shard_size, resolution=tuple(pipeline.resolution), latent_shape=tuple(pipeline.latent_shape),
        text_shape=tuple(pipeline.text_shape), dtype=dtype, latent_mode=latent_mode, seed=seed, encode_batch=encode_batch, images_sha256=digest,
        **{k: fp[k] for k in ("vae_sha256", "text_encoder_sha256", "tokenizer_sha256", "scaling_factor", "shift_factor", "pooled_dim", "null_condition")})
    layout, store_dtype = settings.layout(), _DTYPES[dtype][1]

    def before(man: dict[str, Any]) -> None:  # the null condition, written once, checksummed like a shard
        if "null_text" not in man:
            null = {k: v.to(store_dtype) for k, v in _parts(pipeline.null_embedding()).items()}
            save_tensors(out / NULL_FILE, null, {"format": LATENT_CACHE_FORMAT})
            man["null_text"] = {"file": NULL_FILE, "bytes": (out / NULL_FILE).stat().st_size, "sha256": sha256_file(out / NULL_FILE)}

    def make(s: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        lo, m = s * shard_size, layout.shard_count(s)
        noise = None
        if latent_mode == "sample":
            noise = torch.randn((m, *settings.latent_shape), generator=step_generator(seed, s))
        lat, conds = [], []
        for c0 in range(0, m, encode_batch):
            chunk = items[lo + c0: lo + min(m, c0 + encode_batch)]
            batch = []
            for j, (name, _) in enumerate(chunk):
                data = (root / name).read_bytes()
                if hashlib.sha256(data).hexdigest() != file_digests[lo + c0 + j]:
                    raise DataError(f"{root / name}: changed while the latent cache was being built; rerun to start over")
                batch.append(load_caption_image(data, str(root / name), settings.resolution))
            x = torch.stack(batch)
            nz = noise[c0: c0 + len(chunk)] if noise is not None else None
            lat.append(pipeline.encode_images(x, mode=latent_mode, noise=nz).float().cpu())
            conds.append(_parts(pipeline.encode_text([t for _, t in chunk])))
        tensors = {"latents": torch.cat(lat), **{k: torch.cat([c[k] for c in conds]).float().cpu() for k in conds[0]}}
        if not all(torch.isfinite(v).all() for v in tensors.values()):
            raise FloatingPointError(f"the VAE or text encoder produced NaN/inf in shard {s}; nothing of it was stored")
        return {k: v.to(store_dtype) for k, v in tensors.items()}, {}

    def finish(man: dict[str, Any], made: int, elapsed: float) -> dict[str, Any]:
        return {"last_session_images_per_s": made / elapsed if elapsed > 0 else None, "device": str(pipeline.device), "torch": torch.__version__}

    prov = {"images": str(root), "pipeline": str(pipeline.folder), **(provenance or {})}
    shards.write_shards(out, LATENT_CACHE, settings, make, provenance=prov, progress=progress, on_shard=on_shard, before=before, finish=finish)
    return LatentCache(out, verify=False)  # every shard was hashed when written or when the cache was reopened


# ----- reading ----------------------------------------------------------------------------------


class LatentCache:
    """A complete latent cache opened for reading: ``len(cache)`` images, their latents (C, h, w) and
    conditions (text embeddings (L, D); SDXL the pair (text (L, D), pooled (P,))), and the null condition.

    Args:
        path: the cache directory.
        verify: check every file's sha256 on open (sizes, dtypes and shapes are always checked).
        pipeline: when given, refuse (ConfigError) a cache made with another VAE, text encoder,
            tokenizer, VAE scaling or shapes than this :class:`LatentPipeline` (or its fingerprint dict).
    Raises:
        CheckpointError: no or a malformed manifest, an incomplete cache, or a file that is missing,
            truncated or changed on disk.
    """

    def __init__(self, path: str | Path, *, verify: bool = True, pipeline: LatentPipeline | dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if not (self.path / shards.MANIFEST).is_file():
            raise CheckpointError(f"{self.path}: not a latent cache (no {shards.MANIFEST}); build it with build_latent_cache first")
        self.settings, self.layout, self.manifest = shards.read_manifest(self.path, LATENT_CACHE)
        if not self.manifest.get("complete"):
            raise CheckpointError(f"{self.path}: incomplete latent cache ({len(self.manifest['shards'])} of {self.layout.n_shards} shards); "
                                  "run build_latent_cache again to finish it")
        self._layouts = [shards.check_shard(self.path, self.layout, i, e, full=verify) for i, e in enumerate(self.manifest["shards"])]
        null = self.manifest.get("null_text")
        if not isinstance(null, dict) or null.get("file") != NULL_FILE:
            raise CheckpointError(f"{self.path / shards.MANIFEST}: the latent cache records no {NULL_FILE}")
        shards.check_shard(self.path, ShardLayout("null", 1, 1, self.settings.condition_tensors()), 0, null, full=True)  # small: always hashed
        if pipeline is not None:
            self.check_pipeline(pipeline)

    def check_pipeline(self, pipeline: LatentPipeline | dict[str, Any]) -> None:
        """Refuse (ConfigError, one line naming what differs) a pipeline other than the cache's."""
        fp = pipeline.fingerprint() if isinstance(pipeline, LatentPipeline) else pipeline
        mine = {**_OPTIONAL, **self.settings.to_dict()}
        diff = [k for k in _PIPELINE_KEYS if mine[k] != fp.get(k, _OPTIONAL.get(k))]
        if list(self.settings.resolution) != list(fp.get("resolution", self.settings.resolution)):
            diff.append("resolution")
        if diff:
            raise ConfigError(f"{self.path}: latent cache was made with another pipeline (differs in {', '.join(diff)}); rebuild it for this pipeline")

    def __len__(self) -> int:
        return self.settings.n_images

    def __repr__(self) -> str:
        s = self.settings
        pooled = f", pooled={s.pooled_dim}" if s.pooled_dim else ""
        return f"LatentCache({str(self.path)!r}, n={s.n_images}, latents={list(s.latent_shape)}, text={list(s.text_shape)}{pooled}, {s.dtype})"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.settings.latent_shape

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.settings.text_shape

    @property
    def nbytes(self) -> int:
        return len(self) * self.layout.item_bytes()

    def null_text(self) -> Tensor | tuple[Tensor, Tensor]:
        """The null condition, float32: the empty prompt's embedding (1, L, D); SDXL the pair ((1, L, D), (1, P))."""
        tensors, _ = load_tensors(self.path / NULL_FILE)
        return _condition({k: v.float() for k, v in tensors.items()})

    def iter_shards(self) -> Iterator[tuple[Tensor, Tensor | tuple[Tensor, Tensor]]]:
        """Stream (latents (m, C, h, w), condition: text (m, L, D) or SDXL's (text, pooled (m, P))) shard by shard, in the stored dtype."""
        for e in self.manifest["shards"]:
            tensors, _ = load_tensors(self.path / e["file"])
            yield tensors.pop("latents"), _condition(tensors)

    def load(self) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """Everything in memory: latents (N, C, h, w) and the conditions (text (N, L, D), or SDXL's (text, pooled (N, P))), in the stored dtype."""
        parts = list(self.iter_shards())
        conds = [_parts(p[1]) for p in parts]
        return torch.cat([p[0] for p in parts]), _condition({k: torch.cat([c[k] for c in conds]) for k in conds[0]})

    def get(self, idx: Tensor | Sequence[int]) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """Items at global indices ``idx`` (k,) gathered from memory maps (float32 / float16 caches): (latents, condition)."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)})")
        out = {key: np.empty((idx.numel(), *shape), dtype=np.float32) for key, _, shape in self.layout.tensors}
        shard = (idx // self.settings.shard_size).numpy()
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            local = idx.numpy()[sel] - s * self.settings.shard_size
            path = self.path / self.manifest["shards"][s]["file"]
            start, header = self._layouts[s]
            for key, arr in out.items():
                arr[sel] = shards.shard_memmap(path, start, header, key)[local]
        latents = torch.from_numpy(out.pop("latents"))
        return latents, _condition({k: torch.from_numpy(v) for k, v in out.items()})

    def verify(self) -> None:
        """Check every file's size, layout and sha256 against the manifest (raises CheckpointError)."""
        LatentCache(self.path, verify=True)


class LatentCacheData:
    """Training data from a latent cache: ``sample(n, generator=, device=) -> (latents (n, C, h, w),
    condition)``, the condition text embeddings (n, L, D) or SDXL's pair (text, pooled (n, P)), drawn
    uniformly with replacement (the conditioning contract of
    :class:`~rectflow.perflow.objective.PeRFlowObjective`).  The VAE and the text encoders are never run.

    Args:
        cache: a :class:`LatentCache` or its directory (opened with ``pipeline`` checked when given).
        in_memory: hold everything in RAM (default: when the cache is at most 2 GiB); else items are
            gathered from memory maps (float32 / float16 caches).
        dtype: dtype of the returned tensors.
    Attributes:
        null_cond: the null condition (the empty prompt's embedding (1, L, D); SDXL the pair ((1, L, D), (1, P))),
            for condition dropout / guidance.
        shape: (C, h, w) of one latent.
    """

    heavy = False

    def __init__(self, cache: LatentCache | str | Path, *, in_memory: bool | None = None, dtype: torch.dtype = torch.float32,
                 pipeline: LatentPipeline | dict[str, Any] | None = None) -> None:
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache, pipeline=pipeline)
        if isinstance(cache, LatentCache) and pipeline is not None:
            self.cache.check_pipeline(pipeline)
        if in_memory is None:
            in_memory = self.cache.nbytes <= 2 << 30
        if not in_memory and self.cache.settings.dtype == "bfloat16":
            raise ConfigError(f"{self.cache.path}: a bfloat16 latent cache cannot be memory-mapped; use in_memory=True")
        self.dtype = dtype
        self._data = self.cache.load() if in_memory else None
        self.null_cond = map_condition(lambda c: c.to(dtype), self.cache.null_text())
        self.shape = self.cache.latent_shape

    def __len__(self) -> int:
        return len(self.cache)

    def __repr__(self) -> str:
        return f"LatentCacheData({self.cache!r})"

    def sample(self, n: int, *, generator: torch.Generator | None = None, device: Any = None) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        idx = randint(len(self.cache), n, generator=generator, device="cpu")
        if self._data is not None:
            lat, cond = self._data[0][idx], map_condition(lambda c: c[idx], self._data[1])
        else:
            lat, cond = self.cache.get(idx)
        return lat.to(device=device, dtype=self.dtype), map_condition(lambda c: c.to(device=device, dtype=self.dtype), cond)

