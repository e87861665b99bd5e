"""Image data sets as samplers of pi0 / pi1 (theory §1.3 and §7.1).

Readers (all return :class:`ImageArray`: uint8 images (N, C, H, W), optional int64 labels and
class names):

* :func:`read_image_folder` -- a folder of images; one sub-folder per class gives labels
  (``cat/0001.png``), images directly in the folder give an unlabelled set;
* :func:`read_image_zip` -- a ZIP archive of such a folder (e.g. ``cifar10-jpeg/train.zip``);
* :func:`read_image_array` -- ``.npy`` (N, H, W), (N, H, W, C) or (N, C, H, W), or ``.npz`` with
  ``images`` (or ``x``) and optional ``labels`` (or ``y``); uint8 0..255 or floats in [-1, 1];
* :func:`load_digits_images` -- scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

Samplers (the repo protocol ``sample(n, generator=None, device=None) -> (n, C, H, W)``):

* :class:`ImageDataset` -- uniform draws with replacement, optional random horizontal flips,
  values scaled to [-1, 1]; ``sample_labelled`` also returns the labels (class-conditional
  training, :mod:`rectflow.images.conditional`).  The images stay uint8 on ``storage_device``: a small data
  set (CIFAR-10 is 150 MB) can live on the GPU, so a batch is a gather, a flip and a scale there.
* :class:`ImageGaussian` -- N(0, I) of a given image shape (the usual source pi0).

Another image set as the source is domain transfer (e.g. CIFAR-10 cats -> dogs: select classes).
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from rectflow.draws import draw_device, rand, randint
from rectflow.errors import DataError, reading

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGE_DISTRIBUTIONS",
    "ImageArray",
    "ImageDataset",
    "ImageGaussian",
    "read_image_folder",
    "read_image_zip",
    "read_image_array",
    "load_digits_images",
    "load_images",
    "make_image_distribution",
    "to_unit_range",
    "to_uint8",
    "require_real",
    "resize_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MODES = {"L": 1, "RGB": 3, "RGBA": 4}


@dataclass
class ImageArray:
    """Decoded images: ``images`` uint8 (N, C, H, W); ``labels`` int64 (N,) or None;
    ``class_names`` (one per label value) or None; ``source`` names where they came from; ``names`` the
    file of each image (relative to the folder or ZIP) when they were read from files."""

    images: Tensor
    labels: Tensor | None = None
    class_names: list[str] | None = None
    source: str = "images"
    names: list[str] | None = None

    def __post_init__(self) -> None:
        x = self.images
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] == 0:
            raise DataError(f"{self.source}: expected a non-empty uint8 tensor (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
        if self.labels is not None:
            if self.labels.shape != (x.shape[0],):
                raise DataError(f"{self.source}: {x.shape[0]} images but {self.labels.numel()} labels; there must be one label per image")
            if int(self.labels.min()) < 0:
                raise DataError(f"{self.source}: labels must be integers >= 0, found {int(self.labels.min())}")
            if self.class_names is not None and int(self.labels.max()) >= len(self.class_names):
                raise DataError(f"{self.source}: label {int(self.labels.max())} but only {len(self.class_names)} class names")

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1


# ----- decoding --------------------------------------------------------------------------------


def _decode(data: bytes, name: str, mode: str | None) -> np.ndarray:
    """One image file's bytes -> uint8 (H, W, C); ``mode`` converts (L, RGB, RGBA), None keeps it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse before decoding, not after
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if mode is not None:
                    im = im.convert(mode)
                elif im.mode not in _MODES:
                    raise DataError(f"{name}: image mode {im.mode!r} is not one of {sorted(_MODES)}; pass mode='RGB' or 'L' to convert")
                arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray], names: list[str], source: str) -> Tensor:
    """Stack decoded (H, W, C) arrays into (N, C, H, W); mixed sizes or modes raise DataError."""
    first = arrays[0].shape
    for a, n in zip(arrays, names):
        if a.shape != first:
            what = "sizes" if a.shape[:2] != first[:2] else "modes (channel counts)"
            raise DataError(
                f"{source}: images of mixed {what}: {names[0]} is {first[1]}x{first[0]} with {first[2]} channel(s), "
                f"{n} is {a.shape[1]}x{a.shape[0]} with {a.shape[2]} channel(s); resize/convert them (or pass mode='RGB')"
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _labelled_layout(names: Sequence[str], source: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Image names (POSIX relative paths) -> (names in order, labels or None, class names or None).

    Images directly in the root: unlabelled.  Images one level down: the folder is the class.
    A single common top folder holding class folders (``train/cat/...``) is stripped.
    """
    parts = [PurePosixPath(n).parts for n in names]
    if parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    depths = {len(p) for p in parts}
    if depths == {1}:
        return list(names), None, None
    if depths != {2}:
        raise DataError(f"{source}: images must all sit in the root (unlabelled) or all in one level of class folders; found nesting depths {sorted(depths)}")
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return list(names), [index[p[0]] for p in parts], classes


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith(".")


def read_image_folder(path: str | Path, *, mode: str | None = None, classes: Sequence[str] | None = None) -> ImageArray:
    """Read every image under ``path`` (class sub-folders give labels; see module docstring).

    Args:
        mode: convert every image to ``L``, ``RGB`` or ``RGBA``; None requires them all to share one.
        classes: keep only these class folders (labels are renumbered 0.. in the order given).
    Raises:
        DataError: no such folder, no images, an empty class folder, a corrupt image, mixed sizes/modes.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    rel = [p.relative_to(root).as_posix() for p in files]
    # an empty class folder is a mistake worth reporting (it would silently drop a class)
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(len(PurePosixPath(r).parts) == 2 for r in rel):
        for d in sorted(subdirs):
            if not any(_is_image(p.name) for p in d.rglob("*") if p.is_file()):
                raise DataError(f"{d}: class folder holds no images (remove it or add images)")
    return _read(rel, lambda r: (root / r).read_bytes(), str(root), mode, classes)


def read_image_zip(path: str | Path, *, mode: str | None = None, classes: Sequence[str] | None = None) -> ImageArray:
    """Read every image in a ZIP archive of an image folder (same layout rules as :func:`read_image_folder`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such ZIP file")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{p}: not a readable ZIP archive ({e})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and _is_image(i.filename) and not i.filename.startswith("__MACOSX/")]
        dirs = {i.filename.rstrip("/") for i in zf.infolist() if i.is_dir()}
        names = sorted(i.filename for i in infos)
        used = {str(PurePosixPath(n).parent) for n in names}
        for d in sorted(dirs):
            if d and not d.startswith("__MACOSX") and d not in used and not any(u.startswith(d + "/") for u in used):
                raise DataError(f"{p}: class folder {d!r} holds no images (remove it or add images)")

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{p}: member {name} is corrupt ({e})") from None

        return _read(names, read, str(p), mode, classes)


def _read(names: list[str], read, source: str, mode: str | None, classes: Sequence[str] | None) -> ImageArray:
    if mode is not None and mode not in _MODES:
        raise DataError(f"image mode must be one of {sorted(_MODES)} or None, got {mode!r}")
    if not names:
        raise DataError(f"{source}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    names, labels, class_names = _labelled_layout(names, source)
    if classes is not None:
        if class_names is None:
            raise DataError(f"{source}: classes {list(classes)} requested but the images are not in class folders")
        missing = [c for c in classes if c not in class_names]
        if missing:
            raise DataError(f"{source}: no class folder(s) {missing}; classes present: {class_names}")
        remap = {class_names.index(c): i for i, c in enumerate(classes)}
        keep = [k for k, lab in enumerate(labels) if lab in remap]
        names, labels, class_names = [names[k] for k in keep], [remap[labels[k]] for k in keep], list(classes)
    arrays = [_decode(read(n), f"{source}/{n}" if not source.endswith("/") else source + n, mode) for n in names]
    images = _stack(arrays, names, source)
    lab = torch.tensor(labels, dtype=torch.int64) if labels is not None else None
    return ImageArray(images, lab, class_names, source, names=list(names))


def require_real(arr: np.ndarray, where: str) -> None:
    """Raise DataError unless ``arr`` holds real numbers (integers or floats): a complex array
    would lose its imaginary part in a cast, and strings, records or booleans are not data."""
    if np.iscomplexobj(arr):
        raise DataError(f"{where}: holds complex numbers (dtype {arr.dtype}); the imaginary part would be lost, so pass real numbers")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: expected real numbers (integers or floats), got dtype {arr.dtype}")


def _to_uint8_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    require_real(arr, where)
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: images contain NaN or inf")
    if np.issubdtype(arr.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise DataError(f"{where}: integer images must lie in 0..255, found {a.min():g}..{a.max():g}")
        return a.astype(np.uint8)
    if a.min() < -1 - 1e-6 or a.max() > 1 + 1e-6:
        raise DataError(f"{where}: float images must lie in [-1, 1], found {a.min():.4g}..{a.max():.4g}")
    return np.round((a + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _channels_last(shape: tuple[int, ...]) -> bool:
    """(N, H, W, C) rather than (N, C, H, W)?  Channel axes have 1, 3 or 4 entries; when both the
    second and the last axis could be channels, the reading with square images wins (else NCHW)."""
    first, last = shape[1] in (1, 3, 4), shape[3] in (1, 3, 4)
    if last and not first:
        return True
    if last and first:
        return shape[1] == shape[2] and shape[2] != shape[3]
    return False


def read_image_array(path: str | Path) -> ImageArray:
    """Images from ``.npy`` or ``.npz`` (see module docstring); the channel axis is detected by
    :func:`_channels_last`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    labels = None
    with reading(p, "images"):
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = next((k for k in ("images", "x") if k in z.files), None)
                if key is None:
                    raise DataError(f"{p}: expected an array named 'images' (or 'x'); found {z.files}")
                arr = z[key]
                lkey = next((k for k in ("labels", "y") if k in z.files), None)
                labels = z[lkey] if lkey else None
        else:
            raise DataError(f"{p}: unsupported image-array format {p.suffix!r}; use .npy or .npz")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise DataError(f"{p}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {arr.shape}")
    if _channels_last(arr.shape):
        arr = arr.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(_to_uint8_array(arr, str(p))))
    lab = None
    if labels is not None:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise DataError(f"{p}: labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{p}: {images.shape[0]} images but {labels.shape[0]} labels; there must be one label per image")
        lab = torch.from_numpy(labels.astype(np.int64))
    return ImageArray(images, lab, None, str(p))


def load_digits_images() -> ImageArray:
    """scikit-learn's bundled 8x8 handwritten digits (no download): 1,797 images (1, 8, 8), labels 0-9."""
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only the digits need it

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # values 0..16 -> 0..255
    return ImageArray(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)], "digits")


