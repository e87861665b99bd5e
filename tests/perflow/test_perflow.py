"""PeRFlow (theory §5): windows, window path, teacher, piecewise reflow objective, deltas, samplers."""

import copy

import pytest
import torch

from rectflow import perflow
from rectflow.diffusion.parameterizations import ConvertedModel
from rectflow.diffusion.samplers import ddim
from rectflow.diffusion.schedules import DDPMSchedule, DiscreteFlowMatchingSchedule, FlowMatchingSchedule, VPCosineSchedule, log_snr
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import ConfigError
from rectflow.flow.paths import PathCoefficients
from rectflow.models.unet import UNetVelocity

torch.set_num_threads(1)


def _unet(seed=0):
    torch.manual_seed(seed)
    net = UNetVelocity(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), dropout=0.0, head_channels=8)
    with torch.no_grad():  # the zero-initialised output layer would make every teacher predict 0
        for q in net.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + q.numel())))
    return net


def _eps_teacher(seed=0):
    sch = DDPMSchedule()
    return perflow.Teacher(_unet(seed), sch, "eps", time_map=sch.t_to_timestep)


class _Data:
    def sample(self, n, generator=None, device=None):
        return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


def test_windows_time_logsnr_and_user():
    assert torch.allclose(perflow.make_windows(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    sch = VPCosineSchedule()
    b = perflow.make_windows(4, spacing="log_snr", path=sch)
    lam = log_snr(sch, b[1:-1])
    assert torch.allclose(lam[1:] - lam[:-1], torch.full((2,), 5.0, dtype=torch.float64), atol=1e-6)
    assert b[0] == 0 and b[-1] == 1
    assert perflow.make_windows(boundaries=[0, 0.2, 1]).tolist() == [0, 0.2, 1]
    # "teacher": where the teacher's stock sampler steps: SD3's shifted grid; the DDPM family's trailing grid is uniform in t
    sd3 = DiscreteFlowMatchingSchedule(shift=3.0)
    assert torch.equal(perflow.make_windows(4, spacing="teacher", path=sd3), sd3.sampling_grid(4).double())
    assert float(perflow.make_windows(4, spacing="teacher", path=sd3)[1]) < 0.2  # shift 3: short windows near the noise
    assert torch.equal(perflow.make_windows(4, spacing="teacher", path=DDPMSchedule()), perflow.make_windows(4))
    with pytest.raises(ConfigError, match="needs the teacher's path"):
        perflow.make_windows(4, spacing="teacher")


@pytest.mark.parametrize("bad", [[0.1, 0.5, 1], [0, 0.5, 0.9], [0, 0.6, 0.6, 1], [0, 0.7, 0.4, 1], [0], [0, float("nan"), 1]])
def test_windows_must_cover_unit_interval(bad):
    with pytest.raises(ConfigError, match="perflow.windows"):
        perflow.make_windows(boundaries=bad)


def test_window_config_errors():
    with pytest.raises(ConfigError):
        perflow.make_windows(0)
    with pytest.raises(ConfigError):
        perflow.make_windows(3, spacing="log_snr")
    with pytest.raises(ConfigError):
        perflow.make_windows(3, spacing="cubic")


def test_teacher_path_must_be_affine():
    class NotAPath:
        def coefficients(self, t):
            return PathCoefficients(t, 1 - t, t, t)

    with pytest.raises(ConfigError, match="AffinePath"):
        perflow.Teacher(lambda z, t: z, NotAPath(), "eps")


def test_window_path_interpolates_teacher_knots_and_is_continuous():
    sch, b = DDPMSchedule(), perflow.make_windows(boundaries=[0, 0.3, 0.8, 1])
    wp = perflow.WindowPath(sch, b)
    c, ct = wp.coefficients(b), sch.coefficients(b)
    assert torch.allclose(c.a, ct.a) and torch.allclose(c.b, ct.b)
    eps = 1e-9
    left, right = wp.coefficients(b[1:-1] - eps), wp.coefficients(b[1:-1] + eps)
    assert torch.allclose(left.a, right.a, atol=1e-7) and torch.allclose(left.b, right.b, atol=1e-7)
    mid = wp.coefficients(torch.tensor([0.15], dtype=torch.float64))
    assert torch.allclose(mid.a, (ct.a[0] + ct.a[1]) / 2)
    assert perflow.window_index(b, torch.tensor([0.0, 0.3, 0.5, 1.0])).tolist() == [0, 1, 1, 2]


def test_student_from_teacher_is_teacher_ddim_at_k_steps():
    teacher = _eps_teacher()
    b = perflow.make_windows(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = perflow.sample_perflow(student, x, b)
        t = perflow.teacher_ddim_sample(teacher, x, 4)
    assert s.nfe == 4 and t.nfe == 4
    assert torch.allclose(s.x, t.x, atol=1e-4)
    with torch.no_grad():
        assert perflow.sample_perflow(student, x, b, steps_per_window=3).nfe == 12


@pytest.mark.parametrize("spacing", ["time", "log_snr"])
def test_fresh_student_is_the_teachers_ddim_on_its_windows_for_every_k(spacing):
    # float32 times that round just below a window boundary must still use the window they start
    teacher = _eps_teacher()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    worst = {}
    for k in range(1, 17):
        b = perflow.make_windows(k, spacing=spacing, path=teacher.path)
        student = perflow.PeRFlowStudent.from_teacher(teacher, b)
        with torch.no_grad():
            s = perflow.sample_perflow(student, x, b)
            t = ddim(teacher.raw, x, b, path=teacher.path, parameterization=teacher.parameterization)
        worst[k] = float((s.x - t.x).abs().max() / t.x.abs().max())  # float32 rounding: ~1e-6 of the scale
    assert max(worst.values()) < 1e-5, worst


def test_window_index_snaps_float32_times_at_boundaries():
    b = perflow.make_windows(6)
    t32 = b.float()  # 1/6, 1/3, 2/3, 5/6 round below or above in float32
    assert perflow.window_index(b, t32).tolist() == [0, 1, 2, 3, 4, 5, 5]
    assert perflow.window_index(b, b).tolist() == [0, 1, 2, 3, 4, 5, 5]
    inside = ((b[:-1] + b[1:]) / 2).float()
    assert perflow.window_index(b, inside).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_window_index_is_exact_in_every_dtype(dtype):
    """Property: for K = 1..16 windows spaced uniformly in t, in log-SNR and on a shifted flow-matching teacher's grid,
    each boundary rounded to the dtype is in the window it starts, and every time strictly between two rounded
    boundaries is in that window (the old tolerance of 8 eps put a bf16 t = 0.2 into window 1 of 4)."""
    sd = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for k in range(1, 17):
        for b in (perflow.make_windows(k), perflow.make_windows(k, spacing="log_snr", path=sd),
                  perflow.make_windows(k, spacing="teacher", path=DiscreteFlowMatchingSchedule(shift=3.0))):
            rb = b.to(dtype)
            starts = perflow.window_index(b, rb[:-1])
            distinct = torch.cat([rb[1:-1] > rb[:-2], torch.tensor([True])])  # a boundary that rounds onto the next is empty
            assert torch.equal(starts[distinct], torch.arange(k)[distinct]), (k, dtype, b)
            assert int(perflow.window_index(b, rb[-1:])) == k - 1
            for f in (0.01, 0.2, 0.5, 0.8, 0.99):
                t = (b[:-1] + f * (b[1:] - b[:-1])).to(dtype)
                inside = (t.double() > rb[:-1].double()) & (t.double() < rb[1:].double())
                assert torch.equal(perflow.window_index(b, t)[inside], torch.arange(k)[inside]), (k, dtype, f)
    assert int(perflow.window_index(perflow.make_windows(4), torch.tensor([0.2], dtype=torch.bfloat16))) == 0
    thirteen = perflow.make_windows(13)
    assert int(perflow.window_index(thirteen, (0.2 * thirteen[1]).to(torch.bfloat16).reshape(1))) == 0


def test_a_bf16_student_reads_a_time_inside_a_narrow_window_with_that_windows_slopes():
    sch = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    b = perflow.make_windows(13)
    student = perflow.PeRFlowStudent(_unet(), sch, b, "eps", time_map=sch.t_to_timestep)
    z = torch.randn(2, 1, 8, 8)
    t = (0.2 * b[1]).to(torch.bfloat16).expand(2)
    half = copy.deepcopy(student).to(torch.bfloat16)
    with torch.no_grad():
        v16 = half(z.bfloat16(), t).float()
        v32 = student(z, t.float())
    assert float((v16 - v32).norm() / v32.norm()) < 0.05  # bf16 rounding only; the next window's slopes were 94 % off


def test_teacher_from_library_model_in_any_parameterisation():
    # a velocity model on the FM path, exposed as a v-prediction via ConvertedModel, is the same teacher
    path = FlowMatchingSchedule()
    net = _unet()
    as_v = ConvertedModel(net, path, src="velocity", dst="v")
    t_vel, t_v = perflow.Teacher(net, path, "velocity"), perflow.Teacher(as_v, path, "v")
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.allclose(t_vel.velocity(z, t), t_v.velocity(z, t), atol=1e-4)
        t0, t1 = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.9], dtype=torch.float64)
        assert torch.allclose(t_vel.ddim(z, t0, t1, 3), t_v.ddim(z, t0, t1, 3), atol=1e-4)


def test_objective_targets_are_per_window_teacher_solves():
    teacher, b = _eps_teacher(), perflow.make_windows(3)
    obj = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=2)
    batch = obj.draw(6, torch.Generator().manual_seed(3), "cpu")
    assert obj.teacher_nfe == 12
    k = perflow.window_index(b, batch.t)
    # recompute each example alone: z_start from the line, z_end by the teacher across its window
    for i in range(6):
        t0, t1 = b[k[i]], b[k[i] + 1]
        z_start = batch.z[i:i + 1] - (batch.t[i] - t0).float() * batch.target[i:i + 1]
        z_end = teacher.ddim(z_start, t0.reshape(1), t1.reshape(1), 2)
        assert torch.allclose((z_end - z_start) / float(t1 - t0), batch.target[i:i + 1], atol=1e-3)
        assert float(t0) < float(batch.t[i]) < float(t1)


