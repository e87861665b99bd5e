"""MeanFlow (theory §2.6): s = t is flow matching; on a Gaussian -> Gaussian flow the closed-form
average velocity satisfies the MeanFlow identity and maps the source in one exact step; a short
training run learns a usable one-step map."""

import pytest
import torch

from rectflow.data import Gaussian
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import flow_matching_loss
from rectflow.flow.meanflow import MeanFlowBatch, MeanFlowObjective, ShortcutObjective, meanflow_target, sample_mean_flow, shortcut_target
from rectflow.models import MLPAverageVelocity, UNetAverageVelocity, UNetVelocity
from tests.conftest import gen

MU, S = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5  # N(0, I) -> N(MU, S^2 I), independent pairs


def scale(t):  # std of x_t = (1 - t) x0 + t x1
    return torch.sqrt((1 - t) ** 2 + t**2 * S**2)


def flow_map(z, s, t):
    """Phi_{s -> t}: the marginal flow keeps each point's standardised coordinate."""
    s, t = s.reshape(-1, 1), t.reshape(-1, 1)
    return t * MU + scale(t) / scale(s) * (z - s * MU)


def average_velocity(z, s, t):
    gap = (t - s).reshape(-1, 1)
    exact = (flow_map(z, s, t) - z) / torch.where(gap == 0, torch.ones_like(gap), gap)
    return torch.where(gap == 0, marginal_velocity(z, s), exact)


def marginal_velocity(z, s):
    s = s.reshape(-1, 1)
    ds2 = -2 * (1 - s) + 2 * s * S**2
    return MU + 0.5 * ds2 / scale(s) ** 2 * (z - s * MU)


def test_the_closed_form_average_velocity_satisfies_the_meanflow_identity():
    g = gen()
    z = torch.randn(50, 2, generator=g, dtype=torch.float64)
    s = torch.rand(50, generator=g, dtype=torch.float64) * 0.5
    t = s + torch.rand(50, generator=g, dtype=torch.float64) * 0.5
    u, target = meanflow_target(average_velocity, z, s, t, marginal_velocity(z, s))
    torch.testing.assert_close(target, u, atol=1e-9, rtol=0)
    wrong = lambda z, s, t: average_velocity(z, s, t) * 1.1  # noqa: E731  a field that is not an average velocity
    u, target = meanflow_target(wrong, z, s, t, marginal_velocity(z, s))
    assert float((u - target).abs().max()) > 0.05


def test_one_step_with_the_exact_average_velocity_is_the_flow_map():
    x0 = torch.randn(100, 2, generator=gen(1), dtype=torch.float64)
    res = sample_mean_flow(average_velocity, x0, steps=1)
    torch.testing.assert_close(res.x, MU + S * x0)
    assert res.nfe == 1
    torch.testing.assert_close(sample_mean_flow(average_velocity, x0, steps=3).x, MU + S * x0)


def test_equal_times_reduce_to_flow_matching():
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=32, depth=2)
    g = gen(2)
    x0, x1, t = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g), torch.rand(16, generator=g)
    mf = MeanFlowObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), adaptive_power=0.0).loss(net, MeanFlowBatch(x0, x1, t, t))
    fm = flow_matching_loss(lambda x, tt: net(x, tt, tt), x0, x1, t)
    torch.testing.assert_close(mf.loss, fm.loss)


def test_draws_are_ordered_and_seeded_with_the_asked_share_of_equal_times():
    obj = MeanFlowObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), equal_fraction=0.5)
    a, b = obj.draw(4000, gen(3), torch.device("cpu")), obj.draw(4000, gen(3), torch.device("cpu"))
    assert torch.equal(a.s, b.s) and torch.equal(a.t, b.t)
    assert bool((a.s <= a.t).all()) and abs(float((a.s == a.t).double().mean()) - 0.5) < 0.04
    with pytest.raises(ConfigError, match="equal_fraction"):
        MeanFlowObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), equal_fraction=1.5)


