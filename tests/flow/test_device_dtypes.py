"""No float64 tensor on the model's device in the paths a sampling or training step takes (Apple's MPS has no float64).

No MPS device exists here, so the steps run on PyTorch's ``meta`` device (shapes and dtypes, no data): a dispatch mode records
every op whose output is a float64 tensor on that device.  CPU-side bookkeeping (time grids) is not on it and may stay
float64; ``flow.paths.exact_dtype`` gives the careful arithmetic float64 on CPU and CUDA and float32 elsewhere."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rectflow import MLPVelocity, perflow, solve
from rectflow.diffusion.schedules import DDPMSchedule, FlowMatchingSchedule, VPCosineSchedule
from rectflow.flow.paths import exact_dtype
from rectflow.perflow.windows import WindowPath, window_index


class Float64OnDevice(TorchDispatchMode):
    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device, self.ops = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.device.type == self.device and o.dtype == torch.float64:
                self.ops.append(str(func))
        return out


def _none_on_device(fn):
    watch = Float64OnDevice()
    with watch:
        fn()
    assert watch.ops == [], sorted(set(watch.ops))


def test_exact_dtype_is_float64_only_where_the_device_has_it():
    assert exact_dtype("cpu") == torch.float64 and exact_dtype("cuda") == torch.float64
    assert exact_dtype("mps") == torch.float32 and exact_dtype("meta") == torch.float32


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_flow_solvers_keep_the_device_free_of_float64(method):
    model = MLPVelocity(2, width=8, depth=2).to("meta")
    _none_on_device(lambda: solve(model, torch.randn(4, 2, device="meta"), method=method, steps=3))


@pytest.mark.parametrize("schedule", [DDPMSchedule(), DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                      FlowMatchingSchedule(), VPCosineSchedule()], ids=["ddpm", "sd", "fm", "vp-cosine"])
def test_schedule_coefficients_on_the_device_are_not_float64(schedule):
    _none_on_device(lambda: schedule.coefficients(torch.rand(8, device="meta")))


def test_perflow_windows_on_the_device_are_not_float64():
    path = WindowPath(DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), perflow.make_windows(4))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.rand(8, device="meta").to(dtype)
        _none_on_device(lambda: window_index(path.boundaries, t))
        _none_on_device(lambda: path.coefficients(t))


# ----- the rest of a sampling or training step (issue 29's audit): diffusion samplers, preconditioning, loss weights,
# schedule inversions, time samplers, the shortcut objective, Sinkhorn, diagnostics and feature extraction.
#
# The meta device has no data, and these steps test values (finite checks, branches), so they run on the CPU with the
# inputs and the model's parameters *marked* as device tensors: every tensor a function computes from a marked one is
# marked too, ``.cpu()`` / ``.numpy()`` / ``.to("cpu")`` leave the device, and a marked float64 result is the error.


def _to_cpu(func, args, kwargs) -> bool:
    if func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist):
        return True
    if func is torch.Tensor.to:
        dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        return dev is not None and torch.device(dev).type == "cpu"
    return False


class SimulatedDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.seen = 0  # ops on device tensors: a test that saw none proved nothing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(getattr(t, "_on_device", False) for t in leaves):
            return out
        self.seen += 1
        if _to_cpu(func, args, kwargs):
            return out.clone() if isinstance(out, torch.Tensor) and any(out is t for t in leaves) else out
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                o._on_device = True
                if o.dtype == torch.float64:
                    self.ops.append(getattr(func, "__name__", str(func)))
        return out


def _on_device(*objs):
    for o in objs:
        for t in o.parameters() if isinstance(o, torch.nn.Module) else [o]:
            t._on_device = True
    return objs[0] if len(objs) == 1 else objs


def _none_on_simulated_device(fn, monkeypatch):
    """Run fn with ``exact_dtype`` answering as it does for MPS (float32) in every rectflow module that uses it."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("rectflow") and getattr(module, "exact_dtype", None) is exact_dtype:
            monkeypatch.setattr(module, "exact_dtype", lambda device: torch.float32)
    watch = SimulatedDevice()
    with watch:
        fn()
    assert watch.seen > 0, "nothing ran on the simulated device"
    assert watch.ops == [], sorted(set(watch.ops))