def test_start_fraction_places_points_at_window_starts():
    teacher, b = _eps_teacher(), perflow.make_windows(4)
    all_start = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=1, start_fraction=1.0).draw(32, torch.Generator().manual_seed(1), "cpu")
    assert all(any(abs(float(t) - float(bb)) < 1e-6 for bb in b[:-1]) for t in all_start.t)
    none = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=1).draw(32, torch.Generator().manual_seed(1), "cpu")
    assert not any(any(abs(float(t) - float(bb)) < 1e-6 for bb in b) for t in none.t)
    half = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=1, start_fraction=0.5).draw(400, torch.Generator().manual_seed(2), "cpu")
    share = sum(any(abs(float(t) - float(bb)) < 1e-6 for bb in b[:-1]) for t in half.t) / 400
    assert 0.4 < share < 0.6
    with pytest.raises(ConfigError, match="start_fraction"):
        perflow.PeRFlowObjective(teacher, _Data(), b, start_fraction=1.5)


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_loss_space_compares_both_sides_in_that_kind(space):
    """straight_loss in a kind = MSE of the student's output and of the target, both converted to
    that kind on the window path; it is zero exactly when the velocity matches."""
    from rectflow.diffusion.parameterizations import convert

    teacher, b = _eps_teacher(), perflow.make_windows(2)
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    batch = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=2).draw(8, torch.Generator().manual_seed(4), "cpu")
    with torch.no_grad():
        got = perflow.straight_loss(student, batch, space).loss
        kw = dict(z=batch.z, path=student.window_path, t=batch.t)
        want = (convert(student(batch.z, batch.t), src="velocity", dst=space, **kw) - convert(batch.target, src="velocity", dst=space, **kw)).square().flatten(1).sum(1).mean()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
        exact = perflow.PeRFlowBatch(batch.z, batch.t, student(batch.z, batch.t))
        assert float(perflow.straight_loss(student, exact, space).loss) < 1e-8
    with pytest.raises(ConfigError, match="loss_space"):
        perflow.straight_loss(student, batch, "logits")