def test_the_default_adaptive_weight_is_the_measured_best_for_vectors_and_for_images():
    """p = 0 on points (2-D screen: one-step W2 0.63 vs 1.43 at p = 1), p = 1 on images (digits screen:
    one-step FD 100 vs 200 at p = 0); an explicit power is used as given."""
    coupling = IndependentCoupling(Gaussian(2), Gaussian(2))
    assert MeanFlowObjective(coupling).power_for(torch.zeros(4, 2)) == 0.0
    assert MeanFlowObjective(coupling).power_for(torch.zeros(4, 1, 8, 8)) == 1.0
    assert MeanFlowObjective(coupling, adaptive_power=0.5).power_for(torch.zeros(4, 1, 8, 8)) == 0.5
    with pytest.raises(ConfigError, match="adaptive_power"):
        MeanFlowObjective(coupling, adaptive_power=-1.0)
    # the weight itself: e / sg(e + c)^p, so p = 1 divides each error by itself (about 1 per sample)
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=16, depth=1)
    x0, x1 = torch.randn(8, 2, generator=gen(13)), torch.randn(8, 2, generator=gen(14))
    s = torch.rand(8, generator=gen(15)) * 0.5
    batch = MeanFlowBatch(x0, x1, s, s + 0.4)
    plain = MeanFlowObjective(coupling, adaptive_power=0.0).loss(net, batch)
    full = MeanFlowObjective(coupling, adaptive_power=1.0, adaptive_c=1e-3).loss(net, batch)
    torch.testing.assert_close(full.loss, (plain.per_sample / (plain.per_sample + 1e-3)).mean())


def test_flow_matching_rows_sit_at_the_noisier_of_the_two_times():
    """MeanFlow sets r = t on its flow-matching rows with t the noisier draw (the paper's time runs
    from data to noise); in our time that is the smaller draw s, mean 1/3 under uniform draws."""
    obj = MeanFlowObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), equal_fraction=1.0)
    b = obj.draw(100000, gen(11), torch.device("cpu"))
    assert torch.equal(b.s, b.t)
    assert abs(float(b.s.double().mean()) - 1 / 3) < 0.01


@pytest.mark.slow
def test_a_short_meanflow_run_learns_a_one_step_map():
    target = Gaussian(2, mean=2.0, std=0.5)
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=64, depth=2)
    cfg = TrainConfig(steps=600, batch_size=256, lr=3e-3, ema_decay=0.0, progress=False, log_every=100, ckpt_every=10**6, seed=0)
    Trainer(net, MeanFlowObjective(IndependentCoupling(Gaussian(2), target)), cfg).fit()
    x = sample_mean_flow(net.eval(), torch.randn(4000, 2, generator=gen(4)), steps=1).x
    assert torch.allclose(x.mean(0), torch.full((2,), 2.0), atol=0.15)  # N(0, I) -> N(2, 0.5^2) in one step
    assert torch.allclose(x.std(0), torch.full((2,), 0.5), atol=0.15)


def test_the_closed_form_average_velocity_is_self_consistent_across_halved_steps():
    g = gen(5)
    z = torch.randn(40, 2, generator=g, dtype=torch.float64)
    d = 2.0 ** -torch.randint(1, 6, (40,), generator=g).double()
    t = torch.rand(40, generator=g, dtype=torch.float64) * (1 - 2 * d)
    torch.testing.assert_close(shortcut_target(average_velocity, z, t, d), average_velocity(z, t, t + 2 * d))


def test_shortcut_draws_live_on_the_dyadic_grid_and_d_zero_is_flow_matching():
    obj = ShortcutObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), levels=5, consistency_fraction=0.5)
    b = obj.draw(2000, gen(6), torch.device("cpu"))
    d = (b.t - b.s).double()
    jumps = d[d > 0]
    assert abs(float((d == 0).double().mean()) - 0.5) < 0.05
    k = -torch.log2(jumps)
    assert torch.allclose(k, k.round(), atol=1e-5) and int(k.round().min()) >= 1 and int(k.round().max()) <= 5
    slots = b.s.double()[d > 0] / (2 * jumps)
    assert torch.allclose(slots, slots.round(), atol=1e-4) and bool((b.s.double()[d > 0] + 2 * jumps <= 1 + 1e-6).all())
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=32, depth=2)
    x0, x1, t = torch.randn(16, 2, generator=gen(7)), torch.randn(16, 2, generator=gen(8)), torch.rand(16, generator=gen(9))
    sc = ShortcutObjective(IndependentCoupling(Gaussian(2), Gaussian(2))).loss(net, MeanFlowBatch(x0, x1, t, t))
    torch.testing.assert_close(sc.loss, flow_matching_loss(lambda x, tt: net(x, tt, tt), x0, x1, t).loss)


def test_every_jump_the_shortcut_targets_query_is_itself_trained():
    """The consistency targets of the smallest level (half jumps of 2^-levels) query the model at gap 0,
    the flow-matching input, so no query reads an untrained step size."""
    levels = 3
    obj = ShortcutObjective(IndependentCoupling(Gaussian(2), Gaussian(2)), levels=levels, consistency_fraction=1.0)
    b = obj.draw(4000, gen(12), torch.device("cpu"))
    trained = {0.0} | set((2 * (b.t - b.s)).double().round(decimals=9).tolist())
    queried: set[float] = set()

    def spy(z, s, t):
        queried.update((t - s).double().round(decimals=9).tolist())
        return torch.zeros_like(z)

    shortcut_target(spy, torch.zeros(len(b.s), 2), b.s, b.t - b.s, smallest=2.0**-levels)
    assert queried <= trained, sorted(queried - trained)
    assert 0.0 in queried


