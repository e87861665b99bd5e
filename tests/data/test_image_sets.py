"""Image data: readers (folder, ZIP, .npy/.npz, digits), samplers, flips, scaling, grids, bad input."""

import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectflow.data import make_distribution
from rectflow.data.image_sets import (
    ImageArray,
    ImageDataset,
    ImageGaussian,
    load_digits_images,
    load_images,
    read_image_array,
    read_image_folder,
    read_image_zip,
    resize_images,
    to_uint8,
    to_unit_range,
)
from rectflow.errors import DataError
from rectflow.images.generate import image_grid, save_image_grid, save_pair_grid

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg" / "test.zip"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(6, 6), channels=3) -> dict:
    rng = np.random.default_rng(0)
    made = {}
    for c in classes:
        for i in range(per_class):
            shape = (*size, channels) if channels > 1 else size
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            write_png(root / c / f"{i:03d}.png", arr)
            made[f"{c}/{i:03d}.png"] = arr
    return made


def zip_folder(root: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, prefix + p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""))
    return out


def test_digits_are_bundled_8x8_with_labels():
    d = load_digits_images()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8
    assert d.num_classes == 10 and d.labels.shape == (1797,)
    assert int(d.images.max()) == 255 and int(d.images.min()) == 0


def test_sampler_range_determinism_and_labels():
    ds = make_distribution({"name": "digits"})
    x = ds.sample(64, generator=gen(1))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(x, ds.sample(64, generator=gen(1)))
    x2, y = ds.sample_labelled(64, generator=gen(1))
    assert torch.equal(x, x2) and y.dtype == torch.int64 and int(y.max()) < 10
    # each sample is exactly one of the data images, scaled to [-1, 1]
    imgs = to_unit_range(ds.images)
    for i in range(5):
        assert any(torch.equal(x[i], imgs[j]) for j in torch.nonzero(ds.labels == y[i]).squeeze(1).tolist())


def test_horizontal_flips_are_random_and_exact():
    arr = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4) * 20
    ds = ImageDataset(ImageArray(torch.from_numpy(arr)), flip=True)
    x = ds.sample(200, generator=gen(0))
    orig, flipped = to_unit_range(torch.from_numpy(arr))[0], to_unit_range(torch.from_numpy(arr))[0].flip(-1)
    is_orig = torch.tensor([torch.equal(s, orig) for s in x])
    is_flip = torch.tensor([torch.equal(s, flipped) for s in x])
    assert bool((is_orig | is_flip).all()) and 60 < int(is_flip.sum()) < 140
    assert torch.equal(ImageDataset(ImageArray(torch.from_numpy(arr)), flip=False).sample(10, generator=gen(0)), orig.expand(10, -1, -1, -1))


def test_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_unit_range(u)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(to_uint8(x), u)
    # one float32 multiply (rounded alike on CPU and CUDA, which divides by multiplying by the reciprocal)
    assert torch.equal(x, u.float() * torch.tensor(1 / 127.5, dtype=torch.float32) - 1)


def test_folder_and_zip_give_the_same_labelled_images(tmp_path):
    made = make_folder(tmp_path / "data")
    a = read_image_folder(tmp_path / "data")
    assert a.images.shape == (6, 3, 6, 6) and a.class_names == ["cat", "dog"]
    assert a.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(a.images[3], torch.from_numpy(made["dog/000.png"]).permute(2, 0, 1))
    for prefix in ("", "train/"):  # a single top folder around the class folders is allowed
        b = read_image_zip(zip_folder(tmp_path / "data", tmp_path / f"d{len(prefix)}.zip", prefix))
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and b.class_names == a.class_names