def test_short_training_reduces_loss_and_delta_roundtrip(tmp_path):
    teacher, b = _eps_teacher(), perflow.make_windows(2)
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    obj = perflow.PeRFlowObjective(teacher, _Data(), b, solver_steps=2)
    fixed = obj.draw(16, torch.Generator().manual_seed(9), "cpu")
    before = float(obj.loss(student, fixed).loss.detach())
    cfg = TrainConfig(steps=15, batch_size=16, lr=2e-3, ema_decay=0.0, device="cpu", progress=False, ckpt_every=1000)
    Trainer(student, obj, cfg, run_dir=tmp_path / "run").fit(resume=False)
    assert float(obj.loss(student, fixed).loss.detach()) < before
    path = perflow.save_delta(tmp_path / "delta.safetensors", student.net, teacher.model, b)
    delta, meta = perflow.load_delta(path)
    assert meta["windows"] == [0.0, 0.5, 1.0]
    other = _unet()  # another copy of the same teacher
    perflow.apply_delta(other, delta)
    for p, q in zip(other.state_dict().values(), student.net.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ConfigError):
        perflow.apply_delta(torch.nn.Linear(2, 2), delta)


def test_a_delta_of_another_architecture_changes_nothing_and_names_its_file(tmp_path):
    """Every name and shape is checked before the first weight moves; a file is named in the error."""
    two = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    wide = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 4))
    moved = copy.deepcopy(wide)
    with torch.no_grad():
        for q in moved.parameters():
            q.add_(1.0)
    path = perflow.save_delta(tmp_path / "wide.safetensors", moved, wide)  # 1 everywhere
    before = {k: v.clone() for k, v in two.state_dict().items()}
    with pytest.raises(ConfigError, match=r"wide\.safetensors: shape mismatch for 1\.bias: \(3,\) in the model, \(4,\) in the delta"):
        perflow.apply_delta(two, path)
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())  # 0.weight did not move either
    with pytest.raises(ConfigError, match=r"wide\.safetensors: the model lacks 4 of its tensors, e\.g\. '0\.bias'"):
        perflow.apply_delta(torch.nn.Conv2d(1, 1, 1), path)
    perflow.apply_delta(copy.deepcopy(wide), path, scale=0.5)  # a path loads like load_delta's tensors


