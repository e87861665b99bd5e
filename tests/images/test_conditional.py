"""Class conditioning: label dropout, classifier-free guidance in every sampler, the NFE rule,
compile-friendly fixed-step sampling, and class-conditional training end to end."""

import numpy as np
import pytest
import torch
from torch import nn

from rectflow.data import make_distribution
from rectflow.diffusion.samplers import ddim
from rectflow.errors import ConfigError, DataError
from rectflow.flow.paths import LinearPath
from rectflow.flow.sampling import sample_model
from rectflow.flow.solvers import solve, time_grid
from rectflow.images.conditional import NULL_LABEL, ConditionalFlowMatchingObjective, GuidedVelocity, LabelledCoupling, drop_labels, sample_guided
from rectflow.images.generate import FixedStepSampler, sample_images
from rectflow.runs.config import load_config
from rectflow.runs.experiment import build_distributions, build_objective, load_run, train_run


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class ToyConditional(nn.Module):
    """v(x, t, y) = a_y x + b t with a learned-like table; the last row is the null label.
    Records the labels of every call."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.a = nn.Parameter(torch.linspace(-1.0, 1.0, num_classes + 1))
        self.calls = []

    def forward(self, x, t, y=None):
        idx = torch.full((x.shape[0],), self.num_classes) if y is None else y.masked_fill(y == NULL_LABEL, self.num_classes)
        self.calls.append(x.shape[0])
        return self.a[idx].reshape(-1, *[1] * (x.dim() - 1)) * x + t.reshape(-1, *[1] * (x.dim() - 1))


class ToyUnconditional(nn.Module):
    def forward(self, x, t):
        return -x


def test_label_dropout():
    y = torch.arange(10).repeat(1000)
    d = drop_labels(y, 0.2, gen(0))
    frac = float((d == NULL_LABEL).float().mean())
    assert 0.18 < frac < 0.22
    kept = d != NULL_LABEL
    assert torch.equal(d[kept], y[kept])
    assert torch.equal(d, drop_labels(y, 0.2, gen(0)))
    assert torch.equal(drop_labels(y, 0.0, gen(0)), y) and bool((drop_labels(y, 1.0, gen(0)) == NULL_LABEL).all())
    with pytest.raises(ConfigError, match="p_uncond"):
        drop_labels(y, 1.5)


def test_guided_velocity_is_the_cfg_combination():
    m = ToyConditional()
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    cond, uncond = m(x, t, y), m(x, t, None)
    for w in (0.0, 1.0, 2.5, -0.5):
        g = GuidedVelocity(m, y, w)
        assert torch.allclose(g(x, t), uncond + w * (cond - uncond), atol=1e-6)
        assert g.nfe_per_eval == (1 if w in (0.0, 1.0) else 2)
    m.calls.clear()
    GuidedVelocity(m, y, 3.0)(x, t)
    assert m.calls == [8]  # cond and uncond batched into ONE call of 2B rows


def test_guided_forward_changes_no_attribute():
    # a counter mutated inside forward is a torch.compile guard: every call would recompile
    m = ToyConditional()
    g = GuidedVelocity(m, torch.tensor([0, 1, 2, 0]), 2.0)
    before = {k: v for k, v in vars(g).items() if not k.startswith("_")}
    for _ in range(3):
        g(torch.randn(4, 2), torch.rand(4))
    assert {k: v for k, v in vars(g).items() if not k.startswith("_")} == before


def test_guidance_on_an_unconditional_model_is_refused():
    with pytest.raises(ConfigError, match="unconditional"):
        GuidedVelocity(ToyUnconditional(), torch.tensor([0, 1]), 2.0)
    with pytest.raises(ConfigError, match="unconditional"):
        sample_guided(ToyUnconditional(), torch.randn(2, 2), torch.tensor([0, 1]), 2.0, steps=2)


@pytest.mark.parametrize("method,steps", [("euler", 4), ("heun", 3), ("rk4", 2), ("dopri5", None)])
def test_nfe_counts_every_network_evaluation(method, steps):
    m = ToyConditional()
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    res = sample_guided(m, x, y, 2.0, method=method, steps=steps, rtol=1e-4, atol=1e-4)
    rows = sum(m.calls)
    assert res.nfe == rows // 6 and rows % 6 == 0  # rows fed to the network / batch = NFE per sample
    plain = sample_model(m, x, method=method, steps=steps, rtol=1e-4, atol=1e-4, model_kwargs={"y": y})
    if method != "dopri5":  # adaptive: the guided ODE takes its own number of steps
        assert res.nfe == 2 * plain.nfe
    m.calls.clear()
    assert sample_guided(m, x, y, 1.0, method=method, steps=steps, rtol=1e-4, atol=1e-4).nfe == plain.nfe == sum(m.calls) // 6


def test_guidance_works_in_every_sampler():
    """solvers, sample_model (chunked), the diffusion-style samplers and the unrolled sampler agree."""
    m = ToyConditional()
    x, y, w = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1]), 1.7
    ref = solve(GuidedVelocity(m, y, w), x, method="euler", steps=8).x
    assert torch.allclose(sample_guided(m, x, y, w, steps=8, batch_size=2).x, ref, atol=1e-6)
    # DDIM with the velocity parameterisation on the straight path is Euler (theory §6)
    assert torch.allclose(ddim(GuidedVelocity(m, y, w), x, time_grid(8), path=LinearPath(), parameterization="velocity").x, ref, atol=1e-5)
    assert torch.allclose(FixedStepSampler(GuidedVelocity(m, y, w), "euler", 8)(x), ref, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_fixed_step_sampler_matches_the_solver(method):
    m = ToyConditional()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    s = FixedStepSampler(m, method, 5)
    assert torch.allclose(s(x, y), solve(lambda z, t: m(z, t, y), x, method=method, steps=5).x, atol=1e-6)
    assert s.nfe == {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[method] * 5


def test_fixed_step_guided_sampler_compiles_without_graph_breaks():
    """fullgraph=True fails on any data-dependent Python control flow (what CUDA graphs need)."""
    torch._dynamo.reset()
    m = ToyConditional()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    sampler = FixedStepSampler(GuidedVelocity(m, y, 2.0), "heun", 3)
    compiled = torch.compile(sampler, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), sampler(x), atol=1e-6)


def test_conditional_objective_draws_labels_and_feeds_them():
    target = make_distribution({"name": "digits"})
    source = make_distribution({"name": "gaussian", "shape": [1, 8, 8]})
    obj = ConditionalFlowMatchingObjective(LabelledCoupling(source, target), p_uncond=0.5)
    b = obj.draw(400, gen(0), torch.device("cpu"))
    assert b.x0.shape == b.x1.shape == (400, 1, 8, 8) and b.t.shape == b.y.shape == (400,)
    assert 150 < int((b.y == NULL_LABEL).sum()) < 250
    seen = {}

    class Spy(nn.Module):
        num_classes = 10

        def forward(self, x, t, y=None):
            seen["y"] = y
            return torch.zeros_like(x)

    obj.loss(Spy(), b)
    assert torch.equal(seen["y"], b.y)
    with pytest.raises(DataError, match="labelled target"):
        LabelledCoupling(source, make_distribution({"name": "gaussian", "shape": [1, 8, 8]}))


def digits_config(**over):
    base = [
        "source={name: gaussian, shape: [1, 8, 8]}",
        "target={name: digits}",
        "model.kind=unet", "model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[4]", "model.head_channels=16", "model.dropout=0.0", "model.num_classes=10",
        "train.steps=20", "train.batch_size=32", "train.log_every=10", "train.ckpt_every=20", "train.progress=false",
        "train.ema_kind=power",
    ]
    return load_config(None, base + [f"{k}={v}" for k, v in over.items()])


def test_label_count_mismatch_and_unsupported_couplings():
    cfg = digits_config(**{"model.num_classes": 7})
    with pytest.raises(ConfigError, match="7 but the target has 10 classes"):
        build_objective(cfg, *build_distributions(cfg))
    cfg = digits_config(**{"coupling.kind": "ot"})
    with pytest.raises(ConfigError, match="independent"):
        build_objective(cfg, *build_distributions(cfg))


def test_class_conditional_training_end_to_end(tmp_path):
    cfg = digits_config(**{"train.sample_every": 10})
    train_run(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == ["step_00000010.png", "step_00000020.png"]
    run = load_run(tmp_path / "run")
    assert run.model.num_classes == 10
    y = torch.arange(8) % 10
    res = sample_guided(run.model, run.source.sample(8, generator=gen(0)), y, 3.0, steps=4)
    assert res.nfe == 8 and torch.isfinite(res.x).all()
    images, summary = sample_images(run.model, run.source, 10, tmp_path / "out", steps=3, labels=torch.arange(10), guidance=2.0, batch_size=4)
    assert images.shape == (10, 1, 8, 8) and summary["nfe"] == 6
    with np.load(tmp_path / "out" / "samples.npz") as z:
        assert z["images"].shape == (10, 1, 8, 8) and z["images"].dtype == np.uint8 and z["labels"].tolist() == list(range(10))
    assert (tmp_path / "out" / "grid.png").is_file()
    # the same seed and batch size give the same samples
    again, _ = sample_images(run.model, run.source, 10, steps=3, labels=torch.arange(10), guidance=2.0, batch_size=4)
    assert torch.equal(images, again)


def test_cli_samples_images_with_guidance_and_refuses_it_for_unconditional_runs(tmp_path, capsys):
    from rectflow.cli import main

    train_run(digits_config(**{"train.steps": 4, "train.ckpt_every": 4}), tmp_path / "cond")
    assert main(["sample", str(tmp_path / "cond"), "-o", str(tmp_path / "s"), "--n", "12", "--steps", "2", "--guidance", "2.0", "--batch-size", "5"]) == 0
    assert "NFE 4" in capsys.readouterr().out
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["images"].shape == (12, 1, 8, 8) and z["labels"].tolist() == [i % 10 for i in range(12)]
    plain = load_config(None, ["target=moons", "model.width=16", "model.depth=1", "train.steps=4", "train.ckpt_every=4", "train.progress=false"])
    train_run(plain, tmp_path / "plain")
    assert main(["sample", str(tmp_path / "plain"), "-o", str(tmp_path / "p.npy"), "--n", "4", "--guidance", "2.0"]) == 2
    assert "unconditional" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guided_sampler_replays_as_a_cuda_graph():
    from rectflow.models import UNetVelocity

    torch.manual_seed(0)
    m = UNetVelocity(3, 16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=32, num_classes=10).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        y = torch.arange(64, device="cuda") % 10
        sampler = FixedStepSampler(GuidedVelocity(m, y, 2.0), "heun", 4)
        graph = torch.compile(sampler, mode="reduce-overhead", fullgraph=True)
        x = torch.randn(64, 3, 16, 16, device="cuda")
        ref = sampler(x)
        for _ in range(3):  # record, then replay
            out = graph(x)
        assert torch.allclose(out, ref, atol=1e-3)


def test_a_guidance_scale_that_is_not_finite_is_refused():
    from rectflow.errors import ConfigError
    from rectflow.images.conditional import GuidedVelocity
    from rectflow.models import UNetVelocity

    net = UNetVelocity(1, 8, channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), head_channels=8, num_classes=3)
    with pytest.raises(ConfigError, match="finite"):
        GuidedVelocity(net, torch.zeros(2, dtype=torch.long), float("nan"))


def test_guided_sampling_passes_labels_by_keyword_so_wrappers_with_kwargs_work():
    """Review finding: sample_guided / sample_images called model(x, t, y) positionally after the refactor, which breaks
    wrappers whose forward is (x, t, **kwargs) (ConvertedModel, EDMPreconditioned); labels go in as y=, as before."""
    from rectflow.diffusion.parameterizations import ConvertedModel
    from rectflow.diffusion.schedules import FlowMatchingSchedule
    from rectflow.images.generate import sample_images

    m = ToyConditional()
    wrapped = ConvertedModel(m, FlowMatchingSchedule(), "velocity", "velocity")
    x, y = torch.randn(4, 2, generator=gen()), torch.tensor([0, 1, 2, 0])
    res = sample_guided(wrapped, x, y, 2.0, method="dopri5", rtol=1e-6, atol=1e-6)
    ref = sample_guided(m, x, y, 2.0, method="dopri5", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.x, ref.x)

    class Source:
        def sample(self, n, generator=None, device=None):
            return torch.randn(n, 2, generator=generator)

    wrapped.num_classes = m.num_classes
    images, _ = sample_images(wrapped, Source(), 4, method="dopri5", labels=y, guidance=2.0, device="cpu")
    assert images.shape == (4, 2) and torch.isfinite(images).all()
