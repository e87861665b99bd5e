"""Classifier-free guidance inside PeRFlow (theory §5.5): the one CFG combination, guided teacher
solves, condition dropout, guided student sampling, NFE counts."""

import pytest
import torch
from torch import nn

from rectflow import perflow
from rectflow.diffusion.samplers import ddim
from rectflow.diffusion.schedules import DDPMSchedule, FlowMatchingSchedule
from rectflow.diffusion.specs import sample
from rectflow.errors import ConfigError, DataError
from rectflow.flow.guidance import drop_conditions, guided_call, null_condition
from rectflow.models.class_embedding import NULL_LABEL
from rectflow.models.unet import UNetVelocity
from rectflow.perflow.guidance_modes import Guidance, LabelledData, guidance_plan

torch.set_num_threads(1)


def _cond_unet(seed=0, num_classes=3):
    torch.manual_seed(seed)
    net = UNetVelocity(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0, head_channels=8, num_classes=num_classes)
    with torch.no_grad():  # the zero-initialised output layer would make every branch predict 0
        for q in net.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + q.numel())))
    return net.eval()


class Counting(nn.Module):
    """Wraps a network; records the number of rows of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, z, t, cond=None):
        self.rows.append(z.shape[0])
        return self.net(z, t) if cond is None else self.net(z, t, cond)


class TextNet(nn.Module):
    """A toy text-conditioned network: out = z * (1 + mean of the embedding) + t; cond (B, L, D)."""

    def forward(self, z, t, cond):
        s = cond.mean(dim=(1, 2)).reshape(-1, *[1] * (z.dim() - 1))
        return z * (1 + s) + t.reshape(-1, *[1] * (z.dim() - 1))


def _labels(n, k=3, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def test_cfg_combination_is_two_separate_calls_in_one_batched_call():
    net = Counting(_cond_unet())
    z, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), _labels(5)
    with torch.no_grad():
        got = Guidance(3.0)(net, z, t, y)
        assert net.rows == [10]  # one call on cat([z, z])
        c, u = net(z, t, y), net(z, t, torch.full_like(y, NULL_LABEL))
    torch.testing.assert_close(got, u + 3.0 * (c - u), rtol=1e-5, atol=1e-6)
    assert Guidance(3.0).nfe_per_eval == 2 and Guidance(1.0).nfe_per_eval == 1 and Guidance(0.0).nfe_per_eval == 1

    # text: the user's null embedding (L, D) broadcast over the batch
    emb, null = torch.randn(5, 4, 6), torch.randn(4, 6)
    tn = Counting(TextNet())
    got = guided_call(tn, z, t, emb, null, 2.5)
    assert tn.rows == [10]
    c, u = tn(z, t, emb), tn(z, t, null.expand(5, 4, 6))
    torch.testing.assert_close(got, u + 2.5 * (c - u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided_call(tn, z, t, emb, null[None], 2.5), got)  # (1, L, D) too


def test_the_sampling_verbs_perflow_spec_is_sample_perflow_guided_in_velocity_or_output_space():
    """``rectflow.sample(student, x, "perflow:N")`` guides the student's window velocity; ``sample_perflow`` its network's
    own output (eps here).  The window velocity is affine in that output, so the two agree to float precision, at
    one and several steps per window, guided and not; the verb also restores the mode and counts the same NFE."""
    y = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for path, kind in [(DDPMSchedule(), "eps"), (FlowMatchingSchedule(), "velocity")]:
        b = perflow.make_windows(4)
        student = perflow.PeRFlowStudent.from_teacher(perflow.Teacher(_cond_unet(2), path, kind), b).train()
        for m, w in [(1, 1.0), (1, 3.0), (2, 3.0)]:
            got = sample(student, x, f"perflow:{4 * m}", cond=y, guidance=w)
            assert student.training  # restored
            with torch.no_grad():
                ref = perflow.sample_perflow(student.eval(), x, b, m, cond=y, guidance=w)
            student.train()
            rel = float((got.x - ref.x).abs().max() / ref.x.abs().max())
            assert rel < 1e-5, (kind, m, w, rel)
            assert got.nfe == ref.nfe == 4 * m * (2 if w != 1.0 else 1)
            torch.testing.assert_close(student.sampling_grid(4 * m), perflow.window_grid(b, m), rtol=0, atol=1e-15)


def test_guidance_one_is_the_plain_conditional_model_and_zero_the_unconditional():
    net = Counting(_cond_unet())
    z, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), _labels(4)
    with torch.no_grad():
        torch.testing.assert_close(Guidance(1.0)(net, z, t, y), net(z, t, y), rtol=0, atol=0)
        torch.testing.assert_close(Guidance(0.0)(net, z, t, y), net(z, t, torch.full_like(y, NULL_LABEL)), rtol=0, atol=0)
    assert net.rows == [4, 4, 4, 4]  # one call of B rows each
    teacher = perflow.Teacher(net, FlowMatchingSchedule(), "velocity", guidance=1.0)
    with torch.no_grad():
        torch.testing.assert_close(teacher.raw(z, t, y), net(z, t, y), rtol=0, atol=0)


def test_null_condition_shapes_and_errors():
    y = torch.tensor([0, 2, 1])
    assert null_condition(y, NULL_LABEL).tolist() == [NULL_LABEL] * 3
    emb = torch.randn(3, 4, 6)
    null = torch.randn(4, 6)
    assert torch.equal(null_condition(emb, null), null.expand(3, 4, 6))
    with pytest.raises(ConfigError, match="null embedding"):
        null_condition(emb, NULL_LABEL)  # a number for float embeddings is a mistake
    with pytest.raises(ConfigError, match="does not fit"):
        null_condition(emb, torch.randn(5, 6))
    pair = null_condition({"text": emb, "y": y}, {"text": null, "y": NULL_LABEL})
    assert pair["y"].tolist() == [NULL_LABEL] * 3 and pair["text"].shape == (3, 4, 6)
    with pytest.raises(ConfigError, match="finite"):
        Guidance(float("nan"))


def test_guided_teacher_ddim_and_guided_student_sampling_agree():
    """A teacher-initialised student sampled with guidance w (one Euler step per window, CFG in the
    network's output space) is the teacher's K-step DDIM on the guided raw output."""
    y = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for path, kind, tmap in [(DDPMSchedule(), "eps", None), (FlowMatchingSchedule(), "velocity", None)]:
        net = _cond_unet(1)
        teacher = perflow.Teacher(net, path, kind, time_map=tmap)
        b = perflow.make_windows(4)
        student = perflow.PeRFlowStudent.from_teacher(teacher, b)
        for w in (2.0, 4.0):
            with torch.no_grad():
                s = perflow.sample_perflow(student, x, b, cond=y, guidance=w)
                ref = ddim(lambda z, t, net=net, w=w: guided_call(net, z, t, y, NULL_LABEL, w), x, b, path=path, parameterization=kind)
                guided_teacher = perflow.Teacher(net, path, kind, guidance=w)
                t_own = perflow.teacher_ddim_sample(guided_teacher, x, 4, cond=y)
            rel = float((s.x - ref.x).abs().max() / ref.x.abs().max())
            assert rel < 1e-5, (kind, w, rel)
            torch.testing.assert_close(t_own.x, ref.x, rtol=1e-5, atol=1e-5)
            assert s.nfe == 8 and t_own.nfe == 8  # 2 per guided evaluation
        with torch.no_grad():
            plain = perflow.sample_perflow(student, x, b, cond=y)
            assert plain.nfe == 4
            assert not torch.allclose(plain.x, s.x, atol=1e-3)  # guidance changes the samples


def test_guided_teacher_solve_in_the_objective_and_its_nfe():
    net = _cond_unet(2)
    sch = DDPMSchedule()
    teacher = perflow.Teacher(net, sch, "eps", guidance=3.0)
    b = perflow.make_windows(3)

    class Labelled:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 3, (n,), generator=generator)

    obj = perflow.PeRFlowObjective(teacher, Labelled(), b, solver_steps=2)
    batch = obj.draw(6, torch.Generator().manual_seed(3), "cpu")
    assert obj.teacher_nfe == 6 * 2 * 2  # examples x solver steps x 2 (guided)
    k = perflow.window_index(b, batch.t)
    for i in range(6):
        t0, t1 = b[k[i]], b[k[i] + 1]
        z_start = batch.z[i:i + 1] - (batch.t[i] - t0).float() * batch.target[i:i + 1]
        yi = batch.cond[i:i + 1]
        z = z_start
        for j in range(2):  # the guided DDIM by hand: x0, eps from u + 3 (c - u) in eps space
            t = (t0 + (t1 - t0) * j / 2).reshape(1).float()
            tn = (t0 + (t1 - t0) * (j + 1) / 2).reshape(1).float()
            c, u = net(z, t, yi), net(z, t, torch.full_like(yi, NULL_LABEL))
            e = u + 3.0 * (c - u)
            co, cn = sch.coefficients(t), sch.coefficients(tn)
            x0 = (z - co.b * e) / co.a
            z = cn.a * x0 + cn.b * e
        assert torch.allclose((z - z_start) / float(t1 - t0), batch.target[i:i + 1], atol=2e-3)
    plain = perflow.PeRFlowObjective(perflow.Teacher(net, sch, "eps"), Labelled(), b, solver_steps=2)
    plain.draw(6, torch.Generator().manual_seed(3), "cpu")
    assert plain.teacher_nfe == 6 * 2


def test_condition_dropout_rate_is_seeded_and_honoured():
    y = torch.arange(10).repeat(500)
    d = drop_conditions(y, NULL_LABEL, 0.2, torch.Generator().manual_seed(0))
    assert 0.18 < float((d == NULL_LABEL).float().mean()) < 0.22
    keep = d != NULL_LABEL
    assert torch.equal(d[keep], y[keep])
    assert torch.equal(d, drop_conditions(y, NULL_LABEL, 0.2, torch.Generator().manual_seed(0)))
    emb, null = torch.randn(2000, 3, 4), torch.zeros(3, 4)
    de = drop_conditions(emb, null, 0.3, torch.Generator().manual_seed(1))
    dropped = (de == 0).flatten(1).all(1)
    assert 0.27 < float(dropped.float().mean()) < 0.33 and torch.equal(de[~dropped], emb[~dropped])
    with pytest.raises(ConfigError, match="p_uncond"):
        drop_conditions(y, NULL_LABEL, 1.5)

    # in the objective: the teacher's solve and the student see the same dropped conditions
    teacher, b = perflow.Teacher(_cond_unet(), DDPMSchedule(), "eps"), perflow.make_windows(2)

    class Labelled:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 3, (n,), generator=generator)

    obj = perflow.PeRFlowObjective(teacher, Labelled(), b, solver_steps=1, p_uncond=0.25)
    batch = obj.draw(400, torch.Generator().manual_seed(5), "cpu")
    share = float((batch.cond == NULL_LABEL).float().mean())
    assert 0.19 < share < 0.31
    again = obj.draw(400, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(batch.cond, again.cond) and torch.equal(batch.target, again.target)
    i = int((batch.cond == NULL_LABEL).nonzero()[0])
    k = int(perflow.window_index(b, batch.t[i:i + 1]))
    t0, t1 = b[k], b[k + 1]
    z_start = batch.z[i:i + 1] - (batch.t[i] - t0).float() * batch.target[i:i + 1]
    z_end = teacher.ddim(z_start, t0.reshape(1), t1.reshape(1), 1, torch.tensor([NULL_LABEL]))  # the unconditional solve
    assert torch.allclose((z_end - z_start) / float(t1 - t0), batch.target[i:i + 1], atol=1e-3)
    with pytest.raises(ConfigError, match="p_uncond"):
        perflow.PeRFlowObjective(teacher, Labelled(), b, p_uncond=-0.1)


def test_dropout_needs_conditional_data_and_guidance_needs_a_condition():
    teacher, b = perflow.Teacher(_cond_unet(), DDPMSchedule(), "eps"), perflow.make_windows(2)

    class Plain:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, 1, 8, 8, generator=generator)

    with pytest.raises(ConfigError, match="p_uncond"):
        perflow.PeRFlowObjective(teacher, Plain(), b, p_uncond=0.1).draw(2, torch.Generator().manual_seed(0), "cpu")
    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    with pytest.raises(ConfigError, match="cond"):
        perflow.sample_perflow(student, torch.randn(2, 1, 8, 8), b, guidance=2.0)
    with pytest.raises(DataError, match="labelled"):
        LabelledData(Plain())


def test_the_two_modes_plan():
    assert guidance_plan("teacher", 4.0, 0.0) == (4.0, 1.0)
    assert guidance_plan("student", 4.0, 0.1) == (1.0, 4.0)
    with pytest.raises(ConfigError, match="p_uncond"):
        guidance_plan("student", 4.0, 0.0)
    with pytest.raises(ConfigError, match="guidance_mode"):
        guidance_plan("both", 4.0, 0.1)


def test_student_trained_with_dropout_keeps_both_branches():
    """Option (b) end to end in a few steps: the student learns on dropped conditions and samples with guidance."""
    from rectflow.engine.trainer import TrainConfig, Trainer

    net = _cond_unet(3)
    teacher, b = perflow.Teacher(net, FlowMatchingSchedule(), "velocity"), perflow.make_windows(2)

    class Labelled:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 3, (n,), generator=generator)

    student = perflow.PeRFlowStudent.from_teacher(teacher, b)
    obj = perflow.PeRFlowObjective(teacher, Labelled(), b, solver_steps=1, p_uncond=0.5)
    Trainer(student, obj, TrainConfig(steps=3, batch_size=8, ema_decay=0.0, device="cpu", progress=False, ckpt_every=1000)).fit(resume=False)
    assert obj.teacher_nfe == 3 * 8 * 1
    with torch.no_grad():
        out = perflow.sample_perflow(student.eval(), torch.randn(3, 1, 8, 8), b, cond=torch.tensor([0, 1, 2]), guidance=2.0)
    assert out.nfe == 4 and torch.isfinite(out.x).all()