def test_pairs_objective_2rf_shapes():
    z0, z1 = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    obj = perflow.PairsObjective(z0, z1)
    batch = obj.draw(4, torch.Generator().manual_seed(0), "cpu")
    assert batch.z.shape == (4, 1, 8, 8) and batch.t.shape == (4,)
    student = perflow.PeRFlowStudent.from_teacher(_eps_teacher(), perflow.make_windows(1))
    assert torch.isfinite(obj.loss(student, batch).loss)


def test_bad_objective_config():
    with pytest.raises(ConfigError):
        perflow.PeRFlowObjective(_eps_teacher(), _Data(), perflow.make_windows(2), solver_steps=0)
    with pytest.raises(ConfigError):
        perflow.PeRFlowObjective(_eps_teacher(), _Data(), [0, 0.5], solver_steps=1)
    with pytest.raises(ConfigError):
        perflow.window_grid(perflow.make_windows(2), 0)




def _conditional_eps_teacher(seed=0):
    torch.manual_seed(seed)
    net = UNetVelocity(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0, head_channels=8, num_classes=3)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + q.numel())))
    sch = DDPMSchedule()
    return perflow.Teacher(net, sch, "eps", time_map=sch.t_to_timestep)


class _LabelledData:
    def sample(self, n, generator=None, device=None):
        return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 3, (n,), generator=generator)


