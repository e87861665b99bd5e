import math

import pytest
import torch

from rectflow.flow.solvers import METHODS, dopri5, euler, heun, midpoint, rk4, solve, time_grid

# dx/dt = -2 t x + R x (a decaying rotation): x(t) = exp(-t^2) Rot(t) x0.
ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


def f(x, t):
    return -2 * t[:, None] * x + x @ ROT.T


def exact(x0, t):
    c, s = math.cos(t), math.sin(t)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return math.exp(-t * t) * x0 @ rot.T


X0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize("solver, order, stages", [(euler, 1, 1), (midpoint, 2, 2), (heun, 2, 2), (rk4, 4, 4)])
def test_fixed_step_order_and_nfe(solver, order, stages):
    errors = []
    for n in (16, 32, 64):
        res = solver(f, X0, time_grid(n))
        assert res.nfe == stages * n
        errors.append(float((res.x - exact(X0, 1.0)).abs().max()))
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - order) < 0.15 for p in observed), observed


def test_dopri5_error_below_tolerance_and_nfe_counts():
    loose = dopri5(f, X0, rtol=1e-4, atol=1e-4)
    tight = dopri5(f, X0, rtol=1e-9, atol=1e-9)
    assert float((tight.x - exact(X0, 1.0)).abs().max()) < 1e-7
    assert float((loose.x - exact(X0, 1.0)).abs().max()) < 1e-3
    assert loose.nfe < tight.nfe
    # every step costs 6 evaluations (FSAL) plus the first evaluation and the initial-step probe
    assert (tight.nfe - 2) % 6 == 0


def test_dopri5_backward_inverts_forward():
    fwd = dopri5(f, X0, 0.0, 1.0, rtol=1e-10, atol=1e-10)
    back = dopri5(f, fwd.x, 1.0, 0.0, rtol=1e-10, atol=1e-10)
    assert torch.allclose(back.x, X0, atol=1e-8)


def test_dopri5_trajectory_times_monotone_and_end_exact():
    res = dopri5(f, X0, rtol=1e-6, atol=1e-6, return_trajectory=True)
    assert res.trajectory.shape[1:] == X0.shape and res.trajectory.shape[0] == res.times.shape[0]
    assert float(res.times[0]) == 0.0 and float(res.times[-1]) == 1.0
    assert bool((res.times[1:] > res.times[:-1]).all())
    assert torch.equal(res.trajectory[-1], res.x)


def test_custom_grid_and_trajectory():
    grid = torch.tensor([0.0, 0.1, 0.5, 0.55, 1.0])
    res = euler(f, X0, grid, return_trajectory=True)
    assert res.trajectory.shape == (5, 2, 2) and res.nfe == 4
    assert torch.equal(res.trajectory[0], X0) and torch.equal(res.trajectory[-1], res.x)
    # one Euler step on a hand-computed case
    one = euler(f, X0, [0.0, 0.5])
    assert torch.allclose(one.x, X0 + 0.5 * f(X0, torch.zeros(2, dtype=torch.float64)))


def test_decreasing_grid_integrates_backwards():
    fwd = rk4(f, X0, time_grid(50))
    back = rk4(f, fwd.x, time_grid(50, 1.0, 0.0))
    assert torch.allclose(back.x, X0, atol=1e-7)


def test_solve_dispatch_and_errors():
    for m in METHODS:
        res = solve(f, X0, method=m, steps=10)
        assert torch.allclose(res.x, exact(X0, 1.0), atol=0.1)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(f, X0, method="rk45x")
    with pytest.raises(ValueError, match=">= 1"):
        solve(f, X0, method="euler", steps=0)
    with pytest.raises(ValueError, match="rtol"):
        solve(f, X0, method="dopri5", rtol=0.0)
    with pytest.raises(ValueError, match="strictly"):
        euler(f, X0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        euler(f, X0, [0.0])


def test_dopri5_reports_nan_clearly():
    with pytest.raises(FloatingPointError, match="NaN"):
        dopri5(lambda x, t: x * float("nan"), X0)


def test_solvers_are_pure():
    """Same inputs, same outputs, twice: nothing is remembered between calls."""
    a, b = solve(f, X0, method="heun", steps=7), solve(f, X0, method="heun", steps=7)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_are_given_float32_times(dtype):
    """The times a solver hands the network stay float32 when the state is half precision: bf16 rounds
    t = 0.99 to 0.98828125, which a pretrained teacher reads as another noise level (SD3's last step)."""
    seen = []

    def f(x, t):
        seen.append(t)
        return -x

    x = torch.ones(3, 2, dtype=dtype)
    grid = [0.0, 0.33, 0.99]
    for solver in (euler, rk4):
        seen.clear()
        out = solver(f, x, grid).x
        assert out.dtype == dtype
        assert all(t.dtype == torch.float32 and t.shape == (3,) for t in seen)
        assert float(seen[-1 if solver is euler else -4][0]) == float(torch.tensor(0.33, dtype=torch.float32))
    seen.clear()
    euler(f, x.double(), grid)
    assert {t.dtype for t in seen} == {torch.float64}  # float64 states keep float64 times


@pytest.mark.parametrize("solver", [euler, rk4, dopri5])
def test_a_half_precision_state_stays_half_precision_when_the_field_multiplies_by_t(solver):
    """The float32 times make a field written as -x * t return float32; the state keeps its own dtype."""
    x, f = torch.ones(3, 2, dtype=torch.bfloat16), lambda x, t: -x * t[:, None]
    res = dopri5(f, x, 0.0, 1.0, return_trajectory=True) if solver is dopri5 else solver(f, x, [0.0, 0.5, 1.0], return_trajectory=True)
    assert res.x.dtype == torch.bfloat16 and res.trajectory.dtype == torch.bfloat16