@pytest.mark.slow
def test_a_short_shortcut_run_learns_a_one_step_map():
    target = Gaussian(2, mean=2.0, std=0.5)
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=64, depth=2)
    cfg = TrainConfig(steps=600, batch_size=256, lr=3e-3, ema_decay=0.0, progress=False, log_every=100, ckpt_every=10**6, seed=0)
    Trainer(net, ShortcutObjective(IndependentCoupling(Gaussian(2), target)), cfg).fit()
    for steps in (1, 4):
        x = sample_mean_flow(net.eval(), torch.randn(4000, 2, generator=gen(4)), steps=steps).x
        assert torch.allclose(x.mean(0), torch.full((2,), 2.0), atol=0.15), steps
        assert torch.allclose(x.std(0), torch.full((2,), 0.5), atol=0.15), steps


def test_the_image_unet_takes_two_times_and_starts_as_the_plain_unet():
    torch.manual_seed(0)
    net = UNetAverageVelocity(1, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), head_channels=8, dropout=0.0)
    with torch.no_grad():  # a non-zero output layer, so the comparison means something
        net.conv_out.weight.normal_(0, 0.1)
    plain = UNetVelocity(1, 8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), head_channels=8, dropout=0.0)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("gap_embed.")})
    x, s, t = torch.randn(3, 1, 8, 8, generator=gen()), torch.rand(3, generator=gen(1)) * 0.5, torch.rand(3, generator=gen(2)) * 0.5 + 0.5
    torch.testing.assert_close(net(x, s, t), plain(x, s))  # the gap embedding starts at zero
    x0, x1 = torch.randn(3, 1, 8, 8, generator=gen(3)), torch.randn(3, 1, 8, 8, generator=gen(4))
    out = MeanFlowObjective(IndependentCoupling(Gaussian(2), Gaussian(2))).loss(net, MeanFlowBatch(x0, x1, s, t))  # jvp through the UNet
    out.loss.backward()
    assert torch.isfinite(out.loss) and net.gap_embed[-1].weight.grad is not None


def test_mean_flow_sampling_gives_half_precision_states_float32_times():
    seen = []

    def u(x, s, t):
        seen.append((s.dtype, t.dtype))
        return torch.zeros_like(x)

    sample_mean_flow(u, torch.zeros(2, 2, dtype=torch.bfloat16), steps=3)
    assert set(seen) == {(torch.float32, torch.float32)}


def test_mean_flow_sampling_keeps_a_half_precision_state():
    out = sample_mean_flow(lambda x, s, t: -x * t[:, None], torch.ones(2, 2, dtype=torch.bfloat16), steps=3)
    assert out.x.dtype == torch.bfloat16


def test_the_shortcut_objective_trains_under_bf16_autocast():
    """The self-consistency target comes out of the network in bf16 under autocast; it fills a float32 target."""
    torch.manual_seed(0)
    net = MLPAverageVelocity(2, width=16, depth=2)
    cfg = TrainConfig(steps=3, batch_size=32, lr=1e-3, ema_decay=0.0, progress=False, precision="bf16", log_every=1, ckpt_every=10**6)
    Trainer(net, ShortcutObjective(IndependentCoupling(Gaussian(2), Gaussian(2))), cfg).fit()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


@pytest.mark.parametrize("make", [lambda: MLPAverageVelocity(2, width=16, depth=2), lambda: UNetAverageVelocity(
    in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, head_channels=8)],
    ids=["mlp", "unet"])
def test_the_meanflow_objective_trains_under_bf16_autocast(make):
    """precision auto is bf16 on a CPU with native bf16: the forward-mode derivative of the MeanFlow target must run there
    (autocast casts the weights, not the dual inputs, so the JVP runs outside autocast, in float32)."""
    torch.manual_seed(0)
    net = make()
    shape = (1, 8, 8) if isinstance(net, UNetAverageVelocity) else (2,)

    class Images:
        dim = shape[0]

        def sample(self, n, *, generator=None, device=None):
            return torch.randn((n, *shape), generator=generator, device=device)

    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, ema_decay=0.0, progress=False, precision="bf16", log_every=1, ckpt_every=10**6, device="cpu")
    Trainer(net, MeanFlowObjective(IndependentCoupling(Images(), Images())), cfg).fit()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
