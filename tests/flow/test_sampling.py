import pytest
import torch
from torch import nn

from rectflow.flow.sampling import sample_model
from tests.conftest import gen


class Field(nn.Module):
    """v(x, t) = c + a * t**p (closed form), counting calls and the training flag it saw."""

    def __init__(self, c=(1.0, -2.0), a=0.0, p=0):
        super().__init__()
        self.register_buffer("c", torch.tensor(c, dtype=torch.float64))
        self.a, self.p = a, p
        self.calls, self.modes = 0, []

    def forward(self, x, t, shift=0.0):
        self.calls += 1
        self.modes.append(self.training)
        return (self.c + self.a * t[:, None] ** self.p + shift).expand_as(x)


def x0(n=10):
    return torch.randn(n, 2, generator=gen(0), dtype=torch.float64)


@pytest.mark.parametrize("method, steps, nfe", [("euler", 5, 5), ("rk4", 3, 12), ("heun", 2, 4), ("midpoint", 4, 8)])
def test_constant_field_exact_end_point_and_nfe(method, steps, nfe):
    m, x = Field(), x0()
    res = sample_model(m, x, method=method, steps=steps)
    assert res.nfe == nfe and m.calls == nfe
    torch.testing.assert_close(res.x, x + m.c, rtol=0, atol=1e-12)
    assert res.trajectory is None


def test_time_dependent_field_euler_vs_rk4():
    # v = 4 t^3: exact displacement 1 over [0, 1]; RK4 is exact for it, Euler gives the left Riemann sum
    x, n = x0(), 4
    rk = sample_model(Field(c=(0.0, 0.0), a=4.0, p=3), x, method="rk4", steps=2)
    torch.testing.assert_close(rk.x, x + 1.0, rtol=0, atol=1e-12)
    eu = sample_model(Field(c=(0.0, 0.0), a=4.0, p=3), x, method="euler", steps=n)
    left_sum = sum(4 * (k / n) ** 3 for k in range(n)) / n
    torch.testing.assert_close(eu.x, x + left_sum, rtol=0, atol=1e-12)


def test_interval_and_model_kwargs():
    m, x = Field(), x0()
    res = sample_model(m, x, method="euler", steps=3, t0=0.25, t1=0.75, model_kwargs={"shift": 1.0})
    torch.testing.assert_close(res.x, x + 0.5 * (m.c + 1.0), rtol=0, atol=1e-12)


def test_chunking_matches_unchunked_and_reports_per_chunk_nfe():
    x = x0(10)
    full = sample_model(Field(a=1.0, p=1), x, method="rk4", steps=3, return_trajectory=True)
    m = Field(a=1.0, p=1)
    chunked = sample_model(m, x, method="rk4", steps=3, batch_size=4, return_trajectory=True)
    assert m.calls == 3 * 12  # three chunks (4, 4, 2)
    assert chunked.nfe == full.nfe == 12
    torch.testing.assert_close(chunked.x, full.x, rtol=0, atol=0)
    torch.testing.assert_close(chunked.trajectory, full.trajectory, rtol=0, atol=0)
    torch.testing.assert_close(chunked.times, full.times)


def test_trajectory_shapes():
    x = x0(7)
    res = sample_model(Field(), x, method="euler", steps=5, return_trajectory=True)
    assert res.trajectory.shape == (6, 7, 2) and res.times.shape == (6,)
    torch.testing.assert_close(res.trajectory[0], x)
    torch.testing.assert_close(res.trajectory[-1], res.x)
    torch.testing.assert_close(res.times[[0, -1]].to(torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_training_flag_restored_and_eval_during_sampling(training, batch_size):
    m = Field()
    m.train(training)
    sample_model(m, x0(), method="euler", steps=2, batch_size=batch_size)
    assert m.training is training
    assert m.modes and not any(m.modes)  # the model is evaluated in eval mode


def test_training_flag_restored_after_error():
    class Broken(Field):
        def forward(self, x, t, **kw):
            raise RuntimeError("boom")

    m = Broken()
    m.train()
    with pytest.raises(RuntimeError, match="boom"):
        sample_model(m, x0(), steps=2)
    assert m.training


class LinearField(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2).double()

    def forward(self, x, t):
        return self.lin(x)


def test_no_autograd_graph():
    res = sample_model(LinearField(), x0(), steps=2)
    assert not res.x.requires_grad and res.x.grad_fn is None


def test_non_finite_samples_are_an_error_never_returned():
    class NaNField(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        sample_model(NaNField(), torch.zeros(4, 2), method="euler", steps=2)