def test_flat_folder_is_unlabelled_and_classes_select(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_png(tmp_path / "flat" / f"{i}.png", rng.integers(0, 256, (5, 5), dtype=np.uint8))
    flat = read_image_folder(tmp_path / "flat")
    assert flat.images.shape == (4, 1, 5, 5) and flat.labels is None and flat.num_classes == 0
    with pytest.raises(DataError, match="labels"):
        ImageDataset(flat).sample_labelled(2)
    make_folder(tmp_path / "c", classes=("a", "b", "c"))
    sel = load_images(tmp_path / "c", classes=["c", "a"])
    assert sel.class_names == ["c", "a"] and sorted(sel.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="no class folder"):
        load_images(tmp_path / "c", classes=["zebra"])


def test_npy_and_npz_arrays(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", hwc)
    a = read_image_array(tmp_path / "a.npy")
    assert a.images.shape == (5, 3, 4, 4) and torch.equal(a.images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    floats = rng.uniform(-1, 1, (6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=floats, labels=np.array([0, 1, 2, 0, 1, 2]))
    b = read_image_array(tmp_path / "b.npz")
    assert b.images.shape == (6, 1, 4, 4) and b.num_classes == 3
    assert torch.allclose(to_unit_range(b.images), torch.from_numpy(floats), atol=1 / 127.5)
    ds = make_distribution({"name": "images", "path": str(tmp_path / "b.npz"), "classes": ["2"]})
    assert len(ds) == 2 and ds.num_classes == 1


def test_image_gaussian_and_registry():
    g = make_distribution({"name": "gaussian", "shape": [3, 4, 4]})
    assert isinstance(g, ImageGaussian) and g.dim == 48
    assert torch.equal(g.sample(5, generator=gen(3)), g.sample(5, generator=gen(3)))
    assert g.sample(5, generator=gen(3)).shape == (5, 3, 4, 4)
    assert make_distribution({"name": "gaussian", "dim": 2}).dim == 2  # the toy Gaussian is unchanged
    with pytest.raises(DataError, match="unknown parameter"):
        make_distribution({"name": "digits", "colour": True})
    with pytest.raises(DataError, match="path"):
        make_distribution({"name": "images"})


# ----- bad input -------------------------------------------------------------------------------


def test_mixed_sizes_are_refused(tmp_path):
    write_png(tmp_path / "m" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "m" / "b.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(DataError, match="mixed sizes"):
        read_image_folder(tmp_path / "m")


def test_mixed_modes_are_refused_unless_converted(tmp_path):
    write_png(tmp_path / "m" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "m" / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="mixed modes"):
        read_image_folder(tmp_path / "m")
    assert read_image_folder(tmp_path / "m", mode="RGB").images.shape == (2, 3, 4, 4)


def test_empty_class_folder_is_refused(tmp_path):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "horse").mkdir()
    with pytest.raises(DataError, match="horse.*no images"):
        read_image_folder(tmp_path / "d")
    with pytest.raises(DataError, match="horse.*no images"):
        read_image_zip(zip_folder(tmp_path / "d", tmp_path / "d.zip"))


def test_corrupt_image_is_named(tmp_path):
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="bad.png.*cannot decode"):
        read_image_folder(tmp_path / "d")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="ZIP"):
        read_image_zip(bad_zip)


def test_label_count_mismatch_and_other_array_errors(tmp_path):
    np.savez(tmp_path / "m.npz", images=np.zeros((4, 3, 2, 2), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(DataError, match="4 images but 3 labels"):
        read_image_array(tmp_path / "m.npz")
    np.savez(tmp_path / "k.npz", pictures=np.zeros((4, 3, 2, 2), np.uint8))
    with pytest.raises(DataError, match="'images'"):
        read_image_array(tmp_path / "k.npz")
    np.save(tmp_path / "r.npy", np.full((2, 3, 2, 2), 3.0, np.float32))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        read_image_array(tmp_path / "r.npy")
    with pytest.raises(DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        read_image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="no such"):
        load_images(tmp_path / "missing")
    with pytest.raises(DataError, match="one label per image"):
        ImageArray(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype, msg", [(np.complex64, "complex"), ("U1", "expected real numbers"), (bool, "expected real numbers")])
def test_complex_and_non_numeric_image_arrays_are_refused(tmp_path, dtype, msg):
    """issue 13 item 8: complex images used to lose their imaginary part silently."""
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), dtype=dtype))
    with pytest.raises(DataError, match=msg) as e:
        read_image_array(tmp_path / "x.npy")
    assert "x.npy" in str(e.value)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])  # past PIL's error limit, and past its warning limit
def test_a_decompression_bomb_in_a_zip_is_a_data_error_naming_the_member(tmp_path, side):
    """issue 13 item 10: PIL's DecompressionBombError escaped the image decoder."""
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat/huge.png", _png_claiming(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning must not be the only signal either
        with pytest.raises(DataError, match=r"bomb\.zip/cat/huge\.png.*pixels") as e:
            read_image_zip(path)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 JPEG test.zip not present")
def test_cifar10_zip_classes():
    cats = load_images(CIFAR, classes=["cat"])
    assert cats.images.shape == (1000, 3, 32, 32) and cats.class_names == ["cat"]


# ----- grids -------------------------------------------------------------------------------------


def test_grids_and_pair_grids(tmp_path):
    x = torch.rand(10, 3, 8, 8) * 2 - 1
    g = image_grid(x, nrow=5, padding=1)
    assert g.shape == (2 * 9 + 1, 5 * 9 + 1, 3) and g.dtype == np.uint8
    assert np.array_equal(g[1:9, 1:9], to_uint8(x[0]).permute(1, 2, 0).numpy())
    p = save_image_grid(x[:, :1], tmp_path / "g.png", scale=2)
    assert Image.open(p).size == (2 * (4 * 10 + 2), 2 * (3 * 10 + 2))
    q = save_pair_grid(x[:4], -x[:4], tmp_path / "pairs.png", per_row=2)
    assert Image.open(q).size == (4 * 10 + 2, 2 * 10 + 2)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uint8_images_on_the_gpu_match_the_cpu():
    cpu = make_distribution({"name": "digits", "flip": True})
    gpu = make_distribution({"name": "digits", "flip": True, "device": "cuda"})
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8
    a = cpu.sample(256, generator=gen(5))
    b = gpu.sample(256, generator=gen(5))
    assert b.is_cuda and torch.equal(a, b.cpu())


def test_resize_halving_is_the_exact_2x2_mean_and_keeps_labels():
    g = gen(3)
    x = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageArray(x, torch.arange(5), [str(i) for i in range(5)], "x")
    small = resize_images(data, 4)
    want = x.float().reshape(5, 3, 4, 2, 4, 2).mean(dim=(3, 5)).round().to(torch.uint8)
    assert small.images.shape == (5, 3, 4, 4) and small.images.dtype == torch.uint8
    assert torch.equal(small.images, want)
    assert torch.equal(small.labels, data.labels) and small.class_names == data.class_names
    assert resize_images(data, [8, 8]) is data  # already that size: unchanged
    assert resize_images(data, [16, 12]).images.shape == (5, 3, 16, 12)  # enlarging (bilinear)


@pytest.mark.parametrize("size", [0, -4, 2.5, "16", [16], True])
def test_resize_refuses_sizes_that_are_not_positive_integers(size):
    data = ImageArray(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), source="x")
    with pytest.raises(DataError, match="resize"):
        resize_images(data, size)


def test_resize_through_the_registry_changes_the_sample_shape():
    ds = make_distribution({"name": "digits", "resize": 4})
    assert ds.sample(3, generator=gen()).shape == (3, 1, 4, 4)