def test_a_conditional_teacher_and_student_see_each_examples_condition():
    """The condition reaches the teacher's window solve and the student (issue 15, item 2): a fresh
    student is the teacher's K-step DDIM under the same labels, and the targets are per-label solves."""
    teacher, b = _conditional_eps_teacher(), perflow.make_windows(3)
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        s = perflow.sample_perflow(student, x, b, cond=y)
        t = ddim(lambda z, tt: teacher.raw(z, tt, y), x, b, path=teacher.path, parameterization="eps")
        other = perflow.sample_perflow(student, x, b, cond=(y + 1) % 3)
    assert torch.allclose(s.x, t.x, atol=1e-4) and not torch.allclose(s.x, other.x, atol=1e-3)

    obj = perflow.PeRFlowObjective(teacher, _LabelledData(), b, solver_steps=2)
    batch = obj.draw(5, torch.Generator().manual_seed(3), "cpu")
    assert batch.cond.shape == (5,)
    k = perflow.window_index(b, batch.t)
    for i in range(5):
        t0, t1 = b[k[i]], b[k[i] + 1]
        z_start = batch.z[i:i + 1] - (batch.t[i] - t0).float() * batch.target[i:i + 1]
        z_end = teacher.ddim(z_start, t0.reshape(1), t1.reshape(1), 2, batch.cond[i:i + 1])
        assert torch.allclose((z_end - z_start) / float(t1 - t0), batch.target[i:i + 1], atol=1e-3)
    assert torch.isfinite(obj.loss(student, batch).loss)


def test_teacher_free_targets_are_the_window_path_between_noised_data():
    """Fine-tuning without a teacher (issue 15, item 6): each window's line joins the forward process of
    the same data and noise at its two ends, so no network is called and the target is exact."""
    teacher, b = _eps_teacher(), perflow.make_windows(3)
    obj = perflow.PeRFlowObjective(teacher, _Data(), b, target="data")
    g = torch.Generator().manual_seed(3)
    batch = obj.draw(6, g, "cpu")
    assert obj.teacher_nfe == 0
    # replay the draw's random stream: x, then eps, then the windows
    g = torch.Generator().manual_seed(3)
    x = _Data().sample(6, generator=g)
    eps = torch.randn(x.shape, generator=g)
    k = torch.randint(0, 3, (6,), generator=g)
    for i in range(6):
        t0, t1 = b[k[i]], b[k[i] + 1]
        c0, c1 = teacher.path.coefficients(t0.reshape(1).float()), teacher.path.coefficients(t1.reshape(1).float())
        z_start, z_end = c0.a * x[i] + c0.b * eps[i], c1.a * x[i] + c1.b * eps[i]
        torch.testing.assert_close(batch.target[i], (z_end - z_start) / float(t1 - t0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="target"):
        perflow.PeRFlowObjective(teacher, _Data(), b, target="oracle")


def test_window_weights_reweight_the_loss_per_window():
    teacher, b = _eps_teacher(), perflow.make_windows(2)
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    plain = perflow.PeRFlowObjective(teacher, _Data(), b, target="data")
    weighted = perflow.PeRFlowObjective(teacher, _Data(), b, target="data", window_weights=[3.0, 1.0])
    batch = plain.draw(8, torch.Generator().manual_seed(0), "cpu")
    per = plain.loss(student, batch).per_sample
    k = perflow.window_index(b, batch.t)
    w = torch.tensor([3.0, 1.0])[k] / 2.0  # normalised to mean 1 over the windows
    out = weighted.loss(student, batch)
    torch.testing.assert_close(out.loss, (w * per).mean(), rtol=1e-5, atol=1e-6)
    assert out.loss.requires_grad and torch.equal(out.per_sample, per)
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ConfigError, match="window_weights"):
            perflow.PeRFlowObjective(teacher, _Data(), b, window_weights=bad)