def load_images(path: str | Path, *, mode: str | None = None, classes: Sequence[str] | None = None) -> ImageArray:
    """Dispatch on ``path``: a folder, a ``.zip``, or a ``.npy`` / ``.npz`` array file."""
    p = Path(path)
    if p.is_dir():
        return read_image_folder(p, mode=mode, classes=classes)
    if p.suffix.lower() == ".zip":
        return read_image_zip(p, mode=mode, classes=classes)
    if p.suffix in (".npy", ".npz"):
        data = read_image_array(p)
        if mode is not None:
            raise DataError(f"{p}: mode conversion applies to image files, not arrays")
        return _select_classes(data, classes)
    if not p.exists():
        raise DataError(f"{p}: no such image folder or file")
    raise DataError(f"{p}: unsupported image source; use a folder, a .zip of one, or a .npy/.npz array")


def resize_images(data: ImageArray, size: int | Sequence[int]) -> ImageArray:
    """Resize every image to ``size`` (an int for square images, or ``[H, W]``), once, kept uint8.

    Shrinking averages the source pixels each output pixel covers (area interpolation: an exact
    2x2 mean for a halving, no aliasing); enlarging is bilinear.  Labels and names are kept.
    Shapes: images (N, C, H, W) uint8 -> (N, C, size_h, size_w) uint8.
    """
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size) if isinstance(size, Sequence) else None
    if hw is None or len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in hw):
        raise DataError(f"{data.source}: resize must be a positive integer or [height, width], got {size!r}")
    if tuple(data.images.shape[-2:]) == hw:
        return data
    chunks = []
    shrink = hw[0] <= data.images.shape[-2] and hw[1] <= data.images.shape[-1]
    for x in data.images.split(4096):
        y = F.interpolate(x.float(), size=hw, mode="area") if shrink else F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False)
        chunks.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return ImageArray(torch.cat(chunks), data.labels, data.class_names, f"{data.source} (resized to {hw[0]}x{hw[1]})")


