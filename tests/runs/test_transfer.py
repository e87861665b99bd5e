"""rectflow sample --from: a run maps the user's own source samples (domain transfer), each output beside its input."""

import numpy as np
import pytest
import torch
from PIL import Image

from rectflow.cli import main
from rectflow.flow.sampling import sample_model
from rectflow.runs.experiment import load_run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("transfer") / "digits"
    assert main(["train", "--run", str(run), "-q", "--no-eval", "target=digits", "source={name: gaussian, shape: [1, 8, 8]}", "model.kind=unet",
                 "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.head_channels=8", "model.attention_resolutions=[]",
                 "train.steps=3", "train.batch_size=8", "train.precision=fp32"]) == 0
    return run


def _pictures(folder, n=3, mode="L", side=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (side, side) if mode == "L" else (side, side, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"pic_{i}.png")
    return folder


def test_an_image_run_maps_a_folder_of_pictures_and_writes_each_output_by_name(image_run, tmp_path, capsys):
    pics = _pictures(tmp_path / "pics")
    assert main(["sample", str(image_run), "--from", str(pics), "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    assert "mapped 3 inputs" in capsys.readouterr().out
    z = np.load(tmp_path / "out" / "samples.npz")
    originals = np.stack([np.asarray(Image.open(pics / f"pic_{i}.png"))[None] for i in range(3)])
    assert np.array_equal(z["inputs"], originals)  # the inputs, exactly, beside their outputs
    assert sorted(p.name for p in (tmp_path / "out" / "outputs").iterdir()) == ["pic_0.png", "pic_1.png", "pic_2.png"]
    assert (tmp_path / "out" / "grid.png").is_file()
    # each output is the flow of exactly that input (Euler 2 from x0 = the picture in [-1, 1])
    run = load_run(image_run)
    x0 = torch.from_numpy(originals).float() / 127.5 - 1
    with torch.no_grad():
        want = sample_model(run.model, x0, method="euler", steps=2).x
    got = np.stack([np.asarray(Image.open(tmp_path / "out" / "outputs" / f"pic_{i}.png"))[None] for i in range(3)])
    assert np.abs(got.astype(int) - np.round((want.clamp(-1, 1).numpy() + 1) * 127.5).astype(int)).max() <= 1
    assert np.array_equal(z["images"], got)


def test_a_vector_run_maps_the_points_of_a_npy_file(tmp_path):
    run = tmp_path / "moons"
    assert main(["train", "--run", str(run), "-q", "--no-eval", "model.width=8", "model.depth=2", "train.steps=3", "train.precision=fp32"]) == 0
    pts = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    assert main(["sample", str(run), "--from", str(tmp_path / "pts.npy"), "--solver", "euler", "--steps", "3", "--out", str(tmp_path / "y.npy")]) == 0
    with torch.no_grad():
        want = sample_model(load_run(run).model, torch.from_numpy(pts), method="euler", steps=3).x
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case, name", [("rgb", "3x8x8"), ("big", "1x16x16"), ("empty", "no images found"), ("missing", "no such file"),
                                        ("n", "--n does not apply")])
def test_bad_inputs_are_one_line_naming_the_file(image_run, tmp_path, capsys, case, name):
    src = {"rgb": lambda: _pictures(tmp_path / "rgb", mode="RGB"), "big": lambda: _pictures(tmp_path / "big", side=16),
           "empty": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty", "missing": lambda: tmp_path / "missing",
           "n": lambda: _pictures(tmp_path / "pics")}[case]()
    extra = ["--n", "4"] if case == "n" else []
    assert main(["sample", str(image_run), "--from", str(src), *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_float_arrays_in_the_source_range_are_used_exactly_and_others_refused(image_run, tmp_path):
    from rectflow.errors import DataError
    from rectflow.runs.transfer import load_transfer_inputs

    run = load_run(image_run)
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    np.save(tmp_path / "x.npy", x)
    got = load_transfer_inputs(tmp_path / "x.npy", run.source).x
    assert torch.equal(got, torch.from_numpy(x))  # not rounded to 8 bits
    np.save(tmp_path / "big.npy", x * 2)
    with pytest.raises(DataError, match=r"big.npy: float images must be finite and in the source's range \[-1, 1\]"):
        load_transfer_inputs(tmp_path / "big.npy", run.source)
    np.save(tmp_path / "hwc.npy", x.transpose(0, 2, 3, 1))
    with pytest.raises(DataError, match=r"hwc.npy: float images must be \(N, 1, 8, 8\)"):
        load_transfer_inputs(tmp_path / "hwc.npy", run.source)