def test_compiled_teacher_solves_windows_like_the_eager_one():
    """``Teacher.compiled`` is the same teacher (guidance, path, time map) with a compiled network;
    the original keeps its plain module (whose weights the delta and the student start from)."""
    teacher, b = _eps_teacher(), perflow.make_windows(4)
    teacher.guidance = None
    fast = teacher.compiled(backend="eager")
    assert fast is not teacher and fast.model is not teacher.model and isinstance(teacher.model, torch.nn.Module)
    assert (fast.path, fast.parameterization, fast.time_map) == (teacher.path, teacher.parameterization, teacher.time_map)
    z, t0, t1 = torch.randn(6, 1, 8, 8), b[:-1].repeat(2)[:6], b[1:].repeat(2)[:6]
    torch.testing.assert_close(fast.ddim(z, t0, t1, 3), teacher.ddim(z, t0, t1, 3), rtol=1e-5, atol=1e-6)


class _Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, z, t):
        return self.w * z


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_a_half_precision_student_samples_like_the_float64_one(dtype, tol):
    """A student cast to fp16 / bf16 (as a half-precision pipeline runs it) reads its output on the
    window path in float32: on SD's schedule (a(0) = 0.068) bf16 would otherwise refuse t = 0 as
    singular.  The samples then differ from float64 by the dtype's rounding only."""
    sch = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's
    teacher = perflow.Teacher(_Scale(), sch, "eps", time_map=sch.t_to_timestep)
    for k in (4, 6):
        w = perflow.make_windows(k)
        student = perflow.PeRFlowStudent.from_teacher(teacher, w)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            ref = perflow.sample_perflow(student.double(), x.double(), w, steps_per_window=8).x
            low = perflow.sample_perflow(student.to(dtype), x.to(dtype), w, steps_per_window=8).x
        assert low.dtype == dtype
        assert float((low.double() - ref).norm() / ref.norm()) < tol


def test_every_training_point_is_read_on_its_own_window():
    """A point drawn just below a window's end must not round onto the next window: log-SNR windows on
    SD's schedule are as narrow as 1.4e-4 at K = 16, where t_margin * dt is below float32's snap
    tolerance of window_index, so the student would read the point with the next window's slopes."""
    sch = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = perflow.Teacher(_Scale(), sch, "eps", time_map=sch.t_to_timestep)
    b = perflow.make_windows(16, spacing="log_snr", path=sch)
    assert float((b[1:] - b[:-1]).min()) < 1e-3
    obj = perflow.PeRFlowObjective(teacher, _Data(), b, target="data")  # no network call: a big draw is cheap
    batch = obj.draw(20000, torch.Generator().manual_seed(0), "cpu")
    k = perflow.window_index(b, batch.t)
    assert bool((b[k] < batch.t.double()).all())  # no point sits on (or rounds onto) the start of the window after its own


def test_half_precision_data_trains_on_every_window_at_float32_times():
    """bf16 data: the batch's t stays float32 (bf16 cannot tell windows 1e-2 apart), every window gets
    points inside it, and the teacher's window solve converts in float32 (SD's a(0) = 0.068 is not
    "singular"), matching the float64 solve to bf16's rounding."""
    sch = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = perflow.Teacher(_Scale(), sch, "eps", time_map=sch.t_to_timestep)
    b = perflow.make_windows(4, spacing="teacher", path=DiscreteFlowMatchingSchedule(shift=3.0))  # [0, 0.142, 0.398, 0.991, 1]

    class Half:
        def sample(self, n, generator=None, device=None):
            return (torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1).to(torch.bfloat16)

    batch = perflow.PeRFlowObjective(teacher, Half(), b, target="data").draw(4000, torch.Generator().manual_seed(0), "cpu")
    assert batch.t.dtype == torch.float32 and batch.z.dtype == torch.bfloat16
    k = perflow.window_index(b, batch.t)
    assert bool(((b[k] < batch.t.double()) & (batch.t.double() < b[k + 1])).all()) and torch.bincount(k, minlength=4).min() > 0
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t0, t1 = torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.25, dtype=torch.float64)
    ref = teacher.ddim(z.double(), t0, t1, 4)
    low = teacher.ddim(z.to(torch.bfloat16), t0, t1, 4)
    assert low.dtype == torch.bfloat16 and float((low.double() - ref).norm() / ref.norm()) < 2e-2