class _Velocity(torch.nn.Module):
    """v(x, t) = x * t (any shape); a layer so that train / eval modes exist."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, t, *rest):
        return x * self.scale * t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "edm_heun", "euler_eta"])
def test_diffusion_samplers_keep_the_device_free_of_float64(name, monkeypatch):
    from rectflow.diffusion import samplers

    path = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    grid = torch.linspace(0.0, 0.999, 5, dtype=torch.float64)
    fn = getattr(samplers, name)
    model, x = _on_device(_Velocity(), torch.randn(4, 3))
    _none_on_simulated_device(lambda: fn(model, x, grid, path=path, parameterization="eps"), monkeypatch)


def test_edm_preconditioning_and_loss_weights_on_the_device_are_not_float64(monkeypatch):
    from rectflow.diffusion.parameterizations import EDMPreconditioned
    from rectflow.diffusion.weighting import LogSNRNormalTime, loss_factor, make_weighting

    path = VPCosineSchedule()
    t = _on_device(torch.rand(8) * 0.9 + 0.05)
    model, z = _on_device(_Velocity(), torch.randn(8, 3))
    _none_on_simulated_device(lambda: EDMPreconditioned(model, path)(z, t), monkeypatch)
    sampler = LogSNRNormalTime(path)
    _none_on_simulated_device(lambda: loss_factor(t, path=path, parameterization="eps", weighting=make_weighting("edm"), time_sampler=sampler), monkeypatch)


@pytest.mark.parametrize("schedule", [DDPMSchedule(), VPCosineSchedule(), FlowMatchingSchedule()], ids=["ddpm", "vp-cosine", "fm"])
def test_schedule_inversions_on_the_device_are_not_float64(schedule, monkeypatch):
    from rectflow.diffusion.schedules import time_from_log_snr

    lam = _on_device(torch.randn(8))
    _none_on_simulated_device(lambda: time_from_log_snr(schedule, lam), monkeypatch)


def test_time_samplers_draw_in_the_devices_exact_dtype(monkeypatch):
    """Draws happen on the generator's device (the model's, on MPS): float64 only where exact_dtype allows it."""
    from rectflow.diffusion import weighting
    from rectflow.flow import meanflow

    class Pairs:
        heavy = False

        def sample(self, n, *, generator=None, device=None):
            return torch.randn(n, 2), torch.randn(n, 2)

    for module in (weighting, meanflow):
        monkeypatch.setattr(module, "exact_dtype", lambda device: torch.float32)  # what MPS gets
    seen = []
    real = torch.rand, torch.randn

    def spy(which):
        def draw(*a, dtype=None, **kw):
            seen.append(dtype)
            return real[which](*a, dtype=dtype, **kw)
        return draw

    monkeypatch.setattr(torch, "rand", spy(0))
    monkeypatch.setattr(torch, "randn", spy(1))
    weighting.LogSNRNormalTime(VPCosineSchedule())(8, device="cpu")
    meanflow.ShortcutObjective(Pairs()).draw(8, torch.Generator().manual_seed(0), "cpu")
    assert seen and torch.float64 not in seen, seen


def test_sinkhorn_costs_take_the_devices_exact_dtype(monkeypatch):
    """POT's Sinkhorn runs on the device of the cost: its dtype must be one the device has (float32 on MPS)."""
    import ot

    from rectflow.flow import couplings

    seen = []

    def sinkhorn(a, b, c, reg, **kw):
        seen.append(c.dtype)
        return torch.full_like(c, 1.0 / c.numel())

    monkeypatch.setattr(ot, "sinkhorn", sinkhorn)
    monkeypatch.setattr(couplings, "exact_dtype", lambda device: torch.float32)  # what MPS gets
    couplings.ot_pairing(torch.randn(6, 2), torch.randn(6, 2), method="sinkhorn")
    assert seen == [torch.float32]


def test_straightness_transport_cost_and_metrics_keep_the_device_free_of_float64(monkeypatch):
    from rectflow.flow.metrics import energy_distance
    from rectflow.images.quality import extract_features
    from rectflow.reflow.diagnostics import straightness, transport_cost

    model, x0, x1 = _on_device(_Velocity(), torch.randn(6, 2), torch.randn(6, 2))
    _none_on_simulated_device(lambda: straightness(model, x0, steps=3), monkeypatch)
    _none_on_simulated_device(lambda: transport_cost(x0, x1, exact_ot=False), monkeypatch)
    _none_on_simulated_device(lambda: energy_distance(x0, x1), monkeypatch)
    images = _on_device(torch.rand(4, 3, 2, 2) * 2 - 1)
    _none_on_simulated_device(lambda: extract_features(torch.nn.Flatten(), images, device="cpu"), monkeypatch)


def test_auto_device_picks_mps_where_it_is_the_only_accelerator(monkeypatch):
    from rectflow.engine.hardware import resolve_device
    from rectflow.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="mps"):
        resolve_device("mps")


@pytest.mark.parametrize("method,estimator", [("dopri5", "exact"), ("rk4", "hutchinson")])
def test_likelihood_accumulates_on_the_device_without_float64(method, estimator, monkeypatch):
    from rectflow.data.toy2d import Gaussian
    from rectflow.flow.likelihood import log_likelihood

    model, x1 = _on_device(_Velocity(), torch.randn(5, 2))
    _none_on_simulated_device(lambda: log_likelihood(model, x1, Gaussian(2), method=method, steps=4, estimator=estimator), monkeypatch)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_training_step_keeps_the_device_free_of_float64(ema, tmp_path, monkeypatch):
    """Trainer.fit on the device: the forward and backward pass, the optimizer, EMA, the loss log and the checkpoint."""
    from rectflow.data.toy2d import Gaussian, Moons
    from rectflow.engine.trainer import TrainConfig, Trainer
    from rectflow.flow.couplings import IndependentCoupling
    from rectflow.flow.losses import FlowMatchingObjective

    model = _on_device(MLPVelocity(2, width=8, depth=2))
    objective = FlowMatchingObjective(IndependentCoupling(Gaussian(2), Moons()))
    cfg = TrainConfig(steps=3, batch_size=8, ema_decay=ema, log_every=1, ckpt_every=2, device="cpu", precision="fp32", progress=False)
    _none_on_simulated_device(lambda: Trainer(model, objective, cfg, tmp_path / "run").fit(), monkeypatch)
