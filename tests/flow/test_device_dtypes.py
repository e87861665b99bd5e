"""No float64 tensor on the model's device in the paths a sampling or training step takes (Apple's MPS has no float64).

No MPS device exists here, so the steps run on PyTorch's ``meta`` device (shapes and dtypes, no data): a dispatch mode records
every op whose output is a float64 tensor on that device.  CPU-side bookkeeping (time grids) is not on it and may stay
float64; ``flow.paths.exact_dtype`` gives the careful arithmetic float64 on CPU and CUDA and float32 elsewhere."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