def _select_classes(data: ImageArray, classes: Sequence[Any] | None) -> ImageArray:
    if classes is None:
        return data
    if data.labels is None:
        raise DataError(f"{data.source}: classes {list(classes)} requested but the images have no labels")
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    wanted = [str(c) for c in classes]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{data.source}: no class(es) {missing}; classes present: {names}")
    old = torch.tensor([names.index(c) for c in wanted])
    keep = torch.isin(data.labels, old)
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[old] = torch.arange(len(wanted))
    return ImageArray(data.images[keep], remap[data.labels[keep]], wanted, data.source)


# ----- value scaling ---------------------------------------------------------------------------


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (x * (1 / 127.5) - 1).

    One multiply, not a division: CUDA divides by multiplying by the reciprocal, so a division
    would give values 1 ulp apart on the two devices; a multiply is rounded alike everywhere."""
    return x.float().mul_(1 / 127.5).sub_(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] (clipped) -> uint8 0..255, the inverse of :func:`to_unit_range` up to rounding."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----- samplers --------------------------------------------------------------------------------


class ImageDataset:
    """Uniform draws (with replacement) from an image set, as floats in [-1, 1].

    Args:
        data: an :class:`ImageArray` (from a reader above).
        flip: random horizontal flips with probability 1/2 (drawn from the generator).
        storage_device: where the uint8 images live ("cpu", "cuda", or "auto": CUDA when available
            and the set is at most ``max_device_bytes``).  Batches are gathered there.
    Sampling: index draws and flip decisions come from ``generator`` in that order, so
    ``sample`` and ``sample_labelled`` return the same images for the same generator state.
    """
    def __init__(self, data: ImageArray, *, flip: bool = False, storage_device: str | torch.device = "cpu", max_device_bytes: int = 2 << 30) -> None:
        self.data = data
        self.flip = bool(flip)
        if str(storage_device) == "auto":
            storage_device = "cuda" if torch.cuda.is_available() and data.images.numel() <= max_device_bytes else "cpu"
        dev = torch.device(storage_device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DataError("image storage_device 'cuda' requested but CUDA is not available")
        self.storage_device = dev
        self.images = data.images.to(dev)
        self.labels = data.labels.to(dev) if data.labels is not None else None
        self.shape: tuple[int, int, int] = tuple(int(s) for s in data.images.shape[1:])  # type: ignore[assignment]
        self.dim = math.prod(self.shape)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.data.class_names

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ImageDataset({self.data.source!r}, n={len(self)}, shape={list(self.shape)}, classes={self.num_classes}, flip={self.flip})"

    def _draw(self, n: int, generator, device) -> tuple[Tensor, Tensor]:
        idx = randint(len(self), n, generator=generator, device=self.storage_device)
        x = self.images[idx]
        if self.flip:
            mask = rand(n, generator=generator, device=self.storage_device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        out = device if device is not None else self.storage_device
        return to_unit_range(x.to(out, non_blocking=True)), idx

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n images (n, C, H, W) in [-1, 1] on ``device`` (default: the storage device)."""
        return self._draw(n, generator, device)[0]

    def sample_labelled(self, n: int, *, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        """n images (n, C, H, W) and their labels (n,) int64; DataError for an unlabelled set."""
        if self.labels is None:
            raise DataError(f"{self.data.source}: class-conditional training needs labels, but these images have none (use class folders or an .npz with 'labels')")
        x, idx = self._draw(n, generator, device)
        out = device if device is not None else self.storage_device
        return x, self.labels[idx].to(out)


@dataclass
class ImageGaussian:
    """N(0, std^2 I) over images of ``shape`` (C, H, W): the usual source pi0 for images.

    Randomness: on the CPU the noise comes straight from ``generator``; for another device it is
    drawn there from a device generator seeded by one draw of ``generator`` (so a CUDA batch costs
    no host-side sampling or copy).  Either way it is a function of the generator's state.
    """
    shape: tuple[int, ...] = (3, 32, 32)
    std: float = 1.0

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if not self.shape or any(s < 1 for s in self.shape) or not self.std > 0:
            raise DataError(f"gaussian image source: need a shape of positive sizes and std > 0, got shape={list(self.shape)}, std={self.std}")
        self.dim = math.prod(self.shape)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        device = torch.device(device) if device is not None else torch.device("cpu")
        gdev = draw_device(generator, device)
        if generator is not None and device.type != gdev.type:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev))
            generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((n, *self.shape), generator=generator, device=device)
        return x * self.std if self.std != 1.0 else x

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, std^2 I) of images (B, *shape) -> (B,) (theory §3.4 needs it for likelihoods)."""
        z = x.reshape(x.shape[0], -1) / self.std
        return -0.5 * z.square().sum(-1) - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))


# ----- registry (used by rectflow.data.make_distribution) --------------------------------------


IMAGE_DISTRIBUTIONS = ("images", "digits")


def make_image_distribution(spec: dict[str, Any]) -> Any:
    """Build an image sampler from a spec:

    * ``{"name": "images", "path": ..., "flip": false, "classes": [...], "mode": null, "device": "cpu", "resize": null}``
      (a folder, a .zip of one, or .npy/.npz; ``resize: 16`` downsamples to 16x16 once, see :func:`resize_images`);
    * ``{"name": "digits", "flip": false, "classes": [...], "device": "cpu", "resize": null}`` (scikit-learn's 8x8 digits);
    * ``{"name": "gaussian", "shape": [C, H, W], "std": 1.0}`` (an image-shaped N(0, I)).
    """
    params = dict(spec)
    name = params.pop("name")
    if name == "gaussian":
        allowed = {"shape", "std"}
    elif name == "images":
        allowed = {"path", "flip", "classes", "mode", "device", "resize"}
    elif name == "digits":
        allowed = {"flip", "classes", "device", "resize"}
    else:
        raise DataError(f"unknown image distribution {name!r}; choose one of {list(IMAGE_DISTRIBUTIONS)} or gaussian with a shape")
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise DataError(f"distribution {name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
    if name == "gaussian":
        return ImageGaussian(tuple(params["shape"]), float(params.get("std", 1.0)))
    classes = params.get("classes")
    if classes is not None and (isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable)):
        raise DataError(f"distribution {name!r}: classes must be a list of class names, got {classes!r}")
    if name == "images":
        if "path" not in params:
            raise DataError("distribution 'images' needs a 'path' (an image folder, a .zip of one, or .npy/.npz)")
        data = load_images(params["path"], mode=params.get("mode"), classes=[str(c) for c in classes] if classes is not None else None)
    else:
        data = _select_classes(load_digits_images(), classes)
    if params.get("resize") is not None:
        data = resize_images(data, params["resize"])
    return ImageDataset(data, flip=bool(params.get("flip", False)), storage_device=params.get("device", "cpu"))
