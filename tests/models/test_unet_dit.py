"""UNet and DiT velocity fields: sizes, shapes, conditioning, layouts, config wiring."""

import pytest
import torch

from rectflow.errors import ConfigError
from rectflow.models import NULL_LABEL, DiTVelocity, UNetVelocity
from rectflow.models.dit import sincos_2d, unpatchify
from rectflow.runs.config import config_from_dict, load_config
from rectflow.runs.experiment import build_model, model_config


def tiny_unet(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, dropout=0.0)
    args.update(kw)
    return UNetVelocity(**args)


def tiny_dit(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=1, image_size=8, patch_size=2, hidden=32, depth=2, heads=4)
    args.update(kw)
    return DiTVelocity(**args)


def randomize(model):
    """Zero-initialised output layers make a fresh model constant; perturb every weight."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_default_unet_is_the_35m_cifar10_model():
    with torch.device("meta"):  # counts parameters without allocating or running anything
        m = UNetVelocity()
    assert 34.5e6 < n_params(m) < 36.5e6  # DDPM's CIFAR-10 UNet: 35.7M
    with torch.device("meta"):
        assert n_params(UNetVelocity(num_classes=10)) - n_params(m) == 11 * 512  # 10 classes + null


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_shapes_time_and_label_dependence(make):
    m = randomize(make(num_classes=10))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    y = torch.tensor([0, 3, 9, NULL_LABEL])
    out = m(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, m(x, 1 - t, y))  # depends on t
    assert not torch.allclose(out[:3], m(x, t, torch.tensor([1, 4, 0, NULL_LABEL]))[:3])  # on y
    # y=None is the null label for every row
    assert torch.allclose(m(x, t, None), m(x, t, torch.full((4,), NULL_LABEL)))
    # a batch entry does not see the others (no batch coupling: GroupNorm/LayerNorm are per sample)
    assert torch.allclose(m(x[:1], t[:1], y[:1]), out[:1], atol=1e-5)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_fresh_models_start_at_zero_velocity(make):
    m = make()
    assert torch.equal(m(torch.randn(2, 1, 8, 8), torch.rand(2)), torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_bad_inputs(make):
    m = make()
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expects x of shape"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="labels y must have shape"):
        make(num_classes=3)(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0]))


def test_bad_architectures():
    with pytest.raises(ValueError, match="divisible"):
        UNetVelocity(1, 12, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        DiTVelocity(1, 9, patch_size=2)
    with pytest.raises(ValueError, match="divisible"):
        DiTVelocity(1, 8, hidden=30, heads=4)


@torch.no_grad()
def test_channels_last_and_bf16_give_the_same_velocity():
    m = randomize(tiny_unet(scale_shift=True, num_classes=4))
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    ref = m(x, t, y)
    cl = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, y)
    assert torch.allclose(ref, cl, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, t, y)
    assert torch.allclose(ref, low.float(), atol=0.05 * float(ref.abs().max()) + 1e-3)


def test_unet_attention_gives_the_fused_kernels_unit_stride_inputs(monkeypatch):
    # flash / memory-efficient attention refuse q, k, v whose last dimension is strided
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = UNetVelocity(3, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=8)
    model(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert seen and all(s == (1, 1, 1) for s in seen)


def test_unpatchify_inverts_patchify_and_sincos():
    x = torch.randn(2, 3, 8, 8)
    p = 2
    tokens = x.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 3), x)
    pe = sincos_2d(16, 4)
    assert pe.shape == (16, 16) and len({tuple(r.tolist()) for r in pe}) == 16


def test_backward_reaches_every_parameter():
    for m in (tiny_unet(num_classes=3), tiny_dit(num_classes=3)):
        randomize(m).train()
        out = m(torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, NULL_LABEL]))
        out.square().mean().backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None]
        assert not missing, missing


def test_models_from_config():
    cfg = load_config(None, ["model.kind=unet", "model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                             "model.attention_resolutions=[4]", "model.head_channels=8"])
    mcfg = model_config(cfg, 64, (1, 8, 8))
    assert mcfg["shape"] == [1, 8, 8] and "activation" not in mcfg
    assert isinstance(build_model(mcfg), UNetVelocity)
    cfg = load_config(None, ["model.kind=dit", "model.width=32", "model.depth=2", "model.head_channels=8", "model.patch_size=4"])
    m = build_model(model_config(cfg, 64, (1, 8, 8)))
    assert isinstance(m, DiTVelocity) and m.grid == 2 and m.blocks[0].heads == 4
    # the MLP's stored model config is unchanged by the image keys
    assert set(model_config(load_config(None, []), 2)) == {"kind", "width", "depth", "time_dim", "activation", "time_scale", "dim"}
    with pytest.raises(ConfigError, match="unet or dit"):
        load_config(None, ["model.num_classes=3"])
    with pytest.raises(ConfigError, match="dit"):
        load_config(None, ["model.kind=dit", "model.width=30"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_channels_last_compiled_step():
    m = tiny_unet(num_classes=10, in_channels=3, image_size=32, channels=32, channel_mult=(1, 2, 2), attention_resolutions=(16,)).cuda()
    m = m.to(memory_format=torch.channels_last)
    fast = torch.compile(m)
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    t, y = torch.rand(16, device="cuda"), torch.randint(10, (16,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(x, t, y)
    out.float().square().mean().backward()
    assert out.shape == x.shape and all(p.grad is not None for p in m.parameters())


def test_cifar10_recipe_config():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "cifar10.yaml")
    assert cfg.model.kind == "unet" and cfg.time.kind == "logit_normal" and cfg.train.precision == "auto"
    assert cfg.reflow.distill_loss == "pseudo_huber" and cfg.target["flip"] is True
    with torch.device("meta"):
        m = build_model(model_config(cfg, 3 * 32 * 32, (3, 32, 32)))
    assert 34.5e6 < n_params(m) < 36.5e6
    # the reflow stage's overrides (see the file's comments) are valid keys
    stage2 = load_config(root / "configs" / "cifar10.yaml", ["time.kind=u_shaped", "time.a=4.0", "train.ema_kind=power", "coupling.kind=pairs",
                                                              "coupling.pairs=runs/p", "reflow.stage=2", "reflow.init=runs/c/ckpt.safetensors"])
    assert stage2.time.kind == "u_shaped" and stage2.train.ema_kind == "power"


def test_the_default_mlp_time_features_are_slow_enough_for_adaptive_solvers():
    """Issue 16 trap 6: with the diffusion models' top frequency 1000 the MLP's velocity wiggles in t
    and dopri5 took 4-7x more steps for no better W2 (benchmarks/results/mlp_time_scale.md); the
    library's MLP and the config default agree on 10."""
    from rectflow.models import MLPVelocity
    from rectflow.runs.config import ModelConfig

    assert MLPVelocity(2).time_embed.freqs.max().item() == pytest.approx(10.0)
    from rectflow.runs.experiment import model_config

    assert model_config(config_from_dict({}), 2)["time_scale"] == 10.0 and ModelConfig().time_scale is None  # None: 10 for a new run
